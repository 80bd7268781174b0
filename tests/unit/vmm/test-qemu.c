/* test-qemu.c — the QEMU backend against a real qemu-system-x86_64 (TCG here, KVM where it can).
 *
 * No guest kernel: QEMU starts without -kernel and SeaBIOS idles with nothing to boot, which is
 * enough to drive run states, snapshots (device state of a real machine) and restores. Every
 * test ends with no child process left. Skips (77) only when qemu-system-x86_64 is missing. */
#include "helpers.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/fs.h"
#include "drafter/vmm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MEMORY_BYTES (128ULL << 20)
#define DISK_BYTES   (1ULL << 20)
#define PORT_NAME    "drafter.agent"

struct fixture {
        char *dir;
        char *memory;
        char *disk;
        char *run_a, *run_b; /* a runtime directory per VM */
};

static int setup(void **state) {
        struct fixture *f = calloc(1, sizeof(*f));
        assert_non_null(f);
        f->dir = test_tmpdir_new();
        assert_non_null(f->dir);
        f->memory = test_path(f->dir, "memory.bin");
        f->disk = test_path(f->dir, "disk.img");
        f->run_a = test_path(f->dir, "a");
        f->run_b = test_path(f->dir, "b");
        assert_int_equal(mkdir(f->run_a, 0755), 0);
        assert_int_equal(mkdir(f->run_b, 0755), 0);
        test_write_random_file(f->disk, DISK_BYTES, 1);
        *state = f;
        return 0;
}

static int teardown(void **state) {
        struct fixture *f = *state;
        /* Whatever a test did, no QEMU may be left behind. */
        int status;
        assert_int_equal(waitpid(-1, &status, WNOHANG), -1);
        assert_int_equal(errno, ECHILD);
        free(f->memory);
        free(f->disk);
        free(f->run_a);
        free(f->run_b);
        test_tmpdir_remove(f->dir);
        free(f);
        return 0;
}

static struct vmm_config config(const struct fixture *f, const char *runtime_dir) {
        struct vmm_config cfg = {
                .runtime_dir = runtime_dir,
                .memory_path = f->memory,
                .memory_bytes = MEMORY_BYTES,
                .cpus = 1,
                .drives = {{.name = "disk", .path = f->disk}},
                .drive_count = 1,
                .ports = {PORT_NAME},
                .port_count = 1,
        };
        return cfg;
}

static void assert_status(struct vmm *vm, const char *expected) {
        const char *status;
        assert_ok(vmm_status(vm, &status));
        assert_string_equal(status, expected);
}

static bool exists(const char *path) {
        struct stat st;
        return lstat(path, &st) == 0;
}

static void assert_no_sockets(const char *runtime_dir) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/qmp.sock", runtime_dir);
        assert_false(exists(path));
        snprintf(path, sizeof(path), "%s/%s.sock", runtime_dir, PORT_NAME);
        assert_false(exists(path));
}

static void assert_process_gone(pid_t pid) {
        int status;
        assert_int_equal(kill(pid, 0), -1);
        assert_int_equal(errno, ESRCH);
        assert_int_equal(waitpid(pid, &status, WNOHANG), -1);
        assert_int_equal(errno, ECHILD);
}

static uint64_t file_size(const char *path) {
        struct stat st;
        assert_int_equal(stat(path, &st), 0);
        return (uint64_t)st.st_size;
}

/* Boot a VM, pause it and write its state to state_path; the VM is stopped afterwards. */
static void make_snapshot(const struct fixture *f, const char *state_path) {
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;
        assert_ok(vmm_start(&cfg, false, &vm));
        assert_ok(vmm_pause(vm));
        assert_ok(vmm_snapshot(vm, state_path));
        assert_ok(vmm_stop(vm));
        vmm_free(vm);
}

/* How many threads of process pid are not SCHED_IDLE (-1: none found). */
static int threads_not_idle(pid_t pid) {
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
        DIR *d = opendir(path);
        if (!d)
                return -1;
        int threads = 0, not_idle = 0;
        for (struct dirent *e; (e = readdir(d));) {
                if (e->d_name[0] == '.')
                        continue;
                threads++;
                int policy = sched_getscheduler((pid_t)atoi(e->d_name));
                if (policy >= 0 && policy != SCHED_IDLE)
                        not_idle++;
        }
        closedir(d);
        return threads ? not_idle : -1;
}

