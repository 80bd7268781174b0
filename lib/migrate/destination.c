/* destination.c — the receiving side of a device migration (see migrate.h, docs/protocol.md). */
#include "drafter/migrate.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/log.h"
#include "drafter/s3_sync.h"
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

/* A device partly fetched from S3. `wanted`: blocks still to come from S3 (a block the link
 * delivers or dirties is no longer wanted, so an S3 copy never overwrites newer data); `current`:
 * objects none of whose blocks came over the link. Both under destination.s3_lock. */
struct dest_s3 {
        struct destination *d;
        size_t index;
        struct migrate_s3_info info;
        uint32_t per; /* blocks per object */
        struct bitmap wanted, current;
        struct s3_client *client;
        struct s3_fetch *fetch;
};

struct destination {
        int fd;
        struct dest_s3 **s3; /* per device, NULL: not from S3 */
        pthread_mutex_t s3_lock;
        bool any_s3, source_done, acked;
        bool lazy; /* the source announced MIGRATE_CAP_LAZY */
        bool send_ready, ready_sent; /* both sides have MIGRATE_CAP_READY; READY went out */
        struct migrate_destination_config cfg;
        struct migrate_device_table table;
        struct block_device **devs; /* waiting caches */
        bool *taken;                /* handed to the caller: not ours to close */
        struct need_ctx *need_ctx;
        bool *completed;
        bool *final; /* EVENT FINAL came for it: no DIRTY may follow */
        size_t completed_count;
        pthread_mutex_t write_lock;
        pthread_t thread;
        bool thread_running;
        bool authority; /* we own the devices (AUTHORITY_ACK sent) */
        bool finished;  /* the receiving thread has ended */
        bool authority_pending;
        bool aborted; /* migrate_destination_abort() came first (under write_lock, as authority) */
        int result;
        char message[1024];
        struct migrate_stats stats;
        ZSTD_DCtx *dctx;
        uint8_t *block_buf;
};

/* With write_lock held. */
static int send_frame_locked(struct destination *d, uint8_t type, uint16_t device, const void *payload, uint32_t len) {
        struct iovec iov = {(void *)payload, len};
        int r = migrate_write_frame(d->fd, type, 0, device, &iov, len ? 1 : 0);
        if (r >= 0)
                __atomic_fetch_add(&d->stats.bytes_sent, MIGRATE_HEADER_SIZE + len, __ATOMIC_RELAXED);
        return r;
}

static int send_frame(struct destination *d, uint8_t type, uint16_t device, const void *payload, uint32_t len) {
        pthread_mutex_lock(&d->write_lock);
        int r = send_frame_locked(d, type, device, payload, len);
        pthread_mutex_unlock(&d->write_lock);
        return r;
}

static int send_event(struct destination *d, enum migrate_event event) {
        uint8_t p[2];
        return send_frame(d, MIGRATE_EVENT, MIGRATE_CONNECTION, p, migrate_encode_event(p, event));
}

/* A reader of a missing block asks the source for it (from the reader's thread). */
static void need_block(void *ctx, uint64_t block) {
        struct need_ctx *n = ctx;
        struct dest_s3 *s3 = n->d->s3 ? n->d->s3[n->index] : NULL;
        if (s3) {
                pthread_mutex_lock(&n->d->s3_lock);
                bool from_s3 = bitmap_test(&s3->wanted, block);
                pthread_mutex_unlock(&n->d->s3_lock);
                if (from_s3) {
                        s3_fetch_prioritize(s3->fetch, block / s3->per);
                        return;
                }
        }
        uint8_t p[12];
        if (send_frame(n->d, MIGRATE_NEED_AT, n->d->table.devices[n->index].id, p, migrate_encode_range(p, block, 1)) < 0)
                log_debug("migration: NEED_AT for block %" PRIu64 " not sent: %s", block, error_message());
}

static int take_authority(struct destination *d) {
        /* The acknowledgement and an abort exclude each other: whichever takes write_lock first. */
        pthread_mutex_lock(&d->write_lock);
        uint8_t p[2];
        int r = d->aborted ? error_set(-EINTR, "migration: interrupted here before the hand-over (the source keeps the devices)")
                           : send_frame_locked(d, MIGRATE_EVENT, MIGRATE_CONNECTION, p,
                                               migrate_encode_event(p, MIGRATE_EVENT_AUTHORITY_ACK));
        if (r >= 0)
                d->authority = true;
        pthread_mutex_unlock(&d->write_lock);
        if (r < 0)
                return r;
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
                          bool zero, const void *data) {
        if (supplied > 0 && d->cfg.on_blocks)
                d->cfg.on_blocks(d->cfg.ctx, index, first, count, zero, data);
}

