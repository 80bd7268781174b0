/* destination.c — the receiving side of a device migration (see migrate.h, docs/protocol.md). */
#include "drafter/migrate.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/log.h"
#include "drafter/waiting_cache.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zstd.h>

struct destination;

struct need_ctx {
        struct destination *d;
        size_t index;
};

struct destination {
        int fd;
        struct migrate_destination_config cfg;
        struct migrate_device_table table;
        struct block_device **devs; /* waiting caches */
        bool *taken;                /* handed to the caller: not ours to close */
        struct need_ctx *need_ctx;
        bool *completed;
        size_t completed_count;
        pthread_mutex_t write_lock;
        pthread_t thread;
        bool thread_running;
        bool authority; /* we own the devices (AUTHORITY_ACK sent) */
        bool finished;  /* the receiving thread has ended */
        bool authority_pending;
        int result;
        char message[1024];
        struct migrate_stats stats;
        ZSTD_DCtx *dctx;
        uint8_t *block_buf;
};

static int send_frame(struct destination *d, uint8_t type, uint16_t device, const void *payload, uint32_t len) {
        struct iovec iov = {(void *)payload, len};
        pthread_mutex_lock(&d->write_lock);
        int r = migrate_write_frame(d->fd, type, 0, device, &iov, len ? 1 : 0);
        pthread_mutex_unlock(&d->write_lock);
        if (r >= 0)
                __atomic_fetch_add(&d->stats.bytes_sent, MIGRATE_HEADER_SIZE + len, __ATOMIC_RELAXED);
        return r;
}

static int send_event(struct destination *d, enum migrate_event event) {
        uint8_t p[2];
        return send_frame(d, MIGRATE_EVENT, MIGRATE_CONNECTION, p, migrate_encode_event(p, event));
}

/* A reader of a missing block asks the source for it (from the reader's thread). */
static void need_block(void *ctx, uint64_t block) {
        struct need_ctx *n = ctx;
        uint8_t p[12];
        if (send_frame(n->d, MIGRATE_NEED_AT, n->d->table.devices[n->index].id, p, migrate_encode_range(p, block, 1)) < 0)
                log_debug("migration: NEED_AT for block %" PRIu64 " not sent: %s", block, error_message());
}

static int take_authority(struct destination *d) {
        int r = send_event(d, MIGRATE_EVENT_AUTHORITY_ACK);
        if (r < 0)
                return r;
        d->authority = true;
        d->stats.authority_transferred = true;
        if (d->cfg.on_authority && (r = d->cfg.on_authority(d->cfg.ctx)) < 0)
                return error_prefix(r, "migration: taking over after authority transfer");
        return 0;
}

/* After authority the local copy is newer than anything still in flight. */
static unsigned supply_flags(struct destination *d) {
        return d->authority ? WAITING_CACHE_IF_MISSING : 0;
}

/* supplied: waiting_cache_supply's result (1: written). */
static void notify_blocks(struct destination *d, size_t index, uint64_t first, uint64_t count, int supplied,
                          bool zero) {
        if (supplied > 0 && d->cfg.on_blocks)
                d->cfg.on_blocks(d->cfg.ctx, index, first, count, zero);
}

