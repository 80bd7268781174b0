/* tls.c — TLS 1.3 migration links with GnuTLS (see tls.h).
 *
 * After the handshake two threads relay between the TLS session on the socket and the
 * plaintext socketpair the caller holds: "out" reads the caller's bytes and sends them as
 * records (corked, so a burst goes out in few writes), "in" receives records and writes their
 * plaintext to the caller. GnuTLS allows one sending and one receiving thread on a session. The
 * last thread to finish frees the session and closes both descriptors. */
#include "drafter/tls.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/log.h"

#include <ctype.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define DEFAULT_IDENTITY "drafter"
#define MIN_KEY_BYTES 16
#define MAX_KEY_BYTES 64
#define RELAY_BUFFER (1u << 20)
#define RECORD_MAX 16384u
#define PLAIN_BUFFER (4 << 20)

/* TLS 1.3 only; AES-128-GCM first (the fastest with AES-NI). A PSK link also runs an (EC)DHE
 * exchange, so recorded traffic stays secret even if the key leaks later. */
#define PRIORITY_BASE "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+AES-128-GCM:+AES-256-GCM:+CHACHA20-POLY1305"
#define PRIORITY_PSK PRIORITY_BASE ":-KX-ALL:+ECDHE-PSK:+DHE-PSK"

struct tls_context {
        bool psk;
        char identity[128];
        gnutls_datum_t key;
        gnutls_psk_client_credentials_t psk_client;
        gnutls_psk_server_credentials_t psk_server;
        gnutls_certificate_credentials_t x509;
        gnutls_priority_t priority;
        char describe[160];
};

static int tls_error(int gr, const char *what) {
        return error_set(-EPROTO, "%s: %s", what, gnutls_strerror(gr));
}

static int hex_value(int c) {
        return isdigit(c) ? c - '0' : isxdigit(c) ? tolower(c) - 'a' + 10 : -1;
}

/* "identity:hex" or "hex", surrounding white space ignored. */
static int parse_psk(struct tls_context *c, const char *file, const char *text, size_t len) {
        while (len && isspace((unsigned char)text[len - 1]))
                len--;
        while (len && isspace((unsigned char)*text))
                text++, len--;
        const char *colon = memchr(text, ':', len);
        const char *hex = colon ? colon + 1 : text;
        size_t idlen = colon ? (size_t)(colon - text) : strlen(DEFAULT_IDENTITY);
        if (idlen == 0 || idlen >= sizeof(c->identity))
                return error_set(-EINVAL, "--psk-file %s: the identity before ':' must be 1 to %zu characters", file,
                                 sizeof(c->identity) - 1);
        memcpy(c->identity, colon ? text : DEFAULT_IDENTITY, idlen);
        c->identity[idlen] = 0;
        size_t hexlen = len - (size_t)(hex - text);
        if (hexlen % 2 || hexlen / 2 < MIN_KEY_BYTES || hexlen / 2 > MAX_KEY_BYTES)
                return error_set(-EINVAL,
                                 "--psk-file %s: the key must be %d to %d bytes written as hex digits (%zu characters "
                                 "found; `openssl rand -hex 32` makes one)",
                                 file, MIN_KEY_BYTES, MAX_KEY_BYTES, hexlen);
        c->key.data = gnutls_malloc(hexlen / 2);
        if (!c->key.data)
                return error_set(-ENOMEM, "TLS: out of memory");
        c->key.size = (unsigned)(hexlen / 2);
        for (size_t i = 0; i < hexlen / 2; i++) {
                int hi = hex_value((unsigned char)hex[2 * i]), lo = hex_value((unsigned char)hex[2 * i + 1]);
                if (hi < 0 || lo < 0)
                        return error_set(-EINVAL, "--psk-file %s: '%c' is not a hex digit", file,
                                         hi < 0 ? hex[2 * i] : hex[2 * i + 1]);
                c->key.data[i] = (unsigned char)(hi << 4 | lo);
        }
        return 0;
}

