/* migrate.h — device migration over one stream connection (docs/protocol.md).
 *
 * Source: migrate_source_run() sends every device in volatility order (NEED_AT requests first),
 * runs pre-copy dirty cycles, suspends through a hook, invalidates what changed, transfers
 * authority and streams the rest (post-copy). Destination: migrate_destination_start() receives
 * into devices it asks the caller to open, wraps each in a waiting cache so reads of blocks that
 * have not arrived wait (and ask for them), and calls a hook when it takes authority. */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "drafter/bitmap.h"
#include "drafter/block_device.h"
#include "drafter/migrate_frame.h"
#include "drafter/volatility_monitor.h"

struct s3_sync;

/* A device this side keeps in S3 (s3_sync.h): the bucket, and the sync that knows which objects
 * are current. The migration pauses the sync, tells the destination the bucket and the current
 * objects (S3 frame), and skips their blocks; it resumes the sync if it keeps the devices. */
struct migrate_source_s3 {
        struct s3_sync *sync;
        struct migrate_s3_info info; /* bitmap/objects unused: the sync's snapshot is sent */
};

struct migrate_source_device {
        const char *name;
        struct block_device *dev;       /* top of the stack: a dirty tracker (DIRTY_TRACK_AFTER_READ) */
        struct volatility_monitor *vm;  /* NULL: index order */
        const struct bitmap *only;      /* sharedbase: send only these blocks (the overlay's presence) */
        int64_t max_dirty_blocks, min_cycles, max_cycles, cycle_throttle_ns;
        const struct bitmap *zero;      /* lazy: blocks known to be all zeros, sent as zero runs ahead of the
                                         * hand-over (NULL: none known) */
        const struct migrate_source_s3 *s3; /* NULL: not in S3 (ignored for sharedbase and lazy) */
        /* While the VM is paused its final blocks go first, all of them, then EVENT FINAL: for a
         * small device the destination reads before it resumes (the VM's state), so it can start
         * on it while the rest of the final set follows. */
        bool final_first;
};

struct migrate_source_config {
        const struct migrate_source_device *devices;
        size_t count;
        /* Before each dirty collection: make writes visible to the trackers (FUSE write-back). */
        int (*before_collect)(void *ctx);
        /* Pause the VM and save its state; after it, nothing writes to the devices. */
        int (*suspend)(void *ctx);
        void *ctx;
        bool compress; /* offer zstd */
        /* Progress lines ("Migrated X of Y initial blocks for local device N") through log_info. */
        bool progress;
        /* Blocks queued for one write at most (0: 16, at most MIGRATE_MAX_BATCH); blocks that must be copied out of their
         * device take a buffer each, so this also bounds the sender's buffer memory. */
        unsigned concurrency;
        /* Final dirty blocks go ahead of the hand-over (instead of after it, on demand) when the
         * link, at the rate it kept during the bulk pass, sends them within this time (at least
         * 2 MiB of them: state and config take that much). 0: never, always post-copy. */
        uint64_t push_budget_ns;
        /* Hand over at once: no bulk pass, no cycles, no suspend; AUTHORITY goes right after the
         * handshake and every block follows it, NEED_AT requests first, then in device order.
         * For devices nothing writes to while they are served (drafter-registry's package), so
         * the destination starts its VM before anything has arrived and fetches on demand. */
        bool lazy;
        /* Lazy: shared by every migration of one package (drafter-registry's peers), the time of
         * the last NEED_AT any of them received; all hold back their background blocks while any
         * destination's VM is faulting, since they share the link. NULL: this migration only. */
        uint64_t *demand_group;
};

#define MIGRATE_MAX_BATCH 64

struct migrate_stats {
        uint64_t blocks_sent, zero_blocks, compressed_blocks, bytes_sent, bytes_received;
        uint64_t need_at_served, cycles, final_dirty_blocks;
        uint64_t postcopy_blocks; /* destination: blocks that arrived after it took authority */
        uint64_t bulk_ns, cycles_ns, suspend_ns, authority_ns, total_ns;
        uint64_t s3_blocks;          /* source: left to S3; destination: arrived from S3 */
        uint64_t s3_bytes;           /* destination: bytes fetched from S3 */
        uint64_t s3_fallback_blocks; /* destination: asked over the link after S3 failed */
        uint64_t authority_sent_at_ns; /* source: CLOCK_MONOTONIC when AUTHORITY was written; 0: never */
        /* The destination acknowledged authority, or may have: AUTHORITY was sent and no ERROR
         * from the destination came ahead of an acknowledgement. */
        bool authority_transferred;
        bool completed;             /* the destination acknowledged completion */
        bool final_pushed;          /* source: the final dirty blocks went before the hand-over */
};

