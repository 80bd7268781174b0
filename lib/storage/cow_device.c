/* cow_device.c — copy-on-write over a shared read-only base (see cow_device.h).
 *
 * State file layout (little-endian):
 *   0   magic "DRFTCOW\0"     8 bytes
 *   8   version (1)           u32
 *   12  block size            u32
 *   16  device size           u64
 *   24  block count           u64
 *   32  header checksum       u64  (FNV-1a over bytes 0..31)
 *   …   zero up to COW_STATE_HEADER_SIZE
 *   4096 presence bitmap, one bit per block, in 64-bit words
 */
#include "drafter/cow_device.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/fs.h"
#include "drafter/log.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define COW_MAGIC "DRFTCOW"
#define COW_VERSION 1u
#define COW_LOCK_STRIPES 64

struct cow_state_header {
        char magic[8];
        uint32_t version;
        uint32_t block_size;
        uint64_t size;
        uint64_t block_count;
        uint64_t checksum;
};

struct cow_device {
        struct block_device dev;
        struct block_device *base;
        bool owns_base;
        struct block_device *overlay;
        int state_fd;
        char *state_path;
        struct bitmap present;   /* block is in the overlay (what reads use) */
        struct bitmap unsaved;   /* present bit not yet written to the state file */
        uint64_t *snapshot;      /* bitmap words captured for the state write in progress */
        bool *captured;          /* which words of snapshot are valid */
        pthread_mutex_t flush_lock;
        pthread_mutex_t stripes[COW_LOCK_STRIPES]; /* serialise read-modify-write of one block */
};

static struct cow_device *to_cow(struct block_device *dev) {
        return (struct cow_device *)dev;
}

static uint64_t fnv1a(const void *data, size_t len) {
        const unsigned char *p = data;
        uint64_t h = 0xcbf29ce484222325ULL;
        for (size_t i = 0; i < len; i++)
                h = (h ^ p[i]) * 0x100000001b3ULL;
        return h;
}

static uint64_t header_checksum(const struct cow_state_header *h) {
        return fnv1a(h, offsetof(struct cow_state_header, checksum));
}

static pthread_mutex_t *stripe_for(struct cow_device *c, uint64_t block) {
        return &c->stripes[block % COW_LOCK_STRIPES];
}

/* Read [off, off+len) which lies inside one run of blocks of equal presence. */
static int cow_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        struct cow_device *c = to_cow(dev);
        char *p = buf;
        while (len > 0) {
                uint64_t block = off / dev->block_size;
                bool present = bitmap_test(&c->present, block);
                /* Extend over following blocks with the same presence to read them in one call. */
                uint64_t end_block = block + 1;
                uint64_t last_block = (off + len - 1) / dev->block_size;
                while (end_block <= last_block && bitmap_test(&c->present, end_block) == present)
                        end_block++;
                uint64_t run_end = MIN(end_block * dev->block_size, off + len);
                size_t n = (size_t)(run_end - off);
                int r = block_device_read_at(present ? c->overlay : c->base, p, n, off);
                if (r < 0)
                        return r;
                p += n;
                off += n;
                len -= n;
        }
        return 0;
}

static void cow_mark_present(struct cow_device *c, uint64_t block) {
        bitmap_set(&c->present, block);
        bitmap_set(&c->unsaved, block);
}

/* Write within one block. */
static int cow_write_block(struct cow_device *c, uint64_t block, const char *buf, size_t len, uint64_t off) {
        struct block_device *dev = &c->dev;
        uint64_t block_start = block * dev->block_size;
        size_t block_len = block_device_block_length(dev, block);
        int r;

        if (bitmap_test(&c->present, block))
                return block_device_write_at(c->overlay, buf, len, off);

        pthread_mutex_lock(stripe_for(c, block));
        if (bitmap_test(&c->present, block)) {
                r = block_device_write_at(c->overlay, buf, len, off);
        } else if (len == block_len) {
                r = block_device_write_at(c->overlay, buf, len, off);
                if (r >= 0)
                        cow_mark_present(c, block);
        } else {
                /* First write to this block: copy it up from the base, merged with the new bytes, so
                 * the overlay holds the whole block before its bit says so. */
                char *tmp = malloc(block_len);
                if (!tmp) {
                        r = -ENOMEM;
                } else {
                        r = block_device_read_at(c->base, tmp, block_len, block_start);
                        if (r >= 0) {
                                memcpy(tmp + (off - block_start), buf, len);
                                r = block_device_write_at(c->overlay, tmp, block_len, block_start);
                        }
                        if (r >= 0)
                                cow_mark_present(c, block);
                        free(tmp);
                }
        }
        pthread_mutex_unlock(stripe_for(c, block));
        return r;
}