static int server_psk(gnutls_session_t s, const char *identity, gnutls_datum_t *key) {
        const struct tls_context *c = gnutls_session_get_ptr(s);
        if (strcmp(identity, c->identity) != 0) {
                char shown[65];
                size_t i = 0;
                for (; i < sizeof(shown) - 1 && identity[i]; i++) /* it comes off the network */
                        shown[i] = isprint((unsigned char)identity[i]) ? identity[i] : '?';
                shown[i] = 0;
                log_warning("TLS: a peer offered the unknown PSK identity \"%s\"", shown);
                return -1;
        }
        key->data = gnutls_malloc(c->key.size);
        if (!key->data)
                return -1;
        memcpy(key->data, c->key.data, c->key.size);
        key->size = c->key.size;
        return 0;
}

/* Both sides: the peer must present a certificate that the CA signed and that is in date. */
static int verify_peer(gnutls_session_t s) {
        unsigned status = 0, count = 0;
        if (gnutls_certificate_get_peers(s, &count) == NULL || count == 0) {
                log_warning("TLS: the peer presented no certificate");
                return GNUTLS_E_CERTIFICATE_REQUIRED;
        }
        int gr = gnutls_certificate_verify_peers2(s, &status);
        if (gr < 0 || status) {
                gnutls_datum_t out = {0};
                if (gr >= 0 && gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) >= 0) {
                        log_warning("TLS: refused the peer's certificate: %s", (const char *)out.data);
                        gnutls_free(out.data);
                } else {
                        log_warning("TLS: refused the peer's certificate: %s",
                                    gr < 0 ? gnutls_strerror(gr) : "it did not verify");
                }
                return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR;
        }
        return 0;
}

static int load_psk(struct tls_context *c, const char *file) {
        struct stat st;
        if (stat(file, &st) < 0)
                return error_set_errno(-errno, "--psk-file %s", file);
        if (st.st_mode & 077)
                log_warning("--psk-file %s: readable by others than its owner (chmod 600 it)", file);
        gnutls_datum_t text = {0};
        int gr = gnutls_load_file(file, &text);
        if (gr < 0)
                return error_set(-EIO, "--psk-file %s: %s", file, gnutls_strerror(gr));
        int r = parse_psk(c, file, (const char *)text.data, text.size);
        gnutls_memset(text.data, 0, text.size);
        gnutls_free(text.data);
        if (r < 0)
                return r;
        if ((gr = gnutls_psk_allocate_client_credentials(&c->psk_client)) < 0 ||
            (gr = gnutls_psk_set_client_credentials(c->psk_client, c->identity, &c->key, GNUTLS_PSK_KEY_RAW)) < 0 ||
            (gr = gnutls_psk_allocate_server_credentials(&c->psk_server)) < 0)
                return tls_error(gr, "TLS PSK credentials");
        gnutls_psk_set_server_credentials_function(c->psk_server, server_psk);
        c->psk = true;
        snprintf(c->describe, sizeof(c->describe), "PSK identity %s", c->identity);
        return 0;
}

static int load_x509(struct tls_context *c, const struct tls_options *o) {
        if (!*o->cert_file || !*o->key_file || !*o->ca_file)
                return error_set(-EINVAL, "TLS certificates need all three of --tls-cert, --tls-key and --tls-ca");
        int gr = gnutls_certificate_allocate_credentials(&c->x509);
        if (gr < 0)
                return tls_error(gr, "TLS certificate credentials");
        if (access(o->ca_file, R_OK) < 0)
                return error_set_errno(-errno, "--tls-ca %s", o->ca_file);
        gr = gnutls_certificate_set_x509_trust_file(c->x509, o->ca_file, GNUTLS_X509_FMT_PEM);
        if (gr <= 0)
                return error_set(-EINVAL, "--tls-ca %s: %s", o->ca_file,
                                 gr == 0 ? "no PEM certificate in it" : gnutls_strerror(gr));
        if (access(o->cert_file, R_OK) < 0)
                return error_set_errno(-errno, "--tls-cert %s", o->cert_file);
        if (access(o->key_file, R_OK) < 0)
                return error_set_errno(-errno, "--tls-key %s", o->key_file);
        gr = gnutls_certificate_set_x509_key_file(c->x509, o->cert_file, o->key_file, GNUTLS_X509_FMT_PEM);
        if (gr < 0)
                return error_set(-EINVAL, "--tls-cert %s with --tls-key %s: %s", o->cert_file, o->key_file,
                                 gnutls_strerror(gr));
        gnutls_certificate_set_verify_function(c->x509, verify_peer);
        snprintf(c->describe, sizeof(c->describe), "certificates signed by %s", o->ca_file);
        return 0;
}