/* The link delivers or dirties blocks [first, first+count) of device i: S3 must not overwrite them. */
static void claim(struct destination *d, size_t i, uint64_t first, uint64_t count) {
        struct dest_s3 *s3 = d->s3 ? d->s3[i] : NULL;
        if (!s3)
                return;
        pthread_mutex_lock(&d->s3_lock);
        for (uint64_t b = first; b < first + count; b++) {
                bitmap_clear(&s3->wanted, b);
                bitmap_clear(&s3->current, b / s3->per);
        }
        pthread_mutex_unlock(&d->s3_lock);
}

/* Once the source completed every device and nothing is missing any more (S3 included): take
 * authority if that waited for this, and acknowledge. 1 if this call acknowledged. */
static int finish(struct destination *d) {
        pthread_mutex_lock(&d->s3_lock);
        bool go = d->source_done && !d->acked;
        for (size_t i = 0; go && i < d->table.count; i++)
                go = waiting_cache_missing(d->devs[i]) == 0;
        if (go)
                d->acked = true;
        pthread_mutex_unlock(&d->s3_lock);
        if (!go)
                return 0;
        int r;
        if (d->authority_pending && !d->authority && (r = take_authority(d)) < 0)
                return r;
        if (!d->authority)
                return error_set(-EPROTO, "migration: completed without authority transfer");
        if ((r = send_event(d, MIGRATE_EVENT_COMPLETED_ACK)) < 0)
                return r;
        d->stats.completed = true;
        return 1;
}

static void s3_deliver(void *ctx, uint64_t object, const uint8_t *data, size_t len) {
        struct dest_s3 *s3 = ctx;
        struct destination *d = s3->d;
        struct block_device *dev = d->devs[s3->index];
        uint64_t first = object * s3->per, blocks = block_device_block_count(dev);
        for (uint64_t b = first; b < first + s3->per && b < blocks; b++) {
                size_t off = (size_t)(b - first) * dev->block_size;
                if (off >= len)
                        break;
                pthread_mutex_lock(&d->s3_lock);
                if (bitmap_test_and_clear(&s3->wanted, b)) {
                        bool zero = buffer_is_zero(data + off, block_device_block_length(dev, b));
                        int r = waiting_cache_supply(dev, b, data + off, WAITING_CACHE_IF_MISSING);
                        if (r > 0) {
                                __atomic_fetch_add(&d->stats.s3_blocks, 1, __ATOMIC_RELAXED);
                                if (d->cfg.on_blocks)
                                        d->cfg.on_blocks(d->cfg.ctx, s3->index, b, 1, zero, NULL);
                        }
                }
                pthread_mutex_unlock(&d->s3_lock);
        }
        __atomic_fetch_add(&d->stats.s3_bytes, len, __ATOMIC_RELAXED);
        /* The last object may be what the acknowledgement waited for: the receiving thread sleeps
         * in read(), so end its wait (it sees the end of the stream and that we acknowledged). */
        int r = finish(d);
        if (r > 0)
                shutdown(d->fd, SHUT_RD);
        else if (r < 0)
                log_error("%s", error_message());
}

/* Not from S3 after all: ask the source (it keeps every block until we acknowledge). */
static void s3_failed(void *ctx, uint64_t object) {
        struct dest_s3 *s3 = ctx;
        struct destination *d = s3->d;
        uint64_t first = object * s3->per, blocks = block_device_block_count(d->devs[s3->index]);
        uint64_t end = MIN(first + s3->per, blocks), asked = 0;
        pthread_mutex_lock(&d->s3_lock);
        bitmap_clear(&s3->current, object);
        for (uint64_t b = first; b < end; b++)
                asked += bitmap_test_and_clear(&s3->wanted, b);
        pthread_mutex_unlock(&d->s3_lock);
        if (!asked)
                return;
        __atomic_fetch_add(&d->stats.s3_fallback_blocks, asked, __ATOMIC_RELAXED);
        uint8_t p[12];
        if (send_frame(d, MIGRATE_NEED_AT, d->table.devices[s3->index].id, p,
                       migrate_encode_range(p, first, (uint32_t)(end - first))) < 0)
                log_error("migration: cannot ask the source for the blocks S3 did not give: %s", error_message());
}

