/* vmm.h — one virtual machine monitor process: start, pause, resume, snapshot, restore, stop.
 *
 * The QEMU backend (lib/vmm/qemu.c) speaks QMP over a unix socket. Guest RAM is a shared file
 * mapping (memory-backend-file, share=on) of `memory_path`, so a snapshot is only the device
 * state (migration with x-ignore-shared to a file: a few hundred KB) and the memory file itself.
 * KVM is used when /dev/kvm can be opened and QEMU runs under it, else TCG with thread=single.
 * Guest links are named virtio-serial ports whose host ends are unix sockets in the runtime
 * directory (QEMU listens).
 * All calls are blocking and not thread-safe for one VM; errors carry messages (error.h).
 *
 * The runtime directory holds qmp.sock, <port>.sock per port, qemu.log (QEMU's stderr, and its
 * stdout unless enable_output) and console.log; its paths must fit a unix socket address
 * (107 bytes). QEMU runs in its own process group, with its stdin from /dev/null unless
 * enable_input, and is killed (PR_SET_PDEATHSIG) when the *thread* that called vmm_start()
 * exits: start VMs from a thread that outlives them.
 *
 * Needs QEMU >= 9.1 (file migration channels, migrate-incoming exit-on-error). */
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
        const char *kernel;      /* bzImage; NULL: none (the firmware finds nothing to boot) */
        const char *initrd;      /* NULL: none; needs a kernel */
        const char *boot_args;   /* NULL: none; needs a kernel */
        /* Guest RAM. Booting: created if missing, extended (with zeros) if shorter than
         * memory_bytes, refused if longer (it would be some other VM's memory). Incoming: must
         * exist with exactly memory_bytes (the snapshot's RAM), nothing is created or resized. */
        const char *memory_path;
        uint64_t memory_bytes;   /* multiple of 2 MiB */
        int cpus;                /* >= 1 */
        const char *cpu_model;   /* NULL: "max" under TCG, "host" under KVM */
        /* "kvm", "tcg", or NULL: KVM if /dev/kvm opens read-write and QEMU starts under it (some
         * hosts' KVM cannot run -cpu host: QEMU exits, and TCG is used instead), else TCG. A
         * restore must use the accelerator and CPU model its snapshot was made with. */
        const char *accelerator;
        struct vmm_drive drives[VMM_MAX_DRIVES]; /* names unique; at most 31 characters */
        size_t drive_count;
        /* virtio-serial port names, e.g. "drafter.agent": unique, no '/', not "qmp" */
        const char *ports[VMM_MAX_PORTS];
        size_t port_count;
        /* Guest serial console: to our stdout when enable_output, from our stdin when
         * enable_input too; otherwise to <runtime_dir>/console.log (enable_input alone is
         * ignored: the console has one backend). */
        bool enable_output, enable_input;
        const char *console_log; /* NULL: <runtime_dir>/console.log; only without enable_output */
        /* A virtio-net NIC on tap device `tap` (which must exist where QEMU runs) with this MAC;
         * NULL: none. QEMU runs in the named network namespace `netns` (/run/netns/NAME), NULL: ours. */
        const char *tap, *mac;
        const char *netns;
};

struct vmm;

/* Start QEMU and connect to QMP. With `incoming` the VM waits (paused, no boot) for
 * vmm_restore(); otherwise it boots and runs. */
int vmm_start(const struct vmm_config *cfg, bool incoming, struct vmm **ret_vmm);
int vmm_pause(struct vmm *vm);
int vmm_resume(struct vmm *vm);
/* Paused VM: write its device state to state_path (replaced atomically: QEMU writes a temporary
 * file beside it, which is fsynced and renamed; guest RAM stays in the memory file, which is
 * fsynced too). Returns when QEMU reports the migration completed. The VM stays paused
 * (QEMU says "postmigrate") and vmm_resume() continues it. -EBUSY if it is running, -EALREADY
 * if it has not run since its last snapshot (QEMU cannot migrate it again; that one is valid). */
int vmm_snapshot(struct vmm *vm, const char *state_path);
/* vmm_snapshot() without making anything durable (no fsync of the state file, its directory or
 * the memory file): for a live migration, whose state is read back at once and whose memory
 * pages the caller hands on itself (fuse_export_sync). */
int vmm_save_state(struct vmm *vm, const char *state_path);
/* vmm_save_state() of a running VM, which the migration that writes the state stops itself:
 * QEMU sets the migration up while the VM runs, so only the device state is written while it is
 * paused (2-3 ms against 5-9 for vmm_pause() + vmm_save_state(), whose `migrate` set up a
 * migration thread in the pause). on_stopped(ctx) is called once the VM is paused (QEMU's STOP
 * event), while QEMU writes the state (or has just written it); at once for a VM paused already, which is saved as by
 * vmm_save_state(). On a failure the VM may be running or paused (vmm_resume() continues it). */
