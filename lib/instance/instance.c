/* instance.c — packages made from blueprints, and VMs run from packages (see instance.h). */
#include "drafter/instance.h"
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/cow_device.h"
#include "drafter/dirty_tracker.h"
#include "drafter/error.h"
#include "drafter/fs.h"
#include "drafter/fuse_export.h"
#include "drafter/guestlink.h"
#include "drafter/kernel_bundle.h"
#include "drafter/log.h"
#include "drafter/migrate.h"
#include "drafter/storage.h"
#include "drafter/tls.h"
#include "drafter/transport.h"
#include "drafter/vm_config.h"
#include "drafter/vmm.h"
#include "drafter/volatility_monitor.h"
#include "drafter/s3_sync.h"
#include "drafter/waiting_cache.h"

#include "page_warmer.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define CONFIG_DEVICE_BYTES 4096u
#define AGENT_TRIES 3
/* After a hand-over, before the source tears its VM down (instance_migrate_out). */
#define SOURCE_TEARDOWN_GRACE_NS (250 * NSEC_PER_MSEC)

static const char *const required[] = {"state", "memory", "kernel", "disk", "config"};

static int check_required(const struct device_list *devices, const char *tool) {
        for (size_t i = 0; i < sizeof(required) / sizeof(required[0]); i++)
                if (!device_list_find(devices, required[i]))
                        return error_set(-EINVAL, "devices: %s needs a \"%s\" device", tool, required[i]);
        return 0;
}

/* Devices that become disks, in guest order: disk (vda), oci (vdb), then any others as listed. */
static size_t drive_order(const struct device_list *devices, const struct device_config **ret) {
        size_t n = 0;
        const struct device_config *d = device_list_find(devices, "disk");
        if (d)
                ret[n++] = d;
        if ((d = device_list_find(devices, "oci")))
                ret[n++] = d;
        for (size_t i = 0; i < devices->count && n < VMM_MAX_DRIVES; i++) {
                const char *name = devices->devices[i].name;
                bool special = strcmp(name, "disk") == 0 || strcmp(name, "oci") == 0;
                for (size_t k = 0; k < sizeof(required) / sizeof(required[0]); k++)
                        special |= strcmp(name, required[k]) == 0;
                if (!special)
                        ret[n++] = &devices->devices[i];
        }
        return n;
}

static int make_runtime_dir(const char *base, const char *kind, char *out, size_t size) {
        snprintf(out, size, "%s/%s-XXXXXX", base && *base ? base : "out/vms", kind);
        int r = fs_mkdir_parents(out);
        if (r < 0)
                return r;
        if (!mkdtemp(out))
                return error_set_errno(-errno, "cannot create a runtime directory in %s", base);
        return 0;
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
        (void)st, (void)flag, (void)ftw;
        remove(path);
        return 0;
}

static void remove_runtime_dir(const char *dir) {
        if (*dir)
                nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
}

/* config.json, padded with spaces to the config device's size. */
static char *config_padded(const struct vm_config *c, size_t size) {
        _cleanup_free_ char *json = vm_config_format(c);
        if (!json || strlen(json) > size)
                return NULL;
        char *out = malloc(size);
        if (!out)
                return NULL;
        memset(out, ' ', size);
        memcpy(out, json, strlen(json));
        out[size - 1] = '\n';
        return out;
}

/* The state device keeps room for a later, larger snapshot of the same VM. */
static uint64_t state_capacity(uint64_t used) {
        uint64_t cap = MAX(used * 2, (uint64_t)8 << 20);
        return (cap + 65535) & ~(uint64_t)65535;
}

/* A file QEMU has just written, mapped read-only: its pages are in the page cache, where a read
 * into a fresh buffer would fault that buffer in page by page (1.1-1.7 ms for a 385 KB state
 * here, in a live migration's downtime). Empty files are an error. */
static int map_file(const char *path, void **ret_data, size_t *ret_len) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0)
                return error_set_errno(-errno, "%s: cannot read", path);
        if (st.st_size == 0)
                return error_set(-EIO, "%s: empty", path);
        void *data = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (data == MAP_FAILED)
                return error_set_errno(-errno, "%s: cannot map", path);
        *ret_data = data;
        *ret_len = (size_t)st.st_size;
        return 0;
}

static int call_agent(const char *port, const char *function, const struct instance_options *o) {
        struct guestlink_agent *a;
        int r = guestlink_agent_connect(port, o->agent_timeout_ns, &a);
        if (r >= 0) {
                r = guestlink_agent_call(a, function, o->agent_timeout_ns, AGENT_TRIES);
                guestlink_agent_free(a);
        }
        return r;
}

/* ---- snapshotter ---- */

struct output {
        const struct device_config *cfg;
        char tmp[4096];
        bool made;
};

/* A thread that, once the stop descriptor is readable (SIGINT/SIGTERM), kills the snapshot's
 * QEMU, so whatever the snapshotter waits for (liveness, the agent, the state) fails at once. */
struct stop_watch {
        int fd;
        pid_t pid; /* under lock: 0 once QEMU is reaped (its pid may be reused) */
        pthread_mutex_t lock;
        int pipe[2];
        pthread_t thread;
        bool running;
        atomic_bool interrupted;
};

static void *stop_watch_run(void *arg) {
        struct stop_watch *w = arg;
        struct pollfd p[2] = {{.fd = w->fd, .events = POLLIN}, {.fd = w->pipe[0], .events = POLLIN}};
        while (poll(p, 2, -1) < 0 && errno == EINTR)
                ;
        if (p[0].revents & POLLIN) {
                atomic_store(&w->interrupted, true);
                log_info("Interrupted: stopping the snapshot (no package will be written)");
                pthread_mutex_lock(&w->lock);
                if (w->pid > 0)
                        kill(w->pid, SIGKILL);
                pthread_mutex_unlock(&w->lock);
        }
        return NULL;
}

static int stop_watch_start(struct stop_watch *w) {
        if (w->fd < 0)
                return 0;
        if (pipe2(w->pipe, O_CLOEXEC) < 0)
                return error_set_errno(-errno, "pipe");
        if (pthread_create(&w->thread, NULL, stop_watch_run, w) != 0) {
                close(w->pipe[0]);
                close(w->pipe[1]);
                return error_set(-EAGAIN, "cannot start a thread");
        }
        w->running = true;
        return 0;
}

/* Stop watching; true if the stop came. */
static bool stop_watch_end(struct stop_watch *w) {
        if (w->running) {
                char c = 0;
                if (write(w->pipe[1], &c, 1) < 0)
                        log_debug("stop watch: %m");
                pthread_join(w->thread, NULL);
                close(w->pipe[0]);
                close(w->pipe[1]);
                w->running = false;
        }
        return atomic_load(&w->interrupted);
}

