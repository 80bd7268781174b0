/* source.c — the sending side of a device migration (see migrate.h, docs/protocol.md). */
#include "drafter/migrate.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/log.h"
#include "drafter/s3_sync.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <linux/tcp.h>
#include <math.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zstd.h>

static bool set_policy(pid_t tid, int policy) {
        struct sched_param sp = {0};
        if (sched_setscheduler(tid, policy, &sp) < 0) {
                log_debug("migration: scheduling policy %d for thread %d: %m", policy, (int)tid);
                return false;
        }
        return true;
}

struct need {
        size_t device;
        uint64_t first;
        uint32_t count;
};

/* While the VM is paused: no zstd above this link rate (bytes/s; zstd -1 compresses a few
 * hundred MB/s on one core); a final push (push_budget_ns) may always be this large. */
#define MIGRATE_RAW_RATE       200e6
#define MIGRATE_PUSH_MIN_BYTES (2u << 20)

struct source {
        int fd;
        const struct migrate_source_config *cfg;
        struct migrate_device_table table;
        uint64_t caps;
        pthread_t reader;
        bool reader_running;
        pthread_mutex_t lock;
        pthread_cond_t changed;
        struct need *needs;
        size_t need_head, need_count, need_cap;
        bool authority_ack, completed_ack, reader_done, barrier_ack, peer_ready;
        bool authority_sent; /* the AUTHORITY frame was written whole: the destination may act on it */
        bool refused;        /* an ERROR came from the destination before any AUTHORITY_ACK */
        int peer_error;
        char peer_message[MIGRATE_MAX_MESSAGE + 64];
        struct bitmap *sent;    /* per device: sent at least once */
        struct bitmap *pending; /* per device: in the final set, not yet sent */
        struct bitmap *s3left;  /* per device: left to S3 (blocks of its current objects), not sent; nbits 0: none */
        bool *s3_paused;        /* per device: we paused its sync */
        bool any_s3;
        /* Blocks queued for one sendmsg: each frame is a header (+ index or range) and maybe data,
         * straight from the device's memory or from the slot's buffer. */
        struct slot {
                uint8_t head[MIGRATE_HEADER_SIZE + 12];
                uint8_t *buf; /* block or compressed data; allocated when first needed */
        } *slots;
        size_t slot_count, queued;
        struct iovec *iov;
        int iov_count;
        size_t buf_cap, zstd_cap;
        ZSTD_CCtx *cctx;
        bool raw_only;          /* no compression: the VM is paused and the link outruns zstd */
        double link_rate;       /* note_rate(): wire bytes/s */
        double data_rate;       /* note_rate(): block bytes/s (data blocks, before compression) */
        uint64_t data_bytes;    /* block bytes of the data blocks queued so far */
        uint64_t suspend_started_ns;
        uint64_t last_need_ns;       /* when the reader last queued a NEED_AT */
        /* After the hand-over the sending thread (sender_tid) pushes at idle priority, and runs at
         * its own while NEED_AT requests wait (boosted): see idle_push(). */
        pid_t sender_tid;
        bool push_idle, boosted;
        uint64_t last_background_ns; /* lazy: when a block nobody asked for last went out */
        unsigned compress_skip; /* blocks to send raw before trying zstd again */
        unsigned compress_misses;
        uint64_t write_ns; /* spent in socket writes of blocks */
        struct zstd_choice {
                bool on;                  /* compress the blocks of this window */
                bool no_tcp_info;         /* not a TCP socket (TLS goes through a socketpair): always on */
                uint64_t bytes, wire, ns; /* this window: block bytes, their bytes on the wire, ns spent
                                           * on them outside socket writes */
                double cpu[2];            /* block bytes per ns we produce, raw and compressed; 0: unknown */
                double ratio;             /* wire bytes per block byte, compressed */
                double link;              /* wire bytes per ns the link takes when it is the bottleneck;
                                           * 0: it was not, last we saw */
                unsigned windows;
        } zstd;
        struct migrate_stats stats;
};

static int peer_failed(struct source *s);

static int write_failed(struct source *s, int r) {
        if (r == -EPIPE || r == -ECONNRESET) {
                /* The reader may know why (an ERROR frame); otherwise say what happened. */
                int why = peer_failed(s);
                return why < 0 ? why : error_set(r, "destination: connection lost (%s)", strerror(-r));
        }
        return r;
}

/* Write every queued block frame in one go. */
static int flush_blocks(struct source *s) {
        if (s->queued == 0)
                return 0;
        for (int i = 0; i < s->iov_count; i++)
                s->stats.bytes_sent += s->iov[i].iov_len;
        uint64_t t0 = clock_now_ns();
        int r = io_write_iov(s->fd, s->iov, s->iov_count);
        s->write_ns += clock_now_ns() - t0;
        s->queued = 0;
        s->iov_count = 0;
        return r < 0 ? write_failed(s, error_set_errno(r, "migration: write")) : 0;
}

static int send_frame(struct source *s, uint8_t type, uint16_t device, const struct iovec *iov, int count) {
        int r = flush_blocks(s);
        if (r < 0)
                return r;
        r = migrate_write_frame(s->fd, type, 0, device, iov, count);
        if (r < 0)
                return write_failed(s, r);
        s->stats.bytes_sent += MIGRATE_HEADER_SIZE;
        for (int i = 0; i < count; i++)
                s->stats.bytes_sent += iov[i].iov_len;
        return r;
}

/* Queue a frame of `prefix` bytes already in slot->head after the header, and `len` bytes at data. */
static int queue_frame(struct source *s, struct slot *slot, uint8_t type, uint16_t device, size_t prefix,
                       const void *data, size_t len) {
        migrate_header_encode(slot->head, type, 0, device, (uint32_t)(prefix + len));
        s->iov[s->iov_count++] = (struct iovec){slot->head, MIGRATE_HEADER_SIZE + prefix};
        if (len)
                s->iov[s->iov_count++] = (struct iovec){(void *)data, len};
        if (++s->queued == s->slot_count)
                return flush_blocks(s);
        return 0;
}

static int send_event(struct source *s, uint16_t device, enum migrate_event event) {
        uint8_t p[2];
        struct iovec iov = {p, migrate_encode_event(p, event)};
        return send_frame(s, MIGRATE_EVENT, device, &iov, 1);
}

