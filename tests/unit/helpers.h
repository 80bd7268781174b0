/* helpers.h — shared test helpers: cmocka, temporary directories, a seeded PRNG. */
#pragma once

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "drafter/block_device.h"

/* A fresh directory under $TMPDIR (or /tmp), removed with everything in it by test_tmpdir_remove(). */
char *test_tmpdir_new(void);
void test_tmpdir_remove(char *dir);
/* dir + "/" + name, malloc'd. */
char *test_path(const char *dir, const char *name);

/* splitmix64: deterministic for a seed, so a failing run can be repeated. */
struct test_rng {
        uint64_t state;
};
uint64_t test_rng_next(struct test_rng *rng);
uint64_t test_rng_below(struct test_rng *rng, uint64_t bound);
void test_rng_fill(struct test_rng *rng, void *buf, size_t len);
/* The seed for this run: $TEST_SEED if set, else a fixed default; printed so failures can be replayed. */
uint64_t test_seed(const char *test_name);

/* Write `len` bytes of deterministic pseudo-random data to a new file. */
void test_write_random_file(const char *path, uint64_t len, uint64_t seed);

/* Assert that a device operation succeeded; prints error_message() otherwise. */
#define assert_ok(expr)                                                                                      \
        do {                                                                                                 \
                int _r = (expr);                                                                             \
                if (_r < 0)                                                                                  \
                        fail_msg("%s failed: %d (%s)", #expr, _r, error_message());                          \
        } while (0)
