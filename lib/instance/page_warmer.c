/* page_warmer.c — a receiving VM's memory into the page cache as it arrives (page_warmer.h). */
#include "page_warmer.h"
#include "drafter/bitmap.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/log.h"
#include "drafter/waiting_cache.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WARM_RUN_BYTES (256u << 10) /* also what the drain may wait for: one store in flight */
/* A block is read once it has not changed for this long: a hot block is sent again each cycle,
 * and reading it each time would only cost the migration's thread an invalidation. */
#define PAGE_WARMER_SETTLE_NS (150 * NSEC_PER_MSEC)
/* Just before the VM runs it waits for what is still queued, settled or not: at most this long
 * (the state load before it gave the thread its time). */
#define PAGE_WARMER_DRAIN_NS (2 * NSEC_PER_MSEC)
/* The drain stores in short runs, so that its deadline holds: a 1 MiB store took 1.7 ms with the
 * migration's threads busy beside it, and 5 such runs once held the VM's start for 12 ms. */
#define PAGE_WARMER_DRAIN_RUN_BYTES (128u << 10)
/* Blocks mapped into the VMM per request (page_warmer_set_toucher): short, so that a request
 * at idle priority holds QEMU's address space (its mmap lock) only briefly. */
#define TOUCH_RUN_BYTES (256u << 10)

struct page_warmer {
        struct fuse_export *fx;
        size_t index;
        struct block_device *dev;
        int fd;
        /* Guards the bitmaps and the flight; a block's cached pages are dropped only while no
         * read of it is in flight. */
        pthread_mutex_t lock;
        pthread_cond_t wake, landed;
        uint64_t flight_first, flight_count; /* the blocks being read, with the lock released */
        struct bitmap queued;
        uint64_t *arrived_ns; /* per block: when it last arrived */
        struct bitmap cached; /* read by us: the page cache may hold these blocks */
        bool stop, draining, running, paused;
        /* Someone waits for the flight: the thread runs at the normal priority until it lands (an
         * idle-class thread holding what a busy CPU's thread waits for would hold it for long). */
        bool boosted;
        pid_t tid;
        bool read_through; /* the kernel refused a store: read through the FUSE file */
        uint64_t drain_deadline_ns;
        pthread_t thread;
        uint64_t blocks_read, t_busy_ns;
        void *store_buf; /* page_warmer_store(): one block read back from the device */
        uint64_t blocks_stored, t_store_ns;
        /* The VMM's toucher (page_warmer_set_toucher) and the cached blocks it has not mapped. */
        struct page_warmer_toucher toucher; /* .touch NULL: none */
        bool touching; /* a request is out, with the lock released */
        struct bitmap untouched; /* cached, not mapped */
        struct bitmap mapped;    /* mapped by the toucher, not dropped since (a store over keeps it) */
        struct bitmap hot;       /* arrived again while cached: the VM writes it, mapped first */
        uint64_t blocks_touched, t_touch_ns;
};

int page_warmer_new(struct fuse_export *fx, size_t index, struct block_device *dev, struct page_warmer **ret) {
        _cleanup_free_ struct page_warmer *w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        const char *path = fuse_export_path(fx, index);
        w->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (w->fd < 0)
                return error_set_errno(-errno, "page cache: cannot open %s", path);
        /* Exactly the pages asked for: readahead would also read blocks that have not arrived. */
        int r = posix_fadvise(w->fd, 0, 0, POSIX_FADV_RANDOM);
        uint64_t blocks = block_device_block_count(dev);
        if (r == 0 && !(w->arrived_ns = calloc(blocks ? blocks : 1, 8)))
                r = -ENOMEM;
        struct bitmap *maps[] = {&w->queued, &w->cached, &w->untouched, &w->mapped, &w->hot};
        for (size_t i = 0; i < ELEMENTSOF(maps) && r == 0; i++)
                r = bitmap_init(maps[i], blocks);
        if (r != 0) {
                for (size_t i = 0; i < ELEMENTSOF(maps); i++)
                        bitmap_free(maps[i]); /* fine on a map never set up (calloc) */
                free(w->arrived_ns);
                close(w->fd);
                return r > 0 ? error_set_errno(-r, "page cache: %s", path) : r;
        }
        w->fx = fx;
        w->index = index;
        w->dev = dev;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->wake, NULL);
        pthread_cond_init(&w->landed, NULL);
        *ret = TAKE_PTR(w);
        return 0;
}

