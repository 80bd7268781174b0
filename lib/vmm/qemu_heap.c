/* drafter-qemu-heap.so — preloaded into the QEMU processes that lib/vmm starts (LD_PRELOAD, with
 * DRAFTER_QEMU_HEAP_MIB set; nothing happens without it). At QEMU's start it faults in that much
 * of the heap and keeps it there, so that what QEMU allocates later finds pages already mapped.
 *
 * Why: a destination QEMU's state load allocates a few MB of fresh heap (the address-space
 * dispatch tables it rebuilds on every memory-region commit, the devices' buffers), and a fresh
 * heap page costs a page fault and a zeroed page. About 1,100 of them fell inside a migration's
 * downtime, in the load and in QEMU's first steps after it (docs/performance.md). At start-up
 * the same faults cost nothing anyone waits for: the destination's QEMU starts while the blocks
 * stream in.
 *
 * The module also carries the guest-RAM toucher (qemu_touch.c), which has its own variables.
 *
 * Only glibc's documented malloc interface is used: large blocks come from the heap too (so
 * they reuse the faulted pages instead of fresh mappings) and the heap is not trimmed below
 * twice the reserve. */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#define HEAP_ENV "DRAFTER_QEMU_HEAP_MIB"
#define MAX_MIB 16 /* mallopt's mmap threshold stops at 32 MiB on 64-bit */

__attribute__((constructor)) static void drafter_qemu_heap(void) {
        const char *v = getenv(HEAP_ENV);
        long mib = v ? strtol(v, NULL, 10) : 0;
        /* Not for QEMU's own children, if it starts any. */
        unsetenv(HEAP_ENV);
        unsetenv("LD_PRELOAD");
        if (mib <= 0 || mib > MAX_MIB)
                return;
        size_t bytes = (size_t)mib << 20;
        if (!mallopt(M_MMAP_THRESHOLD, (int)(2 * bytes)) || !mallopt(M_TRIM_THRESHOLD, (int)(2 * bytes)))
                return;
        char *p = malloc(bytes);
        if (!p)
                return;
        explicit_bzero(p, bytes); /* a write per page: each is faulted in now */
        free(p);                  /* back to the top of the heap, which keeps it */
}
