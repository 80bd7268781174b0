/* Copy-on-write: isolation of instances on one base, reopening, refusing mismatched or corrupt
 * state files, and the shared / sharedbase / private-overlay device modes. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/cow_device.h"
#include "drafter/device_config.h"
#include "drafter/error.h"
#include "drafter/storage.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define BS 4096
#define BLOCKS 64

struct paths {
        char *dir, *base, *o1, *s1, *o2, *s2;
};

static void paths_new(struct paths *p) {
        p->dir = test_tmpdir_new();
        assert_non_null(p->dir);
        p->base = test_path(p->dir, "package/disk.bin");
        p->o1 = test_path(p->dir, "instance-0/overlay/disk.bin");
        p->s1 = test_path(p->dir, "instance-0/state/disk.bin");
        p->o2 = test_path(p->dir, "instance-1/overlay/disk.bin");
        p->s2 = test_path(p->dir, "instance-1/state/disk.bin");
        char *pkg = test_path(p->dir, "package");
        assert_int_equal(mkdir(pkg, 0755), 0);
        free(pkg);
        test_write_random_file(p->base, BLOCKS * BS, 42);
}

static void paths_free(struct paths *p) {
        free(p->base);
        free(p->o1);
        free(p->s1);
        free(p->o2);
        free(p->s2);
        test_tmpdir_remove(p->dir);
}

static void read_file(const char *path, unsigned char *buf, size_t len) {
        int fd = open(path, O_RDONLY);
        assert_true(fd >= 0);
        assert_int_equal(read(fd, buf, len), (ssize_t)len);
        close(fd);
}

static void test_isolation(void **state) {
        struct paths p;
        paths_new(&p);
        static unsigned char base_before[BLOCKS * BS], base_after[BLOCKS * BS], got[BS];
        read_file(p.base, base_before, sizeof(base_before));

        struct block_device *a, *b;
        assert_ok(cow_device_open(&(struct cow_config){"disk", p.base, p.o1, p.s1, BS}, &a));
        assert_ok(cow_device_open(&(struct cow_config){"disk", p.base, p.o2, p.s2, BS}, &b));
        unsigned char fill_a[BS], fill_b[BS];
        memset(fill_a, 0xaa, BS);
        memset(fill_b, 0xbb, BS);
        assert_ok(block_device_write_at(a, fill_a, BS, 3 * BS));
        assert_ok(block_device_write_at(b, fill_b, 100, 3 * BS + 50)); /* partial: copied up from base */

        assert_ok(block_device_read_at(a, got, BS, 3 * BS));
        assert_memory_equal(got, fill_a, BS);
        assert_ok(block_device_read_at(b, got, BS, 3 * BS));
        assert_memory_equal(got, base_before + 3 * BS, 50);
        assert_memory_equal(got + 50, fill_b, 100);
        assert_memory_equal(got + 150, base_before + 3 * BS + 150, BS - 150);
        assert_ok(block_device_read_at(a, got, BS, 4 * BS)); /* untouched: the base */
        assert_memory_equal(got, base_before + 4 * BS, BS);
        assert_int_equal(cow_device_present_count(a), 1);
        assert_true(bitmap_test(cow_device_present(a), 3));
        assert_false(bitmap_test(cow_device_present(a), 4));
        block_device_close(a);
        block_device_close(b);

        /* Two instances on one shared base device. */
        struct block_device *base;
        assert_ok(file_device_open("disk", p.base, FILE_DEVICE_READ_ONLY, 0, BS, &base));
        assert_ok(cow_device_open_on(base, p.o1, p.s1, &a));
        assert_ok(cow_device_open_on(base, p.o2, p.s2, &b));
        assert_ok(block_device_write_at(a, fill_b, BS, 10 * BS));
        assert_ok(block_device_read_at(b, got, BS, 10 * BS));
        assert_memory_equal(got, base_before + 10 * BS, BS);
        block_device_close(a);
        block_device_close(b);
        block_device_close(base);

        read_file(p.base, base_after, sizeof(base_after));
        assert_memory_equal(base_before, base_after, sizeof(base_before)); /* the package never changes */
        paths_free(&p);
}