static int handle(struct destination *d, const struct migrate_frame *f, const struct migrate_message *m) {
        struct block_device *dev = m->type >= MIGRATE_BLOCK && m->type <= MIGRATE_DIRTY ? d->devs[m->device] : NULL;
        int r = 0;
        if (d->authority && m->type >= MIGRATE_BLOCK && m->type <= MIGRATE_BLOCK_ZSTD)
                d->stats.postcopy_blocks += m->type == MIGRATE_BLOCK_ZERO ? m->range.count : 1;
        switch (m->type) {
        case MIGRATE_BLOCK:
                r = waiting_cache_supply(dev, m->block.block, m->block.data, supply_flags(d));
                d->stats.blocks_sent++; /* counted as received */
                notify_blocks(d, m->device, m->block.block, 1, r, false);
                break;
        case MIGRATE_BLOCK_ZSTD: {
                size_t len = block_device_block_length(dev, m->block.block);
                size_t n = ZSTD_decompressDCtx(d->dctx, d->block_buf, len, m->block.data, m->block.length);
                if (ZSTD_isError(n) || n != len)
                        return error_set(-EBADMSG, "migration: block %" PRIu64 " of device \"%s\" does not decompress "
                                         "to %zu bytes", m->block.block, d->table.devices[m->device].name, len);
                r = waiting_cache_supply(dev, m->block.block, d->block_buf, supply_flags(d));
                d->stats.blocks_sent++;
                d->stats.compressed_blocks++;
                notify_blocks(d, m->device, m->block.block, 1, r, false);
                break;
        }
        case MIGRATE_BLOCK_ZERO:
                memset(d->block_buf, 0, dev->block_size);
                for (uint64_t b = m->range.first; b < m->range.first + m->range.count && r >= 0; b++) {
                        r = waiting_cache_supply(dev, b, d->block_buf, supply_flags(d));
                        d->stats.zero_blocks++;
                        notify_blocks(d, m->device, b, 1, r, true);
                }
                break;
        case MIGRATE_DIRTY:
                if (d->authority)
                        return error_set(-EPROTO, "migration: DIRTY after authority transfer");
                for (uint32_t i = 0; i < m->dirty.count; i++) {
                        uint64_t b;
                        memcpy(&b, m->dirty.blocks + 8 * i, 8);
                        if (d->cfg.on_dirty)
                                d->cfg.on_dirty(d->cfg.ctx, m->device, le64toh(b));
                        waiting_cache_invalidate(dev, le64toh(b));
                }
                d->stats.final_dirty_blocks += m->dirty.count;
                break;
        case MIGRATE_EVENT:
                switch (m->event) {
                case MIGRATE_EVENT_BULK_DONE:
                case MIGRATE_EVENT_SUSPENDED:
                        break;
                case MIGRATE_EVENT_BARRIER: /* everything before it is applied: we handle frames in order */
                        r = send_event(d, MIGRATE_EVENT_BARRIER_ACK);
                        break;
                case MIGRATE_EVENT_AUTHORITY:
                        if (d->cfg.disable_postcopy)
                                d->authority_pending = true;
                        else
                                r = take_authority(d);
                        break;
                case MIGRATE_EVENT_COMPLETED:
                        /* Never trust a completion that leaves holes. */
                        if (waiting_cache_missing(d->devs[m->device]) > 0)
                                return error_set(-EPROTO, "migration: the source completed device \"%s\" with %" PRIu64
                                                 " blocks still missing", d->table.devices[m->device].name,
                                                 waiting_cache_missing(d->devs[m->device]));
                        if (!d->completed[m->device]) {
                                d->completed[m->device] = true;
                                d->completed_count++;
                        }
                        if (d->completed_count == d->table.count) {
                                if (d->authority_pending && (r = take_authority(d)) < 0)
                                        return r;
                                if (!d->authority)
                                        return error_set(-EPROTO, "migration: completed without authority transfer");
                                r = send_event(d, MIGRATE_EVENT_COMPLETED_ACK);
                                if (r >= 0) {
                                        d->stats.completed = true;
                                        return 1;
                                }
                        }
                        break;
                }
                break;
        case MIGRATE_ERROR:
                return error_set(m->error.err < 0 ? m->error.err : -EPROTO, "source: %s", m->error.message);
        default:
                return error_set(-EPROTO, "migration: unexpected frame type %u", f->type);
        }
        return r < 0 ? r : 0;
}

static int fill_from_stream(void *ctx, void *dst, size_t len) {
        return migrate_reader_take(ctx, dst, len);
}

/* The payload of a frame whose header was read, into buf (room for all of it), then handle it.
 * Before authority a BLOCK goes straight into the device's memory when it has some and the whole
 * block has already arrived: a frame cut short never touches the device, and as no local writer
 * competes before authority, holding the block's lock during the read blocks nobody. */
static int receive(struct destination *d, struct migrate_reader *rd, struct migrate_frame *f, uint8_t *buf) {
        struct migrate_message m;
        f->payload = buf;
        int r;
        if (f->type == MIGRATE_BLOCK && f->length >= 8 && !d->authority) {
                /* The block index first: parsing a BLOCK reads nothing past it. */
                if ((r = migrate_reader_take(rd, buf, 8)) < 0 || (r = migrate_frame_parse(f, &d->table, true, &m)) < 0)
                        return r;
                r = migrate_reader_has_rest(rd)
                            ? waiting_cache_supply_direct(d->devs[m.device], m.block.block, 0, fill_from_stream, rd)
                            : -EOPNOTSUPP;
                if (r != -EOPNOTSUPP) {
                        d->stats.blocks_sent++; /* counted as received */
                        notify_blocks(d, m.device, m.block.block, 1, r, false);
                        return r < 0 ? r : 0;
                }
                if ((r = migrate_reader_take(rd, buf + 8, rd->left)) < 0)
                        return r;
        } else if ((r = migrate_reader_take(rd, buf, rd->left)) < 0 ||
                   (r = migrate_frame_parse(f, &d->table, true, &m)) < 0) {
                return r;
        }
        return handle(d, f, &m);
}

