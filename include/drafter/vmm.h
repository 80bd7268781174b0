/* vmm.h — one virtual machine monitor process: start, pause, resume, snapshot, restore, stop.
 *
 * The QEMU backend (lib/vmm/qemu.c) speaks QMP over a unix socket. Guest RAM is a shared file
 * mapping (memory-backend-file, share=on) of `memory_path`, so a snapshot is only the device
 * state (migration with x-ignore-shared to a file: a few hundred KB) and the memory file itself.
 * KVM is used when /dev/kvm can be opened, else TCG with thread=single. Guest links are named
 * virtio-serial ports whose host ends are unix sockets in the runtime directory (QEMU listens).
 * All calls are blocking and not thread-safe for one VM; errors carry messages (error.h). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define VMM_MAX_DRIVES 8
#define VMM_MAX_PORTS 4

struct vmm_drive {
        const char *name; /* QEMU node name / id: letters, digits, '-' */
        const char *path; /* raw image; drives appear in the guest in this order: vda, vdb, … */
        bool read_only;
};

struct vmm_config {
        const char *qemu_bin;    /* NULL: "qemu-system-x86_64" */
        const char *runtime_dir; /* exists; QMP and port sockets, the console log go here */
        const char *kernel;      /* bzImage */
        const char *initrd;      /* NULL: none */
        const char *boot_args;
        const char *memory_path; /* guest RAM: created or resized to memory_bytes if needed */
        uint64_t memory_bytes;   /* multiple of 2 MiB */
        int cpus;                /* >= 1 */
        const char *cpu_model;   /* NULL: "max" under TCG, "host" under KVM */
        struct vmm_drive drives[VMM_MAX_DRIVES];
        size_t drive_count;
        const char *ports[VMM_MAX_PORTS]; /* virtio-serial port names, e.g. "drafter.agent" */
        size_t port_count;
        /* Guest serial console: to our stdout when enable_output, from our stdin when
         * enable_input; otherwise to <runtime_dir>/console.log. */
        bool enable_output, enable_input;
        const char *console_log; /* NULL: <runtime_dir>/console.log; only without enable_output */
};

struct vmm;

/* Start QEMU and connect to QMP. With `incoming` the VM waits (paused, no boot) for
 * vmm_restore(); otherwise it boots and runs. */
int vmm_start(const struct vmm_config *cfg, bool incoming, struct vmm **ret_vmm);
int vmm_pause(struct vmm *vm);
int vmm_resume(struct vmm *vm);
/* Paused VM: write its device state to state_path (created/truncated; guest RAM stays in the
 * memory file, which is synced). Returns when QEMU reports the migration completed. */
int vmm_snapshot(struct vmm *vm, const char *state_path);
/* VM started with `incoming`: load the device state from state_path; the VM stays paused. */
int vmm_restore(struct vmm *vm, const char *state_path);
/* "quit" over QMP, then SIGTERM, then SIGKILL; reaps the process. Idempotent. */
int vmm_stop(struct vmm *vm);
/* Stops it if running; frees. NULL is fine. */
void vmm_free(struct vmm *vm);

pid_t vmm_pid(const struct vmm *vm);
/* Host end of virtio-serial port `name` (a unix socket path), or NULL. */
const char *vmm_port_path(const struct vmm *vm, const char *name);
/* "kvm" or "tcg". */
const char *vmm_accelerator(const struct vmm *vm);
/* True while the QEMU process is alive (reaps it if it exited). */
bool vmm_running(struct vmm *vm);
