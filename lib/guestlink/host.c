/* host.c — the host ends of the guest links: liveness and agent calls (see guestlink.h). */
#include "drafter/guestlink.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/io.h"
#include "drafter/log.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int guestlink_connect_unix(const char *path, uint64_t timeout_ns, int *ret_fd) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(path) >= sizeof(sa.sun_path))
                return error_set(-ENAMETOOLONG, "%s: socket path too long", path);
        strcpy(sa.sun_path, path);
        uint64_t deadline = clock_now_ns() + timeout_ns;
        for (;;) {
                int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0)
                        return error_set_errno(-errno, "%s: socket", path);
                if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
                        *ret_fd = fd;
                        return 0;
                }
                int e = errno;
                close(fd);
                if ((e != ENOENT && e != ECONNREFUSED) || clock_now_ns() >= deadline)
                        return error_set_errno(-e, "%s: cannot connect", path);
                clock_sleep_ns(5 * NSEC_PER_MSEC);
        }
}

/* Read one line into buf (NUL-terminated, without '\n'), waiting until deadline. Bytes after the
 * line stay in buf: *have counts them across calls. */
static int read_line(int fd, char *buf, size_t cap, size_t *have, uint64_t deadline, char **ret_line) {
        for (;;) {
                char *nl = memchr(buf, '\n', *have);
                if (nl) {
                        size_t n = (size_t)(nl - buf);
                        char *line = malloc(n + 1);
                        if (!line)
                                return -ENOMEM;
                        memcpy(line, buf, n);
                        line[n] = '\0';
                        memmove(buf, nl + 1, *have - n - 1);
                        *have -= n + 1;
                        *ret_line = line;
                        return 0;
                }
                if (*have == cap)
                        return error_set(-EMSGSIZE, "guest link: line longer than %zu bytes", cap);
                uint64_t now = clock_now_ns();
                if (now >= deadline)
                        return -ETIMEDOUT;
                struct pollfd p = {.fd = fd, .events = POLLIN};
                int ms = (int)MIN((deadline - now + NSEC_PER_MSEC - 1) / NSEC_PER_MSEC, (uint64_t)1000);
                int r = poll(&p, 1, ms);
                if (r < 0 && errno == EINTR)
                        continue;
                if (r < 0)
                        return error_set_errno(-errno, "guest link: poll");
                if (r == 0)
                        continue;
                ssize_t n = read(fd, buf + *have, cap - *have);
                if (n < 0 && (errno == EINTR || errno == EAGAIN))
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "guest link: read");
                if (n == 0)
                        return error_set(-ECONNRESET, "guest link: the VMM closed the connection");
                *have += (size_t)n;
        }
}

int guestlink_wait_liveness(const char *path, uint64_t timeout_ns) {
        uint64_t deadline = clock_now_ns() + timeout_ns;
        _cleanup_close_ int fd = -1;
        int r = guestlink_connect_unix(path, timeout_ns, &fd);
        if (r < 0)
                return error_prefix(r, "liveness");
        _cleanup_free_ char *buf = malloc(GUESTLINK_MAX_LINE);
        if (!buf)
                return -ENOMEM;
        size_t have = 0;
        for (;;) {
                char *line;
                r = read_line(fd, buf, GUESTLINK_MAX_LINE, &have, deadline, &line);
                if (r == -ETIMEDOUT) {
                        char d[32];
                        duration_format((int64_t)timeout_ns, d, sizeof(d));
                        return error_set(r, "liveness: the guest did not report ready within %s (did it boot?)", d);
                }
                if (r < 0)
                        return error_prefix(r, "liveness");
                bool ok = guestlink_is_liveness(line);
                if (!ok)
                        log_debug("liveness: ignoring \"%s\"", line);
                free(line);
                if (ok)
                        return 0;
        }
}

struct guestlink_agent {
        int fd;
        uint64_t next_call;
        char *buf;
        size_t have;
};

int guestlink_agent_connect(const char *path, uint64_t timeout_ns, struct guestlink_agent **ret_agent) {
        struct guestlink_agent *a = calloc(1, sizeof(*a));
        if (!a)
                return -ENOMEM;
        a->buf = malloc(GUESTLINK_MAX_LINE);
        /* Call ids differ between host processes: the agent answers a repeated id from memory. */
        a->next_call = clock_now_ns() ^ ((uint64_t)getpid() << 40);
        a->next_call &= INT64_MAX;
        a->fd = -1;
        int r = a->buf ? guestlink_connect_unix(path, timeout_ns, &a->fd) : -ENOMEM;
        if (r < 0) {
                guestlink_agent_free(a);
                return error_prefix(r, "agent");
        }
        *ret_agent = a;
        return 0;
}

int guestlink_agent_call(struct guestlink_agent *a, const char *function, uint64_t try_timeout_ns, unsigned tries) {
        uint64_t call = a->next_call++;
        _cleanup_free_ char *req = guestlink_encode_request(call, function);
        if (!req)
                return -ENOMEM;
        for (unsigned t = 0; t < MAX(tries, 1u); t++) {
                struct iovec iov = {req, strlen(req)};
                int r = io_write_iov(a->fd, &iov, 1);
                if (r < 0)
                        return error_set_errno(r, "agent: %s: cannot send the call", function);
                uint64_t deadline = clock_now_ns() + try_timeout_ns;
                for (;;) {
                        char *line = NULL;
                        r = read_line(a->fd, a->buf, GUESTLINK_MAX_LINE, &a->have, deadline, &line);
                        if (r == -ETIMEDOUT)
                                break;
                        if (r < 0)
                                return error_prefix(r, "agent: %s", function);
                        uint64_t got;
                        char *err;
                        r = guestlink_parse_response(line, &got, &err);
                        free(line);
                        if (r < 0) {
                                log_debug("agent: ignoring a line: %s", error_message());
                                continue;
                        }
                        if (got != call) { /* the answer to an earlier, abandoned try */
                                free(err);
                                continue;
                        }
                        r = *err ? error_set(-EIO, "agent: %s: %s", function, err) : 0;
                        free(err);
                        return r;
                }
                log_debug("agent: %s: no answer yet (try %u of %u)", function, t + 1, tries);
        }
        char d[32];
        duration_format((int64_t)try_timeout_ns, d, sizeof(d));
        return error_set(-ETIMEDOUT, "agent: %s: no answer within %s (%u tries)", function, d, MAX(tries, 1u));
}

void guestlink_agent_free(struct guestlink_agent *a) {
        if (!a)
                return;
        if (a->fd >= 0)
                close(a->fd);
        free(a->buf);
        free(a);
}
