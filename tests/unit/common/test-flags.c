/* Flags: Go-compatible parsing and --help output (compared with the seeds' --help texts). */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/flags.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct capture {
        char *text;
        size_t size;
        FILE *f;
};

static void capture_open(struct capture *c) {
        c->text = NULL;
        c->f = open_memstream(&c->text, &c->size);
        assert_non_null(c->f);
}

static const char *capture_close(struct capture *c) {
        fclose(c->f);
        return c->text;
}

static void test_help_matches_go(void **state) {
        int64_t port = 25, timeout = 60000000000;
        struct flag flags[] = {
                {"vsock-timeout", FLAG_DURATION, &timeout, "VSocket dial timeout"},
                {"vsock-port", FLAG_INT, &port, "VSocket port"},
        };
        char *argv[] = {"drafter-liveness", "--help", NULL};
        struct capture c;
        capture_open(&c);
        assert_int_equal(flags_parse("drafter-liveness", flags, 2, 2, argv, c.f, NULL), FLAGS_HELP);
        assert_string_equal(capture_close(&c), "Usage of drafter-liveness:\n"
                                               "  -vsock-port int\n"
                                               "    \tVSocket port (default 25)\n"
                                               "  -vsock-timeout duration\n"
                                               "    \tVSocket dial timeout (default 1m0s)\n");
        free(c.text);
}

static void test_help_string_and_bool_defaults(void **state) {
        const char *devices = "[{\"name\":\"state\",\"path\":\"out/package/state.bin\"}]";
        const char *path = "out/app.tar.zst";
        bool extract = false, output = true;
        struct flag flags[] = {
                {"package-path", FLAG_STRING, &path, "Path to package file"},
                {"extract", FLAG_BOOL, &extract, "Whether to extract or archive"},
                {"devices", FLAG_STRING, &devices, "Devices configuration"},
                {"enable-output", FLAG_BOOL, &output, "Whether to enable VM stdout and stderr"},
        };
        struct capture c;
        capture_open(&c);
        flags_print_usage("drafter-packager", flags, 4, c.f);
        assert_string_equal(capture_close(&c),
                            "Usage of drafter-packager:\n"
                            "  -devices string\n"
                            "    \tDevices configuration (default "
                            "\"[{\\\"name\\\":\\\"state\\\",\\\"path\\\":\\\"out/package/state.bin\\\"}]\")\n"
                            "  -enable-output\n"
                            "    \tWhether to enable VM stdout and stderr (default true)\n"
                            "  -extract\n"
                            "    \tWhether to extract or archive\n"
                            "  -package-path string\n"
                            "    \tPath to package file (default \"out/app.tar.zst\")\n");
        free(c.text);
}

static void test_parse_forms(void **state) {
        const char *raddr = "localhost:1337", *laddr = "localhost:1337";
        int64_t concurrency = 1024, throttle = 0;
        uint64_t port = 26;
        bool postcopy = false, input = false, output = true;
        struct flag flags[] = {
                {"raddr", FLAG_STRING, &raddr, "Remote address"},
                {"laddr", FLAG_STRING, &laddr, "Local address"},
                {"concurrency", FLAG_INT, &concurrency, "Workers"},
                {"throttle", FLAG_DURATION, &throttle, "Throttle"},
                {"port", FLAG_UINT, &port, "Port"},
                {"disable-postcopy-migration", FLAG_BOOL, &postcopy, "Disable post-copy"},
                {"enable-input", FLAG_BOOL, &input, "Input"},
                {"enable-output", FLAG_BOOL, &output, "Output"},
        };
        char *argv[] = {"drafter-peer", "--raddr", "", "-laddr=:1337", "--concurrency=0x10", "-throttle", "1m30s",
                        "--port", "1_000", "--disable-postcopy-migration", "-enable-output=false", "--enable-input",
                        "--", "rest", NULL};
        int next;
        struct capture c;
        capture_open(&c);
        assert_int_equal(flags_parse("drafter-peer", flags, ELEMENTSOF(flags), 14, argv, c.f, &next), FLAGS_OK);
        assert_string_equal(capture_close(&c), "");
        free(c.text);
        assert_string_equal(raddr, "");
        assert_string_equal(laddr, ":1337");
        assert_int_equal(concurrency, 16);
        assert_int_equal(throttle, 90000000000LL);
        assert_int_equal(port, 1000);
        assert_true(postcopy);
        assert_true(input);
        assert_false(output);
        assert_int_equal(next, 13);
        assert_string_equal(argv[next], "rest");
}

static void expect_error(const char *arg, const char *arg2, const char *first_line) {
        int64_t n = 1;
        bool b = false;
        struct flag flags[] = {
                {"count", FLAG_INT, &n, "Count"},
                {"verbose", FLAG_BOOL, &b, "Verbose"},
        };
        char *argv[] = {"tool", (char *)arg, (char *)arg2, NULL};
        struct capture c;
        capture_open(&c);
        assert_int_equal(flags_parse("tool", flags, 2, arg2 ? 3 : 2, argv, c.f, NULL), -EINVAL);
        const char *text = capture_close(&c);
        assert_true(strncmp(text, first_line, strlen(first_line)) == 0);
        assert_non_null(strstr(text, "Usage of tool:\n"));
        free(c.text);
}

static void test_parse_errors(void **state) {
        expect_error("--nope", NULL, "flag provided but not defined: -nope\n");
        expect_error("-count", NULL, "flag needs an argument: -count\n");
        expect_error("-count", "ten", "invalid value \"ten\" for flag -count: parse error\n");
        expect_error("-count=99999999999999999999", NULL,
                     "invalid value \"99999999999999999999\" for flag -count: value out of range\n");
        expect_error("-verbose=maybe", NULL, "invalid boolean value \"maybe\" for flag -verbose: parse error\n");
        expect_error("---count", NULL, "bad flag syntax: ---count\n");
}

static void test_stops_at_positional(void **state) {
        int64_t n = 1;
        struct flag flags[] = {{"count", FLAG_INT, &n, "Count"}};
        char *argv[] = {"tool", "file", "-count", "3", NULL};
        int next;
        assert_int_equal(flags_parse("tool", flags, 1, 4, argv, stderr, &next), FLAGS_OK);
        assert_int_equal(next, 1);
        assert_int_equal(n, 1);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_help_matches_go),
                cmocka_unit_test(test_help_string_and_bool_defaults),
                cmocka_unit_test(test_parse_forms),
                cmocka_unit_test(test_parse_errors),
                cmocka_unit_test(test_stops_at_positional),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
