/* Every provider and stack of providers against a reference buffer: seeded random reads, writes,
 * discards and flushes at unaligned offsets, several block sizes, device sizes that are not a
 * multiple of the block size; then a reopen where the provider persists. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/cow_device.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/volatility_monitor.h"
#include "drafter/waiting_cache.h"
#include "drafter/clock.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

enum kind { KIND_FILE, KIND_SPARSE, KIND_MEMORY, KIND_COW, KIND_STACK, KIND_WAITING };
static const char *const kind_names[] = {"file", "sparse", "memory", "cow", "cow+volatility+dirty", "waiting"};

struct fixture {
        char *dir;
        char *base, *data, *overlay, *state;
        struct volatility_monitor *vm;
};

static int open_kind(struct fixture *fx, enum kind kind, uint64_t size, uint32_t bs, bool create,
                     struct block_device **ret) {
        struct block_device *dev = NULL, *inner = NULL;
        int r;
        switch (kind) {
        case KIND_FILE:
                return file_device_open("disk", fx->data, create ? FILE_DEVICE_CREATE : 0, size, bs, ret);
        case KIND_SPARSE:
                return file_device_open("disk", fx->data, (create ? FILE_DEVICE_CREATE : 0) | FILE_DEVICE_SPARSE,
                                        size, bs, ret);
        case KIND_MEMORY:
                return memory_device_open("disk", size, bs, ret);
        case KIND_COW:
                return cow_device_open(&(struct cow_config){"disk", fx->base, fx->overlay, fx->state, bs}, ret);
        case KIND_STACK:
                r = cow_device_open(&(struct cow_config){"disk", fx->base, fx->overlay, fx->state, bs}, &inner);
                if (r < 0)
                        return r;
                if (!fx->vm && (r = volatility_monitor_new(block_device_block_count(inner), NSEC_PER_SEC,
                                                           clock_now_ns(), &fx->vm)) < 0)
                        return r;
                if ((r = volatility_device_wrap(inner, fx->vm, &dev)) < 0)
                        return r;
                return dirty_tracker_wrap(dev, DIRTY_TRACK_ALL, ret);
        case KIND_WAITING:
                r = memory_device_open("disk", size, bs, &inner);
                if (r < 0)
                        return r;
                r = waiting_cache_wrap(inner, NULL, NULL, NSEC_PER_SEC, &dev);
                if (r < 0)
                        return r;
                waiting_cache_mark_present(dev, 0, block_device_block_count(dev));
                *ret = dev;
                return 0;
        }
        return -EINVAL;
}

static void run_workload(struct block_device *dev, unsigned char *ref, uint64_t size, uint32_t bs,
                         struct test_rng *rng, unsigned ops) {
        size_t max_len = 3 * (size_t)bs + 17;
        unsigned char *buf = malloc(max_len), *got = malloc(max_len);
        assert_non_null(buf);
        assert_non_null(got);
        for (unsigned op = 0; op < ops; op++) {
                uint64_t off = test_rng_below(rng, size);
                /* Mostly unaligned, sometimes exactly one aligned block. */
                if (test_rng_below(rng, 4) == 0)
                        off -= off % bs;
                uint64_t want = 1 + test_rng_below(rng, max_len);
                size_t len = (size_t)MIN(want, size - off);
                unsigned what = (unsigned)test_rng_below(rng, 100);
                if (what < 55) {
                        test_rng_fill(rng, buf, len);
                        if (test_rng_below(rng, 8) == 0)
                                memset(buf, 0, len); /* zero writes take the sparse path */
                        assert_ok(block_device_write_at(dev, buf, len, off));
                        memcpy(ref + off, buf, len);
                } else if (what < 90) {
                        assert_ok(block_device_read_at(dev, got, len, off));
                        if (memcmp(got, ref + off, len) != 0)
                                fail_msg("op %u: read of %zu bytes at %" PRIu64 " differs from the reference", op,
                                         len, off);
                } else if (what < 96) {
                        assert_ok(block_device_discard(dev, len, off));
                        memset(ref + off, 0, len);
                } else {
                        assert_ok(block_device_flush(dev));
                }
        }
        free(buf);
        free(got);
}

static void verify_all(struct block_device *dev, const unsigned char *ref, uint64_t size) {
        unsigned char *all = malloc(size);
        assert_non_null(all);
        assert_ok(block_device_read_at(dev, all, size, 0));
        assert_memory_equal(all, ref, size);
        free(all);
}