static void test_run_states(void **state) {
        struct fixture *f = *state;
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;
        uint64_t t0 = clock_now_ns();
        assert_ok(vmm_start(&cfg, false, &vm));
        print_message("start to QMP ready: %.1f ms (%s)\n", (clock_now_ns() - t0) / 1e6, vmm_accelerator(vm));
        assert_true(strcmp(vmm_accelerator(vm), "tcg") == 0 || strcmp(vmm_accelerator(vm), "kvm") == 0);
        assert_true(vmm_running(vm));
        pid_t pid = vmm_pid(vm);
        assert_true(pid > 0);
        /* Its own process group: a ^C at our terminal does not reach it directly. */
        assert_int_equal(getpgid(pid), pid);
        assert_int_equal(file_size(f->memory), MEMORY_BYTES); /* created at the right size */

        const char *port = vmm_port_path(vm, PORT_NAME);
        assert_non_null(port);
        struct stat st;
        assert_int_equal(stat(port, &st), 0);
        assert_true(S_ISSOCK(st.st_mode));
        assert_null(vmm_port_path(vm, "no-such-port"));

        assert_status(vm, "running");
        assert_ok(vmm_pause(vm));
        assert_status(vm, "paused");
        assert_ok(vmm_resume(vm));
        assert_status(vm, "running");

        /* A VM that is done yields its CPUs: every thread idle-class, and it still answers. */
        assert_ok(vmm_yield_cpu(vm));
        assert_int_equal(threads_not_idle(pid), 0);
        assert_status(vm, "running");

        t0 = clock_now_ns();
        assert_ok(vmm_stop(vm));
        print_message("stop (quit, reap): %.1f ms\n", (clock_now_ns() - t0) / 1e6);
        assert_false(vmm_running(vm));
        assert_process_gone(pid);
        assert_no_sockets(f->run_a);
        /* Idempotent, and the VM answers no more. */
        assert_ok(vmm_stop(vm));
        const char *status;
        assert_int_equal(vmm_status(vm, &status), -ESRCH);
        vmm_free(vm);
}

static void test_snapshot_restore(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *state_path = test_path(f->dir, "state.bin");
        _cleanup_free_ char *state2_path = test_path(f->dir, "state2.bin");
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *a = NULL;
        assert_ok(vmm_start(&cfg, false, &a));
        assert_int_equal(vmm_snapshot(a, state_path), -EBUSY); /* running */
        print_message("snapshot of a running VM: %s\n", error_message());
        assert_false(exists(state_path));

        assert_ok(vmm_pause(a));
        uint64_t t0 = clock_now_ns();
        assert_ok(vmm_snapshot(a, state_path));
        double save_ms = (clock_now_ns() - t0) / 1e6;
        uint64_t size = file_size(state_path);
        print_message("snapshot: state %llu bytes, %.1f ms\n", (unsigned long long)size, save_ms);
        assert_true(size > 0);
        assert_true(size < (2u << 20));
        assert_status(a, "postmigrate");
        /* The source can go on after a snapshot, and be snapshotted again. */
        assert_ok(vmm_resume(a));
        assert_status(a, "running");
        assert_ok(vmm_pause(a));
        assert_ok(vmm_snapshot(a, state2_path));
        /* Not twice without a resume: QEMU refuses, we say why. */
        assert_int_equal(vmm_snapshot(a, state_path), -EALREADY);
        print_message("second snapshot without a resume: %s\n", error_message());
        assert_ok(vmm_resume(a));
        assert_status(a, "running");
        assert_ok(vmm_pause(a));
        assert_ok(vmm_snapshot(a, state_path));
        vmm_free(a);

        /* A second QEMU on the same memory file, from that state. */
        struct vmm_config cfg_b = config(f, f->run_b);
        struct vmm *b = NULL;
        t0 = clock_now_ns();
        assert_ok(vmm_start(&cfg_b, true, &b));
        double start_ms = (clock_now_ns() - t0) / 1e6;
        assert_status(b, "inmigrate");
        t0 = clock_now_ns();
        assert_ok(vmm_restore(b, state_path));
        print_message("restore: QEMU start %.1f ms, load %.1f ms\n", start_ms, (clock_now_ns() - t0) / 1e6);
        assert_status(b, "paused");
        assert_ok(vmm_resume(b));
        assert_status(b, "running");
        /* A restored VM snapshots like any other. */
        assert_ok(vmm_pause(b));
        assert_ok(vmm_snapshot(b, state2_path));
        assert_true(file_size(state2_path) > 0);
        pid_t pid = vmm_pid(b);
        vmm_free(b);
        assert_process_gone(pid);
        assert_no_sockets(f->run_b);

        /* No temporary file left beside the state files. */
        DIR *d = opendir(f->dir);
        assert_non_null(d);
        for (struct dirent *e; (e = readdir(d));)
                assert_null(strstr(e->d_name, ".tmp"));
        closedir(d);
}

struct stopped_probe {
        struct vmm *vm;
        int calls;
        char status[32]; /* QEMU's run state when we were told it stopped */
};

static void on_stopped(void *ctx) {
        struct stopped_probe *p = ctx;
        const char *status = NULL;
        p->calls++;
        assert_ok(vmm_status(p->vm, &status));
        snprintf(p->status, sizeof(p->status), "%s", status);
}