void tls_context_free(struct tls_context *c) {
        if (!c)
                return;
        if (c->psk_client)
                gnutls_psk_free_client_credentials(c->psk_client);
        if (c->psk_server)
                gnutls_psk_free_server_credentials(c->psk_server);
        if (c->x509)
                gnutls_certificate_free_credentials(c->x509);
        if (c->priority)
                gnutls_priority_deinit(c->priority);
        if (c->key.data) {
                gnutls_memset(c->key.data, 0, c->key.size);
                gnutls_free(c->key.data);
        }
        free(c);
}

int tls_context_new(const struct tls_options *o, struct tls_context **ret) {
        *ret = NULL;
        const char *psk = o->psk_file ? o->psk_file : "";
        struct tls_options x = {.cert_file = o->cert_file ? o->cert_file : "",
                                .key_file = o->key_file ? o->key_file : "",
                                .ca_file = o->ca_file ? o->ca_file : ""};
        bool any_x509 = *x.cert_file || *x.key_file || *x.ca_file;
        if (!*psk && !any_x509)
                return 0;
        if (*psk && any_x509)
                return error_set(-EINVAL, "--psk-file and --tls-cert/--tls-key/--tls-ca are two ways to secure a link: "
                                          "name one");
        struct tls_context *c = calloc(1, sizeof(*c));
        if (!c)
                return error_set(-ENOMEM, "TLS: out of memory");
        int r = *psk ? load_psk(c, psk) : load_x509(c, &x);
        if (r >= 0) {
                const char *where;
                int gr = gnutls_priority_init(&c->priority, c->psk ? PRIORITY_PSK : PRIORITY_BASE, &where);
                if (gr < 0)
                        r = error_set(-EINVAL, "TLS priority string at \"%s\": %s", where, gnutls_strerror(gr));
        }
        if (r < 0) {
                tls_context_free(c);
                return r;
        }
        *ret = c;
        return 0;
}

void tls_context_finish(struct tls_context *c) {
        if (c && !tls_drain(5000))
                log_warning("a secured link still had data to send after 5 s");
        tls_context_free(c);
}

int tls_context_from_flags(const struct tls_options *o, bool links, struct tls_context **ret) {
        int r = tls_context_new(o, ret);
        if (r < 0) {
                log_error("%s", error_message());
                return r;
        }
        if (links && !*ret)
                log_warning("migration links are neither authenticated nor encrypted: anyone who reaches them can take "
                            "or feed this VM (secure them with --psk-file, or --tls-cert, --tls-key and --tls-ca)");
        return 0;
}

const char *tls_context_describe(const struct tls_context *c) {
        return c ? c->describe : "no TLS";
}

struct relay {
        gnutls_session_t session;
        int net, plain;
        atomic_int threads;
        /* What came off the socket and GnuTLS has not taken yet: one recv() fills it with many
         * records, where GnuTLS alone reads each record's header and body separately. */
        uint8_t *in;
        size_t in_start, in_end;
        atomic_bool broken;       /* a record failed (or an alert came): no close_notify from us */
        atomic_bool local_closed; /* the caller closed its end: relay_in stopped waiting */
};

/* relay_out threads still sending, for tls_drain(). */
static pthread_mutex_t sending_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t sending_done = PTHREAD_COND_INITIALIZER;
static unsigned sending;

static void sending_add(int delta) {
        pthread_mutex_lock(&sending_lock);
        sending = (unsigned)((int)sending + delta);
        pthread_cond_broadcast(&sending_done);
        pthread_mutex_unlock(&sending_lock);
}

bool tls_drain(int timeout_ms) {
        struct timespec deadline;
        clock_deadline_after((uint64_t)timeout_ms * NSEC_PER_MSEC, &deadline);
        pthread_mutex_lock(&sending_lock);
        while (sending > 0 && pthread_cond_timedwait(&sending_done, &sending_lock, &deadline) == 0)
                ;
        bool done = sending == 0;
        pthread_mutex_unlock(&sending_lock);
        return done;
}

