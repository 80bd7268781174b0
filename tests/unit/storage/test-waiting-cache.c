/* Waiting cache: readers of missing blocks wait for them and ask for them once; timeouts and
 * cancellation wake them with a clear error; local writes and late arrivals do not clobber. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/waiting_cache.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define BS 4096
#define BLOCKS 16

struct needs {
        pthread_mutex_t lock;
        unsigned count[BLOCKS];
};

static void record_need(void *ctx, uint64_t block) {
        struct needs *n = ctx;
        pthread_mutex_lock(&n->lock);
        n->count[block]++;
        pthread_mutex_unlock(&n->lock);
}

static unsigned need_count(struct needs *n, uint64_t block) {
        pthread_mutex_lock(&n->lock);
        unsigned c = n->count[block];
        pthread_mutex_unlock(&n->lock);
        return c;
}

struct reader {
        struct block_device *dev;
        uint64_t off;
        size_t len;
        unsigned char buf[2 * BS];
        int result;
        char message[512];
        bool write; /* do a partial write of `len` 0x77 bytes instead */
};

static void *read_thread(void *arg) {
        struct reader *r = arg;
        if (r->write) {
                memset(r->buf, 0x77, r->len);
                r->result = block_device_write_at(r->dev, r->buf, r->len, r->off);
        } else {
                r->result = block_device_read_at(r->dev, r->buf, r->len, r->off);
        }
        snprintf(r->message, sizeof(r->message), "%s", error_message());
        return NULL;
}

static struct block_device *open_cache(struct needs *needs, uint64_t timeout_ns) {
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("disk", BLOCKS * BS, BS, &mem));
        assert_ok(waiting_cache_wrap(mem, record_need, needs, timeout_ns, &dev));
        assert_int_equal(waiting_cache_missing(dev), BLOCKS);
        return dev;
}

/* Wait (bounded) until a reader has asked for `block`. */
static void wait_for_need(struct needs *n, uint64_t block) {
        for (int i = 0; i < 5000 && need_count(n, block) == 0; i++)
                clock_sleep_ns(NSEC_PER_MSEC);
        assert_int_equal(need_count(n, block), 1);
}

static void test_read_waits_for_supply(void **state) {
        struct needs needs = {PTHREAD_MUTEX_INITIALIZER, {0}};
        struct block_device *dev = open_cache(&needs, 0);
        unsigned char block2[BS], block3[BS];
        memset(block2, 0x22, BS);
        memset(block3, 0x33, BS);

        /* Two readers of overlapping ranges: block 2 is asked for once. */
        struct reader a = {.dev = dev, .off = 2 * BS + 100, .len = BS}; /* blocks 2 and 3 */
        struct reader b = {.dev = dev, .off = 2 * BS, .len = 10};       /* block 2 */
        pthread_t ta, tb;
        assert_int_equal(pthread_create(&ta, NULL, read_thread, &a), 0);
        assert_int_equal(pthread_create(&tb, NULL, read_thread, &b), 0);
        wait_for_need(&needs, 2);
        wait_for_need(&needs, 3);
        assert_int_equal(waiting_cache_supply(dev, 2, block2, 0), 1);
        pthread_join(tb, NULL);
        assert_int_equal(b.result, 0);
        assert_memory_equal(b.buf, block2, 10);
        assert_int_equal(waiting_cache_supply(dev, 3, block3, WAITING_CACHE_IF_MISSING), 1);
        pthread_join(ta, NULL);
        assert_int_equal(a.result, 0);
        assert_memory_equal(a.buf, block2 + 100, BS - 100);
        assert_memory_equal(a.buf + BS - 100, block3, 100);
        assert_int_equal(need_count(&needs, 2), 1);
        assert_int_equal(need_count(&needs, 0), 0);
        assert_int_equal(waiting_cache_missing(dev), BLOCKS - 2);

        /* Present blocks are read without asking. */
        unsigned char got[BS];
        assert_ok(block_device_read_at(dev, got, BS, 2 * BS));
        assert_int_equal(need_count(&needs, 2), 1);

        /* Invalidated: missing again, asked for again. */
        waiting_cache_invalidate(dev, 2);
        struct reader c = {.dev = dev, .off = 2 * BS, .len = BS};
        pthread_t tc;
        assert_int_equal(pthread_create(&tc, NULL, read_thread, &c), 0);
        for (int i = 0; i < 5000 && need_count(&needs, 2) < 2; i++)
                clock_sleep_ns(NSEC_PER_MSEC);
        assert_int_equal(need_count(&needs, 2), 2);
        memset(block2, 0x44, BS);
        assert_int_equal(waiting_cache_supply(dev, 2, block2, 0), 1);
        pthread_join(tc, NULL);
        assert_int_equal(c.result, 0);
        assert_memory_equal(c.buf, block2, BS);
        block_device_close(dev);
}

