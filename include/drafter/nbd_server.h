/* nbd_server.h — a userspace NBD server for block devices (newstyle fixed handshake, options
 * GO/INFO/LIST/EXPORT_NAME/STRUCTURED_REPLY, FLUSH, TRIM, WRITE_ZEROES, FUA, CACHE, many
 * connections), over unix sockets and TCP (IPv4 and IPv6).
 *
 * Each connection is served by a few threads that take turns reading requests (so slow requests,
 * e.g. reads waiting for post-copy blocks, do not stall the others) and share one writer lock for
 * replies. Every request is validated before it reaches a device: a malformed or out-of-range
 * request gets the protocol's error reply; a request that breaks framing (bad magic, a write too
 * large to read) closes that connection. Nothing a client sends can change bytes outside a valid
 * write. The server is thread-safe; devices must be too (all providers are). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "drafter/block_device.h"

struct nbd_export {
        const char *name; /* export name; the first export is also the default ("") */
        const char *description;
        struct block_device *dev; /* not owned */
        bool read_only;
};

struct nbd_server_config {
        const struct nbd_export *exports;
        size_t export_count;
        unsigned threads_per_connection; /* 0: 4 */
        uint32_t max_request;            /* largest read/write payload; 0: 32 MiB */
};

struct nbd_server;

int nbd_server_new(const struct nbd_server_config *cfg, struct nbd_server **ret_server);

/* Listen on a unix socket path (replaced if a stale socket is there). */
int nbd_server_listen_unix(struct nbd_server *srv, const char *path);
/* Listen on TCP; host may be NULL/"" (all addresses), a name, IPv4 or IPv6; port "0" picks one. */
int nbd_server_listen_tcp(struct nbd_server *srv, const char *host, const char *port);
/* The TCP port bound by the last nbd_server_listen_tcp(). */
int nbd_server_tcp_port(struct nbd_server *srv);

/* Accept connections in a background thread until nbd_server_stop(). */
int nbd_server_start(struct nbd_server *srv);

/* Serve one already-connected socket in the calling thread until the client leaves or the
 * connection breaks; takes ownership of fd. Returns 0 after a clean disconnect. */
int nbd_server_serve_fd(struct nbd_server *srv, int fd);

/* Serve a socket that is already in the transmission phase for export `export_index`, with simple
 * replies (how the kernel's NBD client talks after userspace did the handshake). Takes fd. */
int nbd_server_serve_transmission(struct nbd_server *srv, int fd, size_t export_index);

/* Stop listening, close every connection, wait for their threads. */
void nbd_server_stop(struct nbd_server *srv);
void nbd_server_free(struct nbd_server *srv);

/* Size of export `export_index`, or UINT64_MAX if there is none. */
uint64_t nbd_server_export_size(struct nbd_server *srv, size_t export_index);

/* Counters for tests and progress output. */
struct nbd_server_stats {
        uint64_t connections;
        uint64_t requests;
        uint64_t errors_replied;   /* requests answered with an error */
        uint64_t protocol_closes;  /* connections closed for breaking the protocol */
};
void nbd_server_get_stats(struct nbd_server *srv, struct nbd_server_stats *ret_stats);
