/* s3_sync.h — a device kept in an S3 bucket while it is used, and fetched back from it.
 *
 * Layout (docs/design.md "S3"): the device is cut into objects of `object_size` bytes (a
 * multiple of its block size; 1 MiB by default, or the block size if larger), object i stored as
 * key "<prefix>/<device>/<i as 16 hex digits>"; the last object may be shorter. A marker object
 * "<prefix>/<device>/layout" says the device size and object size. The prefix names one VM across
 * a migration chain, so each peer continues where the previous one stopped.
 *
 * s3_sync: background upload. Writes are found through a DIRTY_TRACK_ALL dirty tracker; an object
 * is uploaded once it has not changed for `min_age` (hot objects are not re-uploaded on every
 * write) but at the latest `max_age` after it first changed; all-zero objects are not uploaded.
 * An object is "current" once an upload of data read after its last change has completed. When
 * S3 fails, uploads back off (up to 5 s) and resume when it answers again; the device is never
 * blocked. For a migration: s3_sync_pause() (no upload in flight afterwards), then
 * s3_sync_snapshot() tells which objects S3 holds current; writes after it are the migration's.
 *
 * s3_fetch: background download of a set of objects with `concurrency` requests at once, in
 * order, objects somebody waits for first; an object that cannot be fetched (after the client's
 * retries) is given back through `failed`, and after 3 such in a row every remaining one is: the
 * caller then gets those blocks elsewhere (the migration's peer link). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#include "drafter/bitmap.h"
#include "drafter/block_device.h"
#include "drafter/s3.h"

#define S3_OBJECT_SIZE_DEFAULT (1u << 20)
#define S3_PREFIX_MAX 128
#define S3_MAX_CONCURRENCY 64

/* The object size for a device of this block size. */
uint32_t s3_object_size(uint32_t block_size);
uint64_t s3_object_count(uint64_t size, uint32_t object_size);
void s3_object_key(char *out, size_t size, const char *prefix, const char *device, uint64_t object);
/* A new random prefix ("drafter/<16 hex digits>"). */
int s3_new_prefix(char out[S3_PREFIX_MAX + 1]);
/* A prefix as it may come from a peer: 1-128 of A-Z a-z 0-9 . _ - /, no "..", no leading '/'. */
bool s3_valid_prefix(const char *prefix);

struct s3_sync_options {
        struct s3_client *client; /* not owned; outlives the sync */
        const char *prefix, *device;
        /* A DIRTY_TRACK_ALL dirty tracker over the device: collected and read by the sync. */
        struct block_device *tracker;
        uint32_t object_size;
        unsigned concurrency;         /* uploads at once (1..S3_MAX_CONCURRENCY; 0: 8) */
        const struct bitmap *current; /* objects S3 already holds current (a migration said so); NULL: none */
        uint64_t min_age_ns, max_age_ns; /* 0: 1 s and 30 s */
        uint64_t max_rate;               /* bytes/s of uploads, 0: unlimited */
};

struct s3_sync;

struct s3_sync_stats {
        uint64_t objects, current, uploads, upload_bytes, failures, zero_objects;
        bool first_pass_done; /* every object was current (or zero) at least once */
};

int s3_sync_start(const struct s3_sync_options *o, struct s3_sync **ret);
void s3_sync_pause(struct s3_sync *s);
void s3_sync_resume(struct s3_sync *s);
/* While paused: collect the tracker's changes and set *current (nbits = object count, bitmap_init'ed by
 * the caller) to the objects S3 holds current. */
int s3_sync_snapshot(struct s3_sync *s, struct bitmap *current);
void s3_sync_get_stats(struct s3_sync *s, struct s3_sync_stats *ret);
/* Stops the uploads (waits for those in flight). NULL is fine. */
void s3_sync_free(struct s3_sync *s);

struct s3_fetch_options {
        struct s3_client *client; /* not owned */
        const char *prefix, *device;
        uint64_t size;
        uint32_t object_size;
        unsigned concurrency;
        const struct bitmap *objects; /* which to fetch (copied) */
        /* From the fetching threads: object `object`'s data (exactly its length). */
        void (*deliver)(void *ctx, uint64_t object, const uint8_t *data, size_t len);
        /* From the fetching threads: this object will not come from S3. */
        void (*failed)(void *ctx, uint64_t object);
        void *ctx;
};

struct s3_fetch;

struct s3_fetch_stats {
        uint64_t fetched, bytes, failed;
        bool gave_up; /* S3 failed 3 times in a row: everything left was given back */
};

int s3_fetch_start(const struct s3_fetch_options *o, struct s3_fetch **ret);
/* Somebody waits for this object: fetch it next (if it is still to be fetched). */
void s3_fetch_prioritize(struct s3_fetch *f, uint64_t object);
/* True once every object was delivered or given back. */
bool s3_fetch_done(struct s3_fetch *f);
void s3_fetch_get_stats(struct s3_fetch *f, struct s3_fetch_stats *ret);
/* Stops (waits for requests in flight; objects not fetched by then are not given back). */
void s3_fetch_stop(struct s3_fetch *f);
void s3_fetch_free(struct s3_fetch *f);

/* ---- a peer's device kept in S3 (drafter-peer, drafter-mounter) ---- */

#include "drafter/device_config.h"
#include "drafter/migrate.h"

struct s3_device {
        struct migrate_source_s3 src; /* what a migration out needs (src.sync once started) */
        struct s3_client *client;
        char name[65];
};

/* From --devices ("s3sync": true): a new key prefix, and the bucket checked at once (a marker
 * object "<prefix>/<device>/layout" is written), so wrong credentials fail at start. */
int s3_device_from_config(const struct device_config *c, uint64_t size, struct s3_device **ret);
/* From a migration in: the source's bucket and prefix (later peers need no S3 configuration). */
int s3_device_from_received(const char *name, const struct migrate_s3_info *info, struct s3_device **ret);
/* Start uploading: `tracker` is a DIRTY_TRACK_ALL dirty tracker in the device's stack, `current`
 * the objects S3 already holds (NULL: none). */
int s3_device_start(struct s3_device *d, struct block_device *tracker, const struct bitmap *current);
void s3_device_free(struct s3_device *d);
