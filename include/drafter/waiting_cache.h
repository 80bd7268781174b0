/* waiting_cache.h — the receiving side of a migration: a device layer whose missing blocks make
 * readers wait until the block arrives (post-copy).
 *
 * A read that touches a missing block calls `need(ctx, block)` at once (at most once per block
 * while it is missing: the migration sends a NeedAt for it ahead of the bulk stream), then waits
 * until the block is supplied, the timeout passes (-ETIMEDOUT) or the cache is cancelled. A local
 * write of a whole missing block makes it present (a later arrival of that block is dropped); a
 * partial write waits for the block first, like a read. Thread-safe. */
#pragma once

#include "drafter/block_device.h"

typedef void (*waiting_cache_need_fn)(void *ctx, uint64_t block);

/* All blocks start missing. `inner` is owned. timeout_ns 0 = wait forever. */
int waiting_cache_wrap(struct block_device *inner, waiting_cache_need_fn need, void *ctx, uint64_t timeout_ns,
                       struct block_device **ret_dev);

enum waiting_cache_supply_flags {
        /* Drop the data if the block is already present (post-copy: the local copy is newer). */
        WAITING_CACHE_IF_MISSING = 1 << 0,
};

/* Write block `block` (data of the block's length) into the inner device and mark it present;
 * wakes readers waiting for it. Returns 1 if written, 0 if dropped. */
int waiting_cache_supply(struct block_device *dev, uint64_t block, const void *data, unsigned flags);

/* Supply without a copy: when the inner device has memory (block_device_map), call
 * fill(ctx, memory, length) to write the block's data straight into it, then mark it present.
 * When the block is dropped (IF_MISSING and present) fill gets NULL and must consume its source
 * anyway. -EOPNOTSUPP (without calling fill) if the inner device has no memory. Returns 1 if
 * written, 0 if dropped, or fill's error (the block stays missing). */
int waiting_cache_supply_direct(struct block_device *dev, uint64_t block, unsigned flags,
                                int (*fill)(void *ctx, void *dst, size_t len), void *ctx);

/* Mark blocks present without data (the inner device already holds them). */
void waiting_cache_mark_present(struct block_device *dev, uint64_t first, uint64_t count);
/* Mark a block missing again (its contents changed at the source). */
void waiting_cache_invalidate(struct block_device *dev, uint64_t block);
/* Fail every waiting and future read of a missing block with `err` (e.g. -ECONNRESET). */
void waiting_cache_cancel(struct block_device *dev, int err, const char *why);

uint64_t waiting_cache_missing(struct block_device *dev);
/* True if the block has arrived (a read of it does not wait). */
bool waiting_cache_present(struct block_device *dev, uint64_t block);
struct block_device *waiting_cache_inner(struct block_device *dev);
