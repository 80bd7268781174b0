/* Bitmaps: single bits, ranges across words, searches, and concurrent set + take. */
#include "helpers.h"
#include "drafter/bitmap.h"

#include <pthread.h>
#include <stdlib.h>

static void test_bits_and_ranges(void **state) {
        struct bitmap map;
        assert_int_equal(bitmap_init(&map, 200), 0);
        assert_int_equal(bitmap_count(&map), 0);
        assert_int_equal(bitmap_next_set(&map, 0), 200);
        assert_int_equal(bitmap_next_clear(&map, 0), 0);

        bitmap_set(&map, 0);
        bitmap_set(&map, 63);
        bitmap_set(&map, 64);
        bitmap_set(&map, 199);
        assert_true(bitmap_test(&map, 63));
        assert_false(bitmap_test(&map, 62));
        assert_int_equal(bitmap_count(&map), 4);
        assert_int_equal(bitmap_next_set(&map, 1), 63);
        assert_int_equal(bitmap_next_set(&map, 65), 199);
        assert_true(bitmap_test_and_clear(&map, 63));
        assert_false(bitmap_test_and_clear(&map, 63));
        assert_false(bitmap_test_and_set(&map, 100));
        assert_true(bitmap_test_and_set(&map, 100));

        bitmap_clear_all(&map);
        bitmap_set_range(&map, 60, 75); /* 60..134 crosses two word boundaries */
        assert_int_equal(bitmap_count(&map), 75);
        assert_int_equal(bitmap_next_set(&map, 0), 60);
        assert_int_equal(bitmap_next_clear(&map, 60), 135);
        assert_true(bitmap_range_all_set(&map, 60, 75));
        assert_false(bitmap_range_all_set(&map, 59, 2));
        assert_false(bitmap_range_all_set(&map, 134, 2));

        bitmap_set_all(&map);
        assert_int_equal(bitmap_count(&map), 200); /* no bits past the end */
        assert_int_equal(bitmap_next_clear(&map, 0), 200);
        uint64_t w = bitmap_take_word(&map, 3); /* bits 192..199 */
        assert_int_equal(w, 0xffULL);
        assert_int_equal(bitmap_count(&map), 192);
        bitmap_free(&map);
}

struct setter {
        struct bitmap *map;
        uint64_t first, count;
};

static void *set_bits(void *arg) {
        struct setter *s = arg;
        for (uint64_t i = 0; i < s->count; i++)
                bitmap_set(s->map, s->first + i * 4);
        return NULL;
}

/* Four threads set every bit exactly once while the main thread keeps taking words: the union of
 * what was taken and what is left must be every bit, each exactly once. */
static void test_concurrent_take(void **state) {
        enum { N = 1 << 16 };
        struct bitmap map;
        assert_int_equal(bitmap_init(&map, N), 0);
        unsigned char *seen = calloc(N, 1);
        assert_non_null(seen);
        pthread_t threads[4];
        struct setter setters[4];
        for (int t = 0; t < 4; t++) {
                setters[t] = (struct setter){&map, (uint64_t)t, N / 4};
                assert_int_equal(pthread_create(&threads[t], NULL, set_bits, &setters[t]), 0);
        }
        for (int round = 0; round < 200; round++)
                for (uint64_t w = 0; w < BITMAP_WORDS(N); w++) {
                        uint64_t bits = bitmap_take_word(&map, w);
                        while (bits) {
                                seen[w * 64 + (uint64_t)__builtin_ctzll(bits)]++;
                                bits &= bits - 1;
                        }
                }
        for (int t = 0; t < 4; t++)
                pthread_join(threads[t], NULL);
        for (uint64_t w = 0; w < BITMAP_WORDS(N); w++) {
                uint64_t bits = bitmap_take_word(&map, w);
                while (bits) {
                        seen[w * 64 + (uint64_t)__builtin_ctzll(bits)]++;
                        bits &= bits - 1;
                }
        }
        for (uint64_t i = 0; i < N; i++)
                assert_int_equal(seen[i], 1);
        free(seen);
        bitmap_free(&map);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_bits_and_ranges),
                cmocka_unit_test(test_concurrent_take),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