/* GnuTLS's transport: errno is per thread, and GnuTLS reads it (no gnutls_transport_set_errno,
 * which is per session and would race between the two relay threads). */
static ssize_t pull(gnutls_transport_ptr_t ptr, void *data, size_t len) {
        struct relay *rl = ptr;
        if (rl->in_start == rl->in_end) {
                /* Wait for the peer, or for the caller to close its end (then nothing more can be
                 * delivered, and waiting on would keep this thread, the socket and the session
                 * alive for as long as the peer keeps its side open). */
                struct pollfd p[2] = {{.fd = rl->net, .events = POLLIN}, {.fd = rl->plain, .events = 0}};
                for (;;) {
                        int k = poll(p, 2, -1);
                        if (k < 0 && errno == EINTR)
                                continue;
                        if (k < 0)
                                return -1;
                        if (!(p[0].revents & (POLLIN | POLLHUP | POLLERR)) && (p[1].revents & (POLLHUP | POLLERR))) {
                                atomic_store(&rl->local_closed, true);
                                errno = ECONNABORTED;
                                return -1;
                        }
                        if (p[0].revents)
                                break;
                }
                ssize_t n;
                do
                        n = recv(rl->net, rl->in, RELAY_BUFFER, 0);
                while (n < 0 && errno == EINTR);
                if (n <= 0)
                        return n;
                rl->in_start = 0, rl->in_end = (size_t)n;
        }
        size_t k = MIN(len, rl->in_end - rl->in_start);
        memcpy(data, rl->in + rl->in_start, k);
        rl->in_start += k;
        return (ssize_t)k;
}

static int pull_timeout(gnutls_transport_ptr_t ptr, unsigned ms) {
        struct relay *rl = ptr;
        if (rl->in_start < rl->in_end)
                return 1;
        struct pollfd p = {.fd = rl->net, .events = POLLIN};
        int n = poll(&p, 1, ms == GNUTLS_INDEFINITE_TIMEOUT ? -1 : (int)ms);
        return n < 0 ? -1 : n;
}

static ssize_t push(gnutls_transport_ptr_t ptr, const giovec_t *iov, int count) {
        struct relay *rl = ptr;
        struct msghdr m = {.msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)count};
        ssize_t n;
        do
                n = sendmsg(rl->net, &m, MSG_NOSIGNAL);
        while (n < 0 && errno == EINTR);
        return n;
}

static void relay_free(struct relay *rl) {
        gnutls_deinit(rl->session);
        close(rl->net);
        close(rl->plain);
        free(rl->in);
        free(rl);
}

static void relay_release(struct relay *rl) {
        if (atomic_fetch_sub(&rl->threads, 1) == 1)
                relay_free(rl);
}

static int send_all(gnutls_session_t s, const uint8_t *p, size_t n) {
        gnutls_record_cork(s);
        while (n) {
                ssize_t w = gnutls_record_send(s, p, n);
                if (w == GNUTLS_E_AGAIN || w == GNUTLS_E_INTERRUPTED)
                        continue;
                if (w < 0)
                        return (int)w;
                p += w, n -= (size_t)w;
        }
        for (;;) {
                int r = gnutls_record_uncork(s, GNUTLS_RECORD_WAIT);
                if (r != GNUTLS_E_AGAIN && r != GNUTLS_E_INTERRUPTED)
                        return r < 0 ? r : 0;
        }
}

/* The caller's bytes → records. The caller closing (or shutting down) its end sends close_notify. */
static void *relay_out(void *arg) {
        struct relay *rl = arg;
        uint8_t *buf = malloc(RELAY_BUFFER);
        for (;;) {
                ssize_t n = buf ? read(rl->plain, buf, RELAY_BUFFER) : -1;
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0) {
                        if (n == 0 && !atomic_load(&rl->broken))
                                gnutls_bye(rl->session, GNUTLS_SHUT_WR);
                        shutdown(rl->net, n == 0 ? SHUT_WR : SHUT_RDWR);
                        break;
                }
                int gr = send_all(rl->session, buf, (size_t)n);
                if (gr < 0) {
                        log_debug("TLS send: %s", gnutls_strerror(gr));
                        /* The caller's writes fail from now on instead of filling the socketpair. */
                        shutdown(rl->plain, SHUT_RDWR);
                        shutdown(rl->net, SHUT_RDWR);
                        break;
                }
        }
        free(buf);
        sending_add(-1);
        relay_release(rl);
        return NULL;
}


