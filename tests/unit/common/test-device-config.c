/* The --devices JSON: the seeds' examples parse with the right values and defaults; every
 * malformed example gets one line naming the device and the field. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/device_config.h"
#include "drafter/error.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char full_peer_device[] =
        "[{\"name\":\"memory\",\"base\":\"out/package/memory.bin\",\"overlay\":\"out/overlay/memory.bin\","
        "\"state\":\"out/state/memory.bin\",\"blockSize\":65536,\"expiry\":1000000000,\"maxDirtyBlocks\":200,"
        "\"minCycles\":5,\"maxCycles\":20,\"cycleThrottle\":500000000,\"makeMigratable\":true,\"shared\":false,"
        "\"sharedbase\":false,\"s3sync\":true,\"s3accesskey\":\"myaccesskey\",\"s3secretkey\":\"mysecret\","
        "\"s3endpoint\":\"s3.example:9000\",\"s3secure\":true,\"s3bucket\":\"bucket\",\"s3concurrency\":1024}]";

static void test_full_peer_device(void **state) {
        struct device_list list;
        assert_ok(device_list_parse(full_peer_device, DEVICE_SCHEMA_PEER, &list));
        assert_int_equal(list.count, 1);
        const struct device_config *d = device_list_find(&list, "memory");
        assert_non_null(d);
        assert_string_equal(d->base, "out/package/memory.bin");
        assert_string_equal(d->overlay, "out/overlay/memory.bin");
        assert_string_equal(d->state, "out/state/memory.bin");
        assert_int_equal(d->block_size, 65536);
        assert_int_equal(d->expiry_ns, 1000000000);
        assert_int_equal(d->max_dirty_blocks, 200);
        assert_int_equal(d->min_cycles, 5);
        assert_int_equal(d->max_cycles, 20);
        assert_int_equal(d->cycle_throttle_ns, 500000000);
        assert_true(d->make_migratable);
        assert_false(d->shared);
        assert_true(d->s3.sync);
        assert_true(d->s3.secure);
        assert_string_equal(d->s3.endpoint, "s3.example:9000");
        assert_string_equal(d->s3.bucket, "bucket");
        assert_int_equal(d->s3.concurrency, 1024);
        assert_null(device_list_find(&list, "disk"));
        device_list_free(&list);
}

static void test_defaults_and_other_schemas(void **state) {
        struct device_list list;
        /* The seed's "start a package" example: only name and base. */
        assert_ok(device_list_parse("[{\"name\":\"state\",\"base\":\"out/package/state.bin\"},"
                                    "{\"name\":\"disk\",\"base\":\"out/package/rootfs.ext4\",\"maxDirtyBlocks\":0,"
                                    "\"minCycles\":0,\"maxCycles\":0,\"cycleThrottle\":0}]",
                                    DEVICE_SCHEMA_PEER, &list));
        assert_int_equal(list.count, 2);
        assert_int_equal(list.devices[0].block_size, 65536);
        assert_int_equal(list.devices[0].expiry_ns, 1000000000);
        assert_int_equal(list.devices[0].max_dirty_blocks, 200);
        assert_int_equal(list.devices[0].min_cycles, 5);
        assert_int_equal(list.devices[0].max_cycles, 20);
        assert_int_equal(list.devices[0].cycle_throttle_ns, 500000000);
        assert_true(list.devices[0].make_migratable);
        assert_null(list.devices[0].overlay);
        assert_int_equal(list.devices[1].max_cycles, 0); /* pre-copy disabled */
        assert_int_equal(list.devices[1].cycle_throttle_ns, 0);
        device_list_free(&list);

        assert_ok(device_list_parse("[{\"name\":\"state\",\"output\":\"out/package/state.bin\"},"
                                    "{\"name\":\"kernel\",\"input\":\"out/blueprint/vmlinux\","
                                    "\"output\":\"out/package/vmlinux\"}]",
                                    DEVICE_SCHEMA_SNAPSHOTTER, &list));
        assert_string_equal(list.devices[1].input, "out/blueprint/vmlinux");
        assert_null(list.devices[0].input);
        device_list_free(&list);

        assert_ok(device_list_parse("[]", DEVICE_SCHEMA_PACKAGER, &list));
        assert_int_equal(list.count, 0);
        device_list_free(&list);
}

