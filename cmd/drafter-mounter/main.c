/* drafter-mounter — migrate block devices without a VM: serve local devices (or devices received
 * from --raddr) as files, and hand them on to a peer that connects to --laddr. Chains A→B→C work:
 * a mounter that received devices can serve them onward.
 *
 *   drafter-mounter --raddr '' --laddr localhost:1337 --devices '[…]'      # first in the chain
 *   drafter-mounter --raddr localhost:1337 --laddr '' --devices '[…]'      # takes them over
 */
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/cow_device.h"
#include "drafter/device_config.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/fs.h"
#include "drafter/fuse_export.h"
#include "drafter/gate_device.h"
#include "drafter/log.h"
#include "drafter/signals.h"
#include "drafter/migrate.h"
#include "drafter/s3_sync.h"
#include "drafter/storage.h"
#include "drafter/tls.h"
#include "drafter/transport.h"

#include <errno.h>
#include <limits.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

static const char default_devices[] = DEVICE_DEFAULT_MIGRATION_DEVICES;


struct mounter {
        struct device_list list;
        size_t count;
        const struct device_config **cfg;  /* per device, in the order served */
        struct block_device **bottom;      /* storage device (COW / file) or waiting cache */
        struct block_device **tracker;     /* dirty tracker (inside the gate) */
        struct block_device **top;         /* gate: what FUSE serves */
        struct volatility_monitor **vm;
        struct s3_device **s3;             /* kept in S3, or NULL */
        struct block_device **s3track;     /* the S3 sync's dirty tracker (above bottom) */
        struct fuse_export *fx;
        struct migrate_destination *dest;
        struct tls_context *tls; /* NULL: plain TCP */
        const char *mount_dir;
        unsigned concurrency;
        bool disable_postcopy;
        bool stop; /* SIGINT/SIGTERM came while receiving: stop once done */
        /* Files this destination created: a failed migration removes them (partial copies). */
        char *created[3 * MIGRATE_MAX_DEVICES];
        size_t created_count;
};

static void note_created(struct mounter *m, const char *path) {
        struct stat st;
        if (path && *path && stat(path, &st) < 0 && m->created_count < sizeof(m->created) / sizeof(m->created[0]))
                m->created[m->created_count++] = strdup(path);
}

static int open_local(void *ctx, const struct migrate_device_info *info, struct block_device **ret) {
        struct mounter *m = ctx;
        const struct device_config *cfg = device_list_find(&m->list, info->name);
        if (!cfg)
                return error_set(-ENOENT, "the source sends device \"%s\", which --devices does not list", info->name);
        note_created(m, cfg->overlay);
        note_created(m, cfg->state);
        note_created(m, cfg->base);
        return storage_open_received(cfg, info, ret);
}

/* Put volatility monitor, dirty tracker and gate on device i's bottom. */
static int stack_device(struct mounter *m, size_t i) {
        const struct device_config *cfg = m->cfg[i];
        struct block_device *vdev, *below = m->bottom[i];
        int r = volatility_monitor_new(block_device_block_count(m->bottom[i]), (uint64_t)cfg->expiry_ns,
                                       clock_now_ns(), &m->vm[i]);
        if (r < 0)
                return r;
        if (m->s3[i]) {
                if ((r = dirty_tracker_wrap(below, DIRTY_TRACK_ALL, &m->s3track[i])) < 0)
                        return r;
                below = m->s3track[i];
        }
        if ((r = volatility_device_wrap(below, m->vm[i], &vdev)) < 0)
                return r;
        if ((r = dirty_tracker_wrap(vdev, DIRTY_TRACK_AFTER_READ, &m->tracker[i])) < 0) {
                block_device_close(vdev);
                return r;
        }
        if ((r = gate_device_wrap(m->tracker[i], &m->top[i])) < 0) {
                block_device_close(m->tracker[i]);
                return r;
        }
        return 0;
}

static int expose(struct mounter *m) {
        _cleanup_free_ struct fuse_export_device *files = calloc(m->count ? m->count : 1, sizeof(*files));
        if (!files)
                return -ENOMEM;
        for (size_t i = 0; i < m->count; i++)
                files[i] = (struct fuse_export_device){m->cfg[i]->name, m->top[i], false};
        int r = fuse_export_start_flags(m->mount_dir, files, m->count, FUSE_EXPORT_WRITE_THROUGH, &m->fx);
        if (r >= 0)
                log_info("Serving %zu devices as files in %s", m->count, m->mount_dir);
        return r;
}

