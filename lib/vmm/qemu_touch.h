/* qemu_touch.h — the requests drafter-peer sends to the toucher preloaded into QEMU
 * (qemu_touch.c): map ranges of the guest-RAM file into QEMU's own page tables ahead of the
 * VM's first touch. One request per SOCK_SEQPACKET message; a reply (the request, with
 * `result` and `tid` set) only where asked for. */
#pragma once

#include <stdint.h>

#define QEMU_TOUCH_FD_ENV   "DRAFTER_QEMU_TOUCH_FD"   /* the socket's descriptor number in QEMU */
#define QEMU_TOUCH_PATH_ENV "DRAFTER_QEMU_TOUCH_PATH" /* the guest-RAM file QEMU maps */
#define QEMU_TOUCH_FD       3                         /* where lib/vmm puts it */
#define QEMU_TOUCH_FD_STR   "3"

enum {
        QEMU_TOUCH_REPLY = 1u << 1, /* answer once done */
        QEMU_TOUCH_IDLE = 1u << 2,  /* only on an otherwise idle CPU (SCHED_IDLE; else SCHED_OTHER) */
        QEMU_TOUCH_DONE = 1u << 3,  /* no range: readahead on the mapping back to normal */
};

struct qemu_touch_req {
        uint64_t offset, length; /* bytes in the file; whole pages */
        uint32_t flags;
        int32_t result; /* in a reply: 0 or -errno */
        int32_t tid;    /* in a reply: the toucher's thread, for the sender to hurry */
        uint32_t reserved;
};
