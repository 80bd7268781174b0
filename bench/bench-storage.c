/* bench-storage — throughput of the copy-on-write device against a plain file on the same disk,
 * measured in the same run, and the cost of a dirty-block collection.
 *
 * Prints one RESULT line per figure (DESIGN.md §6). Reads follow posix_fadvise(DONTNEED) on every
 * file involved, so they come from the disk for both sides alike. */
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/cow_device.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/flags.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK (1u << 20)

static uint64_t rng_state = 0x5eed;

static uint64_t rng_next(void) {
        uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
}

static void fill_random(void *buf, size_t len) {
        uint64_t *p = buf;
        for (size_t i = 0; i < len / 8; i++)
                p[i] = rng_next();
}

static void check(int r, const char *what) {
        if (r < 0) {
                fprintf(stderr, "bench-storage: %s: %s\n", what, *error_message() ? error_message() : strerror(-r));
                exit(1);
        }
}

static void drop_cache(const char *path) {
        int fd = open(path, O_RDONLY);
        if (fd >= 0) {
                fdatasync(fd);
                posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
                close(fd);
        }
}

static void result(const char *name, double value, const char *unit, const char *peer, double peer_value,
                   bool lower_is_better) {
        if (peer)
                printf("RESULT name=%s value=%.3f unit=%s peer=%s peer_value=%.3f ratio=%.3f\n", name, value, unit,
                       peer, peer_value, peer_value > 0 ? value / peer_value : 0.0);
        else
                printf("RESULT name=%s value=%.3f unit=%s peer=none peer_value=- ratio=-\n", name, value, unit);
        (void)lower_is_better;
        fflush(stdout);
}

static double seq_write(struct block_device *dev, void *buf) {
        uint64_t start = clock_now_ns();
        for (uint64_t off = 0; off < dev->size; off += CHUNK) {
                fill_random(buf, 64); /* vary the content a little, not the cost */
                check(block_device_write_at(dev, buf, (size_t)MIN((uint64_t)CHUNK, dev->size - off), off), "write");
        }
        check(block_device_flush(dev), "flush");
        return (double)dev->size / 1e6 / ((double)(clock_now_ns() - start) / 1e9);
}

static double seq_read(struct block_device *dev, void *buf) {
        uint64_t start = clock_now_ns();
        for (uint64_t off = 0; off < dev->size; off += CHUNK)
                check(block_device_read_at(dev, buf, (size_t)MIN((uint64_t)CHUNK, dev->size - off), off), "read");
        return (double)dev->size / 1e6 / ((double)(clock_now_ns() - start) / 1e9);
}

/* Random 4 KiB writes, flushed every 256 writes (a guest issuing flushes), IOPS. */
static double random_writes(struct block_device *dev, void *buf, unsigned count, uint64_t seed) {
        rng_state = seed;
        uint64_t start = clock_now_ns();
        for (unsigned i = 0; i < count; i++) {
                uint64_t off = (rng_next() % (dev->size / 4096)) * 4096;
                check(block_device_write_at(dev, buf, 4096, off), "random write");
                if (i % 256 == 255)
                        check(block_device_flush(dev), "flush");
        }
        check(block_device_flush(dev), "flush");
        return count / ((double)(clock_now_ns() - start) / 1e9);
}

static int compare_double(const void *a, const void *b) {
        double x = *(const double *)a, y = *(const double *)b;
        return x < y ? -1 : x > y;
}

static int compare_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
        return x < y ? -1 : x > y;
}

/* Median time of collecting 1% dirty blocks from a device of `size` bytes. */
static double dirty_collect_us(uint64_t size, uint32_t bs) {
        struct block_device *mem, *dev;
        check(memory_device_open("memory", size, bs, &mem), "memory device");
        check(dirty_tracker_wrap(mem, DIRTY_TRACK_ALL, &dev), "dirty tracker");
        uint64_t blocks = block_device_block_count(dev), dirty = blocks / 100;
        char byte = 1;
        enum { RUNS = 101 };
        uint64_t times[RUNS];
        for (int run = 0; run < RUNS; run++) {
                for (uint64_t i = 0; i < dirty; i++)
                        check(block_device_write_at(dev, &byte, 1, (rng_next() % blocks) * bs), "mark");
                uint64_t *list;
                size_t n;
                uint64_t start = clock_now_ns();
                check(dirty_tracker_collect(dev, &list, &n), "collect");
                times[run] = clock_now_ns() - start;
                free(list);
        }
        qsort(times, RUNS, sizeof(times[0]), compare_u64);
        block_device_close(dev);
        const size_t median = RUNS / 2;
        return (double)times[median] / 1e3;
}