/* The peer's error, if it sent one (or the reader failed), as our error. */
static int peer_failed(struct source *s) {
        pthread_mutex_lock(&s->lock);
        int r = s->peer_error;
        char msg[sizeof(s->peer_message)];
        memcpy(msg, s->peer_message, sizeof(msg));
        pthread_mutex_unlock(&s->lock);
        return r ? error_set(r, "%s", msg) : 0;
}

static void *reader_thread(void *arg) {
        struct source *s = arg;
        uint8_t *buf = NULL;
        size_t cap = 0;
        for (;;) {
                struct migrate_frame f;
                struct migrate_message m;
                int r = migrate_read_frame(s->fd, &buf, &cap, &f);
                if (r >= 0)
                        r = migrate_frame_parse(&f, &s->table, false, &m);
                pthread_mutex_lock(&s->lock);
                if (r < 0) {
                        if (!s->peer_error) {
                                s->peer_error = r;
                                snprintf(s->peer_message, sizeof(s->peer_message), "destination: %s", error_message());
                        }
                        s->reader_done = true;
                        pthread_cond_broadcast(&s->changed);
                        pthread_mutex_unlock(&s->lock);
                        break;
                }
                s->stats.bytes_received += MIGRATE_HEADER_SIZE + f.length;
                if (m.type == MIGRATE_NEED_AT) {
                        if (s->need_count == s->need_cap) {
                                size_t ncap = s->need_cap ? 2 * s->need_cap : 64;
                                struct need *grown = malloc(ncap * sizeof(*grown));
                                if (grown) {
                                        for (size_t i = 0; i < s->need_count; i++)
                                                grown[i] = s->needs[(s->need_head + i) % s->need_cap];
                                        free(s->needs);
                                        s->needs = grown;
                                        s->need_head = 0;
                                        s->need_cap = ncap;
                                }
                        }
                        if (s->need_count < s->need_cap) {
                                s->needs[(s->need_head + s->need_count) % s->need_cap] =
                                        (struct need){m.device, m.range.first, m.range.count};
                                s->need_count++;
                                s->last_need_ns = clock_now_ns();
                                if (s->push_idle && !s->boosted)
                                        s->boosted = set_policy(s->sender_tid, SCHED_OTHER);
                                if (s->cfg->demand_group)
                                        __atomic_store_n(s->cfg->demand_group, s->last_need_ns, __ATOMIC_RELAXED);
                        }
                } else if (m.type == MIGRATE_DONT_NEED_AT) {
                        for (uint64_t b = m.range.first; b < m.range.first + m.range.count; b++)
                                bitmap_clear(&s->pending[m.device], b);
                } else if (m.type == MIGRATE_EVENT && m.event == MIGRATE_EVENT_AUTHORITY_ACK) {
                        s->authority_ack = true;
                } else if (m.type == MIGRATE_EVENT && m.event == MIGRATE_EVENT_BARRIER_ACK) {
                        s->barrier_ack = true;
                } else if (m.type == MIGRATE_EVENT && m.event == MIGRATE_EVENT_READY) {
                        s->peer_ready = true;
                } else if (m.type == MIGRATE_EVENT && m.event == MIGRATE_EVENT_COMPLETED_ACK) {
                        if (!s->authority_ack) {
                                s->peer_error = -EPROTO;
                                snprintf(s->peer_message, sizeof(s->peer_message),
                                         "destination: acknowledged completion before taking authority");
                        }
                        s->completed_ack = true;
                } else if (m.type == MIGRATE_ERROR) {
                        s->refused = !s->authority_ack;
                        s->peer_error = m.error.err < 0 ? m.error.err : -EPROTO;
                        snprintf(s->peer_message, sizeof(s->peer_message), "destination: %s", m.error.message);
                } else {
                        s->peer_error = -EPROTO;
                        snprintf(s->peer_message, sizeof(s->peer_message),
                                 "destination: unexpected frame type %u", f.type);
                }
                bool stop = s->peer_error || s->completed_ack;
                if (stop)
                        s->reader_done = true; /* whoever waits must not wait for us any more */
                pthread_cond_broadcast(&s->changed);
                pthread_mutex_unlock(&s->lock);
                if (stop)
                        break;
        }
        free(buf);
        return NULL;
}

/*
 * zstd pays only where the link, not the CPU, is the bottleneck: over loopback or a fast link on
 * a busy host it cuts the rate several times (and the destination decompresses too). So the
 * sender times what it takes to produce blocks each way (read, compress, queue; not the socket
 * writes), in windows of a few MiB, and asks TCP whether the link held it back (TCP_INFO: the
 * delivery rate, unless the application, us, was the limit). Compressed blocks that still fill
 * the link beat raw ones, and raw blocks that do not fill it beat compressed ones (compression
 * only adds work); in between, each way's rate is the lesser of ours and the link's (for zstd,
 * the link's over the compression ratio) and the faster is used. The first window is
 * compressed. Timing the whole round trip instead misleads: socket buffers of several MiB
 * absorb a window, and probing the other way now and then costs more than it finds.
 */
#define ZSTD_WINDOW_BYTES (4u << 20)

static double mean_in(double seen, double now) {
        return seen > 0 ? (seen + now) / 2 : now;
}

static void zstd_choice_window(struct zstd_choice *z, int fd) {
        z->cpu[z->on] = mean_in(z->cpu[z->on], (double)z->bytes / (double)MAX(z->ns, 1));
        if (z->on)
                z->ratio = mean_in(z->ratio, (double)z->wire / (double)z->bytes);
        z->bytes = z->wire = z->ns = 0;
        z->windows++;
        struct tcp_info ti = {0};
        socklen_t len = sizeof(ti);
        if (getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) < 0 ||
            len < offsetof(struct tcp_info, tcpi_delivery_rate) + sizeof(ti.tcpi_delivery_rate)) {
                z->no_tcp_info = z->on = true;
                return;
        }
        bool link_bound = !ti.tcpi_delivery_rate_app_limited && ti.tcpi_delivery_rate > 0;
        if (link_bound)
                z->link = (double)ti.tcpi_delivery_rate / 1e9;
        else if (!z->on)
                z->link = 0; /* raw blocks did not fill it: not the bottleneck now */
        if (z->on == link_bound)
                return; /* settled, see above */
        /* Compressed blocks left the link idle, or raw ones filled it: which way is faster? A way
         * not timed yet is worth a window. */
        double raw = z->cpu[0] == 0 ? INFINITY : z->link > 0 ? MIN(z->cpu[0], z->link) : z->cpu[0];
        double zstd = z->cpu[1] == 0 ? INFINITY
                      : z->link > 0  ? MIN(z->cpu[1], z->link / MAX(z->ratio, 1e-3))
                                     : z->cpu[1];
        z->on = zstd > raw;
}

