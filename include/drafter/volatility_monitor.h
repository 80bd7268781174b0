/* volatility_monitor.h — how often each block changed recently, to migrate stable blocks first
 * and hot ones last.
 *
 * Each block has a write counter (saturating at 63) that halves every `half_life_ns` (the
 * device's `expiry`), so "recent" fades out exponentially. Blocks sit in one list per counter
 * value; a write moves a block one list up (O(1)); halving merges lists pairwise (O(64), never a
 * scan of the blocks); taking the least volatile block looks at most at 64 list heads (O(1)).
 * Thread-safe (one mutex). Times are passed in so tests can drive the clock. */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "drafter/block_device.h"

#define VOLATILITY_MAX_COUNT 63u

struct volatility_monitor;

int volatility_monitor_new(uint64_t block_count, uint64_t half_life_ns, uint64_t now_ns,
                           struct volatility_monitor **ret_vm);
void volatility_monitor_free(struct volatility_monitor *vm);

/* Record a write to `block`. */
void volatility_monitor_touch(struct volatility_monitor *vm, uint64_t block, uint64_t now_ns);
/* Recent write count of `block` (0…63). */
unsigned volatility_monitor_count(struct volatility_monitor *vm, uint64_t block, uint64_t now_ns);

/* The queue of blocks still to send: initially all blocks, in index order within equal counts. */
/* Take the least volatile queued block; -ENOENT when the queue is empty. */
int volatility_monitor_pop_least(struct volatility_monitor *vm, uint64_t now_ns, uint64_t *ret_block);
/* Put a block back in the queue (no-op if queued). */
void volatility_monitor_push(struct volatility_monitor *vm, uint64_t block, uint64_t now_ns);
uint64_t volatility_monitor_queued(struct volatility_monitor *vm);

/* Stable sort of a list of blocks by recent count, least volatile first (O(n + 64)). */
int volatility_monitor_sort(struct volatility_monitor *vm, uint64_t *blocks, size_t count, uint64_t now_ns);

/* A device layer that touches the monitor on every write (the monitor is not owned; `inner` is). */
int volatility_device_wrap(struct block_device *inner, struct volatility_monitor *vm, struct block_device **ret_dev);
