/* nbd_server.c — userspace NBD server (see nbd_server.h; protocol constants in nbd_protocol.h). */
#include "drafter/address.h"
#include "drafter/nbd_server.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/log.h"
#include "nbd_protocol.h"

#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_LISTENERS 8
#define DEFAULT_THREADS 4
#define DEFAULT_MAX_REQUEST (32u << 20)

struct nbd_connection {
        struct nbd_server *srv;
        int fd;
        bool finished; /* fd closed; guarded by srv->lock */
        bool joinable; /* started by the accept thread: stop() joins it */
        pthread_t thread;
        pthread_mutex_t read_lock;  /* one worker reads a request at a time */
        pthread_mutex_t write_lock; /* one reply on the wire at a time */
        bool dead;                  /* stop reading; set under read_lock or atomically */
        bool structured;
        bool no_zeroes;
        const struct nbd_export *export;
        struct nbd_connection *next;
};

struct nbd_server {
        struct nbd_export *exports;
        size_t export_count;
        unsigned threads;
        uint32_t max_request;
        int listen_fds[MAX_LISTENERS];
        size_t listen_count;
        int tcp_port;
        char *unix_path;
        int stop_pipe[2];
        pthread_t accept_thread;
        bool accepting;
        pthread_mutex_t lock;
        struct nbd_connection *connections;
        struct nbd_server_stats stats; /* updated atomically */
};

#define STAT_INC(srv, field) __atomic_fetch_add(&(srv)->stats.field, 1, __ATOMIC_RELAXED)

/* ---- socket I/O ---- */

static int write_full(int fd, const void *buf, size_t len) {
        struct iovec iov = {(void *)buf, len};
        return io_write_iov(fd, &iov, 1);
}

/* Read and throw away `len` bytes (an option we will not act on). */
static int discard_bytes(int fd, uint64_t len) {
        char buf[4096];
        while (len > 0) {
                size_t n = (size_t)MIN(len, (uint64_t)sizeof(buf));
                int r = io_read_full(fd, buf, n);
                if (r < 0)
                        return r;
                len -= n;
        }
        return 0;
}

/* ---- handshake ---- */

struct option_reply_header {
        uint64_t magic;
        uint32_t option;
        uint32_t type;
        uint32_t length;
} __attribute__((packed));

static int send_option_reply(struct nbd_connection *c, uint32_t option, uint32_t type, const void *data,
                             uint32_t len) {
        struct option_reply_header h = {htobe64(NBD_OPTION_REPLY_MAGIC), htobe32(option), htobe32(type),
                                        htobe32(len)};
        struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)data, len}};
        return io_write_iov(c->fd, iov, len ? 2 : 1);
}

static int send_option_error(struct nbd_connection *c, uint32_t option, uint32_t type, const char *message) {
        log_debug("nbd: option %u refused: %s", option, message);
        return send_option_reply(c, option, type, message, (uint32_t)strlen(message));
}

static const struct nbd_export *find_export(struct nbd_server *srv, const char *name) {
        if (name[0] == '\0')
                return srv->export_count ? &srv->exports[0] : NULL;
        for (size_t i = 0; i < srv->export_count; i++)
                if (strcmp(srv->exports[i].name, name) == 0)
                        return &srv->exports[i];
        return NULL;
}

static uint16_t transmission_flags(const struct nbd_connection *c, const struct nbd_export *e) {
        uint16_t flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |
                         NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_CAN_MULTI_CONN | NBD_FLAG_SEND_CACHE;
        if (c->structured)
                flags |= NBD_FLAG_SEND_DF;
        if (e->read_only)
                flags |= NBD_FLAG_READ_ONLY;
        return flags;
}

static int send_info_export(struct nbd_connection *c, uint32_t option, const struct nbd_export *e) {
        struct {
                uint16_t type;
                uint64_t size;
                uint16_t flags;
        } __attribute__((packed)) info = {htobe16(NBD_INFO_EXPORT), htobe64(e->dev->size),
                                          htobe16(transmission_flags(c, e))};
        return send_option_reply(c, option, NBD_REP_INFO, &info, sizeof(info));
}