/* A live migration's save: QEMU stops the running VM itself, tells us (before the device state is
 * written), and the state restores like a snapshot's. A VM paused already is saved as it is. */
static void test_stop_and_save(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *state_path = test_path(f->dir, "state.bin");
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *a = NULL;
        assert_ok(vmm_start(&cfg, false, &a));
        assert_status(a, "running");
        struct stopped_probe probe = {.vm = a};
        uint64_t t0 = clock_now_ns();
        assert_ok(vmm_stop_and_save_state(a, state_path, on_stopped, &probe));
        print_message("stop and save of a running VM: %.1f ms, state %llu bytes\n", (clock_now_ns() - t0) / 1e6,
                      (unsigned long long)file_size(state_path));
        assert_int_equal(probe.calls, 1);
        /* Told while QEMU was still writing the state, or just after: never while running. */
        assert_true(strcmp(probe.status, "finish-migrate") == 0 || strcmp(probe.status, "postmigrate") == 0);
        assert_true(file_size(state_path) > 0);
        assert_status(a, "postmigrate");
        assert_ok(vmm_resume(a));
        assert_status(a, "running");
        assert_ok(vmm_pause(a));
        probe.calls = 0;
        assert_ok(vmm_stop_and_save_state(a, state_path, on_stopped, &probe));
        assert_int_equal(probe.calls, 1);
        assert_string_equal(probe.status, "paused");
        vmm_free(a);

        struct vmm_config cfg_b = config(f, f->run_b);
        struct vmm *b = NULL;
        assert_ok(vmm_start(&cfg_b, true, &b));
        assert_ok(vmm_restore(b, state_path));
        assert_ok(vmm_resume(b));
        assert_status(b, "running");
        vmm_free(b);
}

static void write_all(int fd, const char *buf, size_t len) {
        while (len > 0) {
                ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
                assert_true(n > 0);
                buf += n;
                len -= (size_t)n;
        }
}

/* The state as a stream, its last byte held back: QEMU has loaded all but that and waits;
 * told to start meanwhile (autostart), it runs the VM once the byte comes, with no `cont`
 * after. A state saved from a paused VM loads paused (the source's run state wins). */
static void test_restore_stream(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *running_path = test_path(f->dir, "running.bin");
        _cleanup_free_ char *paused_path = test_path(f->dir, "paused.bin");
        /* Each state with the RAM it was saved with (both VMs share the fixture's memory file). */
        _cleanup_free_ char *running_ram = test_path(f->dir, "running.ram");
        _cleanup_free_ char *paused_ram = test_path(f->dir, "paused.ram");
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *a = NULL;
        assert_ok(vmm_start(&cfg, false, &a));
        struct stopped_probe probe = {.vm = a};
        assert_ok(vmm_stop_and_save_state(a, running_path, on_stopped, &probe));
        vmm_free(a);
        assert_ok(fs_copy_file(f->memory, running_ram, MEMORY_BYTES));
        make_snapshot(f, paused_path);
        assert_ok(fs_copy_file(f->memory, paused_ram, MEMORY_BYTES));

        const char *paths[] = {running_path, paused_path}, *rams[] = {running_ram, paused_ram};
        const char *after[] = {"running", "paused"};
        for (int i = 0; i < 2; i++) {
                assert_ok(fs_copy_file(rams[i], f->memory, MEMORY_BYTES));
                int fd0 = open(paths[i], O_RDONLY | O_CLOEXEC);
                assert_true(fd0 >= 0);
                size_t len = (size_t)file_size(paths[i]);
                _cleanup_free_ char *buf = malloc(len);
                assert_non_null(buf);
                assert_int_equal(read(fd0, buf, len), (ssize_t)len);
                close(fd0);

                struct vmm_config cfg_b = config(f, f->run_b);
                struct vmm *b = NULL;
                assert_ok(vmm_start(&cfg_b, true, &b));
                int fd = -1;
                assert_ok(vmm_restore_stream_start(b, &fd));
                assert_ok(vmm_restore_autostart(b));
                write_all(fd, buf, len - 1);
                clock_sleep_ns(100 * NSEC_PER_MSEC);
                assert_status(b, "inmigrate"); /* all but one byte: still loading */
                uint64_t t0 = clock_now_ns();
                write_all(fd, buf + len - 1, 1);
                close(fd);
                assert_ok(vmm_restore_wait(b));
                print_message("stream restore, %s state: last byte to the load's end %.1f ms\n", after[i],
                              (clock_now_ns() - t0) / 1e6);
                assert_status(b, after[i]);
                if (i == 1) {
                        assert_ok(vmm_resume(b));
                        assert_status(b, "running");
                }
                vmm_free(b);
        }

        /* A stream cut short fails the load with a message, and QEMU can be stopped. */
        struct vmm_config cfg_c = config(f, f->run_b);
        struct vmm *c = NULL;
        assert_ok(vmm_start(&cfg_c, true, &c));
        int fd = -1;
        assert_ok(vmm_restore_stream_start(c, &fd));
        write_all(fd, "QEVM", 4);
        close(fd);
        int r = vmm_restore_wait(c);
        print_message("cut stream: %d: %s\n", r, error_message());
        assert_true(r < 0);
        assert_non_null(strstr(error_message(), "stream"));
        pid_t pid = vmm_pid(c);
        vmm_free(c);
        assert_process_gone(pid);
}

