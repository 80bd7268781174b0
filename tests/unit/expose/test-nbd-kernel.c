/* Kernel NBD: an export of our server as /dev/nbdN, written and read through the block device.
 * Needs the nbd kernel module; skips (77) where the kernel has none (as on the development
 * machines, which have no /dev/nbd*). */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/nbd_kernel.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void test_block_device_round_trip(void **state) {
        struct block_device *mem;
        assert_ok(memory_device_open("disk", 16 << 20, 65536, &mem));
        struct nbd_export e = {"disk", NULL, mem, false};
        struct nbd_server *srv;
        assert_ok(nbd_server_new(&(struct nbd_server_config){&e, 1, 2, 0}, &srv));
        struct nbd_kernel *nbd;
        int index;
        assert_ok(nbd_kernel_connect(srv, 0, 2, &nbd, &index));
        char path[64];
        snprintf(path, sizeof(path), "/dev/nbd%d", index);
        int fd = open(path, O_RDWR | O_DIRECT);
        assert_true(fd >= 0);
        void *buf = NULL, *got = NULL;
        assert_int_equal(posix_memalign(&buf, 4096, 1 << 20), 0);
        assert_int_equal(posix_memalign(&got, 4096, 1 << 20), 0);
        struct test_rng rng = {test_seed("test-nbd-kernel")};
        test_rng_fill(&rng, buf, 1 << 20);
        assert_int_equal(pwrite(fd, buf, 1 << 20, 3 << 20), 1 << 20);
        assert_int_equal(fsync(fd), 0);
        assert_ok(block_device_read_at(mem, got, 1 << 20, 3 << 20));
        assert_memory_equal(got, buf, 1 << 20);
        assert_int_equal(pread(fd, got, 1 << 20, 3 << 20), 1 << 20);
        assert_memory_equal(got, buf, 1 << 20);
        close(fd);
        nbd_kernel_disconnect(nbd);
        nbd_server_free(srv);
        block_device_close(mem);
        free(buf);
        free(got);
}

int main(void) {
        if (!nbd_kernel_available()) {
                fprintf(stderr, "SKIP: the kernel has no NBD devices (no /dev/nbd0, nbd module not loadable)\n");
                return 77;
        }
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_block_device_round_trip),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