/* NBD_OPT_INFO / NBD_OPT_GO. Returns 1 when GO succeeded (transmission starts). */
static int option_info_go(struct nbd_connection *c, uint32_t option, const unsigned char *data, uint32_t len) {
        struct nbd_server *srv = c->srv;
        uint32_t name_len;
        uint16_t count;
        if (len < 6)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "request too short");
        memcpy(&name_len, data, 4);
        name_len = be32toh(name_len);
        if (name_len > NBD_MAX_STRING || (uint64_t)name_len + 6 > len)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "export name length out of range");
        memcpy(&count, data + 4 + name_len, 2);
        count = be16toh(count);
        if ((uint64_t)4 + name_len + 2 + 2ULL * count != len)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "request length does not match");
        char name[NBD_MAX_STRING + 1];
        memcpy(name, data + 4, name_len);
        name[name_len] = '\0';
        if (memchr(name, '\0', name_len))
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "export name contains NUL");

        const struct nbd_export *e = find_export(srv, name);
        if (!e) {
                char msg[NBD_MAX_STRING + 64];
                snprintf(msg, sizeof(msg), "no export named \"%s\"", name);
                return send_option_error(c, option, NBD_REP_ERR_UNKNOWN, msg);
        }

        int r;
        for (uint16_t i = 0; i < count; i++) {
                uint16_t type;
                memcpy(&type, data + 4 + name_len + 2 + 2 * i, 2);
                type = be16toh(type);
                if (type == NBD_INFO_NAME) {
                        unsigned char buf[2 + NBD_MAX_STRING];
                        size_t n = strlen(e->name);
                        uint16_t t = htobe16(NBD_INFO_NAME);
                        memcpy(buf, &t, 2);
                        memcpy(buf + 2, e->name, n);
                        r = send_option_reply(c, option, NBD_REP_INFO, buf, (uint32_t)(2 + n));
                } else if (type == NBD_INFO_DESCRIPTION && e->description) {
                        unsigned char buf[2 + NBD_MAX_STRING];
                        size_t n = MIN(strlen(e->description), (size_t)NBD_MAX_STRING);
                        uint16_t t = htobe16(NBD_INFO_DESCRIPTION);
                        memcpy(buf, &t, 2);
                        memcpy(buf + 2, e->description, n);
                        r = send_option_reply(c, option, NBD_REP_INFO, buf, (uint32_t)(2 + n));
                } else if (type == NBD_INFO_BLOCK_SIZE) {
                        struct {
                                uint16_t type;
                                uint32_t minimum, preferred, maximum;
                        } __attribute__((packed)) bs = {htobe16(NBD_INFO_BLOCK_SIZE), htobe32(1),
                                                        htobe32(MAX(4096u, MIN(e->dev->block_size, 1u << 20))),
                                                        htobe32(srv->max_request)};
                        r = send_option_reply(c, option, NBD_REP_INFO, &bs, sizeof(bs));
                } else {
                        r = 0; /* unknown info requests are ignored, as the spec allows */
                }
                if (r < 0)
                        return r;
        }
        if ((r = send_info_export(c, option, e)) < 0 || (r = send_option_reply(c, option, NBD_REP_ACK, NULL, 0)) < 0)
                return r;
        if (option == NBD_OPT_GO) {
                c->export = e;
                return 1;
        }
        return 0;
}

static int option_list(struct nbd_connection *c, uint32_t len) {
        if (len != 0)
                return send_option_error(c, NBD_OPT_LIST, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
        for (size_t i = 0; i < c->srv->export_count; i++) {
                const struct nbd_export *e = &c->srv->exports[i];
                unsigned char buf[4 + 2 * NBD_MAX_STRING];
                size_t n = strlen(e->name), d = e->description ? MIN(strlen(e->description), (size_t)NBD_MAX_STRING) : 0;
                uint32_t be = htobe32((uint32_t)n);
                memcpy(buf, &be, 4);
                memcpy(buf + 4, e->name, n);
                if (d)
                        memcpy(buf + 4 + n, e->description, d);
                int r = send_option_reply(c, NBD_OPT_LIST, NBD_REP_SERVER, buf, (uint32_t)(4 + n + d));
                if (r < 0)
                        return r;
        }
        return send_option_reply(c, NBD_OPT_LIST, NBD_REP_ACK, NULL, 0);
}

/* Meta contexts: we offer none (no block status yet), but answer well-formed queries. */
static int option_meta_context(struct nbd_connection *c, uint32_t option, const unsigned char *data, uint32_t len) {
        if (!c->structured)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "structured replies not negotiated");
        if (len < 8)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "request too short");
        uint32_t name_len;
        memcpy(&name_len, data, 4);
        name_len = be32toh(name_len);
        if ((uint64_t)name_len + 8 > len)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "export name length out of range");
        char name[NBD_MAX_STRING + 1];
        if (name_len > NBD_MAX_STRING)
                return send_option_error(c, option, NBD_REP_ERR_INVALID, "export name too long");
        memcpy(name, data + 4, name_len);
        name[name_len] = '\0';
        if (!find_export(c->srv, name))
                return send_option_error(c, option, NBD_REP_ERR_UNKNOWN, "no such export");
        return send_option_reply(c, option, NBD_REP_ACK, NULL, 0);
}