/* Restoring `state_path` must fail with a message naming it, and leave nothing behind. */
static void expect_restore_failure(const struct fixture *f, const char *state_path, const char *label) {
        struct vmm_config cfg = config(f, f->run_b);
        struct vmm *b = NULL;
        assert_ok(vmm_start(&cfg, true, &b));
        pid_t pid = vmm_pid(b);
        int r = vmm_restore(b, state_path);
        print_message("%s: %d: %s\n", label, r, error_message());
        assert_true(r < 0);
        assert_non_null(strstr(error_message(), state_path));
        _cleanup_free_ char *message = strdup(error_message());
        vmm_free(b);
        /* Freeing keeps the message that explains the failure. */
        assert_string_equal(error_message(), message);
        assert_process_gone(pid);
        assert_no_sockets(f->run_b);
}

static void test_restore_corrupt_state(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *state_path = test_path(f->dir, "state.bin");
        make_snapshot(f, state_path);
        uint64_t size = file_size(state_path);

        /* Flip bytes all through the stream. */
        int fd = open(state_path, O_RDWR);
        assert_true(fd >= 0);
        for (uint64_t off = 1000; off < size; off += 997) {
                unsigned char c;
                assert_int_equal(pread(fd, &c, 1, (off_t)off), 1);
                c ^= 0x5a;
                assert_int_equal(pwrite(fd, &c, 1, (off_t)off), 1);
        }
        close(fd);
        expect_restore_failure(f, state_path, "corrupted state");

        /* Cut in half. */
        make_snapshot(f, state_path);
        assert_int_equal(truncate(state_path, (off_t)(size / 2)), 0);
        expect_restore_failure(f, state_path, "truncated state");

        /* Not a migration stream at all. */
        test_write_random_file(state_path, 4096, 7);
        expect_restore_failure(f, state_path, "random state");
}

static void test_restore_missing_state(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *missing = test_path(f->dir, "no-such-state.bin");
        _cleanup_free_ char *empty = test_path(f->dir, "empty-state.bin");
        int fd = open(f->memory, O_RDWR | O_CREAT, 0644);
        assert_true(fd >= 0);
        assert_int_equal(ftruncate(fd, (off_t)MEMORY_BYTES), 0);
        close(fd);
        fd = open(empty, O_RDWR | O_CREAT, 0644);
        assert_true(fd >= 0);
        close(fd);

        struct vmm_config cfg = config(f, f->run_b);
        struct vmm *b = NULL;
        assert_ok(vmm_start(&cfg, true, &b));
        assert_int_equal(vmm_restore(b, missing), -ENOENT);
        print_message("missing state: %s\n", error_message());
        assert_non_null(strstr(error_message(), missing));
        assert_int_equal(vmm_restore(b, empty), -EINVAL);
        print_message("empty state: %s\n", error_message());
        assert_non_null(strstr(error_message(), "empty"));
        /* Nothing was started: the VM still waits for a state. */
        assert_status(b, "inmigrate");
        vmm_free(b);
}

static void test_memory_file_size(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *state_path = test_path(f->dir, "state.bin");
        make_snapshot(f, state_path);
        struct vmm_config cfg = config(f, f->run_b);
        struct vmm *vm = NULL;

        /* Restoring needs exactly the snapshot's RAM size, larger or smaller. */
        assert_int_equal(truncate(f->memory, (off_t)(MEMORY_BYTES + (2u << 20))), 0);
        assert_int_equal(vmm_start(&cfg, true, &vm), -EINVAL);
        print_message("larger memory file: %s\n", error_message());
        assert_non_null(strstr(error_message(), f->memory));
        assert_int_equal(truncate(f->memory, (off_t)(MEMORY_BYTES / 2)), 0);
        assert_int_equal(vmm_start(&cfg, true, &vm), -EINVAL);
        print_message("smaller memory file: %s\n", error_message());
        assert_int_equal(file_size(f->memory), MEMORY_BYTES / 2); /* untouched */
        assert_int_equal(unlink(f->memory), 0);
        assert_int_equal(vmm_start(&cfg, true, &vm), -ENOENT);
        print_message("no memory file: %s\n", error_message());
        assert_false(exists(f->memory));

        /* Booting extends a short file and refuses to shrink a long one. */
        assert_int_equal(truncate(f->disk, (off_t)DISK_BYTES), 0);
        int fd = open(f->memory, O_RDWR | O_CREAT, 0644);
        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(truncate(f->memory, (off_t)(MEMORY_BYTES * 2)), 0);
        assert_int_equal(vmm_start(&cfg, false, &vm), -EINVAL);
        print_message("boot with a larger memory file: %s\n", error_message());
        assert_int_equal(truncate(f->memory, (off_t)(4u << 20)), 0);
        assert_ok(vmm_start(&cfg, false, &vm));
        assert_int_equal(file_size(f->memory), MEMORY_BYTES);
        vmm_free(vm);
}