/* Present and (unless draining) settled. */
static bool ready(struct page_warmer *w, uint64_t block, uint64_t now) {
        return waiting_cache_present(w->dev, block) &&
               (w->draining || now - w->arrived_ns[block] >= PAGE_WARMER_SETTLE_NS);
}

/* The next run of queued, ready blocks (at most WARM_RUN_BYTES), taken off the queue; false if
 * none is ready. Called with the lock held. */
static bool next_run(struct page_warmer *w, uint64_t *cursor, uint64_t *ret_first, uint64_t *ret_count) {
        uint64_t n = w->queued.nbits, now = clock_now_ns();
        uint64_t max = MAX(1, (w->draining ? PAGE_WARMER_DRAIN_RUN_BYTES : WARM_RUN_BYTES) / w->dev->block_size);
        for (int pass = 0; pass < 2; pass++, *cursor = 0) {
                for (uint64_t b = bitmap_next_set(&w->queued, *cursor); b < n; b = bitmap_next_set(&w->queued, b + 1)) {
                        if (!waiting_cache_present(w->dev, b)) {
                                bitmap_clear(&w->queued, b); /* it will be queued again when it arrives */
                                continue;
                        }
                        if (!ready(w, b, now))
                                continue;
                        bitmap_clear(&w->queued, b);
                        uint64_t e = b + 1;
                        while (e < n && e - b < max && bitmap_test(&w->queued, e) && ready(w, e, now))
                                bitmap_clear(&w->queued, e++);
                        *cursor = e;
                        *ret_first = b;
                        *ret_count = e - b;
                        return true;
                }
        }
        return false;
}

/* The blocks' data from the device straight into the page cache; where the kernel refuses
 * that (an older one), read through the file, which costs a FUSE round trip per request. */
static void warm(struct page_warmer *w, void *buf, uint64_t off, size_t len) {
        if (!w->read_through) {
                if (block_device_read_at(w->dev, buf, len, off) >= 0 &&
                    fuse_export_store(w->fx, w->index, off, buf, len) >= 0)
                        return;
                log_debug("page cache: %s; reading through the file instead", error_message());
                w->read_through = true;
        }
        if (pread(w->fd, buf, len, (off_t)off) < 0)
                log_debug("page cache: read of %zu bytes at %" PRIu64 ": %m", len, off);
}

/* The bytes of blocks [first, first+count): the last block may be short. */
static size_t run_bytes(const struct page_warmer *w, uint64_t first, uint64_t count, uint64_t *ret_off) {
        *ret_off = first * w->dev->block_size;
        return (size_t)(MIN((first + count) * w->dev->block_size, w->dev->size) - *ret_off);
}

/* Blocks [first, first+count) are in the page cache now: for the toucher too. Lock held. */
static void now_cached(struct page_warmer *w, uint64_t first, uint64_t count) {
        bitmap_set_range(&w->cached, first, count);
        for (uint64_t b = first; w->toucher.touch && b < first + count; b++)
                if (!bitmap_test(&w->mapped, b))
                        bitmap_set(&w->untouched, b);
}

/* First block at or after `from` that is untouched (and hot, if `hot`), or nbits. */
static uint64_t next_untouched(const struct page_warmer *w, uint64_t from, bool hot) {
        uint64_t n = w->untouched.nbits;
        for (uint64_t i = from / 64; from < n && i < BITMAP_WORDS(n); i++) {
                uint64_t word = w->untouched.words[i] & (hot ? w->hot.words[i] : ~0ull);
                if (i == from / 64)
                        word &= ~0ull << (from % 64);
                if (word)
                        return MIN(n, i * 64 + (uint64_t)__builtin_ctzll(word));
        }
        return n;
}

/* The next run of cached blocks the toucher has not mapped (at most TOUCH_RUN_BYTES), taken
 * off: hot ones first, then the rest from the cursor on; false if none. Lock held. */
static bool next_touch(struct page_warmer *w, uint64_t *cursor, uint64_t *ret_first, uint64_t *ret_count) {
        uint64_t n = w->untouched.nbits, max = MAX(1, TOUCH_RUN_BYTES / w->dev->block_size);
        uint64_t b = next_untouched(w, 0, true);
        bool hot = b < n;
        if (!hot && (b = next_untouched(w, *cursor, false)) >= n && (b = next_untouched(w, 0, false)) >= n)
                return false;
        uint64_t e = b;
        while (e < n && e - b < max && bitmap_test(&w->untouched, e) && (!hot || bitmap_test(&w->hot, e)))
                bitmap_clear(&w->untouched, e++);
        if (!hot)
                *cursor = e;
        *ret_first = b;
        *ret_count = e - b;
        return true;
}