int instance_snapshot(const struct device_list *devices, const struct instance_options *o) {
        int r = check_required(devices, "the snapshotter");
        if (r < 0)
                return r;
        const struct device_config *kernel = device_list_find(devices, "kernel"), *disk = device_list_find(devices, "disk");
        if (!*kernel->input || !*disk->input)
                return error_set(-EINVAL, "devices: the snapshotter needs an input for \"%s\"", *kernel->input ? "disk" : "kernel");
        if (o->memory_bytes == 0 || o->memory_bytes % (2u << 20) != 0)
                return error_set(-EINVAL, "memory size must be a positive multiple of 2 MiB");
        if ((r = device_list_check_inputs(devices, DEVICE_SCHEMA_SNAPSHOTTER)) < 0)
                return r;

        char runtime[4096] = "";
        _cleanup_free_ struct output *out = calloc(devices->count, sizeof(*out));
        struct vmm *vm = NULL;
        char *kernel_path = NULL, *initrd_path = NULL;
        if (!out)
                return -ENOMEM;
        if ((r = make_runtime_dir(o->runtime_base, "snapshot", runtime, sizeof(runtime))) < 0)
                return r;

        /* Every output under a temporary name beside it; the VM boots on the copies, so the
         * disks hold exactly what the memory snapshot expects. */
        for (size_t i = 0; i < devices->count && r >= 0; i++) {
                const struct device_config *c = &devices->devices[i];
                out[i].cfg = c;
                snprintf(out[i].tmp, sizeof(out[i].tmp), "%s.drafter-tmp-%d", c->output, (int)getpid());
                if ((r = fs_mkdir_parents(c->output)) < 0)
                        break;
                if (c->input && *c->input) {
                        log_info("Copying %s to %s", c->input, c->output);
                        r = fs_copy_file(c->input, out[i].tmp, 0);
                } else if (strcmp(c->name, "memory") == 0) {
                        int fd = open(out[i].tmp, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
                        if (fd < 0 || ftruncate(fd, (off_t)o->memory_bytes) < 0)
                                r = error_set_errno(-errno, "memory: cannot create %s", out[i].tmp);
                        if (fd >= 0)
                                close(fd);
                } else if (strcmp(c->name, "state") != 0 && strcmp(c->name, "config") != 0) {
                        r = error_set(-EINVAL, "devices: device \"%s\" has no input", c->name);
                }
                out[i].made = r >= 0;
        }
#define TMP(cfgp) ((const char *)out[(size_t)((cfgp) - devices->devices)].tmp)
        if (r >= 0)
                r = kernel_bundle_extract(TMP(kernel), runtime, &kernel_path, &initrd_path);

        struct vm_config vc = {.cpu_count = o->cpu_count, .memory_bytes = o->memory_bytes,
                               .liveness_port = o->liveness_port, .agent_port = o->agent_port};
        struct vmm_config mc = {.qemu_bin = o->qemu_bin,
                                .runtime_dir = runtime,
                                .kernel = kernel_path,
                                .initrd = initrd_path,
                                .boot_args = o->boot_args,
                                .memory_path = TMP(device_list_find(devices, "memory")),
                                .memory_bytes = o->memory_bytes,
                                .cpus = o->cpu_count,
                                .cpu_model = o->cpu_model,
                                .ports = {GUESTLINK_LIVENESS_PORT_NAME, GUESTLINK_AGENT_PORT_NAME},
                                .port_count = 2,
                                .enable_output = o->enable_output,
                                .enable_input = o->enable_input};
        if (o->netns && *o->netns) {
                snprintf(vc.tap, sizeof(vc.tap), "%s", o->tap ? o->tap : "tap0");
                snprintf(vc.mac, sizeof(vc.mac), "%s", o->mac ? o->mac : "02:0e:d9:fd:68:3d");
                mc.tap = vc.tap;
                mc.mac = vc.mac;
                mc.netns = o->netns;
        }
        if (r >= 0 && o->serial_ports && (r = vm_config_set_serial_ports(&vc, o->serial_ports)) >= 0)
                for (int i = 0; i < vc.serial_port_count; i++)
                        mc.ports[mc.port_count++] = vc.serial_ports[i];
        const struct device_config *drives[VMM_MAX_DRIVES];
        mc.drive_count = drive_order(devices, drives);
        for (size_t i = 0; i < mc.drive_count; i++) {
                mc.drives[i] = (struct vmm_drive){drives[i]->name, TMP(drives[i]), false};
                snprintf(vc.drives[vc.drive_count++], sizeof(vc.drives[0]), "%s", drives[i]->name);
        }
        uint64_t t0 = clock_now_ns();
        if (r >= 0) {
                log_info("Booting the blueprint");
                r = vmm_start(&mc, false, &vm);
        }
        struct stop_watch watch = {.fd = o->stop_fd > 0 ? o->stop_fd : -1, .pid = vm ? vmm_pid(vm) : 0,
                                   .lock = PTHREAD_MUTEX_INITIALIZER};
        if (r >= 0)
                r = stop_watch_start(&watch);
        if (r >= 0 && (r = guestlink_wait_liveness(vmm_port_path(vm, GUESTLINK_LIVENESS_PORT_NAME),
                                                   o->liveness_timeout_ns)) >= 0)
                log_info("The guest is up after %.0f ms", (clock_now_ns() - t0) / 1e6);
        if (r >= 0 && (r = call_agent(vmm_port_path(vm, GUESTLINK_AGENT_PORT_NAME), "BeforeSuspend", o)) >= 0)
                log_info("The guest's agent answered BeforeSuspend %.0f ms after QEMU started", (clock_now_ns() - t0) / 1e6);
        char raw[4200];
        snprintf(raw, sizeof(raw), "%s/state.raw", runtime);
        if (r >= 0 && (r = vmm_pause(vm)) >= 0)
                r = vmm_snapshot(vm, raw);
        if (r >= 0) {
                snprintf(vc.backend, sizeof(vc.backend), "qemu");
                snprintf(vc.accelerator, sizeof(vc.accelerator), "%s", vmm_accelerator(vm));
                snprintf(vc.machine, sizeof(vc.machine), "q35");
                snprintf(vc.cpu_model, sizeof(vc.cpu_model), "%s",
                         o->cpu_model ? o->cpu_model : strcmp(vc.accelerator, "kvm") == 0 ? "host" : "max");
                snprintf(vc.boot_args, sizeof(vc.boot_args), "%s", o->boot_args);
                pthread_mutex_lock(&watch.lock);
                watch.pid = 0; /* vmm_stop reaps it */
                pthread_mutex_unlock(&watch.lock);
                r = vmm_stop(vm);
        }
        /* The state device: the stream, zero-padded to leave room for later snapshots. */
        const struct device_config *state = device_list_find(devices, "state");
        if (r >= 0) {
                struct stat st;
                if (stat(raw, &st) < 0)
                        r = error_set_errno(-errno, "%s", raw);
                else {
                        vc.state_bytes = (uint64_t)st.st_size;
                        r = fs_copy_file(raw, TMP(state), state_capacity(vc.state_bytes));
                }
        }
        if (r >= 0) {
                _cleanup_free_ char *json = config_padded(&vc, CONFIG_DEVICE_BYTES);
                int fd = json ? open(TMP(device_list_find(devices, "config")), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)
                              : -1;
                if (!json || fd < 0 || write(fd, json, CONFIG_DEVICE_BYTES) != CONFIG_DEVICE_BYTES || fsync(fd) < 0)
                        r = error_set_errno(json ? -errno : -ENOMEM, "config: cannot write %s",
                                            device_list_find(devices, "config")->output);
                if (fd >= 0)
                        close(fd);
        }
        if (stop_watch_end(&watch) && r >= 0)
                r = -EINTR;
        if (r == -EINTR || (r < 0 && watch.interrupted))
                r = error_set(-EINTR, "interrupted: the package was not written");
        /* Only now do the outputs appear, all of them. */
        for (size_t i = 0; i < devices->count && r >= 0; i++) {
                if (rename(out[i].tmp, out[i].cfg->output) < 0)
                        r = error_set_errno(-errno, "cannot rename %s to %s", out[i].tmp, out[i].cfg->output);
                else
                        out[i].made = false, r = fs_fsync_parent(out[i].cfg->output);
        }
        if (r >= 0)
                log_info("Wrote the package (state %" PRIu64 " bytes, memory %" PRIu64 " MiB)", vc.state_bytes,
                         o->memory_bytes >> 20);
#undef TMP
        vmm_free(vm);
        for (size_t i = 0; i < devices->count; i++)
                if (out[i].made || (r < 0 && out[i].cfg))
                        unlink(out[i].tmp);
        free(kernel_path);
        free(initrd_path);
        remove_runtime_dir(runtime);
        return r;
}

/* ---- peer ---- */

struct instance {
        const struct device_list *devices;
        struct instance_options options;
        /* Per device, in --devices order: the top of its stack (dirty tracker over volatility
         * monitor over storage or the migration's waiting cache), which owns what is below. */
        struct block_device **devs;
        struct volatility_monitor **vms;
        const struct bitmap **only; /* sharedbase: the overlay's presence bitmap */
        struct s3_device **s3;           /* kept in S3, or NULL */
        struct block_device **s3track;   /* the S3 sync's dirty tracker */
        bool s3_started;
        struct fuse_export *fx;
        bool lazy; /* received from a lazy source (drafter-registry): its memory faults in over the link */
        struct vmm *vm;
        struct migrate_destination *dest;
        struct vm_config cfg;
        size_t state, memory, config;
        char runtime[4096];
        char *kernel_path, *initrd_path;
        uint64_t t0;
        double resume_ms;
        /* Where a resume's time went, in ms from the start of instance_resume. */
        double t_prepared, t_qemu, t_handover, t_restored, t_running, t_answered;
        /* The same moments (and a migration's), as CLOCK_MONOTONIC ns, for --json-summary: a
         * benchmark lines them up with what it saw of the guest. A repeated event keeps its last time. */
        struct {
                const char *name;
                uint64_t at_ns;
        } events[16];
        size_t event_count;
        /* Receiving: the memory file kept in the page cache until the VM runs (page_warmer.h);
         * set once the mount is up, freed just before the VM runs; under `lock`. */
        struct page_warmer *warmer;
        size_t warm_index; /* the memory device in the migration's table */
        /* Receiving, under `lock`: the source said the state and config devices are final (EVENT
         * FINAL); the state load started ahead of the hand-over. */
        bool state_final, config_final, restore_started;
        /* The state goes to QEMU as a stream (vmm_restore_stream_start) from a thread that holds
         * its last byte back until the VM may run (feed_release): QEMU loads all the rest ahead
         * of the hand-over and starts the VM itself the moment the byte comes. Under `lock`. */
        struct {
                pthread_t thread;
                bool running, release, abort;
                int fd, r;
                char *buf;
                size_t len;
                char why[512];
                /* prepare_restore(): QEMU waits for the stream on this end (-1: not yet).
                 * reserve_state_buffer(): the state will be read into `spare` (NULL: none),
                 * faulted in ahead of the downtime. */
                int ready_fd;
                char *spare;
                size_t spare_cap;
        } feed;
        pthread_mutex_t lock;
        pthread_cond_t changed;
        bool authority; /* a migration gave us the devices */
};

static void mark_at(struct instance *inst, const char *name, uint64_t at_ns) {
        size_t i = 0;
        while (i < inst->event_count && strcmp(inst->events[i].name, name) != 0)
                i++;
        if (i == sizeof(inst->events) / sizeof(inst->events[0]))
                return;
        inst->events[i].name = name;
        inst->events[i].at_ns = at_ns;
        if (i == inst->event_count)
                inst->event_count++;
}

static void mark(struct instance *inst, const char *name) {
        mark_at(inst, name, clock_now_ns());
}

/* When event `name` was marked (CLOCK_MONOTONIC ns), or 0. */
static uint64_t marked_at(const struct instance *inst, const char *name) {
        for (size_t i = 0; i < inst->event_count; i++)
                if (strcmp(inst->events[i].name, name) == 0)
                        return inst->events[i].at_ns;
        return 0;
}

static size_t index_of(const struct device_list *devices, const char *name) {
        return (size_t)(device_list_find(devices, name) - devices->devices);
}

#define MS_SINCE(t) ((clock_now_ns() - (t)) / 1e6)

static struct instance *instance_new(const struct device_list *devices, const struct instance_options *o) {
        struct instance *inst = calloc(1, sizeof(*inst));
        if (!inst)
                return NULL;
        inst->devs = calloc(devices->count, sizeof(*inst->devs));
        inst->vms = calloc(devices->count, sizeof(*inst->vms));
        inst->only = calloc(devices->count, sizeof(*inst->only));
        inst->s3 = calloc(devices->count, sizeof(*inst->s3));
        inst->s3track = calloc(devices->count, sizeof(*inst->s3track));
        if (!inst->devs || !inst->vms || !inst->only || !inst->s3 || !inst->s3track) {
                free(inst->s3);
                free(inst->s3track);
                free(inst->devs);
                free(inst->vms);
                free(inst->only);
                free(inst);
                return NULL;
        }
        inst->devices = devices;
        inst->options = *o;
        inst->t0 = clock_now_ns();
        inst->state = index_of(devices, "state");
        inst->memory = index_of(devices, "memory");
        inst->config = index_of(devices, "config");
        inst->feed.ready_fd = -1;
        pthread_mutex_init(&inst->lock, NULL);
        pthread_cond_init(&inst->changed, NULL);
        return inst;
}

/* Dirty tracking (for a later migration out) on top of device i's bottom; takes the bottom. */
static int stack_device(struct instance *inst, size_t i, struct block_device *bottom) {
        const struct device_config *c = &inst->devices->devices[i];
        struct block_device *vdev;
        if (inst->s3[i]) {
                int r = dirty_tracker_wrap(bottom, DIRTY_TRACK_ALL, &inst->s3track[i]);
                if (r < 0) {
                        block_device_close(bottom);
                        return r;
                }
                bottom = inst->s3track[i];
        }
        int r = volatility_monitor_new(block_device_block_count(bottom), (uint64_t)c->expiry_ns, clock_now_ns(),
                                       &inst->vms[i]);
        if (r < 0 || (r = volatility_device_wrap(bottom, inst->vms[i], &vdev)) < 0) {
                block_device_close(bottom);
                return r < 0 ? r : -ENOMEM;
        }
        if ((r = dirty_tracker_wrap(vdev, DIRTY_TRACK_AFTER_READ, &inst->devs[i])) < 0) {
                block_device_close(vdev);
                return r;
        }
        return 0;
}

/* config.json from its device, checked against the other devices. */
static int load_config(struct instance *inst) {
        const struct device_list *devices = inst->devices;
        struct block_device *cdev = inst->devs[inst->config];
        if (cdev->size > (1u << 20))
                return error_set(-EINVAL, "config: %" PRIu64 " bytes is not a config.json", cdev->size);
        _cleanup_free_ char *text = malloc(cdev->size + 1);
        if (!text)
                return -ENOMEM;
        int r = block_device_read_at(cdev, text, cdev->size, 0);
        if (r < 0 || (r = vm_config_parse(text, cdev->size, devices->devices[inst->config].base, &inst->cfg)) < 0)
                return r;
        /* What made the snapshot decides what resumes it. */
        if (strcmp(inst->cfg.backend, "qemu") != 0)
                return error_set(-EINVAL, "config: the snapshot was made by %s; this drafter-peer runs QEMU",
                                 inst->cfg.backend);
        if (strcmp(inst->cfg.accelerator, "tcg") != 0 && strcmp(inst->cfg.accelerator, "kvm") != 0)
                return error_set(-EINVAL, "config: unknown accelerator \"%s\"", inst->cfg.accelerator);
        if (inst->devs[inst->memory]->size != inst->cfg.memory_bytes)
                return error_set(-EINVAL, "memory: %" PRIu64 " bytes, config.json says %" PRIu64,
                                 inst->devs[inst->memory]->size, inst->cfg.memory_bytes);
        if (inst->cfg.state_bytes > inst->devs[inst->state]->size)
                return error_set(-EINVAL, "state: %" PRIu64 " bytes, config.json says the snapshot has %" PRIu64,
                                 inst->devs[inst->state]->size, inst->cfg.state_bytes);
        for (int i = 0; i < inst->cfg.drive_count; i++)
                if (!device_list_find(devices, inst->cfg.drives[i]))
                        return error_set(-EINVAL, "devices: the snapshot has a disk \"%s\", --devices does not",
                                         inst->cfg.drives[i]);
        return 0;
}

/* The runtime directory and the devices as files (what QEMU maps and opens). */
static int export_devices(struct instance *inst) {
        const struct device_list *devices = inst->devices;
        int r = make_runtime_dir(inst->options.runtime_base, "qemu", inst->runtime, sizeof(inst->runtime));
        if (r < 0)
                return r;
        _cleanup_free_ struct fuse_export_device *files = calloc(devices->count, sizeof(*files));
        if (!files)
                return -ENOMEM;
        for (size_t i = 0; i < devices->count; i++)
                files[i] = (struct fuse_export_device){devices->devices[i].name, inst->devs[i], false};
        char mnt[4200];
        snprintf(mnt, sizeof(mnt), "%s/mnt", inst->runtime);
        /* A live migration's destination: its state load and its first steps faulted 1 MiB
         * windows in, waiting for final blocks still on their way (docs/design.md). */
        unsigned flags = inst->lazy ? FUSE_EXPORT_NO_READAHEAD : inst->dest ? FUSE_EXPORT_BLOCK_READAHEAD : 0;
        flags |= FUSE_EXPORT_UNTHROTTLED;
        return fuse_export_start_flags(mnt, files, devices->count, flags, &inst->fx);
}

/* The kernel out of its device, QEMU waiting for its state. */
static int start_vmm(struct instance *inst) {
        const struct device_list *devices = inst->devices;
        const struct instance_options *o = &inst->options;
        int r;
        if ((r = kernel_bundle_extract(fuse_export_path(inst->fx, index_of(devices, "kernel")), inst->runtime,
                                       &inst->kernel_path, &inst->initrd_path)) < 0)
                return r;
        struct vmm_config mc = {.qemu_bin = o->qemu_bin,
                                .runtime_dir = inst->runtime,
                                .kernel = inst->kernel_path,
                                .initrd = inst->initrd_path,
                                .boot_args = inst->cfg.boot_args,
                                .memory_path = fuse_export_path(inst->fx, inst->memory),
                                .memory_bytes = inst->cfg.memory_bytes,
                                .cpus = (int)inst->cfg.cpu_count,
                                .cpu_model = inst->cfg.cpu_model,
                                /* The state of one accelerator does not load under the other. */
                                .accelerator = inst->cfg.accelerator,
                                .ports = {GUESTLINK_LIVENESS_PORT_NAME, GUESTLINK_AGENT_PORT_NAME},
                                .port_count = 2,
                                .enable_output = o->enable_output,
                                .enable_input = o->enable_input};
        for (int i = 0; i < inst->cfg.serial_port_count; i++)
                mc.ports[mc.port_count++] = inst->cfg.serial_ports[i];
        mc.netns = o->netns && *o->netns ? o->netns : NULL;
        if (inst->cfg.tap[0] && !mc.netns)
                return error_set(-EINVAL, "the package's VM has a network interface (tap %s): run it with --netns "
                                 "(a namespace of drafter-nat)", inst->cfg.tap);
        if (inst->cfg.tap[0]) {
                mc.tap = inst->cfg.tap;
                mc.mac = inst->cfg.mac;
        }
        for (int i = 0; i < inst->cfg.drive_count; i++)
                mc.drives[mc.drive_count++] = (struct vmm_drive){
                        inst->cfg.drives[i], fuse_export_path(inst->fx, index_of(devices, inst->cfg.drives[i])), false};
        inst->t_prepared = MS_SINCE(inst->t0);
        r = vmm_start(&mc, true, &inst->vm);
        inst->t_qemu = MS_SINCE(inst->t0);
        for (int i = 0; r >= 0 && i < inst->cfg.serial_port_count; i++)
                log_info("Serial port %s: %s", inst->cfg.serial_ports[i], vmm_port_path(inst->vm, inst->cfg.serial_ports[i]));
        return r;
}

/* True if there was one (and with it, perhaps, QEMU's toucher at work). */
static bool stop_warmer(struct instance *inst) {
        pthread_mutex_lock(&inst->lock);
        bool had = inst->warmer != NULL;
        page_warmer_free(inst->warmer);
        inst->warmer = NULL;
        pthread_mutex_unlock(&inst->lock);
        return had;
}

/* The warmer's toucher: QEMU maps what the warmer cached, when a CPU is idle. */
static int touch_cached(void *ctx, uint64_t offset, uint64_t length) {
        struct instance *inst = ctx;
        return vmm_touch_memory(inst->vm, offset, length, VMM_TOUCH_WAIT | VMM_TOUCH_IDLE);
}

static void touch_hurry(void *ctx) {
        struct instance *inst = ctx;
        vmm_touch_hurry(inst->vm);
}

static int send_all(int fd, const char *buf, size_t len) {
        while (len > 0) {
                ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n <= 0)
                        return -errno;
                buf += n;
                len -= (size_t)n;
        }
        return 0;
}