static void *receive_thread(void *arg) {
        struct destination *d = arg;
        struct migrate_reader reader;
        uint64_t t0 = clock_now_ns();
        int r = migrate_reader_init(&reader, d->fd);
        if (r < 0)
                error_set(r, "migration: no memory for the receive buffer");
        uint8_t *buf = NULL;
        size_t cap = 0;
        while (r >= 0) {
                struct migrate_frame f;
                r = migrate_reader_header(&reader, &f);
                if (r >= 0 && f.length > cap) {
                        uint8_t *grown = realloc(buf, f.length);
                        if (!grown)
                                r = error_set(-ENOMEM, "migration: no memory for a %u-byte frame", f.length);
                        buf = grown ? grown : buf;
                        cap = grown ? f.length : cap;
                }
                if (r >= 0) {
                        d->stats.bytes_received += MIGRATE_HEADER_SIZE + f.length;
                        r = receive(d, &reader, &f, buf);
                }
                if (r != 0)
                        break;
        }
        free(buf);
        if (r == -ECONNRESET)
                error_set(r, "source: connection lost before the migration completed (%s)",
                          d->authority ? "after the authority transfer: blocks not received yet are unavailable"
                                       : "the source keeps the devices");
        if (r < 0) {
                snprintf(d->message, sizeof(d->message), "%s", error_message());
                /* Tell the source (it may still be listening), then release every waiting reader. */
                uint8_t p[6 + MIGRATE_MAX_MESSAGE];
                send_frame(d, MIGRATE_ERROR, MIGRATE_CONNECTION, p, migrate_encode_error(p, r, d->message));
                /* To a reader (a VM's disk, a file through FUSE) a block that will never arrive
                 * is an I/O error; the message says why. */
                for (size_t i = 0; i < d->table.count; i++)
                        waiting_cache_cancel(d->devs[i], -EIO, d->message);
        }
        d->result = r < 0 ? r : 0;
        d->stats.total_ns = clock_now_ns() - t0;
        migrate_reader_free(&reader);
        __atomic_store_n(&d->finished, true, __ATOMIC_RELEASE);
        return NULL;
}

static int handshake(struct destination *d) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t cap = 0;
        struct migrate_frame f;
        struct migrate_message m;
        uint8_t p[20];
        int r = send_frame(d, MIGRATE_HELLO, MIGRATE_CONNECTION, p,
                           migrate_encode_hello(p, MIGRATE_ROLE_DESTINATION,
                                                MIGRATE_CAP_ZERO_RUNS | MIGRATE_CAP_ZSTD | MIGRATE_CAP_BARRIER));
        if (r < 0)
                return r;
        if ((r = migrate_read_frame(d->fd, &buf, &cap, &f)) < 0)
                return r;
        if (f.type != MIGRATE_HELLO)
                return error_set(-EPROTO, "migration: expected HELLO from the source, got frame type %u", f.type);
        if ((r = migrate_frame_parse(&f, NULL, true, &m)) < 0)
                return r;
        if (m.hello.version != MIGRATE_VERSION)
                return error_set(-EPROTO, "migration: source speaks version %u, we speak %u", m.hello.version,
                                 MIGRATE_VERSION);
        if ((r = migrate_read_frame(d->fd, &buf, &cap, &f)) < 0)
                return r;
        if (f.type != MIGRATE_DEVICES)
                return error_set(-EPROTO, "migration: expected DEVICES from the source, got frame type %u", f.type);
        if ((r = migrate_devices_decode(&f, &d->table)) < 0)
                return r;

        size_t n = d->table.count;
        uint32_t max_block = 0;
        d->devs = calloc(n ? n : 1, sizeof(*d->devs));
        d->need_ctx = calloc(n ? n : 1, sizeof(*d->need_ctx));
        d->completed = calloc(n ? n : 1, sizeof(bool));
        d->taken = calloc(n ? n : 1, sizeof(bool));
        if (!d->devs || !d->need_ctx || !d->completed || !d->taken)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                const struct migrate_device_info *info = &d->table.devices[i];
                struct block_device *inner;
                if ((r = d->cfg.open_device(d->cfg.ctx, info, &inner)) < 0)
                        return error_prefix(r, "migration: device \"%s\"", info->name);
                if (inner->size != info->size || inner->block_size != info->block_size) {
                        block_device_close(inner);
                        return error_set(-EINVAL, "migration: device \"%s\" opened with size %" PRIu64 "/%u, the "
                                         "source has %" PRIu64 "/%u", info->name, inner->size, inner->block_size,
                                         info->size, info->block_size);
                }
                d->need_ctx[i] = (struct need_ctx){d, i};
                if ((r = waiting_cache_wrap(inner, need_block, &d->need_ctx[i], d->cfg.read_timeout_ns, &d->devs[i])) < 0) {
                        block_device_close(inner);
                        return r;
                }
                /* A SHAREDBASE device starts complete (its base); the source's first DIRTY list
                 * says which blocks to wait for. */
                if (info->flags & MIGRATE_DEVICE_SHAREDBASE)
                        waiting_cache_mark_present(d->devs[i], 0, block_device_block_count(d->devs[i]));
                max_block = MAX(max_block, info->block_size);
        }
        d->block_buf = malloc(max_block ? max_block : 1);
        d->dctx = ZSTD_createDCtx();
        if (!d->block_buf || !d->dctx)
                return -ENOMEM;
        return send_frame(d, MIGRATE_DEVICES_ACK, MIGRATE_CONNECTION, NULL, 0);
}

