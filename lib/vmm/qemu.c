/* qemu.c — the QEMU backend of vmm.h: one qemu-system-x86_64 process driven over QMP.
 *
 * Snapshots the Firecracker way (DESIGN.md §2): guest RAM is a memory-backend-file with
 * share=on, so with the migration capability x-ignore-shared a migration to a file carries only
 * the device state; the RAM is the memory file itself. Restore starts QEMU with `-incoming defer
 * -S` and loads that state with migrate-incoming. Both use file migration channels (QEMU >= 9),
 * which take the path as a JSON string: no URI parsing, any file name works; a restore may also
 * read the state from a unix socket we write into (a socket channel), and be told with `cont`
 * while QEMU is still "inmigrate" to run the VM the moment the load ends. */
#include "drafter/vmm.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/fs.h"
#include "drafter/log.h"
#include "drafter/net.h"
#include "qmp.h"
#include "qemu_touch.h"

#include <assert.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <pthread.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define VMM_DEFAULT_QEMU         "qemu-system-x86_64"
#define VMM_MEMORY_ALIGN         (2ULL << 20)
#define VMM_NODE_NAME_MAX        31 /* QEMU's limit for node names and ids */
#define VMM_START_TIMEOUT_NS     (10 * NSEC_PER_SEC)
#define VMM_MIGRATION_TIMEOUT_NS (120 * NSEC_PER_SEC)
#define VMM_MIGRATION_POLL_NS    NSEC_PER_MSEC
#define VMM_QUIT_TIMEOUT_NS      (3 * NSEC_PER_SEC)
#define VMM_TERM_TIMEOUT_NS      (2 * NSEC_PER_SEC)
#define VMM_EXIT_POLL_NS         (2 * NSEC_PER_MSEC)
#define VMM_LOG_TAIL_MAX         480
#define QEMU_FD_TABLE_MIN        256 /* descriptor slots a QEMU process starts with */
#define QEMU_HEAP_MODULE         "drafter-qemu-heap.so"
#define QEMU_HEAP_MIB            "8" /* pre-faulted heap (qemu_heap.c): a state load's fresh heap, twice */

struct vmm_port {
        char *name;
        char *path;
};

struct vmm {
        pid_t pid;
        bool reaped;
        int wait_status; /* once reaped */
        struct qmp *qmp;
        bool incoming; /* started with -incoming, not restored yet */
        bool ignore_shared; /* x-ignore-shared and events are set (QEMU keeps capabilities once set) */
        /* A load started by vmm_restore_start(): */
        bool restoring;
        uint64_t restore_t0, restore_log_from, restore_bytes;
        char *restore_path;
        const char *accelerator;
        char *runtime_dir;
        char *qmp_path;
        char *log_path;
        char *memory_path;
        struct vmm_port ports[VMM_MAX_PORTS];
        size_t port_count;
        char status[32];
        bool settling; /* a live save has returned: QEMU may still be in finish-migrate */
        /* Our end of the toucher's socket in QEMU (qemu_touch.c), or -1; the lock keeps one
         * caller at a time waiting for a reply. */
        int touch_fd;
        pthread_mutex_t touch_lock;
        pid_t touch_tid; /* the toucher's thread, once it answered (atomic) */
};

static_assert((unsigned)VMM_TOUCH_WAIT == QEMU_TOUCH_REPLY &&
                      (unsigned)VMM_TOUCH_IDLE == QEMU_TOUCH_IDLE && (unsigned)VMM_TOUCH_DONE == QEMU_TOUCH_DONE,
              "vmm.h and qemu_touch.h name the same flags");

/* ---- small helpers ---- */

static char *strdup_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *strdup_printf(const char *fmt, ...) {
        va_list ap;
        char *s;
        va_start(ap, fmt);
        int n = vasprintf(&s, fmt, ap);
        va_end(ap);
        return n < 0 ? NULL : s;
}

/* QEMU option values (-object, -chardev, -blockdev key=value lists) escape ',' as ",,". */
static char *qemu_opt_escape(const char *s) {
        size_t commas = 0;
        for (const char *p = s; *p; p++)
                commas += *p == ',';
        char *out = malloc(strlen(s) + commas + 1), *o = out;
        if (!out)
                return NULL;
        for (const char *p = s; *p; p++) {
                *o++ = *p;
                if (*p == ',')
                        *o++ = ',';
        }
        *o = '\0';
        return out;
}

struct argv_builder {
        char **argv;
        size_t count, cap;
        bool oom;
};

static void argv_add(struct argv_builder *a, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void argv_add(struct argv_builder *a, const char *fmt, ...) {
        if (a->oom)
                return;
        if (a->count + 2 > a->cap) {
                size_t cap = a->cap ? a->cap * 2 : 64;
                char **argv = realloc(a->argv, cap * sizeof(*argv));
                if (!argv) {
                        a->oom = true;
                        return;
                }
                a->argv = argv, a->cap = cap;
        }
        va_list ap;
        va_start(ap, fmt);
        int n = vasprintf(&a->argv[a->count], fmt, ap);
        va_end(ap);
        if (n < 0) {
                a->oom = true;
                return;
        }
        a->argv[++a->count] = NULL;
}

static void argv_builder_done(struct argv_builder *a) {
        for (size_t i = 0; i < a->count; i++)
                free(a->argv[i]);
        free(a->argv);
}

static void describe_wait_status(int status, char *buf, size_t size) {
        if (WIFEXITED(status))
                snprintf(buf, size, "exit status %d", WEXITSTATUS(status));
        else if (WIFSIGNALED(status))
                snprintf(buf, size, "killed by signal %d (%s)", WTERMSIG(status),
                         strsignal(WTERMSIG(status)));
        else
                snprintf(buf, size, "wait status 0x%x", (unsigned)status);
}

/* The last lines QEMU wrote to its log from byte `from` on, newlines as "; ", for messages. */
static void log_tail(const char *path, uint64_t from, char *buf, size_t size) {
        buf[0] = '\0';
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0 || (uint64_t)st.st_size <= from)
                return;
        uint64_t len = MIN((uint64_t)st.st_size - from, (uint64_t)VMM_LOG_TAIL_MAX);
        char raw[VMM_LOG_TAIL_MAX + 1];
        ssize_t n = pread(fd, raw, len, (off_t)((uint64_t)st.st_size - len));
        if (n <= 0)
                return;
        raw[n] = '\0';
        char *start = raw;
        if ((uint64_t)st.st_size - len > from) { /* cut mid-line: start at the next line */
                char *nl = strchr(raw, '\n');
                if (nl && nl[1])
                        start = nl + 1;
        }
        size_t end = strlen(start);
        while (end > 0 && (start[end - 1] == '\n' || start[end - 1] == '\r' || start[end - 1] == ' '))
                start[--end] = '\0';
        size_t o = 0;
        for (char *p = start; *p && o + 3 < size; p++) {
                if (*p == '\n') {
                        buf[o++] = ';';
                        buf[o++] = ' ';
                } else if (*p != '\r') {
                        buf[o++] = *p;
                }
        }
        buf[o] = '\0';
}

static uint64_t file_size_or_zero(const char *path) {
        struct stat st;
        return stat(path, &st) < 0 ? 0 : (uint64_t)st.st_size;
}

/* ---- the process ---- */

static void vmm_record_exit(struct vmm *vm, int status) {
        vm->reaped = true;
        vm->wait_status = status;
        char how[96];
        describe_wait_status(status, how, sizeof(how));
        log_debug("qemu: process %d ended: %s", (int)vm->pid, how);
}

bool vmm_running(struct vmm *vm) {
        if (!vm || vm->reaped || vm->pid <= 0)
                return false;
        int status;
        pid_t r = waitpid(vm->pid, &status, WNOHANG);
        if (r == 0)
                return true;
        if (r == vm->pid)
                vmm_record_exit(vm, status);
        else
                vm->reaped = true; /* ECHILD: someone else reaped it */
        return false;
}