static void check_kind(enum kind kind, uint32_t bs, uint64_t seed) {
        struct fixture fx = {0};
        fx.dir = test_tmpdir_new();
        assert_non_null(fx.dir);
        fx.base = test_path(fx.dir, "base.bin");
        fx.data = test_path(fx.dir, "data.bin");
        fx.overlay = test_path(fx.dir, "overlay/disk.bin");
        fx.state = test_path(fx.dir, "state/disk.bin");

        uint64_t size = 37ULL * bs + bs / 3 + 5; /* not a multiple of the block size */
        unsigned char *ref = calloc(1, size);
        assert_non_null(ref);
        if (kind == KIND_COW || kind == KIND_STACK) {
                test_write_random_file(fx.base, size, seed ^ 0xba5e);
                struct block_device *base;
                assert_ok(file_device_open("base", fx.base, FILE_DEVICE_READ_ONLY, 0, bs, &base));
                assert_ok(block_device_read_at(base, ref, size, 0));
                block_device_close(base);
        }

        struct test_rng rng = {seed};
        struct block_device *dev;
        assert_ok(open_kind(&fx, kind, size, bs, true, &dev));
        assert_int_equal(dev->size, size);
        assert_int_equal(block_device_block_count(dev), 38);
        assert_int_equal(block_device_block_length(dev, 37), bs / 3 + 5);
        run_workload(dev, ref, size, bs, &rng, 3000);
        verify_all(dev, ref, size);

        /* The contract is checked in one place for every provider. */
        char byte;
        error_clear();
        assert_int_equal(block_device_read_at(dev, &byte, 1, size), -ERANGE);
        assert_non_null(strstr(error_message(), "disk: read of 1 bytes at offset"));
        assert_int_equal(block_device_write_at(dev, &byte, 2, size - 1), -ERANGE);
        assert_int_equal(block_device_discard(dev, 1, UINT64_MAX), -ERANGE);

        if (kind == KIND_FILE || kind == KIND_SPARSE || kind == KIND_COW || kind == KIND_STACK) {
                block_device_close(dev);
                assert_ok(open_kind(&fx, kind, size, bs, false, &dev));
                verify_all(dev, ref, size);
                run_workload(dev, ref, size, bs, &rng, 500);
                verify_all(dev, ref, size);
        }
        block_device_close(dev);
        volatility_monitor_free(fx.vm);
        free(ref);
        free(fx.base);
        free(fx.data);
        free(fx.overlay);
        free(fx.state);
        test_tmpdir_remove(fx.dir);
}

static void test_all_providers(void **state) {
        static const uint32_t block_sizes[] = {512, 4096, 65536};
        uint64_t seed = test_seed("test-providers");
        for (enum kind k = KIND_FILE; k <= KIND_WAITING; k++)
                for (size_t b = 0; b < ELEMENTSOF(block_sizes); b++) {
                        fprintf(stderr, "  %s, block size %u\n", kind_names[k], block_sizes[b]);
                        check_kind(k, block_sizes[b], seed + k * 31 + b);
                }
}

static void test_file_errors(void **state) {
        char *dir = test_tmpdir_new();
        _cleanup_free_ char *path = test_path(dir, "x.bin");
        struct block_device *dev;
        error_clear();
        assert_int_equal(file_device_open("disk", path, 0, 0, 4096, &dev), -ENOENT);
        char want[512];
        snprintf(want, sizeof(want), "disk: cannot open %s: No such file or directory", path);
        assert_string_equal(error_message(), want);

        test_write_random_file(path, 1000, 3);
        assert_int_equal(file_device_open("disk", path, FILE_DEVICE_CREATE, 2000, 4096, &dev), -EINVAL);
        snprintf(want, sizeof(want), "disk: %s has 1000 bytes, expected 2000", path);
        assert_string_equal(error_message(), want);

        assert_ok(file_device_open("disk", path, FILE_DEVICE_READ_ONLY, 0, 4096, &dev));
        assert_int_equal(dev->size, 1000);
        assert_int_equal(block_device_write_at(dev, "x", 1, 0), -EROFS);
        block_device_close(dev);
        test_tmpdir_remove(dir);
}

/* Reads that cross holes and data in every way read what pread reads. */
static void test_file_holes(void **state) {
        char *dir = test_tmpdir_new();
        _cleanup_free_ char *path = test_path(dir, "holes.bin");
        const uint64_t size = 64 * 4096 + 100;
        unsigned char *ref = calloc(1, size), *got = malloc(size);
        assert_non_null(ref);
        assert_non_null(got);
        struct block_device *dev;
        assert_ok(file_device_open("disk", path, FILE_DEVICE_CREATE, size, 4096, &dev));
        /* Data in pages 3, 10-12, 40 and the tail; the rest stays a hole. */
        static const uint64_t pages[] = {3, 10, 11, 12, 40, 64};
        struct test_rng rng = {test_seed("test-file-holes")};
        for (size_t i = 0; i < ELEMENTSOF(pages); i++) {
                uint64_t off = pages[i] * 4096, len = MIN(4096, size - off);
                test_rng_fill(&rng, ref + off, (size_t)len);
                assert_ok(block_device_write_at(dev, ref + off, (size_t)len, off));
        }
        for (uint64_t off = 0; off < size; off += 1531)
                for (uint64_t len = 4096; len <= 20 * 4096 && off + len <= size; len += 4096 + 977) {
                        memset(got, 0xa5, (size_t)len);
                        assert_ok(block_device_read_at(dev, got, (size_t)len, off));
                        if (memcmp(got, ref + off, (size_t)len) != 0)
                                fail_msg("read of %" PRIu64 " bytes at %" PRIu64 " differs", len, off);
                }
        verify_all(dev, ref, size);
        block_device_close(dev);
        free(ref);
        free(got);
        test_tmpdir_remove(dir);
}

static void test_zero_detection(void **state) {
        unsigned char buf[1000] = {0};
        assert_true(buffer_is_zero(buf, sizeof(buf)));
        assert_true(buffer_is_zero(buf + 3, 0));
        for (size_t i = 0; i < sizeof(buf); i += 7) {
                buf[i] = 1;
                assert_false(buffer_is_zero(buf, sizeof(buf)));
                assert_true(buffer_is_zero(buf, i)); /* bytes before it */
                buf[i] = 0;
        }
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_all_providers),
                cmocka_unit_test(test_file_errors),
                cmocka_unit_test(test_file_holes),
                cmocka_unit_test(test_zero_detection),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