static void test_start_failures(void **state) {
        struct fixture *f = *state;
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;

        /* QEMU itself refuses: its exit status and its own words. */
        cfg.cpu_model = "no-such-cpu";
        assert_true(vmm_start(&cfg, false, &vm) < 0);
        print_message("bad CPU model: %s\n", error_message());
        assert_non_null(strstr(error_message(), "exited"));
        assert_non_null(strstr(error_message(), "no-such-cpu"));
        assert_no_sockets(f->run_a);

        cfg = config(f, f->run_a);
        cfg.qemu_bin = "/nonexistent/qemu";
        assert_int_equal(vmm_start(&cfg, false, &vm), -ENOENT);
        print_message("no QEMU: %s\n", error_message());

        /* Refused before anything starts. */
        cfg = config(f, f->run_a);
        cfg.memory_bytes = MEMORY_BYTES + 4096;
        assert_int_equal(vmm_start(&cfg, false, &vm), -EINVAL);
        cfg = config(f, f->run_a);
        cfg.drives[0].name = "bad,name";
        assert_int_equal(vmm_start(&cfg, false, &vm), -EINVAL);
        print_message("bad drive name: %s\n", error_message());
        cfg = config(f, f->run_a);
        cfg.ports[0] = "qmp";
        assert_int_equal(vmm_start(&cfg, false, &vm), -EINVAL);
        cfg = config(f, f->run_a);
        cfg.boot_args = "console=ttyS0";
        assert_int_equal(vmm_start(&cfg, false, &vm), -EINVAL);
        print_message("boot args without kernel: %s\n", error_message());
        cfg = config(f, f->run_a);
        cfg.kernel = "/nonexistent/bzImage";
        assert_int_equal(vmm_start(&cfg, false, &vm), -ENOENT);
        cfg = config(f, "/nonexistent-runtime-dir");
        assert_int_equal(vmm_start(&cfg, false, &vm), -ENOENT);
        print_message("no runtime dir: %s\n", error_message());
}

/* A restore on a VM that was not started incoming, and QEMU dying under us. */
static void test_misuse_and_crash(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *state_path = test_path(f->dir, "state.bin");
        make_snapshot(f, state_path);
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;
        assert_ok(vmm_start(&cfg, false, &vm));
        assert_int_equal(vmm_restore(vm, state_path), -EINVAL);
        print_message("restore on a booted VM: %s\n", error_message());

        pid_t pid = vmm_pid(vm);
        assert_int_equal(kill(pid, SIGKILL), 0);
        int r = vmm_pause(vm);
        print_message("QEMU killed: %d: %s\n", r, error_message());
        assert_true(r < 0);
        assert_non_null(strstr(error_message(), "signal 9"));
        assert_false(vmm_running(vm));
        assert_ok(vmm_stop(vm));
        assert_process_gone(pid);
        assert_no_sockets(f->run_a);
        vmm_free(vm);
}

/* Forced accelerators; KVM (where /dev/kvm works) through a snapshot and a restore. */
static void test_accelerators(void **state) {
        struct fixture *f = *state;
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;
        cfg.accelerator = "xen";
        assert_int_equal(vmm_start(&cfg, false, &vm), -EINVAL);
        print_message("bad accelerator: %s\n", error_message());

        cfg.accelerator = "tcg";
        uint64_t t0 = clock_now_ns();
        assert_ok(vmm_start(&cfg, false, &vm));
        print_message("tcg: start to QMP ready %.1f ms\n", (clock_now_ns() - t0) / 1e6);
        assert_string_equal(vmm_accelerator(vm), "tcg");
        vmm_free(vm);

        int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        if (kvm < 0) {
                cfg.accelerator = "kvm";
                assert_true(vmm_start(&cfg, false, &vm) < 0);
                print_message("kvm without /dev/kvm: %s\n", error_message());
                return;
        }
        close(kvm);
        /* Without arch-capabilities: a paravirtual KVM (kvm-pvm) refuses that MSR and QEMU aborts. */
        _cleanup_free_ char *state_path = test_path(f->dir, "state-kvm.bin");
        cfg.accelerator = "kvm";
        cfg.cpu_model = "host,-arch-capabilities";
        int r = vmm_start(&cfg, false, &vm);
        if (r < 0) {
                print_message("QEMU does not start under this host's KVM: %s\n", error_message());
                skip();
        }
        assert_string_equal(vmm_accelerator(vm), "kvm");
        assert_status(vm, "running");
        assert_ok(vmm_pause(vm));
        t0 = clock_now_ns();
        assert_ok(vmm_snapshot(vm, state_path));
        print_message("kvm: snapshot %llu bytes in %.1f ms\n", (unsigned long long)file_size(state_path),
                      (clock_now_ns() - t0) / 1e6);
        vmm_free(vm);
        cfg.runtime_dir = f->run_b;
        assert_ok(vmm_start(&cfg, true, &vm));
        assert_ok(vmm_restore(vm, state_path));
        assert_status(vm, "paused");
        assert_ok(vmm_resume(vm));
        assert_status(vm, "running");
        vmm_free(vm);
}

