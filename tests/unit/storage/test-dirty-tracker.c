/* Dirty tracking: exact block sets, the track-after-read mode, and a simulated pre-copy migration
 * with concurrent writers that must end with an identical copy. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static void expect_collect(struct block_device *dev, const uint64_t *want, size_t n) {
        uint64_t *blocks;
        size_t count;
        assert_ok(dirty_tracker_collect(dev, &blocks, &count));
        assert_int_equal(count, n);
        for (size_t i = 0; i < n; i++)
                assert_int_equal(blocks[i], want[i]);
        free(blocks);
}

static void test_track_all(void **state) {
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("memory", 100 * 4096 + 10, 4096, &mem));
        assert_ok(dirty_tracker_wrap(mem, DIRTY_TRACK_ALL, &dev));
        char buf[8192] = {1};
        assert_ok(block_device_write_at(dev, buf, 1, 4096 * 1));
        assert_ok(block_device_write_at(dev, buf, 4096, 4096 * 5));
        assert_ok(block_device_write_at(dev, buf, 1, 4096 * 5 + 100));
        assert_ok(block_device_write_at(dev, buf, 10, 4096 * 100)); /* the short last block */
        assert_ok(block_device_write_at(dev, buf, 2, 4096 * 3 - 1)); /* spans blocks 2 and 3 */
        assert_ok(block_device_discard(dev, 4096, 4096 * 70));
        assert_int_equal(dirty_tracker_pending(dev), 6);
        expect_collect(dev, (uint64_t[]){1, 2, 3, 5, 70, 100}, 6);
        expect_collect(dev, NULL, 0);
        assert_ok(block_device_read_at(dev, buf, 8192, 0)); /* reads never mark */
        expect_collect(dev, NULL, 0);
        assert_ptr_equal(dirty_tracker_inner(dev), mem);
        block_device_close(dev);
}

/* The no-copy read: the memory it returns is the device's, and it starts tracking like a read;
 * devices without memory return NULL and track nothing. */
static void test_map_tracked(void **state) {
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("memory", 16 * 4096, 4096, &mem));
        assert_ok(dirty_tracker_wrap(mem, DIRTY_TRACK_AFTER_READ, &dev));
        char buf[4096];
        memset(buf, 0x42, sizeof(buf));
        assert_ok(block_device_write_at(dev, buf, 4096, 2 * 4096));
        const unsigned char *p = dirty_tracker_map_tracked(dev, 4096, 2 * 4096);
        assert_non_null(p);
        assert_memory_equal(p, buf, 4096);
        expect_collect(dev, NULL, 0);
        assert_ok(block_device_write_at(dev, buf, 1, 2 * 4096 + 7));
        expect_collect(dev, (uint64_t[]){2}, 1);
        assert_null(dirty_tracker_map_tracked(dev, 4096, 16 * 4096)); /* out of range */
        assert_null(block_device_map(dev, 4096, 0)); /* trackers never lend memory */
        block_device_close(dev);

        char *dir = test_tmpdir_new();
        char path[512];
        snprintf(path, sizeof(path), "%s/disk", dir);
        struct block_device *file;
        assert_ok(file_device_open("file", path, FILE_DEVICE_CREATE, 16 * 4096, 4096, &file));
        assert_ok(dirty_tracker_wrap(file, DIRTY_TRACK_AFTER_READ, &dev));
        assert_null(dirty_tracker_map_tracked(dev, 4096, 0));
        assert_ok(block_device_write_at(dev, buf, 1, 0));
        expect_collect(dev, NULL, 0); /* nothing was tracked */
        block_device_close(dev);
        test_tmpdir_remove(dir);
}

static void test_track_after_read(void **state) {
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("memory", 64 * 4096, 4096, &mem));
        assert_ok(dirty_tracker_wrap(mem, DIRTY_TRACK_AFTER_READ, &dev));
        char buf[5 * 4096] = {2};
        assert_ok(block_device_write_at(dev, buf, 4096, 3 * 4096));
        expect_collect(dev, NULL, 0); /* block 3 not sent yet: the bulk pass will read it */
        assert_ok(dirty_tracker_read_tracked(dev, buf, 5 * 4096 - 100, 0));
        assert_ok(block_device_write_at(dev, buf, 4096, 3 * 4096));
        assert_ok(block_device_write_at(dev, buf, 1, 4 * 4096));
        assert_ok(block_device_write_at(dev, buf, 4096, 10 * 4096));
        expect_collect(dev, (uint64_t[]){3, 4}, 2);
        dirty_tracker_track_all(dev);
        assert_ok(block_device_write_at(dev, buf, 4096, 10 * 4096));
        expect_collect(dev, (uint64_t[]){10}, 1);
        block_device_close(dev);
}