static void test_reopen_continues(void **state) {
        struct paths p;
        paths_new(&p);
        struct block_device *dev;
        unsigned char data[3 * BS], got[3 * BS];
        struct test_rng rng = {7};
        test_rng_fill(&rng, data, sizeof(data));

        assert_ok(cow_device_open(&(struct cow_config){"disk", p.base, p.o1, p.s1, BS}, &dev));
        assert_ok(block_device_write_at(dev, data, sizeof(data), 20 * BS + 1));
        assert_ok(block_device_flush(dev));
        block_device_close(dev);

        assert_ok(cow_device_open(&(struct cow_config){"disk", p.base, p.o1, p.s1, BS}, &dev));
        assert_int_equal(cow_device_present_count(dev), 4); /* blocks 20..23 */
        assert_ok(block_device_read_at(dev, got, sizeof(got), 20 * BS + 1));
        assert_memory_equal(got, data, sizeof(data));
        block_device_close(dev);
        paths_free(&p);
}

static void expect_open_error(struct paths *p, uint32_t bs, const char *want_suffix) {
        struct block_device *dev;
        error_clear();
        assert_int_equal(cow_device_open(&(struct cow_config){"disk", p->base, p->o1, p->s1, bs}, &dev), -EINVAL);
        char want[1024];
        snprintf(want, sizeof(want), "disk: state file %s %s", p->s1, want_suffix);
        assert_string_equal(error_message(), want);
}

static void test_bad_state_files(void **state) {
        struct paths p;
        paths_new(&p);
        struct block_device *dev;
        assert_ok(cow_device_open(&(struct cow_config){"disk", p.base, p.o1, p.s1, BS}, &dev));
        assert_ok(block_device_write_at(dev, "x", 1, 0));
        block_device_close(dev);

        expect_open_error(&p, 8192, "was made with block size 4096, not 8192");

        /* A base of another size. */
        test_write_random_file(p.base, BLOCKS * BS + BS, 42);
        expect_open_error(&p, BS, "is for a device of 262144 bytes, base has 266240");
        test_write_random_file(p.base, BLOCKS * BS, 42);

        /* A flipped bit in the header. */
        int fd = open(p.s1, O_RDWR);
        assert_true(fd >= 0);
        unsigned char byte;
        assert_int_equal(pread(fd, &byte, 1, 14), 1);
        byte ^= 1;
        assert_int_equal(pwrite(fd, &byte, 1, 14), 1);
        expect_open_error(&p, BS, "has a corrupt header (checksum mismatch)");
        byte ^= 1;
        assert_int_equal(pwrite(fd, &byte, 1, 14), 1);

        /* Truncated bitmap. */
        assert_int_equal(ftruncate(fd, COW_STATE_HEADER_SIZE + 4), 0);
        expect_open_error(&p, BS, "is truncated (4100 bytes, expected 4104)");
        close(fd);

        /* Not a state file at all. */
        test_write_random_file(p.s1, 8192, 9);
        expect_open_error(&p, BS, "is not a drafter copy-on-write state file");
        paths_free(&p);
}

static void test_leftover_overlay(void **state) {
        struct paths p;
        paths_new(&p);
        /* An overlay without a state file (e.g. a crash before the first state write): its contents
         * are not trusted, and a wrong size is reset instead of refused. */
        char *dir = test_path(p.dir, "instance-0");
        char *odir = test_path(p.dir, "instance-0/overlay");
        assert_int_equal(mkdir(dir, 0755), 0);
        assert_int_equal(mkdir(odir, 0755), 0);
        test_write_random_file(p.o1, 12345, 5);
        struct block_device *dev;
        assert_ok(cow_device_open(&(struct cow_config){"disk", p.base, p.o1, p.s1, BS}, &dev));
        assert_int_equal(cow_device_present_count(dev), 0);
        static unsigned char base[BLOCKS * BS], got[BLOCKS * BS];
        read_file(p.base, base, sizeof(base));
        assert_ok(block_device_read_at(dev, got, sizeof(got), 0));
        assert_memory_equal(got, base, sizeof(base));
        block_device_close(dev);
        free(dir);
        free(odir);
        paths_free(&p);
}

