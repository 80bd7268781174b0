/* drafter-liveness — runs in the guest once it has booted: tells the host it is ready (one
 * liveness line on the "drafter.liveness" virtio-serial port, or on vsock port --vsock-port). */
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/guestlink.h"
#include "drafter/log.h"

#include <errno.h>
#include <poll.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
        int64_t port = 25, timeout_ns = 60 * NSEC_PER_SEC;
        struct flag flags[] = {
                {"vsock-port", FLAG_INT, &port, "VSocket port"},
                {"vsock-timeout", FLAG_DURATION, &timeout_ns, "VSocket dial timeout"},
        };
        int r = flags_parse("drafter-liveness", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, stderr, NULL);
        if (r == FLAGS_HELP)
                return 0;
        if (r < 0)
                return 2;
        log_setup_from_env();
        if (port < 0 || port > UINT32_MAX || timeout_ns <= 0) {
                log_error("--vsock-port must be 0-%u and --vsock-timeout positive", UINT32_MAX);
                return 2;
        }
        uint64_t deadline = clock_now_ns() + (uint64_t)timeout_ns;
        int fd;
        if (guestlink_guest_open(GUESTLINK_LIVENESS_PORT_NAME, (uint32_t)port, (uint64_t)timeout_ns, &fd) < 0) {
                log_error("%s", error_message());
                return 1;
        }
        /* A virtio-serial port is writable once the host has connected to its end. */
        static const char line[] = "{\"liveness\":\"ready\"}\n";
        size_t done = 0;
        while (done < sizeof(line) - 1) {
                uint64_t now = clock_now_ns();
                if (now >= deadline) {
                        log_error("liveness: the host did not connect in time");
                        return 1;
                }
                struct pollfd p = {.fd = fd, .events = POLLOUT};
                if (poll(&p, 1, (int)MIN((deadline - now) / NSEC_PER_MSEC + 1, 1000ULL)) <= 0 || !(p.revents & POLLOUT)) {
                        if (p.revents & POLLHUP)
                                clock_sleep_ns(10 * NSEC_PER_MSEC); /* no host yet */
                        continue;
                }
                ssize_t n = write(fd, line + done, sizeof(line) - 1 - done);
                if (n < 0 && errno != EINTR && errno != EAGAIN) {
                        log_error("liveness: write: %s", strerror(errno));
                        return 1;
                }
                if (n > 0)
                        done += (size_t)n;
        }
        close(fd);
        return 0;
}
