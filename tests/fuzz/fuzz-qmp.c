/* fuzz-qmp — the QMP client (lib/vmm/qmp.c) against an arbitrary "QEMU": the input is what the
 * monitor socket delivers (greeting, replies, events, in any shape), fed through a socketpair.
 * The client connects, runs a command and waits for an event, as the VMM layer does. Nothing may
 * crash, leak or wait past the input's end. */
#include "fuzz.h"
#include "drafter/clock.h"
#include "drafter/log.h"
#include "../../lib/vmm/qmp.h"

#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int LLVMFuzzerInitialize(int *argc, char ***argv) {
        log_set_level(LOG_NONE);
        return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        if (size > (256 << 10)) /* all of it goes into the socket before the client reads */
                return 0;
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                abort();
        int big = 4 << 20;
        setsockopt(sv[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
        for (size_t off = 0; off < size;) {
                ssize_t w = send(sv[1], data + off, size - off, MSG_NOSIGNAL);
                if (w <= 0)
                        abort();
                off += (size_t)w;
        }
        shutdown(sv[1], SHUT_WR); /* the client sees the end, never a wait */
        struct qmp *q;
        if (qmp_open_fd(sv[0], "fuzz", clock_now_ns() + NSEC_PER_SEC, &q) == 0) {
                json_t *ret = NULL;
                if (qmp_execute(q, "query-status", NULL, &ret) == 0)
                        json_decref(ret);
                json_t *event = NULL;
                if (qmp_wait_event(q, "STOP", NSEC_PER_SEC, &event) == 0)
                        json_decref(event);
                qmp_free(q);
        }
        close(sv[1]);
        return 0;
}
