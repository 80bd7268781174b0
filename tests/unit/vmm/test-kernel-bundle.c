/* test-kernel-bundle.c — kernel + initramfs bundles: the format as specified, built by hand and
 * by kernel_bundle_create(), plain kernels, and every kind of broken trailer. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/kernel_bundle.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

struct blob {
        unsigned char *data;
        size_t len;
};

static struct blob random_blob(size_t len, uint64_t seed) {
        struct test_rng rng = {seed};
        struct blob b = {malloc(len ? len : 1), len};
        assert_non_null(b.data);
        test_rng_fill(&rng, b.data, len);
        return b;
}

static void write_blob(const char *path, const void *data, size_t len) {
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, data, len), (ssize_t)len);
        close(fd);
}

static struct blob read_blob(const char *path) {
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        struct blob b = {malloc((size_t)st.st_size + 1), (size_t)st.st_size};
        int fd = open(path, O_RDONLY);
        assert_true(fd >= 0);
        assert_int_equal(read(fd, b.data, b.len), (ssize_t)b.len);
        close(fd);
        return b;
}

static void assert_file_equals(const char *path, const struct blob *expected) {
        struct blob got = read_blob(path);
        assert_int_equal(got.len, expected->len);
        assert_memory_equal(got.data, expected->data, got.len);
        free(got.data);
}

static size_t round_up(size_t n) {
        return (n + KERNEL_BUNDLE_ALIGN - 1) / KERNEL_BUNDLE_ALIGN * KERNEL_BUNDLE_ALIGN;
}

/* The layout exactly as specified, with the trailer fields given. */
static struct blob bundle_bytes(const struct blob *kernel, const struct blob *initrd, uint64_t k_off,
                                uint64_t k_size, uint64_t i_off, uint64_t i_size) {
        size_t k_pad = round_up(kernel->len), i_pad = initrd ? round_up(initrd->len) : 0;
        struct blob b = {calloc(1, k_pad + i_pad + KERNEL_BUNDLE_TRAILER_SIZE),
                         k_pad + i_pad + KERNEL_BUNDLE_TRAILER_SIZE};
        assert_non_null(b.data);
        memcpy(b.data, kernel->data, kernel->len);
        if (initrd)
                memcpy(b.data + k_pad, initrd->data, initrd->len);
        unsigned char *t = b.data + k_pad + i_pad;
        memcpy(t, "DRAFTKB1", 8);
        uint64_t fields[4] = {htole64(k_off), htole64(k_size), htole64(i_off), htole64(i_size)};
        memcpy(t + 8, fields, sizeof(fields));
        return b;
}

struct fixture {
        char *dir;
        char *bundle;
        char *out;
};

static int setup(void **state) {
        struct fixture *f = calloc(1, sizeof(*f));
        assert_non_null(f);
        f->dir = test_tmpdir_new();
        assert_non_null(f->dir);
        f->bundle = test_path(f->dir, "kernel.bundle");
        f->out = test_path(f->dir, "out");
        assert_int_equal(mkdir(f->out, 0755), 0);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        struct fixture *f = *state;
        free(f->bundle);
        free(f->out);
        test_tmpdir_remove(f->dir);
        free(f);
        return 0;
}

