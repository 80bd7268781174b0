/* waiting_cache.c — reads of blocks that have not arrived wait for them (see waiting_cache.h). */
#include "drafter/waiting_cache.h"

#include "drafter/log.h"
#include "drafter/bitmap.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WAITING_STRIPES 64

struct waiting_cache {
        struct block_device dev;
        struct block_device *inner;
        waiting_cache_need_fn need;
        void *ctx;
        uint64_t timeout_ns;
        struct bitmap present;
        struct bitmap requested; /* need() was called since the block went missing */
        pthread_mutex_t lock;    /* guards cancelled/why and pairs with `arrived` */
        pthread_cond_t arrived;
        int cancelled; /* 0 or a negative errno */
        char why[256];
        pthread_mutex_t stripes[WAITING_STRIPES]; /* order a block's supply against local writes */
};

static struct waiting_cache *to_cache(struct block_device *dev) {
        return (struct waiting_cache *)dev;
}

static pthread_mutex_t *stripe_for(struct waiting_cache *w, uint64_t block) {
        return &w->stripes[block % WAITING_STRIPES];
}

/* Wait until blocks [first, last] are present. Calls need() for missing ones first. */
static int wait_for_blocks(struct waiting_cache *w, uint64_t first, uint64_t last) {
        if (bitmap_range_all_set(&w->present, first, last - first + 1))
                return 0;

        for (uint64_t b = first; b <= last; b++)
                if (!bitmap_test(&w->present, b) && !bitmap_test_and_set(&w->requested, b) && w->need)
                        w->need(w->ctx, b);

        struct timespec deadline;
        if (w->timeout_ns)
                clock_deadline_after(w->timeout_ns, &deadline);
        int r = 0;
        uint64_t t0 = log_get_level() <= LOG_DEBUG ? clock_now_ns() : 0;
        pthread_mutex_lock(&w->lock);
        for (;;) {
                uint64_t missing = bitmap_next_clear(&w->present, first);
                if (missing > last)
                        break;
                if (w->cancelled) {
                        r = error_set(w->cancelled, "%s: block %" PRIu64 " is not available: %s", w->dev.name,
                                      missing, w->why);
                        break;
                }
                int e = w->timeout_ns ? pthread_cond_timedwait(&w->arrived, &w->lock, &deadline)
                                      : pthread_cond_wait(&w->arrived, &w->lock);
                if (e == ETIMEDOUT && bitmap_next_clear(&w->present, first) <= last) {
                        char limit[32];
                        duration_format((int64_t)w->timeout_ns, limit, sizeof(limit));
                        r = error_set(-ETIMEDOUT, "%s: block %" PRIu64 " did not arrive within %s", w->dev.name,
                                      bitmap_next_clear(&w->present, first), limit);
                        break;
                }
        }
        pthread_mutex_unlock(&w->lock);
        if (t0)
                log_debug("%s: waited %.1f ms for blocks %" PRIu64 "-%" PRIu64, w->dev.name,
                          (double)(clock_now_ns() - t0) / 1e6, first, last);
        return r;
}

static int cache_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        struct waiting_cache *w = to_cache(dev);
        int r = wait_for_blocks(w, off / dev->block_size, (off + len - 1) / dev->block_size);
        if (r < 0)
                return r;
        return block_device_read_at(w->inner, buf, len, off);
}

static void wake_all(struct waiting_cache *w) {
        pthread_mutex_lock(&w->lock);
        pthread_cond_broadcast(&w->arrived);
        pthread_mutex_unlock(&w->lock);
}

/* Write `buf` (or discard, with buf NULL) block by block. A whole missing block becomes present
 * without waiting (its arrival is then dropped); a partial one must arrive first. */
static int cache_modify(struct waiting_cache *w, const char *buf, size_t len, uint64_t off) {
        struct block_device *dev = &w->dev;
        while (len > 0) {
                uint64_t block = off / dev->block_size;
                size_t block_len = block_device_block_length(dev, block);
                size_t n = (size_t)MIN((uint64_t)len, block * dev->block_size + block_len - off);
                int r;

                if (n != block_len && (r = wait_for_blocks(w, block, block)) < 0)
                        return r;
                pthread_mutex_lock(stripe_for(w, block));
                r = buf ? block_device_write_at(w->inner, buf, n, off) : block_device_discard(w->inner, n, off);
                bool became_present = r >= 0 && !bitmap_test_and_set(&w->present, block);
                pthread_mutex_unlock(stripe_for(w, block));
                if (became_present)
                        wake_all(w);
                if (r < 0)
                        return r;
                if (buf)
                        buf += n;
                off += n;
                len -= n;
        }
        return 0;
}

static int cache_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        return cache_modify(to_cache(dev), buf, len, off);
}

static int cache_discard(struct block_device *dev, size_t len, uint64_t off) {
        return cache_modify(to_cache(dev), NULL, len, off);
}

static int cache_flush(struct block_device *dev) {
        return block_device_flush(to_cache(dev)->inner);
}

