/* cow_device.h — copy-on-write device: a read-only base shared by many instances, a private
 * overlay with the blocks this instance changed, and a state file with the per-block
 * "present in overlay" bitmap.
 *
 * Crash consistency: a block's bit reaches the state file only after its data is durable in the
 * overlay (cow flush = fdatasync(overlay), then write the changed bitmap words, then
 * fdatasync(state)). After a crash every block reads what the last flush made durable or something
 * written later; never bytes that were not written. Writes since the last flush to blocks that
 * were not yet present read as the base again. Reopening an existing overlay+state continues from
 * the last flush. The state file has a header (magic, version, sizes) so a mismatched base,
 * overlay or block size is refused with a clear error instead of read as garbage. */
#pragma once

#include "drafter/bitmap.h"
#include "drafter/block_device.h"

struct cow_config {
        const char *name;    /* device name for messages */
        const char *base;    /* read-only base file */
        const char *overlay; /* created if missing */
        const char *state;   /* created if missing */
        uint32_t block_size;
};

int cow_device_open(const struct cow_config *cfg, struct block_device **ret_dev);

/* Same, on a base device the caller already has (shared by several instances; not closed by us). */
int cow_device_open_on(struct block_device *base, const char *overlay, const char *state,
                       struct block_device **ret_dev);

/* The presence bitmap (a block is in the overlay). Read-only view for migration (`sharedbase`). */
const struct bitmap *cow_device_present(struct block_device *dev);

/* Number of blocks present in the overlay. */
uint64_t cow_device_present_count(struct block_device *dev);

/* State file header size in bytes; the bitmap follows it. */
#define COW_STATE_HEADER_SIZE 4096u

/* A copy-on-write device whose overlay and state live in unlinked files under $TMPDIR (or
 * /var/tmp): writes stay private to this process and vanish with it, even after a crash. */
int cow_device_open_private(const char *name, const char *base, uint32_t block_size,
                            struct block_device **ret_dev);