static void *feed_thread(void *arg) {
        struct instance *inst = arg;
        int r = send_all(inst->feed.fd, inst->feed.buf, inst->feed.len - 1);
        pthread_mutex_lock(&inst->lock);
        while (r >= 0 && !inst->feed.release && !inst->feed.abort)
                pthread_cond_wait(&inst->changed, &inst->lock);
        bool abort = inst->feed.abort;
        pthread_mutex_unlock(&inst->lock);
        if (r >= 0 && !abort)
                r = send_all(inst->feed.fd, inst->feed.buf + inst->feed.len - 1, 1);
        pthread_mutex_lock(&inst->lock);
        close(inst->feed.fd);
        inst->feed.fd = -1;
        inst->feed.r = r;
        if (r < 0)
                snprintf(inst->feed.why, sizeof(inst->feed.why), "restore: writing the state to QEMU: %s", strerror(-r));
        pthread_mutex_unlock(&inst->lock);
        return NULL;
}

/* Let the state's last byte go (or, with `abort`, none: the load fails) and wait for the thread. */
static int end_feed(struct instance *inst, bool abort) {
        pthread_mutex_lock(&inst->lock);
        if (inst->feed.ready_fd >= 0) { /* prepared, never fed: the load fails */
                close(inst->feed.ready_fd);
                inst->feed.ready_fd = -1;
        }
        bool running = inst->feed.running;
        inst->feed.running = false;
        inst->feed.release = !abort;
        inst->feed.abort = abort;
        /* A QEMU that reads no more (its load waits for a block that will never come) must not
         * hold the thread in send(). */
        if (abort && running && inst->feed.fd >= 0)
                shutdown(inst->feed.fd, SHUT_RDWR);
        pthread_cond_broadcast(&inst->changed);
        pthread_mutex_unlock(&inst->lock);
        if (!running)
                return 0;
        pthread_join(inst->feed.thread, NULL);
        free(inst->feed.buf);
        inst->feed.buf = NULL;
        return inst->feed.r < 0 ? error_set(inst->feed.r, "%s", inst->feed.why) : 0;
}