static int handle(struct destination *d, const struct migrate_frame *f, const struct migrate_message *m) {
        struct block_device *dev = m->type >= MIGRATE_BLOCK && m->type <= MIGRATE_DIRTY ? d->devs[m->device] : NULL;
        int r = 0;
        if (d->authority && m->type >= MIGRATE_BLOCK && m->type <= MIGRATE_BLOCK_ZSTD)
                d->stats.postcopy_blocks += m->type == MIGRATE_BLOCK_ZERO ? m->range.count : 1;
        if (m->type == MIGRATE_BLOCK || m->type == MIGRATE_BLOCK_ZSTD)
                claim(d, m->device, m->block.block, 1);
        else if (m->type == MIGRATE_BLOCK_ZERO)
                claim(d, m->device, m->range.first, m->range.count);
        switch (m->type) {
        case MIGRATE_BLOCK:
                r = waiting_cache_supply(dev, m->block.block, m->block.data, supply_flags(d));
                d->stats.blocks_sent++; /* counted as received */
                notify_blocks(d, m->device, m->block.block, 1, r, false, m->block.data);
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
                notify_blocks(d, m->device, m->block.block, 1, r, false, d->block_buf);
                break;
        }
        case MIGRATE_BLOCK_ZERO:
                memset(d->block_buf, 0, dev->block_size);
                for (uint64_t b = m->range.first; b < m->range.first + m->range.count && r >= 0; b++) {
                        r = waiting_cache_supply(dev, b, d->block_buf, supply_flags(d));
                        d->stats.zero_blocks++;
                        notify_blocks(d, m->device, b, 1, r, true, NULL);
                }
                break;
        case MIGRATE_DIRTY:
                if (d->authority)
                        return error_set(-EPROTO, "migration: DIRTY after authority transfer");
                if (d->final[m->device])
                        return error_set(-EPROTO, "migration: DIRTY for device \"%s\" after its FINAL",
                                         d->table.devices[m->device].name);
                for (uint32_t i = 0; i < m->dirty.count; i++) {
                        uint64_t b;
                        memcpy(&b, m->dirty.blocks + 8 * i, 8);
                        claim(d, m->device, le64toh(b), 1);
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
                        if (d->cfg.on_barrier)
                                d->cfg.on_barrier(d->cfg.ctx);
                        r = send_event(d, MIGRATE_EVENT_BARRIER_ACK);
                        break;
                case MIGRATE_EVENT_AUTHORITY:
                        if (d->cfg.disable_postcopy)
                                d->authority_pending = true;
                        else
                                r = take_authority(d);
                        break;
                case MIGRATE_EVENT_FINAL:
                        if (d->authority || d->final[m->device])
                                return error_set(-EPROTO, "migration: FINAL for device \"%s\" %s",
                                                 d->table.devices[m->device].name,
                                                 d->authority ? "after authority transfer" : "twice");
                        if (waiting_cache_missing(d->devs[m->device]) > 0)
                                return error_set(-EPROTO, "migration: FINAL for device \"%s\" with %" PRIu64
                                                 " blocks still missing", d->table.devices[m->device].name,
                                                 waiting_cache_missing(d->devs[m->device]));
                        d->final[m->device] = true;
                        if (d->cfg.on_final)
                                d->cfg.on_final(d->cfg.ctx, m->device, d->table.devices[m->device].name);
                        break;
                case MIGRATE_EVENT_COMPLETED:
                        /* Never trust a completion that leaves holes (beyond blocks still coming
                         * from S3, or asked for after S3 failed: finish() waits for those). */
                        if (!(d->s3 && d->s3[m->device]) && waiting_cache_missing(d->devs[m->device]) > 0)
                                return error_set(-EPROTO, "migration: the source completed device \"%s\" with %" PRIu64
                                                 " blocks still missing", d->table.devices[m->device].name,
                                                 waiting_cache_missing(d->devs[m->device]));
                        if (!d->completed[m->device]) {
                                d->completed[m->device] = true;
                                d->completed_count++;
                        }
                        if (d->completed_count == d->table.count) {
                                pthread_mutex_lock(&d->s3_lock);
                                d->source_done = true;
                                pthread_mutex_unlock(&d->s3_lock);
                                return finish(d);
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
                claim(d, m.device, m.block.block, 1);
                r = migrate_reader_has_rest(rd)
                            ? waiting_cache_supply_direct(d->devs[m.device], m.block.block, 0, fill_from_stream, rd)
                            : -EOPNOTSUPP;
                if (r != -EOPNOTSUPP) {
                        d->stats.blocks_sent++; /* counted as received */
                        notify_blocks(d, m.device, m.block.block, 1, r, false, NULL);
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
                if (r == 0 && d->any_s3 && __atomic_load_n(&d->source_done, __ATOMIC_ACQUIRE))
                        r = finish(d);
                if (r != 0)
                        break;
        }
        /* An S3 download acknowledged the end and shut our reading side. */
        pthread_mutex_lock(&d->s3_lock);
        if (r < 0 && d->acked)
                r = 1;
        pthread_mutex_unlock(&d->s3_lock);
        for (size_t i = 0; d->s3 && i < d->table.count; i++)
                if (d->s3[i])
                        s3_fetch_stop(d->s3[i]->fetch);
        free(buf);
        if (__atomic_load_n(&d->aborted, __ATOMIC_ACQUIRE))
                r = error_set(-EINTR, "migration: interrupted here before the hand-over (the source keeps the devices)");
        else if (r == -ECONNRESET)
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

static void free_s3(struct dest_s3 *s3) {
        if (!s3)
                return;
        s3_fetch_free(s3->fetch);
        s3_client_free(s3->client);
        bitmap_free(&s3->wanted);
        bitmap_free(&s3->current);
        free(s3);
}

/* The S3 frame of device i (DEVICES said one follows). */
static int read_s3(struct destination *d, size_t i, uint8_t **buf, size_t *cap) {
        struct migrate_frame f;
        struct migrate_message m;
        int r = migrate_read_frame(d->fd, buf, cap, &f);
        if (r < 0)
                return r;
        if (f.type != MIGRATE_S3)
                return error_set(-EPROTO, "migration: expected the S3 frame of device \"%s\", got frame type %u",
                                 d->table.devices[i].name, f.type);
        if ((r = migrate_frame_parse(&f, &d->table, true, &m)) < 0)
                return r;
        if (m.device != i)
                return error_set(-EPROTO, "migration: S3 frames out of order");
        if (!s3_valid_prefix(m.s3.prefix))
                return error_set(-EBADMSG, "migration: S3 key prefix \"%s\" of device \"%s\" is not valid", m.s3.prefix,
                                 d->table.devices[i].name);
        struct dest_s3 *s3 = calloc(1, sizeof(*s3));
        if (!s3)
                return -ENOMEM;
        d->s3[i] = s3;
        s3->d = d;
        s3->index = i;
        s3->info = m.s3;
        s3->info.bitmap = NULL;
        s3->per = m.s3.object_size / d->table.devices[i].block_size;
        uint64_t blocks = (d->table.devices[i].size + d->table.devices[i].block_size - 1) / d->table.devices[i].block_size;
        if (bitmap_init(&s3->current, m.s3.objects) < 0 || bitmap_init(&s3->wanted, blocks) < 0)
                return -ENOMEM;
        for (uint64_t o = 0; o < m.s3.objects; o++)
                if (m.s3.bitmap[o / 8] & (1u << (o % 8))) {
                        bitmap_set(&s3->current, o);
                        bitmap_set_range(&s3->wanted, o * s3->per, MIN(s3->per, blocks - o * s3->per));
                }
        struct s3_config c = {.endpoint = m.s3.endpoint, .bucket = m.s3.bucket, .access_key = m.s3.access_key,
                              .secret_key = m.s3.secret_key, .secure = m.s3.secure};
        if ((r = s3_client_new(&c, &s3->client)) < 0)
                return error_prefix(r, "migration: device \"%s\"", d->table.devices[i].name);
        d->any_s3 = true;
        log_debug("migration: device \"%s\": %" PRIu64 " of %" PRIu64 " objects from S3 bucket \"%s\" at %s",
                  d->table.devices[i].name, bitmap_count(&s3->current), m.s3.objects, m.s3.bucket, m.s3.endpoint);
        return 0;
}

/* After the devices are open: start the downloads. */
static int start_s3(struct destination *d) {
        for (size_t i = 0; i < d->table.count; i++) {
                struct dest_s3 *s3 = d->s3[i];
                if (!s3)
                        continue;
                struct s3_fetch_options o = {.client = s3->client,
                                             .prefix = s3->info.prefix,
                                             .device = d->table.devices[i].name,
                                             .size = d->table.devices[i].size,
                                             .object_size = s3->info.object_size,
                                             .concurrency = s3->info.concurrency,
                                             .objects = &s3->current,
                                             .deliver = s3_deliver,
                                             .failed = s3_failed,
                                             .ctx = s3};
                int r = s3_fetch_start(&o, &s3->fetch);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int handshake(struct destination *d) {
        _cleanup_free_ uint8_t *buf = NULL;
        size_t cap = 0;
        struct migrate_frame f;
        struct migrate_message m;
        uint8_t p[20];
        int r = send_frame(d, MIGRATE_HELLO, MIGRATE_CONNECTION, p,
                           migrate_encode_hello(p, MIGRATE_ROLE_DESTINATION,
                                                MIGRATE_CAP_ZERO_RUNS | MIGRATE_CAP_ZSTD | MIGRATE_CAP_BARRIER |
                                                        MIGRATE_CAP_S3 | MIGRATE_CAP_FINAL |
                                                        (d->cfg.announce_ready ? MIGRATE_CAP_READY : 0)));
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
        d->lazy = m.hello.capabilities & MIGRATE_CAP_LAZY;
        d->send_ready = d->cfg.announce_ready && (m.hello.capabilities & MIGRATE_CAP_READY);
        if ((r = migrate_read_frame(d->fd, &buf, &cap, &f)) < 0)
                return r;
        if (f.type != MIGRATE_DEVICES)
                return error_set(-EPROTO, "migration: expected DEVICES from the source, got frame type %u", f.type);
        if ((r = migrate_devices_decode(&f, &d->table)) < 0)
                return r;

        size_t n = d->table.count;
        uint32_t max_block = 0;
        d->s3 = calloc(n ? n : 1, sizeof(*d->s3));
        if (!d->s3)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++)
                if ((d->table.devices[i].flags & MIGRATE_DEVICE_S3) && (r = read_s3(d, i, &buf, &cap)) < 0)
                        return r;
        d->devs = calloc(n ? n : 1, sizeof(*d->devs));
        d->need_ctx = calloc(n ? n : 1, sizeof(*d->need_ctx));
        d->completed = calloc(n ? n : 1, sizeof(bool));
        d->final = calloc(n ? n : 1, sizeof(bool));
        d->taken = calloc(n ? n : 1, sizeof(bool));
        if (!d->devs || !d->need_ctx || !d->completed || !d->final || !d->taken)
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
        if ((r = start_s3(d)) < 0)
                return r;
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
        /* Downloads write into the devices: they stop first. */
        for (size_t i = 0; d->s3 && i < d->table.count; i++)
                if (d->s3[i])
                        s3_fetch_stop(d->s3[i]->fetch);
        for (size_t i = 0; d->devs && i < d->table.count; i++)
                if (!d->taken[i])
                        block_device_close(d->devs[i]);
        for (size_t i = 0; d->s3 && i < d->table.count; i++)
                free_s3(d->s3[i]);
        free(d->s3);
        pthread_mutex_destroy(&d->s3_lock);
        free(d->devs);
        free(d->taken);
        free(d->need_ctx);
        free(d->completed);
        free(d->final);
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
        pthread_mutex_init(&d->s3_lock, NULL);
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

const struct migrate_s3_info *migrate_destination_s3(struct migrate_destination *dest, size_t i,
                                                     const struct bitmap **ret_current) {
        struct destination *d = (struct destination *)dest;
        if (i >= d->table.count || !d->s3 || !d->s3[i])
                return NULL;
        if (ret_current)
                *ret_current = &d->s3[i]->current;
        return &d->s3[i]->info;
}

bool migrate_destination_lazy(const struct migrate_destination *dest) {
        return ((const struct destination *)dest)->lazy;
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

int migrate_destination_abort(struct migrate_destination *dest) {
        struct destination *d = (struct destination *)dest;
        pthread_mutex_lock(&d->write_lock);
        if (d->authority) {
                pthread_mutex_unlock(&d->write_lock);
                return -EBUSY;
        }
        __atomic_store_n(&d->aborted, true, __ATOMIC_RELEASE);
        uint8_t p[6 + MIGRATE_MAX_MESSAGE];
        const char *why = "destination: interrupted before the hand-over";
        send_frame_locked(d, MIGRATE_ERROR, MIGRATE_CONNECTION, p, migrate_encode_error(p, -EINTR, why));
        pthread_mutex_unlock(&d->write_lock);
        shutdown(d->fd, SHUT_RDWR); /* the receiving thread ends, and with it the migration */
        return 0;
}

int migrate_destination_ready(struct migrate_destination *dest) {
        struct destination *d = (struct destination *)dest;
        pthread_mutex_lock(&d->write_lock);
        int r = 0;
        if (d->send_ready && !d->ready_sent && !__atomic_load_n(&d->aborted, __ATOMIC_ACQUIRE)) {
                uint8_t p[2];
                r = send_frame_locked(d, MIGRATE_EVENT, MIGRATE_CONNECTION, p, migrate_encode_event(p, MIGRATE_EVENT_READY));
                d->ready_sent = r >= 0;
        }
        pthread_mutex_unlock(&d->write_lock);
        return r;
}