/* QEMU reads nothing of ours: stdin is /dev/null unless enable_input, and it inherits no fd
 * beyond 0-2; the console goes to our stdout with enable_output. */
static void test_inherited_fds(void **state) {
        struct fixture *f = *state;
        _cleanup_free_ char *canary = test_path(f->dir, "canary");
        int leak = open(canary, O_RDWR | O_CREAT, 0644); /* deliberately without O_CLOEXEC */
        assert_true(leak >= 0);
        struct vmm_config cfg = config(f, f->run_a);
        cfg.enable_output = true;
        struct vmm *vm = NULL;
        assert_ok(vmm_start(&cfg, false, &vm));
        pid_t pid = vmm_pid(vm);
        char link[64], target[4096], ours[4096];
        snprintf(link, sizeof(link), "/proc/%d/fd/0", (int)pid);
        ssize_t n = readlink(link, target, sizeof(target) - 1);
        assert_true(n > 0);
        target[n] = '\0';
        assert_string_equal(target, "/dev/null");
        snprintf(link, sizeof(link), "/proc/%d/fd/1", (int)pid);
        n = readlink(link, target, sizeof(target) - 1);
        assert_true(n > 0);
        target[n] = '\0';
        n = readlink("/proc/self/fd/1", ours, sizeof(ours) - 1);
        assert_true(n > 0);
        ours[n] = '\0';
        assert_string_equal(target, ours);

        char dir_path[64];
        snprintf(dir_path, sizeof(dir_path), "/proc/%d/fd", (int)pid);
        DIR *d = opendir(dir_path);
        assert_non_null(d);
        for (struct dirent *e; (e = readdir(d));) {
                char fd_path[512];
                snprintf(fd_path, sizeof(fd_path), "%s/%s", dir_path, e->d_name);
                n = readlink(fd_path, target, sizeof(target) - 1);
                if (n <= 0)
                        continue;
                target[n] = '\0';
                assert_null(strstr(target, "canary"));
        }
        closedir(d);
        close(leak);
        vmm_free(vm);

        /* Without enable_output the console is a file in the runtime directory. */
        cfg.enable_output = false;
        assert_ok(vmm_start(&cfg, false, &vm));
        char console[4096];
        snprintf(console, sizeof(console), "%s/console.log", f->run_a);
        assert_true(exists(console));
        vmm_free(vm);
}

/* Kilobytes resident of process pid's mappings whose line ends with `name` ("[heap]", a file's
 * path), and (if module is not NULL) whether the heap module is mapped there. */
static unsigned long rss_kb(pid_t pid, const char *name, bool *module) {
        char path[64];
        snprintf(path, sizeof(path), "/proc/%d/smaps", (int)pid);
        _cleanup_fclose_ FILE *f = fopen(path, "re");
        assert_non_null(f);
        char line[4096];
        unsigned long kb = 0;
        bool in = false;
        if (module)
                *module = false;
        while (fgets(line, sizeof(line), f)) {
                if (module && strstr(line, "drafter-qemu-heap.so"))
                        *module = true;
                char *dash = strchr(line, '-'), *space = strchr(line, ' ');
                if (dash && space && dash < space) { /* a mapping's first line */
                        line[strcspn(line, "\n")] = '\0';
                        size_t n = strlen(line), m = strlen(name);
                        in = n >= m && strcmp(line + n - m, name) == 0;
                } else if (in && strncmp(line, "Rss:", 4) == 0) {
                        kb += strtoul(line + 4, NULL, 10);
                }
        }
        return kb;
}

static unsigned long heap_kb(pid_t pid, bool *module) {
        return rss_kb(pid, "[heap]", module);
}

/* DRAFTER_QEMU_HEAP_MODULE pointed nowhere (QEMU starts without the module); restore_module()
 * puts back what it returns. */
static char *without_module(void) {
        const char *module = getenv("DRAFTER_QEMU_HEAP_MODULE");
        char *saved = module ? strdup(module) : NULL;
        setenv("DRAFTER_QEMU_HEAP_MODULE", "/nonexistent/drafter-qemu-heap.so", 1);
        return saved;
}