/* Wait up to timeout_ns for QEMU to exit; true once it has been reaped. */
static bool vmm_wait_exit(struct vmm *vm, uint64_t timeout_ns) {
        uint64_t deadline = clock_now_ns() + timeout_ns;
        while (vmm_running(vm)) {
                if (clock_now_ns() >= deadline)
                        return false;
                clock_sleep_ns(VMM_EXIT_POLL_NS);
        }
        return true;
}

/* Set an error saying that QEMU has exited, how, and what it last wrote to its log. */
static int vmm_exit_error(struct vmm *vm, int err, uint64_t log_from, const char *what) {
        char how[96], tail[VMM_LOG_TAIL_MAX + 64];
        describe_wait_status(vm->wait_status, how, sizeof(how));
        log_tail(vm->log_path, log_from, tail, sizeof(tail));
        return error_set(err, "%s: QEMU exited (%s)%s%s", what, how, *tail ? ": " : "", tail);
}

static int vmm_check_alive(void *userdata) {
        struct vmm *vm = userdata;
        if (vmm_running(vm))
                return 0;
        return vmm_exit_error(vm, -EIO, 0, "qemu: starting");
}

static int vmm_set_ignore_shared(struct vmm *vm);

/* True if QMP failing with r is QEMU having died (it has been reaped then). */
static bool vmm_died(struct vmm *vm, int r) {
        return (r == -ECONNRESET || r == -ETIMEDOUT) && vmm_wait_exit(vm, 200 * NSEC_PER_MSEC);
}

/* qmp_execute(), with the reason when the cause is that QEMU died. */
static int vmm_qmp(struct vmm *vm, const char *command, json_t *args, json_t **ret_return) {
        if (!vm->qmp)
                return error_set(-ESRCH, "qemu: %s: the VM has been stopped", command);
        int r = qmp_execute(vm->qmp, command, args, ret_return);
        if (r < 0 && vmm_died(vm, r)) {
                char what[128];
                snprintf(what, sizeof(what), "qemu: %s", command);
                return vmm_exit_error(vm, r, 0, what);
        }
        return r;
}

static int resolve_binary(const char *name, char **ret_path) {
        if (strchr(name, '/')) {
                if (access(name, X_OK) < 0)
                        return error_set_errno(-errno, "qemu: %s", name);
                *ret_path = strdup(name);
                return *ret_path ? 0 : -ENOMEM;
        }
        const char *path_env = getenv("PATH");
        _cleanup_free_ char *dirs = strdup(path_env && *path_env ? path_env : "/usr/local/bin:/usr/bin:/bin");
        if (!dirs)
                return -ENOMEM;
        char *save = NULL;
        for (char *dir = strtok_r(dirs, ":", &save); dir; dir = strtok_r(NULL, ":", &save)) {
                _cleanup_free_ char *candidate = strdup_printf("%s/%s", *dir ? dir : ".", name);
                if (!candidate)
                        return -ENOMEM;
                if (access(candidate, X_OK) == 0) {
                        *ret_path = TAKE_PTR(candidate);
                        return 0;
                }
        }
        return error_set(-ENOENT, "qemu: %s not found in PATH (install qemu-system-x86)", name);
}

/* /dev/kvm that runs a stock guest kernel. A /dev/kvm backed by kvm-pvm (the "pagetable virtual
 * machine" of some nested clouds) only runs PVM-aware guest kernels: Debian's kernel boots into
 * emulation errors there and never reaches userspace, so that one counts as no KVM. */
static bool kvm_available(void) {
        if (access("/sys/module/kvm_pvm", F_OK) == 0) {
                log_debug("qemu: /dev/kvm is kvm-pvm (PVM guests only): using TCG");
                return false;
        }
        _cleanup_close_ int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
        return fd >= 0;
}

/* ---- configuration checks ---- */

static bool valid_node_name(const char *name) {
        size_t len = name ? strlen(name) : 0;
        if (len == 0 || len > VMM_NODE_NAME_MAX)
                return false;
        if (!((name[0] >= 'a' && name[0] <= 'z') || (name[0] >= 'A' && name[0] <= 'Z')))
                return false;
        for (const char *p = name; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      *p == '-'))
                        return false;
        return true;
}

static bool valid_port_name(const char *name) {
        return name && *name && !strchr(name, '/') && strcmp(name, ".") != 0 && strcmp(name, "..") != 0 &&
               strcmp(name, "qmp") != 0;
}

static int check_socket_path(const char *path) {
        if (strlen(path) >= sizeof(((struct sockaddr_un *)NULL)->sun_path))
                return error_set(
                        -ENAMETOOLONG,
                        "qemu: socket path %s is longer than %zu bytes: use a shorter runtime directory",
                        path, sizeof(((struct sockaddr_un *)NULL)->sun_path) - 1);
        return 0;
}

static int vmm_config_check(const struct vmm_config *cfg) {
        if (!cfg || !cfg->runtime_dir || !*cfg->runtime_dir)
                return error_set(-EINVAL, "qemu: no runtime directory");
        struct stat st;
        if (stat(cfg->runtime_dir, &st) < 0)
                return error_set_errno(-errno, "qemu: runtime directory %s", cfg->runtime_dir);
        if (!S_ISDIR(st.st_mode))
                return error_set(-ENOTDIR, "qemu: runtime directory %s is not a directory", cfg->runtime_dir);
        if (!cfg->memory_path || !*cfg->memory_path)
                return error_set(-EINVAL, "memory: no memory file");
        if (cfg->memory_bytes == 0 || cfg->memory_bytes % VMM_MEMORY_ALIGN != 0)
                return error_set(-EINVAL, "memory: %" PRIu64 " bytes is not a positive multiple of 2 MiB",
                                 cfg->memory_bytes);
        if (cfg->accelerator && strcmp(cfg->accelerator, "kvm") != 0 && strcmp(cfg->accelerator, "tcg") != 0)
                return error_set(-EINVAL, "qemu: accelerator \"%s\": use kvm, tcg or none (automatic)",
                                 cfg->accelerator);
        if (cfg->cpus < 1)
                return error_set(-EINVAL, "qemu: %d vCPUs: need at least one", cfg->cpus);
        if (!cfg->kernel && (cfg->initrd || (cfg->boot_args && *cfg->boot_args)))
                return error_set(-EINVAL, "qemu: an initrd or boot arguments need a kernel");
        if (cfg->kernel && access(cfg->kernel, R_OK) < 0)
                return error_set_errno(-errno, "qemu: kernel %s", cfg->kernel);
        if (cfg->initrd && access(cfg->initrd, R_OK) < 0)
                return error_set_errno(-errno, "qemu: initrd %s", cfg->initrd);
        if (cfg->drive_count > VMM_MAX_DRIVES)
                return error_set(-E2BIG, "qemu: %zu drives, at most %d", cfg->drive_count, VMM_MAX_DRIVES);
        if (cfg->port_count > VMM_MAX_PORTS)
                return error_set(-E2BIG, "qemu: %zu ports, at most %d", cfg->port_count, VMM_MAX_PORTS);
        for (size_t i = 0; i < cfg->drive_count; i++) {
                const struct vmm_drive *d = &cfg->drives[i];
                if (!valid_node_name(d->name))
                        return error_set(-EINVAL,
                                         "qemu: drive name \"%s\": use 1 to %d letters, digits and '-', "
                                         "starting with a letter",
                                         d->name ? d->name : "(null)", VMM_NODE_NAME_MAX);
                if (!d->path || !*d->path)
                        return error_set(-EINVAL, "qemu: drive %s has no path", d->name);
                for (size_t k = 0; k < i; k++)
                        if (strcmp(cfg->drives[k].name, d->name) == 0)
                                return error_set(-EINVAL, "qemu: two drives are named %s", d->name);
        }
        for (size_t i = 0; i < cfg->port_count; i++) {
                if (!valid_port_name(cfg->ports[i]))
                        return error_set(
                                -EINVAL,
                                "qemu: port name \"%s\": must be non-empty, without '/', not \"qmp\"",
                                cfg->ports[i] ? cfg->ports[i] : "(null)");
                for (size_t k = 0; k < i; k++)
                        if (strcmp(cfg->ports[k], cfg->ports[i]) == 0)
                                return error_set(-EINVAL, "qemu: two ports are named %s", cfg->ports[i]);
        }
        return 0;
}

