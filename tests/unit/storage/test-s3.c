/* S3 client, sync and fetch against a real S3 server (s3rver from npm, scripts/install-s3rver;
 * the test skips only if it cannot be installed): objects round-trip and errors carry S3's
 * reason; the sync uploads everything once, leaves an object that keeps changing alone until it
 * is quiet, and knows which objects are current; the fetch delivers exactly the device's bytes,
 * and with the server gone gives every object back. Runs under ASan/UBSan in CI too. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/s3_sync.h"

#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static pid_t server = -1;
static char endpoint[64];
static char *datadir;

static int free_port(void) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof(a);
        if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || getsockname(fd, (struct sockaddr *)&a, &len) < 0)
                return -1;
        close(fd);
        return ntohs(a.sin_port);
}

static bool reachable(int port) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
        if (fd >= 0)
                close(fd);
        return ok;
}

static void stop_server(void) {
        if (server > 0) {
                kill(server, SIGKILL);
                waitpid(server, NULL, 0);
                server = -1;
        }
}

/* 0, or 77 (skip) if s3rver cannot be had. */
static int start_server(void) {
        const char *root = getenv("DRAFTER_SOURCE_ROOT");
        char cmd[4096], bin[4096] = "";
        snprintf(cmd, sizeof(cmd), "%s/scripts/install-s3rver", root ? root : ".");
        FILE *p = popen(cmd, "r");
        if (!p || !fgets(bin, sizeof(bin), p) || pclose(p) != 0) {
                fprintf(stderr, "SKIP: s3rver cannot be installed (%s)\n", cmd);
                return 77;
        }
        bin[strcspn(bin, "\n")] = '\0';
        int port = free_port();
        snprintf(endpoint, sizeof(endpoint), "127.0.0.1:%d", port);
        datadir = test_tmpdir_new();
        server = fork();
        if (server == 0) {
                char ports[16];
                snprintf(ports, sizeof(ports), "%d", port);
                execl(bin, bin, "-d", datadir, "-a", "127.0.0.1", "-p", ports, "-s", "--configure-bucket", "unit-test",
                      (char *)NULL);
                _exit(127);
        }
        for (int i = 0; i < 200 && !reachable(port); i++)
                clock_sleep_ns(50 * NSEC_PER_MSEC);
        if (!reachable(port)) {
                fprintf(stderr, "s3rver did not start on %s\n", endpoint);
                return 1;
        }
        return 0;
}

static struct s3_client *client(const char *access, const char *bucket) {
        struct s3_config c = {.endpoint = endpoint, .bucket = bucket, .access_key = access, .secret_key = "S3RVER"};
        struct s3_client *k;
        assert_ok(s3_client_new(&c, &k));
        s3_client_set_retries(k, 2, 20 * NSEC_PER_MSEC);
        return k;
}

static void test_objects(void **state) {
        struct s3_client *c = client("S3RVER", "unit-test");
        struct s3_conn *k;
        assert_ok(s3_conn_new(c, &k));
        uint8_t *data = malloc(1 << 20), *back = malloc(1 << 20);
        struct test_rng rng = {test_seed("test-s3")};
        test_rng_fill(&rng, data, 1 << 20);
        assert_ok(s3_put(k, "a/b/0000000000000001", data, 1 << 20));
        size_t len = 0;
        assert_ok(s3_get(k, "a/b/0000000000000001", back, 1 << 20, &len));
        assert_int_equal(len, 1 << 20);
        assert_memory_equal(data, back, 1 << 20);
        assert_int_equal(s3_get(k, "a/b/missing", back, 1 << 20, &len), -ENOENT);
        assert_non_null(strstr(error_message(), "NoSuchKey"));
        assert_int_equal(s3_get(k, "a/b/0000000000000001", back, 1000, &len), -EFBIG);
        s3_conn_free(k);
        s3_client_free(c);

        c = client("WRONGKEY", "unit-test");
        assert_int_equal(s3_check_writable(c, "x/layout", "{}"), -EACCES);
        assert_non_null(strstr(error_message(), "InvalidAccessKeyId"));
        s3_client_free(c);
        c = client("S3RVER", "no-such-bucket");
        assert_int_equal(s3_check_writable(c, "x/layout", "{}"), -ENOENT);
        assert_non_null(strstr(error_message(), "does not exist"));
        s3_client_free(c);
        struct s3_config bad = {.endpoint = "http://x", .bucket = "unit-test"};
        assert_int_equal(s3_client_new(&bad, &c), -EINVAL);
        bad = (struct s3_config){.endpoint = endpoint, .bucket = "No_Such"};
        assert_int_equal(s3_client_new(&bad, &c), -EINVAL);
        free(data);
        free(back);
}

struct fetched {
        struct block_device *dev;
        pthread_mutex_t lock;
        unsigned delivered, failed, wrong;
};

static void deliver(void *ctx, uint64_t object, const uint8_t *data, size_t len) {
        struct fetched *f = ctx;
        uint8_t *want = malloc(len);
        assert_ok(block_device_read_at(f->dev, want, len, object << 20));
        pthread_mutex_lock(&f->lock);
        f->delivered++;
        f->wrong += memcmp(want, data, len) != 0;
        pthread_mutex_unlock(&f->lock);
        free(want);
}

static void failed(void *ctx, uint64_t object) {
        struct fetched *f = ctx;
        pthread_mutex_lock(&f->lock);
        f->failed++;
        pthread_mutex_unlock(&f->lock);
}

