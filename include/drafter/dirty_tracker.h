/* dirty_tracker.h — a device layer that records which blocks were written since the last
 * collection, for pre-copy migration cycles.
 *
 * Writes are marked after they complete, so a block collected (and then read by the migrator) is
 * either read with the write in it or marked again for the next cycle: no write is missed.
 * In DIRTY_TRACK_AFTER_READ mode a block is only tracked once the migrator has read it through
 * dirty_tracker_read_tracked(): blocks not yet sent need no dirty entry, since the bulk pass reads
 * their latest contents anyway. Thread-safe. */
#pragma once

#include "drafter/block_device.h"

enum dirty_tracker_mode {
        DIRTY_TRACK_ALL,        /* every write is tracked */
        DIRTY_TRACK_AFTER_READ, /* a block is tracked once it was read through read_tracked */
};

/* Wrap `inner` (ownership passes to the tracker). */
int dirty_tracker_wrap(struct block_device *inner, enum dirty_tracker_mode mode, struct block_device **ret_dev);

/* The migrator's read: starts tracking the blocks in range, then reads them. */
int dirty_tracker_read_tracked(struct block_device *dev, void *buf, size_t len, uint64_t off);

/* Start tracking every block (e.g. when the destination already has the contents). */
/* Like dirty_tracker_read_tracked(), without the copy: starts tracking the range and returns the
 * inner device's memory for it (block_device_map), or NULL (nothing tracked) if it has none. */
const void *dirty_tracker_map_tracked(struct block_device *dev, size_t len, uint64_t off);

void dirty_tracker_track_all(struct block_device *dev);

/* Take the dirty blocks and reset them: *ret_blocks (malloc'd, ascending) gets *ret_count indices. */
int dirty_tracker_collect(struct block_device *dev, uint64_t **ret_blocks, size_t *ret_count);

/* Number of blocks dirty right now (without resetting). */
uint64_t dirty_tracker_pending(struct block_device *dev);

/* The wrapped device. */
struct block_device *dirty_tracker_inner(struct block_device *dev);