static void zstd_choice_note(struct source *s, size_t len, uint64_t ns) {
        struct zstd_choice *z = &s->zstd;
        if (z->no_tcp_info)
                return;
        z->bytes += len;
        z->ns += ns;
        if (z->bytes >= ZSTD_WINDOW_BYTES)
                zstd_choice_window(z, s->fd);
}

/* A data block in its smaller form: compressed when that is chosen and pays. */
static int queue_data_block(struct source *s, struct slot *slot, uint16_t id, const uint8_t *data, size_t len) {
        /* Compression costs more than it saves on incompressible data: after misses in a row,
         * try again only every so often (backing off up to every 64th block). A block read into
         * the slot's buffer is compressed from it into the same buffer's second half. */
        s->data_bytes += len; /* either way */
        bool try_zstd = s->cctx && !s->raw_only && s->zstd.on;
        if (try_zstd && s->compress_skip > 0) {
                s->compress_skip--;
        } else if (try_zstd) {
                uint8_t *out = data == slot->buf ? slot->buf + len : slot->buf;
                size_t cap = data == slot->buf ? s->buf_cap - len : s->buf_cap;
                size_t n = ZSTD_compressCCtx(s->cctx, out, cap, data, len, 1);
                if (!ZSTD_isError(n) && n < len - len / 8) {
                        s->compress_misses = 0;
                        s->stats.compressed_blocks++;
                        s->zstd.wire += n;
                        return queue_frame(s, slot, MIGRATE_BLOCK_ZSTD, id, 8, out, n);
                }
                s->compress_misses = MIN(s->compress_misses + 1, 6u);
                s->compress_skip = (1u << s->compress_misses) - 1;
        }
        s->zstd.wire += len;
        return queue_frame(s, slot, MIGRATE_BLOCK, id, 8, data, len);
}

/* Queue one block in its smallest form, starting its dirty tracking as it is read. */
static int send_block(struct source *s, size_t di, uint64_t block) {
        const struct migrate_source_device *sd = &s->cfg->devices[di];
        struct block_device *dev = sd->dev;
        struct slot *slot = &s->slots[s->queued];
        size_t len = block_device_block_length(dev, block);
        uint64_t off = block * dev->block_size, t0 = clock_now_ns(), written = s->write_ns;
        /* Straight from the device's memory when it has some (no copy), else through a read. */
        const uint8_t *data = dirty_tracker_inner(dev) ? dirty_tracker_map_tracked(dev, len, off)
                                                       : block_device_map(dev, len, off);
        if (!slot->buf && (!data || s->cctx) && !(slot->buf = malloc(s->buf_cap)))
                return error_set(-ENOMEM, "migration: no memory for a send buffer");
        if (!data) {
                int r = dirty_tracker_inner(dev) ? dirty_tracker_read_tracked(dev, slot->buf, len, off)
                                                 : block_device_read_at(dev, slot->buf, len, off);
                if (r < 0)
                        return r;
                data = slot->buf;
        }
        bitmap_set(&s->sent[di], block);
        s->stats.blocks_sent++;
        uint16_t id = s->table.devices[di].id;
        uint8_t *prefix = slot->head + MIGRATE_HEADER_SIZE;
        if ((s->caps & MIGRATE_CAP_ZERO_RUNS) && buffer_is_zero(data, len)) {
                s->stats.zero_blocks++;
                return queue_frame(s, slot, MIGRATE_BLOCK_ZERO, id, migrate_encode_range(prefix, block, 1), NULL, 0);
        }
        migrate_encode_block_index(prefix, block);
        int r = queue_data_block(s, slot, id, data, len);
        if (s->cctx && !s->raw_only)
                zstd_choice_note(s, len, clock_now_ns() - t0 - (s->write_ns - written));
        return r;
}

/* After the hand-over the rest of the final set goes out on idle CPUs only: the destination's
 * state load and first steps come first, and they ask for what they touch (NEED_AT), which is
 * sent at the thread's own priority. On this host (a local migration, the benchmark) that kept
 * the push from taking a CPU of two from the load; elsewhere it costs nothing when the CPUs are
 * free. Undone when migrate_source_run() returns. */
static void idle_push(struct source *s) {
        pthread_mutex_lock(&s->lock);
        s->sender_tid = gettid();
        s->push_idle = set_policy(0, SCHED_IDLE);
        pthread_mutex_unlock(&s->lock);
}

/* Serve the destination's NEED_AT requests. In post-copy only blocks still pending are sent
 * (the others are on their way or there). */
static int serve_needs(struct source *s, bool postcopy) {
        for (bool served = false;; served = true) {
                pthread_mutex_lock(&s->lock);
                if (s->need_count == 0) {
                        bool unboost = s->boosted;
                        s->boosted = false;
                        pthread_mutex_unlock(&s->lock);
                        /* A reader waits for these: out now, not when the batch fills. */
                        int r = served ? flush_blocks(s) : 0;
                        if (unboost)
                                set_policy(0, SCHED_IDLE);
                        return r < 0 ? r : peer_failed(s);
                }
                struct need n = s->needs[s->need_head];
                s->need_head = (s->need_head + 1) % s->need_cap;
                s->need_count--;
                pthread_mutex_unlock(&s->lock);
                struct bitmap *s3 = &s->s3left[n.device];
                for (uint64_t b = n.first; b < n.first + n.count; b++) {
                        /* After the hand-over: what is still ours to send (the final set, or
                         * blocks left to S3 that the destination could not get from there). */
                        bool left_to_s3 = s3->nbits && bitmap_test_and_clear(s3, b);
                        if (postcopy && !bitmap_test_and_clear(&s->pending[n.device], b) && !left_to_s3)
                                continue;
                        int r = send_block(s, n.device, b);
                        if (r < 0)
                                return r;
                        s->stats.need_at_served++;
                }
        }
}

static bool device_skips(struct source *s, size_t di, uint64_t block) {
        const struct migrate_source_device *sd = &s->cfg->devices[di];
        return (sd->only && !bitmap_test(sd->only, block)) || (s->s3left[di].nbits && bitmap_test(&s->s3left[di], block));
}

