/* FUSE device files: plain I/O, a second process writing through a shared mapping whose pages
 * reach the dirty tracker at fuse_export_sync() (exactly the blocks written, cycle after cycle),
 * the same written back in chunks by fuse_export_write_back() on an unthrottled mount, reads of
 * missing blocks waiting in the waiting cache, invalidation, and stale-mount cleanup. Needs
 * /dev/fuse and permission to mount (root here); skips (77) only without them. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/fuse_export.h"
#include "drafter/waiting_cache.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>

#define BS 65536
#define SIZE (64 * BS)

static char *dir;
static struct fuse_export *live; /* stopped by teardown if a test failed with it running */

static int stop_live(void **state) {
        fuse_export_stop(live);
        live = NULL;
        return 0;
}

static int setup(void **state) {
        dir = test_tmpdir_new();
        return dir ? 0 : -1;
}

static int teardown(void **state) {
        test_tmpdir_remove(dir);
        return 0;
}

static void test_file_io(void **state) {
        struct block_device *mem;
        assert_ok(memory_device_open("disk", SIZE + 1000, BS, &mem)); /* not a multiple of the block size */
        _cleanup_free_ char *mnt = test_path(dir, "io");
        struct fuse_export *fx;
        assert_ok(fuse_export_start(mnt, &(struct fuse_export_device){"disk", mem, false}, 1, &fx));
        live = fx;

        const char *path = fuse_export_path(fx, 0);
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        assert_int_equal(st.st_size, SIZE + 1000);
        assert_true(S_ISREG(st.st_mode));

        int fd = open(path, O_RDWR);
        assert_true(fd >= 0);
        static unsigned char buf[3 * BS], got[3 * BS];
        struct test_rng rng = {11};
        test_rng_fill(&rng, buf, sizeof(buf));
        assert_int_equal(pwrite(fd, buf, sizeof(buf), BS / 2), (ssize_t)sizeof(buf));
        assert_int_equal(fsync(fd), 0);
        assert_ok(block_device_read_at(mem, got, sizeof(got), BS / 2));
        assert_memory_equal(got, buf, sizeof(buf));
        /* And the other way: device writes are visible through a fresh read after invalidation. */
        assert_ok(block_device_write_at(mem, buf, 1000, SIZE));
        assert_ok(fuse_export_invalidate(fx, 0, SIZE, 1000));
        assert_int_equal(pread(fd, got, 1000, SIZE), 1000);
        assert_memory_equal(got, buf, 1000);
        assert_int_equal(pread(fd, got, 10, SIZE + 1000), 0); /* end of device */

        /* A device cannot shrink, and cannot grow: a write past its end is refused when the page
         * cache writes it back, so fsync reports it and the device keeps its size and bytes. */
        assert_int_equal(ftruncate(fd, 10), -1);
        assert_int_equal(errno, EPERM);
        unsigned char tail[1000];
        assert_ok(block_device_read_at(mem, tail, 1000, SIZE));
        pwrite(fd, buf + 500, 10, SIZE + 995);
        assert_int_equal(fsync(fd), -1);
        assert_ok(block_device_read_at(mem, got, 1000, SIZE));
        assert_memory_equal(got, tail, 1000);
        assert_int_equal(mem->size, SIZE + 1000);
        assert_int_equal(fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, BS, BS), 0);
        assert_ok(block_device_read_at(mem, got, BS, BS));
        assert_true(buffer_is_zero(got, BS));
        assert_int_equal(pread(fd, got, BS, BS), BS);
        assert_true(buffer_is_zero(got, BS));
        close(fd);

        assert_int_equal(open(path, O_RDWR | O_TRUNC), -1);
        char other[4200];
        snprintf(other, sizeof(other), "%s/nope", mnt);
        assert_int_equal(open(other, O_RDONLY), -1);
        assert_int_equal(errno, ENOENT);

        /* A second mount on a live one is refused. */
        struct fuse_export *again;
        assert_int_equal(fuse_export_start(mnt, &(struct fuse_export_device){"disk", mem, false}, 1, &again), -EBUSY);
        live = NULL;
        fuse_export_stop(fx);
        assert_int_equal(stat(path, &st), -1); /* unmounted */
        block_device_close(mem);
}