static int cow_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        struct cow_device *c = to_cow(dev);
        const char *p = buf;
        while (len > 0) {
                uint64_t block = off / dev->block_size;
                size_t n = (size_t)MIN((uint64_t)len, (block + 1) * dev->block_size - off);
                int r = cow_write_block(c, block, p, n, off);
                if (r < 0)
                        return r;
                p += n;
                off += n;
                len -= n;
        }
        return 0;
}

static int cow_discard(struct block_device *dev, size_t len, uint64_t off) {
        struct cow_device *c = to_cow(dev);
        while (len > 0) {
                uint64_t block = off / dev->block_size;
                uint64_t block_start = block * dev->block_size;
                size_t block_len = block_device_block_length(dev, block);
                size_t n = (size_t)MIN((uint64_t)len, block_start + block_len - off);
                int r;
                if (n == block_len) {
                        /* A whole block: zeros in the overlay, whatever the base holds. */
                        pthread_mutex_lock(stripe_for(c, block));
                        r = block_device_discard(c->overlay, n, off);
                        if (r >= 0)
                                cow_mark_present(c, block);
                        pthread_mutex_unlock(stripe_for(c, block));
                } else {
                        char *zeros = calloc(1, n);
                        r = zeros ? cow_write_block(c, block, zeros, n, off) : -ENOMEM;
                        free(zeros);
                }
                if (r < 0)
                        return r;
                off += n;
                len -= n;
        }
        return 0;
}

