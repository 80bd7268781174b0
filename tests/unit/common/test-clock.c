/* Durations: formatting and parsing agree with Go's time package. */
#include "helpers.h"
#include "drafter/clock.h"

#include <errno.h>
#include <string.h>

static void test_format(void **state) {
        static const struct {
                int64_t ns;
                const char *text;
        } cases[] = {
                {0, "0s"},
                {1, "1ns"},
                {1100, "1.1µs"},
                {2200000, "2.2ms"},
                {500000000, "500ms"},
                {1000000000, "1s"},
                {3300000000, "3.3s"},
                {60000000000, "1m0s"},
                {245000000000, "4m5s"},
                {18367001000000, "5h6m7.001s"},
                {-1500000000, "-1.5s"},
                {3600000000000, "1h0m0s"},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                char buf[64];
                duration_format(cases[i].ns, buf, sizeof(buf));
                assert_string_equal(buf, cases[i].text);
                int64_t back;
                assert_int_equal(duration_parse(cases[i].text, &back), 0);
                assert_int_equal(back, cases[i].ns);
        }
}

static void test_parse(void **state) {
        int64_t ns;
        assert_int_equal(duration_parse("0", &ns), 0);
        assert_int_equal(ns, 0);
        assert_int_equal(duration_parse("1.5h", &ns), 0);
        assert_int_equal(ns, 5400000000000LL);
        assert_int_equal(duration_parse("2h45m", &ns), 0);
        assert_int_equal(ns, 9900000000000LL);
        assert_int_equal(duration_parse("300us", &ns), 0);
        assert_int_equal(ns, 300000);
        assert_int_equal(duration_parse(".5s", &ns), 0);
        assert_int_equal(ns, 500000000);
        assert_int_equal(duration_parse("", &ns), -EINVAL);
        assert_int_equal(duration_parse("1", &ns), -EINVAL);
        assert_int_equal(duration_parse("abc", &ns), -EINVAL);
        assert_int_equal(duration_parse("1x", &ns), -EINVAL);
        assert_int_equal(duration_parse("s", &ns), -EINVAL);
        assert_int_equal(duration_parse("99999999999h", &ns), -ERANGE);
}

static void test_monotonic(void **state) {
        uint64_t a = clock_now_ns();
        clock_sleep_ns(2 * NSEC_PER_MSEC);
        uint64_t b = clock_now_ns();
        assert_true(b - a >= 2 * NSEC_PER_MSEC);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_format),
                cmocka_unit_test(test_parse),
                cmocka_unit_test(test_monotonic),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