static int allocate(struct mounter *m, size_t count) {
        m->count = count;
        m->cfg = calloc(count ? count : 1, sizeof(*m->cfg));
        m->bottom = calloc(count ? count : 1, sizeof(*m->bottom));
        m->tracker = calloc(count ? count : 1, sizeof(*m->tracker));
        m->top = calloc(count ? count : 1, sizeof(*m->top));
        m->vm = calloc(count ? count : 1, sizeof(*m->vm));
        m->s3 = calloc(count ? count : 1, sizeof(*m->s3));
        m->s3track = calloc(count ? count : 1, sizeof(*m->s3track));
        return m->cfg && m->bottom && m->tracker && m->top && m->vm && m->s3 && m->s3track ? 0 : -ENOMEM;
}

static int receive(struct mounter *m, const char *raddr, int sigfd) {
        int fd, r;
        log_info("Connecting to %s", raddr);
        if ((r = transport_connect(raddr, 60000, &fd)) < 0 || (r = tls_wrap(m->tls, fd, false, 10000, &fd)) < 0)
                return error_prefix(r, "%s", raddr);
        uint64_t start = clock_now_ns();
        struct migrate_destination_config dcfg = {
                .open_device = open_local, .ctx = m, .disable_postcopy = m->disable_postcopy};
        if ((r = migrate_destination_start(fd, &dcfg, &m->dest)) < 0)
                return r;
        size_t n = migrate_destination_device_count(m->dest);
        if ((r = allocate(m, n)) < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                m->cfg[i] = device_list_find(&m->list, migrate_destination_device_info(m->dest, i)->name);
                m->bottom[i] = migrate_destination_take_device(m->dest, i);
                /* The source's bucket travels with the devices; else our own --devices may name one. */
                const struct migrate_s3_info *s3 = migrate_destination_s3(m->dest, i, NULL);
                if (s3)
                        r = s3_device_from_received(m->cfg[i]->name, s3, &m->s3[i]);
                else if (m->cfg[i]->s3.sync)
                        r = s3_device_from_config(m->cfg[i], m->bottom[i]->size, &m->s3[i]);
                if (r < 0 || (r = stack_device(m, i)) < 0)
                        return r;
        }
        /* Served at once: reads of blocks still in flight wait for them. */
        if ((r = expose(m)) < 0)
                return r;
        /* Ctrl-C while receiving: before the hand-over the migration stops (the source keeps the
         * devices); after it the devices are ours, so the rest is received first. */
        while (!migrate_destination_finished(m->dest)) {
                struct pollfd p = {.fd = m->stop ? -1 : sigfd, .events = POLLIN};
                if (poll(&p, 1, 5) <= 0 || !(p.revents & POLLIN))
                        continue;
                struct signalfd_siginfo si;
                if (read(sigfd, &si, sizeof(si)) < 0)
                        log_debug("signalfd: %s", strerror(errno));
                m->stop = true;
                if (migrate_destination_abort(m->dest) == 0)
                        log_info("Interrupted: stopping the migration (the source keeps the devices)");
                else
                        log_info("Interrupted after the hand-over: receiving the last blocks before stopping");
        }
        struct migrate_stats st;
        if ((r = migrate_destination_wait(m->dest, &st)) < 0) {
                if (!st.authority_transferred) {
                        /* The source keeps the devices: what arrived here is a partial copy. */
                        for (size_t i = 0; i < m->created_count; i++)
                                if (unlink(m->created[i]) < 0 && errno != ENOENT)
                                        log_info("Could not remove the partial copy %s: %s", m->created[i],
                                                 strerror(errno));
                        if (m->created_count)
                                log_info("Removed the %zu files of the partial copy", m->created_count);
                        return r;
                }
                /* The devices are ours now and the source will not resume: serve what arrived
                 * (reads of blocks that never did fail) until stopped, then report the failure. */
                char why[1024];
                snprintf(why, sizeof(why), "%s", error_message());
                log_error("%s", why);
                log_info("Serving the blocks that arrived until stopped; reads of the others fail");
                struct signalfd_siginfo si;
                if (!m->stop && read(sigfd, &si, sizeof(si)) < 0) /* (a stop already asked for ends it now) */
                        log_debug("signalfd: %s", strerror(errno));
                return error_set(r, "migration failed after taking authority: %s", why);
        }
        log_info("Received %zu devices in %.1f ms (%" PRIu64 " blocks, %.1f MB, %" PRIu64 " after taking over)", n,
                 (clock_now_ns() - start) / 1e6, st.blocks_sent, st.bytes_received / 1e6, st.postcopy_blocks);
        if (st.s3_blocks || st.s3_fallback_blocks)
                log_info("From S3: %" PRIu64 " blocks, %.1f MB (%" PRIu64 " blocks asked over the link after S3 failed); "
                         "over the link: %.1f MB",
                         st.s3_blocks, st.s3_bytes / 1e6, st.s3_fallback_blocks, st.bytes_received / 1e6);
        for (size_t i = 0; i < n; i++) {
                const struct bitmap *current = NULL;
                migrate_destination_s3(m->dest, i, &current);
                if (m->s3[i] && (r = s3_device_start(m->s3[i], m->s3track[i], current)) < 0)
                        return r;
        }
        log_info("Completed all device migrations");
        return 0;
}

