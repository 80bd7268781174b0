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
#include "drafter/migrate.h"

struct tls_context;

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
        const char *serial_ports; /* extra named virtio-serial ports, comma-separated; NULL: none */
        /* Network namespace (drafter-nat's arkN) to run the VMM in, NULL: ours. The snapshotter
         * gives the VM a NIC on tap `tap` with MAC `mac` there (recorded in config.json); a
         * peer resumes such a package only with a namespace that has the same tap. */
        const char *netns, *tap, *mac;
        /* Migration links (peer): TLS credentials, NULL: plain TCP (tls.h). */
        struct tls_context *tls;
        /* Snapshotter: once readable (signals_stop_fd()), the snapshot stops — QEMU is killed, no
         * output appears — and instance_snapshot() fails with -EINTR. -1 (or 0 fields): none. */
        int stop_fd;
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
/* Receive a running VM from the peer at raddr: the devices stream in (those not here yet are
 * read through the migration: reads wait for them), QEMU starts at once and waits; when the
 * source hands over, the VM is restored and resumed and AfterResume called, while the remaining
 * blocks arrive (post-copy) — or only once every block is here with disable_postcopy. */
int instance_receive(const struct device_list *devices, const struct instance_options *options, const char *raddr,
                     bool disable_postcopy, struct instance **ret_instance);
/* After instance_receive: 1 once every block has arrived, 0 while blocks are still on their way,
 * or the error that ended the migration. */
int instance_received(struct instance *inst);
/* After instance_receive: wait until every block has arrived (0) or the migration failed. */
int instance_wait_received(struct instance *inst, struct migrate_stats *ret_stats);
/* Migrate the running VM to the peer connected on fd: pre-copy while it runs, then suspend
 * (BeforeSuspend, pause, state), the rest, hand-over. 0: the destination has it (our VM is
 * stopped). On failure before the hand-over the VM runs on here (resumed, AfterResume); after
 * it, it stays paused. */
int instance_migrate_out(struct instance *inst, int fd, unsigned concurrency, struct migrate_stats *ret_stats);
/* Milliseconds from the start of instance_resume (or, after instance_receive, from the source's
 * hand-over) to the VM running again. */
double instance_resume_ms(const struct instance *inst);
/* Where the resume's time went, as one line. */
void instance_resume_report(const struct instance *inst, char *buf, size_t size);
/* A JSON object (malloc'd) with this instance's timings: how it started (resume or a received
 * migration, with the hand-over's phases) and, if given, the stats of a migration out. */
char *instance_summary_json(const struct instance *inst, const struct migrate_stats *out);
/* True while the VM runs. */
bool instance_running(struct instance *inst);
/* BeforeSuspend, pause, and write the VM back into its devices (state, memory, config): the
 * package (or the overlay) is a snapshot again, ready for the next resume. If the agent does
 * not answer BeforeSuspend (or its command fails) nothing else is done, the VM runs on, and the
 * error is -ECANCELED; `skip_agent` suspends without asking it. */
int instance_suspend(struct instance *inst, bool skip_agent);
/* Stop the VM, unmount, flush and close the devices. NULL is fine. */
void instance_free(struct instance *inst);
