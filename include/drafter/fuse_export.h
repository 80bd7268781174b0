/* fuse_export.h — devices as files in a FUSE mount: what a VMM maps and opens.
 *
 * One mount per VM instance; each device is a regular file named after it, of the device's exact
 * size. The kernel's writeback cache is on, so a shared mapping of a file (QEMU's guest RAM with
 * share=on) works, and pages dirtied through it reach the device (and any dirty tracker in its
 * stack) on write-back. fuse_export_sync() is the barrier a pre-copy cycle needs: when it returns,
 * every page dirtied before the call has reached the device. (syncfs() alone is not such a
 * barrier on FUSE: it can return before the daemon has received the pages.) A VMM's fsync() also
 * flushes the device;
 * fallocate(PUNCH_HOLE or ZERO_RANGE) discards. Reads of blocks that have not arrived wait in the
 * device's waiting cache; fuse_export_invalidate() drops kernel-cached pages of blocks that
 * arrive later. Served by a pool of threads, so a waiting read stalls nothing else.
 *
 * A mount left behind by a process that died is detected and detached on the next start. */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "drafter/block_device.h"

struct fuse_export_device {
        const char *name;         /* file name in the mount */
        struct block_device *dev; /* not owned */
        bool read_only;
};

struct fuse_export;

/* Mount at `mountpoint` (created if missing) and start serving. */
int fuse_export_start(const char *mountpoint, const struct fuse_export_device *devices, size_t count,
                      struct fuse_export **ret_export);

enum fuse_export_flags {
        /* No writeback cache: every write() reaches the device before it returns (no shared
         * writable mappings then). For plain disks that must be frozen at a migration's end. */
        FUSE_EXPORT_WRITE_THROUGH = 1 << 0,
        /* Page faults on mapped files read their page only, not the kernel's readahead window
         * around it: for a VM whose memory arrives lazily over a link, where every block read
         * ahead delays the faults after it. */
        FUSE_EXPORT_NO_READAHEAD = 1 << 1,
        /* Page faults read the 64 KiB around their page, not the kernel's window of up to 1 MiB:
         * for a VM receiving its memory live, whose page cache is filled ahead of it (page
         * warmer), so that a fault on a page not cached yet neither waits for neighbours still
         * on their way nor fills pages it does not use. */
        FUSE_EXPORT_BLOCK_READAHEAD = 1 << 2,
        /* Dirty pages are not held to FUSE's strict share of the dirty limit (a few tens of MB):
         * the kernel writes them back only when the system has much dirty data or they are old,
         * and whoever needs the devices current asks (fuse_export_sync, fuse_export_write_back).
         * For guest RAM: a vCPU that writes a page under write-back waits for the daemon, and
         * under FUSE's limits some 40 MB were always being written back (docs/design.md). */
        FUSE_EXPORT_UNTHROTTLED = 1 << 3,
};
int fuse_export_start_flags(const char *mountpoint, const struct fuse_export_device *devices, size_t count,
                            unsigned flags, struct fuse_export **ret_export);

/* Path of device `index` inside the mount (valid until stop). */
const char *fuse_export_path(struct fuse_export *fx, size_t index);

/* The most bytes one read request (or one readahead window, all of whose pages are locked
 * together) of a device file covers: the mount's readahead. */
uint32_t fuse_export_read_window(const struct fuse_export *fx);

/* Write back every page dirtied through mappings or the page cache, and wait until the devices
 * have received them all. Thread-safe. */
int fuse_export_sync(struct fuse_export *fx);

/* Write back the pages dirtied before the call a `chunk` of each file at a time, each chunk's
 * write-back waited for before the next starts: only one chunk's pages are ever in write-back, so
 * a writer that touches one (a running VM's vCPU) waits for a few requests, not for all of them.
 * Not a barrier on kernels whose FUSE ends write-back before the daemon answers: a page may
 * still be on its way to the device when it returns (use fuse_export_sync for that). `chunk` 0:
 * 16 MiB. */
int fuse_export_write_back(struct fuse_export *fx, uint64_t chunk);

/* Drop cached pages of [off, off+len) of device `index` (after its blocks changed underneath). */
int fuse_export_invalidate(struct fuse_export *fx, size_t index, uint64_t off, uint64_t len);

/* Put `len` bytes at `off` of device `index` into the kernel's page cache as they are on the
 * device (FUSE_NOTIFY_STORE: no read request, no round trip). Only for data that no reader is
 * waiting for and no writer is changing through the file: a page the kernel holds is
 * overwritten, and a read waiting on one of these pages would hold up the call. -ENOENT: the
 * kernel does not know the file (nobody opened it). */
int fuse_export_store(struct fuse_export *fx, size_t index, uint64_t off, const void *data, size_t len);

/* Unmount (lazily if still busy), stop the threads, free. NULL is fine. */
void fuse_export_stop(struct fuse_export *fx);

/* If `mountpoint` is a dead FUSE mount (ENOTCONN), detach it. Returns 1 if one was cleared. */
int fuse_export_clear_stale(const char *mountpoint);
