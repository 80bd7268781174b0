/* drafter-registry — serve a package's devices to any number of peers at once. Each peer that
 * connects (`drafter-peer --raddr registry:port`) gets a lazy migration of the package: authority
 * at once, then every block, those it asks for first. So its VM resumes before anything has
 * arrived and fetches memory and disk blocks as the guest touches them, while the rest streams in
 * behind. The package files are read-only here and shared by every connection. */
#include "drafter/bitmap.h"
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/log.h"
#include "drafter/migrate.h"
#include "drafter/signals.h"
#include "drafter/tls.h"
#include "drafter/transport.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_PEERS 256
/* What may wait unsent in a peer's socket ahead of a NEED_AT answer: under 1 ms at 200 Mbit/s
 * (128 KiB was 5 ms; first PONG in bench-registry 5.3 s with it, 4.9 s with 16 KiB). */
#define NOTSENT_LOWAT (16 << 10)
#define TLS_RELAY_SNDBUF (128 << 10) /* the plaintext side of a TLS relay, as before */

static const char default_devices[] = DEVICE_DEFAULT_MIGRATION_DEVICES;


/* What a resuming VM reads first goes first: its config, the state QEMU loads, the kernel. */
static const char *const first[] = {"config", "state", "kernel"};

struct peer {
        struct registry *reg;
        pthread_t thread;
        int fd;
        unsigned number;
        bool done;
};

struct registry {
        struct migrate_source_device devs[MIGRATE_MAX_DEVICES];
        struct bitmap zero[MIGRATE_MAX_DEVICES];
        struct block_device *files[MIGRATE_MAX_DEVICES];
        size_t count;
        struct migrate_source_config cfg;
        struct tls_context *tls; /* NULL: plain TCP */
        pthread_mutex_t lock;
        struct peer *peers[MAX_PEERS];
        unsigned served, failed, next_number;
        uint64_t last_need_ns; /* cfg.demand_group */
};

static void *serve_peer(void *arg) {
        struct peer *p = arg;
        struct registry *reg = p->reg;
        struct migrate_stats st;
        uint64_t t0 = clock_now_ns();
        int fd = p->fd, r = 0;
        if (reg->tls) {
                /* The relay owns a duplicate; p->fd stays ours to shut down and close. */
                int copy = dup(p->fd);
                r = copy < 0 ? error_set_errno(-errno, "dup") : tls_wrap(reg->tls, copy, true, 10000, &fd);
                /* As TCP_NOTSENT_LOWAT on the socket: little may wait ahead of a NEED_AT answer. */
                int size = TLS_RELAY_SNDBUF;
                if (r >= 0)
                        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        }
        memset(&st, 0, sizeof(st));
        if (r >= 0)
                r = migrate_source_run(fd, &reg->cfg, &st);
        if (fd != p->fd)
                close(fd);
        pthread_mutex_lock(&reg->lock);
        if (r < 0) {
                reg->failed++;
                log_error("peer %u: %s", p->number, error_message());
        } else {
                reg->served++;
                log_info("peer %u: sent the whole package in %.0f ms: %" PRIu64 " blocks (%" PRIu64 " zero), %.1f MB, "
                         "%" PRIu64 " asked for first",
                         p->number, (double)(clock_now_ns() - t0) / 1e6, st.blocks_sent, st.zero_blocks,
                         (double)st.bytes_sent / 1e6, st.need_at_served);
        }
        p->done = true;
        pthread_mutex_unlock(&reg->lock);
        return NULL;
}

/* Join the threads of peers that are done (all of them, with `all`, after shutting their links). */
static void reap(struct registry *reg, bool all) {
        for (size_t i = 0; i < MAX_PEERS; i++) {
                pthread_mutex_lock(&reg->lock);
                struct peer *p = reg->peers[i];
                bool done = p && p->done;
                if (p && all && !done)
                        shutdown(p->fd, SHUT_RDWR);
                pthread_mutex_unlock(&reg->lock);
                if (!p || (!done && !all))
                        continue;
                pthread_join(p->thread, NULL);
                close(p->fd);
                free(p);
                reg->peers[i] = NULL;
        }
}