static int bulk(struct source *s) {
        for (size_t di = 0; di < s->cfg->count; di++) {
                const struct migrate_source_device *sd = &s->cfg->devices[di];
                uint64_t blocks = block_device_block_count(sd->dev), done = 0, step = blocks / 10 ? blocks / 10 : 1;
                uint64_t index = 0;
                for (;;) {
                        uint64_t block;
                        if (sd->vm) {
                                if (volatility_monitor_pop_least(sd->vm, clock_now_ns(), &block) < 0)
                                        break;
                        } else {
                                if (index >= blocks)
                                        break;
                                block = index++;
                        }
                        done++;
                        if ((done & 31) == 0) {
                                int r = serve_needs(s, false);
                                if (r < 0)
                                        return r;
                        }
                        if (bitmap_test(&s->sent[di], block) || device_skips(s, di, block))
                                continue;
                        int r = send_block(s, di, block);
                        if (r < 0)
                                return r;
                        if (s->cfg->progress && done % step == 0)
                                log_info("Migrated %" PRIu64 " of %" PRIu64 " initial blocks for local device %zu",
                                         done, blocks, di);
                }
                if (s->cfg->progress)
                        log_info("Migrated %" PRIu64 " of %" PRIu64 " initial blocks for local device %zu", blocks,
                                 blocks, di);
                int r = send_event(s, s->table.devices[di].id, MIGRATE_EVENT_BULK_DONE);
                if (r < 0)
                        return r;
        }
        return serve_needs(s, false);
}

static int collect(struct source *s, size_t di, uint64_t **ret_blocks, size_t *ret_count) {
        const struct migrate_source_device *sd = &s->cfg->devices[di];
        if (!dirty_tracker_inner(sd->dev)) {
                *ret_blocks = NULL;
                *ret_count = 0;
                return 0;
        }
        int r = dirty_tracker_collect(sd->dev, ret_blocks, ret_count);
        if (r >= 0 && sd->vm)
                r = volatility_monitor_sort(sd->vm, *ret_blocks, *ret_count, clock_now_ns());
        return r;
}

static bool precopy_enabled(const struct migrate_source_device *sd) {
        return sd->max_dirty_blocks || sd->min_cycles || sd->max_cycles || sd->cycle_throttle_ns;
}

/* The link's rate as a stretch of sending showed it (bytes/s): the best seen, from stretches
 * long enough to mean something, in wire bytes and in the data blocks' own bytes (higher when
 * they went compressed: what a final push of blocks gets through). The bulk pass alone says
 * little: mostly zero runs. */
static void note_rate(struct source *s, uint64_t wire, uint64_t data, uint64_t ns) {
        if (wire >= (1u << 20) && ns > 0)
                s->link_rate = MAX(s->link_rate, wire * 1e9 / ns);
        if (data >= (1u << 20) && ns > 0)
                s->data_rate = MAX(s->data_rate, data * 1e9 / ns);
}

/* Pre-copy cycles. A device that has converged keeps its dirty blocks for the final phase. */
static int cycles(struct source *s) {
        size_t n = s->cfg->count;
        _cleanup_free_ bool *converged = calloc(n ? n : 1, sizeof(bool));
        if (!converged)
                return -ENOMEM;
        for (size_t di = 0; di < n; di++)
                converged[di] = !precopy_enabled(&s->cfg->devices[di]);
        for (int64_t cycle = 0;; cycle++) {
                bool all = true;
                int64_t throttle = 0;
                for (size_t di = 0; di < n; di++) {
                        all &= converged[di];
                        if (!converged[di])
                                throttle = MAX(throttle, s->cfg->devices[di].cycle_throttle_ns);
                }
                if (all)
                        return 0;
                /* Wait out the throttle, answering NEED_AT meanwhile. */
                uint64_t until = clock_now_ns() + (uint64_t)throttle;
                do {
                        int r = serve_needs(s, false);
                        if (r < 0)
                                return r;
                        pthread_mutex_lock(&s->lock);
                        uint64_t now = clock_now_ns();
                        if (s->need_count == 0 && !s->peer_error && now < until) {
                                /* `now` read once: MIN evaluates its arguments twice, and a clock
                                 * read past `until` there made a wait of 2^64 ns (a hung source). */
                                struct timespec ts;
                                clock_deadline_after(MIN(until - now, 5 * NSEC_PER_MSEC), &ts);
                                pthread_cond_timedwait(&s->changed, &s->lock, &ts);
                        }
                        pthread_mutex_unlock(&s->lock);
                } while (clock_now_ns() < until);
                if (s->cfg->before_collect) {
                        int r = s->cfg->before_collect(s->cfg->ctx);
                        if (r < 0)
                                return r;
                }
                s->stats.cycles++;
                for (size_t di = 0; di < n; di++) {
                        if (converged[di])
                                continue;
                        const struct migrate_source_device *sd = &s->cfg->devices[di];
                        uint64_t *blocks;
                        size_t count;
                        int r = collect(s, di, &blocks, &count);
                        if (r < 0)
                                return r;
                        bool done = (cycle + 1 >= sd->min_cycles && (int64_t)count <= sd->max_dirty_blocks) ||
                                    cycle + 1 >= sd->max_cycles;
                        uint64_t t = clock_now_ns(), bytes = s->stats.bytes_sent, data = s->data_bytes;
                        for (size_t i = 0; i < count && r >= 0; i++) {
                                if (done)
                                        bitmap_set(&s->pending[di], blocks[i]); /* kept for the final phase */
                                else
                                        r = send_block(s, di, blocks[i]);
                        }
                        if (r >= 0 && !done && (r = flush_blocks(s)) >= 0)
                                note_rate(s, s->stats.bytes_sent - bytes, s->data_bytes - data, clock_now_ns() - t);
                        log_debug("migration: device %zu cycle %" PRId64 ": %zu dirty blocks%s", di, cycle + 1, count,
                                  done ? ", converged" : "");
                        free(blocks);
                        if (r < 0)
                                return r;
                        converged[di] = done;
                }
        }
}

static int send_dirty_list(struct source *s, size_t di) {
        const struct bitmap *p = &s->pending[di];
        uint16_t id = s->table.devices[di].id;
        enum { CHUNK = 65536 };
        _cleanup_free_ uint8_t *buf = malloc(4 + 8 * CHUNK);
        if (!buf)
                return -ENOMEM;
        uint32_t n = 0;
        for (uint64_t b = bitmap_next_set(p, 0);; b = bitmap_next_set(p, b + 1)) {
                bool end = b >= p->nbits;
                if (!end)
                        migrate_encode_block_index(buf + 4 + 8 * n++, b);
                if (n == CHUNK || (end && n > 0)) {
                        uint32_t le = htole32(n);
                        memcpy(buf, &le, 4);
                        struct iovec iov = {buf, 4 + 8 * (size_t)n};
                        int r = send_frame(s, MIGRATE_DIRTY, id, &iov, 1);
                        if (r < 0)
                                return r;
                        n = 0;
                }
                if (end)
                        return 0;
        }
}