static int write_full(int fd, const void *buf, size_t len, uint64_t off) {
        const char *p = buf;
        while (len > 0) {
                ssize_t n = pwrite(fd, p, len, (off_t)off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                p += n;
                len -= (size_t)n;
                off += (uint64_t)n;
        }
        return 0;
}

static int cow_flush(struct block_device *dev) {
        struct cow_device *c = to_cow(dev);
        uint64_t words = BITMAP_WORDS(c->present.nbits);
        bool any = false;
        int r;

        pthread_mutex_lock(&c->flush_lock);

        /* 1. Capture the presence words that changed. Every bit captured here was set after its
         *    block's data had been written to the overlay. */
        for (uint64_t w = 0; w < words; w++) {
                c->captured[w] = bitmap_take_word(&c->unsaved, w) != 0;
                if (c->captured[w]) {
                        c->snapshot[w] = __atomic_load_n(&c->present.words[w], __ATOMIC_ACQUIRE);
                        any = true;
                }
        }

        /* 2. Make that data durable before any bit that points at it. */
        r = block_device_flush(c->overlay);

        /* 3. Write the captured words, neighbours in one call, then make them durable. */
        for (uint64_t w = 0; r >= 0 && any && w < words;) {
                if (!c->captured[w]) {
                        w++;
                        continue;
                }
                uint64_t le[256], n = 0;
                while (w + n < words && n < ELEMENTSOF(le) && c->captured[w + n]) {
                        le[n] = htole64(c->snapshot[w + n]);
                        n++;
                }
                r = write_full(c->state_fd, le, n * 8, COW_STATE_HEADER_SIZE + w * 8);
                if (r < 0)
                        error_set_errno(r, "%s: cannot write state file %s", dev->name, c->state_path);
                w += n;
        }
        if (r >= 0 && any && fdatasync(c->state_fd) < 0)
                r = error_set_errno(-errno, "%s: cannot sync state file %s", dev->name, c->state_path);

        if (r < 0) {
                /* Nothing captured may be lost: the next flush writes these words again. */
                for (uint64_t w = 0; w < words; w++)
                        if (c->captured[w])
                                __atomic_fetch_or(&c->unsaved.words[w], c->snapshot[w], __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&c->flush_lock);
        return r;
}

static void cow_close(struct block_device *dev) {
        struct cow_device *c = to_cow(dev);
        /* A clean close persists what was written; a crash keeps what the last flush made durable. */
        if (c->state_fd >= 0 && c->overlay && cow_flush(dev) < 0)
                log_debug("%s", error_message());
        if (c->state_fd >= 0)
                close(c->state_fd);
        block_device_close(c->overlay);
        if (c->owns_base)
                block_device_close(c->base);
        bitmap_free(&c->present);
        bitmap_free(&c->unsaved);
        free(c->snapshot);
        free(c->captured);
        free(c->state_path);
        pthread_mutex_destroy(&c->flush_lock);
        for (size_t i = 0; i < COW_LOCK_STRIPES; i++)
                pthread_mutex_destroy(&c->stripes[i]);
        free(c);
}

static const struct block_device_ops cow_ops = {
        .read_at = cow_read_at,
        .write_at = cow_write_at,
        .flush = cow_flush,
        .discard = cow_discard,
        .close = cow_close,
};

const struct bitmap *cow_device_present(struct block_device *dev) {
        return dev->ops == &cow_ops ? &to_cow(dev)->present : NULL;
}

uint64_t cow_device_present_count(struct block_device *dev) {
        return dev->ops == &cow_ops ? bitmap_count(&to_cow(dev)->present) : 0;
}

static void header_fill(struct cow_state_header *h, const struct block_device *base) {
        memset(h, 0, sizeof(*h));
        memcpy(h->magic, COW_MAGIC, 8);
        h->version = htole32(COW_VERSION);
        h->block_size = htole32(base->block_size);
        h->size = htole64(base->size);
        h->block_count = htole64(block_device_block_count(base));
        h->checksum = htole64(header_checksum(h));
}

/* Create a fresh state file (header + empty bitmap) atomically. */
static int state_create(const char *name, const char *path, const struct block_device *base) {
        size_t bitmap_bytes = BITMAP_WORDS(block_device_block_count(base)) * 8;
        size_t total = COW_STATE_HEADER_SIZE + bitmap_bytes;
        _cleanup_free_ char *buf = calloc(1, total);
        if (!buf)
                return -ENOMEM;
        header_fill((struct cow_state_header *)buf, base);
        int r = fs_write_file_atomic(path, buf, total);
        if (r < 0)
                return error_prefix(r, "%s: state", name);
        return 0;
}

static int state_load(struct cow_device *c, const char *path) {
        const char *name = c->dev.name;
        struct cow_state_header h, want;
        ssize_t n = pread(c->state_fd, &h, sizeof(h), 0);
        if (n < 0)
                return error_set_errno(-errno, "%s: cannot read state file %s", name, path);
        if ((size_t)n < sizeof(h) || memcmp(h.magic, COW_MAGIC, 8) != 0)
                return error_set(-EINVAL, "%s: state file %s is not a drafter copy-on-write state file", name,
                                 path);
        if (le64toh(h.checksum) != header_checksum(&h))
                return error_set(-EINVAL, "%s: state file %s has a corrupt header (checksum mismatch)", name, path);
        if (le32toh(h.version) != COW_VERSION)
                return error_set(-EINVAL, "%s: state file %s has version %u, this build reads version %u", name,
                                 path, le32toh(h.version), COW_VERSION);
        header_fill(&want, c->base);
        if (h.block_size != want.block_size)
                return error_set(-EINVAL, "%s: state file %s was made with block size %u, not %u", name, path,
                                 le32toh(h.block_size), c->base->block_size);
        if (h.size != want.size)
                return error_set(-EINVAL, "%s: state file %s is for a device of %" PRIu64 " bytes, base has %" PRIu64,
                                 name, path, le64toh(h.size), c->base->size);

        uint64_t words = BITMAP_WORDS(c->present.nbits);
        struct stat st;
        if (fstat(c->state_fd, &st) < 0)
                return error_set_errno(-errno, "%s: cannot stat state file %s", name, path);
        if ((uint64_t)st.st_size < COW_STATE_HEADER_SIZE + words * 8)
                return error_set(-EINVAL, "%s: state file %s is truncated (%lld bytes, expected %" PRIu64 ")", name,
                                 path, (long long)st.st_size, COW_STATE_HEADER_SIZE + words * 8);
        for (uint64_t w = 0; w < words; w++) {
                uint64_t le;
                if (pread(c->state_fd, &le, 8, (off_t)(COW_STATE_HEADER_SIZE + w * 8)) != 8)
                        return error_set_errno(-EIO, "%s: cannot read state file %s", name, path);
                c->present.words[w] = le64toh(le);
        }
        /* Bits past the last block must not be set. */
        if (c->present.nbits % 64)
                c->present.words[words - 1] &= (1ULL << (c->present.nbits % 64)) - 1;
        return 0;
}

static int cow_device_open_with_name(const char *name, struct block_device *base, const char *overlay,
                                     const char *state, struct block_device **ret_dev) {
        int r;

        _cleanup_free_ struct cow_device *c = calloc(1, sizeof(*c));
        if (!c)
                return -ENOMEM;
        c->state_fd = -1;
        c->base = base;
        pthread_mutex_init(&c->flush_lock, NULL);
        for (size_t i = 0; i < COW_LOCK_STRIPES; i++)
                pthread_mutex_init(&c->stripes[i], NULL);
        r = block_device_init(&c->dev, &cow_ops, name, base->size, base->block_size);
        if (r < 0)
                return r;
        /* From here on cow_close() releases everything. */
        struct block_device *dev = &TAKE_PTR(c)->dev;
        struct cow_device *cow = to_cow(dev);
#define FAIL(r_)                                                                                             \
        do {                                                                                                 \
                int _r = (r_);                                                                               \
                char *_n = dev->name;                                                                        \
                cow_close(dev);                                                                              \
                free(_n);                                                                                    \
                return _r;                                                                                   \
        } while (0)

        uint64_t blocks = block_device_block_count(base);
        cow->snapshot = calloc(BITMAP_WORDS(blocks) ? BITMAP_WORDS(blocks) : 1, 8);
        cow->captured = calloc(BITMAP_WORDS(blocks) ? BITMAP_WORDS(blocks) : 1, sizeof(bool));
        if (!cow->snapshot || !cow->captured || bitmap_init(&cow->present, blocks) < 0 || bitmap_init(&cow->unsaved, blocks) < 0)
                FAIL(-ENOMEM);
        cow->state_path = strdup(state);
        if (!cow->state_path)
                FAIL(-ENOMEM);

        if ((r = fs_mkdir_parents(overlay)) < 0 || (r = fs_mkdir_parents(state)) < 0)
                FAIL(error_prefix(r, "%s", name));

        struct stat st;
        bool fresh = stat(state, &st) < 0 || st.st_size == 0;
        if (fresh && (r = state_create(name, state, base)) < 0)
                FAIL(r);
        cow->state_fd = open(state, O_RDWR | O_CLOEXEC);
        if (cow->state_fd < 0)
                FAIL(error_set_errno(-errno, "%s: cannot open state file %s", name, state));
        if (!fresh && (r = state_load(cow, state)) < 0)
                FAIL(r);

        /* The overlay: sparse, exactly the base's size. If the state is fresh, its contents do not
         * matter (no block is present), so a leftover overlay of another size is recreated. */
        if (fresh && stat(overlay, &st) == 0 && (uint64_t)st.st_size != base->size && truncate(overlay, 0) < 0)
                FAIL(error_set_errno(-errno, "%s: cannot reset overlay %s", name, overlay));
        char label[256];
        snprintf(label, sizeof(label), "%s: overlay", name);
        r = file_device_open(label, overlay, FILE_DEVICE_CREATE | FILE_DEVICE_SPARSE, base->size, base->block_size,
                             &cow->overlay);
        if (r < 0)
                FAIL(r);
#undef FAIL
        *ret_dev = dev;
        return 0;
}

int cow_device_open_on(struct block_device *base, const char *overlay, const char *state,
                       struct block_device **ret_dev) {
        return cow_device_open_with_name(base->name, base, overlay, state, ret_dev);
}

int cow_device_open(const struct cow_config *cfg, struct block_device **ret_dev) {
        struct block_device *base;
        char label[256];
        snprintf(label, sizeof(label), "%s: base", cfg->name);
        int r = file_device_open(label, cfg->base, FILE_DEVICE_READ_ONLY, 0, cfg->block_size, &base);
        if (r < 0)
                return r;
        r = cow_device_open_with_name(cfg->name, base, cfg->overlay, cfg->state, ret_dev);
        if (r < 0) {
                block_device_close(base);
                return r;
        }
        to_cow(*ret_dev)->owns_base = true;
        return 0;
}

int cow_device_open_private(const char *name, const char *base, uint32_t block_size,
                            struct block_device **ret_dev) {
        const char *tmp = getenv("TMPDIR");
        char dir[4096], overlay[4200], state[4200];
        snprintf(dir, sizeof(dir), "%s/drafter-%s.XXXXXX", tmp && *tmp ? tmp : "/var/tmp", name);
        if (!mkdtemp(dir))
                return error_set_errno(-errno, "%s: cannot create a private overlay directory %s", name, dir);
        snprintf(overlay, sizeof(overlay), "%s/overlay", dir);
        snprintf(state, sizeof(state), "%s/state", dir);
        int r = cow_device_open(&(struct cow_config){name, base, overlay, state, block_size}, ret_dev);
        /* The open files keep the data; no name is left behind to clean up. */
        unlink(overlay);
        unlink(state);
        rmdir(dir);
        return r;
}