/* Returns 1 when transmission starts, 0 after a clean abort, <0 on error. */
static int handshake(struct nbd_connection *c) {
        struct {
                uint64_t magic, ihaveopt;
                uint16_t flags;
        } __attribute__((packed)) greeting = {htobe64(NBD_MAGIC), htobe64(NBD_IHAVEOPT),
                                              htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)};
        int r = write_full(c->fd, &greeting, sizeof(greeting));
        if (r < 0)
                return r;
        uint32_t client_flags;
        if ((r = io_read_full(c->fd, &client_flags, 4)) < 0)
                return r;
        client_flags = be32toh(client_flags);
        if (client_flags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
                return error_set(-EPROTO, "nbd: client sent unknown flags 0x%x", client_flags);
        c->no_zeroes = client_flags & NBD_FLAG_C_NO_ZEROES;

        _cleanup_free_ unsigned char *data = malloc(NBD_MAX_OPTION_LENGTH);
        if (!data)
                return -ENOMEM;
        for (;;) {
                struct {
                        uint64_t magic;
                        uint32_t option, length;
                } __attribute__((packed)) h;
                if ((r = io_read_full(c->fd, &h, sizeof(h))) < 0)
                        return r;
                if (be64toh(h.magic) != NBD_IHAVEOPT)
                        return error_set(-EPROTO, "nbd: bad option magic");
                uint32_t option = be32toh(h.option), len = be32toh(h.length);
                if (len > NBD_MAX_OPTION_LENGTH) {
                        if (len > (1u << 20))
                                return error_set(-EPROTO, "nbd: option %u of %u bytes is too large", option, len);
                        if ((r = discard_bytes(c->fd, len)) < 0 ||
                            (r = send_option_error(c, option, NBD_REP_ERR_TOO_BIG, "option too large")) < 0)
                                return r;
                        continue;
                }
                if ((r = io_read_full(c->fd, data, len)) < 0)
                        return r;

                switch (option) {
                case NBD_OPT_EXPORT_NAME: {
                        char name[NBD_MAX_STRING + 1];
                        if (len > NBD_MAX_STRING)
                                return error_set(-EPROTO, "nbd: export name too long");
                        memcpy(name, data, len);
                        name[len] = '\0';
                        const struct nbd_export *e = find_export(c->srv, name);
                        if (!e) /* this option has no error reply: the connection ends */
                                return error_set(-ENOENT, "nbd: client asked for unknown export \"%s\"", name);
                        struct {
                                uint64_t size;
                                uint16_t flags;
                                char zeroes[124];
                        } __attribute__((packed)) reply = {htobe64(e->dev->size), htobe16(transmission_flags(c, e)),
                                                           {0}};
                        if ((r = write_full(c->fd, &reply, c->no_zeroes ? 10 : sizeof(reply))) < 0)
                                return r;
                        c->export = e;
                        return 1;
                }
                case NBD_OPT_ABORT:
                        send_option_reply(c, option, NBD_REP_ACK, NULL, 0);
                        return 0;
                case NBD_OPT_LIST:
                        r = option_list(c, len);
                        break;
                case NBD_OPT_INFO:
                case NBD_OPT_GO:
                        r = option_info_go(c, option, data, len);
                        if (r == 1)
                                return 1;
                        break;
                case NBD_OPT_STRUCTURED_REPLY:
                        if (len != 0) {
                                r = send_option_error(c, option, NBD_REP_ERR_INVALID, "takes no data");
                        } else {
                                c->structured = true;
                                r = send_option_reply(c, option, NBD_REP_ACK, NULL, 0);
                        }
                        break;
                case NBD_OPT_LIST_META_CONTEXT:
                case NBD_OPT_SET_META_CONTEXT:
                        r = option_meta_context(c, option, data, len);
                        break;
                case NBD_OPT_STARTTLS:
                        r = send_option_error(c, option, NBD_REP_ERR_POLICY, "TLS is not offered by this server");
                        break;
                default:
                        r = send_option_error(c, option, NBD_REP_ERR_UNSUP, "option not supported");
                        break;
                }
                if (r < 0)
                        return r;
        }
}

/* ---- transmission ---- */

struct request {
        uint16_t flags, type;
        uint64_t cookie, offset;
        uint32_t length;
};

static uint32_t nbd_errno(int err) {
        switch (-err) {
        case EPERM:
        case EROFS:
                return NBD_EPERM;
        case ENOMEM:
                return NBD_ENOMEM;
        case EINVAL:
        case ERANGE:
                return NBD_EINVAL;
        case ENOSPC:
        case EDQUOT:
        case EFBIG:
                return NBD_ENOSPC;
        case EOVERFLOW:
                return NBD_EOVERFLOW;
        case EOPNOTSUPP: /* ENOTSUP is reserved for FAST_ZERO, which we do not offer */
                return NBD_EINVAL;
        case ESHUTDOWN:
                return NBD_ESHUTDOWN;
        default:
                return NBD_EIO;
        }
}

struct chunk_header {
        uint32_t magic;
        uint16_t flags, type;
        uint64_t cookie;
        uint32_t length;
} __attribute__((packed));

struct simple_reply {
        uint32_t magic, error;
        uint64_t cookie;
} __attribute__((packed));