/* Wait until the reader sets *flag (or the peer fails). With `serve`, answer NEED_AT meanwhile
 * (before the hand-over a reader on the destination may be waiting for a block). */
static int wait_for(struct source *s, bool *flag, bool serve) {
        int r = flush_blocks(s);
        if (r < 0)
                return r;
        for (;;) {
                if (serve && (r = serve_needs(s, false)) < 0)
                        return r;
                pthread_mutex_lock(&s->lock);
                if (!serve) {
                        while (!*flag && !s->peer_error && !s->reader_done)
                                pthread_cond_wait(&s->changed, &s->lock);
                } else if (!*flag && !s->peer_error && !s->reader_done && s->need_count == 0) {
                        struct timespec ts;
                        clock_deadline_after(5 * NSEC_PER_MSEC, &ts);
                        pthread_cond_timedwait(&s->changed, &s->lock, &ts);
                }
                bool ok = *flag, failed = s->peer_error || s->reader_done;
                pthread_mutex_unlock(&s->lock);
                if (ok)
                        return 0;
                if (failed)
                        break;
        }
        r = peer_failed(s);
        return r < 0 ? r : error_set(-ECONNRESET, "destination: connection closed");
}

/* BARRIER, and wait for its acknowledgement. */
static int barrier(struct source *s) {
        int r = send_event(s, MIGRATE_CONNECTION, MIGRATE_EVENT_BARRIER);
        return r < 0 ? r : wait_for(s, &s->barrier_ack, true);
}

/* Devices kept in S3: pause the sync (no upload in flight after this), track every write from now
 * on, and take the sync's current objects: their blocks are left to S3. */
static int prepare_s3(struct source *s) {
        if (!(s->caps & MIGRATE_CAP_S3) || s->cfg->lazy)
                return 0;
        for (size_t di = 0; di < s->cfg->count; di++) {
                const struct migrate_source_device *sd = &s->cfg->devices[di];
                if (!sd->s3 || !sd->s3->sync || sd->only || !dirty_tracker_inner(sd->dev))
                        continue;
                uint64_t objects = s3_object_count(sd->dev->size, sd->s3->info.object_size);
                _cleanup_(bitmap_free) struct bitmap current = {0};
                if (bitmap_init(&current, objects) < 0 || bitmap_init(&s->s3left[di], block_device_block_count(sd->dev)) < 0)
                        return -ENOMEM;
                dirty_tracker_track_all(sd->dev);
                s3_sync_pause(sd->s3->sync);
                s->s3_paused[di] = true;
                int r = s3_sync_snapshot(sd->s3->sync, &current);
                if (r < 0)
                        return r;
                uint64_t per = sd->s3->info.object_size / sd->dev->block_size, blocks = s->s3left[di].nbits;
                for (uint64_t o = bitmap_next_set(&current, 0); o < objects; o = bitmap_next_set(&current, o + 1))
                        bitmap_set_range(&s->s3left[di], o * per, MIN(per, blocks - o * per));
                s->table.devices[di].flags |= MIGRATE_DEVICE_S3;
                s->stats.s3_blocks += bitmap_count(&s->s3left[di]);
                s->any_s3 = true;
                log_debug("migration: device %zu: %" PRIu64 " of %" PRIu64 " objects current in S3", di,
                          bitmap_count(&current), objects);
        }
        return 0;
}