/* QEMU waits for the state on a stream and is told to start the VM once the load is done: the
 * two QMP round trips, ahead of the state (a receiving peer does this while the blocks stream
 * in, off the downtime). */
static int prepare_restore(struct instance *inst) {
        if (inst->feed.ready_fd >= 0)
                return 0;
        int fd = -1, r;
        if ((r = vmm_restore_stream_start(inst->vm, &fd)) < 0)
                return r;
        if ((r = vmm_restore_autostart(inst->vm)) < 0) {
                close(fd);
                return r;
        }
        pthread_mutex_lock(&inst->lock);
        inst->feed.ready_fd = fd;
        pthread_mutex_unlock(&inst->lock);
        return 0;
}

/* A receiving peer, ahead of the state: room for the state the source had when it sent
 * config.json, and some, written to so that its pages are there when the final state comes.
 * Best effort: without it start_restore() allocates. */
static void reserve_state_buffer(struct instance *inst) {
        size_t cap = (size_t)(inst->cfg.state_bytes + inst->cfg.state_bytes / 4 + 65535) & ~(size_t)65535;
        char *spare = inst->cfg.state_bytes ? malloc(cap) : NULL;
        if (!spare)
                return;
        memset(spare, 0, cap);
        pthread_mutex_lock(&inst->lock);
        free(inst->feed.spare);
        inst->feed.spare = spare;
        inst->feed.spare_cap = cap;
        pthread_mutex_unlock(&inst->lock);
}

/* The exact state stream out of its padded device, to QEMU, which loads all but its last byte
 * and is told to start the VM once it has that too (end_feed). */