static int accept_peer(struct registry *reg, int lfd) {
        int fd, r;
        if ((r = transport_accept(lfd, 0, &fd)) < 0)
                return r;
        /* Blocks asked for must not wait behind megabytes of queued background blocks: keep
         * what sits unsent in the socket small, so a NEED_AT answer is next on the wire. */
        int lowat = NOTSENT_LOWAT;
        if (setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof(lowat)) < 0 && errno != EOPNOTSUPP)
                log_debug("TCP_NOTSENT_LOWAT: %m");
        size_t slot = 0;
        while (slot < MAX_PEERS && reg->peers[slot])
                slot++;
        if (slot == MAX_PEERS) {
                log_warning("refusing a peer: %d are being served already", MAX_PEERS);
                close(fd);
                return 0;
        }
        struct peer *p = calloc(1, sizeof(*p));
        if (!p) {
                close(fd);
                return -ENOMEM;
        }
        *p = (struct peer){.reg = reg, .fd = fd, .number = ++reg->next_number};
        reg->peers[slot] = p;
        log_info("peer %u connected: sending %zu devices", p->number, reg->count);
        if (pthread_create(&p->thread, NULL, serve_peer, p) != 0) {
                reg->peers[slot] = NULL;
                close(fd);
                free(p);
                return error_set(-EAGAIN, "cannot start a thread for a peer");
        }
        return 0;
}

/* Which blocks are all zeros, found once for every peer. */
static int find_zero_blocks(struct block_device *dev, struct bitmap *ret) {
        uint64_t n = block_device_block_count(dev);
        int r = bitmap_init(ret, n);
        _cleanup_free_ uint8_t *buf = r < 0 ? NULL : malloc(dev->block_size);
        if (r < 0 || !buf)
                return -ENOMEM;
        for (uint64_t b = 0; b < n; b++) {
                size_t len = block_device_block_length(dev, b);
                if ((r = block_device_read_at(dev, buf, len, b * dev->block_size)) < 0)
                        return r;
                if (buffer_is_zero(buf, len))
                        bitmap_set(ret, b);
        }
        return 0;
}

static int open_devices(struct registry *reg, const struct device_list *list) {
        bool taken[MIGRATE_MAX_DEVICES] = {false};
        if (list->count == 0 || list->count > MIGRATE_MAX_DEVICES)
                return error_set(-EINVAL, "devices: %zu devices (1-%d)", list->count, MIGRATE_MAX_DEVICES);
        size_t order[MIGRATE_MAX_DEVICES], n = 0;
        for (size_t f = 0; f < ELEMENTSOF(first); f++)
                for (size_t i = 0; i < list->count; i++)
                        if (!taken[i] && strcmp(list->devices[i].name, first[f]) == 0)
                                taken[i] = true, order[n++] = i;
        for (size_t i = 0; i < list->count; i++)
                if (!taken[i])
                        order[n++] = i;
        uint64_t total = 0, zero = 0;
        for (size_t k = 0; k < n; k++) {
                const struct device_config *c = &list->devices[order[k]];
                int r = file_device_open(c->name, c->base, FILE_DEVICE_READ_ONLY, 0, c->block_size, &reg->files[k]);
                if (r < 0)
                        return error_prefix(r, "device %s", c->name);
                reg->count = k + 1;
                if ((r = find_zero_blocks(reg->files[k], &reg->zero[k])) < 0)
                        return error_prefix(r, "device %s", c->name);
                reg->devs[k] = (struct migrate_source_device){.name = c->name, .dev = reg->files[k], .zero = &reg->zero[k]};
                total += reg->files[k]->size;
                zero += bitmap_count(&reg->zero[k]) * reg->files[k]->block_size;
        }
        log_info("Serving %zu devices (%.1f MiB, %.1f MiB of them zero blocks, sent as runs before the hand-over)",
                 reg->count, (double)total / (1 << 20), (double)zero / (1 << 20));
        return 0;
}