static void mark_dead(struct nbd_connection *c) {
        __atomic_store_n(&c->dead, true, __ATOMIC_RELEASE);
        shutdown(c->fd, SHUT_RDWR);
}

static void send_locked(struct nbd_connection *c, struct iovec *iov, int count) {
        pthread_mutex_lock(&c->write_lock);
        int r = io_write_iov(c->fd, iov, count);
        pthread_mutex_unlock(&c->write_lock);
        if (r < 0)
                mark_dead(c);
}

static void reply_error(struct nbd_connection *c, const struct request *req, uint32_t error, const char *message) {
        STAT_INC(c->srv, errors_replied);
        log_debug("nbd: request type %u at %llu+%u: error %u: %s", req->type, (unsigned long long)req->offset,
                  req->length, error, message);
        if (!c->structured) {
                struct simple_reply h = {htobe32(NBD_SIMPLE_REPLY_MAGIC), htobe32(error), req->cookie};
                struct iovec iov = {&h, sizeof(h)};
                send_locked(c, &iov, 1);
                return;
        }
        /* Structured replies carry the message too. */
        size_t mlen = MIN(strlen(message), (size_t)NBD_MAX_STRING);
        struct chunk_header h = {htobe32(NBD_STRUCTURED_REPLY_MAGIC), htobe16(NBD_REPLY_FLAG_DONE),
                                 htobe16(NBD_REPLY_TYPE_ERROR), req->cookie, htobe32((uint32_t)(6 + mlen))};
        struct {
                uint32_t error;
                uint16_t length;
        } __attribute__((packed)) body = {htobe32(error), htobe16((uint16_t)mlen)};
        struct iovec iov[3] = {{&h, sizeof(h)}, {&body, sizeof(body)}, {(void *)message, mlen}};
        send_locked(c, iov, 3);
}

static void reply_ok(struct nbd_connection *c, const struct request *req) {
        if (c->structured) {
                struct chunk_header h = {htobe32(NBD_STRUCTURED_REPLY_MAGIC), htobe16(NBD_REPLY_FLAG_DONE),
                                         htobe16(NBD_REPLY_TYPE_NONE), req->cookie, 0};
                struct iovec iov = {&h, sizeof(h)};
                send_locked(c, &iov, 1);
        } else {
                struct simple_reply h = {htobe32(NBD_SIMPLE_REPLY_MAGIC), 0, req->cookie};
                struct iovec iov = {&h, sizeof(h)};
                send_locked(c, &iov, 1);
        }
}

static void reply_read(struct nbd_connection *c, const struct request *req, const void *data) {
        if (!c->structured) {
                struct simple_reply h = {htobe32(NBD_SIMPLE_REPLY_MAGIC), 0, req->cookie};
                struct iovec iov[2] = {{&h, sizeof(h)}, {(void *)data, req->length}};
                send_locked(c, iov, 2);
                return;
        }
        uint64_t offset = htobe64(req->offset);
        if (buffer_is_zero(data, req->length)) {
                /* All zeros: a hole chunk lets the client skip the copy. */
                struct chunk_header h = {htobe32(NBD_STRUCTURED_REPLY_MAGIC), htobe16(NBD_REPLY_FLAG_DONE),
                                         htobe16(NBD_REPLY_TYPE_OFFSET_HOLE), req->cookie, htobe32(12)};
                uint32_t size = htobe32(req->length);
                struct iovec iov[3] = {{&h, sizeof(h)}, {&offset, 8}, {&size, 4}};
                send_locked(c, iov, 3);
                return;
        }
        struct chunk_header h = {htobe32(NBD_STRUCTURED_REPLY_MAGIC), htobe16(NBD_REPLY_FLAG_DONE),
                                 htobe16(NBD_REPLY_TYPE_OFFSET_DATA), req->cookie, htobe32(8 + req->length)};
        struct iovec iov[3] = {{&h, sizeof(h)}, {&offset, 8}, {(void *)data, req->length}};
        send_locked(c, iov, 3);
}

static bool in_range(const struct block_device *dev, const struct request *req) {
        return req->offset <= dev->size && req->length <= dev->size - req->offset;
}

static int write_zeroes(struct block_device *dev, uint64_t off, uint32_t len, bool no_hole) {
        if (!no_hole)
                return block_device_discard(dev, len, off);
        size_t chunk = MIN((size_t)len, (size_t)1 << 20);
        _cleanup_free_ void *zeros = calloc(1, chunk ? chunk : 1);
        if (!zeros)
                return -ENOMEM;
        while (len > 0) {
                size_t n = MIN((size_t)len, chunk);
                int r = block_device_write_at(dev, zeros, n, off);
                if (r < 0)
                        return r;
                off += n;
                len -= (uint32_t)n;
        }
        return 0;
}

/* Per worker: buffers reused across requests (a fresh large malloc is a fresh mmap, and
 * faulting its pages in costs more than the copy itself). */
