/* Device migration end to end over a socket pair, in one process: three devices of different
 * sizes and block sizes, a writer changing the source until the suspend hook stops it (as pausing
 * a VM would), then every destination block must equal the source's final contents. Runs with
 * pre-copy and post-copy, pre-copy only (--disable-postcopy-migration), and post-copy only (no
 * cycles), plus a post-copy run whose destination reads everything right after taking authority
 * (reads of blocks still in flight wait for them, and must see the final data). */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/migrate.h"
#include "drafter/waiting_cache.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define NDEV 3
static const struct {
        const char *name;
        uint64_t size;
        uint32_t block_size;
} shapes[NDEV] = {
        {"memory", 8u << 20, 65536},
        {"disk", (3u << 20) + 1000, 4096},
        {"config", 5000, 4096},
};

struct world {
        struct block_device *src[NDEV]; /* dirty trackers on volatility devices on memory */
        struct volatility_monitor *vm[NDEV];
        struct migrate_source_device sdev[NDEV];
        pthread_t writer;
        volatile int stop;
        bool writer_running;
        uint64_t seed;
        /* destination side */
        bool read_all_at_authority;
        struct migrate_destination *dest;
        pthread_t dest_reader;
        bool dest_reader_running;
        unsigned char *dest_seen; /* what the destination read right after authority */
        uint64_t longest_wait_ns;
        int dest_read_result;
        bool authority_seen;
        unsigned final_calls;
        unsigned barrier_calls;
        uint64_t barrier_at_ns; /* on_barrier, on the receiving thread */
        unsigned char *final_copy; /* the FINAL_DEVICE as the destination read it on FINAL */
        /* On FINAL, the other devices' blocks present then, as read then: each must already be
         * its final version (the source sends the final DIRTY lists ahead of FINAL). */
        unsigned char *present_copy[NDEV];
        bool *present_then[NDEV];
        uint64_t ready_at_ns, suspended_at_ns; /* EVENT READY sent; the source's suspend */
};

/* The disk's final blocks go first, then FINAL: it is written up to the suspend, so it has some. */
#define FINAL_DEVICE 1

static void *writer(void *arg) {
        struct world *w = arg;
        struct test_rng rng = {w->seed};
        unsigned char buf[10000];
        while (!__atomic_load_n(&w->stop, __ATOMIC_ACQUIRE)) {
                int d = (int)test_rng_below(&rng, 2); /* memory and disk */
                uint64_t off = test_rng_below(&rng, w->src[d]->size - sizeof(buf));
                size_t len = 1 + (size_t)test_rng_below(&rng, sizeof(buf));
                test_rng_fill(&rng, buf, len);
                if (test_rng_below(&rng, 10) == 0)
                        memset(buf, 0, len);
                if (block_device_write_at(w->src[d], buf, len, off) < 0)
                        break;
                if (test_rng_below(&rng, 64) == 0)
                        clock_sleep_ns(100 * NSEC_PER_USEC);
        }
        return NULL;
}

static int suspend_hook(void *ctx) {
        struct world *w = ctx;
        if (!w->suspended_at_ns)
                w->suspended_at_ns = clock_now_ns();
        __atomic_store_n(&w->stop, 1, __ATOMIC_RELEASE);
        if (w->writer_running) {
                pthread_join(w->writer, NULL);
                w->writer_running = false;
        }
        return 0;
}

static int open_dest_device(void *ctx, const struct migrate_device_info *info, struct block_device **ret) {
        return memory_device_open(info->name, info->size, info->block_size, ret);
}

static void *read_everything(void *arg) {
        struct world *w = arg;
        struct block_device *dev = migrate_destination_device(w->dest, 0);
        /* Last block first: against the source's post-copy order, so NEED_AT has to do the work. */
        for (uint64_t b = block_device_block_count(dev); b-- > 0;) {
                uint64_t t = clock_now_ns();
                int r = block_device_read_at(dev, w->dest_seen + b * dev->block_size, dev->block_size,
                                             b * dev->block_size);
                t = clock_now_ns() - t;
                if (t > w->longest_wait_ns)
                        w->longest_wait_ns = t;
                if (r < 0) {
                        w->dest_read_result = r;
                        break;
                }
        }
        return NULL;
}

/* On the receiving thread: the source's barrier, just before it suspends. */
static void barrier_hook(void *ctx) {
        struct world *w = ctx;
        if (w->barrier_calls++ == 0)
                w->barrier_at_ns = clock_now_ns();
}

/* On the receiving thread, ahead of the hand-over: the device must read whole and final now
 * (a missing block would wait for this very thread). */