static int open_all(struct mounter *m) {
        int r = allocate(m, m->list.count);
        if (r < 0)
                return r;
        for (size_t i = 0; i < m->count; i++) {
                m->cfg[i] = &m->list.devices[i];
                if ((r = storage_open_device(m->cfg[i], &m->bottom[i])) < 0 ||
                    (m->cfg[i]->s3.sync && (r = s3_device_from_config(m->cfg[i], m->bottom[i]->size, &m->s3[i])) < 0) ||
                    (r = stack_device(m, i)) < 0 || (m->s3[i] && (r = s3_device_start(m->s3[i], m->s3track[i], NULL)) < 0))
                        return r;
        }
        return expose(m);
}

/* The files are served write-through: a write() has reached the device (and its dirty tracker)
 * before it returns, so no write-back barrier is needed before collecting. Suspending freezes the
 * gates: writes in progress finish, new ones wait until the migration completes (they then fail)
 * or fails (they then go through here). */
static int suspend_hook(void *ctx) {
        struct mounter *m = ctx;
        for (size_t i = 0; i < m->count; i++)
                gate_device_freeze(m->top[i]);
        log_info("Suspended writes for the final transfer");
        return 0;
}

/* Serve migrations on laddr until one completes (0) or a signal arrives (1). */
static int serve(struct mounter *m, const char *laddr, int sigfd) {
        int lfd, port, r;
        if ((r = transport_listen(laddr, &lfd, &port)) < 0)
                return r;
        log_info("Serving on %s", laddr);
        _cleanup_free_ struct migrate_source_device *devs = calloc(m->count ? m->count : 1, sizeof(*devs));
        if (!devs) {
                close(lfd);
                return -ENOMEM;
        }
        for (size_t i = 0; i < m->count; i++) {
                const struct device_config *c = m->cfg[i];
                const struct bitmap *only = c->sharedbase ? cow_device_present(m->bottom[i]) : NULL;
                devs[i] = (struct migrate_source_device){c->name,           m->tracker[i],
                                                         m->vm[i],          only,
                                                         c->max_dirty_blocks, c->min_cycles,
                                                         c->max_cycles,     c->cycle_throttle_ns,
                                                         NULL,              m->s3[i] ? &m->s3[i]->src : NULL,
                                                         false};
        }
        struct migrate_source_config cfg = {.devices = devs,
                                            .count = m->count,
                                            .suspend = suspend_hook,
                                            .ctx = m,
                                            .compress = true,
                                            .progress = true,
                                            .concurrency = m->concurrency};
        for (;;) {
                struct pollfd p[2] = {{.fd = lfd, .events = POLLIN}, {.fd = sigfd, .events = POLLIN}};
                if (poll(p, 2, -1) < 0 && errno != EINTR)
                        break;
                if (p[1].revents) {
                        close(lfd);
                        return 1;
                }
                if (!(p[0].revents & POLLIN))
                        continue;
                int fd;
                if (transport_accept(lfd, 0, &fd) < 0)
                        continue;
                if (tls_wrap(m->tls, fd, true, 10000, &fd) < 0) {
                        log_error("refused a peer: %s", error_message());
                        continue;
                }
                log_info("Migrating %zu devices to a peer", m->count);
                struct migrate_stats st;
                r = migrate_source_run(fd, &cfg, &st);
                close(fd);
                if (r >= 0) {
                        for (size_t i = 0; i < m->count; i++)
                                gate_device_shut(m->top[i], -EROFS);
                        log_info("Completed all device migrations (%" PRIu64 " cycles, %" PRIu64 " blocks, %.1f MB, "
                                 "%.1f ms; writes frozen %.1f ms before the hand-over)",
                                 st.cycles, st.blocks_sent, st.bytes_sent / 1e6, st.total_ns / 1e6, st.suspend_ns / 1e6);
                        close(lfd);
                        return 0;
                }
                log_error("migration failed: %s", error_message());
                if (st.authority_transferred) {
                        /* The peer may already be using the devices: never write here again. */
                        for (size_t i = 0; i < m->count; i++)
                                gate_device_shut(m->top[i], -EROFS);
                        close(lfd);
                        return r;
                }
                for (size_t i = 0; i < m->count; i++)
                        gate_device_thaw(m->top[i]);
                log_info("Kept the devices; serving on %s again", laddr);
        }
        close(lfd);
        return -EIO;
}