/* The second process: map the file shared, write a byte pattern into the given pages of each
 * round, tell the parent, wait for the go-ahead for the next round. */
static void child_writer(const char *path, int ready_fd, int go_fd, const uint64_t rounds[][4], int nrounds) {
        int fd = open(path, O_RDWR);
        if (fd < 0)
                _exit(2);
        unsigned char *map = mmap(NULL, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (map == MAP_FAILED)
                _exit(3);
        for (int r = 0; r < nrounds; r++) {
                for (int i = 0; i < 4; i++)
                        memset(map + rounds[r][i], 0x40 + r, 100); /* a few bytes inside one page */
                char c = 'w';
                if (write(ready_fd, &c, 1) != 1 || read(go_fd, &c, 1) != 1)
                        _exit(4);
        }
        _exit(0); /* the mapping stays until exit: nothing here relies on munmap */
}

static void expect_dirty(struct block_device *dev, const uint64_t *want, size_t n) {
        uint64_t *blocks;
        size_t count;
        assert_ok(dirty_tracker_collect(dev, &blocks, &count));
        if (count != n)
                fail_msg("dirty tracker reports %zu blocks, expected %zu (first %llu)", count, n,
                         count ? (unsigned long long)blocks[0] : 0ULL);
        for (size_t i = 0; i < n; i++)
                assert_int_equal(blocks[i], want[i]);
        free(blocks);
}

/* The blocks written back since the last collection, awaited up to 2 s: exactly `want`. */
static void await_dirty(struct block_device *dev, const uint64_t want[4], int round) {
        bool seen[SIZE / BS] = {false};
        size_t n = 0;
        for (uint64_t deadline = clock_now_ns() + 2 * NSEC_PER_SEC; n < 4 && clock_now_ns() < deadline;) {
                uint64_t *blocks;
                size_t count;
                assert_ok(dirty_tracker_collect(dev, &blocks, &count));
                for (size_t i = 0; i < count; i++) {
                        bool wanted = false;
                        for (int k = 0; k < 4; k++)
                                wanted |= blocks[i] == want[k];
                        if (!wanted)
                                fail_msg("round %d: block %llu written back, not written", round,
                                         (unsigned long long)blocks[i]);
                        n += !seen[blocks[i]];
                        seen[blocks[i]] = true;
                }
                free(blocks);
                if (n < 4)
                        clock_sleep_ns(10 * NSEC_PER_MSEC);
        }
        assert_int_equal(n, 4);
}

/* A second process writes two rounds through a shared mapping of the export's memory file (a
 * dirty-tracked memory device); after each, `chunk` 0: fuse_export_sync() is a barrier and
 * exactly the blocks written are dirty; else fuse_export_write_back() in chunks of that size,
 * and exactly those blocks arrive. Their bytes are on the device either way. */
static void mapping_rounds(const char *name, unsigned flags, uint64_t chunk, const uint64_t rounds[2][4],
                           const uint64_t want[2][4]) {
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("memory", SIZE, BS, &mem));
        assert_ok(dirty_tracker_wrap(mem, DIRTY_TRACK_ALL, &dev));
        _cleanup_free_ char *mnt = test_path(dir, name);
        struct fuse_export *fx;
        assert_ok(fuse_export_start_flags(mnt, &(struct fuse_export_device){"memory", dev, false}, 1, flags, &fx));
        live = fx;
        int ready[2], go[2];
        assert_int_equal(pipe(ready), 0);
        assert_int_equal(pipe(go), 0);
        expect_dirty(dev, NULL, 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) { /* only its own ends: if this process fails, its read of `go` ends */
                close(ready[0]);
                close(go[1]);
                child_writer(fuse_export_path(fx, 0), ready[1], go[0], rounds, 2);
        }
        close(ready[1]);
        close(go[0]);
        for (int r = 0; r < 2; r++) {
                char c;
                assert_int_equal(read(ready[0], &c, 1), 1);
                if (chunk) {
                        expect_dirty(dev, NULL, 0); /* written to the mapping only */
                        assert_ok(fuse_export_write_back(fx, chunk));
                        await_dirty(dev, want[r], r);
                } else {
                        uint64_t start = clock_now_ns();
                        assert_ok(fuse_export_sync(fx));
                        fprintf(stderr, "  round %d: write-back barrier took %.2f ms\n", r,
                                (double)(clock_now_ns() - start) / 1e6);
                        expect_dirty(dev, want[r], 4);
                }
                unsigned char got[100];
                for (int i = 0; i < 4; i++) {
                        assert_ok(block_device_read_at(dev, got, 100, rounds[r][i]));
                        for (int k = 0; k < 100; k++)
                                assert_int_equal(got[k], 0x40 + r);
                }
                assert_int_equal(write(go[1], &c, 1), 1);
        }
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        close(ready[0]);
        close(go[1]);
        live = NULL;
        fuse_export_stop(fx);
        block_device_close(dev);
}