struct worker_buffers {
        void *payload, *read;
        size_t payload_cap, read_cap;
};

static void *buffer_reserve(void **buf, size_t *cap, size_t len) {
        if (len > *cap) {
                void *grown = realloc(*buf, len);
                if (!grown)
                        return NULL;
                *buf = grown;
                *cap = len;
        }
        return *buf;
}

static void handle_request(struct nbd_connection *c, const struct request *req, struct worker_buffers *wb) {
        void *payload = wb->payload;
        const struct nbd_export *e = c->export;
        struct block_device *dev = e->dev;
        char msg[256];
        uint16_t allowed = 0;
        int r = 0;

        /* FUA is valid on every command once advertised (a no-op where nothing is written). */
        switch (req->type) {
        case NBD_CMD_READ:
                allowed = NBD_CMD_FLAG_FUA | (c->structured ? NBD_CMD_FLAG_DF : 0);
                break;
        case NBD_CMD_WRITE:
        case NBD_CMD_TRIM:
        case NBD_CMD_FLUSH:
        case NBD_CMD_CACHE:
                allowed = NBD_CMD_FLAG_FUA;
                break;
        case NBD_CMD_WRITE_ZEROES:
                allowed = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE;
                break;
        default:
                snprintf(msg, sizeof(msg), "unknown command %u", req->type);
                return reply_error(c, req, NBD_EINVAL, msg);
        }
        if (req->flags & ~allowed) {
                snprintf(msg, sizeof(msg), "flags 0x%x are not valid for command %u", req->flags, req->type);
                return reply_error(c, req, NBD_EINVAL, msg);
        }
        if (req->type != NBD_CMD_FLUSH && !in_range(dev, req)) {
                snprintf(msg, sizeof(msg), "%s: range %llu+%u is beyond the export size %llu", e->name,
                         (unsigned long long)req->offset, req->length, (unsigned long long)dev->size);
                /* The spec asks for ENOSPC when a write would run past the end, EINVAL otherwise. */
                bool writes = req->type == NBD_CMD_WRITE || req->type == NBD_CMD_WRITE_ZEROES;
                return reply_error(c, req, writes ? NBD_ENOSPC : NBD_EINVAL, msg);
        }
        if (e->read_only && (req->type == NBD_CMD_WRITE || req->type == NBD_CMD_TRIM ||
                             req->type == NBD_CMD_WRITE_ZEROES))
                return reply_error(c, req, NBD_EPERM, "the export is read-only");
        if (req->length > c->srv->max_request && (req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE)) {
                snprintf(msg, sizeof(msg), "request of %u bytes is larger than the maximum %u", req->length,
                         c->srv->max_request);
                return reply_error(c, req, NBD_EINVAL, msg);
        }

        switch (req->type) {
        case NBD_CMD_READ: {
                void *buf = buffer_reserve(&wb->read, &wb->read_cap, req->length ? req->length : 1);
                if (!buf)
                        return reply_error(c, req, NBD_ENOMEM, "out of memory");
                r = block_device_read_at(dev, buf, req->length, req->offset);
                if (r < 0)
                        return reply_error(c, req, nbd_errno(r), error_message());
                return reply_read(c, req, buf);
        }
        case NBD_CMD_WRITE:
                r = block_device_write_at(dev, payload, req->length, req->offset);
                break;
        case NBD_CMD_TRIM:
                r = block_device_discard(dev, req->length, req->offset);
                break;
        case NBD_CMD_WRITE_ZEROES:
                r = write_zeroes(dev, req->offset, req->length, req->flags & NBD_CMD_FLAG_NO_HOLE);
                break;
        case NBD_CMD_FLUSH:
                r = block_device_flush(dev);
                break;
        case NBD_CMD_CACHE:
                break; /* a hint; reads are served from the device as they come */
        }
        if (r >= 0 && (req->flags & NBD_CMD_FLAG_FUA) && req->type != NBD_CMD_CACHE && req->type != NBD_CMD_FLUSH)
                r = block_device_flush(dev);
        if (r < 0)
                return reply_error(c, req, nbd_errno(r), error_message());
        reply_ok(c, req);
}