/* One run to the toucher, with the lock released (a block dropped meanwhile is read alone by
 * QEMU, page_warmer.h). A toucher that fails is not asked again. Lock held. */
static void touch_run(struct page_warmer *w, uint64_t first, uint64_t count) {
        struct page_warmer_toucher toucher = w->toucher;
        w->touching = true;
        pthread_mutex_unlock(&w->lock);
        uint64_t t = clock_now_ns(), off;
        size_t len = run_bytes(w, first, count, &off);
        int r = toucher.touch(toucher.ctx, off, len);
        pthread_mutex_lock(&w->lock);
        w->touching = false;
        pthread_cond_broadcast(&w->landed);
        if (r < 0 && w->toucher.touch) {
                log_debug("page cache: the VMM maps no more blocks ahead: %s", strerror(-r));
                w->toucher.touch = NULL;
        }
        if (r >= 0) {
                for (uint64_t b = first; b < first + count; b++)
                        if (bitmap_test(&w->cached, b)) /* else dropped meanwhile */
                                bitmap_set(&w->mapped, b);
                w->blocks_touched += count;
                w->t_touch_ns += clock_now_ns() - t;
        }
}

/* A touch request out: at the normal priority, someone waits for it now. Lock held. */
static void hurry(struct page_warmer *w) {
        if (w->touching && w->toucher.hurry)
                w->toucher.hurry(w->toucher.ctx);
}

static bool set_policy(pid_t tid, int policy) {
        struct sched_param sp = {0};
        if (sched_setscheduler(tid, policy, &sp) < 0)
                log_debug("page cache: scheduling policy %d: %m", policy);
        return true;
}

static void *warm_thread(void *arg) {
        struct page_warmer *w = arg;
        /* Only on idle CPUs: this saves faults later, and at nice 5 it still took a CPU of two
         * away from the source's state save and the destination's load in the downtime. The
         * drain, which the VM's start waits for, runs at the normal priority. */
        set_policy(0, SCHED_IDLE);
        bool drain_policy = false;
        _cleanup_free_ void *buf = malloc(WARM_RUN_BYTES);
        uint64_t cursor = 0, touch_cursor = 0;
        pthread_mutex_lock(&w->lock);
        w->tid = gettid();
        while (buf && !w->stop) {
                uint64_t first, count;
                if (w->draining && !drain_policy)
                        drain_policy = set_policy(0, SCHED_OTHER);
                if (w->boosted && !w->draining)
                        set_policy(0, SCHED_IDLE);
                w->boosted = false;
                if (w->paused && !w->draining) {
                        pthread_cond_wait(&w->wake, &w->lock);
                        continue;
                }
                if (w->draining && clock_now_ns() > w->drain_deadline_ns)
                        break;
                if (!next_run(w, &cursor, &first, &count)) {
                        if (w->draining)
                                break;
                        /* Then what is cached into the VMM's page tables (not while it loads the
                         * state: a request holds its address space). */
                        if (w->toucher.touch && !w->paused && next_touch(w, &touch_cursor, &first, &count)) {
                                touch_run(w, first, count);
                                continue;
                        }
                        /* Queued blocks settle with time, not with a signal. */
                        struct timespec ts;
                        clock_deadline_after(PAGE_WARMER_SETTLE_NS / 3, &ts);
                        pthread_cond_timedwait(&w->wake, &w->lock, &ts);
                        continue;
                }
                /* Every block in the range is present and stays so until the store is done
                 * (page_warmer_dirtied waits for it): it never waits for the migration. After
                 * the hand-over a fault of QEMU's may hold one of its pages while it waits for
                 * a missing neighbour; the store then waits for that block to land, which the
                 * receiving thread delivers without waiting for us (no missing block is ever
                 * in flight here). */
                w->flight_first = first;
                w->flight_count = count;
                pthread_mutex_unlock(&w->lock);
                uint64_t t = clock_now_ns(), off;
                size_t len = run_bytes(w, first, count, &off);
                warm(w, buf, off, len);
                pthread_mutex_lock(&w->lock);
                now_cached(w, first, count);
                w->flight_count = 0;
                pthread_cond_broadcast(&w->landed);
                w->blocks_read += count;
                w->t_busy_ns += clock_now_ns() - t;
        }
        pthread_mutex_unlock(&w->lock);
        return NULL;
}