static int send_s3(struct source *s) {
        for (size_t di = 0; di < s->cfg->count; di++) {
                if (!(s->table.devices[di].flags & MIGRATE_DEVICE_S3))
                        continue;
                const struct migrate_source_device *sd = &s->cfg->devices[di];
                struct migrate_s3_info info = sd->s3->info;
                uint64_t per = info.object_size / sd->dev->block_size;
                info.objects = s3_object_count(sd->dev->size, info.object_size);
                _cleanup_free_ uint8_t *bits = calloc((info.objects + 7) / 8 + 1, 1);
                if (!bits)
                        return -ENOMEM;
                for (uint64_t o = 0; o < info.objects; o++)
                        if (bitmap_test(&s->s3left[di], o * per))
                                bits[o / 8] |= (uint8_t)(1u << (o % 8));
                info.bitmap = bits;
                uint8_t *p;
                uint32_t len;
                int r = migrate_s3_encode(&info, &p, &len);
                if (r < 0)
                        return r;
                struct iovec iov = {p, len};
                r = send_frame(s, MIGRATE_S3, s->table.devices[di].id, &iov, 1);
                free(p);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int handshake(struct source *s) {
        uint8_t p[20];
        struct iovec iov = {p, migrate_encode_hello(p, MIGRATE_ROLE_SOURCE,
                                                    MIGRATE_CAP_ZERO_RUNS | MIGRATE_CAP_BARRIER |
                                                            MIGRATE_CAP_FINAL | MIGRATE_CAP_READY |
                                                            (s->cfg->compress ? MIGRATE_CAP_ZSTD : 0) |
                                                            (s->cfg->lazy ? MIGRATE_CAP_LAZY : 0))};
        int r = send_frame(s, MIGRATE_HELLO, MIGRATE_CONNECTION, &iov, 1);
        if (r < 0)
                return r;
        _cleanup_free_ uint8_t *buf = NULL;
        size_t cap = 0;
        struct migrate_frame f;
        struct migrate_message m;
        if ((r = migrate_read_frame(s->fd, &buf, &cap, &f)) < 0)
                return r;
        if (f.type == MIGRATE_ERROR && migrate_frame_parse(&f, NULL, false, &m) >= 0)
                return error_set(m.error.err < 0 ? m.error.err : -EPROTO, "destination: %s", m.error.message);
        if (f.type != MIGRATE_HELLO)
                return error_set(-EPROTO, "migration: expected HELLO from the destination, got frame type %u", f.type);
        if ((r = migrate_frame_parse(&f, NULL, false, &m)) < 0)
                return r;
        if (m.hello.version != MIGRATE_VERSION)
                return error_set(-EPROTO, "migration: destination speaks version %u, we speak %u", m.hello.version,
                                 MIGRATE_VERSION);
        s->caps = m.hello.capabilities & (MIGRATE_CAP_ZERO_RUNS | MIGRATE_CAP_BARRIER | MIGRATE_CAP_S3 |
                                          MIGRATE_CAP_FINAL | MIGRATE_CAP_READY |
                                          (s->cfg->compress ? MIGRATE_CAP_ZSTD : 0));
        if ((r = prepare_s3(s)) < 0)
                return r;

        uint8_t *dp;
        uint32_t dlen;
        if ((r = migrate_devices_encode(&s->table, &dp, &dlen)) < 0)
                return r;
        struct iovec div = {dp, dlen};
        r = send_frame(s, MIGRATE_DEVICES, MIGRATE_CONNECTION, &div, 1);
        free(dp);
        if (r < 0 || (r = send_s3(s)) < 0)
                return r;
        if ((r = migrate_read_frame(s->fd, &buf, &cap, &f)) < 0)
                return r;
        if ((r = migrate_frame_parse(&f, &s->table, false, &m)) < 0)
                return r;
        if (m.type == MIGRATE_ERROR)
                return error_set(m.error.err < 0 ? m.error.err : -EPROTO, "destination: %s", m.error.message);
        if (m.type != MIGRATE_DEVICES_ACK)
                return error_set(-EPROTO, "migration: expected DEVICES_ACK, got frame type %u", f.type);
        return 0;
}

/* Lazy migrations over a slow link: while the destination is asking for blocks (its VM faulting
 * on them), blocks nobody asked for would queue ahead of the answers and add their transfer time
 * to every fault. So they wait until the requests have been quiet for LAZY_QUIET_NS (of every
 * migration in cfg->demand_group: peers of one registry share its link), except one every
 * LAZY_BACKGROUND_NS, so the stream always ends. A resumed VM faults every few milliseconds, but
 * a 5 ms quiet period still let background blocks fill the gaps between faults: each fault then
 * waited behind them (20 ms on 200 Mbit/s instead of 5), and a Redis guest answered only after
 * three quarters of its package had arrived (docs/performance.md, drafter-registry). */
#define LAZY_QUIET_NS (50 * NSEC_PER_MSEC)
#define LAZY_BACKGROUND_NS (100 * NSEC_PER_MSEC)

static int yield_to_demand(struct source *s) {
        int r = flush_blocks(s);
        for (;;) {
                if (r < 0 || (r = serve_needs(s, true)) < 0 || (r = flush_blocks(s)) < 0)
                        return r;
                uint64_t now = clock_now_ns();
                pthread_mutex_lock(&s->lock);
                uint64_t last_need = s->last_need_ns;
                if (s->cfg->demand_group)
                        last_need = MAX(last_need, __atomic_load_n(s->cfg->demand_group, __ATOMIC_RELAXED));
                uint64_t quiet_at = last_need + LAZY_QUIET_NS;
                uint64_t due_at = s->last_background_ns + LAZY_BACKGROUND_NS;
                bool go = now >= quiet_at || now >= due_at || s->peer_error || s->reader_done;
                if (!go && s->need_count == 0) {
                        struct timespec ts;
                        clock_deadline_after(MIN(quiet_at, due_at) - now, &ts);
                        pthread_cond_timedwait(&s->changed, &s->lock, &ts);
                }
                pthread_mutex_unlock(&s->lock);
                if (go) {
                        s->last_background_ns = now;
                        return 0;
                }
        }
}

/* A lazy migration's known zero blocks, as runs: a guest's first touches are mostly of free
 * (zero) pages, which then need no round trip. */
static int send_known_zeros(struct source *s, size_t di) {
        const struct bitmap *z = s->cfg->devices[di].zero;
        if (!z || !(s->caps & MIGRATE_CAP_ZERO_RUNS))
                return 0;
        uint16_t id = s->table.devices[di].id;
        for (uint64_t b = bitmap_next_set(z, 0); b < z->nbits;) {
                uint64_t end = MIN(bitmap_next_clear(z, b), b + UINT32_MAX);
                uint8_t p[12];
                struct iovec iov = {p, migrate_encode_range(p, b, (uint32_t)(end - b))};
                int r = send_frame(s, MIGRATE_BLOCK_ZERO, id, &iov, 1);
                if (r < 0)
                        return r;
                for (uint64_t i = b; i < end; i++) {
                        bitmap_clear(&s->pending[di], i);
                        bitmap_set(&s->sent[di], i);
                }
                s->stats.zero_blocks += end - b;
                s->stats.blocks_sent += end - b;
                b = end < z->nbits ? bitmap_next_set(z, end) : z->nbits;
        }
        return 0;
}

/* Send (and no longer count as pending) every block of the final set of device di. */
static int send_pending(struct source *s, size_t di) {
        struct bitmap *p = &s->pending[di];
        for (uint64_t b = bitmap_next_set(p, 0); b < p->nbits; b = bitmap_next_set(p, b + 1)) {
                int r = bitmap_test_and_clear(p, b) ? send_block(s, di, b) : 0;
                /* A reader there waits for one of the rest (QEMU's state load touching a virtio
                 * ring): that block goes next, not when the sweep reaches it. */
                if (r >= 0 && __atomic_load_n(&s->need_count, __ATOMIC_RELAXED))
                        r = serve_needs(s, true);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* The final blocks of the devices the destination reads before it resumes, ahead of the rest,
 * then FINAL for each: it can load the VM's state while the rest of the final set follows. */
static int send_final_first(struct source *s) {
        for (size_t di = 0; di < s->cfg->count; di++) {
                if (!s->cfg->devices[di].final_first)
                        continue;
                int r = send_pending(s, di);
                if (r >= 0 && (s->caps & MIGRATE_CAP_FINAL))
                        r = send_event(s, s->table.devices[di].id, MIGRATE_EVENT_FINAL);
                if (r < 0)
                        return r;
        }
        return flush_blocks(s);
}

/* Add the blocks written since the last collection to device di's final set. */
static int collect_pending(struct source *s, size_t di) {
        uint64_t *blocks;
        size_t count;
        int r = collect(s, di, &blocks, &count);
        if (r < 0)
                return r;
        for (size_t i = 0; i < count; i++)
                bitmap_set(&s->pending[di], blocks[i]);
        free(blocks);
        s->stats.final_dirty_blocks += bitmap_count(&s->pending[di]);
        return 0;
}

/* The VM is paused: collect the final set and push the blocks of the devices that are not
 * final-first ahead of the hand-over, or send their lists for post-copy. */
static int final_set(struct source *s, bool *ret_pushed) {
        int r;
        if (s->cfg->before_collect && (r = s->cfg->before_collect(s->cfg->ctx)) < 0)
                return r;
        uint64_t final_bytes = 0;
        for (size_t di = 0; di < s->cfg->count; di++) {
                if ((r = collect_pending(s, di)) < 0)
                        return r;
                if (!s->cfg->devices[di].final_first)
                        final_bytes += bitmap_count(&s->pending[di]) * s->cfg->devices[di].dev->block_size;
        }
        /* Zstd only where the link is slower than it, and the final blocks pushed ahead of the
         * hand-over when the link moves them quicker than the destination could ask for them
         * one fault at a time; else their list goes ahead and they follow the hand-over
         * (post-copy). */
        s->raw_only = s->link_rate > MIGRATE_RAW_RATE;
        double rate = MAX(s->link_rate, s->data_rate);
        bool push = s->cfg->push_budget_ns &&
                    final_bytes <= MAX(MIGRATE_PUSH_MIN_BYTES, rate * (double)s->cfg->push_budget_ns / 1e9);
        log_debug("migration: final set %" PRIu64 " bytes, link %.0f MB/s (%.0f MB/s of blocks): %s", final_bytes,
                  s->link_rate / 1e6, s->data_rate / 1e6, push ? "pushed ahead of the hand-over" : "after the hand-over");
        /* The destination starts reading (QEMU loads the state, which reads guest RAM) once the
         * final-first devices are FINAL, and an older copy of a block must not be there to read
         * by then: the pushed blocks go ahead of them (nothing reads them on their way, so the
         * destination puts them straight into its page cache), the list of those that follow
         * the hand-over too. */
        for (size_t di = 0; di < s->cfg->count; di++) {
                if (s->cfg->devices[di].final_first)
                        continue;
                if ((r = push ? send_pending(s, di) : send_dirty_list(s, di)) < 0)
                        return r;
        }
        *ret_pushed = push;
        return 0;
}

/* Everything before the hand-over: bulk pass, dirty cycles, barrier, suspend, the final set
 * (pushed, or listed for post-copy). */
static int precopy(struct source *s) {
        int r;
        uint64_t t;
        /* SHAREDBASE: the destination reads unsent blocks from its base; it must wait for the
         * ones we will send, and writes to any block from now on must be tracked. */
        for (size_t di = 0; di < s->cfg->count; di++) {
                const struct migrate_source_device *sd = &s->cfg->devices[di];
                if (!sd->only)
                        continue;
                if (dirty_tracker_inner(sd->dev))
                        dirty_tracker_track_all(sd->dev);
                for (uint64_t w = 0; w < BITMAP_WORDS(sd->only->nbits); w++)
                        s->pending[di].words[w] = __atomic_load_n(&sd->only->words[w], __ATOMIC_ACQUIRE);
                if ((r = send_dirty_list(s, di)) < 0)
                        return r;
                bitmap_clear_all(&s->pending[di]);
        }

        /* A migration after a failed one starts from every block again: the monitor's queue
         * was drained by the earlier bulk pass. */
        for (size_t di = 0; di < s->cfg->count; di++)
                if (s->cfg->devices[di].vm)
                        for (uint64_t b = 0; b < block_device_block_count(s->cfg->devices[di].dev); b++)
                                volatility_monitor_push(s->cfg->devices[di].vm, b, clock_now_ns());

        t = clock_now_ns();
        if ((r = bulk(s)) < 0)
                return r;
        s->stats.bulk_ns = clock_now_ns() - t;
        note_rate(s, s->stats.bytes_sent, s->data_bytes, s->stats.bulk_ns);
        /* A destination still starting its VMM would make the suspend wait for it (and load the
         * state into a QEMU that has just started): the cycles begin once it can take the VM. */
        t = clock_now_ns();
        if ((s->caps & MIGRATE_CAP_READY) && (r = wait_for(s, &s->peer_ready, true)) < 0)
                return r;
        if (s->caps & MIGRATE_CAP_READY)
                log_debug("migration: the destination was ready %.1f ms after the bulk pass", (clock_now_ns() - t) / 1e6);
        t = clock_now_ns();
        if ((r = cycles(s)) < 0)
                return r;
        /* The destination may still be applying the last cycle's blocks (it is the slower side
         * on a busy host): let it catch up while the VM still runs, not while it is paused. */
        if ((s->caps & MIGRATE_CAP_BARRIER) && (r = barrier(s)) < 0)
                return r;
        s->stats.cycles_ns = clock_now_ns() - t;

        s->suspend_started_ns = clock_now_ns();
        if (s->cfg->suspend && (r = s->cfg->suspend(s->cfg->ctx)) < 0)
                return r;
        bool push = false;
        if ((r = final_set(s, &push)) < 0 || (r = send_final_first(s)) < 0)
                return r;
        s->stats.final_pushed = push;
        return 0;
}

static int run(struct source *s) {
        uint64_t t0 = clock_now_ns(), t;
        int r = handshake(s);
        if (r < 0)
                return r;
        if (pthread_create(&s->reader, NULL, reader_thread, s) != 0)
                return error_set(-EAGAIN, "migration: cannot start the reader thread");
        s->reader_running = true;

        if (s->cfg->lazy) {
                for (size_t di = 0; di < s->cfg->count; di++) {
                        bitmap_set_all(&s->pending[di]);
                        if ((r = send_known_zeros(s, di)) < 0)
                                return r;
                }
                log_debug("migration: lazy hand-over, every block after AUTHORITY");
                s->suspend_started_ns = clock_now_ns();
        } else if ((r = precopy(s)) < 0) {
                return r;
        }
        if ((r = send_event(s, MIGRATE_CONNECTION, MIGRATE_EVENT_SUSPENDED)) < 0 ||
            (r = send_event(s, MIGRATE_CONNECTION, MIGRATE_EVENT_AUTHORITY)) < 0)
                return r;
        s->authority_sent = true;
        s->stats.authority_sent_at_ns = clock_now_ns();
        s->stats.suspend_ns = s->stats.authority_sent_at_ns - s->suspend_started_ns;

        /* Post-copy: what the destination asks for first, then the rest in order. */
        t = clock_now_ns();
        idle_push(s);
        for (size_t di = 0; di < s->cfg->count; di++) {
                const struct bitmap *p = &s->pending[di];
                for (uint64_t b = bitmap_next_set(p, 0); b < p->nbits; b = bitmap_next_set(p, b + 1)) {
                        if ((r = serve_needs(s, true)) < 0 || (s->cfg->lazy && (r = yield_to_demand(s)) < 0))
                                return r;
                        if (bitmap_test_and_clear(&s->pending[di], b) && (r = send_block(s, di, b)) < 0)
                                return r;
                }
                if ((r = serve_needs(s, true)) < 0 ||
                    (r = send_event(s, s->table.devices[di].id, MIGRATE_EVENT_COMPLETED)) < 0)
                        return r;
        }
        /* Blocks left to S3 that the destination cannot get from there, it asks us for. */
        if ((r = wait_for(s, &s->authority_ack, s->any_s3)) < 0)
                return r;
        s->stats.authority_transferred = true;
        s->stats.authority_ns = clock_now_ns() - t;
        if ((r = wait_for(s, &s->completed_ack, s->any_s3)) < 0)
                return r;
        s->stats.completed = true;
        s->stats.total_ns = clock_now_ns() - t0;
        return 0;
}

int migrate_source_run(int fd, const struct migrate_source_config *cfg, struct migrate_stats *ret_stats) {
        if (cfg->count == 0 || cfg->count > MIGRATE_MAX_DEVICES)
                return error_set(-EINVAL, "migration: %zu devices (1-%d)", cfg->count, MIGRATE_MAX_DEVICES);
        struct source s = {.fd = fd, .cfg = cfg};
        uint32_t max_block = 0;
        s.table.count = cfg->count;
        for (size_t i = 0; i < cfg->count; i++) {
                const struct block_device *dev = cfg->devices[i].dev;
                struct migrate_device_info *d = &s.table.devices[i];
                d->id = (uint16_t)i;
                snprintf(d->name, sizeof(d->name), "%s", cfg->devices[i].name);
                d->size = dev->size;
                d->block_size = dev->block_size;
                d->flags = cfg->devices[i].only ? MIGRATE_DEVICE_SHAREDBASE : 0;
                max_block = MAX(max_block, dev->block_size);
        }
        pthread_mutex_init(&s.lock, NULL);
        pthread_cond_init(&s.changed, NULL);
        int r = -ENOMEM;
        s.sent = calloc(cfg->count, sizeof(struct bitmap));
        s.pending = calloc(cfg->count, sizeof(struct bitmap));
        s.s3left = calloc(cfg->count, sizeof(struct bitmap));
        s.s3_paused = calloc(cfg->count, sizeof(bool));
        /* A block read into a buffer is compressed into the buffer's second half; a compressed
         * block larger than 7/8 of the original is not worth sending anyway. */
        s.buf_cap = 2 * (size_t)max_block;
        s.slot_count = cfg->concurrency ? MIN(cfg->concurrency, (unsigned)MIGRATE_MAX_BATCH) : 16;
        s.slots = calloc(s.slot_count, sizeof(*s.slots));
        s.iov = calloc(2 * s.slot_count, sizeof(*s.iov));
        if (cfg->compress)
                s.cctx = ZSTD_createCCtx();
        s.zstd.on = true;
        if (s.sent && s.pending && s.s3left && s.s3_paused && s.slots && s.iov && (!cfg->compress || s.cctx)) {
                r = 0;
                for (size_t i = 0; i < cfg->count && r == 0; i++)
                        if (bitmap_init(&s.sent[i], block_device_block_count(cfg->devices[i].dev)) < 0 ||
                            bitmap_init(&s.pending[i], block_device_block_count(cfg->devices[i].dev)) < 0)
                                r = -ENOMEM;
        }
        if (r == 0)
                r = run(&s);
        if (s.push_idle)
                set_policy(0, SCHED_OTHER); /* and the nice value it had */
        if (s.cctx)
                log_debug("migration: blocks made at %.0f MB/s raw, %.0f MB/s compressed (to %.0f%%); "
                          "link %.0f MB/s (0: not the bottleneck); %u windows timed%s",
                          s.zstd.cpu[0] * 1e3, s.zstd.cpu[1] * 1e3, s.zstd.ratio * 100, s.zstd.link * 1e3,
                          s.zstd.windows, s.zstd.no_tcp_info ? ", no TCP_INFO: always compressed" : "");
        if (r < 0) {
                /* Tell the destination why (if it still listens), then stop the reader. */
                char why[MIGRATE_MAX_MESSAGE + 1];
                snprintf(why, sizeof(why), "%s", error_message());
                uint8_t p[6 + MIGRATE_MAX_MESSAGE];
                struct iovec iov = {p, migrate_encode_error(p, r, why)};
                migrate_write_frame(fd, MIGRATE_ERROR, 0, MIGRATE_CONNECTION, &iov, 1);
                shutdown(fd, SHUT_RDWR);
                error_set(r, "%s", why);
        }
        if (s.reader_running)
                pthread_join(s.reader, NULL);
        /* Once AUTHORITY may have reached the destination, only its ERROR ahead of any
         * acknowledgement proves it did not take over; without that proof the devices count as
         * handed over (a lost acknowledgement must not let two sides run the same devices). */
        if (r < 0 && s.authority_sent && !s.stats.authority_transferred && !s.refused) {
                char why[MIGRATE_MAX_MESSAGE + 1];
                snprintf(why, sizeof(why), "%s", error_message());
                s.stats.authority_transferred = true;
                error_set(r, "%s (after AUTHORITY was sent: the destination may have taken over)", why);
        }
        /* The devices stay ours: their sync goes on (a handed-over device's stays paused: the
         * destination writes its objects now). */
        for (size_t i = 0; s.s3_paused && i < cfg->count; i++)
                if (s.s3_paused[i] && r < 0 && !s.stats.authority_transferred)
                        s3_sync_resume(cfg->devices[i].s3->sync);
        if (ret_stats)
                *ret_stats = s.stats;
        for (size_t i = 0; i < cfg->count; i++) {
                if (s.s3left)
                        bitmap_free(&s.s3left[i]);
                if (s.sent)
                        bitmap_free(&s.sent[i]);
                if (s.pending)
                        bitmap_free(&s.pending[i]);
        }
        free(s.sent);
        free(s.pending);
        free(s.s3left);
        free(s.s3_paused);
        for (size_t i = 0; s.slots && i < s.slot_count; i++)
                free(s.slots[i].buf);
        free(s.slots);
        free(s.iov);
        free(s.needs);
        ZSTD_freeCCtx(s.cctx);
        pthread_mutex_destroy(&s.lock);
        pthread_cond_destroy(&s.changed);
        return r;
}