void migrate_destination_free(struct migrate_destination *dest) {
        struct destination *d = (struct destination *)dest;
        if (!d)
                return;
        if (d->thread_running) {
                shutdown(d->fd, SHUT_RDWR);
                pthread_join(d->thread, NULL);
        }
        for (size_t i = 0; d->devs && i < d->table.count; i++)
                if (!d->taken[i])
                        block_device_close(d->devs[i]);
        free(d->devs);
        free(d->taken);
        free(d->need_ctx);
        free(d->completed);
        free(d->block_buf);
        ZSTD_freeDCtx(d->dctx);
        close(d->fd);
        pthread_mutex_destroy(&d->write_lock);
        free(d);
}

int migrate_destination_start(int fd, const struct migrate_destination_config *cfg,
                              struct migrate_destination **ret_dest) {
        struct destination *d = calloc(1, sizeof(*d));
        if (!d) {
                close(fd);
                return -ENOMEM;
        }
        d->fd = fd;
        d->cfg = *cfg;
        pthread_mutex_init(&d->write_lock, NULL);
        int r = handshake(d);
        if (r < 0) {
                char msg[1024];
                snprintf(msg, sizeof(msg), "%s", error_message());
                uint8_t p[6 + MIGRATE_MAX_MESSAGE];
                send_frame(d, MIGRATE_ERROR, MIGRATE_CONNECTION, p, migrate_encode_error(p, r, msg));
                migrate_destination_free((struct migrate_destination *)d);
                return error_set(r, "%s", msg);
        }
        if (pthread_create(&d->thread, NULL, receive_thread, d) != 0) {
                migrate_destination_free((struct migrate_destination *)d);
                return error_set(-EAGAIN, "migration: cannot start the receiving thread");
        }
        d->thread_running = true;
        *ret_dest = (struct migrate_destination *)d;
        return 0;
}

size_t migrate_destination_device_count(struct migrate_destination *dest) {
        return ((struct destination *)dest)->table.count;
}

const struct migrate_device_info *migrate_destination_device_info(struct migrate_destination *dest, size_t i) {
        struct destination *d = (struct destination *)dest;
        return i < d->table.count ? &d->table.devices[i] : NULL;
}

struct block_device *migrate_destination_device(struct migrate_destination *dest, size_t i) {
        struct destination *d = (struct destination *)dest;
        return i < d->table.count ? d->devs[i] : NULL;
}

struct block_device *migrate_destination_take_device(struct migrate_destination *dest, size_t i) {
        struct destination *d = (struct destination *)dest;
        if (i >= d->table.count)
                return NULL;
        d->taken[i] = true;
        return d->devs[i];
}

bool migrate_destination_finished(struct migrate_destination *dest) {
        return __atomic_load_n(&((struct destination *)dest)->finished, __ATOMIC_ACQUIRE);
}

int migrate_destination_wait(struct migrate_destination *dest, struct migrate_stats *ret_stats) {
        struct destination *d = (struct destination *)dest;
        if (d->thread_running) {
                pthread_join(d->thread, NULL);
                d->thread_running = false;
        }
        if (ret_stats)
                *ret_stats = d->stats;
        if (d->result < 0)
                return error_set(d->result, "%s", d->message);
        return 0;
}
