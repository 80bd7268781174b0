/* device_config.h — the --devices JSON shared by every drafter tool.
 *
 * Each tool accepts the fields of its schema (snapshotter: name/input/output; packager: name/path;
 * peer, mounter, registry: name/base/overlay/state plus migration and S3 settings). Unknown fields,
 * wrong types and impossible values are rejected with one line naming the device and the field.
 * Durations are integers of nanoseconds, as in Drafter. Omitted fields take the defaults of the
 * seeds' --help output (blockSize 65536, expiry 1s, maxDirtyBlocks 200, minCycles 5, maxCycles 20,
 * cycleThrottle 500ms, makeMigratable true). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum device_schema {
        DEVICE_SCHEMA_SNAPSHOTTER,
        DEVICE_SCHEMA_PACKAGER,
        DEVICE_SCHEMA_PEER, /* drafter-peer, drafter-mounter, drafter-registry */
};

#define DEVICE_DEFAULT_BLOCK_SIZE 65536u
#define DEVICE_MIN_BLOCK_SIZE 512u
#define DEVICE_MAX_BLOCK_SIZE (64u << 20)
#define DEVICE_NAME_MAX 64

/* The --devices default of drafter-mounter and drafter-registry, as the seeds' --help prints it:
 * the six package devices with base, overlay and state under out/ and the default settings. */
#define DEVICE_DEFAULT_FIELDS_(name, file)                                                                          \
        "{\"name\":\"" name "\",\"base\":\"out/package/" file "\",\"overlay\":\"out/overlay/" file             \
        "\",\"state\":\"out/state/" file "\",\"blockSize\":65536,\"expiry\":1000000000,\"maxDirtyBlocks\":200,"   \
        "\"minCycles\":5,\"maxCycles\":20,\"cycleThrottle\":500000000,\"makeMigratable\":true}"
#define DEVICE_DEFAULT_MIGRATION_DEVICES                                                                            \
        "[" DEVICE_DEFAULT_FIELDS_("state", "state.bin") ", " DEVICE_DEFAULT_FIELDS_("memory", "memory.bin") ", "   \
        DEVICE_DEFAULT_FIELDS_("kernel", "vmlinux") ", " DEVICE_DEFAULT_FIELDS_("disk", "rootfs.ext4") ", "          \
        DEVICE_DEFAULT_FIELDS_("config", "config.json") ", " DEVICE_DEFAULT_FIELDS_("oci", "oci.ext4") "]"

struct device_s3 {
        bool sync;
        char *access_key;
        char *secret_key;
        char *endpoint;
        bool secure;
        char *bucket;
        int64_t concurrency;
};

struct device_config {
        char *name;
        char *input;   /* snapshotter: blueprint file to start from ("" = none) */
        char *output;  /* snapshotter: where the package file is written */
        char *path;    /* packager: the file that goes into / comes out of the archive */
        char *base;    /* peer: read-only package file */
        char *overlay; /* peer: private copy-on-write data ("" = none) */
        char *state;   /* peer: presence bitmap of the overlay */
        uint32_t block_size;
        int64_t expiry_ns;
        int64_t max_dirty_blocks;
        int64_t min_cycles;
        int64_t max_cycles;
        int64_t cycle_throttle_ns;
        bool make_migratable;
        bool shared;     /* write to base directly, no overlay */
        bool sharedbase; /* base is identical on every peer: migrate only overlay blocks */
        struct device_s3 s3;
};

struct device_list {
        size_t count;
        struct device_config *devices;
};

/* Parse and validate. On error returns -EINVAL and sets error_message() to one line such as
 * `devices: device "memory": field "blockSize": must be a power of two from 512 to 67108864, got 1000`. */
int device_list_parse(const char *json, enum device_schema schema, struct device_list *ret_list);
void device_list_free(struct device_list *list);

const struct device_config *device_list_find(const struct device_list *list, const char *name);

/* Check the files a tool is about to read: for the snapshotter every non-empty `input`, for the
 * packager (when archiving) every `path`, for peers every `base` (writable too when `shared`).
 * Each must exist, be a regular file or block device, and be readable. */
int device_list_check_inputs(const struct device_list *list, enum device_schema schema);