static void wait_until(bool (*cond)(void *), void *ctx, uint64_t limit_ns, const char *what) {
        uint64_t until = clock_now_ns() + limit_ns;
        while (!cond(ctx)) {
                if (clock_now_ns() > until)
                        fail_msg("%s did not happen within %.1f s", what, limit_ns / 1e9);
                clock_sleep_ns(20 * NSEC_PER_MSEC);
        }
}

static bool first_pass(void *ctx) {
        struct s3_sync_stats st;
        s3_sync_get_stats(ctx, &st);
        return st.first_pass_done;
}

static bool fetch_done(void *ctx) {
        return s3_fetch_done(ctx);
}

static void test_sync_and_fetch(void **state) {
        /* 4 MiB and a bit: 5 objects (the last short), the third all zeros. */
        const uint64_t size = (4 << 20) + 65536;
        struct block_device *mem, *dev;
        assert_ok(memory_device_open("disk", size, 65536, &mem));
        assert_ok(dirty_tracker_wrap(mem, DIRTY_TRACK_ALL, &dev));
        uint8_t *buf = calloc(1, size);
        struct test_rng rng = {test_seed("test-s3-sync")};
        test_rng_fill(&rng, buf, size);
        memset(buf + (2 << 20), 0, 1 << 20);
        assert_ok(block_device_write_at(dev, buf, size, 0));
        struct s3_client *c = client("S3RVER", "unit-test");
        struct s3_sync_options o = {.client = c, .prefix = "unit/p1", .device = "disk", .tracker = dev,
                                    .object_size = s3_object_size(65536), .concurrency = 4,
                                    .min_age_ns = 400 * NSEC_PER_MSEC, .max_age_ns = 60 * NSEC_PER_SEC};
        struct s3_sync *s;
        assert_ok(s3_sync_start(&o, &s));
        wait_until(first_pass, s, 30 * NSEC_PER_SEC, "the first upload");
        struct s3_sync_stats st;
        s3_sync_get_stats(s, &st);
        assert_int_equal(st.objects, 5);
        assert_int_equal(st.uploads, 4);
        assert_int_equal(st.zero_objects, 1);
        assert_int_equal(st.current, 4);

        /* Object 0 keeps changing (every 20 ms for 2 s), object 1 changes once. */
        uint8_t b = 1;
        assert_ok(block_device_write_at(dev, &b, 1, (1 << 20) + 5));
        for (int i = 0; i < 100; i++) {
                b++;
                assert_ok(block_device_write_at(dev, &b, 1, (uint64_t)(i % 16) * 65536));
                clock_sleep_ns(20 * NSEC_PER_MSEC);
        }
        s3_sync_get_stats(s, &st);
        assert_int_equal(st.uploads, 5); /* object 1 again, never the hot object 0 */
        s3_sync_pause(s);
        struct bitmap cur;
        assert_ok(bitmap_init(&cur, 5));
        assert_ok(s3_sync_snapshot(s, &cur));
        assert_false(bitmap_test(&cur, 0));
        assert_true(bitmap_test(&cur, 1));
        assert_false(bitmap_test(&cur, 2)); /* zeros are not in S3 */
        assert_true(bitmap_test(&cur, 3) && bitmap_test(&cur, 4));
        s3_sync_resume(s);
        uint64_t until = clock_now_ns() + 10 * NSEC_PER_SEC;
        do {
                clock_sleep_ns(50 * NSEC_PER_MSEC);
                s3_sync_get_stats(s, &st);
        } while (st.current < 4 && clock_now_ns() < until);
        assert_int_equal(st.current, 4); /* object 0, once quiet */
        s3_sync_pause(s);
        assert_ok(s3_sync_snapshot(s, &cur));
        s3_sync_free(s);

        struct fetched f = {.dev = dev};
        pthread_mutex_init(&f.lock, NULL);
        struct s3_fetch_options fo = {.client = c, .prefix = "unit/p1", .device = "disk", .size = size,
                                      .object_size = 1 << 20, .concurrency = 3, .objects = &cur,
                                      .deliver = deliver, .failed = failed, .ctx = &f};
        struct s3_fetch *fetch;
        assert_ok(s3_fetch_start(&fo, &fetch));
        s3_fetch_prioritize(fetch, 4);
        wait_until(fetch_done, fetch, 30 * NSEC_PER_SEC, "the download");
        s3_fetch_free(fetch);
        assert_int_equal(f.delivered, 4);
        assert_int_equal(f.wrong, 0);
        assert_int_equal(f.failed, 0);

        /* The server gone: every object comes back as failed, and the fetch gives up. */
        stop_server();
        f.delivered = 0;
        assert_ok(s3_fetch_start(&fo, &fetch));
        wait_until(fetch_done, fetch, 60 * NSEC_PER_SEC, "giving up");
        struct s3_fetch_stats fs;
        s3_fetch_get_stats(fetch, &fs);
        s3_fetch_free(fetch);
        assert_int_equal(f.delivered, 0);
        assert_int_equal(f.failed, 4);
        assert_true(fs.gave_up);
        bitmap_free(&cur);
        pthread_mutex_destroy(&f.lock);
        s3_client_free(c);
        block_device_close(dev);
        free(buf);
}

int main(void) {
        signal(SIGPIPE, SIG_IGN);
        int r = start_server();
        if (r != 0) {
                stop_server();
                return r;
        }
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_objects),
                cmocka_unit_test(test_sync_and_fetch),
        };
        r = cmocka_run_group_tests(tests, NULL, NULL);
        stop_server();
        test_tmpdir_remove(datadir);
        return r;
}