static void test_timeout(void **state) {
        struct needs needs = {PTHREAD_MUTEX_INITIALIZER, {0}};
        struct block_device *dev = open_cache(&needs, 50 * NSEC_PER_MSEC);
        unsigned char buf[BS];
        uint64_t start = clock_now_ns();
        assert_int_equal(block_device_read_at(dev, buf, 1, 5 * BS), -ETIMEDOUT);
        assert_true(clock_now_ns() - start >= 50 * NSEC_PER_MSEC);
        assert_string_equal(error_message(), "disk: block 5 did not arrive within 50ms");
        assert_int_equal(need_count(&needs, 5), 1);
        block_device_close(dev);
}

static void test_cancel(void **state) {
        struct needs needs = {PTHREAD_MUTEX_INITIALIZER, {0}};
        struct block_device *dev = open_cache(&needs, 0);
        unsigned char block[BS] = {1};
        assert_int_equal(waiting_cache_supply(dev, 0, block, 0), 1);

        struct reader r = {.dev = dev, .off = 7 * BS, .len = 1};
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, read_thread, &r), 0);
        wait_for_need(&needs, 7);
        waiting_cache_cancel(dev, -ECONNRESET, "the source went away");
        pthread_join(t, NULL);
        assert_int_equal(r.result, -ECONNRESET);
        assert_string_equal(r.message, "disk: block 7 is not available: the source went away");

        /* Later reads of missing blocks fail at once; present ones still work. */
        unsigned char buf[BS];
        assert_int_equal(block_device_read_at(dev, buf, 1, 9 * BS), -ECONNRESET);
        assert_ok(block_device_read_at(dev, buf, BS, 0));
        assert_memory_equal(buf, block, BS);
        block_device_close(dev);
}

static void test_local_writes(void **state) {
        struct needs needs = {PTHREAD_MUTEX_INITIALIZER, {0}};
        struct block_device *dev = open_cache(&needs, 0);
        unsigned char local[BS], remote[BS], got[BS];
        memset(local, 0x11, BS);
        memset(remote, 0x99, BS);

        /* A whole-block local write makes the block present; the late arrival is dropped. */
        assert_ok(block_device_write_at(dev, local, BS, 4 * BS));
        assert_int_equal(need_count(&needs, 4), 0);
        assert_int_equal(waiting_cache_supply(dev, 4, remote, WAITING_CACHE_IF_MISSING), 0);
        assert_ok(block_device_read_at(dev, got, BS, 4 * BS));
        assert_memory_equal(got, local, BS);
        /* Without the flag (pre-copy, before the VM runs here) the source's data wins. */
        assert_int_equal(waiting_cache_supply(dev, 4, remote, 0), 1);
        assert_ok(block_device_read_at(dev, got, BS, 4 * BS));
        assert_memory_equal(got, remote, BS);

        /* A partial write of a missing block waits for it, then merges. */
        struct reader w = {.dev = dev, .off = 6 * BS + 10, .len = 20, .write = true};
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, read_thread, &w), 0);
        wait_for_need(&needs, 6);
        assert_int_equal(waiting_cache_supply(dev, 6, remote, WAITING_CACHE_IF_MISSING), 1);
        pthread_join(t, NULL);
        assert_int_equal(w.result, 0);
        assert_ok(block_device_read_at(dev, got, BS, 6 * BS));
        assert_memory_equal(got, remote, 10);
        for (int i = 10; i < 30; i++)
                assert_int_equal(got[i], 0x77);
        assert_memory_equal(got + 30, remote + 30, BS - 30);

        /* A whole-block discard needs no data; a supply beyond the device is refused. */
        assert_ok(block_device_discard(dev, BS, 8 * BS));
        assert_ok(block_device_read_at(dev, got, BS, 8 * BS));
        assert_true(buffer_is_zero(got, BS));
        assert_int_equal(waiting_cache_supply(dev, BLOCKS, remote, 0), -ERANGE);
        assert_string_equal(error_message(), "disk: block 16 is beyond the last block 15");
        waiting_cache_mark_present(dev, 0, BLOCKS);
        assert_int_equal(waiting_cache_missing(dev), 0);
        block_device_close(dev);
}