static int start_restore(struct instance *inst) {
        size_t len = (size_t)inst->cfg.state_bytes;
        uint64_t t = clock_now_ns();
        pthread_mutex_lock(&inst->lock);
        _cleanup_free_ char *buf = len && len <= inst->feed.spare_cap ? TAKE_PTR(inst->feed.spare) : NULL;
        if (buf)
                inst->feed.spare_cap = 0;
        pthread_mutex_unlock(&inst->lock);
        if (!buf && len)
                buf = malloc(len);
        int r = !len ? error_set(-EINVAL, "restore: the package's config.json gives no state size")
                : buf ? block_device_read_at(inst->devs[inst->state], buf, len, 0)
                      : -ENOMEM;
        if (r < 0)
                return r;
        mark(inst, "stateRead");
        log_debug("restore: state read in %.2f ms", (clock_now_ns() - t) / 1e6);
        pthread_mutex_lock(&inst->lock);
        page_warmer_pause(inst->warmer); /* the load's faults first */
        pthread_mutex_unlock(&inst->lock);
        if ((r = prepare_restore(inst)) < 0)
                return r;
        pthread_mutex_lock(&inst->lock);
        int fd = TAKE_FD(inst->feed.ready_fd);
        inst->feed.fd = fd;
        inst->feed.buf = TAKE_PTR(buf);
        inst->feed.len = len;
        inst->feed.r = 0;
        inst->feed.release = inst->feed.abort = false;
        r = -pthread_create(&inst->feed.thread, NULL, feed_thread, inst);
        inst->feed.running = r == 0;
        pthread_mutex_unlock(&inst->lock);
        if (r < 0) {
                close(fd);
                free(TAKE_PTR(inst->feed.buf));
                return error_set(r, "restore: cannot start a thread");
        }
        return 0;
}

/* The state loaded (its load started here, or ahead of the hand-over); the VM runs; AfterResume. */
static int restore_and_resume(struct instance *inst, uint64_t since) {
        inst->t_handover = MS_SINCE(inst->t0);
        mark_at(inst, "handover", since);
        int r;
        if (!inst->restore_started && (r = start_restore(inst)) < 0)
                return r;
        /* The VM runs once QEMU has the last byte: a late copy into the page cache would undo
         * what it writes from then on. QEMU's readahead on guest RAM back to normal (its
         * toucher turned it off). */
        if (stop_warmer(inst))
                vmm_touch_memory(inst->vm, 0, 0, VMM_TOUCH_DONE);
        if ((r = end_feed(inst, false)) < 0 || (r = vmm_restore_wait(inst->vm)) < 0)
                return r;
        inst->t_restored = MS_SINCE(inst->t0);
        mark(inst, "stateLoaded");
        log_debug("state %s %.1f ms after the hand-over", inst->restore_started ? "load ended" : "read and loaded",
                  MS_SINCE(since));
        const char *status;
        if ((r = vmm_status(inst->vm, &status)) < 0 ||
            (strcmp(status, "running") != 0 && (r = vmm_resume(inst->vm)) < 0)) /* saved paused */
                return r;
        inst->resume_ms = MS_SINCE(since);
        inst->t_running = MS_SINCE(inst->t0);
        mark(inst, "running");
        /* When the VM really started: QEMU starts it itself as the load ends (autostart), before
         * it says the migration completed. */
        uint64_t resumed = vmm_resumed_ns(inst->vm);
        if (resumed >= since)
                mark_at(inst, "resumed", resumed);
        r = call_agent(vmm_port_path(inst->vm, GUESTLINK_AGENT_PORT_NAME), "AfterResume", &inst->options);
        inst->t_answered = MS_SINCE(inst->t0);
        mark(inst, "afterResumeAnswered");
        return r;
}

static int fail_instance(struct instance *inst, int r) {
        char why[1024];
        snprintf(why, sizeof(why), "%s", error_message());
        instance_free(inst);
        return error_set(r, "%s", why);
}

/* Start the S3 syncs (after a migration in: with the objects S3 holds of what arrived). */
static int start_s3(struct instance *inst, struct migrate_destination *dest) {
        if (inst->s3_started)
                return 0;
        inst->s3_started = true;
        for (size_t i = 0; i < inst->devices->count; i++) {
                if (!inst->s3[i])
                        continue;
                const struct bitmap *current = NULL;
                for (size_t k = 0; dest && k < migrate_destination_device_count(dest); k++)
                        if (strcmp(migrate_destination_device_info(dest, k)->name, inst->devices->devices[i].name) == 0)
                                migrate_destination_s3(dest, k, &current);
                int r = s3_device_start(inst->s3[i], inst->s3track[i], current);
                if (r < 0)
                        return r;
        }
        return 0;
}

int instance_resume(const struct device_list *devices, const struct instance_options *o, struct instance **ret) {
        int r = check_required(devices, "drafter-peer");
        if (r < 0 || (r = device_list_check_inputs(devices, DEVICE_SCHEMA_PEER)) < 0)
                return r;
        struct instance *inst = instance_new(devices, o);
        if (!inst)
                return -ENOMEM;
        for (size_t i = 0; i < devices->count && r >= 0; i++) {
                struct block_device *bottom;
                const struct device_config *c = &devices->devices[i];
                if ((r = storage_open_device(c, &bottom)) < 0)
                        break;
                if (c->s3.sync && (r = s3_device_from_config(c, bottom->size, &inst->s3[i])) < 0) {
                        block_device_close(bottom);
                        break;
                }
                if ((r = stack_device(inst, i, bottom)) >= 0 && c->sharedbase && *c->overlay)
                        inst->only[i] = cow_device_present(bottom);
        }
        if (r < 0 || (r = load_config(inst)) < 0 || (r = export_devices(inst)) < 0 || (r = start_vmm(inst)) < 0 ||
            (r = restore_and_resume(inst, inst->t0)) < 0 || (r = start_s3(inst, NULL)) < 0)
                return fail_instance(inst, r);
        *ret = inst;
        return 0;
}

/* ---- live migration ---- */

static int open_received(void *ctx, const struct migrate_device_info *info, struct block_device **ret) {
        struct instance *inst = ctx;
        const struct device_config *c = device_list_find(inst->devices, info->name);
        if (!c)
                return error_set(-ENOENT, "the source sends device \"%s\", which --devices does not list", info->name);
        return storage_open_received(c, info, ret);
}

/* After the hand-over, what never arrived is gone with the source: name it (the VM's own reads
 * of it, QEMU's through FUSE, fail with less to say: a bus error). */
static int name_lost_blocks(struct instance *inst, int r) {
        char lost[768] = "";
        size_t used = 0;
        for (size_t i = 0; i < migrate_destination_device_count(inst->dest) && used < sizeof(lost); i++) {
                struct block_device *dev = migrate_destination_device(inst->dest, i);
                uint64_t missing = waiting_cache_missing(dev), first = 0;
                if (missing == 0)
                        continue;
                while (first < block_device_block_count(dev) && waiting_cache_present(dev, first))
                        first++;
                used += (size_t)snprintf(lost + used, sizeof(lost) - used,
                                         "%s%s: block %" PRIu64 " is not available (%" PRIu64 " blocks never arrived)",
                                         used ? "; " : "", migrate_destination_device_info(inst->dest, i)->name, first,
                                         missing);
        }
        if (used == 0)
                return r;
        char why[1024];
        snprintf(why, sizeof(why), "%s", error_message());
        return error_set(r, "%s; %s", why, lost);
}

/* A failure while the devices stream in is usually the migration's: say that, with what we were
 * doing when a read of a block that will never come failed. */
static int receive_failed(struct instance *inst, int r) {
        for (int i = 0; i < 200 && inst->dest && !migrate_destination_finished(inst->dest); i++)
                clock_sleep_ns(10 * NSEC_PER_MSEC);
        if (inst->dest && migrate_destination_finished(inst->dest)) {
                char what[1024];
                snprintf(what, sizeof(what), "%s", error_message());
                int m = migrate_destination_wait(inst->dest, NULL);
                if (m < 0) {
                        char why[1024];
                        snprintf(why, sizeof(why), "%s", error_message());
                        r = error_set(m, "%s (while receiving the VM: %s)", why, what);
                } else {
                        error_set(r, "%s", what);
                }
        }
        if (inst->dest && inst->authority)
                r = name_lost_blocks(inst, r);
        return fail_instance(inst, r);
}

/* The warmer is used under inst->lock, so instance_free() can take it away from under the
 * receiving thread, and it is gone before the VM runs. A memory block goes into the page cache
 * as it arrives, on this thread: until QEMU may be loading the state (it starts at FINAL, or
 * after the hand-over: a lazy start, a source without FINAL) nothing reads the file; from then
 * on only where no read can be waiting with one of its pages held (page_warmer_landed). */