int page_warmer_run(struct page_warmer *w) {
        pthread_mutex_lock(&w->lock);
        for (uint64_t b = 0; b < w->queued.nbits; b++)
                if (waiting_cache_present(w->dev, b))
                        bitmap_set(&w->queued, b);
        int r = pthread_create(&w->thread, NULL, warm_thread, w);
        w->running = r == 0;
        if (r == 0)
                pthread_setname_np(w->thread, "page-warmer");
        pthread_mutex_unlock(&w->lock);
        return r == 0 ? 0 : error_set(-r, "page cache: cannot start a thread");
}

/* A store of the thread's covers `block` with the lock released. Called with the lock held. */
static bool in_flight(struct page_warmer *w, uint64_t block) {
        return w->flight_count && block >= w->flight_first && block < w->flight_first + w->flight_count;
}

/* Lock, and wait until no read of `block` is in flight. */
static void lock_block(struct page_warmer *w, uint64_t block) {
        pthread_mutex_lock(&w->lock);
        while (in_flight(w, block)) {
                if (!w->boosted && !w->draining && w->tid > 0)
                        w->boosted = set_policy(w->tid, SCHED_OTHER);
                pthread_cond_wait(&w->landed, &w->lock);
        }
}

void page_warmer_pause(struct page_warmer *w) {
        if (!w)
                return;
        pthread_mutex_lock(&w->lock);
        w->paused = true;
        hurry(w);
        pthread_mutex_unlock(&w->lock);
}

/* Called with the lock held and no read of the block in flight. */
static void drop_cached(struct page_warmer *w, uint64_t block) {
        bitmap_clear(&w->untouched, block);
        bitmap_clear(&w->mapped, block);
        if (!bitmap_test_and_clear(&w->cached, block))
                return;
        if (fuse_export_invalidate(w->fx, w->index, block * w->dev->block_size, w->dev->block_size) < 0)
                log_debug("%s", error_message());
}

/* Block `block` arrived (its older cached copy, if any, is stale now): for the thread to store
 * once it has settled. Called with the lock held and no read of the block in flight. */
static void queue_arrived(struct page_warmer *w, uint64_t block, uint64_t now) {
        if (bitmap_test(&w->cached, block))
                bitmap_set(&w->hot, block);
        drop_cached(w, block);
        bitmap_set(&w->queued, block);
        w->arrived_ns[block] = now;
}

void page_warmer_arrived(struct page_warmer *w, uint64_t first, uint64_t count, bool zero) {
        /* A block sent again (a pre-copy cycle) replaces the one we may have cached (or are
         * reading: torn, perhaps). */
        uint64_t now = clock_now_ns();
        for (uint64_t b = first; b < first + count && b < w->queued.nbits; b++) {
                lock_block(w, b);
                if (zero) {
                        drop_cached(w, b);
                        bitmap_clear(&w->queued, b);
                } else {
                        queue_arrived(w, b, now);
                }
                pthread_mutex_unlock(&w->lock);
        }
}

/* Store one block (read back from the device if `data` is NULL). Called with the lock held and
 * no store of the block in flight. */
static int store_locked(struct page_warmer *w, uint64_t block, const void *data) {
        uint64_t t = clock_now_ns(), off;
        size_t len = run_bytes(w, block, 1, &off);
        int r = w->read_through ? -EOPNOTSUPP : 0;
        if (r >= 0 && !data) {
                if (!w->store_buf && !(w->store_buf = malloc(w->dev->block_size)))
                        r = -ENOMEM;
                if (r >= 0 && (r = block_device_read_at(w->dev, w->store_buf, len, off)) >= 0)
                        data = w->store_buf;
        }
        bool again = bitmap_test(&w->cached, block);
        if (r >= 0 && (r = fuse_export_store(w->fx, w->index, off, data, len)) < 0) {
                log_debug("page cache: %s; reading through the file instead", error_message());
                w->read_through = true;
        }
        if (r >= 0) {
                bitmap_clear(&w->queued, block);
                if (again)
                        bitmap_set(&w->hot, block);
                now_cached(w, block, 1);
                w->blocks_stored++;
                w->t_store_ns += clock_now_ns() - t;
        }
        return r;
}

int page_warmer_store(struct page_warmer *w, uint64_t block, const void *data) {
        if (block >= w->queued.nbits)
                return -ERANGE;
        lock_block(w, block); /* a store of the thread's may have read an older copy */
        int r = store_locked(w, block, data);
        pthread_mutex_unlock(&w->lock);
        return r;
}