struct writer {
        struct block_device *dev;
        uint64_t seed;
        volatile int *stop;
        int result;
};

static void *write_loop(void *arg) {
        struct writer *w = arg;
        struct test_rng rng = {w->seed};
        char buf[3 * 4096];
        while (!__atomic_load_n(w->stop, __ATOMIC_ACQUIRE)) {
                uint64_t off = test_rng_below(&rng, w->dev->size - sizeof(buf));
                size_t len = 1 + (size_t)test_rng_below(&rng, sizeof(buf));
                test_rng_fill(&rng, buf, len);
                if ((w->result = block_device_write_at(w->dev, buf, len, off)) < 0)
                        break;
        }
        return NULL;
}

/* Copy blocks of `dev` to `copy` the way a migration sender does. */
static void send_blocks(struct block_device *dev, unsigned char *copy, const uint64_t *blocks, size_t count) {
        for (size_t i = 0; i < count; i++) {
                uint64_t off = blocks[i] * dev->block_size;
                assert_ok(dirty_tracker_read_tracked(dev, copy + off, block_device_block_length(dev, blocks[i]),
                                                     off));
        }
}

static void simulate_migration(enum dirty_tracker_mode mode, uint64_t seed) {
        enum { SIZE = 4 << 20, BS = 4096 };
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("memory", SIZE, BS, &mem));
        assert_ok(dirty_tracker_wrap(mem, mode, &dev));
        unsigned char *copy = malloc(SIZE), *final = malloc(SIZE);
        assert_non_null(copy);
        assert_non_null(final);

        volatile int stop = 0;
        struct writer writers[2] = {{dev, seed, &stop, 0}, {dev, seed + 1, &stop, 0}};
        pthread_t threads[2];
        for (int i = 0; i < 2; i++)
                assert_int_equal(pthread_create(&threads[i], NULL, write_loop, &writers[i]), 0);

        /* Bulk pass, then dirty cycles while the writers keep going. */
        for (uint64_t b = 0; b < SIZE / BS; b++)
                send_blocks(dev, copy, &b, 1);
        /* Cycles with a throttle, for long enough that the writers (slow under sanitizers) race
         * with many of them. */
        size_t cycles = 0, resent = 0;
        uint64_t until = clock_now_ns() + 200 * NSEC_PER_MSEC;
        for (; cycles < 20 || clock_now_ns() < until; cycles++) {
                clock_sleep_ns(2 * NSEC_PER_MSEC);
                uint64_t *blocks;
                size_t count;
                assert_ok(dirty_tracker_collect(dev, &blocks, &count));
                send_blocks(dev, copy, blocks, count);
                resent += count;
                free(blocks);
        }
        __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
        for (int i = 0; i < 2; i++) {
                pthread_join(threads[i], NULL);
                assert_int_equal(writers[i].result, 0);
        }
        /* The final cycle after the "VM" stopped: the copy must now be exact. */
        uint64_t *blocks;
        size_t count;
        assert_ok(dirty_tracker_collect(dev, &blocks, &count));
        send_blocks(dev, copy, blocks, count);
        free(blocks);
        assert_ok(block_device_read_at(dev, final, SIZE, 0));
        assert_memory_equal(copy, final, SIZE);
        assert_true(resent > 0); /* the writers really raced with the cycles */
        fprintf(stderr, "  mode %d: %zu cycles re-sent %zu blocks, final cycle %zu\n", mode, cycles, resent, count);
        free(copy);
        free(final);
        block_device_close(dev);
}

static void test_concurrent_migration(void **state) {
        uint64_t seed = test_seed("test-dirty-tracker");
        simulate_migration(DIRTY_TRACK_ALL, seed);
        simulate_migration(DIRTY_TRACK_AFTER_READ, seed + 100);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_track_all),
                cmocka_unit_test(test_track_after_read),
                cmocka_unit_test(test_map_tracked),
                cmocka_unit_test(test_concurrent_migration),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