int main(int argc, char **argv) {
        const char *devices_json = default_devices, *laddr = "localhost:1337", *raddr = "";
        int64_t concurrency = 1024;
        bool verbose = false, compress = false;
        struct tls_options tls_options = {0};
        struct flag flags[] = {
                TLS_FLAGS(tls_options),
                {"compress", FLAG_BOOL, &compress, "Whether to offer zstd-compressed blocks (for slow links)"},
                {"concurrency", FLAG_INT, &concurrency, "Number of concurrent workers to use in migrations"},
                {"devices", FLAG_STRING, &devices_json, "Devices configuration"},
                {"laddr", FLAG_STRING, &laddr, "Local address to listen on (leave empty to disable)"},
                {"raddr", FLAG_STRING, &raddr,
                 "Remote address to connect to (leave empty to disable; this registry serves local files only)"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
        };
        int r = flags_parse_command("drafter-registry", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, &verbose);
        if (r >= 0)
                return r;
        if (*raddr) {
                log_error("--raddr %s: this drafter-registry serves the --devices' base files; it does not fetch a "
                          "package from another peer (set --raddr '')",
                          raddr);
                return 2;
        }
        if (!*laddr) {
                log_error("--laddr is empty: a registry needs an address to listen on");
                return 2;
        }
        if (concurrency < 1) {
                log_error("--concurrency must be at least 1");
                return 2;
        }
        struct registry reg = {0};
        if (tls_context_from_flags(&tls_options, true, &reg.tls) < 0)
                return 1;
        struct device_list list;
        if (device_list_parse(devices_json, DEVICE_SCHEMA_PEER, &list) < 0) {
                log_error("%s", error_message());
                tls_context_free(reg.tls);
                return 2;
        }
        pthread_mutex_init(&reg.lock, NULL);
        int sigfd = signals_stop_fd(), lfd = -1, port;
        if (sigfd < 0)
                r = error_set(sigfd, "cannot take SIGINT/SIGTERM on a descriptor");
        else if ((r = device_list_check_inputs(&list, DEVICE_SCHEMA_PEER)) == 0 && (r = open_devices(&reg, &list)) == 0)
                r = transport_listen(laddr, &lfd, &port);
        if (r < 0) {
                log_error("%s", error_message());
        } else {
                reg.cfg = (struct migrate_source_config){.devices = reg.devs,
                                                         .count = reg.count,
                                                         .compress = compress,
                                                         .concurrency = (unsigned)MIN(concurrency, MIGRATE_MAX_BATCH),
                                                         .lazy = true,
                                                         .demand_group = &reg.last_need_ns};
                log_info("Listening on %s; Ctrl-C stops", laddr);
                for (;;) {
                        struct pollfd p[2] = {{.fd = lfd, .events = POLLIN}, {.fd = sigfd, .events = POLLIN}};
                        if (poll(p, 2, 1000) < 0 && errno != EINTR)
                                break;
                        reap(&reg, false);
                        if (p[1].revents)
                                break;
                        if ((p[0].revents & POLLIN) && accept_peer(&reg, lfd) < 0)
                                log_warning("%s", error_message());
                }
        }
        /* Peers still being served lose their link now (they report the source went away). */
        reap(&reg, true);
        if (r >= 0)
                log_info("Stopping: %u peers served, %u failed", reg.served, reg.failed);
        if (lfd >= 0)
                close(lfd);
        for (size_t i = 0; i < reg.count; i++) {
                block_device_close(reg.files[i]);
                bitmap_free(&reg.zero[i]);
        }
        if (sigfd >= 0)
                close(sigfd);
        device_list_free(&list);
        tls_context_finish(reg.tls);
        pthread_mutex_destroy(&reg.lock);
        return r < 0 ? 1 : 0;
}