static void final_hook(void *ctx, size_t index, const char *name) {
        struct world *w = ctx;
        w->final_calls++;
        if (index != FINAL_DEVICE || strcmp(name, shapes[index].name) != 0 || w->authority_seen || w->final_copy)
                return; /* counted: the test fails on it */
        w->final_copy = malloc(shapes[index].size);
        if (w->final_copy &&
            block_device_read_at(migrate_destination_device(w->dest, index), w->final_copy, shapes[index].size, 0) < 0) {
                free(w->final_copy);
                w->final_copy = NULL;
        }
        for (size_t i = 0; i < NDEV; i++) {
                struct block_device *dev = migrate_destination_device(w->dest, i);
                uint64_t blocks = block_device_block_count(dev);
                if (i == index || !(w->present_copy[i] = malloc(shapes[i].size)) ||
                    !(w->present_then[i] = calloc(blocks, sizeof(bool))))
                        continue;
                for (uint64_t b = 0; b < blocks; b++)
                        if ((w->present_then[i][b] = waiting_cache_present(dev, b)) &&
                            block_device_read_at(dev, w->present_copy[i] + b * dev->block_size,
                                                 block_device_block_length(dev, b), b * dev->block_size) < 0)
                                w->present_then[i][b] = false;
        }
}

static int authority_hook(void *ctx) {
        struct world *w = ctx;
        w->authority_seen = true;
        if (w->read_all_at_authority) {
                w->dest_seen = malloc(shapes[0].size);
                if (!w->dest_seen || pthread_create(&w->dest_reader, NULL, read_everything, w) != 0)
                        return -ENOMEM;
                w->dest_reader_running = true;
                /* Hold the receiving thread (this hook runs on it) while the reader reaches
                 * missing blocks: without it a small final set can all arrive before the reader
                 * gets to it, since the source sends raw and fast while paused, and no read
                 * would have to ask. The source meanwhile fills the socket and waits, so the
                 * blocks the reader asks for are still pending there. */
                clock_sleep_ns(20 * NSEC_PER_MSEC);
        }
        return 0;
}

struct source_args {
        int fd;
        struct migrate_source_config cfg;
        struct migrate_stats stats;
        int result;
        char message[1024];
};

static void *run_source(void *arg) {
        struct source_args *a = arg;
        a->result = migrate_source_run(a->fd, &a->cfg, &a->stats);
        snprintf(a->message, sizeof(a->message), "%s", error_message());
        return NULL;
}

/* Variations of the source: blocks straight from memory (no volatility layer between the tracker
 * and the memory device, so the sender maps instead of copying), and how many blocks go in one
 * write. */
static bool source_maps;
static unsigned source_concurrency;
static uint64_t source_push_budget_ns;
/* A destination that says READY this long after its start (0: it does not announce READY). */
static uint64_t dest_ready_after_ns;

static void *say_ready(void *arg) {
        struct world *w = arg;
        clock_sleep_ns(dest_ready_after_ns);
        __atomic_store_n(&w->ready_at_ns, clock_now_ns(), __ATOMIC_RELEASE);
        if (migrate_destination_ready(w->dest) < 0)
                __atomic_store_n(&w->ready_at_ns, UINT64_MAX, __ATOMIC_RELEASE);
        return NULL;
}

