/* tls.h — authenticated, encrypted migration links: TLS 1.3 (GnuTLS) with a pre-shared key or
 * with certificates, mutual in both modes (docs/design.md "Secured links").
 *
 * A PSK link proves that both ends hold the key; a certificate link that both ends hold a
 * certificate signed by the configured CA (the CA is the trust boundary: no host names are
 * checked, and the system's CAs are never used). Anything else — a plain TCP client, a wrong key,
 * a certificate from another CA — fails the handshake, before a single migration frame is read
 * or written.
 *
 * tls_wrap() runs the handshake on a connected socket and hands back a descriptor carrying the
 * plaintext (one end of a socketpair; two relay threads encrypt and decrypt between it and the
 * socket), so the migration code reads and writes descriptors whether the link is secured or
 * not. Shutting down that descriptor's writing side sends close_notify once everything written
 * is sent; closing it also stops the receiving relay, and the socket is closed when both relays
 * are done. The peer closing, or a record failing its integrity check, ends the descriptor's
 * stream. */
#pragma once

#include "drafter/flags.h"

#include <stdbool.h>

struct tls_options {
        const char *psk_file;                      /* "identity:hexkey" (psktool's format) or bare hex */
        const char *cert_file, *key_file, *ca_file; /* PEM */
};

/* The tools' flags, in one place so every tool spells them alike. */
#define TLS_FLAGS(o)                                                                                              \
        {"psk-file", FLAG_STRING, &(o).psk_file,                                                                  \
         "File with the pre-shared key that authenticates and encrypts migration links (TLS 1.3; hex, or "        \
         "identity:hex as psktool writes it)"},                                                                   \
        {"tls-ca", FLAG_STRING, &(o).ca_file, "CA certificate (PEM) that signs the peers' certificates"},          \
        {"tls-cert", FLAG_STRING, &(o).cert_file, "This side's certificate (PEM) for TLS 1.3 migration links"},    \
        {"tls-key", FLAG_STRING, &(o).key_file, "Private key (PEM) of --tls-cert"}

struct tls_context;

/* Load the credentials the options name. *ret is NULL when none is named (plain TCP). Errors
 * name the file and the cause: unreadable, malformed, a key shorter than 128 bits, a certificate
 * without its key or CA, both a PSK and certificates. */
int tls_context_new(const struct tls_options *o, struct tls_context **ret);
void tls_context_free(struct tls_context *c);
/* For a tool that is about to exit: tls_drain() (5 s, a warning if links still had data to
 * send), then tls_context_free(). NULL: nothing. */
void tls_context_finish(struct tls_context *c);

/* For a tool: tls_context_new(), and when links are used (`links`) without TLS, a warning
 * that anyone who reaches them can take or feed the VM. Logs the error itself. */
int tls_context_from_flags(const struct tls_options *o, bool links, struct tls_context **ret);

/* What a context authenticates with, for log lines ("PSK identity drafter", "certificates"). */
const char *tls_context_describe(const struct tls_context *c);

/* Handshake on the connected socket `fd` (taken over, closed on failure) as TLS server (the side
 * that accepted) or client, within timeout_ms; then *ret_fd carries the plaintext. With c NULL,
 * *ret_fd = fd. */
int tls_wrap(struct tls_context *c, int fd, bool server, int timeout_ms, int *ret_fd);

/* Wait, at most timeout_ms, until every link whose plaintext end was closed has sent what was
 * written to it (and its close_notify). Call before the process exits, after closing the
 * descriptors: the relays are threads, and exiting would drop what they still hold (a final
 * ERROR or acknowledgement). True if all were sent. */
bool tls_drain(int timeout_ms);