static const struct {
        enum device_schema schema;
        const char *json;
        const char *message;
} bad_inputs[] = {
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\"",
         "devices: invalid JSON at line 1, column 26: '}' expected near end of file"},
        {DEVICE_SCHEMA_PEER, "{\"name\":\"disk\"}", "devices: expected a JSON array of device objects, got an object"},
        {DEVICE_SCHEMA_PEER, "[\"disk\"]", "devices: device at index 0: expected an object, got a string"},
        {DEVICE_SCHEMA_PEER, "[{\"base\":\"a\"}]", "devices: device at index 0: field \"name\": required"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":7,\"base\":\"a\"}]",
         "devices: device at index 0: field \"name\": expected a string, got an integer"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"../etc\",\"base\":\"a\"}]",
         "devices: device at index 0: field \"name\": \"../etc\" is not a valid name (1-64 of A-Z a-z 0-9 . _ -, "
         "not starting with a dot)"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\"},{\"name\":\"disk\",\"base\":\"b\"}]",
         "devices: device \"disk\" (index 1): field \"name\": duplicate of the device at index 0"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\"}]", "devices: device \"disk\": field \"base\": required"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"blockSize\":\"65536\"}]",
         "devices: device \"disk\": field \"blockSize\": expected a non-negative integer, got a string"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"blockSize\":0}]",
         "devices: device \"disk\": field \"blockSize\": must be a power of two from 512 to 67108864, got 0"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"blockSize\":1000}]",
         "devices: device \"disk\": field \"blockSize\": must be a power of two from 512 to 67108864, got 1000"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"maxDirtyBlocks\":-1}]",
         "devices: device \"disk\": field \"maxDirtyBlocks\": expected a non-negative integer, got -1"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"expiry\":1.5}]",
         "devices: device \"disk\": field \"expiry\": expected a non-negative integer of nanoseconds (e.g. "
         "500000000 for 500ms), got a number with a fraction"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"cycleThrottle\":\"500ms\"}]",
         "devices: device \"disk\": field \"cycleThrottle\": expected a non-negative integer of nanoseconds (e.g. "
         "500000000 for 500ms), got a string"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"makeMigratable\":\"yes\"}]",
         "devices: device \"disk\": field \"makeMigratable\": expected true or false, got a string"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"blocksize\":4096}]",
         "devices: device \"disk\": field \"blocksize\": unknown field (did you mean \"blockSize\"?)"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"colour\":\"red\"}]",
         "devices: device \"disk\": field \"colour\": unknown field (accepted: name, base, overlay, state, "
         "blockSize, expiry, maxDirtyBlocks, minCycles, maxCycles, cycleThrottle, makeMigratable, shared, "
         "sharedbase, s3sync, s3accesskey, s3secretkey, s3endpoint, s3secure, s3bucket, s3concurrency)"},
        {DEVICE_SCHEMA_SNAPSHOTTER, "[{\"name\":\"disk\",\"base\":\"a\",\"output\":\"b\"}]",
         "devices: device \"disk\": field \"base\": not used by drafter-snapshotter (accepted: name, input, "
         "output)"},
        {DEVICE_SCHEMA_SNAPSHOTTER, "[{\"name\":\"disk\",\"input\":\"a\"}]",
         "devices: device \"disk\": field \"output\": required (where the snapshot of this device is written)"},
        {DEVICE_SCHEMA_SNAPSHOTTER, "[{\"name\":\"disk\",\"input\":\"a\",\"output\":\"a\"}]",
         "devices: device \"disk\": field \"output\": same file as \"input\" (a); the blueprint would be "
         "overwritten"},
        {DEVICE_SCHEMA_PACKAGER, "[{\"name\":\"disk\"}]", "devices: device \"disk\": field \"path\": required"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"overlay\":\"o\"}]",
         "devices: device \"disk\": field \"state\": required together with \"overlay\""},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"overlay\":\"a\",\"state\":\"s\"}]",
         "devices: device \"disk\": field \"overlay\": same file as \"base\" (a)"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"shared\":true,\"overlay\":\"o\",\"state\":\"s\"}]",
         "devices: device \"disk\": field \"shared\": a shared device writes to \"base\" directly, so \"overlay\" "
         "and \"state\" must be empty"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"minCycles\":30,\"maxCycles\":20}]",
         "devices: device \"disk\": field \"minCycles\": 30 is greater than maxCycles (20)"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"s3sync\":true,\"s3bucket\":\"b\"}]",
         "devices: device \"disk\": field \"s3endpoint\": required when \"s3sync\" is true"},
        {DEVICE_SCHEMA_PEER,
         "[{\"name\":\"disk\",\"base\":\"a\",\"overlay\":\"o\",\"state\":\"s\"},"
         "{\"name\":\"memory\",\"base\":\"b\",\"overlay\":\"o2\",\"state\":\"o\"}]",
         "devices: device \"memory\": writes to o, which device \"disk\" also writes to"},
        {DEVICE_SCHEMA_PEER, "[{\"name\":\"disk\",\"base\":\"a\",\"base\":\"b\"}]",
         "devices: invalid JSON at line 1, column 33: duplicate object key near '\"base\"'"},
};

