/* Guest links, host side: the JSON lines, liveness waits, agent calls with retries that reuse
 * the call id, guest errors and timeouts — against a scripted guest on a unix socket. (The real
 * agent and liveness run in a VM in tests/interop.) */
#include "helpers.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/guestlink.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static void test_wire(void **state) {
        char *line = guestlink_encode_request(42, "BeforeSuspend");
        assert_string_equal(line, "{\"request\":{\"call\":42,\"function\":\"BeforeSuspend\",\"args\":[]}}\n");
        uint64_t call;
        char *text;
        assert_ok(guestlink_parse_request(line, &call, &text));
        assert_int_equal(call, 42);
        assert_string_equal(text, "BeforeSuspend");
        free(text);
        free(line);
        line = guestlink_encode_response(7, "boom");
        assert_string_equal(line, "{\"response\":{\"call\":7,\"value\":null,\"err\":\"boom\"}}\n");
        assert_ok(guestlink_parse_response(line, &call, &text));
        assert_int_equal(call, 7);
        assert_string_equal(text, "boom");
        free(text);
        free(line);
        const char *bad[] = {"", "{", "[]", "{\"request\":1}", "{\"request\":{\"call\":-1,\"function\":\"x\"}}",
                             "{\"request\":{\"call\":1}}", "{\"request\":{\"call\":1,\"function\":\"\"}}",
                             "{\"request\":{\"call\":\"1\",\"function\":\"x\"}}"};
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                assert_int_equal(guestlink_parse_request(bad[i], &call, &text), -EBADMSG);
                assert_non_null(strstr(error_message(), "guest link: "));
        }
        assert_int_equal(guestlink_parse_response("{\"response\":{\"call\":1,\"err\":5}}", &call, &text), -EBADMSG);
        assert_true(guestlink_is_liveness("{\"liveness\":\"ready\"}"));
        assert_false(guestlink_is_liveness("{\"liveness\":\"nope\"}"));
        assert_false(guestlink_is_liveness("garbage"));
}

/* A scripted guest: listens on `path`, then per request line answers as `mode` says. */
struct guest {
        char path[256];
        int listen_fd;
        const char *mode; /* "liveness", "silent", "second-try", "error" */
        unsigned requests;
        uint64_t ids[8];
};

static void *guest_thread(void *arg) {
        struct guest *g = arg;
        int fd = accept(g->listen_fd, NULL, NULL);
        if (fd < 0)
                return NULL;
        if (strcmp(g->mode, "liveness") == 0) {
                clock_sleep_ns(50 * NSEC_PER_MSEC);
                const char *noise = "booting\n{\"liveness\":\"ready\"}\n";
                assert_int_equal(write(fd, noise, strlen(noise)), (ssize_t)strlen(noise));
        }
        char buf[4096];
        size_t have = 0;
        for (;;) {
                ssize_t n = read(fd, buf + have, sizeof(buf) - have - 1);
                if (n <= 0)
                        break;
                have += (size_t)n;
                char *nl;
                while ((nl = memchr(buf, '\n', have))) {
                        *nl = '\0';
                        uint64_t call;
                        char *fn;
                        if (guestlink_parse_request(buf, &call, &fn) == 0) {
                                if (g->requests < 8)
                                        g->ids[g->requests] = call;
                                g->requests++;
                                char *resp = NULL;
                                if (strcmp(g->mode, "error") == 0)
                                        resp = guestlink_encode_response(call, "command exited with status 3");
                                else if (strcmp(g->mode, "second-try") == 0 && g->requests >= 2)
                                        resp = guestlink_encode_response(call, "");
                                if (resp) {
                                        assert_int_equal(write(fd, resp, strlen(resp)), (ssize_t)strlen(resp));
                                        free(resp);
                                }
                                free(fn);
                        }
                        size_t used = (size_t)(nl - buf) + 1;
                        memmove(buf, nl + 1, have - used);
                        have -= used;
                }
        }
        close(fd);
        return NULL;
}

static void start_guest(struct guest *g, const char *dir, const char *mode, pthread_t *t) {
        static unsigned n;
        snprintf(g->path, sizeof(g->path), "%s/%s-%u.sock", dir, mode, n++);
        g->mode = mode;
        g->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", g->path);
        assert_int_equal(bind(g->listen_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
        assert_int_equal(listen(g->listen_fd, 1), 0);
        assert_int_equal(pthread_create(t, NULL, guest_thread, g), 0);
}

static void test_host(void **state) {
        char *dir = test_tmpdir_new();
        pthread_t t;

        struct guest live = {0};
        start_guest(&live, dir, "liveness", &t);
        assert_ok(guestlink_wait_liveness(live.path, 5 * NSEC_PER_SEC));
        pthread_join(t, NULL);
        close(live.listen_fd);

        struct guest quiet = {0};
        start_guest(&quiet, dir, "silent", &t);
        assert_int_equal(guestlink_wait_liveness(quiet.path, 200 * NSEC_PER_MSEC), -ETIMEDOUT);
        assert_string_equal(error_message(), "liveness: the guest did not report ready within 200ms (did it boot?)");
        struct guestlink_agent *a;
        /* The first guest connection is gone with the liveness wait; a silent agent times out. */
        shutdown(quiet.listen_fd, SHUT_RDWR);
        pthread_join(t, NULL);
        close(quiet.listen_fd);

        struct guest retry = {0};
        start_guest(&retry, dir, "second-try", &t);
        assert_ok(guestlink_agent_connect(retry.path, NSEC_PER_SEC, &a));
        assert_ok(guestlink_agent_call(a, "AfterResume", 100 * NSEC_PER_MSEC, 3));
        guestlink_agent_free(a);
        pthread_join(t, NULL);
        assert_int_equal(retry.requests, 2);
        assert_int_equal(retry.ids[0], retry.ids[1]); /* a repeated call keeps its id */
        close(retry.listen_fd);

        struct guest failing = {0};
        start_guest(&failing, dir, "error", &t);
        assert_ok(guestlink_agent_connect(failing.path, NSEC_PER_SEC, &a));
        assert_int_equal(guestlink_agent_call(a, "BeforeSuspend", NSEC_PER_SEC, 3), -EIO);
        assert_string_equal(error_message(), "agent: BeforeSuspend: command exited with status 3");
        guestlink_agent_free(a);
        pthread_join(t, NULL);
        close(failing.listen_fd);

        struct guest mute = {0};
        start_guest(&mute, dir, "silent", &t);
        assert_ok(guestlink_agent_connect(mute.path, NSEC_PER_SEC, &a));
        assert_int_equal(guestlink_agent_call(a, "BeforeSuspend", 50 * NSEC_PER_MSEC, 2), -ETIMEDOUT);
        assert_string_equal(error_message(), "agent: BeforeSuspend: no answer within 50ms (2 tries)");
        guestlink_agent_free(a);
        pthread_join(t, NULL);
        assert_int_equal(mute.requests, 2);
        close(mute.listen_fd);

        /* Nobody listening at all. */
        char missing[300];
        snprintf(missing, sizeof(missing), "%s/none.sock", dir);
        assert_int_equal(guestlink_agent_connect(missing, 50 * NSEC_PER_MSEC, &a), -ENOENT);
        assert_non_null(strstr(error_message(), "none.sock: cannot connect"));
        test_tmpdir_remove(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_wire),
                cmocka_unit_test(test_host),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