static void test_shared_mapping_reaches_dirty_tracker(void **state) {
        /* Offsets inside blocks 3, 17, 40, 63, then 5, 17, 18, 62: each round marks exactly those. */
        static const uint64_t rounds[2][4] = {
                {3 * BS + 100, 17 * BS + 4096, 40 * BS + 9000, 63 * BS + BS - 200},
                {5 * BS, 17 * BS + 200, 18 * BS + 30000, 62 * BS + 5},
        };
        static const uint64_t want[2][4] = {{3, 17, 40, 63}, {5, 17, 18, 62}};
        mapping_rounds("mmap", 0, 0, rounds, want);
}

/* FUSE_EXPORT_UNTHROTTLED lifts the mount's strict dirty limit, and fuse_export_write_back()
 * writes a shared mapping's pages back a chunk at a time (3 pages: chunks straddle blocks). It is
 * a barrier only where the kernel's FUSE ends write-back at the daemon's answer, so the blocks
 * are awaited; nothing else writes them back meanwhile (the mount is unthrottled). */
static void test_write_back_in_chunks(void **state) {
        static const uint64_t rounds[2][4] = {
                {2 * BS + 4000, 9 * BS + 12288, 33 * BS + 100, 60 * BS + BS - 100},
                {2 * BS + 8192, 10 * BS, 33 * BS + 40000, 61 * BS + 5},
        };
        static const uint64_t want[2][4] = {{2, 9, 33, 60}, {2, 10, 33, 61}};
        mapping_rounds("chunks", FUSE_EXPORT_UNTHROTTLED, 3 * 4096, rounds, want);
}

/* The unthrottled mount's bdi has no strict limit (Linux 6.2 and later have the file). */
static void test_unthrottled_bdi(void **state) {
        struct block_device *mem;
        assert_ok(memory_device_open("memory", SIZE, BS, &mem));
        _cleanup_free_ char *mnt = test_path(dir, "bdi");
        struct fuse_export *fx;
        for (int unthrottled = 0; unthrottled < 2; unthrottled++) {
                assert_ok(fuse_export_start_flags(mnt, &(struct fuse_export_device){"memory", mem, false}, 1,
                                                  unthrottled ? FUSE_EXPORT_UNTHROTTLED : 0, &fx));
                live = fx;
                struct stat st;
                assert_int_equal(stat(mnt, &st), 0);
                char knob[128];
                snprintf(knob, sizeof(knob), "/sys/class/bdi/%u:%u/strict_limit", major(st.st_dev), minor(st.st_dev));
                FILE *f = fopen(knob, "r");
                if (f) {
                        int v = -1;
                        assert_int_equal(fscanf(f, "%d", &v), 1);
                        fclose(f);
                        assert_int_equal(v, !unthrottled); /* FUSE's default is strict */
                }
                live = NULL;
                fuse_export_stop(fx);
        }
        block_device_close(mem);
}

struct reader {
        const char *path;
        uint64_t off;
        unsigned char buf[4096];
        ssize_t result;
};

static void *read_file(void *arg) {
        struct reader *r = arg;
        int fd = open(r->path, O_RDONLY);
        r->result = fd < 0 ? -1 : pread(fd, r->buf, sizeof(r->buf), (off_t)r->off);
        if (fd >= 0)
                close(fd);
        return NULL;
}

static volatile uint64_t needed_block = UINT64_MAX;