static void restore_module(const char *saved) {
        if (saved)
                setenv("DRAFTER_QEMU_HEAP_MODULE", saved, 1);
        else
                unsetenv("DRAFTER_QEMU_HEAP_MODULE");
}

/* `sleep` under the heap module, with DRAFTER_QEMU_HEAP_MIB=mib (0: unset): its heap's
 * resident kilobytes. */
static unsigned long heap_kb_of_sleep(const char *module, int mib) {
        int ready[2];
        assert_int_equal(pipe2(ready, O_CLOEXEC), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
                char preload[4200], heap[64];
                snprintf(preload, sizeof(preload), "LD_PRELOAD=%s", module);
                snprintf(heap, sizeof(heap), "DRAFTER_QEMU_HEAP_MIB=%d", mib);
                char *env[] = {preload, mib ? heap : NULL, NULL};
                close(ready[0]);
                execle("/bin/sleep", "sleep", "30", (char *)NULL, env);
                _exit(127);
        }
        close(ready[1]);
        char c;
        assert_int_equal(read(ready[0], &c, 1), 0); /* exec closed it */
        close(ready[0]);
        /* Constructors run before main: once sleep waits in its nanosleep, ours has run. */
        char path[64], call[256], clock_nanosleep_nr[16], nanosleep_nr[16];
        snprintf(path, sizeof(path), "/proc/%d/syscall", (int)pid);
        snprintf(clock_nanosleep_nr, sizeof(clock_nanosleep_nr), "%d ", (int)SYS_clock_nanosleep);
        snprintf(nanosleep_nr, sizeof(nanosleep_nr), "%d ", (int)SYS_nanosleep);
        bool sleeping = false;
        for (int i = 0; i < 2000 && !sleeping; i++) {
                _cleanup_fclose_ FILE *f = fopen(path, "re");
                sleeping = f && fgets(call, sizeof(call), f) &&
                           (strncmp(call, clock_nanosleep_nr, strlen(clock_nanosleep_nr)) == 0 ||
                            strncmp(call, nanosleep_nr, strlen(nanosleep_nr)) == 0);
                if (!sleeping)
                        clock_sleep_ns(5 * NSEC_PER_MSEC);
        }
        assert_true(sleeping);
        bool mapped = false;
        unsigned long kb = heap_kb(pid, &mapped);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        assert_true(mapped);
        return kb;
}

/* The heap module (qemu_heap.c): with DRAFTER_QEMU_HEAP_MIB=8 a process starts with 8 MiB of
 * heap resident, without it nothing happens; every QEMU we start has it preloaded with that
 * setting; without a module (none found) QEMU starts as before. Meson names the built module in
 * DRAFTER_QEMU_HEAP_MODULE; a sanitized build has none, and there only the last part applies. */
static void test_heap_module(void **state) {
        struct fixture *f = *state;
        const char *module = getenv("DRAFTER_QEMU_HEAP_MODULE");
        _cleanup_free_ char *saved = module ? strdup(module) : NULL;
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;
        bool mapped = false;
        const char *status = NULL;
        if (saved) {
                assert_true(heap_kb_of_sleep(saved, 8) >= 8 * 1024);
                assert_true(heap_kb_of_sleep(saved, 0) < 1024);

                assert_ok(vmm_start(&cfg, false, &vm));
                heap_kb(vmm_pid(vm), &mapped);
                assert_true(mapped);
                char path[64], env[65536];
                snprintf(path, sizeof(path), "/proc/%d/environ", (int)vmm_pid(vm));
                _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
                assert_true(fd >= 0);
                ssize_t n = read(fd, env, sizeof(env) - 1);
                assert_true(n > 0);
                bool found = false;
                for (ssize_t i = 0; i < n; i += (ssize_t)strlen(env + i) + 1)
                        found = found || strcmp(env + i, "DRAFTER_QEMU_HEAP_MIB=8") == 0;
                assert_true(found);
                assert_ok(vmm_status(vm, &status));
                vmm_free(vm);
        }

        _cleanup_free_ char *given = without_module();
        assert_ok(vmm_start(&cfg, false, &vm));
        heap_kb(vmm_pid(vm), &mapped);
        assert_false(mapped);
        assert_ok(vmm_status(vm, &status));
        vmm_free(vm);
        restore_module(given);
}

/* The toucher in the heap module (qemu_touch.c): QEMU maps a range of its guest RAM when asked
 * (an incoming QEMU has touched none of it), refuses ranges outside the file, and without the
 * module there is none to ask. */