/* Run the source side on a connected stream fd (not closed). 0 when the destination has
 * acknowledged completion. On error, stats->authority_transferred tells whether the source may
 * resume its VM (false) or must not (true: the destination may be running). */
int migrate_source_run(int fd, const struct migrate_source_config *cfg, struct migrate_stats *ret_stats);

struct migrate_destination_config {
        /* Open (create) the local device for `info`; it starts with the destination's base
         * contents (for SHAREDBASE devices the unsent blocks are read from it). */
        int (*open_device)(void *ctx, const struct migrate_device_info *info, struct block_device **ret_dev);
        /* Called once when this side takes authority (resume the VM here). */
        int (*on_authority)(void *ctx);
        void *ctx;
        bool disable_postcopy;    /* take authority only when every block is local */
        uint64_t read_timeout_ns; /* how long a read waits for a missing block; 0: forever */
        /* Optional, called on the receiving thread in the order of the stream: blocks [first,
         * first+count) of device `index` arrived (are present now; `zero`: all zeros, a zero
         * run; `data`: a single block's contents as written, valid for the call only, or NULL);
         * block `block` is about to go missing again (a DIRTY list). on_authority is called on
         * the same thread. */
        void (*on_blocks)(void *ctx, size_t index, uint64_t first, uint64_t count, bool zero, const void *data);
        void (*on_dirty)(void *ctx, size_t index, uint64_t block);
        /* Optional, on the receiving thread: device `index` holds its final contents (EVENT
         * FINAL, checked: no block missing) ahead of the hand-over. */
        void (*on_final)(void *ctx, size_t index, const char *name);
        /* Optional, on the receiving thread: the source asked for a barrier (EVENT BARRIER), the
         * last thing it does before it suspends the VM; called before the answer goes. */
        void (*on_barrier)(void *ctx);
        /* This side will call migrate_destination_ready() (MIGRATE_CAP_READY): the source holds
         * its dirty cycles and the suspend until then. */
        bool announce_ready;
};

struct migrate_destination;

/* Handshake on fd (taken over), then receive in a background thread. */
int migrate_destination_start(int fd, const struct migrate_destination_config *cfg,
                              struct migrate_destination **ret_dest);
size_t migrate_destination_device_count(struct migrate_destination *d);
const struct migrate_device_info *migrate_destination_device_info(struct migrate_destination *d, size_t i);
/* The device as the VM should see it: reads of missing blocks wait for them. */
struct block_device *migrate_destination_device(struct migrate_destination *d, size_t i);
/* Take ownership of device i (the caller closes it, after migrate_destination_free: the receiving
 * thread keeps using it until then). */
struct block_device *migrate_destination_take_device(struct migrate_destination *d, size_t i);
/* Wait for the end: 0 after COMPLETED_ACK was sent, or the error that ended it. */
int migrate_destination_wait(struct migrate_destination *d, struct migrate_stats *ret_stats);
/* Give up a migration that has not handed over yet (SIGINT): the source is told, keeps its
 * devices, and migrate_destination_wait() returns -EINTR. -EBUSY once this side has taken
 * authority: then the devices are ours and the rest must arrive. */
int migrate_destination_abort(struct migrate_destination *d);
/* With announce_ready: this side can take the VM now (EVENT READY, if the source understands it;
 * once). */
int migrate_destination_ready(struct migrate_destination *d);
/* True if the source announced a lazy migration (MIGRATE_CAP_LAZY): it hands over at once and
 * the VM will fault its memory in over the link. */
bool migrate_destination_lazy(const struct migrate_destination *d);
/* True once the migration has ended (completed or failed): migrate_destination_wait() will not block. */
bool migrate_destination_finished(struct migrate_destination *d);
/* Device i's S3 bucket as the source sent it, or NULL; *ret_current (if not NULL) gets the
 * objects that still hold device i's contents (none of their blocks came over the link). */
const struct migrate_s3_info *migrate_destination_s3(struct migrate_destination *d, size_t i,
                                                     const struct bitmap **ret_current);
/* Closes the devices too. */
void migrate_destination_free(struct migrate_destination *d);