/* Booting: create the memory file or extend it to memory_bytes; never shrink one (it would be
 * another VM's RAM or a mistake). Incoming: it must already have exactly memory_bytes. */
static int prepare_memory_file(const struct vmm_config *cfg, bool incoming) {
        const char *path = cfg->memory_path;
        struct stat st;
        if (incoming) {
                if (stat(path, &st) < 0)
                        return error_set_errno(-errno, "memory: cannot restore from %s", path);
                if (!S_ISREG(st.st_mode))
                        return error_set(-EINVAL, "memory: %s is not a regular file", path);
                if ((uint64_t)st.st_size != cfg->memory_bytes)
                        return error_set(
                                -EINVAL,
                                "memory: %s has %" PRIu64 " bytes but the VM has %" PRIu64
                                " bytes of RAM: refusing to restore from a memory file of another size",
                                path, (uint64_t)st.st_size, cfg->memory_bytes);
                return 0;
        }
        _cleanup_close_ int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
                return error_set_errno(-errno, "memory: cannot open %s", path);
        if (fstat(fd, &st) < 0)
                return error_set_errno(-errno, "memory: %s", path);
        if (!S_ISREG(st.st_mode))
                return error_set(-EINVAL, "memory: %s is not a regular file", path);
        if ((uint64_t)st.st_size > cfg->memory_bytes)
                return error_set(-EINVAL,
                                 "memory: %s has %" PRIu64 " bytes, more than the VM's %" PRIu64
                                 " bytes of RAM: refusing to shrink it",
                                 path, (uint64_t)st.st_size, cfg->memory_bytes);
        if ((uint64_t)st.st_size < cfg->memory_bytes && ftruncate(fd, (off_t)cfg->memory_bytes) < 0)
                return error_set_errno(-errno, "memory: cannot extend %s to %" PRIu64 " bytes", path,
                                       cfg->memory_bytes);
        return 0;
}

/* ---- the command line ---- */

static int build_argv(const struct vmm *vm, const struct vmm_config *cfg, bool incoming,
                      const char *qemu_path, const char *console_log, struct argv_builder *a) {
        bool kvm = strcmp(vm->accelerator, "kvm") == 0;
        _cleanup_free_ char *mem = qemu_opt_escape(cfg->memory_path);
        _cleanup_free_ char *qmp = qemu_opt_escape(vm->qmp_path);
        _cleanup_free_ char *console = console_log ? qemu_opt_escape(console_log) : NULL;
        if (!mem || !qmp || (console_log && !console))
                return -ENOMEM;

        argv_add(a, "%s", qemu_path);
        argv_add(a, "-nodefaults");
        argv_add(a, "-no-user-config");
        argv_add(a, "-display");
        argv_add(a, "none");
        argv_add(a, "-machine");
        /* suppress-vmdesc: no JSON description of every device's fields (~46 KB, built by the
         * save and skipped by the load) after the state: both are in the downtime. */
        argv_add(a, "q35,memory-backend=mem,suppress-vmdesc=on");
        argv_add(a, "-object");
        argv_add(a, "memory-backend-file,id=mem,size=%" PRIu64 ",mem-path=%s,share=on", cfg->memory_bytes,
                 mem);
        argv_add(a, "-accel");
        /* Multi-threaded TCG panicked migrated guests in about a quarter of runs (DESIGN.md §2). */
        argv_add(a, "%s", kvm ? "kvm" : "tcg,thread=single");
        argv_add(a, "-cpu");
        argv_add(a, "%s", cfg->cpu_model ? cfg->cpu_model : kvm ? "host" : "max");
        argv_add(a, "-smp");
        argv_add(a, "%d", cfg->cpus);
        argv_add(a, "-m");
        argv_add(a, "%" PRIu64 "M", cfg->memory_bytes >> 20);
        /* -kernel, -initrd and -append take their argument verbatim: no escaping. */
        if (cfg->kernel) {
                argv_add(a, "-kernel");
                argv_add(a, "%s", cfg->kernel);
        }
        if (cfg->initrd) {
                argv_add(a, "-initrd");
                argv_add(a, "%s", cfg->initrd);
        }
        if (cfg->boot_args && *cfg->boot_args) {
                argv_add(a, "-append");
                argv_add(a, "%s", cfg->boot_args);
        }
        /* Drives in order, so the guest names them vda, vdb, …: a file node under a raw node.
         * drop-cache=off: a VM started from a loaded state otherwise has QEMU fdatasync each
         * image and drop its page cache (POSIX_FADV_DONTNEED) as it starts, in the downtime; our
         * images' only writer is this QEMU (or our FUSE server), so no cached page is stale. */
        for (size_t i = 0; i < cfg->drive_count; i++) {
                const struct vmm_drive *d = &cfg->drives[i];
                _cleanup_free_ char *file = qemu_opt_escape(d->path);
                if (!file)
                        return -ENOMEM;
                const char *ro = d->read_only ? "on" : "off";
                argv_add(a, "-blockdev");
                argv_add(a, "driver=file,node-name=file%zu,filename=%s,cache.direct=off,drop-cache=off,read-only=%s", i,
                         file, ro);
                argv_add(a, "-blockdev");
                argv_add(a, "driver=raw,node-name=%s,file=file%zu,read-only=%s", d->name, i, ro);
                argv_add(a, "-device");
                argv_add(a, "virtio-blk-pci,drive=%s,id=%s", d->name, d->name);
        }
        if (cfg->tap) {
                _cleanup_free_ char *tap = qemu_opt_escape(cfg->tap);
                if (!tap)
                        return -ENOMEM;
                argv_add(a, "-netdev");
                argv_add(a, "tap,id=net0,ifname=%s,script=no,downscript=no", tap);
                argv_add(a, "-device");
                argv_add(a, "virtio-net-pci,netdev=net0,mac=%s", cfg->mac);
        }
        if (vm->port_count > 0) {
                argv_add(a, "-device");
                argv_add(a, "virtio-serial-pci");
        }
        for (size_t i = 0; i < vm->port_count; i++) {
                _cleanup_free_ char *path = qemu_opt_escape(vm->ports[i].path);
                _cleanup_free_ char *name = qemu_opt_escape(vm->ports[i].name);
                if (!path || !name)
                        return -ENOMEM;
                argv_add(a, "-chardev");
                argv_add(a, "socket,id=port%zu,path=%s,server=on,wait=off", i, path);
                argv_add(a, "-device");
                argv_add(a, "virtserialport,chardev=port%zu,name=%s", i, name);
        }
        /* The same serial device either way, so a snapshot restores whatever the console is. */
        argv_add(a, "-chardev");
        if (cfg->enable_output)
                argv_add(a, "stdio,id=con,signal=off"); /* ^C goes to the guest, not to QEMU */
        else
                argv_add(a, "file,id=con,path=%s", console);
        argv_add(a, "-serial");
        argv_add(a, "chardev:con");
        argv_add(a, "-chardev");
        argv_add(a, "socket,id=qmp,path=%s,server=on,wait=off", qmp);
        argv_add(a, "-mon");
        argv_add(a, "chardev=qmp,mode=control");
        if (incoming) {
                argv_add(a, "-incoming");
                argv_add(a, "defer");
                argv_add(a, "-S"); /* stay paused after the state is loaded, whatever the source was */
        }
        argv_add(a, "-no-reboot");
        return a->oom ? -ENOMEM : 0;
}