static void on_blocks(void *ctx, size_t index, uint64_t first, uint64_t count, bool zero, const void *data) {
        struct instance *inst = ctx;
        pthread_mutex_lock(&inst->lock);
        struct page_warmer *w = index == inst->warm_index ? inst->warmer : NULL;
        if (w && count == 1 && !zero) {
                if (inst->restore_started || inst->authority) /* QEMU may be reading */
                        page_warmer_landed(w, first, data);
                else if (page_warmer_store(w, first, data) < 0)
                        page_warmer_arrived(w, first, 1, false);
        } else if (w) {
                page_warmer_arrived(w, first, count, zero);
        }
        pthread_mutex_unlock(&inst->lock);
}

static void on_dirty(void *ctx, size_t index, uint64_t block) {
        struct instance *inst = ctx;
        pthread_mutex_lock(&inst->lock);
        if (inst->warmer && index == inst->warm_index)
                page_warmer_dirtied(inst->warmer, block);
        pthread_mutex_unlock(&inst->lock);
}

/* Published before it reads anything, so it sees every DIRTY list; started under the lock the
 * hand-over takes, so it never runs after it. Without one the VM only resumes slower. */
static void start_warmer(struct instance *inst) {
        size_t n = migrate_destination_device_count(inst->dest);
        for (size_t i = 0; i < n; i++)
                if (strcmp(migrate_destination_device_info(inst->dest, i)->name, "memory") == 0)
                        inst->warm_index = i;
        struct page_warmer *w;
        if (page_warmer_new(inst->fx, inst->memory, migrate_destination_device(inst->dest, inst->warm_index), &w) < 0) {
                log_debug("%s", error_message());
                return;
        }
        pthread_mutex_lock(&inst->lock);
        if (!inst->authority) {
                inst->warmer = w;
                if (page_warmer_run(w) < 0)
                        log_debug("%s", error_message());
                w = NULL;
        }
        pthread_mutex_unlock(&inst->lock);
        page_warmer_free(w);
}

/* The state and config devices are final ahead of the hand-over: the receiving loop starts
 * the state load (instance_receive()). */
static void on_final(void *ctx, size_t index, const char *name) {
        struct instance *inst = ctx;
        pthread_mutex_lock(&inst->lock);
        if (strcmp(name, inst->devices->devices[inst->state].name) == 0)
                inst->state_final = true;
        if (strcmp(name, inst->devices->devices[inst->config].name) == 0)
                inst->config_final = true;
        pthread_cond_broadcast(&inst->changed);
        pthread_mutex_unlock(&inst->lock);
}

/* The source suspends the VM next: from now on the receiving thread stores what it must, and a
 * request of QEMU's toucher at idle priority may hold a page lock that a store waits for while
 * the CPUs are busy with the suspend. The warmer stops handing blocks to it. */
static void on_barrier(void *ctx) {
        struct instance *inst = ctx;
        pthread_mutex_lock(&inst->lock);
        page_warmer_end_touching(inst->warmer);
        pthread_mutex_unlock(&inst->lock);
}

/* The warmer goes on through the state load (blocks that follow the hand-over are cached as
 * they land) and stops just before the VM runs: restore_and_resume(). */
static int on_authority(void *ctx) {
        struct instance *inst = ctx;
        pthread_mutex_lock(&inst->lock);
        inst->authority = true;
        pthread_cond_broadcast(&inst->changed);
        pthread_mutex_unlock(&inst->lock);
        return 0;
}

int instance_receive(const struct device_list *devices, const struct instance_options *o, const char *raddr,
                     bool disable_postcopy, struct instance **ret) {
        int r = check_required(devices, "drafter-peer");
        if (r < 0)
                return r;
        struct instance *inst = instance_new(devices, o);
        if (!inst)
                return -ENOMEM;
        int fd;
        log_info("Connecting to %s", raddr);
        if ((r = transport_connect(raddr, 60000, &fd)) < 0 || (r = tls_wrap(o->tls, fd, false, 10000, &fd)) < 0)
                return fail_instance(inst, error_prefix(r, "%s", raddr));
        struct migrate_destination_config dcfg = {.open_device = open_received,
                                                  .on_authority = on_authority,
                                                  .ctx = inst,
                                                  .disable_postcopy = disable_postcopy,
                                                  .on_blocks = on_blocks,
                                                  .on_dirty = on_dirty,
                                                  .on_final = on_final,
                                                  .on_barrier = on_barrier,
                                                  .announce_ready = true};
        if ((r = migrate_destination_start(fd, &dcfg, &inst->dest)) < 0)
                return fail_instance(inst, r);
        inst->lazy = migrate_destination_lazy(inst->dest);
        size_t n = migrate_destination_device_count(inst->dest);
        for (size_t i = 0; i < n && r >= 0; i++) {
                const struct device_config *c = device_list_find(devices, migrate_destination_device_info(inst->dest, i)->name);
                size_t k = (size_t)(c - devices->devices);
                /* The source's bucket travels with the VM; else our own --devices may name one. */
                const struct migrate_s3_info *s3 = migrate_destination_s3(inst->dest, i, NULL);
                if (s3)
                        r = s3_device_from_received(c->name, s3, &inst->s3[k]);
                else if (c->s3.sync)
                        r = s3_device_from_config(c, migrate_destination_device_info(inst->dest, i)->size, &inst->s3[k]);
                struct block_device *dev = migrate_destination_take_device(inst->dest, i);
                if (r >= 0)
                        r = stack_device(inst, k, dev);
        }
        for (size_t i = 0; i < devices->count && r >= 0; i++)
                if (!inst->devs[i])
                        r = error_set(-EINVAL, "devices: the source does not send \"%s\"", devices->devices[i].name);
        /* The VMM starts now, while the blocks stream in: its start-up is off the downtime path.
         * Reads of blocks not here yet wait for them (and ask for them first). */
        if (r < 0 || (r = export_devices(inst)) < 0)
                return receive_failed(inst, r);
        start_warmer(inst);
        if ((r = load_config(inst)) < 0 || (r = start_vmm(inst)) < 0)
                return receive_failed(inst, r);
        pthread_mutex_lock(&inst->lock);
        page_warmer_set_toucher(inst->warmer, &(struct page_warmer_toucher){touch_cached, touch_hurry, inst});
        pthread_mutex_unlock(&inst->lock);
        if ((r = prepare_restore(inst)) < 0)
                return receive_failed(inst, r);
        reserve_state_buffer(inst);
        log_info("Started QEMU after %.1f ms; waiting for the source to hand over", MS_SINCE(inst->t0));
        /* The source holds its suspend until now (EVENT READY). */
        if ((r = migrate_destination_ready(inst->dest)) < 0)
                return receive_failed(inst, r);
        pthread_mutex_lock(&inst->lock);
        while (!inst->authority) {
                if (inst->state_final && inst->config_final && !inst->restore_started) {
                        /* QEMU loads the state while the rest of the final set follows. A load
                         * that fails gives the migration up: the source resumes its VM. */
                        inst->restore_started = true;
                        pthread_mutex_unlock(&inst->lock);
                        log_debug("state final ahead of the hand-over: loading it");
                        if ((r = load_config(inst)) < 0 || (r = start_restore(inst)) < 0) {
                                migrate_destination_abort(inst->dest);
                                return receive_failed(inst, r);
                        }
                        pthread_mutex_lock(&inst->lock);
                        continue;
                }
                struct timespec ts;
                clock_deadline_after(100 * NSEC_PER_MSEC, &ts);
                pthread_cond_timedwait(&inst->changed, &inst->lock, &ts);
                pthread_mutex_unlock(&inst->lock);
                /* A migration that ended without handing over is a failure. */
                if (!inst->authority && migrate_destination_finished(inst->dest)) {
                        r = migrate_destination_wait(inst->dest, NULL);
                        return fail_instance(inst, r < 0 ? r : error_set(-EPROTO, "the source ended without handing over"));
                }
                pthread_mutex_lock(&inst->lock);
        }
        pthread_mutex_unlock(&inst->lock);
        uint64_t handover = clock_now_ns();
        /* The source rewrote config.json with the final state's size. */
        if ((!inst->restore_started && (r = load_config(inst)) < 0) || (r = restore_and_resume(inst, handover)) < 0)
                return receive_failed(inst, r);
        *ret = inst;
        return 0;
}