static void test_bad_inputs(void **state) {
        assert_true(ELEMENTSOF(bad_inputs) >= 15);
        for (size_t i = 0; i < ELEMENTSOF(bad_inputs); i++) {
                struct device_list list = {0};
                error_clear();
                int r = device_list_parse(bad_inputs[i].json, bad_inputs[i].schema, &list);
                if (r != -EINVAL || strcmp(error_message(), bad_inputs[i].message) != 0)
                        fail_msg("input %zu: %s\n  got      (%d) %s\n  expected %s", i, bad_inputs[i].json, r,
                                 error_message(), bad_inputs[i].message);
                assert_null(strchr(error_message(), '\n'));
                assert_int_equal(list.count, 0);
        }
}

/* Files the tools read: missing, a directory, unreadable (checked as an unprivileged user, since
 * root reads everything), and a good one. */
static void test_input_files(void **state) {
        char *dir = test_tmpdir_new();
        assert_non_null(dir);
        _cleanup_free_ char *good = test_path(dir, "good.bin");
        _cleanup_free_ char *secret = test_path(dir, "secret.bin");
        test_write_random_file(good, 4096, 1);
        test_write_random_file(secret, 4096, 2);
        assert_int_equal(chmod(secret, 0), 0);
        assert_int_equal(chmod(dir, 0755), 0);

        char json[1024];
        struct device_list list;

        snprintf(json, sizeof(json), "[{\"name\":\"disk\",\"base\":\"%s\"}]", good);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_PEER, &list));
        assert_ok(device_list_check_inputs(&list, DEVICE_SCHEMA_PEER));
        device_list_free(&list);

        snprintf(json, sizeof(json), "[{\"name\":\"disk\",\"base\":\"%s/missing.bin\"}]", dir);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_PEER, &list));
        assert_int_equal(device_list_check_inputs(&list, DEVICE_SCHEMA_PEER), -ENOENT);
        char want[1024];
        snprintf(want, sizeof(want), "devices: device \"disk\": field \"base\": %s/missing.bin: No such file or directory",
                 dir);
        assert_string_equal(error_message(), want);
        device_list_free(&list);

        snprintf(json, sizeof(json), "[{\"name\":\"kernel\",\"path\":\"%s\"}]", dir);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_PACKAGER, &list));
        assert_int_equal(device_list_check_inputs(&list, DEVICE_SCHEMA_PACKAGER), -EINVAL);
        snprintf(want, sizeof(want), "devices: device \"kernel\": field \"path\": %s is not a regular file or block device",
                 dir);
        assert_string_equal(error_message(), want);
        device_list_free(&list);

        snprintf(json, sizeof(json), "[{\"name\":\"disk\",\"input\":\"%s\",\"output\":\"out\"}]", secret);
        assert_ok(device_list_parse(json, DEVICE_SCHEMA_SNAPSHOTTER, &list));
        int pipefd[2];
        assert_int_equal(pipe(pipefd), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                /* Drop root so permissions apply. */
                if (geteuid() == 0 && (setgid(65534) < 0 || setuid(65534) < 0))
                        _exit(3);
                int r = device_list_check_inputs(&list, DEVICE_SCHEMA_SNAPSHOTTER);
                dprintf(pipefd[1], "%s", error_message());
                _exit(r == -EACCES ? 0 : 1);
        }
        close(pipefd[1]);
        char got[1024] = {0};
        assert_true(read(pipefd[0], got, sizeof(got) - 1) > 0);
        close(pipefd[0]);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        snprintf(want, sizeof(want), "devices: device \"disk\": field \"input\": %s: Permission denied", secret);
        assert_string_equal(got, want);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        device_list_free(&list);

        test_tmpdir_remove(dir);
}

int main(void) {
        const struct CMUnitTest tests[] = {
                cmocka_unit_test(test_full_peer_device),
                cmocka_unit_test(test_defaults_and_other_schemas),
                cmocka_unit_test(test_bad_inputs),
                cmocka_unit_test(test_input_files),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