/* QEMU asks for transparent huge pages on all guest RAM (madvise MADV_HUGEPAGE). Our RAM is a
 * shared mapping of a FUSE file, which never gets huge pages, but the flag still makes the kernel
 * read around every page fault two whole huge pages (4 MiB) instead of the file's readahead
 * window: on a VM whose memory arrives lazily over a link (drafter-registry, post-copy) each
 * first touch then waits for 4 MiB. So QEMU's madvise(MADV_HUGEPAGE) of exactly the RAM's length
 * is made a no-op that succeeds (a seccomp filter); its other madvise calls, like huge pages for
 * TCG's code buffer, are untouched (a buffer as long as the RAM loses them: harmless). */
#if defined(__x86_64__)
#define HUGEPAGE_FILTER_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define HUGEPAGE_FILTER_ARCH AUDIT_ARCH_AARCH64
#endif
#define HUGEPAGE_FILTER_MAX 12
#define ARG_LO(n) ((uint32_t)offsetof(struct seccomp_data, args[n])) /* little-endian: the low word */
#define ARG_HI(n) (ARG_LO(n) + 4)

static unsigned short hugepage_filter_build(struct sock_filter *f, uint64_t memory_bytes) {
#ifdef HUGEPAGE_FILTER_ARCH
        unsigned short n = 0;
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, HUGEPAGE_FILTER_ARCH, 0, 8);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 0, 6);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(2));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, MADV_HUGEPAGE, 0, 4);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_LO(1));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)memory_bytes, 0, 2);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, ARG_HI(1));
        f[n++] = (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (uint32_t)(memory_bytes >> 32), 1, 0);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW);
        f[n++] = (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | 0); /* "done" */
        return n;
#else
        (void)f, (void)memory_bytes;
        return 0;
#endif
}

/* drafter-qemu-heap.so (lib/vmm/qemu_heap.c): $DRAFTER_QEMU_HEAP_MODULE if set, else beside our
 * executable (a build tree) or in ../libexec/drafter (installed). NULL where none is: QEMU then
 * starts without it. */
static char *find_heap_module(void) {
        const char *given = getenv("DRAFTER_QEMU_HEAP_MODULE");
        if (given && *given)
                return access(given, R_OK) == 0 ? strdup(given) : NULL;
        char exe[PATH_MAX];
        ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
        if (n <= 0)
                return NULL;
        exe[n] = '\0';
        char *slash = strrchr(exe, '/');
        if (!slash)
                return NULL;
        *slash = '\0';
        static const char *const where[] = {"", "/../libexec/drafter"};
        for (size_t i = 0; i < ELEMENTSOF(where); i++) {
                char *path = NULL;
                if (asprintf(&path, "%s%s/%s", exe, where[i], QEMU_HEAP_MODULE) < 0)
                        return NULL;
                if (access(path, R_OK) == 0)
                        return path;
                free(path);
        }
        return NULL;
}

/* QEMU's environment: ours, with the heap module preloaded when we have it, and its toucher
 * given the guest-RAM file `touch_path` (NULL: none). *ret_module says whether it is preloaded.
 * Built before the fork (the child may only make async-signal-safe calls). */
static char **qemu_environment(const char *touch_path, bool *ret_module) {
        _cleanup_free_ char *module = find_heap_module();
        *ret_module = module != NULL;
        size_t n = 0;
        while (environ[n])
                n++;
        char **env = calloc(n + 5, sizeof(*env));
        if (!env)
                return NULL;
        size_t k = 0;
        const char *preload = NULL;
        for (size_t i = 0; i < n; i++) {
                if (module && strncmp(environ[i], "LD_PRELOAD=", 11) == 0)
                        preload = environ[i] + 11;
                else if (strncmp(environ[i], "DRAFTER_QEMU_", 13) != 0 ||
                         strncmp(environ[i], "DRAFTER_QEMU_HEAP_MODULE=", 25) == 0)
                        env[k++] = strdup(environ[i]);
        }
        if (module) {
                if (asprintf(&env[k], "LD_PRELOAD=%s%s%s", module, preload ? ":" : "", preload ? preload : "") >= 0)
                        k++;
                env[k++] = strdup("DRAFTER_QEMU_HEAP_MIB=" QEMU_HEAP_MIB);
                if (touch_path) {
                        env[k++] = strdup(QEMU_TOUCH_FD_ENV "=" QEMU_TOUCH_FD_STR);
                        if (asprintf(&env[k], QEMU_TOUCH_PATH_ENV "=%s", touch_path) >= 0)
                                k++;
                }
        } else {
                log_debug("qemu: no %s found: QEMU starts without it", QEMU_HEAP_MODULE);
        }
        bool ok = true;
        for (size_t i = 0; i < k; i++)
                ok = ok && env[i];
        if (!ok) {
                for (size_t i = 0; i < k; i++)
                        free(env[i]);
                free(env);
                return NULL;
        }
        return env;
}

static void env_freep(char ***env) {
        for (size_t i = 0; *env && (*env)[i]; i++)
                free((*env)[i]);
        free(*env);
}