struct fill {
        const unsigned char *data;
        unsigned calls, dropped;
        int result;
};

static int fill_block(void *ctx, void *dst, size_t len) {
        struct fill *f = ctx;
        f->calls++;
        if (!dst)
                f->dropped++;
        else
                memcpy(dst, f->data, f->result < 0 ? len / 2 : len); /* a failing fill stops half-way */
        return f->result;
}

/* Supplying straight into the inner device's memory: written and woken like a supply, dropped
 * with IF_MISSING (fill still consumes), a failed fill leaves the block missing, and an inner
 * device without memory says so before anything is consumed. */
static void test_supply_direct(void **state) {
        struct needs needs = {PTHREAD_MUTEX_INITIALIZER, {0}};
        struct block_device *dev = open_cache(&needs, 0);
        unsigned char remote[BS], local[BS], got[BS];
        memset(remote, 0x5a, BS);
        memset(local, 0x11, BS);

        struct reader r = {.dev = dev, .off = 3 * BS, .len = BS};
        pthread_t t;
        assert_int_equal(pthread_create(&t, NULL, read_thread, &r), 0);
        wait_for_need(&needs, 3);
        struct fill f = {remote, 0, 0, 0};
        assert_int_equal(waiting_cache_supply_direct(dev, 3, 0, fill_block, &f), 1);
        pthread_join(t, NULL);
        assert_int_equal(r.result, 0);
        assert_memory_equal(r.buf, remote, BS);

        assert_ok(block_device_write_at(dev, local, BS, 5 * BS));
        assert_int_equal(waiting_cache_supply_direct(dev, 5, WAITING_CACHE_IF_MISSING, fill_block, &f), 0);
        assert_int_equal(f.dropped, 1);
        assert_ok(block_device_read_at(dev, got, BS, 5 * BS));
        assert_memory_equal(got, local, BS);

        f.result = -ECONNRESET;
        uint64_t missing = waiting_cache_missing(dev);
        assert_int_equal(waiting_cache_supply_direct(dev, 7, 0, fill_block, &f), -ECONNRESET);
        assert_int_equal(waiting_cache_missing(dev), missing);
        assert_int_equal(waiting_cache_supply_direct(dev, BLOCKS, 0, fill_block, &f), -ERANGE);
        block_device_close(dev);

        /* A file device has no memory to lend. */
        char *dir = test_tmpdir_new();
        char path[512];
        snprintf(path, sizeof(path), "%s/disk", dir);
        struct block_device *file, *cache;
        assert_ok(file_device_open("file", path, FILE_DEVICE_CREATE, BLOCKS * BS, BS, &file));
        assert_ok(waiting_cache_wrap(file, record_need, &needs, 0, &cache));
        unsigned calls = f.calls;
        assert_int_equal(waiting_cache_supply_direct(cache, 1, 0, fill_block, &f), -EOPNOTSUPP);
        assert_int_equal(f.calls, calls);
        block_device_close(cache);
        test_tmpdir_remove(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_read_waits_for_supply),
                cmocka_unit_test(test_timeout),
                cmocka_unit_test(test_cancel),
                cmocka_unit_test(test_local_writes),
                cmocka_unit_test(test_supply_direct),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