static void test_toucher(void **state) {
        struct fixture *f = *state;
        const char *module = getenv("DRAFTER_QEMU_HEAP_MODULE");
        _cleanup_free_ char *saved = module ? strdup(module) : NULL;
        struct vmm_config cfg = config(f, f->run_a);
        struct vmm *vm = NULL;
        _cleanup_close_ int memory = open(f->memory, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        assert_true(memory >= 0);
        assert_int_equal(ftruncate(memory, MEMORY_BYTES), 0); /* sparse: what a restore finds */
        if (saved) {
                assert_ok(vmm_start(&cfg, true, &vm));
                uint64_t mid = MEMORY_BYTES / 2, len = 2 << 20;
                unsigned long before = rss_kb(vmm_pid(vm), f->memory, NULL);
                assert_int_equal(vmm_touch_memory(vm, mid, len, VMM_TOUCH_WAIT | VMM_TOUCH_IDLE), 0);
                unsigned long after = rss_kb(vmm_pid(vm), f->memory, NULL);
                assert_true(after >= before + len / 1024);
                vmm_touch_hurry(vm); /* nothing out: harmless */
                assert_int_equal(vmm_touch_memory(vm, mid + 1, 4096, VMM_TOUCH_WAIT), -ERANGE);
                assert_int_equal(vmm_touch_memory(vm, MEMORY_BYTES - 4096, 8192, VMM_TOUCH_WAIT), -ERANGE);
                assert_int_equal(vmm_touch_memory(vm, 0, 0, VMM_TOUCH_DONE), 0);
                assert_int_equal(vmm_touch_memory(vm, 0, 4096, VMM_TOUCH_WAIT), 0); /* still there */
                assert_status(vm, "inmigrate");
                vmm_free(vm);
        }

        _cleanup_free_ char *given = without_module();
        assert_ok(vmm_start(&cfg, true, &vm));
        assert_int_equal(vmm_touch_memory(vm, 0, 4096, VMM_TOUCH_WAIT), -EOPNOTSUPP);
        vmm_free(vm);
        restore_module(given);
}

/* A process that dies without stopping its VM takes QEMU with it (PR_SET_PDEATHSIG). */
static void test_parent_death(void **state) {
        struct fixture *f = *state;
        /* Orphans come to us, so we can reap QEMU and see how it ended. */
        assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        pid_t child = fork();
        assert_true(child >= 0);
        if (child == 0) {
                close(fds[0]);
                struct vmm_config cfg = config(f, f->run_a);
                cfg.accelerator = "tcg";
                struct vmm *vm = NULL;
                pid_t qemu = -1;
                if (vmm_start(&cfg, false, &vm) == 0)
                        qemu = vmm_pid(vm);
                if (write(fds[1], &qemu, sizeof(qemu)) != sizeof(qemu))
                        _exit(2);
                _exit(qemu > 0 ? 0 : 1); /* no vmm_stop(): the VM is abandoned */
        }
        close(fds[1]);
        pid_t qemu = -1;
        assert_int_equal(read(fds[0], &qemu, sizeof(qemu)), sizeof(qemu));
        close(fds[0]);
        int status;
        assert_int_equal(waitpid(child, &status, 0), child);
        assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        assert_true(qemu > 0);

        uint64_t deadline = clock_now_ns() + 10 * NSEC_PER_SEC;
        pid_t w;
        while ((w = waitpid(qemu, &status, WNOHANG)) == 0 && clock_now_ns() < deadline)
                clock_sleep_ns(NSEC_PER_MSEC);
        assert_int_equal(w, qemu);
        assert_true(WIFSIGNALED(status));
        assert_int_equal(WTERMSIG(status), SIGKILL);
        assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 0), 0);
}

static bool qemu_installed(void) {
        return system("command -v qemu-system-x86_64 >/dev/null 2>&1") == 0;
}

int main(void) {
        if (!qemu_installed()) {
                fprintf(stderr, "qemu-system-x86_64 is not installed: skipping\n");
                return 77;
        }
        const struct CMUnitTest tests[] = {
                cmocka_unit_test_setup_teardown(test_run_states, setup, teardown),
                cmocka_unit_test_setup_teardown(test_snapshot_restore, setup, teardown),
                cmocka_unit_test_setup_teardown(test_stop_and_save, setup, teardown),
                cmocka_unit_test_setup_teardown(test_restore_stream, setup, teardown),
                cmocka_unit_test_setup_teardown(test_restore_corrupt_state, setup, teardown),
                cmocka_unit_test_setup_teardown(test_restore_missing_state, setup, teardown),
                cmocka_unit_test_setup_teardown(test_memory_file_size, setup, teardown),
                cmocka_unit_test_setup_teardown(test_start_failures, setup, teardown),
                cmocka_unit_test_setup_teardown(test_misuse_and_crash, setup, teardown),
                cmocka_unit_test_setup_teardown(test_accelerators, setup, teardown),
                cmocka_unit_test_setup_teardown(test_inherited_fds, setup, teardown),
                cmocka_unit_test_setup_teardown(test_parent_death, setup, teardown),
                cmocka_unit_test_setup_teardown(test_heap_module, setup, teardown),
                cmocka_unit_test_setup_teardown(test_toucher, setup, teardown),
        };
        return cmocka_run_group_tests(tests, NULL, NULL);
}