int instance_received(struct instance *inst) {
        if (!inst->dest)
                return 1;
        if (!migrate_destination_finished(inst->dest))
                return 0;
        struct migrate_stats st;
        int r = migrate_destination_wait(inst->dest, &st);
        if (r >= 0 && !inst->s3_started && (st.s3_blocks || st.s3_fallback_blocks))
                log_info("From S3: %" PRIu64 " blocks, %.1f MB (%" PRIu64 " blocks asked over the link after S3 failed); "
                         "over the link: %.1f MB",
                         st.s3_blocks, st.s3_bytes / 1e6, st.s3_fallback_blocks, st.bytes_received / 1e6);
        if (r >= 0 && (r = start_s3(inst, inst->dest)) < 0)
                return r;
        return r < 0 ? r : 1;
}

int instance_wait_received(struct instance *inst, struct migrate_stats *ret_stats) {
        if (!inst->dest)
                return 0;
        int r = migrate_destination_wait(inst->dest, ret_stats);
        /* The devices are complete (or never will be): the migration's thread is done with them. */
        return r < 0 ? r : start_s3(inst, inst->dest);
}

/* A pre-copy cycle's write-back, while the VM runs: in chunks, so that the vCPU never waits for
 * more than one chunk's pages (the final one, with the VM paused, is fuse_export_sync's). The
 * pages it leaves in flight reach the dirty tracker and the next cycle. */
#define WRITE_BACK_CHUNK (256 * 1024)

static int before_collect(void *ctx) {
        struct instance *inst = ctx;
        return fuse_export_write_back(inst->fx, WRITE_BACK_CHUNK);
}

static int suspend_into_devices(struct instance *inst, bool durable, bool skip_agent);
static int store_state(struct instance *inst, const void *data, size_t len, bool durable);

static int suspend_hook(void *ctx) {
        log_info("Suspending the VM for the hand-over");
        mark(ctx, "beforeSuspend");
        return suspend_into_devices(ctx, false, false);
}

/* How long the link may take to push the final set ahead of the hand-over: a few ms of link beat
 * the VM faulting the blocks in one by one after it resumed. DRAFTER_PUSH_BUDGET_MS overrides the
 * 20 ms (0: never push, the final set always follows the hand-over). */
static uint64_t push_budget_ns(void) {
        const char *v = getenv("DRAFTER_PUSH_BUDGET_MS");
        if (!v || !*v)
                return 20 * NSEC_PER_MSEC;
        char *end;
        errno = 0;
        unsigned long ms = strtoul(v, &end, 10);
        if (errno || *end || ms > 60000) {
                log_warning("DRAFTER_PUSH_BUDGET_MS=%s: not a number of ms from 0 to 60000; using 20", v);
                return 20 * NSEC_PER_MSEC;
        }
        return ms * NSEC_PER_MSEC;
}

int instance_migrate_out(struct instance *inst, int fd, unsigned concurrency, struct migrate_stats *ret_stats) {
        const struct device_list *devices = inst->devices;
        _cleanup_free_ struct migrate_source_device *devs = calloc(devices->count, sizeof(*devs));
        if (!devs)
                return -ENOMEM;
        /* What the destination needs to start its VMM goes first (the bulk pass goes in this
         * order): config.json and the kernel; then the rest as listed. */
        size_t n = 0;
        for (int pass = 0; pass < 2; pass++)
                for (size_t i = 0; i < devices->count; i++) {
                        const struct device_config *c = &devices->devices[i];
                        bool first = i == inst->config || strcmp(c->name, "kernel") == 0;
                        if (first != (pass == 0))
                                continue;
                        devs[n++] = (struct migrate_source_device){c->name,
                                                                   inst->devs[i],
                                                                   inst->vms[i],
                                                                   inst->only[i],
                                                                   c->max_dirty_blocks,
                                                                   c->min_cycles,
                                                                   c->max_cycles,
                                                                   c->cycle_throttle_ns,
                                                                   NULL,
                                                                   inst->s3[i] ? &inst->s3[i]->src : NULL,
                                                                   /* read before the VM resumes */
                                                                   i == inst->state || i == inst->config};
                }
        struct migrate_source_config cfg = {.devices = devs,
                                            .count = devices->count,
                                            .before_collect = before_collect,
                                            .suspend = suspend_hook,
                                            .ctx = inst,
                                            .compress = true,
                                            .progress = true,
                                            .concurrency = concurrency,
                                            .push_budget_ns = push_budget_ns()};
        struct migrate_stats st = {0};
        /* The running VM comes first: on a busy host the sending thread yields to its vCPUs
         * (the destination, paused until the hand-over, is not slowed). */
        errno = 0;
        int nice_before = getpriority(PRIO_PROCESS, (id_t)gettid());
        bool reniced = errno == 0 && setpriority(PRIO_PROCESS, (id_t)gettid(), MIN(nice_before + 5, 19)) == 0;
        int r = migrate_source_run(fd, &cfg, &st);
        if (reniced && setpriority(PRIO_PROCESS, (id_t)gettid(), nice_before) < 0)
                log_debug("migration: cannot restore the thread's priority: %m");
        if (ret_stats)
                *ret_stats = st;
        if (st.authority_sent_at_ns)
                mark_at(inst, "authoritySent", st.authority_sent_at_ns);
        if (r >= 0) {
                /* The suspend starts with the agent's BeforeSuspend, while the VM still runs. */
                uint64_t paused = marked_at(inst, "paused");
                double paused_ms = paused && st.authority_sent_at_ns > paused ? (st.authority_sent_at_ns - paused) / 1e6 : 0;
                log_info("Completed all device migrations (%" PRIu64 " cycles, %" PRIu64 " blocks, %.1f MB, "
                         "suspended for %.1f ms before the hand-over, paused for the last %.1f ms of it, "
                         "%.1f ms in all)",
                         st.cycles, st.blocks_sent, st.bytes_sent / 1e6, st.suspend_ns / 1e6, paused_ms,
                         st.total_ns / 1e6);
                /* The destination, here perhaps, runs its first steps now: QEMU yields, and the
                 * teardown (QEMU's exit unmaps its guest RAM, ~10 ms of CPU; our devices' flush
                 * and unmount) waits a moment, so that on a shared host it takes no CPU from them
                 * (docs/performance.md: the first heartbeat 3.9 ms sooner in an A/B). */
                if (vmm_yield_cpu(inst->vm) < 0)
                        log_debug("%s", error_message());
                clock_sleep_ns(SOURCE_TEARDOWN_GRACE_NS);
                vmm_stop(inst->vm);
                return 0;
        }
        char why[1024];
        snprintf(why, sizeof(why), "%s", error_message());
        if (st.authority_transferred)
                return error_set(r, "%s; the VM stays paused here (the destination may be running it)", why);
        /* We kept the devices: the VM runs on here, if it was paused. */
        const char *status = NULL;
        if (vmm_status(inst->vm, &status) >= 0 && strcmp(status, "running") != 0) {
                int e = vmm_resume(inst->vm);
                if (e >= 0)
                        e = call_agent(vmm_port_path(inst->vm, GUESTLINK_AGENT_PORT_NAME), "AfterResume", &inst->options);
                if (e < 0)
                        log_error("resuming the VM after the failed migration: %s", error_message());
        }
        return error_set(r, "%s", why);
}

double instance_resume_ms(const struct instance *inst) {
        return inst->resume_ms;
}