/* Is another whole record at hand (so reading it cannot block while decrypted data waits)? */
static bool more_ready(struct relay *rl) {
        if (gnutls_record_check_pending(rl->session) > 0)
                return true;
        size_t have = rl->in_end - rl->in_start; /* GnuTLS leaves it at a record boundary */
        const uint8_t *h = rl->in + rl->in_start;
        return have >= 5 && have >= 5 + ((size_t)h[3] << 8 | h[4]);
}

/* Records → the caller. The end of the session (or a failed record) ends the caller's stream. */
static void *relay_in(void *arg) {
        struct relay *rl = arg;
        uint8_t *buf = malloc(RELAY_BUFFER);
        bool broken = !buf;
        while (!broken) {
                size_t have = 0;
                ssize_t n;
                do {
                        n = gnutls_record_recv(rl->session, buf + have, RELAY_BUFFER - have);
                        if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED)
                                continue;
                        if (n <= 0)
                                break;
                        have += (size_t)n;
                } while (RELAY_BUFFER - have >= RECORD_MAX && more_ready(rl));
                struct iovec iov = {buf, have};
                if (have && io_write_iov(rl->plain, &iov, 1) < 0)
                        break; /* the caller stopped reading */
                if (n == 0)
                        break; /* close_notify */
                if (n < 0 && n != GNUTLS_E_AGAIN && n != GNUTLS_E_INTERRUPTED) {
                        if (atomic_load(&rl->local_closed))
                                break; /* our caller is gone: nothing to report to anyone */
                        if (n == GNUTLS_E_FATAL_ALERT_RECEIVED)
                                log_warning("TLS link: the peer ended it with the alert \"%s\"",
                                            gnutls_alert_get_name(gnutls_alert_get(rl->session)));
                        else if (n != GNUTLS_E_PREMATURE_TERMINATION)
                                log_warning("TLS link: %s", gnutls_strerror((int)n));
                        atomic_store(&rl->broken, true);
                        broken = true;
                }
        }
        /* The caller reads the end of the stream (a peer that vanished looks like one that closed;
         * the migration protocol tells a finished stream from a cut one). */
        shutdown(rl->plain, broken ? SHUT_RDWR : SHUT_WR);
        shutdown(rl->net, SHUT_RD);
        free(buf);
        relay_release(rl);
        return NULL;
}

static int handshake(struct tls_context *c, gnutls_session_t s, int timeout_ms) {
        gnutls_handshake_set_timeout(s, timeout_ms > 0 ? (unsigned)timeout_ms : GNUTLS_DEFAULT_HANDSHAKE_TIMEOUT);
        int gr;
        do
                gr = gnutls_handshake(s);
        while (gr < 0 && !gnutls_error_is_fatal(gr));
        if (gr < 0) {
                /* Tell the peer why (GnuTLS leaves the alert to us), so its error is clear too. */
                if (gr == GNUTLS_E_CERTIFICATE_ERROR || gr == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR)
                        gnutls_alert_send(s, GNUTLS_AL_FATAL, GNUTLS_A_BAD_CERTIFICATE);
                else if (gr != GNUTLS_E_PREMATURE_TERMINATION && gr != GNUTLS_E_FATAL_ALERT_RECEIVED)
                        gnutls_alert_send_appropriate(s, gr);
                log_debug("TLS handshake failed: %d %s", gr, gnutls_strerror(gr));
                const char *hint = "";
                if (gr == GNUTLS_E_UNEXPECTED_PACKET_LENGTH || gr == GNUTLS_E_UNSUPPORTED_VERSION_PACKET)
                        hint = " (is the peer running without TLS?)";
                else if (gr == GNUTLS_E_PREMATURE_TERMINATION)
                        hint = " (the peer closed the connection: a wrong key or certificate on its side?)";
                else if (gr == GNUTLS_E_DECRYPTION_FAILED || gr == GNUTLS_E_INSUFFICIENT_CREDENTIALS ||
                         gr == GNUTLS_E_KEY_USAGE_VIOLATION)
                        hint = c->psk ? " (do both sides use the same --psk-file?)" : "";
                else if (gr == GNUTLS_E_WARNING_ALERT_RECEIVED || gr == GNUTLS_E_FATAL_ALERT_RECEIVED)
                        return error_set(-EACCES, "TLS handshake: the peer refused us: %s%s",
                                         gnutls_alert_get_name(gnutls_alert_get(s)),
                                         c->psk ? " (do both sides use the same --psk-file?)" : "");
                return error_set(-EACCES, "TLS handshake: %s%s", gnutls_strerror(gr), hint);
        }
        return 0;
}

