/* NBD server against hostile clients: more than 10,000 seeded requests over fresh connections —
 * valid reads and writes checked against a reference buffer, and malformed ones (out of range,
 * unknown commands and flags, bad magic, truncated headers and payloads, oversized writes, garbage
 * handshakes). The server must never crash (this runs under ASan too), must answer errors where
 * the protocol has an error reply, and the device must end up holding exactly the valid writes. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/nbd_server.h"
#include "../../../lib/expose/nbd/nbd_protocol.h"

#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define DEV_SIZE (1u << 20)
#define MAX_REQUEST (256u << 10)

struct serve_args {
        struct nbd_server *srv;
        int fd;
};

static void *serve(void *arg) {
        struct serve_args *a = arg;
        nbd_server_serve_fd(a->srv, a->fd);
        free(a);
        return NULL;
}

struct client {
        int fd;
        pthread_t thread;
        bool structured;
};

static int send_all(int fd, const void *buf, size_t len) {
        struct iovec iov = {(void *)buf, len};
        return io_write_iov(fd, &iov, 1) < 0 ? -1 : 0;
}

static int recv_all(int fd, void *buf, size_t len) {
        return io_read_full(fd, buf, len) < 0 ? -1 : 0;
}

static void client_open(struct client *c, struct nbd_server *srv) {
        int sv[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        struct serve_args *a = malloc(sizeof(*a));
        a->srv = srv;
        a->fd = sv[1];
        assert_int_equal(pthread_create(&c->thread, NULL, serve, a), 0);
        c->fd = sv[0];
}

static void client_close(struct client *c) {
        close(c->fd);
        pthread_join(c->thread, NULL);
}

static void send_option(struct client *c, uint32_t option, const void *data, uint32_t len) {
        struct {
                uint64_t magic;
                uint32_t option, length;
        } __attribute__((packed)) h = {htobe64(NBD_IHAVEOPT), htobe32(option), htobe32(len)};
        assert_int_equal(send_all(c->fd, &h, sizeof(h)), 0);
        if (len)
                assert_int_equal(send_all(c->fd, data, len), 0);
}

/* Read one option reply; returns its type, discarding the payload. */
static uint32_t read_option_reply(struct client *c, uint32_t option) {
        struct {
                uint64_t magic;
                uint32_t option, type, length;
        } __attribute__((packed)) h;
        assert_int_equal(recv_all(c->fd, &h, sizeof(h)), 0);
        assert_int_equal(be64toh(h.magic), NBD_OPTION_REPLY_MAGIC);
        assert_int_equal(be32toh(h.option), option);
        uint32_t len = be32toh(h.length);
        char buf[8192];
        assert_true(len <= sizeof(buf));
        assert_int_equal(recv_all(c->fd, buf, len), 0);
        return be32toh(h.type);
}