static size_t count_entries(const char *dir) {
        DIR *d = opendir(dir);
        assert_non_null(d);
        size_t n = 0;
        struct dirent *e;
        while ((e = readdir(d)))
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                        n++;
        closedir(d);
        return n;
}

static void test_device_modes(void **state) {
        struct paths p;
        paths_new(&p);
        static unsigned char base_before[BLOCKS * BS], after[BLOCKS * BS];
        read_file(p.base, base_before, sizeof(base_before));
        char json[2048];
        struct device_list list;
        struct block_device *dev;
        unsigned char fill[BS];
        memset(fill, 0x5a, BS);

        /* A private overlay: the package is untouched and no file is left in $TMPDIR. */
        char *tmp = test_path(p.dir, "tmp");
        assert_int_equal(mkdir(tmp, 0755), 0);
        setenv("TMPDIR", tmp, 1);
        assert_ok(cow_device_open_private("disk", p.base, 4096, &dev));
        assert_int_equal(count_entries(tmp), 0);
        assert_ok(block_device_write_at(dev, fill, BS, 0));
        assert_ok(block_device_flush(dev));
        assert_ok(block_device_read_at(dev, after, BS, 0));
        assert_memory_equal(after, fill, BS);
        block_device_close(dev);
        unsetenv("TMPDIR");
        read_file(p.base, after, sizeof(after));
        assert_memory_equal(after, base_before, sizeof(after));

        /* Base only: a single instance writing back into the package. */
        snprintf(json, sizeof(json), "[{\"name\":\"disk\",\"base\":\"%s\",\"blockSize\":4096}]", p.base);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_PEER, &list));
        assert_true(storage_device_sends_all(&list.devices[0]));
        assert_ok(storage_open_device(&list.devices[0], &dev));
        assert_ok(block_device_write_at(dev, fill, BS, 3 * BS));
        assert_ok(block_device_flush(dev));
        block_device_close(dev);
        read_file(p.base, after, sizeof(after));
        assert_memory_equal(after + 3 * BS, fill, BS);
        assert_memory_equal(after, base_before, 3 * BS);
        memcpy(base_before + 3 * BS, fill, BS); /* the package has changed, as it should */
        device_list_free(&list);

        /* Overlay + state, sharedbase: only overlay blocks need to travel. */
        snprintf(json, sizeof(json),
                 "[{\"name\":\"disk\",\"base\":\"%s\",\"overlay\":\"%s\",\"state\":\"%s\",\"blockSize\":4096,"
                 "\"sharedbase\":true}]",
                 p.base, p.o1, p.s1);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_PEER, &list));
        assert_false(storage_device_sends_all(&list.devices[0]));
        assert_ok(storage_open_device(&list.devices[0], &dev));
        assert_ok(block_device_write_at(dev, fill, BS, BS));
        assert_int_equal(cow_device_present_count(dev), 1);
        block_device_close(dev);
        device_list_free(&list);

        /* shared: writes go into the base file itself. */
        snprintf(json, sizeof(json), "[{\"name\":\"disk\",\"base\":\"%s\",\"shared\":true,\"blockSize\":4096}]",
                 p.base);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_PEER, &list));
        assert_ok(storage_open_device(&list.devices[0], &dev));
        assert_ok(block_device_write_at(dev, fill, BS, 2 * BS));
        block_device_close(dev);
        read_file(p.base, after, sizeof(after));
        assert_memory_equal(after + 2 * BS, fill, BS);
        assert_memory_equal(after, base_before, 2 * BS);
        device_list_free(&list);
        free(tmp);
        paths_free(&p);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_isolation),
                cmocka_unit_test(test_reopen_continues),
                cmocka_unit_test(test_bad_state_files),
                cmocka_unit_test(test_leftover_overlay),
                cmocka_unit_test(test_device_modes),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