int main(int argc, char **argv) {
        const char *devices_json = default_devices, *raddr = "localhost:1337", *laddr = "localhost:1337";
        const char *mount_dir = "out/mnt";
        int64_t concurrency = 1024;
        bool verbose = false, disable_postcopy = false;
        struct tls_options tls = {0};
        struct flag flags[] = {
                TLS_FLAGS(tls),
                {"devices", FLAG_STRING, &devices_json, "Devices configuration"},
                {"raddr", FLAG_STRING, &raddr, "Remote address to connect to (leave empty to disable)"},
                {"laddr", FLAG_STRING, &laddr, "Local address to listen on (leave empty to disable)"},
                {"concurrency", FLAG_INT, &concurrency, "Number of concurrent workers to use in migrations"},
                {"mount-dir", FLAG_STRING, &mount_dir, "Directory in which the devices are served as files"},
                {"disable-postcopy-migration", FLAG_BOOL, &disable_postcopy,
                 "Whether to disable post-copy migration (take over only once every block is local)"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
        };
        int r = flags_parse_command("drafter-mounter", flags, ELEMENTSOF(flags), argc, argv, &verbose);
        if (r >= 0)
                return r;
        if (*raddr && *laddr && strcmp(raddr, laddr) == 0) {
                log_error("--raddr and --laddr are both %s: set one of them to '' (see --help)", raddr);
                return 2;
        }
        if (concurrency < 1) {
                log_error("--concurrency must be at least 1");
                return 2;
        }

        int sigfd = signals_stop_fd();
        if (sigfd < 0) {
                log_error("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
                return 1;
        }

        struct mounter m = {.mount_dir = mount_dir,
                            .concurrency = (unsigned)MIN(concurrency, (int64_t)UINT_MAX),
                            .disable_postcopy = disable_postcopy};
        int status = 1;
        if (tls_context_from_flags(&tls, *raddr || *laddr, &m.tls) < 0)
                return 1;
        if (device_list_parse(devices_json, DEVICE_SCHEMA_PEER, &m.list) < 0) {
                log_error("%s", error_message());
                tls_context_free(m.tls);
                return 1;
        }
        if (*raddr)
                r = receive(&m, raddr, sigfd);
        else if ((r = device_list_check_inputs(&m.list, DEVICE_SCHEMA_PEER)) >= 0)
                r = open_all(&m);
        if (r < 0) {
                log_error("%s", error_message());
                goto out;
        }
        if (m.stop) {
                status = 0; /* interrupted while receiving, after the hand-over: the devices are complete */
        } else if (*laddr) {
                r = serve(&m, laddr, sigfd);
                if (r < 0)
                        log_error("%s", error_message());
                status = r < 0 ? 1 : 0;
        } else {
                struct signalfd_siginfo si;
                if (read(sigfd, &si, sizeof(si)) < 0)
                        log_debug("signalfd: %s", strerror(errno));
                status = 0;
        }
        log_info("Shutting down");
out:
        fuse_export_stop(m.fx);
        migrate_destination_free(m.dest);
        for (size_t i = 0; m.s3 && i < m.count; i++)
                s3_device_free(m.s3[i]); /* it reads the devices */
        for (size_t i = 0; i < m.count; i++) {
                if (m.top[i]) {
                        if (block_device_flush(m.top[i]) < 0) {
                                log_error("%s", error_message());
                                status = 1;
                        }
                        block_device_close(m.top[i]);
                } else if (m.bottom[i]) {
                        block_device_close(m.bottom[i]);
                }
                volatility_monitor_free(m.vm[i]);
        }
        free(m.cfg);
        free(m.bottom);
        free(m.tracker);
        free(m.top);
        free(m.vm);
        free(m.s3);
        free(m.s3track);
        for (size_t i = 0; i < m.created_count; i++)
                free(m.created[i]);
        device_list_free(&m.list);
        tls_context_finish(m.tls);
        close(sigfd);
        return status;
}