void instance_resume_report(const struct instance *inst, char *buf, size_t size) {
        if (inst->dest) {
                snprintf(buf, size,
                         "QEMU started %.1f ms after connecting, hand-over after %.1f ms; from the hand-over: "
                         "state read and loaded %.1f ms, running %.1f ms; AfterResume answered %.1f ms after it",
                         inst->t_qemu, inst->t_handover, inst->t_restored - inst->t_handover,
                         inst->t_running - inst->t_handover, inst->t_answered - inst->t_handover);
                return;
        }
        snprintf(buf, size,
                 "devices, FUSE and state %.1f ms, QEMU start %.1f ms, state load %.1f ms, resume %.1f ms; "
                 "the guest's agent answered AfterResume after %.1f ms in all",
                 inst->t_prepared, inst->t_qemu - inst->t_prepared, inst->t_restored - inst->t_qemu,
                 inst->t_running - inst->t_restored, inst->t_answered);
}

char *instance_summary_json(const struct instance *inst, const struct migrate_stats *out) {
        json_t *j = json_pack("{s:s,s:f,s:f,s:f,s:f,s:f,s:f}", "started", inst->dest ? "received" : "resumed",
                              "resumeMs", inst->resume_ms, "qemuReadyMs", inst->t_qemu, "handoverMs",
                              inst->t_handover, "restoredMs", inst->t_restored, "runningMs", inst->t_running,
                              "afterResumeAnsweredMs", inst->t_answered);
        if (j && out)
                json_object_set_new(
                        j, "migratedOut",
                        json_pack("{s:b,s:b,s:I,s:I,s:I,s:I,s:I,s:f,s:f,s:f,s:f}", "completed", out->completed,
                                  "finalPushed", out->final_pushed, "cycles",
                                  (json_int_t)out->cycles, "blocksSent", (json_int_t)out->blocks_sent, "bytesSent",
                                  (json_int_t)out->bytes_sent, "finalDirtyBlocks", (json_int_t)out->final_dirty_blocks,
                                  "needAtServed", (json_int_t)out->need_at_served, "bulkMs", out->bulk_ns / 1e6,
                                  "cyclesMs", out->cycles_ns / 1e6, "suspendMs", out->suspend_ns / 1e6, "totalMs",
                                  out->total_ns / 1e6));
        json_t *events = j ? json_object() : NULL;
        for (size_t i = 0; events && i < inst->event_count; i++)
                json_object_set_new(events, inst->events[i].name, json_integer((json_int_t)inst->events[i].at_ns));
        if (events) {
                json_object_set_new(j, "eventsClock", json_string("CLOCK_MONOTONIC ns"));
                json_object_set_new(j, "events", events);
        }
        char *text = j ? json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;
        json_decref(j);
        return text;
}

bool instance_running(struct instance *inst) {
        return inst->vm && vmm_running(inst->vm);
}

struct sync_job {
        struct instance *inst;
        pthread_t thread;
        bool started;
        int r;
        char why[1024];
};

static void *sync_thread(void *arg) {
        struct sync_job *job = arg;
        job->r = fuse_export_sync(job->inst->fx);
        if (job->r < 0)
                snprintf(job->why, sizeof(job->why), "%s", error_message());
        return NULL;
}

/* The VM is paused: its pages dirtied through QEMU's mapping go to the memory device while QEMU
 * writes the device state (which does not touch guest RAM). */
static void start_sync(void *arg) {
        struct sync_job *job = arg;
        mark(job->inst, "paused");
        job->started = pthread_create(&job->thread, NULL, sync_thread, job) == 0;
}

/* BeforeSuspend, pause, the state into the state device and config.json. `durable`: flush every
 * device too (a suspend that ends the run); a live migration reads the devices at once and keeps
 * the VM to resume if it fails, so it leaves that off its downtime. */
static int suspend_into_devices(struct instance *inst, bool durable, bool skip_agent) {
        const struct instance_options *o = &inst->options;
        int r = skip_agent ? 0 : call_agent(vmm_port_path(inst->vm, GUESTLINK_AGENT_PORT_NAME), "BeforeSuspend", o);
        if (r < 0) {
                char why[1024];
                snprintf(why, sizeof(why), "%s", error_message());
                return error_set(-ECANCELED, "%s (the VM runs on)", why);
        }
        char raw[4200];
        snprintf(raw, sizeof(raw), "%s/state.new", inst->runtime);
        /* A live migration lets QEMU stop the VM (vmm_stop_and_save_state) and syncs the memory
         * beside the state save; a snapshot pauses it first and syncs the memory file itself. */
        struct sync_job job = {.inst = inst};
        if (durable) {
                if ((r = vmm_pause(inst->vm)) < 0)
                        return r;
                mark(inst, "paused");
                r = vmm_snapshot(inst->vm, raw);
        } else {
                r = vmm_stop_and_save_state(inst->vm, raw, start_sync, &job);
        }
        if (job.started)
                pthread_join(job.thread, NULL);
        if (r < 0)
                return r;
        mark(inst, "stateSaved");
        if (job.started && job.r < 0)
                return error_set(job.r, "%s", job.why);
        if (!job.started && (r = fuse_export_sync(inst->fx)) < 0)
                return r;
        mark(inst, "memorySynced");
        size_t len = 0;
        void *data = NULL;
        if ((r = map_file(raw, &data, &len)) < 0)
                return r;
        r = store_state(inst, data, len, durable);
        munmap(data, len);
        return r;
}

/* The state into the state device and config.json (then every device flushed when `durable`). */
static int store_state(struct instance *inst, const void *data, size_t len, bool durable) {
        int r;
        struct block_device *state = inst->devs[inst->state];
        if (len > state->size)
                return error_set(-ENOSPC, "state: the snapshot has %zu bytes, the state device only %" PRIu64, len,
                                 state->size);
        if ((r = block_device_write_at(state, data, len, 0)) < 0)
                return r;
        if (inst->cfg.state_bytes > len && (r = block_device_discard(state, inst->cfg.state_bytes - len, len)) < 0)
                return r;
        inst->cfg.state_bytes = len;
        struct block_device *cdev = inst->devs[inst->config];
        _cleanup_free_ char *json = config_padded(&inst->cfg, (size_t)cdev->size);
        if (!json)
                return error_set(-ENOSPC, "config: does not fit its %" PRIu64 "-byte device", cdev->size);
        if ((r = block_device_write_at(cdev, json, (size_t)cdev->size, 0)) < 0)
                return r;
        /* The kernel's cached pages of the files we wrote underneath are stale now. */
        fuse_export_invalidate(inst->fx, inst->state, 0, state->size);
        fuse_export_invalidate(inst->fx, inst->config, 0, cdev->size);
        for (size_t i = 0; durable && i < inst->devices->count; i++)
                if ((r = block_device_flush(inst->devs[i])) < 0)
                        return r;
        mark(inst, "stateStored");
        log_info("Suspended the VM into its devices (state %zu bytes)", len);
        return 0;
}

int instance_suspend(struct instance *inst, bool skip_agent) {
        return suspend_into_devices(inst, true, skip_agent);
}

void instance_free(struct instance *inst) {
        if (!inst)
                return;
        end_feed(inst, true);
        pthread_mutex_lock(&inst->lock);
        page_warmer_set_toucher(inst->warmer, NULL); /* its requests go to inst->vm */
        pthread_mutex_unlock(&inst->lock);
        vmm_free(inst->vm);
        stop_warmer(inst); /* it reads through the mount */
        fuse_export_stop(inst->fx);
        /* Stops the receiving thread before the devices it writes to are closed. */
        migrate_destination_free(inst->dest);
        for (size_t i = 0; inst->s3 && i < inst->devices->count; i++)
                s3_device_free(inst->s3[i]); /* it reads the devices */
        for (size_t i = 0; inst->devs && i < inst->devices->count; i++) {
                if (!inst->devs[i])
                        continue;
                if (block_device_flush(inst->devs[i]) < 0)
                        log_error("%s", error_message());
                block_device_close(inst->devs[i]);
        }
        for (size_t i = 0; inst->vms && i < inst->devices->count; i++)
                volatility_monitor_free(inst->vms[i]);
        free(inst->feed.spare);
        free(inst->devs);
        free(inst->vms);
        free(inst->only);
        free(inst->s3);
        free(inst->s3track);
        pthread_mutex_destroy(&inst->lock);
        pthread_cond_destroy(&inst->changed);
        free(inst->kernel_path);
        free(inst->initrd_path);
        remove_runtime_dir(inst->runtime);
        free(inst);
}