/* Take turns with the other workers: read one request (and a write's payload), then serve it. */
static void *transmission_worker(void *arg) {
        struct nbd_connection *c = arg;
        struct worker_buffers wb = {0};

        for (;;) {
                pthread_mutex_lock(&c->read_lock);
                if (__atomic_load_n(&c->dead, __ATOMIC_ACQUIRE)) {
                        pthread_mutex_unlock(&c->read_lock);
                        break;
                }
                unsigned char raw[NBD_REQUEST_SIZE];
                int r = io_read_full(c->fd, raw, sizeof(raw));
                if (r < 0) {
                        mark_dead(c);
                        pthread_mutex_unlock(&c->read_lock);
                        break;
                }
                uint32_t magic;
                struct request req;
                memcpy(&magic, raw, 4);
                memcpy(&req.flags, raw + 4, 2);
                memcpy(&req.type, raw + 6, 2);
                memcpy(&req.cookie, raw + 8, 8); /* echoed back as is */
                memcpy(&req.offset, raw + 16, 8);
                memcpy(&req.length, raw + 24, 4);
                req.flags = be16toh(req.flags);
                req.type = be16toh(req.type);
                req.offset = be64toh(req.offset);
                req.length = be32toh(req.length);
                if (be32toh(magic) != NBD_REQUEST_MAGIC) {
                        log_debug("nbd: bad request magic 0x%08x: closing the connection", be32toh(magic));
                        STAT_INC(c->srv, protocol_closes);
                        mark_dead(c);
                        pthread_mutex_unlock(&c->read_lock);
                        break;
                }
                if (req.type == NBD_CMD_WRITE) {
                        if (req.length > c->srv->max_request) {
                                /* We cannot skip a payload that large safely: end the connection. */
                                log_debug("nbd: write of %u bytes exceeds the maximum: closing", req.length);
                                STAT_INC(c->srv, protocol_closes);
                                mark_dead(c);
                                pthread_mutex_unlock(&c->read_lock);
                                break;
                        }
                        if (!buffer_reserve(&wb.payload, &wb.payload_cap, req.length ? req.length : 1)) {
                                mark_dead(c);
                                pthread_mutex_unlock(&c->read_lock);
                                break;
                        }
                        if (io_read_full(c->fd, wb.payload, req.length) < 0) {
                                mark_dead(c);
                                pthread_mutex_unlock(&c->read_lock);
                                break;
                        }
                }
                if (req.type == NBD_CMD_DISC) {
                        /* No reply; the others finish what they have, then the connection ends. */
                        __atomic_store_n(&c->dead, true, __ATOMIC_RELEASE);
                        shutdown(c->fd, SHUT_RD);
                        pthread_mutex_unlock(&c->read_lock);
                        break;
                }
                pthread_mutex_unlock(&c->read_lock);
                STAT_INC(c->srv, requests);
                handle_request(c, &req, &wb);
        }
        free(wb.payload);
        free(wb.read);
        return NULL;
}

static void connection_finish(struct nbd_connection *c) {
        pthread_mutex_lock(&c->srv->lock);
        close(c->fd);
        c->finished = true;
        pthread_mutex_unlock(&c->srv->lock);
}

static int connection_run(struct nbd_connection *c) {
        STAT_INC(c->srv, connections);
        /* A connection handed over with its export chosen (the kernel client) skips the handshake. */
        int r = c->export ? 1 : handshake(c);
        if (r <= 0) {
                if (r < 0) {
                        STAT_INC(c->srv, protocol_closes);
                        log_debug("%s", error_message());
                }
                return r;
        }
        unsigned extra = c->srv->threads - 1;
        pthread_t threads[16];
        unsigned started = 0;
        for (; started < extra && started < ELEMENTSOF(threads); started++)
                if (pthread_create(&threads[started], NULL, transmission_worker, c) != 0)
                        break;
        transmission_worker(c);
        for (unsigned i = 0; i < started; i++)
                pthread_join(threads[i], NULL);
        return 0;
}

static void connection_free(struct nbd_connection *c) {
        pthread_mutex_destroy(&c->read_lock);
        pthread_mutex_destroy(&c->write_lock);
        free(c);
}

static struct nbd_connection *connection_new(struct nbd_server *srv, int fd) {
        struct nbd_connection *c = calloc(1, sizeof(*c));
        if (!c)
                return NULL;
        c->srv = srv;
        c->fd = fd;
        pthread_mutex_init(&c->read_lock, NULL);
        pthread_mutex_init(&c->write_lock, NULL);
        return c;
}

static void connection_link(struct nbd_server *srv, struct nbd_connection *c) {
        pthread_mutex_lock(&srv->lock);
        c->next = srv->connections;
        srv->connections = c;
        pthread_mutex_unlock(&srv->lock);
}

static void connection_unlink(struct nbd_server *srv, struct nbd_connection *c) {
        pthread_mutex_lock(&srv->lock);
        for (struct nbd_connection **p = &srv->connections; *p; p = &(*p)->next)
                if (*p == c) {
                        *p = c->next;
                        break;
                }
        pthread_mutex_unlock(&srv->lock);
}

/* Serve fd in the calling thread; with `export` set, the handshake is skipped. */
static int serve_in_caller(struct nbd_server *srv, int fd, const struct nbd_export *export) {
        struct nbd_connection *c = connection_new(srv, fd);
        if (!c) {
                close(fd);
                return -ENOMEM;
        }
        c->export = export;
        connection_link(srv, c);
        int r = connection_run(c);
        connection_finish(c);
        connection_unlink(srv, c);
        connection_free(c);
        return r;
}

