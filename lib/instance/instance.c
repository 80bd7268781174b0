/* instance.c — packages made from blueprints, and VMs run from packages (see instance.h). */
#include "drafter/instance.h"
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/fs.h"
#include "drafter/fuse_export.h"
#include "drafter/guestlink.h"
#include "drafter/kernel_bundle.h"
#include "drafter/log.h"
#include "drafter/storage.h"
#include "drafter/vm_config.h"
#include "drafter/vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CONFIG_DEVICE_BYTES 4096u
#define AGENT_TRIES 3

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

static int read_file(const char *path, char **ret_data, size_t *ret_len) {
        _cleanup_close_ int fd = open(path, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0)
                return error_set_errno(-errno, "%s: cannot read", path);
        char *data = malloc((size_t)st.st_size + 1);
        if (!data)
                return -ENOMEM;
        size_t got = 0;
        while (got < (size_t)st.st_size) {
                ssize_t n = pread(fd, data + got, (size_t)st.st_size - got, (off_t)got);
                if (n <= 0) {
                        free(data);
                        return error_set_errno(n < 0 ? -errno : -EIO, "%s: cannot read", path);
                }
                got += (size_t)n;
        }
        data[got] = '\0';
        *ret_data = data;
        *ret_len = got;
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
                if (*c->input) {
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
        struct block_device **devs;
        struct fuse_export *fx;
        struct vmm *vm;
        struct vm_config cfg;
        size_t state, memory, config;
        char runtime[4096];
        char *kernel_path, *initrd_path;
        double resume_ms;
        /* Where a resume's time went, in ms from the start of instance_resume. */
        double t_prepared, t_qemu, t_restored, t_running, t_answered;
};

static size_t index_of(const struct device_list *devices, const char *name) {
        return (size_t)(device_list_find(devices, name) - devices->devices);
}

int instance_resume(const struct device_list *devices, const struct instance_options *o, struct instance **ret) {
        uint64_t t0 = clock_now_ns();
        int r = check_required(devices, "drafter-peer");
        if (r < 0 || (r = device_list_check_inputs(devices, DEVICE_SCHEMA_PEER)) < 0)
                return r;
        struct instance *inst = calloc(1, sizeof(*inst));
        if (!inst || !(inst->devs = calloc(devices->count, sizeof(*inst->devs)))) {
                free(inst);
                return -ENOMEM;
        }
        inst->devices = devices;
        inst->options = *o;
        inst->state = index_of(devices, "state");
        inst->memory = index_of(devices, "memory");
        inst->config = index_of(devices, "config");
        for (size_t i = 0; i < devices->count && r >= 0; i++)
                r = storage_open_device(&devices->devices[i], &inst->devs[i]);

        /* What made the snapshot decides what resumes it. */
        _cleanup_free_ char *text = NULL;
        struct block_device *cdev = r >= 0 ? inst->devs[inst->config] : NULL;
        if (r >= 0 && cdev->size > (1u << 20))
                r = error_set(-EINVAL, "config: %" PRIu64 " bytes is not a config.json", cdev->size);
        if (r >= 0 && !(text = malloc(cdev->size + 1)))
                r = -ENOMEM;
        if (r >= 0 && (r = block_device_read_at(cdev, text, cdev->size, 0)) >= 0)
                r = vm_config_parse(text, cdev->size, devices->devices[inst->config].base, &inst->cfg);
        if (r >= 0 && strcmp(inst->cfg.backend, "qemu") != 0)
                r = error_set(-EINVAL, "config: the snapshot was made by %s; this drafter-peer runs QEMU",
                              inst->cfg.backend);
        if (r >= 0 && strcmp(inst->cfg.accelerator, "tcg") != 0 && strcmp(inst->cfg.accelerator, "kvm") != 0)
                r = error_set(-EINVAL, "config: unknown accelerator \"%s\"", inst->cfg.accelerator);
        if (r >= 0 && inst->devs[inst->memory]->size != inst->cfg.memory_bytes)
                r = error_set(-EINVAL, "memory: %" PRIu64 " bytes, config.json says %" PRIu64,
                              inst->devs[inst->memory]->size, inst->cfg.memory_bytes);
        if (r >= 0 && inst->cfg.state_bytes > inst->devs[inst->state]->size)
                r = error_set(-EINVAL, "state: %" PRIu64 " bytes, config.json says the snapshot has %" PRIu64,
                              inst->devs[inst->state]->size, inst->cfg.state_bytes);
        for (int i = 0; r >= 0 && i < inst->cfg.drive_count; i++)
                if (!device_list_find(devices, inst->cfg.drives[i]))
                        r = error_set(-EINVAL, "devices: the snapshot has a disk \"%s\", --devices does not",
                                      inst->cfg.drives[i]);

        if (r >= 0)
                r = make_runtime_dir(o->runtime_base, "qemu", inst->runtime, sizeof(inst->runtime));
        /* The devices as files: what QEMU maps (memory) and opens (disks). */
        _cleanup_free_ struct fuse_export_device *files = calloc(devices->count, sizeof(*files));
        if (r >= 0 && !files)
                r = -ENOMEM;
        for (size_t i = 0; r >= 0 && i < devices->count; i++)
                files[i] = (struct fuse_export_device){devices->devices[i].name, inst->devs[i], false};
        char mnt[4200];
        snprintf(mnt, sizeof(mnt), "%s/mnt", inst->runtime);
        if (r >= 0)
                r = fuse_export_start(mnt, files, devices->count, &inst->fx);
        if (r >= 0)
                r = kernel_bundle_extract(fuse_export_path(inst->fx, index_of(devices, "kernel")), inst->runtime,
                                          &inst->kernel_path, &inst->initrd_path);
        /* The exact state stream, out of its padded device. */
        char raw[4200];
        snprintf(raw, sizeof(raw), "%s/state.raw", inst->runtime);
        if (r >= 0) {
                _cleanup_free_ char *buf = malloc(inst->cfg.state_bytes);
                r = buf ? block_device_read_at(inst->devs[inst->state], buf, inst->cfg.state_bytes, 0) : -ENOMEM;
                if (r >= 0)
                        r = fs_write_file_atomic(raw, buf, inst->cfg.state_bytes);
        }
        struct vmm_config mc = {.qemu_bin = o->qemu_bin,
                                .runtime_dir = inst->runtime,
                                .kernel = inst->kernel_path,
                                .initrd = inst->initrd_path,
                                .boot_args = inst->cfg.boot_args,
                                .memory_path = r >= 0 ? fuse_export_path(inst->fx, inst->memory) : NULL,
                                .memory_bytes = inst->cfg.memory_bytes,
                                .cpus = (int)inst->cfg.cpu_count,
                                .cpu_model = inst->cfg.cpu_model,
                                /* The state of one accelerator does not load under the other. */
                                .accelerator = inst->cfg.accelerator,
                                .ports = {GUESTLINK_LIVENESS_PORT_NAME, GUESTLINK_AGENT_PORT_NAME},
                                .port_count = 2,
                                .enable_output = o->enable_output,
                                .enable_input = o->enable_input};
        for (int i = 0; r >= 0 && i < inst->cfg.drive_count; i++)
                mc.drives[mc.drive_count++] = (struct vmm_drive){
                        inst->cfg.drives[i], fuse_export_path(inst->fx, index_of(devices, inst->cfg.drives[i])), false};
#define MS_SINCE(t) ((clock_now_ns() - (t)) / 1e6)
        inst->t_prepared = MS_SINCE(t0);
        if (r >= 0)
                r = vmm_start(&mc, true, &inst->vm);
        inst->t_qemu = MS_SINCE(t0);
        if (r >= 0)
                r = vmm_restore(inst->vm, raw);
        inst->t_restored = MS_SINCE(t0);
        if (r >= 0)
                r = vmm_resume(inst->vm);
        if (r >= 0) {
                inst->resume_ms = inst->t_running = MS_SINCE(t0);
                r = call_agent(vmm_port_path(inst->vm, GUESTLINK_AGENT_PORT_NAME), "AfterResume", o);
                inst->t_answered = MS_SINCE(t0);
        }
        if (r < 0) {
                char why[1024];
                snprintf(why, sizeof(why), "%s", error_message());
                instance_free(inst);
                return error_set(r, "%s", why);
        }
        *ret = inst;
        return 0;
}

double instance_resume_ms(const struct instance *inst) {
        return inst->resume_ms;
}

void instance_resume_report(const struct instance *inst, char *buf, size_t size) {
        snprintf(buf, size,
                 "devices, FUSE and state %.1f ms, QEMU start %.1f ms, state load %.1f ms, resume %.1f ms; "
                 "the guest's agent answered AfterResume after %.1f ms in all",
                 inst->t_prepared, inst->t_qemu - inst->t_prepared, inst->t_restored - inst->t_qemu,
                 inst->t_running - inst->t_restored, inst->t_answered);
}

bool instance_running(struct instance *inst) {
        return inst->vm && vmm_running(inst->vm);
}

int instance_suspend(struct instance *inst) {
        const struct instance_options *o = &inst->options;
        int r = call_agent(vmm_port_path(inst->vm, GUESTLINK_AGENT_PORT_NAME), "BeforeSuspend", o);
        if (r < 0)
                return r;
        char raw[4200];
        snprintf(raw, sizeof(raw), "%s/state.new", inst->runtime);
        if ((r = vmm_pause(inst->vm)) < 0 || (r = vmm_snapshot(inst->vm, raw)) < 0)
                return r;
        /* Every page QEMU dirtied through its mapping, into the memory device. */
        if ((r = fuse_export_sync(inst->fx)) < 0)
                return r;
        _cleanup_free_ char *data = NULL;
        size_t len = 0;
        if ((r = read_file(raw, &data, &len)) < 0)
                return r;
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
        for (size_t i = 0; i < inst->devices->count; i++)
                if ((r = block_device_flush(inst->devs[i])) < 0)
                        return r;
        log_info("Suspended the VM into its devices (state %zu bytes)", len);
        return 0;
}

void instance_free(struct instance *inst) {
        if (!inst)
                return;
        vmm_free(inst->vm);
        fuse_export_stop(inst->fx);
        for (size_t i = 0; inst->devs && i < inst->devices->count; i++) {
                if (!inst->devs[i])
                        continue;
                if (block_device_flush(inst->devs[i]) < 0)
                        log_error("%s", error_message());
                block_device_close(inst->devs[i]);
        }
        free(inst->devs);
        free(inst->kernel_path);
        free(inst->initrd_path);
        remove_runtime_dir(inst->runtime);
        free(inst);
}