static void test_round_trip(void **state) {
        struct fixture *f = *state;
        struct blob kernel = random_blob(5000, 1), initrd = random_blob(10000, 2);
        struct blob bundle = bundle_bytes(&kernel, &initrd, 0, kernel.len, round_up(kernel.len), initrd.len);
        write_blob(f->bundle, bundle.data, bundle.len);

        _cleanup_free_ char *kernel_path = NULL, *initrd_path = NULL;
        assert_ok(kernel_bundle_extract(f->bundle, f->out, &kernel_path, &initrd_path));
        _cleanup_free_ char *want_kernel = test_path(f->out, "kernel");
        _cleanup_free_ char *want_initrd = test_path(f->out, "initrd");
        assert_string_equal(kernel_path, want_kernel);
        assert_non_null(initrd_path);
        assert_string_equal(initrd_path, want_initrd);
        assert_file_equals(kernel_path, &kernel);
        assert_file_equals(initrd_path, &initrd);

        /* kernel_bundle_create() writes exactly that layout, and extracting it gives the parts back. */
        _cleanup_free_ char *k_in = test_path(f->dir, "bzImage");
        _cleanup_free_ char *i_in = test_path(f->dir, "initrd.img");
        _cleanup_free_ char *made = test_path(f->dir, "made.bundle");
        write_blob(k_in, kernel.data, kernel.len);
        write_blob(i_in, initrd.data, initrd.len);
        assert_ok(kernel_bundle_create(k_in, i_in, made));
        assert_file_equals(made, &bundle);
        free(kernel_path), free(initrd_path);
        kernel_path = initrd_path = NULL;
        assert_ok(kernel_bundle_extract(made, f->out, &kernel_path, &initrd_path));
        assert_file_equals(kernel_path, &kernel);
        assert_file_equals(initrd_path, &initrd);

        /* Sizes that are already multiples of 4096 get no padding. */
        struct blob k2 = random_blob(8192, 3), i2 = random_blob(4096, 4);
        write_blob(k_in, k2.data, k2.len);
        write_blob(i_in, i2.data, i2.len);
        assert_ok(kernel_bundle_create(k_in, i_in, made));
        struct blob b2 = bundle_bytes(&k2, &i2, 0, k2.len, k2.len, i2.len);
        assert_file_equals(made, &b2);

        free(kernel.data), free(initrd.data), free(bundle.data), free(k2.data), free(i2.data), free(b2.data);
}

static void test_no_initrd(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *stale = test_path(f->out, "initrd");
        write_blob(stale, "old", 3);

        /* A bundle whose trailer says "no initrd". */
        struct blob kernel = random_blob(6000, 5);
        struct blob bundle = bundle_bytes(&kernel, NULL, 0, kernel.len, 0, 0);
        write_blob(f->bundle, bundle.data, bundle.len);
        char *kernel_path = NULL, *initrd_path = (char *)"unset";
        assert_ok(kernel_bundle_extract(f->bundle, f->out, &kernel_path, &initrd_path));
        assert_null(initrd_path);
        assert_file_equals(kernel_path, &kernel);
        assert_int_equal(access(stale, F_OK), -1); /* not mistaken for this kernel's initrd */
        free(kernel_path);

        /* kernel_bundle_create() without an initrd. */
        _cleanup_free_ char *k_in = test_path(f->dir, "bzImage");
        write_blob(k_in, kernel.data, kernel.len);
        assert_ok(kernel_bundle_create(k_in, NULL, f->bundle));
        assert_file_equals(f->bundle, &bundle);
        free(kernel.data), free(bundle.data);
}

static void test_plain_kernel(void **state) {
        struct fixture *f = *state;
        /* No trailer: the whole file is the kernel, whatever its size. */
        static const size_t sizes[] = {1, 39, 40, 7777, 3 << 20};
        for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
                struct blob kernel = random_blob(sizes[i], 10 + i);
                write_blob(f->bundle, kernel.data, kernel.len);
                char *kernel_path = NULL, *initrd_path = NULL;
                assert_ok(kernel_bundle_extract(f->bundle, f->out, &kernel_path, &initrd_path));
                assert_null(initrd_path);
                assert_file_equals(kernel_path, &kernel);
                free(kernel_path);
                free(kernel.data);
        }
}

/* A bundle with these trailer fields over real parts must be refused, and nothing written. */
static void expect_refused(const struct fixture *f, const char *label, uint64_t k_off, uint64_t k_size,
                           uint64_t i_off, uint64_t i_size) {
        struct blob kernel = random_blob(5000, 20), initrd = random_blob(9000, 21);
        struct blob bundle = bundle_bytes(&kernel, &initrd, k_off, k_size, i_off, i_size);
        write_blob(f->bundle, bundle.data, bundle.len);
        char *kernel_path = NULL, *initrd_path = NULL;
        int r = kernel_bundle_extract(f->bundle, f->out, &kernel_path, &initrd_path);
        print_message("%s: %d: %s\n", label, r, error_message());
        assert_int_equal(r, -EINVAL);
        assert_non_null(strstr(error_message(), f->bundle));
        assert_null(kernel_path);
        assert_null(initrd_path);
        _cleanup_free_ char *k = test_path(f->out, "kernel");
        assert_int_equal(access(k, F_OK), -1);
        free(kernel.data), free(initrd.data), free(bundle.data);
}