int nbd_server_serve_fd(struct nbd_server *srv, int fd) {
        return serve_in_caller(srv, fd, NULL);
}

int nbd_server_serve_transmission(struct nbd_server *srv, int fd, size_t export_index) {
        if (export_index >= srv->export_count) {
                close(fd);
                return error_set(-EINVAL, "nbd: no export %zu", export_index);
        }
        return serve_in_caller(srv, fd, &srv->exports[export_index]);
}

static void *connection_thread(void *arg) {
        struct nbd_connection *c = arg;
        connection_run(c);
        connection_finish(c);
        return NULL;
}

/* Join and free connections that ended (called from the accept thread and at stop). */
static void reap_connections(struct nbd_server *srv, bool all) {
        for (;;) {
                struct nbd_connection *done = NULL;
                pthread_mutex_lock(&srv->lock);
                for (struct nbd_connection **p = &srv->connections; *p; p = &(*p)->next)
                        if ((*p)->joinable && ((*p)->finished || all)) {
                                done = *p;
                                *p = done->next;
                                break;
                        }
                pthread_mutex_unlock(&srv->lock);
                if (!done)
                        return;
                pthread_join(done->thread, NULL);
                connection_free(done);
        }
}

static void *accept_thread(void *arg) {
        struct nbd_server *srv = arg;
        struct pollfd pfds[MAX_LISTENERS + 1];
        for (size_t i = 0; i < srv->listen_count; i++)
                pfds[i] = (struct pollfd){.fd = srv->listen_fds[i], .events = POLLIN};
        pfds[srv->listen_count] = (struct pollfd){.fd = srv->stop_pipe[0], .events = POLLIN};

        for (;;) {
                if (poll(pfds, srv->listen_count + 1, 1000) < 0 && errno != EINTR)
                        break;
                if (pfds[srv->listen_count].revents)
                        break;
                reap_connections(srv, false);
                for (size_t i = 0; i < srv->listen_count; i++) {
                        if (!(pfds[i].revents & POLLIN))
                                continue;
                        int fd = accept4(pfds[i].fd, NULL, NULL, SOCK_CLOEXEC);
                        if (fd < 0)
                                continue;
                        int one = 1;
                        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* fails harmlessly on unix */
                        struct nbd_connection *c = connection_new(srv, fd);
                        if (!c) {
                                close(fd);
                                continue;
                        }
                        c->joinable = true;
                        connection_link(srv, c);
                        if (pthread_create(&c->thread, NULL, connection_thread, c) != 0) {
                                connection_unlink(srv, c);
                                close(fd);
                                connection_free(c);
                        }
                }
        }
        return NULL;
}

int nbd_server_new(const struct nbd_server_config *cfg, struct nbd_server **ret_server) {
        _cleanup_free_ struct nbd_server *srv = calloc(1, sizeof(*srv));
        if (!srv)
                return -ENOMEM;
        for (size_t i = 0; i < cfg->export_count; i++) {
                if (!cfg->exports[i].name || strlen(cfg->exports[i].name) > NBD_MAX_STRING || !cfg->exports[i].dev)
                        return error_set(-EINVAL, "nbd: export %zu has no name or device", i);
                for (size_t j = 0; j < i; j++)
                        if (strcmp(cfg->exports[i].name, cfg->exports[j].name) == 0)
                                return error_set(-EINVAL, "nbd: two exports are named \"%s\"", cfg->exports[i].name);
        }
        srv->exports = calloc(cfg->export_count ? cfg->export_count : 1, sizeof(*srv->exports));
        if (!srv->exports)
                return -ENOMEM;
        memcpy(srv->exports, cfg->exports, cfg->export_count * sizeof(*srv->exports));
        srv->export_count = cfg->export_count;
        srv->threads = cfg->threads_per_connection ? MIN(cfg->threads_per_connection, 16u) : DEFAULT_THREADS;
        srv->max_request = cfg->max_request ? cfg->max_request : DEFAULT_MAX_REQUEST;
        if (pipe2(srv->stop_pipe, O_CLOEXEC) < 0) {
                free(srv->exports);
                return error_set_errno(-errno, "nbd: cannot create a pipe");
        }
        pthread_mutex_init(&srv->lock, NULL);
        *ret_server = TAKE_PTR(srv);
        return 0;
}

