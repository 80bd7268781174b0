/* The page warmer's direct stores (page_warmer_store): a block stored on the caller's thread is
 * what the memory file reads from then on, with no read request reaching the device (the device
 * underneath is changed behind the export's back to tell the two apart); a store replaces an
 * older cached copy; a dirtied block's cached copy is dropped; a block that lands while QEMU may
 * read the file is stored only once no read can wait on it, every block within a read window
 * of it being here (page_warmer_landed); the thread hands what it cached to a toucher, hurries a
 * request out when it pauses or stops, and drops a toucher that fails. Needs /dev/fuse and permission to mount (root here);
 * skips (77) only without them. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/fuse_export.h"
#include "drafter/waiting_cache.h"
#include "page_warmer.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BS 65536
#define BLOCKS 16

struct fixture {
        char *dir;
        struct block_device *inner, *dev;
        struct fuse_export *fx;
        struct page_warmer *w;
        int fd;
};

static void fill(void *buf, int byte) {
        memset(buf, byte, BS);
}

static int setup(void **state) {
        struct fixture *f = calloc(1, sizeof(*f));
        if (!f || !(f->dir = test_tmpdir_new()))
                return -1;
        if (memory_device_open("memory", (uint64_t)BLOCKS * BS, BS, &f->inner) < 0 ||
            waiting_cache_wrap(f->inner, NULL, NULL, 0, &f->dev) < 0)
                return -1;
        _cleanup_free_ char *block = malloc(BS);
        fill(block, 'a');
        for (uint64_t b = 0; b < BLOCKS; b++)
                if (waiting_cache_supply(f->dev, b, block, 0) < 0)
                        return -1;
        _cleanup_free_ char *mnt = test_path(f->dir, "mnt");
        if (fuse_export_start(mnt, &(struct fuse_export_device){"memory", f->dev, false}, 1, &f->fx) < 0)
                return -1;
        if (page_warmer_new(f->fx, 0, f->dev, &f->w) < 0)
                return -1;
        f->fd = open(fuse_export_path(f->fx, 0), O_RDONLY | O_CLOEXEC);
        *state = f;
        return f->fd < 0 ? -1 : 0;
}

static int teardown(void **state) {
        struct fixture *f = *state;
        if (!f)
                return 0;
        if (f->fd >= 0)
                close(f->fd);
        page_warmer_free(f->w);
        fuse_export_stop(f->fx);
        block_device_close(f->dev);
        test_tmpdir_remove(f->dir);
        free(f);
        return 0;
}

/* The byte every page of block b reads as through the memory file (or '?' if they differ). */
static int file_byte(struct fixture *f, uint64_t b) {
        _cleanup_free_ unsigned char *buf = malloc(BS);
        assert_int_equal(pread(f->fd, buf, BS, (off_t)(b * BS)), BS);
        for (size_t i = 1; i < BS; i++)
                if (buf[i] != buf[0])
                        return '?';
        return buf[0];
}

/* Change block b underneath the export: a read that reaches the device sees it, the page cache
 * does not. */
static void behind_the_back(struct fixture *f, uint64_t b, int byte) {
        _cleanup_free_ char *buf = malloc(BS);
        fill(buf, byte);
        assert_ok(block_device_write_at(f->inner, buf, BS, b * BS));
}

static void test_store_serves_reads(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *block = malloc(BS);
        fill(block, 'b');
        assert_int_equal(waiting_cache_supply(f->dev, 3, block, 0), 1);
        assert_ok(page_warmer_store(f->w, 3, block));
        behind_the_back(f, 3, 'x');
        assert_int_equal(file_byte(f, 3), 'b'); /* from the page cache: no read request */
        /* A block never stored is read from the device. */
        behind_the_back(f, 7, 'y');
        assert_int_equal(file_byte(f, 7), 'y');
}

static void test_store_replaces_cached_copy(void **state) {
        struct fixture *f = *state;
        assert_int_equal(file_byte(f, 4), 'a'); /* cached by the read */
        _cleanup_free_ char *block = malloc(BS);
        fill(block, 'c');
        assert_int_equal(waiting_cache_supply(f->dev, 4, block, 0), 1);
        assert_ok(page_warmer_store(f->w, 4, NULL)); /* read back from the device */
        behind_the_back(f, 4, 'x');
        assert_int_equal(file_byte(f, 4), 'c');
}

static void test_dirtied_drops_stored_copy(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *block = malloc(BS);
        fill(block, 'd');
        assert_int_equal(waiting_cache_supply(f->dev, 5, block, 0), 1);
        assert_ok(page_warmer_store(f->w, 5, block));
        page_warmer_dirtied(f->w, 5);
        behind_the_back(f, 5, 'e');
        assert_int_equal(file_byte(f, 5), 'e'); /* read again from the device */
        assert_int_equal(page_warmer_store(f->w, BLOCKS, block), -ERANGE);
}

/* Blocks b arriving while QEMU may read the file: stored only once b and its neighbours are
 * here, a queued neighbour as soon as the block it waited for lands. */
static void go_missing(struct fixture *f, uint64_t b) {
        page_warmer_dirtied(f->w, b);
        waiting_cache_invalidate(f->dev, b);
}

static void land(struct fixture *f, uint64_t b, int byte) {
        _cleanup_free_ char *block = malloc(BS);
        fill(block, byte);
        assert_int_equal(waiting_cache_supply(f->dev, b, block, 0), 1);
        page_warmer_landed(f->w, b, block);
}