/* A correct handshake, randomly with or without structured replies. */
static void client_handshake(struct client *c, struct test_rng *rng) {
        unsigned char greeting[18];
        assert_int_equal(recv_all(c->fd, greeting, sizeof(greeting)), 0);
        uint32_t flags = htobe32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
        assert_int_equal(send_all(c->fd, &flags, 4), 0);
        c->structured = test_rng_below(rng, 2);
        if (c->structured) {
                send_option(c, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
                assert_int_equal(read_option_reply(c, NBD_OPT_STRUCTURED_REPLY), NBD_REP_ACK);
        }
        /* An unknown option and an unknown export first: both refused, the session goes on. */
        send_option(c, 999, "xyz", 3);
        assert_int_equal(read_option_reply(c, 999), NBD_REP_ERR_UNSUP);
        unsigned char go[4 + 4 + 2];
        uint32_t name_len = htobe32(4);
        memcpy(go, &name_len, 4);
        memcpy(go + 4, "nope", 4);
        memset(go + 8, 0, 2);
        send_option(c, NBD_OPT_GO, go, sizeof(go));
        assert_int_equal(read_option_reply(c, NBD_OPT_GO), NBD_REP_ERR_UNKNOWN);
        memcpy(go + 4, "disk", 4);
        send_option(c, NBD_OPT_GO, go, sizeof(go));
        uint32_t type;
        while ((type = read_option_reply(c, NBD_OPT_GO)) == NBD_REP_INFO)
                ;
        assert_int_equal(type, NBD_REP_ACK);
}

static void send_request(struct client *c, uint16_t flags, uint16_t type, uint64_t cookie, uint64_t offset,
                         uint32_t length, uint32_t magic) {
        struct {
                uint32_t magic;
                uint16_t flags, type;
                uint64_t cookie, offset;
                uint32_t length;
        } __attribute__((packed)) r = {htobe32(magic), htobe16(flags), htobe16(type), cookie, htobe64(offset),
                                        htobe32(length)};
        send_all(c->fd, &r, sizeof(r));
}

/* Read the reply to `cookie`; for reads, the data goes into buf. Returns the NBD error (0 = ok),
 * or -1 if the connection ended. */
static int read_reply(struct client *c, uint64_t cookie, void *buf, uint32_t len) {
        if (!c->structured) {
                struct {
                        uint32_t magic, error;
                        uint64_t cookie;
                } __attribute__((packed)) h;
                if (recv_all(c->fd, &h, sizeof(h)) < 0)
                        return -1;
                assert_int_equal(be32toh(h.magic), NBD_SIMPLE_REPLY_MAGIC);
                assert_true(h.cookie == cookie);
                if (h.error == 0 && buf && recv_all(c->fd, buf, len) < 0)
                        return -1;
                return (int)be32toh(h.error);
        }
        for (;;) {
                struct {
                        uint32_t magic;
                        uint16_t flags, type;
                        uint64_t cookie;
                        uint32_t length;
                } __attribute__((packed)) h;
                if (recv_all(c->fd, &h, sizeof(h)) < 0)
                        return -1;
                assert_int_equal(be32toh(h.magic), NBD_STRUCTURED_REPLY_MAGIC);
                assert_true(h.cookie == cookie);
                uint16_t type = be16toh(h.type);
                uint32_t plen = be32toh(h.length);
                unsigned char *payload = malloc(plen ? plen : 1);
                if (recv_all(c->fd, payload, plen) < 0) {
                        free(payload);
                        return -1;
                }
                int error = 0;
                if (type == NBD_REPLY_TYPE_ERROR) {
                        uint32_t e;
                        memcpy(&e, payload, 4);
                        error = (int)be32toh(e);
                        assert_true(error != 0);
                } else if (type == NBD_REPLY_TYPE_OFFSET_DATA) {
                        uint64_t off;
                        memcpy(&off, payload, 8);
                        assert_non_null(buf);
                        memcpy(buf, payload + 8, plen - 8); /* single chunk covering the request */
                        assert_int_equal(plen - 8, len);
                } else if (type == NBD_REPLY_TYPE_OFFSET_HOLE) {
                        uint32_t size;
                        memcpy(&size, payload + 8, 4);
                        assert_int_equal(be32toh(size), len);
                        memset(buf, 0, len);
                }
                free(payload);
                if (be16toh(h.flags) & NBD_REPLY_FLAG_DONE)
                        return error;
        }
}

static void test_hostile_clients(void **state) {
        uint64_t seed = test_seed("test-nbd-fuzz");
        struct test_rng rng = {seed};
        struct block_device *dev;
        assert_ok(memory_device_open("disk", DEV_SIZE, 4096, &dev));
        unsigned char *ref = calloc(1, DEV_SIZE), *buf = malloc(MAX_REQUEST + 4096), *got = malloc(MAX_REQUEST);
        struct nbd_export e = {"disk", "fuzz target", dev, false};
        struct nbd_server *srv;
        assert_ok(nbd_server_new(&(struct nbd_server_config){&e, 1, 3, MAX_REQUEST}, &srv));

        unsigned requests = 0, errors = 0, reconnects = 0, valid_writes = 0;
        struct client c;
        bool open = false;
        while (requests < 12000) {
                if (!open) {
                        client_open(&c, srv);
                        if (test_rng_below(&rng, 20) == 0) {
                                /* A garbage handshake: random bytes, then hang up. */
                                unsigned char junk[64];
                                test_rng_fill(&rng, junk, sizeof(junk));
                                recv_all(c.fd, buf, 18);
                                send_all(c.fd, junk, 1 + test_rng_below(&rng, sizeof(junk)));
                                client_close(&c);
                                requests++;
                                reconnects++;
                                continue;
                        }
                        client_handshake(&c, &rng);
                        open = true;
                        reconnects++;
                }
                uint64_t cookie = test_rng_next(&rng);
                uint64_t off = test_rng_below(&rng, DEV_SIZE);
                uint32_t len = 1 + (uint32_t)test_rng_below(&rng, 3 * 65536);
                bool fits = off + len <= DEV_SIZE;
                unsigned what = (unsigned)test_rng_below(&rng, 100);
                int r;
                requests++;
                if (what < 30) { /* write, valid or beyond the end */
                        test_rng_fill(&rng, buf, len);
                        uint16_t flags = test_rng_below(&rng, 4) == 0 ? NBD_CMD_FLAG_FUA : 0;
                        send_request(&c, flags, NBD_CMD_WRITE, cookie, off, len, NBD_REQUEST_MAGIC);
                        send_all(c.fd, buf, len);
                        r = read_reply(&c, cookie, NULL, 0);
                        assert_int_equal(r, fits ? 0 : NBD_ENOSPC);
                        if (fits) {
                                memcpy(ref + off, buf, len);
                                valid_writes++;
                        }
                } else if (what < 55) { /* read, valid or beyond the end */
                        if (!fits)
                                len = (uint32_t)MIN((uint64_t)len, (uint64_t)MAX_REQUEST);
                        send_request(&c, 0, NBD_CMD_READ, cookie, off, len, NBD_REQUEST_MAGIC);
                        r = read_reply(&c, cookie, got, len);
                        assert_int_equal(r, fits ? 0 : NBD_EINVAL);
                        if (fits && memcmp(got, ref + off, len) != 0)
                                fail_msg("request %u: read at %llu+%u differs from the valid writes", requests,
                                         (unsigned long long)off, len);
                } else if (what < 62) { /* trim / write zeroes, valid or not */
                        uint16_t type = test_rng_below(&rng, 2) ? NBD_CMD_TRIM : NBD_CMD_WRITE_ZEROES;
                        uint16_t flags = type == NBD_CMD_WRITE_ZEROES && test_rng_below(&rng, 2) ? NBD_CMD_FLAG_NO_HOLE : 0;
                        send_request(&c, flags, type, cookie, off, len, NBD_REQUEST_MAGIC);
                        r = read_reply(&c, cookie, NULL, 0);
                        assert_int_equal(r, fits ? 0 : type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL);
                        if (fits)
                                memset(ref + off, 0, len);
                } else if (what < 66) { /* flush, cache */
                        uint16_t type = test_rng_below(&rng, 2) ? NBD_CMD_FLUSH : NBD_CMD_CACHE;
                        send_request(&c, 0, type, cookie, type == NBD_CMD_FLUSH ? 0 : off,
                                     type == NBD_CMD_FLUSH ? 0 : (fits ? len : len), NBD_REQUEST_MAGIC);
                        r = read_reply(&c, cookie, NULL, 0);
                        assert_int_equal(r, type == NBD_CMD_FLUSH || fits ? 0 : NBD_EINVAL);
                } else if (what < 74) { /* unknown command or invalid flags: EINVAL, nothing changes */
                        uint16_t type = (uint16_t)(test_rng_below(&rng, 2) ? 7 + test_rng_below(&rng, 60000)
                                                                           : NBD_CMD_READ);
                        /* DF without structured replies, REQ_ONE, FAST_ZERO and undefined bits */
                        uint16_t flags = type != NBD_CMD_READ ? 0
                                         : c.structured ? (uint16_t)(1u << (3 + test_rng_below(&rng, 13)))
                                                        : (uint16_t)(1u << (2 + test_rng_below(&rng, 14)));
                        send_request(&c, flags, type, cookie, off, 16, NBD_REQUEST_MAGIC);
                        r = read_reply(&c, cookie, NULL, 0);
                        assert_int_equal(r, NBD_EINVAL);
                } else if (what < 80) { /* oversized read: refused with EINVAL */
                        send_request(&c, 0, NBD_CMD_READ, cookie, 0, MAX_REQUEST + 1 + (uint32_t)test_rng_below(&rng, 1u << 30),
                                     NBD_REQUEST_MAGIC);
                        r = read_reply(&c, cookie, NULL, 0);
                        assert_int_equal(r, NBD_EINVAL);
                } else {
                        /* Framing breakers: the server must drop the connection without acting. */
                        unsigned kind = (unsigned)test_rng_below(&rng, 4);
                        if (kind == 0) { /* bad magic */
                                send_request(&c, 0, NBD_CMD_WRITE, cookie, 0, 16, (uint32_t)test_rng_next(&rng) | 1);
                                send_all(c.fd, buf, 16);
                        } else if (kind == 1) { /* truncated header */
                                unsigned char hdr[NBD_REQUEST_SIZE];
                                test_rng_fill(&rng, hdr, sizeof(hdr));
                                uint32_t m = htobe32(NBD_REQUEST_MAGIC);
                                memcpy(hdr, &m, 4);
                                send_all(c.fd, hdr, 1 + test_rng_below(&rng, NBD_REQUEST_SIZE - 1));
                        } else if (kind == 2) { /* write whose payload never fully arrives */
                                off = test_rng_below(&rng, DEV_SIZE - 4096);
                                send_request(&c, 0, NBD_CMD_WRITE, cookie, off, 4096, NBD_REQUEST_MAGIC);
                                test_rng_fill(&rng, buf, 4096);
                                send_all(c.fd, buf, test_rng_below(&rng, 4096));
                        } else { /* a write too large to accept */
                                send_request(&c, 0, NBD_CMD_WRITE, cookie, 0, MAX_REQUEST + 4096, NBD_REQUEST_MAGIC);
                        }
                        shutdown(c.fd, SHUT_WR);
                        unsigned char sink[64];
                        while (recv(c.fd, sink, sizeof(sink), 0) > 0)
                                ;
                        client_close(&c);
                        open = false;
                        continue;
                }
                if (r != 0)
                        errors++;
                if (test_rng_below(&rng, 200) == 0) { /* a clean goodbye now and then */
                        send_request(&c, 0, NBD_CMD_DISC, cookie, 0, 0, NBD_REQUEST_MAGIC);
                        client_close(&c);
                        open = false;
                }
        }
        if (open)
                client_close(&c);

        struct nbd_server_stats st;
        nbd_server_get_stats(srv, &st);
        fprintf(stderr, "  %u requests over %u connections: %u valid writes, %u error replies, %llu connections "
                        "closed for protocol violations\n",
                requests, reconnects, valid_writes, errors, (unsigned long long)st.protocol_closes);
        assert_true(requests >= 10000);
        assert_true(st.protocol_closes > 100);
        assert_true(errors > 1000);

        /* Exactly the valid writes, nothing else. */
        unsigned char *final = malloc(DEV_SIZE);
        assert_ok(block_device_read_at(dev, final, DEV_SIZE, 0));
        assert_memory_equal(final, ref, DEV_SIZE);
        nbd_server_free(srv);
        block_device_close(dev);
        free(final);
        free(ref);
        free(buf);
        free(got);
}

int main(void) {
        signal(SIGPIPE, SIG_IGN);
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_hostile_clients),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
