/* page_warmer.h — on a receiving peer, keep the VM's memory file in the kernel's page cache as its
 * blocks arrive, so that the VM's first touches after the hand-over are minor faults instead of
 * FUSE reads (each of which fetches a whole readahead window, megabytes, on the downtime path).
 *
 * The receiving thread stores each block as it writes it (page_warmer_store, and while QEMU may
 * read the file page_warmer_landed); what it could not store is queued for the warmer's thread.
 * That thread copies every queued block from the device into the FUSE file's page cache
 * (fuse_export_store: the kernel takes the data without a read request; where it cannot, the
 * thread reads the block through the file, readahead off). When a block it cached arrives again
 * (a pre-copy cycle) or is about to go missing (a DIRTY list), its cached pages are dropped
 * first, after any store of it in flight; a block that is not present is never touched, so the
 * thread never waits for the migration.
 * It pauses while QEMU loads the state (page_warmer_pause): the load's faults on guest RAM are
 * on the downtime path, and a store holds the pages it fills. Stop it before the VM may run: from
 * then on the VM's own faults fill the cache, and a late copy would overwrite a page the VM has
 * since written.
 *
 * With a toucher (page_warmer_set_toucher) the thread also has the VMM map each cached block
 * into its own page tables, at idle priority, so that the VM's first touches after the
 * hand-over do not fault either. The toucher may be given a block dropped meanwhile: the VMM
 * must then read its page alone (no readahead window: a window could lock pages of a block
 * that the receiving thread is about to store while it waits for another, missing one). */
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "drafter/block_device.h"
#include "drafter/fuse_export.h"

struct page_warmer;

/* For the device `dev` (a waiting cache) served as file `index` of `fx`. Reads nothing yet. */
int page_warmer_new(struct fuse_export *fx, size_t index, struct block_device *dev, struct page_warmer **ret_warmer);
/* Queue every block present now and start the thread. */
int page_warmer_run(struct page_warmer *w);
/* Blocks [first, first+count) arrived (`zero`: zeros, not worth reading ahead: a VM rarely
 * touches never-used memory soon, and such a fault is a cheap read). Thread-safe. */
void page_warmer_arrived(struct page_warmer *w, uint64_t first, uint64_t count, bool zero);
/* Block `block` is about to be marked missing: afterwards no cached page of it remains. */
void page_warmer_dirtied(struct page_warmer *w, uint64_t block);
/* No store starts until page_warmer_free() (one in flight lands); thread-safe. NULL is fine. */
void page_warmer_pause(struct page_warmer *w);
/* Store block `block` (its contents `data`, or NULL: read from the device) into the page cache
 * now, on the caller's thread, over any older copy there: for the receiving thread, which has
 * just written it. Only while nothing reads the file (before QEMU's state load): a read holding
 * a page of the block while it waits for a missing block, which only the caller would deliver,
 * would hold the store forever. Fails (and the caller queues the block instead) where the kernel
 * refuses stores. */
int page_warmer_store(struct page_warmer *w, uint64_t block, const void *data);
/* Block `block` (contents `data`, or NULL) arrived while QEMU may be reading the file (its state
 * load), before the VM runs: stored now if no read can be waiting with a page of it held (every
 * block within a read window of it is here: fuse_export_read_window), else queued; a queued
 * block within reach that now qualifies is stored too. Never waits for a read that waits for a
 * missing block. */
void page_warmer_landed(struct page_warmer *w, uint64_t block, const void *data);
struct page_warmer_toucher {
        /* Map file bytes [offset, offset+length) into the VMM's page tables, at idle priority;
         * returns once done (< 0: never asked again). */
        int (*touch)(void *ctx, uint64_t offset, uint64_t length);
        /* The request out now at the normal priority: someone waits for it. Must not block. */
        void (*hurry)(void *ctx);
        void *ctx;
};
/* From now on every cached block (those cached so far first) goes to the toucher as well, from
 * the warmer's thread, while it is not paused (a request out as it pauses is hurried). NULL
 * stops it: returns once no request is out (before the VMM goes away). */
void page_warmer_set_toucher(struct page_warmer *w, const struct page_warmer_toucher *t);
/* No request to the toucher from now on; the one out, if any, is hurried, not waited for. */
void page_warmer_end_touching(struct page_warmer *w);
/* Cache what is still queued (the last blocks of a migration: the VM's hottest pages, about to
 * be touched first), for at most a few ms; stop the thread and free. NULL is fine. */
void page_warmer_free(struct page_warmer *w);
