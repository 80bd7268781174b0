/* dirty_tracker.c — record written blocks for pre-copy cycles (see dirty_tracker.h). */
#include "drafter/dirty_tracker.h"
#include "drafter/bitmap.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <stdlib.h>

struct dirty_tracker {
        struct block_device dev;
        struct block_device *inner;
        enum dirty_tracker_mode mode;
        struct bitmap tracking; /* blocks whose writes are recorded */
        struct bitmap dirty;
};

static struct dirty_tracker *to_tracker(struct block_device *dev) {
        return (struct dirty_tracker *)dev;
}

static int tracker_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        return block_device_read_at(to_tracker(dev)->inner, buf, len, off);
}

static void mark_range(struct dirty_tracker *t, size_t len, uint64_t off) {
        uint64_t first = off / t->dev.block_size, last = (off + len - 1) / t->dev.block_size;
        for (uint64_t b = first; b <= last; b++)
                if (t->mode == DIRTY_TRACK_ALL || bitmap_test(&t->tracking, b))
                        bitmap_set(&t->dirty, b);
}

static int tracker_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        struct dirty_tracker *t = to_tracker(dev);
        int r = block_device_write_at(t->inner, buf, len, off);
        /* Mark after the write: a collector that saw the mark reads the new data. Mark on failure
         * too: part of the range may have changed. */
        mark_range(t, len, off);
        return r;
}

static int tracker_discard(struct block_device *dev, size_t len, uint64_t off) {
        struct dirty_tracker *t = to_tracker(dev);
        int r = block_device_discard(t->inner, len, off);
        mark_range(t, len, off);
        return r;
}

static int tracker_flush(struct block_device *dev) {
        return block_device_flush(to_tracker(dev)->inner);
}

static void tracker_close(struct block_device *dev) {
        struct dirty_tracker *t = to_tracker(dev);
        block_device_close(t->inner);
        bitmap_free(&t->tracking);
        bitmap_free(&t->dirty);
        free(t);
}

static const struct block_device_ops tracker_ops = {
        .read_at = tracker_read_at,
        .write_at = tracker_write_at,
        .flush = tracker_flush,
        .discard = tracker_discard,
        .close = tracker_close,
};

int dirty_tracker_wrap(struct block_device *inner, enum dirty_tracker_mode mode, struct block_device **ret_dev) {
        _cleanup_free_ struct dirty_tracker *t = calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        uint64_t blocks = block_device_block_count(inner);
        if (bitmap_init(&t->tracking, blocks) < 0 || bitmap_init(&t->dirty, blocks) < 0) {
                bitmap_free(&t->tracking);
                return -ENOMEM;
        }
        int r = block_device_init(&t->dev, &tracker_ops, inner->name, inner->size, inner->block_size);
        if (r < 0) {
                bitmap_free(&t->tracking);
                bitmap_free(&t->dirty);
                return r;
        }
        t->inner = inner;
        t->mode = mode;
        *ret_dev = &TAKE_PTR(t)->dev;
        return 0;
}

int dirty_tracker_read_tracked(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        struct dirty_tracker *t = to_tracker(dev);
        if (len == 0)
                return 0;
        if (off > dev->size || len > dev->size - off)
                return block_device_read_at(dev, buf, len, off); /* reports the range error */
        /* Track before reading: a write racing with this read is then marked dirty. */
        uint64_t first = off / dev->block_size, last = (off + len - 1) / dev->block_size;
        bitmap_set_range(&t->tracking, first, last - first + 1);
        return block_device_read_at(t->inner, buf, len, off);
}

const void *dirty_tracker_map_tracked(struct block_device *dev, size_t len, uint64_t off) {
        struct dirty_tracker *t = to_tracker(dev);
        void *p = block_device_map(t->inner, len, off);
        if (p) {
                uint64_t first = off / dev->block_size, last = (off + len - 1) / dev->block_size;
                bitmap_set_range(&t->tracking, first, last - first + 1);
        }
        return p;
}

void dirty_tracker_track_all(struct block_device *dev) {
        bitmap_set_all(&to_tracker(dev)->tracking);
}

int dirty_tracker_collect(struct block_device *dev, uint64_t **ret_blocks, size_t *ret_count) {
        struct dirty_tracker *t = to_tracker(dev);
        uint64_t words = BITMAP_WORDS(t->dirty.nbits);
        size_t cap = 64, n = 0;
        uint64_t *blocks = malloc(cap * sizeof(*blocks));
        if (!blocks)
                return -ENOMEM;
        for (uint64_t w = 0; w < words; w++) {
                uint64_t bits = bitmap_take_word(&t->dirty, w);
                while (bits) {
                        if (n == cap) {
                                uint64_t *grown = realloc(blocks, 2 * cap * sizeof(*blocks));
                                if (!grown) {
                                        /* Put back what we took so nothing is lost. */
                                        __atomic_fetch_or(&t->dirty.words[w], bits, __ATOMIC_RELEASE);
                                        for (size_t i = 0; i < n; i++)
                                                bitmap_set(&t->dirty, blocks[i]);
                                        free(blocks);
                                        return -ENOMEM;
                                }
                                blocks = grown;
                                cap *= 2;
                        }
                        blocks[n++] = w * 64 + (uint64_t)__builtin_ctzll(bits);
                        bits &= bits - 1;
                }
        }
        *ret_blocks = blocks;
        *ret_count = n;
        return 0;
}

uint64_t dirty_tracker_pending(struct block_device *dev) {
        return bitmap_count(&to_tracker(dev)->dirty);
}

struct block_device *dirty_tracker_inner(struct block_device *dev) {
        return dev->ops == &tracker_ops ? to_tracker(dev)->inner : NULL;
}