static void test_bad_trailers(void **state) {
        struct fixture *f = *state;
        /* payload = 8192 (kernel) + 12288 (initrd) bytes before the trailer */
        expect_refused(f, "empty kernel", 0, 0, 8192, 9000);
        expect_refused(f, "kernel offset not aligned", 100, 5000, 8192, 9000);
        expect_refused(f, "initrd offset not aligned", 0, 5000, 8200, 9000);
        expect_refused(f, "initrd beyond the file", 0, 5000, 8192, 12289);
        expect_refused(f, "initrd far beyond the file", 0, 5000, 1ULL << 40, 9000);
        expect_refused(f, "kernel beyond the file", 0, 20481, 8192, 9000);
        expect_refused(f, "size overflows", 0, 5000, 8192, UINT64_MAX - 4096);
        expect_refused(f, "offset overflows", UINT64_MAX - 4095, 5000, 8192, 9000);
        expect_refused(f, "overlap", 0, 5000, 4096, 9000);
        expect_refused(f, "same place", 0, 5000, 0, 5000);
        expect_refused(f, "initrd inside kernel", 0, 20480, 8192, 4096);
        expect_refused(f, "empty initrd somewhere", 0, 5000, 8192, 0);
}

static void test_truncated(void **state) {
        struct fixture *f = *state;
        struct blob kernel = random_blob(5000, 30), initrd = random_blob(9000, 31);
        struct blob bundle = bundle_bytes(&kernel, &initrd, 0, kernel.len, round_up(kernel.len), initrd.len);
        /* Lose a block from the middle of the initrd, keep the trailer: the initrd no longer fits. */
        size_t cut = round_up(kernel.len) + 4096;
        memmove(bundle.data + cut, bundle.data + cut + 4096, bundle.len - cut - 4096);
        write_blob(f->bundle, bundle.data, bundle.len - 4096);
        char *kernel_path = NULL, *initrd_path = NULL;
        assert_int_equal(kernel_bundle_extract(f->bundle, f->out, &kernel_path, &initrd_path), -EINVAL);
        print_message("truncated: %s\n", error_message());
        assert_non_null(strstr(error_message(), "initrd"));

        /* Empty and missing files. */
        write_blob(f->bundle, "", 0);
        assert_int_equal(kernel_bundle_extract(f->bundle, f->out, &kernel_path, &initrd_path), -EINVAL);
        print_message("empty: %s\n", error_message());
        _cleanup_free_ char *missing = test_path(f->dir, "missing");
        assert_int_equal(kernel_bundle_extract(missing, f->out, &kernel_path, &initrd_path), -ENOENT);
        print_message("missing: %s\n", error_message());
        assert_int_equal(kernel_bundle_create(missing, NULL, f->bundle), -ENOENT);
        /* An unwritable output directory. */
        free(bundle.data);
        bundle = bundle_bytes(&kernel, &initrd, 0, kernel.len, round_up(kernel.len), initrd.len);
        write_blob(f->bundle, bundle.data, bundle.len);
        _cleanup_free_ char *no_dir = test_path(f->dir, "no-such-dir");
        assert_int_equal(kernel_bundle_extract(f->bundle, no_dir, &kernel_path, &initrd_path), -ENOENT);
        print_message("no output dir: %s\n", error_message());
        free(kernel.data), free(initrd.data), free(bundle.data);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
                cmocka_unit_test_setup_teardown(test_no_initrd, setup, teardown),
                cmocka_unit_test_setup_teardown(test_plain_kernel, setup, teardown),
                cmocka_unit_test_setup_teardown(test_bad_trailers, setup, teardown),
                cmocka_unit_test_setup_teardown(test_truncated, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
