/* Copy-on-write crash consistency. A child process writes stamped sectors (whole blocks, partial
 * blocks, across block edges) and flushes now and then, recording in shared memory which versions
 * each flush made durable; the parent SIGKILLs it at a random moment, many times over, reopening
 * the same overlay and state each time. After every kill:
 *   - every block the state file marks present holds valid stamps in the overlay file itself
 *     (the bitmap never claims data that is not there);
 *   - every sector read through the device is a valid stamp for that sector (never garbage), no
 *     older than what the last completed flush acknowledged, and no newer than what was written. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/cow_device.h"
#include "drafter/error.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define BS 4096
#define BLOCKS 1024
#define SECTOR 512
#define SECTORS_PER_BLOCK (BS / SECTOR)
#define SECTORS (BLOCKS * SECTORS_PER_BLOCK)
#define STAMP_MAGIC 0x53544d50434f5721ULL
#define ITERATIONS 100

struct stamp {
        uint64_t magic;
        uint32_t block, sector;
        uint64_t version;
        unsigned char fill[SECTOR - 32];
        uint64_t check;
};
_Static_assert(sizeof(struct stamp) == SECTOR, "a stamp is one sector");

struct shared {
        uint64_t acked[SECTORS];       /* durable as of the last completed flush */
        uint64_t written_max[SECTORS]; /* highest version ever submitted */
};

static uint64_t stamp_check(const struct stamp *s) {
        const unsigned char *p = (const unsigned char *)s;
        uint64_t h = 0xcbf29ce484222325ULL;
        for (size_t i = 0; i < offsetof(struct stamp, check); i++)
                h = (h ^ p[i]) * 0x100000001b3ULL;
        return h;
}

static void stamp_make(struct stamp *s, uint64_t sector_index, uint64_t version) {
        s->magic = STAMP_MAGIC;
        s->block = (uint32_t)(sector_index / SECTORS_PER_BLOCK);
        s->sector = (uint32_t)(sector_index % SECTORS_PER_BLOCK);
        s->version = version;
        memset(s->fill, (int)(version * 31 + sector_index), sizeof(s->fill));
        s->check = stamp_check(s);
}

static bool stamp_valid(const struct stamp *s, uint64_t sector_index) {
        return s->magic == STAMP_MAGIC && s->block == sector_index / SECTORS_PER_BLOCK &&
               s->sector == sector_index % SECTORS_PER_BLOCK && s->check == stamp_check(s);
}

static void die(const char *what) {
        fprintf(stderr, "child: %s: %s\n", what, error_message());
        _exit(2);
}

static void child_run(const char *base, const char *overlay, const char *state, struct shared *sh,
                      uint64_t version, uint64_t seed) {
        struct block_device *dev;
        if (cow_device_open(&(struct cow_config){"disk", base, overlay, state, BS}, &dev) < 0)
                die("open");
        /* What the device holds now is what the next flush makes durable, including writes of
         * the previous writer that were never flushed but are readable (they may be lost too). */
        static uint64_t latest[SECTORS];
        static struct stamp buf[2 * SECTORS_PER_BLOCK];
        for (uint64_t i = 0; i < SECTORS; i++) {
                if (block_device_read_at(dev, buf, SECTOR, i * SECTOR) < 0)
                        die("read");
                latest[i] = buf[0].version;
        }
        struct test_rng rng = {seed};
        uint64_t until_flush = 1 + test_rng_below(&rng, 16);
        for (;;) {
                uint64_t first, count;
                if (test_rng_below(&rng, 8) == 0) {
                        first = test_rng_below(&rng, BLOCKS) * SECTORS_PER_BLOCK; /* a whole block */
                        count = SECTORS_PER_BLOCK;
                } else {
                        first = test_rng_below(&rng, SECTORS); /* partial, maybe across a block edge */
                        count = 1 + test_rng_below(&rng, SECTORS_PER_BLOCK + 4);
                        if (first + count > SECTORS)
                                count = SECTORS - first;
                }
                for (uint64_t i = 0; i < count; i++) {
                        stamp_make(&buf[i], first + i, ++version);
                        latest[first + i] = version;
                        __atomic_store_n(&sh->written_max[first + i], version, __ATOMIC_RELEASE);
                }
                if (block_device_write_at(dev, buf, count * SECTOR, first * SECTOR) < 0)
                        die("write");
                if (--until_flush == 0) {
                        static uint64_t captured[SECTORS];
                        memcpy(captured, latest, sizeof(captured));
                        if (block_device_flush(dev) < 0)
                                die("flush");
                        for (size_t i = 0; i < SECTORS; i++)
                                __atomic_store_n(&sh->acked[i], captured[i], __ATOMIC_RELEASE);
                        until_flush = 1 + test_rng_below(&rng, 16);
                }
        }
}