/* The blocks a read holding a page of `block` can cover: one read window (its pages are locked
 * together) on either side. */
static void reach(struct page_warmer *w, uint64_t block, uint64_t *ret_first, uint64_t *ret_last) {
        uint64_t bs = w->dev->block_size, off = block * bs, win = fuse_export_read_window(w->fx);
        *ret_first = off > win ? (off - win) / bs : 0;
        *ret_last = MIN(w->queued.nbits - 1, (off + bs + win - 1) / bs);
}

/* No read can hold a page of `block` while it waits for a missing block: every block within its
 * reach is here. */
static bool nothing_waits_on(struct page_warmer *w, uint64_t block) {
        uint64_t first, last;
        reach(w, block, &first, &last);
        for (uint64_t b = first; b <= last; b++)
                if (!waiting_cache_present(w->dev, b))
                        return false;
        return true;
}

void page_warmer_landed(struct page_warmer *w, uint64_t block, const void *data) {
        if (block >= w->queued.nbits)
                return;
        lock_block(w, block);
        if (!nothing_waits_on(w, block) || store_locked(w, block, data) < 0)
                queue_arrived(w, block, clock_now_ns());
        /* A queued block within reach that waited for this one to be here. One the thread is
         * storing is left to it: waiting for its store could mean waiting for a read that waits
         * for us. */
        uint64_t first, last;
        reach(w, block, &first, &last);
        for (uint64_t nb = first; nb <= last; nb++)
                if (nb != block && bitmap_test(&w->queued, nb) && !in_flight(w, nb) && nothing_waits_on(w, nb))
                        store_locked(w, nb, NULL);
        pthread_mutex_unlock(&w->lock);
}

void page_warmer_dirtied(struct page_warmer *w, uint64_t block) {
        lock_block(w, block);
        /* No read of it is in flight (we hold the lock), none starts until it is back. */
        if (block < w->queued.nbits) {
                bitmap_clear(&w->queued, block);
                drop_cached(w, block);
        }
        pthread_mutex_unlock(&w->lock);
}

void page_warmer_set_toucher(struct page_warmer *w, const struct page_warmer_toucher *t) {
        if (!w)
                return;
        pthread_mutex_lock(&w->lock);
        hurry(w);
        w->toucher = t ? *t : (struct page_warmer_toucher){0}; /* no new request to the old one */
        while (w->touching)
                pthread_cond_wait(&w->landed, &w->lock);
        for (size_t i = 0; i < BITMAP_WORDS(w->cached.nbits); i++)
                w->untouched.words[i] = w->toucher.touch ? w->cached.words[i] & ~w->mapped.words[i] : 0;
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->lock);
}

void page_warmer_end_touching(struct page_warmer *w) {
        if (!w)
                return;
        pthread_mutex_lock(&w->lock);
        hurry(w);
        w->toucher.touch = NULL; /* the hurry stays, for the request out */
        bitmap_clear_all(&w->untouched);
        pthread_mutex_unlock(&w->lock);
}

void page_warmer_free(struct page_warmer *w) {
        if (!w)
                return;
        uint64_t t = clock_now_ns(), before;
        pthread_mutex_lock(&w->lock);
        before = w->blocks_read;
        w->draining = true;
        w->drain_deadline_ns = t + PAGE_WARMER_DRAIN_NS;
        hurry(w);
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->lock);
        if (w->running)
                pthread_join(w->thread, NULL);
        log_debug("page cache: %" PRIu64 " blocks stored as they arrived in %.1f ms, %" PRIu64 " read ahead in %.1f ms, "
                  "the last %" PRIu64 " in %.1f ms before the VM ran; %" PRIu64 " mapped into the VMM in %.1f ms",
                  w->blocks_stored, w->t_store_ns / 1e6, w->blocks_read, w->t_busy_ns / 1e6, w->blocks_read - before,
                  (clock_now_ns() - t) / 1e6, w->blocks_touched, w->t_touch_ns / 1e6);
        free(w->store_buf);
        bitmap_free(&w->queued);
        bitmap_free(&w->cached);
        bitmap_free(&w->untouched);
        bitmap_free(&w->mapped);
        bitmap_free(&w->hot);
        free(w->arrived_ns);
        close(w->fd);
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->wake);
        pthread_cond_destroy(&w->landed);
        free(w);
}
