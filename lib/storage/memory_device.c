/* memory_device.c — a device in anonymous memory (tests, staging, receive buffers). */
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

struct memory_device {
        struct block_device dev;
        unsigned char *data;
        size_t mapped;
};

static struct memory_device *to_memory(struct block_device *dev) {
        return (struct memory_device *)dev;
}

static int memory_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        memcpy(buf, to_memory(dev)->data + off, len);
        return 0;
}

static int memory_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        memcpy(to_memory(dev)->data + off, buf, len);
        return 0;
}

static int memory_discard(struct block_device *dev, size_t len, uint64_t off) {
        struct memory_device *m = to_memory(dev);
        uint64_t first = (off + 4095) & ~4095ULL, last = (off + len) & ~4095ULL;
        if (first < last && madvise(m->data + first, (size_t)(last - first), MADV_DONTNEED) == 0) {
                memset(m->data + off, 0, (size_t)(first - off));
                memset(m->data + last, 0, (size_t)(off + len - last));
        } else {
                memset(m->data + off, 0, len);
        }
        return 0;
}

static void *memory_map(struct block_device *dev, size_t len, uint64_t off) {
        (void)len;
        return to_memory(dev)->data + off;
}

static void memory_close(struct block_device *dev) {
        struct memory_device *m = to_memory(dev);
        munmap(m->data, m->mapped);
        free(m);
}

static const struct block_device_ops memory_ops = {
        .read_at = memory_read_at,
        .write_at = memory_write_at,
        .discard = memory_discard,
        .map = memory_map,
        .close = memory_close,
};

int memory_device_open(const char *name, uint64_t size, uint32_t block_size, struct block_device **ret_dev) {
        _cleanup_free_ struct memory_device *m = calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->mapped = size ? (size_t)size : 1;
        m->data = mmap(NULL, m->mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m->data == MAP_FAILED)
                return error_set_errno(-errno, "%s: cannot reserve %" PRIu64 " bytes of memory", name, size);
        /* Huge pages where the kernel allows them on request: a 1 GiB device then takes 512
         * page faults to fill, not 262,144. Advice only; failure changes nothing. */
        (void)madvise(m->data, m->mapped, MADV_HUGEPAGE);
        int r = block_device_init(&m->dev, &memory_ops, name, size, block_size);
        if (r < 0) {
                munmap(m->data, m->mapped);
                return r;
        }
        *ret_dev = &TAKE_PTR(m)->dev;
        return 0;
}