static void migrate_once(int64_t max_dirty, int64_t min_cycles, int64_t max_cycles, int64_t throttle_ns,
                         bool disable_postcopy, bool read_all, bool compress, uint64_t seed) {
        struct world w = {.seed = seed, .read_all_at_authority = read_all};
        struct test_rng rng = {seed ^ 0xfeed};
        for (int i = 0; i < NDEV; i++) {
                struct block_device *mem, *vdev;
                assert_ok(memory_device_open(shapes[i].name, shapes[i].size, shapes[i].block_size, &mem));
                /* Random contents with zero stretches, so raw, zero and compressed frames all occur. */
                unsigned char *init = malloc(shapes[i].size);
                test_rng_fill(&rng, init, shapes[i].size);
                for (uint64_t off = 0; off + 3 * shapes[i].block_size <= shapes[i].size; off += 7 * shapes[i].block_size)
                        memset(init + off, 0, 2 * shapes[i].block_size);
                for (uint64_t off = shapes[i].block_size; off + shapes[i].block_size <= shapes[i].size;
                     off += 5 * shapes[i].block_size)
                        memset(init + off, 'a', shapes[i].block_size / 2); /* compressible */
                assert_ok(block_device_write_at(mem, init, shapes[i].size, 0));
                free(init);
                if (source_maps) {
                        vdev = mem;
                } else {
                        assert_ok(volatility_monitor_new(block_device_block_count(mem), NSEC_PER_SEC, clock_now_ns(),
                                                         &w.vm[i]));
                        assert_ok(volatility_device_wrap(mem, w.vm[i], &vdev));
                }
                assert_ok(dirty_tracker_wrap(vdev, DIRTY_TRACK_AFTER_READ, &w.src[i]));
                w.sdev[i] = (struct migrate_source_device){shapes[i].name, w.src[i], w.vm[i], NULL, max_dirty,
                                                           min_cycles, max_cycles, throttle_ns, NULL, NULL,
                                                           i == FINAL_DEVICE};
        }
        assert_int_equal(pthread_create(&w.writer, NULL, writer, &w), 0);
        w.writer_running = true;

        int sv[2];
        assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
        struct source_args src = {.fd = sv[0],
                                  .cfg = {.devices = w.sdev,
                                          .count = NDEV,
                                          .suspend = suspend_hook,
                                          .ctx = &w,
                                          .compress = compress,
                                          .concurrency = source_concurrency,
                                          .push_budget_ns = source_push_budget_ns}};
        pthread_t st;
        assert_int_equal(pthread_create(&st, NULL, run_source, &src), 0);
        struct migrate_destination_config dcfg = {.open_device = open_dest_device,
                                                  .on_authority = authority_hook,
                                                  .on_final = final_hook,
                                                  .on_barrier = barrier_hook,
                                                  .ctx = &w,
                                                  .disable_postcopy = disable_postcopy,
                                                  .read_timeout_ns = 10 * NSEC_PER_SEC,
                                                  .announce_ready = dest_ready_after_ns > 0};
        assert_ok(migrate_destination_start(sv[1], &dcfg, &w.dest));
        pthread_t ready_thread;
        if (dest_ready_after_ns)
                assert_int_equal(pthread_create(&ready_thread, NULL, say_ready, &w), 0);
        struct migrate_stats dstats;
        int r = migrate_destination_wait(w.dest, &dstats);
        pthread_join(st, NULL);
        if (r < 0 || src.result < 0)
                fail_msg("migration failed: destination %d (%s), source %d (%s)", r, error_message(), src.result,
                         src.message);
        assert_true(src.stats.authority_transferred && src.stats.completed);
        if (w.dest_reader_running)
                pthread_join(w.dest_reader, NULL);
        if (dest_ready_after_ns) {
                pthread_join(ready_thread, NULL);
                /* The source held its dirty cycles and its suspend until READY. */
                assert_true(w.ready_at_ns != UINT64_MAX);
                assert_true(w.suspended_at_ns > w.ready_at_ns);
                fprintf(stderr, "  READY %.1f ms after the start, suspend %.1f ms after READY\n",
                        dest_ready_after_ns / 1e6, (w.suspended_at_ns - w.ready_at_ns) / 1e6);
        }
        /* The barrier came once, before the suspend (the source waits for its answer). */
        assert_int_equal(w.barrier_calls, 1);
        assert_true(w.barrier_at_ns > 0 && w.barrier_at_ns <= w.suspended_at_ns);
        suspend_hook(&w); /* in case the migration ended before suspending (it cannot, but be tidy) */

        /* Byte for byte, every block of every device. */
        for (int i = 0; i < NDEV; i++) {
                unsigned char *a = malloc(shapes[i].size), *b = malloc(shapes[i].size);
                assert_ok(block_device_read_at(w.src[i], a, shapes[i].size, 0));
                assert_ok(block_device_read_at(migrate_destination_device(w.dest, i), b, shapes[i].size, 0));
                for (uint64_t blk = 0; blk < block_device_block_count(w.src[i]); blk++) {
                        uint64_t off = blk * shapes[i].block_size;
                        size_t len = block_device_block_length(w.src[i], blk);
                        if (memcmp(a + off, b + off, len) != 0)
                                fail_msg("device %s block %llu differs after migration", shapes[i].name,
                                         (unsigned long long)blk);
                }
                for (uint64_t blk = 0; w.present_then[i] && blk < block_device_block_count(w.src[i]); blk++) {
                        uint64_t off = blk * shapes[i].block_size;
                        if (w.present_then[i][blk] &&
                            memcmp(w.present_copy[i] + off, a + off, block_device_block_length(w.src[i], blk)) != 0)
                                fail_msg("device %s block %llu was present and stale when FINAL came", shapes[i].name,
                                         (unsigned long long)blk);
                }
                free(w.present_copy[i]);
                free(w.present_then[i]);
                if (i == FINAL_DEVICE) {
                        assert_int_equal(w.final_calls, 1);
                        assert_non_null(w.final_copy);
                        assert_memory_equal(w.final_copy, a, shapes[i].size);
                }
                if (i == 0 && w.dest_seen) {
                        assert_int_equal(w.dest_read_result, 0);
                        assert_memory_equal(w.dest_seen, a, shapes[0].size);
                }
                free(a);
                free(b);
        }
        fprintf(stderr,
                "  cycles %llu, blocks %llu (zero %llu, zstd %llu), NEED_AT served %llu, final dirty %llu, "
                "%.1f MB sent, bulk %.1f ms, cycles %.1f ms, total %.1f ms%s\n",
                (unsigned long long)src.stats.cycles, (unsigned long long)src.stats.blocks_sent,
                (unsigned long long)src.stats.zero_blocks, (unsigned long long)src.stats.compressed_blocks,
                (unsigned long long)src.stats.need_at_served, (unsigned long long)src.stats.final_dirty_blocks,
                src.stats.bytes_sent / 1e6, src.stats.bulk_ns / 1e6, src.stats.cycles_ns / 1e6,
                src.stats.total_ns / 1e6, w.dest_seen ? "" : "");
        if (w.dest_seen) {
                fprintf(stderr, "  post-copy reads: longest wait for a block %.2f ms\n", w.longest_wait_ns / 1e6);
                assert_true(src.stats.need_at_served > 0);
        }
        /* A final push leaves nothing for after the hand-over; without one, the final set
         * follows it. */
        if (source_push_budget_ns)
                assert_true(src.stats.final_pushed && dstats.postcopy_blocks == 0);
        else if (!disable_postcopy && src.stats.final_dirty_blocks > 0)
                assert_true(!src.stats.final_pushed && dstats.postcopy_blocks > 0);
        if (min_cycles > 0)
                assert_true(src.stats.cycles >= (uint64_t)min_cycles);
        else
                assert_int_equal(src.stats.cycles, 0);
        migrate_destination_free(w.dest);
        free(w.dest_seen);
        free(w.final_copy);
        close(sv[0]);
        for (int i = 0; i < NDEV; i++) {
                block_device_close(w.src[i]);
                volatility_monitor_free(w.vm[i]);
        }
}