static void note_need(void *ctx, uint64_t block) {
        __atomic_store_n(&needed_block, block, __ATOMIC_RELEASE);
}

static void test_missing_block_waits(void **state) {
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("memory", SIZE, BS, &mem));
        assert_ok(waiting_cache_wrap(mem, note_need, NULL, 0, &dev));
        _cleanup_free_ char *mnt = test_path(dir, "wait");
        struct fuse_export *fx;
        assert_ok(fuse_export_start(mnt, &(struct fuse_export_device){"memory", dev, false}, 1, &fx));
        live = fx;

        struct reader r = {.path = fuse_export_path(fx, 0), .off = 5 * BS + 4096};
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, read_file, &r), 0);
        for (int i = 0; i < 5000 && __atomic_load_n(&needed_block, __ATOMIC_ACQUIRE) == UINT64_MAX; i++)
                clock_sleep_ns(NSEC_PER_MSEC);
        assert_int_equal(needed_block, 5);
        clock_sleep_ns(20 * NSEC_PER_MSEC);
        assert_int_equal(r.result, 0); /* still waiting */

        static unsigned char block[BS];
        memset(block, 0x5e, BS);
        assert_int_equal(waiting_cache_supply(dev, 5, block, WAITING_CACHE_IF_MISSING), 1);
        pthread_join(t, NULL);
        assert_int_equal(r.result, 4096);
        assert_memory_equal(r.buf, block, 4096);

        /* A block that changes underneath a cached page is seen after invalidation. */
        memset(block, 0x6f, BS);
        assert_int_equal(waiting_cache_supply(dev, 5, block, 0), 1);
        assert_ok(fuse_export_invalidate(fx, 0, 5 * BS, BS));
        r.result = 0;
        read_file(&r);
        assert_int_equal(r.result, 4096);
        assert_memory_equal(r.buf, block, 4096);

        waiting_cache_cancel(dev, -ECONNRESET, "test over"); /* nothing may stay blocked */
        live = NULL;
        fuse_export_stop(fx);
        block_device_close(dev);
}

static void test_stale_mount_is_cleared(void **state) {
        _cleanup_free_ char *mnt = test_path(dir, "stale");
        int ready[2];
        assert_int_equal(pipe(ready), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                struct block_device *mem;
                struct fuse_export *fx;
                if (memory_device_open("disk", BS, BS, &mem) < 0 ||
                    fuse_export_start(mnt, &(struct fuse_export_device){"disk", mem, false}, 1, &fx) < 0)
                        _exit(2);
                char c = 'm';
                if (write(ready[1], &c, 1) != 1)
                        _exit(3);
                pause();
                _exit(0);
        }
        char c;
        assert_int_equal(read(ready[0], &c, 1), 1);
        kill(pid, SIGKILL); /* the daemon dies with its mount in place */
        waitpid(pid, NULL, 0);
        struct statfs sfs;
        assert_int_equal(statfs(mnt, &sfs), -1);
        assert_int_equal(errno, ENOTCONN);
        struct stat st;

        struct block_device *mem;
        assert_ok(memory_device_open("disk", BS, BS, &mem));
        struct fuse_export *fx;
        assert_ok(fuse_export_start(mnt, &(struct fuse_export_device){"disk", mem, false}, 1, &fx));
        live = fx;
        assert_int_equal(stat(fuse_export_path(fx, 0), &st), 0);
        live = NULL;
        fuse_export_stop(fx);
        block_device_close(mem);
}

int main(void) {
        if (access("/dev/fuse", R_OK | W_OK) != 0) {
                fprintf(stderr, "SKIP: /dev/fuse is not available\n");
                return 77;
        }
        signal(SIGPIPE, SIG_IGN);
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_teardown(test_file_io, stop_live),
                cmocka_unit_test_teardown(test_shared_mapping_reaches_dirty_tracker, stop_live),
                cmocka_unit_test_teardown(test_write_back_in_chunks, stop_live),
                cmocka_unit_test_teardown(test_unthrottled_bdi, stop_live),
                cmocka_unit_test_teardown(test_missing_block_waits, stop_live),
                cmocka_unit_test_teardown(test_stale_mount_is_cleared, stop_live),
        };
        return cmocka_run_group_tests(tests, setup, teardown);
}