static int vmm_spawn(struct vmm *vm, const struct vmm_config *cfg, char *const argv[],
                     const char *qemu_path) {
        bool input = cfg->enable_output && cfg->enable_input;
        _cleanup_close_ int null_fd = open("/dev/null", O_RDWR | O_CLOEXEC);
        if (null_fd < 0)
                return error_set_errno(-errno, "qemu: /dev/null");
        _cleanup_close_ int log_fd =
                open(vm->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
        if (log_fd < 0)
                return error_set_errno(-errno, "qemu: cannot create its log %s", vm->log_path);
        int stdin_fd = input ? STDIN_FILENO : null_fd;
        int stdout_fd = cfg->enable_output ? STDOUT_FILENO : log_fd;

        _cleanup_close_ int netns_fd = -EBADF;
        if (cfg->netns && (netns_fd = netns_open(cfg->netns)) < 0)
                return error_prefix(netns_fd, "qemu");
        struct sock_filter insns[HUGEPAGE_FILTER_MAX];
        struct sock_fprog hugepage_filter = {.len = hugepage_filter_build(insns, cfg->memory_bytes), .filter = insns};
        bool module;
        _cleanup_(env_freep) char **env = qemu_environment(cfg->memory_path, &module);
        if (!env)
                return -ENOMEM;
        /* The toucher's socket (qemu_touch.h): best effort, QEMU runs the same without it. */
        int touch[2] = {-1, -1};
        if (module && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, touch) < 0)
                log_debug("qemu: no toucher: socketpair: %m");
        _cleanup_close_ int touch_child = touch[1];
        _cleanup_close_ int touch_ours = touch[0];
        pid_t parent = getpid();
        pid_t pid = fork();
        if (pid < 0)
                return error_set_errno(-errno, "qemu: fork");
        if (pid == 0) {
                /* Child: async-signal-safe calls only until exec. */
                sigset_t none;
                sigemptyset(&none);
                sigprocmask(SIG_SETMASK, &none, NULL);
                struct sigaction dfl = {.sa_handler = SIG_DFL};
                static const int reset[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD};
                for (size_t i = 0; i < ELEMENTSOF(reset); i++)
                        sigaction(reset[i], &dfl, NULL);
                /* Own process group: a ^C at the terminal is for us to handle, not for QEMU. */
                setpgid(0, 0);
                /* Best effort: without it QEMU only reads ahead more than it needs. */
                if (hugepage_filter.len && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0)
                        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &hugepage_filter);
                if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0 || getppid() != parent)
                        _exit(127);
                if (dup2(stdin_fd, STDIN_FILENO) < 0 || dup2(stdout_fd, STDOUT_FILENO) < 0 ||
                    dup2(log_fd, STDERR_FILENO) < 0)
                        _exit(127);
                if (netns_fd >= 0 && setns(netns_fd, CLONE_NEWNET) < 0) {
                        static const char msg[] = "drafter: cannot enter the network namespace\n";
                        ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
                        (void)ignored;
                        _exit(127);
                }
                /* QEMU ends up with ~90 descriptors, and the kernel grows a shared descriptor
                 * table only after an RCU grace period (synchronize_rcu, ms): when vm_start
                 * opens its ioeventfds past 64 that wait falls in the migration's downtime.
                 * Grown here, single-threaded, it is free; tables never shrink, and this one
                 * fd is closed again at once. */
                if (dup2(STDERR_FILENO, QEMU_FD_TABLE_MIN - 1) >= 0)
                        close(QEMU_FD_TABLE_MIN - 1);
                /* The toucher's end, where its variable says, without close-on-exec. */
                int keep = 3;
                if (touch_child >= 0 &&
                    (touch_child == QEMU_TOUCH_FD ? fcntl(QEMU_TOUCH_FD, F_SETFD, 0) : dup2(touch_child, QEMU_TOUCH_FD)) >= 0)
                        keep = QEMU_TOUCH_FD + 1;
                close_range(keep, ~0U, 0); /* no other fd of ours (FUSE, sockets, pipes) lives on in QEMU */
                execve(qemu_path, argv, env);
                static const char msg[] = "drafter: cannot execute QEMU\n";
                ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
                (void)ignored;
                _exit(127);
        }
        /* Also here, so the group exists whichever of the two runs first. */
        if (setpgid(pid, pid) < 0 && errno != EACCES && errno != ESRCH)
                log_debug("qemu: setpgid %d: %s", (int)pid, strerror(errno));
        vm->pid = pid;
        if (vm->touch_fd >= 0)
                close(vm->touch_fd); /* an earlier attempt's */
        vm->touch_fd = TAKE_FD(touch_ours);
        return 0;
}

/* ---- lifecycle ---- */

static void vmm_remove_sockets(struct vmm *vm) {
        if (vm->qmp_path)
                unlink(vm->qmp_path);
        for (size_t i = 0; i < vm->port_count; i++)
                if (vm->ports[i].path)
                        unlink(vm->ports[i].path);
}

static void vmm_freep(struct vmm **vm) {
        vmm_free(*vm);
}

/* One attempt: spawn QEMU under vm->accelerator and connect to QMP. On failure the process (if
 * any) is left for the caller to stop or reap. */
static int vmm_launch(struct vmm *vm, const struct vmm_config *cfg, bool incoming, const char *qemu_path,
                      const char *console_log) {
        struct argv_builder a = {0};
        int r = build_argv(vm, cfg, incoming, qemu_path, console_log, &a);
        if (r >= 0) {
                _cleanup_free_ char *line = NULL;
                size_t line_len = 0;
                FILE *f = log_get_level() <= LOG_DEBUG ? open_memstream(&line, &line_len) : NULL;
                if (f) {
                        for (size_t i = 0; i < a.count; i++)
                                fprintf(f, "%s%s", i ? " " : "", a.argv[i]);
                        fclose(f);
                        log_debug("qemu: starting %s", line);
                }
                /* A stale socket from an earlier run would answer nothing or, worse, someone else. */
                vmm_remove_sockets(vm);
                r = vmm_spawn(vm, cfg, a.argv, qemu_path);
        }
        argv_builder_done(&a);
        if (r < 0)
                return r;

        uint64_t t0 = clock_now_ns();
        r = qmp_connect(vm->qmp_path, t0 + VMM_START_TIMEOUT_NS, vmm_check_alive, vm, &vm->qmp);
        /* QEMU may also exit after it opened the socket (a bad option found late). */
        if (r < 0 && !vm->reaped && vmm_wait_exit(vm, 200 * NSEC_PER_MSEC))
                return vmm_exit_error(vm, r, 0, "qemu: starting");
        if (r < 0)
                return r;
        log_debug("qemu: process %d ready for QMP after %.1f ms (%s%s)", (int)vm->pid,
                  (clock_now_ns() - t0) / 1e6, vm->accelerator, incoming ? ", incoming" : "");
        return 0;
}

int vmm_start(const struct vmm_config *cfg, bool incoming, struct vmm **ret_vmm) {
        int r = vmm_config_check(cfg);
        if (r < 0)
                return r;
        /* Forced or automatic; automatic KVM falls back to TCG if QEMU cannot start under it. */
        const char *accelerators[2] = {"tcg", NULL};
        if (cfg->accelerator && strcmp(cfg->accelerator, "kvm") == 0) {
                _cleanup_close_ int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
                if (kvm < 0)
                        return error_set_errno(-errno, "qemu: accelerator kvm: /dev/kvm");
                accelerators[0] = "kvm";
        } else if (!cfg->accelerator && kvm_available()) {
                accelerators[0] = "kvm", accelerators[1] = "tcg";
        }
        if ((r = prepare_memory_file(cfg, incoming)) < 0)
                return r;
        _cleanup_free_ char *qemu_path = NULL;
        if ((r = resolve_binary(cfg->qemu_bin ? cfg->qemu_bin : VMM_DEFAULT_QEMU, &qemu_path)) < 0)
                return r;

        _cleanup_(vmm_freep) struct vmm *vm = calloc(1, sizeof(*vm));
        if (!vm)
                return -ENOMEM;
        vm->pid = -1;
        vm->touch_fd = -1;
        pthread_mutex_init(&vm->touch_lock, NULL);
        vm->incoming = incoming;
        vm->runtime_dir = strdup(cfg->runtime_dir);
        vm->qmp_path = strdup_printf("%s/qmp.sock", cfg->runtime_dir);
        vm->log_path = strdup_printf("%s/qemu.log", cfg->runtime_dir);
        vm->memory_path = strdup(cfg->memory_path);
        if (!vm->runtime_dir || !vm->qmp_path || !vm->log_path || !vm->memory_path)
                return -ENOMEM;
        if ((r = check_socket_path(vm->qmp_path)) < 0)
                return r;
        for (size_t i = 0; i < cfg->port_count; i++) {
                struct vmm_port *p = &vm->ports[vm->port_count++];
                p->name = strdup(cfg->ports[i]);
                p->path = strdup_printf("%s/%s.sock", cfg->runtime_dir, cfg->ports[i]);
                if (!p->name || !p->path)
                        return -ENOMEM;
                if ((r = check_socket_path(p->path)) < 0)
                        return r;
        }
        _cleanup_free_ char *console_log = NULL;
        if (cfg->enable_input && !cfg->enable_output)
                log_debug("qemu: enable_input without enable_output: the console goes to a file, stdin is "
                          "not read");
        if (!cfg->enable_output) {
                console_log = cfg->console_log ? strdup(cfg->console_log)
                                               : strdup_printf("%s/console.log", cfg->runtime_dir);
                if (!console_log)
                        return -ENOMEM;
        }

        for (size_t i = 0; i < ELEMENTSOF(accelerators) && accelerators[i]; i++) {
                vm->accelerator = accelerators[i];
                r = vmm_launch(vm, cfg, incoming, qemu_path, console_log);
                if (r >= 0 || !vm->reaped || i + 1 == ELEMENTSOF(accelerators) || !accelerators[i + 1])
                        break;
                /* QEMU exited under KVM: some hosts' KVM cannot run it (e.g. a paravirtual KVM
                 * that rejects MSRs of -cpu host). The next accelerator gets a clean slate. */
                log_debug("qemu: cannot start under %s (%s); trying %s", vm->accelerator, error_message(),
                          accelerators[i + 1]);
                vm->pid = -1, vm->reaped = false, vm->wait_status = 0;
        }
        /* Ahead of the restore, which runs in a migration's downtime: one QMP round trip less. */
        if (r >= 0 && incoming)
                r = vmm_set_ignore_shared(vm);
        if (r < 0)
                return r;
        *ret_vmm = TAKE_PTR(vm);
        return 0;
}

