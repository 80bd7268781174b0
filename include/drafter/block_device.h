/* block_device.h — one block device, whatever stands behind it, and the providers that make one.
 *
 * A provider fills in `struct block_device_ops` and embeds `struct block_device` first. Callers go
 * through block_device_read_at()/…, the one place that checks offsets and lengths, so providers
 * never see a range outside [0, size). Devices of any size are allowed: the last block may be short
 * (no padding to a multiple of the block size). Unless a provider says otherwise, every op is
 * thread-safe for concurrent calls; concurrent writes to the same bytes land in some order, as on a disk. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct block_device;

struct block_device_ops {
        int (*read_at)(struct block_device *dev, void *buf, size_t len, uint64_t off);
        int (*write_at)(struct block_device *dev, const void *buf, size_t len, uint64_t off);
        int (*flush)(struct block_device *dev);
        /* Optional: deallocate the range; it reads as zeros afterwards. NULL: zeros are written. */
        int (*discard)(struct block_device *dev, size_t len, uint64_t off);
        /* Optional: the device's own memory for [off, off + len), valid until close: reading it
         * reads the device, writing it writes the device. NULL from devices without such memory
         * (and from every layer that must see each access, such as trackers and caches). */
        void *(*map)(struct block_device *dev, size_t len, uint64_t off);
        void (*close)(struct block_device *dev);
};

struct block_device {
        const struct block_device_ops *ops;
        char *name; /* "memory", "disk", … for messages; owned */
        uint64_t size;
        uint32_t block_size;
};

/* Set the common part; takes a copy of name. */
int block_device_init(struct block_device *dev, const struct block_device_ops *ops, const char *name,
                      uint64_t size, uint32_t block_size);

int block_device_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off);
int block_device_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off);
int block_device_flush(struct block_device *dev);
int block_device_discard(struct block_device *dev, size_t len, uint64_t off);
/* The device's memory for the range (see `map` above), or NULL: then use read_at/write_at. */
void *block_device_map(struct block_device *dev, size_t len, uint64_t off);
/* Close and free; NULL is fine. */
void block_device_close(struct block_device *dev);

static inline uint64_t block_device_block_count(const struct block_device *dev) {
        return (dev->size + dev->block_size - 1) / dev->block_size;
}

/* Length of block `index` (the last one may be short). */
static inline size_t block_device_block_length(const struct block_device *dev, uint64_t index) {
        uint64_t start = index * dev->block_size;
        uint64_t left = dev->size - start;
        return left < dev->block_size ? (size_t)left : dev->block_size;
}

static inline void block_device_closep(struct block_device **dev) {
        block_device_close(*dev);
}
#define _cleanup_block_device_ __attribute__((cleanup(block_device_closep)))

/* True if all len bytes are zero. */
bool buffer_is_zero(const void *buf, size_t len);

/* ---- providers ---- */

enum file_device_flags {
        FILE_DEVICE_READ_ONLY = 1 << 0,
        FILE_DEVICE_CREATE = 1 << 1, /* create (or resize a new file) to `size` */
        FILE_DEVICE_SPARSE = 1 << 2, /* whole zero blocks are written as holes; discard punches holes */
};

/* A file or block device through pread/pwrite. size 0 means "the file's current size". With
 * FILE_DEVICE_CREATE a missing file is created with `size`; an existing file keeps its contents and
 * must have exactly `size` bytes unless size is 0. */
int file_device_open(const char *name, const char *path, unsigned flags, uint64_t size, uint32_t block_size,
                     struct block_device **ret_dev);

/* The file descriptor behind a file device (for fsync/syncfs by callers that need it). */
int file_device_fd(struct block_device *dev);

/* Anonymous memory, zero-filled, reserved lazily. */
int memory_device_open(const char *name, uint64_t size, uint32_t block_size, struct block_device **ret_dev);
