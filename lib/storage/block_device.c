/* block_device.c — the one place that checks the block device contract (see block_device.h). */
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

int block_device_init(struct block_device *dev, const struct block_device_ops *ops, const char *name,
                      uint64_t size, uint32_t block_size) {
        if (block_size == 0)
                return error_set(-EINVAL, "%s: block size must not be zero", name);
        dev->ops = ops;
        dev->size = size;
        dev->block_size = block_size;
        dev->name = strdup(name);
        return dev->name ? 0 : -ENOMEM;
}

static int check_range(struct block_device *dev, const char *what, size_t len, uint64_t off) {
        if (off > dev->size || len > dev->size - off)
                return error_set(-ERANGE, "%s: %s of %zu bytes at offset %" PRIu64 " beyond size %" PRIu64,
                                 dev->name, what, len, off, dev->size);
        return 0;
}

int block_device_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        int r = check_range(dev, "read", len, off);
        if (r < 0 || len == 0)
                return r;
        return dev->ops->read_at(dev, buf, len, off);
}

int block_device_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        int r = check_range(dev, "write", len, off);
        if (r < 0 || len == 0)
                return r;
        return dev->ops->write_at(dev, buf, len, off);
}

int block_device_flush(struct block_device *dev) {
        return dev->ops->flush ? dev->ops->flush(dev) : 0;
}

void *block_device_map(struct block_device *dev, size_t len, uint64_t off) {
        if (!dev->ops->map || len == 0 || off > dev->size || len > dev->size - off)
                return NULL;
        return dev->ops->map(dev, len, off);
}

int block_device_discard(struct block_device *dev, size_t len, uint64_t off) {
        int r = check_range(dev, "discard", len, off);
        if (r < 0 || len == 0)
                return r;
        if (dev->ops->discard)
                return dev->ops->discard(dev, len, off);

        /* No native discard: write zeros, a block at a time. */
        size_t chunk = MIN(len, (size_t)dev->block_size);
        _cleanup_free_ void *zeros = calloc(1, chunk);
        if (!zeros)
                return -ENOMEM;
        while (len > 0) {
                size_t n = MIN(len, chunk);
                r = dev->ops->write_at(dev, zeros, n, off);
                if (r < 0)
                        return r;
                len -= n;
                off += n;
        }
        return 0;
}

void block_device_close(struct block_device *dev) {
        if (!dev)
                return;
        char *name = dev->name;
        dev->ops->close(dev);
        free(name);
}