static void cache_close(struct block_device *dev) {
        struct waiting_cache *w = to_cache(dev);
        block_device_close(w->inner);
        bitmap_free(&w->present);
        bitmap_free(&w->requested);
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->arrived);
        for (size_t i = 0; i < WAITING_STRIPES; i++)
                pthread_mutex_destroy(&w->stripes[i]);
        free(w);
}

static const struct block_device_ops cache_ops = {
        .read_at = cache_read_at,
        .write_at = cache_write_at,
        .flush = cache_flush,
        .discard = cache_discard,
        .close = cache_close,
};

int waiting_cache_wrap(struct block_device *inner, waiting_cache_need_fn need, void *ctx, uint64_t timeout_ns,
                       struct block_device **ret_dev) {
        _cleanup_free_ struct waiting_cache *w = calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        uint64_t blocks = block_device_block_count(inner);
        if (bitmap_init(&w->present, blocks) < 0 || bitmap_init(&w->requested, blocks) < 0) {
                bitmap_free(&w->present);
                return -ENOMEM;
        }
        int r = block_device_init(&w->dev, &cache_ops, inner->name, inner->size, inner->block_size);
        if (r < 0) {
                bitmap_free(&w->present);
                bitmap_free(&w->requested);
                return r;
        }
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->arrived, NULL);
        for (size_t i = 0; i < WAITING_STRIPES; i++)
                pthread_mutex_init(&w->stripes[i], NULL);
        w->inner = inner;
        w->need = need;
        w->ctx = ctx;
        w->timeout_ns = timeout_ns;
        *ret_dev = &TAKE_PTR(w)->dev;
        return 0;
}

int waiting_cache_supply(struct block_device *dev, uint64_t block, const void *data, unsigned flags) {
        struct waiting_cache *w = to_cache(dev);
        if (block >= block_device_block_count(dev))
                return error_set(-ERANGE, "%s: block %" PRIu64 " is beyond the last block %" PRIu64, dev->name,
                                 block, block_device_block_count(dev) - 1);
        pthread_mutex_lock(stripe_for(w, block));
        int r = 0;
        if (!(flags & WAITING_CACHE_IF_MISSING) || !bitmap_test(&w->present, block)) {
                r = block_device_write_at(w->inner, data, block_device_block_length(dev, block),
                                          block * dev->block_size);
                if (r >= 0) {
                        bitmap_set(&w->present, block);
                        r = 1;
                }
        }
        pthread_mutex_unlock(stripe_for(w, block));
        if (r > 0)
                wake_all(w);
        return r;
}

int waiting_cache_supply_direct(struct block_device *dev, uint64_t block, unsigned flags,
                                int (*fill)(void *ctx, void *dst, size_t len), void *ctx) {
        struct waiting_cache *w = to_cache(dev);
        if (block >= block_device_block_count(dev))
                return error_set(-ERANGE, "%s: block %" PRIu64 " is beyond the last block %" PRIu64, dev->name,
                                 block, block_device_block_count(dev) - 1);
        size_t len = block_device_block_length(dev, block);
        void *mem = block_device_map(w->inner, len, block * dev->block_size);
        if (!mem)
                return -EOPNOTSUPP;
        pthread_mutex_lock(stripe_for(w, block));
        bool write = !(flags & WAITING_CACHE_IF_MISSING) || !bitmap_test(&w->present, block);
        int r = fill(ctx, write ? mem : NULL, len);
        if (r >= 0 && write) {
                bitmap_set(&w->present, block);
                r = 1;
        } else if (r >= 0) {
                r = 0;
        }
        pthread_mutex_unlock(stripe_for(w, block));
        if (r > 0)
                wake_all(w);
        return r;
}

void waiting_cache_mark_present(struct block_device *dev, uint64_t first, uint64_t count) {
        struct waiting_cache *w = to_cache(dev);
        bitmap_set_range(&w->present, first, count);
        wake_all(w);
}

void waiting_cache_invalidate(struct block_device *dev, uint64_t block) {
        struct waiting_cache *w = to_cache(dev);
        pthread_mutex_lock(stripe_for(w, block));
        bitmap_clear(&w->present, block);
        bitmap_clear(&w->requested, block);
        pthread_mutex_unlock(stripe_for(w, block));
}

bool waiting_cache_present(struct block_device *dev, uint64_t block) {
        struct waiting_cache *w = to_cache(dev);
        return block < w->present.nbits && bitmap_test(&w->present, block);
}

void waiting_cache_cancel(struct block_device *dev, int err, const char *why) {
        struct waiting_cache *w = to_cache(dev);
        pthread_mutex_lock(&w->lock);
        w->cancelled = err < 0 ? err : -ECANCELED;
        snprintf(w->why, sizeof(w->why), "%s", why ? why : "cancelled");
        pthread_cond_broadcast(&w->arrived);
        pthread_mutex_unlock(&w->lock);
}

uint64_t waiting_cache_missing(struct block_device *dev) {
        struct waiting_cache *w = to_cache(dev);
        return w->present.nbits - bitmap_count(&w->present);
}

struct block_device *waiting_cache_inner(struct block_device *dev) {
        return dev->ops == &cache_ops ? to_cache(dev)->inner : NULL;
}