int main(int argc, char **argv) {
        int64_t size_mib = 1024, random_count = 20000;
        const char *dir = "/var/tmp";
        struct flag flags[] = {
                {"size-mib", FLAG_INT, &size_mib, "Device size in MiB"},
                {"dir", FLAG_STRING, &dir, "Directory for the test files (on the disk to measure)"},
                {"random-writes", FLAG_INT, &random_count, "Number of random 4 KiB writes"},
        };
        int r = flags_parse("bench-storage", flags, ELEMENTSOF(flags), argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0)
                return 2;

        char work[4096];
        snprintf(work, sizeof(work), "%s/bench-storage.XXXXXX", dir);
        if (!mkdtemp(work)) {
                fprintf(stderr, "bench-storage: cannot create a directory in %s: %s\n", dir, strerror(errno));
                return 1;
        }
        char plain[4200], base[4200], overlay[4200], state[4200];
        snprintf(plain, sizeof(plain), "%s/plain.bin", work);
        snprintf(base, sizeof(base), "%s/base.bin", work);
        snprintf(overlay, sizeof(overlay), "%s/overlay.bin", work);
        snprintf(state, sizeof(state), "%s/state.bin", work);
        uint64_t size = (uint64_t)size_mib << 20;
        void *buf = aligned_alloc(4096, CHUNK);
        fill_random(buf, CHUNK);
        printf("bench-storage: %" PRIu64 " MiB devices in %s, block size 65536\n", size >> 20, work);

        struct cow_config cow = {"cow", base, overlay, state, 65536};
        struct block_device *dev;

        /* The base of the copy-on-write device: random data, like a disk image. */
        check(file_device_open("base", base, FILE_DEVICE_CREATE, size, 65536, &dev), "base");
        seq_write(dev, buf);
        block_device_close(dev);

        /* Sequential writes: a new plain file against a new overlay (both allocate as they go).
         * sync() before each phase so no side pays for the other's writeback. */
        sync();
        check(file_device_open("plain", plain, FILE_DEVICE_CREATE, size, 65536, &dev), "plain");
        double plain_write = seq_write(dev, buf);
        block_device_close(dev);
        sync();
        check(cow_device_open(&cow, &dev), "cow");
        double cow_write = seq_write(dev, buf);
        block_device_close(dev);

        /* Sequential reads from the disk: all blocks in the overlay, and none (all from the base). */
        drop_cache(plain);
        check(file_device_open("plain", plain, 0, 0, 65536, &dev), "plain");
        double plain_read = seq_read(dev, buf);
        block_device_close(dev);
        drop_cache(overlay);
        drop_cache(base);
        check(cow_device_open(&cow, &dev), "cow");
        double cow_read = seq_read(dev, buf);
        block_device_close(dev);

        /* Random 4 KiB writes in steady state (every block allocated / present), alternating
         * sides over three rounds with the same offsets; the median of each. */
        double plain_iops[3], cow_iops[3];
        for (int round = 0; round < 3; round++) {
                sync();
                check(file_device_open("plain", plain, 0, 0, 65536, &dev), "plain");
                plain_iops[round] = random_writes(dev, buf, (unsigned)random_count, 1 + (uint64_t)round);
                block_device_close(dev);
                sync();
                check(cow_device_open(&cow, &dev), "cow");
                cow_iops[round] = random_writes(dev, buf, (unsigned)random_count, 1 + (uint64_t)round);
                block_device_close(dev);
        }
        qsort(plain_iops, 3, sizeof(double), compare_double);
        qsort(cow_iops, 3, sizeof(double), compare_double);

        /* A fresh overlay: reads pass through to the base; first writes copy blocks up. */
        unlink(overlay);
        unlink(state);
        drop_cache(base);
        sync();
        check(cow_device_open(&cow, &dev), "cow");
        double cow_read_base = seq_read(dev, buf);
        double cow_iops_first = random_writes(dev, buf, (unsigned)random_count, 1);
        block_device_close(dev);

        result("cow_seq_write_throughput_MBps", cow_write, "MB/s", "plain_file", plain_write, false);
        result("cow_seq_read_throughput_MBps", cow_read, "MB/s", "plain_file", plain_read, false);
        result("cow_seq_read_from_base_throughput_MBps", cow_read_base, "MB/s", "plain_file", plain_read, false);
        result("cow_random_4k_write_iops", cow_iops[1], "IOPS", "plain_file", plain_iops[1], false);
        result("cow_random_4k_write_first_touch_iops", cow_iops_first, "IOPS", "plain_file", plain_iops[1], false);

        result("dirty_collect_1GiB_1pct_64KiB_blocks_us", dirty_collect_us(1ULL << 30, 65536), "us", NULL, 0, true);
        result("dirty_collect_1GiB_1pct_4KiB_blocks_us", dirty_collect_us(1ULL << 30, 4096), "us", NULL, 0, true);

        unlink(plain);
        unlink(base);
        unlink(overlay);
        unlink(state);
        rmdir(work);
        free(buf);
        return 0;
}