int vmm_stop(struct vmm *vm) {
        if (!vm)
                return 0;
        /* Often called on an error path: keep the message that explains the error. */
        char saved[1024];
        snprintf(saved, sizeof(saved), "%s", error_message());

        if (vm->pid > 0 && !vm->reaped) {
                if (vm->qmp && vmm_running(vm)) {
                        qmp_set_timeout(vm->qmp, VMM_QUIT_TIMEOUT_NS);
                        if (qmp_execute(vm->qmp, "quit", NULL, NULL) < 0)
                                log_debug("qemu: quit: %s", error_message());
                }
                if (!vmm_wait_exit(vm, VMM_QUIT_TIMEOUT_NS)) {
                        log_debug("qemu: process %d still there after quit: SIGTERM", (int)vm->pid);
                        kill(vm->pid, SIGTERM);
                        if (!vmm_wait_exit(vm, VMM_TERM_TIMEOUT_NS)) {
                                log_debug("qemu: process %d still there after SIGTERM: SIGKILL",
                                          (int)vm->pid);
                                kill(vm->pid, SIGKILL);
                                int status;
                                pid_t w;
                                while ((w = waitpid(vm->pid, &status, 0)) < 0 && errno == EINTR)
                                        ;
                                if (w == vm->pid)
                                        vmm_record_exit(vm, status);
                                else
                                        vm->reaped = true;
                        }
                }
        }
        qmp_free(vm->qmp);
        vm->qmp = NULL;
        vmm_remove_sockets(vm);
        error_set(0, "%s", saved);
        return 0;
}

int vmm_yield_cpu(struct vmm *vm) {
        if (!vm || vm->pid <= 0 || vm->reaped)
                return 0;
        char dir[64];
        snprintf(dir, sizeof(dir), "/proc/%d/task", (int)vm->pid);
        DIR *d = opendir(dir);
        if (!d)
                return error_set_errno(-errno, "qemu: cannot list the threads of process %d", (int)vm->pid);
        struct sched_param sp = {0};
        int r = 0;
        /* Threads made later inherit the policy of the one that makes them. */
        for (struct dirent *e; (e = readdir(d));)
                if (e->d_name[0] != '.' && sched_setscheduler((pid_t)atoi(e->d_name), SCHED_IDLE, &sp) < 0 &&
                    errno != ESRCH && r == 0)
                        r = error_set_errno(-errno, "qemu: cannot lower the priority of thread %s", e->d_name);
        closedir(d);
        return r;
}

void vmm_free(struct vmm *vm) {
        if (!vm)
                return;
        vmm_stop(vm);
        for (size_t i = 0; i < vm->port_count; i++) {
                free(vm->ports[i].name);
                free(vm->ports[i].path);
        }
        free(vm->restore_path);
        free(vm->runtime_dir);
        free(vm->qmp_path);
        free(vm->log_path);
        free(vm->memory_path);
        if (vm->touch_fd >= 0)
                close(vm->touch_fd);
        pthread_mutex_destroy(&vm->touch_lock);
        free(vm);
}

static int wait_run_state_left(struct vmm *vm, const char *transient, const char *what);

/* After a live save: wait until QEMU has left finish-migrate before the VM is commanded again
 * (a `cont` before it would have QEMU mark the running VM postmigrate). */
static int settle(struct vmm *vm) {
        if (!vm->settling)
                return 0;
        vm->settling = false;
        return wait_run_state_left(vm, "finish-migrate", "qemu: after the state save");
}

/* How long a caller waits for the toucher's answer: it only maps pages already in the page
 * cache, so this is a stuck QEMU; the toucher is given up then. */
#define TOUCH_REPLY_TIMEOUT_MS 2000

int vmm_touch_memory(struct vmm *vm, uint64_t offset, uint64_t length, unsigned flags) {
        struct qemu_touch_req q = {.offset = offset, .length = length, .flags = flags};
        bool wait = flags & VMM_TOUCH_WAIT;
        if (wait)
                pthread_mutex_lock(&vm->touch_lock);
        int r = vm->touch_fd < 0 ? -EOPNOTSUPP : 0;
        if (r == 0 && send(vm->touch_fd, &q, sizeof(q), MSG_NOSIGNAL | (wait ? 0 : MSG_DONTWAIT)) < 0)
                r = -errno;
        struct pollfd p = {.fd = vm->touch_fd, .events = POLLIN};
        int ready = 0;
        while (r == 0 && wait && (ready = poll(&p, 1, TOUCH_REPLY_TIMEOUT_MS)) < 0 && errno == EINTR)
                ;
        if (r == 0 && wait) {
                ssize_t n = ready > 0 ? recv(vm->touch_fd, &q, sizeof(q), 0) : -1;
                r = n == (ssize_t)sizeof(q) ? q.result : ready == 0 ? -ETIMEDOUT : n < 0 ? -errno : -EPIPE;
                if (n == (ssize_t)sizeof(q) && q.tid > 0)
                        __atomic_store_n(&vm->touch_tid, (pid_t)q.tid, __ATOMIC_RELAXED);
                if (r == -ETIMEDOUT || r == -EPIPE)
                        shutdown(vm->touch_fd, SHUT_RDWR); /* from now on every call fails at once */
        }
        if (wait)
                pthread_mutex_unlock(&vm->touch_lock);
        return r;
}

void vmm_touch_hurry(struct vmm *vm) {
        pid_t tid = __atomic_load_n(&vm->touch_tid, __ATOMIC_RELAXED);
        struct sched_param sp = {0};
        if (tid > 0 && sched_setscheduler(tid, SCHED_OTHER, &sp) < 0 && errno != ESRCH)
                log_debug("qemu: toucher thread %d: %m", (int)tid);
}

int vmm_pause(struct vmm *vm) {
        int r = settle(vm);
        return r < 0 ? r : vmm_qmp(vm, "stop", NULL, NULL);
}

int vmm_resume(struct vmm *vm) {
        int r = settle(vm);
        return r < 0 ? r : vmm_qmp(vm, "cont", NULL, NULL);
}

int vmm_status(struct vmm *vm, const char **ret_status) {
        json_auto_t *ret = NULL;
        int r = settle(vm);
        if (r < 0)
                return r;
        r = vmm_qmp(vm, "query-status", NULL, &ret);
        if (r < 0)
                return r;
        const char *status = json_string_value(json_object_get(ret, "status"));
        if (!status)
                return error_set(-EPROTO, "qemu: query-status: no status in the answer");
        snprintf(vm->status, sizeof(vm->status), "%s", status);
        *ret_status = vm->status;
        return 0;
}

/* ---- snapshot and restore ---- */

static int vmm_set_ignore_shared(struct vmm *vm) {
        if (vm->ignore_shared)
                return 0;
        /* events: MIGRATION events tell when a save or load ends, so no query-migrate polls cut
         * into QEMU's main loop while it loads (QMP reads commands a byte at a time). */
        json_auto_t *args = json_pack("{s:[{s:s, s:b}, {s:s, s:b}]}", "capabilities", "capability",
                                      "x-ignore-shared", "state", 1, "capability", "events", "state", 1);
        if (!args)
                return -ENOMEM;
        int r = vmm_qmp(vm, "migrate-set-capabilities", args, NULL);
        vm->ignore_shared = r >= 0;
        return r;
}

