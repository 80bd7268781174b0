/* instance.h — a VM made from a package: snapshotting a blueprint into a package
 * (drafter-snapshotter) and running a package (drafter-peer).
 *
 * A package is the devices state, memory, kernel, disk, config (+ oci and any other disks):
 * `memory` is the guest RAM file itself, `state` the VMM's device state (zero-padded: the state
 * device keeps room to grow, config.json says how many bytes are used), `kernel` a kernel bundle
 * (kernel_bundle.h), `config` the vm_config.h JSON (padded with spaces for the same reason).
 * Disks are attached in the order the snapshot recorded. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "drafter/device_config.h"

struct instance_options {
        const char *qemu_bin;     /* NULL: qemu-system-x86_64 */
        const char *runtime_base; /* per-VM runtime directories go here (--chroot-base-dir) */
        bool enable_output, enable_input;
        uint64_t liveness_timeout_ns; /* boot to liveness (snapshotter) */
        uint64_t agent_timeout_ns;    /* per agent try; 3 tries */
        uint64_t resume_timeout_ns;   /* restore + resume (peer) */
        /* snapshotter only */
        uint64_t memory_bytes;
        int cpu_count;
        const char *cpu_model; /* NULL: the VMM's default */
        const char *boot_args;
        int64_t liveness_port, agent_port;
};

/* Boot the blueprint of `devices` (snapshotter schema), wait for liveness, call BeforeSuspend,
 * pause and write the package: every output is written under a temporary name and renamed only
 * when all of them are complete. */
int instance_snapshot(const struct device_list *devices, const struct instance_options *options);

struct instance;

/* Run a package (`devices`, peer schema): devices opened as the config says (base + overlay +
 * state, or the base itself), served through FUSE, the VM restored and resumed, AfterResume
 * called. */
int instance_resume(const struct device_list *devices, const struct instance_options *options,
                    struct instance **ret_instance);
/* Milliseconds from the start of instance_resume to the VM running again. */
double instance_resume_ms(const struct instance *inst);
/* Where the resume's time went, as one line. */
void instance_resume_report(const struct instance *inst, char *buf, size_t size);
/* True while the VM runs. */
bool instance_running(struct instance *inst);
/* BeforeSuspend, pause, and write the VM back into its devices (state, memory, config): the
 * package (or the overlay) is a snapshot again, ready for the next resume. */
int instance_suspend(struct instance *inst);
/* Stop the VM, unmount, flush and close the devices. NULL is fine. */
void instance_free(struct instance *inst);