static void verify_state_file(const char *overlay, const char *state) {
        int sfd = open(state, O_RDONLY);
        if (sfd < 0 && errno == ENOENT)
                return; /* killed before the state file was created: nothing is claimed */
        assert_true(sfd >= 0);
        static uint64_t words[BLOCKS / 64];
        assert_int_equal(pread(sfd, words, sizeof(words), COW_STATE_HEADER_SIZE), (ssize_t)sizeof(words));
        close(sfd);
        int ofd = open(overlay, O_RDONLY);
        if (ofd < 0 && errno == ENOENT) {
                /* killed between creating the state and the overlay: the state must claim nothing */
                for (size_t w = 0; w < ELEMENTSOF(words); w++)
                        assert_int_equal(words[w], 0);
                return;
        }
        assert_true(ofd >= 0);
        struct stamp s;
        for (uint64_t b = 0; b < BLOCKS; b++) {
                if (!(le64toh(words[b / 64]) & (1ULL << (b % 64))))
                        continue;
                for (uint64_t i = 0; i < SECTORS_PER_BLOCK; i++) {
                        uint64_t sector = b * SECTORS_PER_BLOCK + i;
                        assert_int_equal(pread(ofd, &s, SECTOR, (off_t)(sector * SECTOR)), SECTOR);
                        if (!stamp_valid(&s, sector))
                                fail_msg("state marks block %" PRIu64 " present, but sector %" PRIu64
                                         " of the overlay holds no valid data",
                                         b, i);
                }
        }
        close(ofd);
}

static void verify_device(const char *base, const char *overlay, const char *state, const struct shared *sh,
                          unsigned *ret_newer) {
        struct block_device *dev;
        assert_ok(cow_device_open(&(struct cow_config){"disk", base, overlay, state, BS}, &dev));
        static struct stamp all[SECTORS];
        assert_ok(block_device_read_at(dev, all, sizeof(all), 0));
        unsigned newer = 0;
        for (uint64_t i = 0; i < SECTORS; i++) {
                if (!stamp_valid(&all[i], i))
                        fail_msg("sector %" PRIu64 " reads garbage", i);
                if (all[i].version < sh->acked[i])
                        fail_msg("sector %" PRIu64 ": version %" PRIu64 " is older than the acknowledged %" PRIu64,
                                 i, all[i].version, sh->acked[i]);
                if (all[i].version > sh->written_max[i])
                        fail_msg("sector %" PRIu64 ": version %" PRIu64 " was never written", i, all[i].version);
                newer += all[i].version > sh->acked[i];
        }
        *ret_newer += newer;
        block_device_close(dev);
}

static void test_sigkill_many_times(void **state) {
        uint64_t seed = test_seed("test-cow-crash");
        struct test_rng rng = {seed};
        char *dir = test_tmpdir_new();
        _cleanup_free_ char *base = test_path(dir, "base.bin");
        _cleanup_free_ char *overlay = test_path(dir, "overlay.bin");
        _cleanup_free_ char *state_path = test_path(dir, "state.bin");

        /* The base holds version-0 stamps. */
        static struct stamp initial[SECTORS];
        for (uint64_t i = 0; i < SECTORS; i++)
                stamp_make(&initial[i], i, 0);
        int fd = open(base, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        assert_int_equal(write(fd, initial, sizeof(initial)), (ssize_t)sizeof(initial));
        close(fd);

        struct shared *sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        assert_true(sh != MAP_FAILED);
        memset(sh, 0, sizeof(*sh));

        unsigned newer_than_acked = 0;
        uint64_t max_acked = 0;
        for (int it = 0; it < ITERATIONS; it++) {
                uint64_t child_seed = test_rng_next(&rng);
                pid_t pid = fork();
                assert_true(pid >= 0);
                if (pid == 0)
                        child_run(base, overlay, state_path, sh, (uint64_t)(it + 1) * 1000000000ULL, child_seed);
                clock_sleep_ns((2 + test_rng_below(&rng, 40)) * NSEC_PER_MSEC);
                kill(pid, SIGKILL);
                int status;
                assert_int_equal(waitpid(pid, &status, 0), pid);
                if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
                        fail_msg("iteration %d: the writer stopped by itself (status %d)", it, status);
                verify_state_file(overlay, state_path);
                verify_device(base, overlay, state_path, sh, &newer_than_acked);
        }
        for (uint64_t i = 0; i < SECTORS; i++)
                max_acked = MAX(max_acked, sh->acked[i]);
        fprintf(stderr, "  %d kills verified; %u sector reads were newer than their last flush\n", ITERATIONS,
                newer_than_acked);
        /* The writer really got flushes through, so the "acknowledged" checks had teeth. */
        assert_true(max_acked > 0);
        munmap(sh, sizeof(*sh));
        test_tmpdir_remove(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_sigkill_many_times),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