int nbd_server_listen_unix(struct nbd_server *srv, const char *path) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (srv->listen_count >= MAX_LISTENERS)
                return error_set(-EMFILE, "nbd: too many listeners");
        if (strlen(path) >= sizeof(sa.sun_path))
                return error_set(-ENAMETOOLONG, "nbd: socket path %s is too long", path);
        strcpy(sa.sun_path, path);

        /* A socket left by a process that died is removed; a live one is not taken over. */
        struct stat st;
        if (lstat(path, &st) == 0) {
                if (!S_ISSOCK(st.st_mode))
                        return error_set(-EEXIST, "nbd: %s exists and is not a socket", path);
                _cleanup_close_ int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (probe >= 0 && connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0)
                        return error_set(-EADDRINUSE, "nbd: another server is listening on %s", path);
                unlink(path);
        }
        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return error_set_errno(-errno, "nbd: socket");
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0)
                return error_set_errno(-errno, "nbd: cannot listen on %s", path);
        free(srv->unix_path);
        srv->unix_path = strdup(path);
        srv->listen_fds[srv->listen_count++] = TAKE_FD(fd);
        return 0;
}

int nbd_server_listen_tcp(struct nbd_server *srv, const char *host, const char *port) {
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
        struct addrinfo *res;
        int e = getaddrinfo(host && *host ? host : NULL, port, &hints, &res);
        if (e != 0)
                return error_set(-EADDRNOTAVAIL, "nbd: cannot resolve %s:%s: %s", host ? host : "", port,
                                 gai_strerror(e));
        int r = -EADDRNOTAVAIL, bound_port = 0;
        for (struct addrinfo *ai = res; ai && srv->listen_count < MAX_LISTENERS; ai = ai->ai_next) {
                /* With port 0 every address family must share the port picked by the first bind. */
                if (bound_port) {
                        if (ai->ai_family == AF_INET)
                                ((struct sockaddr_in *)ai->ai_addr)->sin_port = htons((uint16_t)bound_port);
                        else if (ai->ai_family == AF_INET6)
                                ((struct sockaddr_in6 *)ai->ai_addr)->sin6_port = htons((uint16_t)bound_port);
                }
                _cleanup_close_ int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
                if (fd < 0)
                        continue;
                int one = 1;
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
                if (ai->ai_family == AF_INET6)
                        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
                if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 64) < 0) {
                        r = error_set_errno(-errno, "nbd: cannot listen on %s:%s", host ? host : "", port);
                        continue;
                }
                struct sockaddr_storage ss = {0};
                socklen_t len = sizeof(ss);
                if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0)
                        bound_port = (int)address_port(&ss);
                srv->listen_fds[srv->listen_count++] = TAKE_FD(fd);
                r = 0;
        }
        freeaddrinfo(res);
        if (r == 0)
                srv->tcp_port = bound_port;
        return r;
}

uint64_t nbd_server_export_size(struct nbd_server *srv, size_t export_index) {
        return export_index < srv->export_count ? srv->exports[export_index].dev->size : UINT64_MAX;
}

int nbd_server_tcp_port(struct nbd_server *srv) {
        return srv->tcp_port;
}

int nbd_server_start(struct nbd_server *srv) {
        if (srv->listen_count == 0)
                return error_set(-EINVAL, "nbd: nothing to listen on");
        if (pthread_create(&srv->accept_thread, NULL, accept_thread, srv) != 0)
                return error_set(-EAGAIN, "nbd: cannot start the accept thread");
        srv->accepting = true;
        return 0;
}

void nbd_server_stop(struct nbd_server *srv) {
        if (srv->accepting) {
                char byte = 1;
                if (write(srv->stop_pipe[1], &byte, 1) < 0)
                        log_debug("nbd: cannot signal the accept thread");
                pthread_join(srv->accept_thread, NULL);
                srv->accepting = false;
        }
        for (size_t i = 0; i < srv->listen_count; i++)
                close(srv->listen_fds[i]);
        srv->listen_count = 0;
        if (srv->unix_path) {
                unlink(srv->unix_path);
                free(srv->unix_path);
                srv->unix_path = NULL;
        }
        pthread_mutex_lock(&srv->lock);
        for (struct nbd_connection *c = srv->connections; c; c = c->next)
                if (!c->finished) {
                        __atomic_store_n(&c->dead, true, __ATOMIC_RELEASE);
                        shutdown(c->fd, SHUT_RDWR);
                }
        pthread_mutex_unlock(&srv->lock);
        reap_connections(srv, true);
}

void nbd_server_free(struct nbd_server *srv) {
        if (!srv)
                return;
        nbd_server_stop(srv);
        close(srv->stop_pipe[0]);
        close(srv->stop_pipe[1]);
        pthread_mutex_destroy(&srv->lock);
        free(srv->exports);
        free(srv);
}

void nbd_server_get_stats(struct nbd_server *srv, struct nbd_server_stats *ret_stats) {
        ret_stats->connections = __atomic_load_n(&srv->stats.connections, __ATOMIC_RELAXED);
        ret_stats->requests = __atomic_load_n(&srv->stats.requests, __ATOMIC_RELAXED);
        ret_stats->errors_replied = __atomic_load_n(&srv->stats.errors_replied, __ATOMIC_RELAXED);
        ret_stats->protocol_closes = __atomic_load_n(&srv->stats.protocol_closes, __ATOMIC_RELAXED);
}