/* {"channels":[{"channel-type":"main","addr":{"transport":"file","filename":…,"offset":0}}]} */
static json_t *file_channel_args(const char *path) {
        return json_pack("{s:[{s:s, s:{s:s, s:s, s:i}}]}", "channels", "channel-type", "main", "addr",
                         "transport", "file", "filename", path, "offset", 0);
}

/* Forget MIGRATION events of earlier migrations before starting one. */
static void vmm_drop_migration_events(struct vmm *vm) {
        while (qmp_wait_event(vm->qmp, "MIGRATION", 0, NULL) == 0)
                ;
        error_clear();
}

static int vmm_migration_failed(struct vmm *vm, const char *what, uint64_t log_from, const char *status) {
        json_auto_t *info = NULL;
        const char *desc = NULL;
        if (vmm_qmp(vm, "query-migrate", NULL, &info) >= 0)
                desc = json_string_value(json_object_get(info, "error-desc"));
        char tail[VMM_LOG_TAIL_MAX + 64];
        log_tail(vm->log_path, log_from, tail, sizeof(tail));
        return error_set(-EIO, "%s: %s%s%s", what, desc ? desc : status, *tail ? ": " : "", tail);
}

/* Wait for the MIGRATION event that ends the migration (outgoing, or incoming on a -incoming
 * VM). On failure the message is "<what>: <QEMU's error-desc>[: <QEMU's log since log_from>]". */
static int vmm_wait_migration(struct vmm *vm, const char *what, uint64_t log_from) {
        uint64_t deadline = clock_now_ns() + VMM_MIGRATION_TIMEOUT_NS;
        char status[32] = "unknown";
        for (;;) {
                uint64_t now = clock_now_ns();
                json_auto_t *data = NULL;
                int r = now < deadline ? qmp_wait_event(vm->qmp, "MIGRATION", deadline - now, &data) : -ETIMEDOUT;
                if (r == -ETIMEDOUT) {
                        if (vmm_qmp(vm, "migrate_cancel", NULL, NULL) < 0)
                                log_debug("qemu: migrate_cancel: %s", error_message());
                        return error_set(-ETIMEDOUT, "%s: QEMU did not finish within %llu s (status %s)", what,
                                         VMM_MIGRATION_TIMEOUT_NS / NSEC_PER_SEC, status);
                }
                if (r < 0)
                        return vmm_died(vm, r) ? vmm_exit_error(vm, r, 0, what) : error_prefix(r, "%s", what);
                const char *s = json_string_value(json_object_get(data, "status"));
                snprintf(status, sizeof(status), "%s", s ? s : "unknown");
                if (strcmp(status, "completed") == 0)
                        return 0;
                if (strcmp(status, "failed") == 0 || strcmp(status, "cancelled") == 0)
                        return vmm_migration_failed(vm, what, log_from, status);
        }
}

/* "completed" may come a moment before QEMU leaves the migration's run state (`transient`). */
static int wait_run_state_left(struct vmm *vm, const char *transient, const char *what) {
        uint64_t deadline = clock_now_ns() + VMM_START_TIMEOUT_NS;
        for (;;) {
                const char *status;
                int r = vmm_status(vm, &status);
                if (r < 0)
                        return error_prefix(r, "%s", what);
                if (strcmp(status, transient) != 0)
                        return 0;
                if (clock_now_ns() >= deadline)
                        return error_set(-ETIMEDOUT, "%s: done, but QEMU is still in %s", what, transient);
                clock_sleep_ns(VMM_MIGRATION_POLL_NS);
        }
}

static int fsync_path(const char *path, const char *what) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0)
                return error_set_errno(-errno, "%s: cannot sync %s", what, path);
        return 0;
}

/* A migration started while the VM runs stops it itself once nothing is left to send (its RAM is
 * shared, so at once): wait for that (STOP), or for the migration to fail first. */
static int wait_stopped(struct vmm *vm, const char *what, uint64_t log_from) {
        static const char *const events[] = {"STOP", "MIGRATION"};
        uint64_t deadline = clock_now_ns() + VMM_MIGRATION_TIMEOUT_NS;
        for (;;) {
                uint64_t now = clock_now_ns();
                size_t which = 0;
                json_auto_t *data = NULL;
                int r = now < deadline ? qmp_wait_events(vm->qmp, events, 2, deadline - now, &which, &data) : -ETIMEDOUT;
                if (r == -ETIMEDOUT) {
                        if (vmm_qmp(vm, "migrate_cancel", NULL, NULL) < 0)
                                log_debug("qemu: migrate_cancel: %s", error_message());
                        return error_set(-ETIMEDOUT, "%s: QEMU did not stop the VM within %llu s", what,
                                         VMM_MIGRATION_TIMEOUT_NS / NSEC_PER_SEC);
                }
                if (r < 0)
                        return vmm_died(vm, r) ? vmm_exit_error(vm, r, 0, what) : error_prefix(r, "%s", what);
                if (which == 0)
                        return 0;
                const char *st = json_string_value(json_object_get(data, "status"));
                if (st && (strcmp(st, "failed") == 0 || strcmp(st, "cancelled") == 0))
                        return vmm_migration_failed(vm, what, log_from, st);
        }
}

/* `on_stopped` NULL: the VM must be paused. Else it must run, and the migration stops it
 * (on_stopped(ctx) is called on its STOP event, while QEMU writes the device state). */
static int save_state(struct vmm *vm, const char *state_path, bool durable, void (*on_stopped)(void *),
                      void *ctx) {
        bool live = on_stopped != NULL;
        const char *status;
        int r = vmm_status(vm, &status);
        if (r < 0)
                return error_prefix(r, "snapshot");
        if (on_stopped && strcmp(status, "running") != 0) { /* paused already: the plain way */
                on_stopped(ctx);
                on_stopped = NULL;
        }
        if (!on_stopped && strcmp(status, "running") == 0)
                return error_set(-EBUSY, "snapshot: the VM is running: pause it first");
        /* QEMU: "Can't migrate the vm that was paused due to previous migration". Resuming it
         * behind the caller's back would let the guest change what the last snapshot holds. */
        if (strcmp(status, "postmigrate") == 0)
                return error_set(-EALREADY,
                                 "snapshot: the VM has not run since its last snapshot, which still "
                                 "describes it (QEMU cannot snapshot it twice): resume it first");
        if (vm->incoming)
                return error_set(-EINVAL,
                                 "snapshot: the VM is waiting for its state (incoming): restore it first");
        if ((r = vmm_set_ignore_shared(vm)) < 0)
                return error_prefix(r, "snapshot");

        /* QEMU writes a temporary file beside the target; only a complete, synced one is renamed. */
        _cleanup_free_ char *tmp = strdup_printf("%s.tmpXXXXXX", state_path);
        if (!tmp)
                return -ENOMEM;
        _cleanup_close_ int fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "snapshot: cannot create a temporary file for %s", state_path);

        uint64_t t0 = clock_now_ns();
        uint64_t log_from = file_size_or_zero(vm->log_path);
        json_auto_t *args = file_channel_args(tmp);
        char what[1024];
        snprintf(what, sizeof(what), "snapshot: writing state file %s", state_path);
        vmm_drop_migration_events(vm);
        while (on_stopped && qmp_wait_event(vm->qmp, "STOP", 0, NULL) == 0)
                ;
        error_clear();
        if (!args)
                r = -ENOMEM;
        else if ((r = vmm_qmp(vm, "migrate", args, NULL)) < 0)
                error_prefix(r, "snapshot");
        else if (on_stopped && (r = wait_stopped(vm, what, log_from)) >= 0)
                on_stopped(ctx);
        if (r >= 0)
                r = vmm_wait_migration(vm, what, log_from);
        /* A live migration's save (the VM stopped by it) has its state once "completed" came:
         * QEMU leaves finish-migrate a moment later (up to 5 ms here, in the downtime), and only
         * what is next done to the VM needs to wait for that (settle()). */
        if (r >= 0 && live)
                vm->settling = true;
        else if (r >= 0)
                r = wait_run_state_left(vm, "finish-migrate", what);
        if (r >= 0 && ((durable && fsync(fd) < 0) || fchmod(fd, 0644) < 0))
                r = error_set_errno(-errno, "snapshot: cannot sync %s", tmp);
        if (r >= 0 && rename(tmp, state_path) < 0)
                r = error_set_errno(-errno, "snapshot: cannot rename %s to %s", tmp, state_path);
        if (r < 0) {
                unlink(tmp);
                return r;
        }
        if (durable && (r = fs_fsync_parent(state_path)) < 0)
                return error_prefix(r, "snapshot");
        /* The guest's RAM pages are in the page cache of the shared mapping; make them durable
         * (on a FUSE mount this is also what hands them to the storage layer). */
        if (durable && (r = fsync_path(vm->memory_path, "snapshot: memory")) < 0)
                return r;
        log_debug("qemu: snapshot to %s (%" PRIu64 " bytes) in %.1f ms", state_path,
                  file_size_or_zero(state_path), (clock_now_ns() - t0) / 1e6);
        return 0;
}

