/* Volatility: least-volatile-first order, halving per half-life, saturation, sorting, and a
 * seeded random check that every pop returns a block of minimal recent count. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/volatility_monitor.h"

#include <errno.h>
#include <stdlib.h>

static void touch_n(struct volatility_monitor *vm, uint64_t block, unsigned n, uint64_t now) {
        for (unsigned i = 0; i < n; i++)
                volatility_monitor_touch(vm, block, now);
}

static void test_order(void **state) {
        struct volatility_monitor *vm;
        assert_ok(volatility_monitor_new(10, 1000, 0, &vm));
        touch_n(vm, 3, 5, 1);
        touch_n(vm, 7, 2, 1);
        touch_n(vm, 1, 1, 1);
        static const uint64_t want[] = {0, 2, 4, 5, 6, 8, 9, 1, 7, 3};
        for (size_t i = 0; i < ELEMENTSOF(want); i++) {
                uint64_t b;
                assert_ok(volatility_monitor_pop_least(vm, 2, &b));
                assert_int_equal(b, want[i]);
        }
        uint64_t b;
        assert_int_equal(volatility_monitor_pop_least(vm, 2, &b), -ENOENT);
        assert_int_equal(volatility_monitor_queued(vm), 0);

        /* Writes to blocks already taken still count; pushing puts them back by their count. */
        touch_n(vm, 3, 1, 3);
        volatility_monitor_push(vm, 3, 3);
        volatility_monitor_push(vm, 0, 3);
        volatility_monitor_push(vm, 0, 3); /* twice is once */
        assert_int_equal(volatility_monitor_queued(vm), 2);
        assert_ok(volatility_monitor_pop_least(vm, 3, &b));
        assert_int_equal(b, 0);
        assert_ok(volatility_monitor_pop_least(vm, 3, &b));
        assert_int_equal(b, 3);
        assert_int_equal(volatility_monitor_count(vm, 3, 3), 6);
        volatility_monitor_free(vm);
}

static void test_decay_and_saturation(void **state) {
        struct volatility_monitor *vm;
        assert_ok(volatility_monitor_new(4, 100, 0, &vm));
        touch_n(vm, 0, 8, 0);
        assert_int_equal(volatility_monitor_count(vm, 0, 99), 8);
        assert_int_equal(volatility_monitor_count(vm, 0, 100), 4);
        assert_int_equal(volatility_monitor_count(vm, 0, 250), 2);
        assert_int_equal(volatility_monitor_count(vm, 0, 1000), 0);

        touch_n(vm, 1, 100, 1000);
        assert_int_equal(volatility_monitor_count(vm, 1, 1000), VOLATILITY_MAX_COUNT);
        assert_int_equal(volatility_monitor_count(vm, 1, 1100), VOLATILITY_MAX_COUNT / 2);

        /* A block hot long ago is now calmer than one written recently. */
        touch_n(vm, 2, 10, 1100);
        touch_n(vm, 3, 3, 1550);
        uint64_t order[4];
        for (int i = 0; i < 4; i++)
                assert_ok(volatility_monitor_pop_least(vm, 1550, &order[i]));
        assert_int_equal(order[0], 0); /* count 0 */
        assert_int_equal(order[1], 2); /* 10 >> 4 = 0, queued after block 0 */
        assert_int_equal(order[2], 1); /* 31 >> 4 = 1 */
        assert_int_equal(order[3], 3); /* 3 */
        volatility_monitor_free(vm);
}

static void test_sort(void **state) {
        struct volatility_monitor *vm;
        assert_ok(volatility_monitor_new(8, 1000, 0, &vm));
        touch_n(vm, 5, 4, 0);
        touch_n(vm, 2, 2, 0);
        touch_n(vm, 6, 2, 0);
        uint64_t blocks[] = {5, 2, 7, 6, 1};
        assert_ok(volatility_monitor_sort(vm, blocks, ELEMENTSOF(blocks), 0));
        static const uint64_t want[] = {7, 1, 2, 6, 5};
        for (size_t i = 0; i < ELEMENTSOF(want); i++)
                assert_int_equal(blocks[i], want[i]);
        volatility_monitor_free(vm);
}

static void test_random_against_scan(void **state) {
        enum { BLOCKS = 300 };
        struct test_rng rng = {test_seed("test-volatility")};
        struct volatility_monitor *vm;
        assert_ok(volatility_monitor_new(BLOCKS, 50, 0, &vm));
        bool queued[BLOCKS];
        for (int i = 0; i < BLOCKS; i++)
                queued[i] = true;
        uint64_t now = 0;
        unsigned pops = 0;
        for (int op = 0; op < 20000; op++) {
                now += test_rng_below(&rng, 3);
                unsigned what = (unsigned)test_rng_below(&rng, 10);
                if (what < 7) {
                        /* Skewed writes: low blocks are hot. */
                        uint64_t b = test_rng_below(&rng, 1 + test_rng_below(&rng, BLOCKS));
                        volatility_monitor_touch(vm, b, now);
                } else if (what < 9) {
                        uint64_t b;
                        if (volatility_monitor_pop_least(vm, now, &b) < 0)
                                continue;
                        assert_true(queued[b]);
                        queued[b] = false;
                        pops++;
                        unsigned got = volatility_monitor_count(vm, b, now);
                        for (int i = 0; i < BLOCKS; i++)
                                if (queued[i] && volatility_monitor_count(vm, (uint64_t)i, now) < got)
                                        fail_msg("op %d: popped block %llu with count %u, block %d has %u", op,
                                                 (unsigned long long)b, got, i,
                                                 volatility_monitor_count(vm, (uint64_t)i, now));
                } else {
                        uint64_t b = test_rng_below(&rng, BLOCKS);
                        volatility_monitor_push(vm, b, now);
                        queued[b] = true;
                }
        }
        fprintf(stderr, "  %u pops checked against a full scan\n", pops);
        assert_true(pops > 1000);
        volatility_monitor_free(vm);
}

static void test_device_layer(void **state) {
        struct block_device *mem, *dev;
        struct volatility_monitor *vm;
        assert_ok(memory_device_open("disk", 16 * 512, 512, &mem));
        assert_ok(volatility_monitor_new(16, NSEC_PER_SEC * 60, clock_now_ns(), &vm));
        assert_ok(volatility_device_wrap(mem, vm, &dev));
        char buf[1024] = {0};
        assert_ok(block_device_write_at(dev, buf, 600, 400)); /* blocks 0, 1 */
        assert_ok(block_device_write_at(dev, buf, 1, 1100)); /* block 2 */
        assert_ok(block_device_write_at(dev, buf, 1, 1100));
        assert_ok(block_device_read_at(dev, buf, 1024, 0));
        uint64_t now = clock_now_ns();
        assert_int_equal(volatility_monitor_count(vm, 0, now), 1);
        assert_int_equal(volatility_monitor_count(vm, 1, now), 1);
        assert_int_equal(volatility_monitor_count(vm, 2, now), 2);
        assert_int_equal(volatility_monitor_count(vm, 3, now), 0);
        block_device_close(dev);

        /* A monitor of another size is refused. */
        assert_ok(memory_device_open("disk", 17 * 512, 512, &mem));
        assert_int_equal(volatility_device_wrap(mem, vm, &dev), -EINVAL);
        assert_string_equal(error_message(), "disk: volatility monitor has 16 blocks, device has 17");
        block_device_close(mem);
        volatility_monitor_free(vm);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_order),
                cmocka_unit_test(test_decay_and_saturation),
                cmocka_unit_test(test_sort),
                cmocka_unit_test(test_random_against_scan),
                cmocka_unit_test(test_device_layer),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