int tls_wrap(struct tls_context *c, int fd, bool server, int timeout_ms, int *ret_fd) {
        if (!c) {
                *ret_fd = fd;
                return 0;
        }
        int pair[2] = {-1, -1};
        struct relay *rl = calloc(1, sizeof(*rl));
        if (!rl || !(rl->in = malloc(RELAY_BUFFER))) {
                free(rl);
                close(fd);
                return error_set(-ENOMEM, "TLS: out of memory");
        }
        rl->net = fd, rl->plain = -1, rl->threads = 2;
        int gr = gnutls_init(&rl->session, (server ? GNUTLS_SERVER : GNUTLS_CLIENT) | GNUTLS_NO_TICKETS);
        if (gr < 0) {
                free(rl->in);
                free(rl);
                close(fd);
                return tls_error(gr, "TLS session");
        }
        gnutls_session_t s = rl->session;
        gnutls_session_set_ptr(s, c);
        if ((gr = gnutls_priority_set(s, c->priority)) >= 0)
                gr = c->psk ? gnutls_credentials_set(s, GNUTLS_CRD_PSK, server ? (void *)c->psk_server
                                                                               : (void *)c->psk_client)
                            : gnutls_credentials_set(s, GNUTLS_CRD_CERTIFICATE, c->x509);
        int r = gr < 0 ? tls_error(gr, "TLS session") : 0;
        if (!c->psk && server) {
                gnutls_certificate_server_set_request(s, GNUTLS_CERT_REQUIRE);
                /* No CA names in the request: a client sends its certificate whoever signed it, so
                 * a refusal says why ("issuer is unknown") instead of "certificate required". */
                gnutls_certificate_send_x509_rdn_sequence(s, 1);
        }
        gnutls_transport_set_ptr(s, rl);
        gnutls_transport_set_pull_function(s, pull);
        gnutls_transport_set_pull_timeout_function(s, pull_timeout);
        gnutls_transport_set_vec_push_function(s, push);
        if (r >= 0)
                r = handshake(c, s, timeout_ms);
        if (r >= 0 && socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
                r = error_set_errno(-errno, "TLS link: socketpair");
        if (r < 0) {
                relay_free(rl);
                return r;
        }
        int size = PLAIN_BUFFER;
        for (int i = 0; i < 2; i++) {
                setsockopt(pair[i], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
                setsockopt(pair[i], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
        }
        gnutls_group_t group = gnutls_group_get(s);
        log_info("Secured the link with %s: TLS 1.3, %s, %s key exchange", c->describe,
                 gnutls_cipher_get_name(gnutls_cipher_get(s)), group ? gnutls_group_get_name(group) : "no");
        rl->plain = pair[1];
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        sending_add(1);
        if (pthread_create(&t, &attr, relay_out, rl) != 0) {
                sending_add(-1);
                pthread_attr_destroy(&attr);
                relay_free(rl);
                close(pair[0]);
                return error_set(-EAGAIN, "TLS link: cannot start a relay thread");
        }
        if (pthread_create(&t, &attr, relay_in, rl) != 0) {
                /* relay_out alone: it ends on the caller's end closing; this stands in for relay_in. */
                close(pair[0]);
                relay_release(rl);
                pthread_attr_destroy(&attr);
                return error_set(-EAGAIN, "TLS link: cannot start a relay thread");
        }
        pthread_attr_destroy(&attr);
        *ret_fd = pair[0];
        return 0;
}