int vmm_stop_and_save_state(struct vmm *vm, const char *state_path, void (*on_stopped)(void *), void *ctx);
/* VM started with `incoming`: load the device state from state_path (which must exist and be
 * non-empty) against the memory file; the VM stays paused until vmm_resume(). A failed load
 * leaves the QEMU process waiting: vmm_stop()/vmm_free() it. */
int vmm_restore(struct vmm *vm, const char *state_path);
/* vmm_restore() in two steps: start the load (QEMU reads the file on its own) and return;
 * vmm_restore_wait() waits for it to end, with vmm_restore()'s result. The file must stay until
 * then. Between the two, only vmm_stop()/vmm_free() may be called. */
int vmm_restore_start(struct vmm *vm, const char *state_path);
/* vmm_restore_start() from a stream instead of a file: QEMU loads what is written to *ret_fd (a
 * unix socket; the caller writes the state and closes it) as it arrives. */
int vmm_restore_stream_start(struct vmm *vm, int *ret_fd);
/* After vmm_restore_stream_start(), while the load cannot end (the stream's last byte is held
 * back): QEMU runs the VM as soon as the load ends, without a `cont` after it (-EALREADY if the
 * load had ended). A state saved from a paused VM still loads paused (vmm_resume() it). */
int vmm_restore_autostart(struct vmm *vm);
int vmm_restore_wait(struct vmm *vm);
/* "quit" over QMP (up to 3 s), then SIGTERM (2 s), then SIGKILL; reaps the process and removes
 * its sockets. Idempotent; returns 0 and keeps the current error message, so error paths can
 * call it. */
int vmm_stop(struct vmm *vm);
/* From now on QEMU's threads run only on CPUs nothing else wants (SCHED_IDLE): for a VM that is
 * done, whose last steps and exit (unmapping its RAM takes milliseconds) should not slow a VM that
 * took over from it on this host. */
int vmm_yield_cpu(struct vmm *vm);
/* Stops it if running; frees. NULL is fine. */
void vmm_free(struct vmm *vm);

/* Flags of vmm_touch_memory(). */
enum {
        VMM_TOUCH_WAIT = 1u << 1,  /* return once done (else queue it and return at once) */
        VMM_TOUCH_IDLE = 1u << 2,  /* QEMU does it only on an otherwise idle CPU */
        VMM_TOUCH_DONE = 1u << 3,  /* after it, the mapping's readahead back to normal */
};
/* Has QEMU map bytes [offset, offset+length) of its guest-RAM file (whole pages) into its own
 * page tables, as the VM's first touches would: for ranges already in the page cache. From the
 * first request until one with VMM_TOUCH_DONE, QEMU reads a page of guest RAM that is not
 * cached alone, without readahead (such a read may wait for the migration). Needs drafter-qemu-heap.so (its
 * toucher, lib/vmm/qemu_touch.c): -EOPNOTSUPP without it, -EAGAIN if a request that does not
 * wait finds the queue full, -ETIMEDOUT if QEMU did not answer within 2 s (then every later
 * call fails). Thread-safe while the VM is not freed. */
int vmm_touch_memory(struct vmm *vm, uint64_t offset, uint64_t length, unsigned flags);
/* The request QEMU is working on (if it ever answered one) at the normal priority from now on:
 * for a VMM_TOUCH_IDLE request that someone must wait for after all. */
void vmm_touch_hurry(struct vmm *vm);

/* QEMU's run state as query-status names it: "running", "paused", "inmigrate", "postmigrate",
 * "shutdown", … *ret_status stays valid until the next call for this VM. */
int vmm_status(struct vmm *vm, const char **ret_status);

/* The QEMU process id (still returned after it has been reaped, for messages). */
pid_t vmm_pid(const struct vmm *vm);
/* When QEMU last said the VM started running (its RESUME event, CLOCK_MONOTONIC ns as read;
 * 0 if not yet). A restore's VM may run before vmm_restore_wait() returns: QEMU starts it as
 * the load ends and says the migration completed after that. */
uint64_t vmm_resumed_ns(const struct vmm *vm);
/* Host end of virtio-serial port `name` (a unix socket path), or NULL. */
const char *vmm_port_path(const struct vmm *vm, const char *name);
/* The accelerator QEMU runs under: "kvm" or "tcg" (record it with a snapshot). */
const char *vmm_accelerator(const struct vmm *vm);
/* True while the QEMU process is alive (reaps it if it exited). */
bool vmm_running(struct vmm *vm);
