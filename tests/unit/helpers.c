/* helpers.c — shared test helpers (see helpers.h). */
#include "helpers.h"
#include "drafter/error.h"

#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

char *test_tmpdir_new(void) {
        const char *base = getenv("TMPDIR");
        char *dir;
        if (asprintf(&dir, "%s/drafter-test.XXXXXX", base && *base ? base : "/tmp") < 0)
                return NULL;
        if (!mkdtemp(dir)) {
                free(dir);
                return NULL;
        }
        return dir;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
        return remove(path);
}

void test_tmpdir_remove(char *dir) {
        if (!dir)
                return;
        nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
        free(dir);
}

char *test_path(const char *dir, const char *name) {
        char *p;
        if (asprintf(&p, "%s/%s", dir, name) < 0)
                return NULL;
        return p;
}

uint64_t test_rng_next(struct test_rng *rng) {
        uint64_t z = (rng->state += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
}

uint64_t test_rng_below(struct test_rng *rng, uint64_t bound) {
        return bound ? test_rng_next(rng) % bound : 0;
}

void test_rng_fill(struct test_rng *rng, void *buf, size_t len) {
        unsigned char *p = buf;
        while (len >= 8) {
                uint64_t v = test_rng_next(rng);
                memcpy(p, &v, 8);
                p += 8;
                len -= 8;
        }
        if (len) {
                uint64_t v = test_rng_next(rng);
                memcpy(p, &v, len);
        }
}

uint64_t test_seed(const char *test_name) {
        const char *e = getenv("TEST_SEED");
        uint64_t seed = e ? strtoull(e, NULL, 0) : 0x5eed2026ULL;
        fprintf(stderr, "%s: seed %" PRIu64 " (set TEST_SEED to replay)\n", test_name, seed);
        return seed;
}

void test_write_random_file(const char *path, uint64_t len, uint64_t seed) {
        struct test_rng rng = {seed};
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        assert_true(fd >= 0);
        char buf[65536];
        while (len > 0) {
                size_t n = len < sizeof(buf) ? (size_t)len : sizeof(buf);
                test_rng_fill(&rng, buf, n);
                assert_int_equal(write(fd, buf, n), (ssize_t)n);
                len -= n;
        }
        close(fd);
}