static void test_precopy_and_postcopy(void **state) {
        migrate_once(20, 2, 10, 5 * NSEC_PER_MSEC, false, false, true, test_seed("test-migrate"));
}

/* EVENT READY: a destination still starting its VMM holds the source's suspend. */
static void test_ready(void **state) {
        dest_ready_after_ns = 300 * NSEC_PER_MSEC;
        migrate_once(20, 2, 10, 5 * NSEC_PER_MSEC, false, false, true, test_seed("test-migrate-ready"));
        dest_ready_after_ns = 0;
}

static void test_precopy_only(void **state) {
        source_concurrency = 1; /* every block in its own write */
        migrate_once(20, 2, 10, 5 * NSEC_PER_MSEC, true, false, false, test_seed("test-migrate") + 1);
}

static void test_postcopy_only(void **state) {
        source_concurrency = 0;
        migrate_once(0, 0, 0, 0, false, false, true, test_seed("test-migrate") + 2);
}

static void test_source_maps(void **state) {
        source_maps = true;
        source_concurrency = 3;
        migrate_once(20, 2, 10, 5 * NSEC_PER_MSEC, false, false, true, test_seed("test-migrate") + 4);
        source_maps = false;
        source_concurrency = 0;
}

/* The final dirty blocks ahead of the hand-over, while the writer keeps writing until the
 * suspend: still byte-exact, and nothing arrives after authority. */
static void test_final_push(void **state) {
        source_push_budget_ns = NSEC_PER_SEC;
        migrate_once(20, 2, 10, 5 * NSEC_PER_MSEC, false, false, true, test_seed("test-migrate") + 5);
        source_push_budget_ns = 0;
}

static void test_postcopy_reads_wait_for_data(void **state) {
        migrate_once(0, 0, 0, 0, false, true, true, test_seed("test-migrate") + 3);
}

int main(void) {
        signal(SIGPIPE, SIG_IGN);
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_precopy_and_postcopy),
                cmocka_unit_test(test_ready),
                cmocka_unit_test(test_precopy_only),
                cmocka_unit_test(test_postcopy_only),
                cmocka_unit_test(test_postcopy_reads_wait_for_data),
                cmocka_unit_test(test_source_maps),
                cmocka_unit_test(test_final_push),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