static void test_landed_waits_for_neighbours(void **state) {
        struct fixture *f = *state;
        go_missing(f, 9);
        land(f, 8, 'p'); /* 9 is missing: a read of 8 could be waiting for it */
        behind_the_back(f, 8, 'x');
        _cleanup_free_ char *block = malloc(BS);
        fill(block, 'q');
        assert_int_equal(waiting_cache_supply(f->dev, 9, block, 0), 1);
        assert_int_equal(file_byte(f, 8), 'x'); /* not stored: the read reached the device */
}

/* A read window (this mount's: fuse_export_read_window, beyond a block) reaches further than
 * the next block: a missing block four away holds the store too. */
static void test_landed_waits_for_window(void **state) {
        struct fixture *f = *state;
        assert_true(fuse_export_read_window(f->fx) >= 5 * BS);
        go_missing(f, 12);
        land(f, 8, 'p');
        behind_the_back(f, 8, 'x');
        _cleanup_free_ char *block = malloc(BS);
        fill(block, 'q');
        assert_int_equal(waiting_cache_supply(f->dev, 12, block, 0), 1);
        assert_int_equal(file_byte(f, 8), 'x');
}

static void test_landed_stores_queued_neighbour(void **state) {
        struct fixture *f = *state;
        go_missing(f, 8);
        go_missing(f, 9);
        land(f, 8, 'p'); /* queued */
        land(f, 9, 'q'); /* stored, and 8 with it */
        behind_the_back(f, 8, 'x');
        behind_the_back(f, 9, 'y');
        assert_int_equal(file_byte(f, 8), 'p');
        assert_int_equal(file_byte(f, 9), 'q');
        land(f, BLOCKS - 1, 'r'); /* the last block has one neighbour */
        behind_the_back(f, BLOCKS - 1, 'x');
        assert_int_equal(file_byte(f, BLOCKS - 1), 'r');
}

/* A toucher that records its calls and holds each until released (or hurried). */
struct toucher_log {
        pthread_mutex_t m;
        pthread_cond_t c;
        int calls, result;
        uint64_t off, len; /* the first call's */
        bool hold, in, hurried;
};

static int log_touch(void *ctx, uint64_t off, uint64_t len) {
        struct toucher_log *t = ctx;
        pthread_mutex_lock(&t->m);
        if (t->calls++ == 0) {
                t->off = off;
                t->len = len;
        }
        t->in = true;
        pthread_cond_broadcast(&t->c);
        while (t->hold)
                pthread_cond_wait(&t->c, &t->m);
        t->in = false;
        int r = t->result;
        pthread_mutex_unlock(&t->m);
        return r;
}

static void log_hurry(void *ctx) {
        struct toucher_log *t = ctx;
        pthread_mutex_lock(&t->m);
        t->hurried = true;
        t->hold = false;
        pthread_cond_broadcast(&t->c);
        pthread_mutex_unlock(&t->m);
}

static int calls_after(struct toucher_log *t, uint64_t ms) {
        clock_sleep_ns(ms * NSEC_PER_MSEC);
        pthread_mutex_lock(&t->m);
        int n = t->calls;
        pthread_mutex_unlock(&t->m);
        return n;
}

/* Start the thread with toucher t and wait (up to 10 s) for its first call. */
static void first_touch(struct fixture *f, struct toucher_log *t) {
        page_warmer_set_toucher(f->w, &(struct page_warmer_toucher){log_touch, log_hurry, t});
        assert_ok(page_warmer_run(f->w));
        struct timespec ts;
        clock_deadline_after(10 * NSEC_PER_SEC, &ts);
        pthread_mutex_lock(&t->m);
        while (t->calls == 0)
                assert_int_equal(pthread_cond_timedwait(&t->c, &t->m, &ts), 0);
        pthread_mutex_unlock(&t->m);
        assert_int_equal(t->off % BS, 0);
        assert_true(t->len > 0 && t->off + t->len <= (uint64_t)BLOCKS * BS);
}

static void test_toucher_hurried_by_pause(void **state) {
        struct fixture *f = *state;
        struct toucher_log t = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, .hold = true};
        first_touch(f, &t);
        page_warmer_pause(f->w);
        assert_true(t.hurried);
        assert_int_equal(calls_after(&t, 300), 1); /* paused: no more */
}

static void test_toucher_stop_waits(void **state) {
        struct fixture *f = *state;
        struct toucher_log t = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, .hold = true};
        first_touch(f, &t);
        page_warmer_set_toucher(f->w, NULL);
        assert_true(t.hurried);
        assert_false(t.in); /* returned only once the request was back */
        assert_int_equal(calls_after(&t, 300), 1);
}

static void test_toucher_failing_dropped(void **state) {
        struct fixture *f = *state;
        struct toucher_log t = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, .result = -EIO};
        first_touch(f, &t);
        /* Every block was cached (more than one run of them), yet it is not asked again. */
        assert_int_equal(calls_after(&t, 300), 1);
}

int main(void) {
        if (access("/dev/fuse", R_OK | W_OK) != 0)
                return 77;
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_store_serves_reads, setup, teardown),
                cmocka_unit_test_setup_teardown(test_store_replaces_cached_copy, setup, teardown),
                cmocka_unit_test_setup_teardown(test_dirtied_drops_stored_copy, setup, teardown),
                cmocka_unit_test_setup_teardown(test_landed_waits_for_neighbours, setup, teardown),
                cmocka_unit_test_setup_teardown(test_landed_waits_for_window, setup, teardown),
                cmocka_unit_test_setup_teardown(test_landed_stores_queued_neighbour, setup, teardown),
                cmocka_unit_test_setup_teardown(test_toucher_hurried_by_pause, setup, teardown),
                cmocka_unit_test_setup_teardown(test_toucher_stop_waits, setup, teardown),
                cmocka_unit_test_setup_teardown(test_toucher_failing_dropped, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