int vmm_snapshot(struct vmm *vm, const char *state_path) {
        return save_state(vm, state_path, true, NULL, NULL);
}

int vmm_save_state(struct vmm *vm, const char *state_path) {
        return save_state(vm, state_path, false, NULL, NULL);
}

int vmm_stop_and_save_state(struct vmm *vm, const char *state_path, void (*on_stopped)(void *), void *ctx) {
        return save_state(vm, state_path, false, on_stopped, ctx);
}

int vmm_restore_start(struct vmm *vm, const char *state_path) {
        if (!vm->incoming || vm->restoring)
                return error_set(-EINVAL,
                                 "restore: the VM was not started incoming, or has been restored already");
        struct stat st;
        if (stat(state_path, &st) < 0)
                return error_set_errno(-errno, "restore: state file %s", state_path);
        if (!S_ISREG(st.st_mode))
                return error_set(-EINVAL, "restore: state file %s is not a regular file", state_path);
        if (st.st_size == 0)
                return error_set(-EINVAL, "restore: state file %s is empty", state_path);

        int r = vmm_set_ignore_shared(vm);
        if (r < 0)
                return error_prefix(r, "restore");
        free(vm->restore_path);
        if (!(vm->restore_path = strdup_printf("file %s", state_path)))
                return -ENOMEM;
        vm->restore_t0 = clock_now_ns();
        vm->restore_log_from = file_size_or_zero(vm->log_path);
        vm->restore_bytes = (uint64_t)st.st_size;
        json_auto_t *args = file_channel_args(state_path);
        /* Without exit-on-error=false a failed load makes QEMU exit, and query-migrate could
         * not tell us why. */
        if (!args || json_object_set_new(args, "exit-on-error", json_false()) < 0)
                return -ENOMEM;
        vmm_drop_migration_events(vm);
        if ((r = vmm_qmp(vm, "migrate-incoming", args, NULL)) < 0)
                return error_prefix(r, "restore: state file %s", state_path);
        vm->restoring = true;
        return 0;
}

/* {"channels":[{"channel-type":"main","addr":{"transport":"socket","type":"unix","path":…}}]} */
static json_t *unix_channel_args(const char *path) {
        return json_pack("{s:[{s:s, s:{s:s, s:s, s:s}}]}", "channels", "channel-type", "main", "addr", "transport",
                         "socket", "type", "unix", "path", path);
}

int vmm_restore_stream_start(struct vmm *vm, int *ret_fd) {
        if (!vm->incoming || vm->restoring)
                return error_set(-EINVAL,
                                 "restore: the VM was not started incoming, or has been restored already");
        _cleanup_free_ char *path = strdup_printf("%s/state.sock", vm->runtime_dir);
        if (!path)
                return -ENOMEM;
        int r = check_socket_path(path);
        if (r < 0 || (r = vmm_set_ignore_shared(vm)) < 0)
                return error_prefix(r, "restore");
        unlink(path);
        json_auto_t *args = unix_channel_args(path);
        if (!args || json_object_set_new(args, "exit-on-error", json_false()) < 0)
                return -ENOMEM;
        vmm_drop_migration_events(vm);
        vm->restore_log_from = file_size_or_zero(vm->log_path);
        if ((r = vmm_qmp(vm, "migrate-incoming", args, NULL)) < 0)
                return error_prefix(r, "restore: state stream %s", path);
        /* QEMU listens once the command has returned; its load reads as the bytes come. */
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
        _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                return error_set_errno(-errno, "restore: cannot connect to QEMU's state stream %s", path);
        unlink(path); /* connected: the name has done its work */
        free(vm->restore_path);
        if (!(vm->restore_path = strdup_printf("stream %s", path)))
                return -ENOMEM;
        vm->restore_t0 = clock_now_ns();
        vm->restore_bytes = 0;
        vm->restoring = true;
        *ret_fd = TAKE_FD(fd);
        return 0;
}

int vmm_restore_autostart(struct vmm *vm) {
        if (!vm->restoring)
                return error_set(-EINVAL, "restore: no load was started");
        /* While QEMU is "inmigrate", `cont` only asks it to run the VM once the load is done. */
        int r = vmm_resume(vm);
        const char *status;
        if (r >= 0 && (r = vmm_status(vm, &status)) >= 0 && strcmp(status, "inmigrate") != 0)
                r = error_set(-EALREADY, "restore: the load had ended (QEMU is %s) before the VM was told to start",
                              status);
        return r < 0 ? error_prefix(r, "restore: autostart") : 0;
}

int vmm_restore_wait(struct vmm *vm) {
        if (!vm->restoring)
                return error_set(-EINVAL, "restore: no load was started");
        char what[1024];
        snprintf(what, sizeof(what), "restore: cannot load state %s", vm->restore_path);
        int r = vmm_wait_migration(vm, what, vm->restore_log_from);
        if (r < 0)
                return r;
        snprintf(what, sizeof(what), "restore: state %s", vm->restore_path);
        if ((r = wait_run_state_left(vm, "inmigrate", what)) < 0)
                return r;
        vm->incoming = vm->restoring = false;
        log_debug("qemu: restored %s (%" PRIu64 " bytes) in %.1f ms", vm->restore_path, vm->restore_bytes,
                  (clock_now_ns() - vm->restore_t0) / 1e6);
        return 0;
}

int vmm_restore(struct vmm *vm, const char *state_path) {
        int r = vmm_restore_start(vm, state_path);
        return r < 0 ? r : vmm_restore_wait(vm);
}

/* ---- accessors ---- */

pid_t vmm_pid(const struct vmm *vm) {
        return vm->pid;
}

uint64_t vmm_resumed_ns(const struct vmm *vm) {
        return vm ? qmp_event_seen_ns(vm->qmp, "RESUME") : 0;
}

const char *vmm_port_path(const struct vmm *vm, const char *name) {
        if (!vm || !name)
                return NULL;
        for (size_t i = 0; i < vm->port_count; i++)
                if (strcmp(vm->ports[i].name, name) == 0)
                        return vm->ports[i].path;
        return NULL;
}

const char *vmm_accelerator(const struct vmm *vm) {
        return vm->accelerator;
}
