/* transport.c — TCP (IPv4/IPv6) and unix stream sockets for migrations (see transport.h). */
#include "drafter/transport.h"
#include "drafter/address.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"

#include <errno.h>
#include <stdbool.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static bool is_unix(const char *address) {
        return strncmp(address, "unix:", 5) == 0;
}

static int unix_address(const char *address, struct sockaddr_un *sa) {
        const char *path = address + 5;
        *sa = (struct sockaddr_un){.sun_family = AF_UNIX};
        if (!*path || strlen(path) >= sizeof(sa->sun_path))
                return error_set(-EINVAL, "address %s: bad unix socket path", address);
        strcpy(sa->sun_path, path);
        return 0;
}

static void tune(int fd) {
        int one = 1, size = 4 << 20;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)); /* fails harmlessly on unix */
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof(size));
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size));
}

int transport_listen(const char *address, int *ret_fd, int *ret_port) {
        if (is_unix(address)) {
                struct sockaddr_un sa;
                int r = unix_address(address, &sa);
                if (r < 0)
                        return r;
                unlink(sa.sun_path);
                _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 8) < 0)
                        return error_set_errno(-errno, "cannot listen on %s", address);
                if (ret_port)
                        *ret_port = 0;
                *ret_fd = TAKE_FD(fd);
                return 0;
        }
        char host[256], port[16];
        int r = address_split(address, host, sizeof(host), port, sizeof(port));
        if (r < 0)
                return r;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
        struct addrinfo *res;
        int e = getaddrinfo(*host ? host : NULL, port, &hints, &res);
        if (e != 0)
                return error_set(-EADDRNOTAVAIL, "cannot resolve %s: %s", address, gai_strerror(e));
        r = error_set(-EADDRNOTAVAIL, "cannot listen on %s: no usable address", address);
        /* One socket: IPv6 with v4-mapped addresses when the host is empty, else the first match. */
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
                if (!*host && ai->ai_family != AF_INET6 && ai->ai_next)
                        continue;
                _cleanup_close_ int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
                if (fd < 0)
                        continue;
                int one = 1, zero = 0;
                setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
                if (ai->ai_family == AF_INET6)
                        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, *host ? &one : &zero, sizeof(int));
                if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || listen(fd, 8) < 0) {
                        r = error_set_errno(-errno, "cannot listen on %s", address);
                        continue;
                }
                struct sockaddr_storage ss = {0};
                socklen_t len = sizeof(ss);
                if (ret_port && getsockname(fd, (struct sockaddr *)&ss, &len) == 0)
                        *ret_port = (int)address_port(&ss);
                *ret_fd = TAKE_FD(fd);
                r = 0;
                break;
        }
        freeaddrinfo(res);
        return r;
}

int transport_accept(int listen_fd, int timeout_ms, int *ret_fd) {
        struct pollfd p = {.fd = listen_fd, .events = POLLIN};
        int n;
        do
                n = poll(&p, 1, timeout_ms);
        while (n < 0 && errno == EINTR);
        if (n < 0)
                return error_set_errno(-errno, "poll");
        if (n == 0)
                return error_set(-ETIMEDOUT, "no peer connected");
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "accept");
        tune(fd);
        *ret_fd = fd;
        return 0;
}

static int connect_once(const char *address, int *ret_fd) {
        if (is_unix(address)) {
                struct sockaddr_un sa;
                int r = unix_address(address, &sa);
                if (r < 0)
                        return r;
                _cleanup_close_ int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
                if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
                        return error_set_errno(-errno, "cannot connect to %s", address);
                *ret_fd = TAKE_FD(fd);
                return 0;
        }
        char host[256], port[16];
        int r = address_split(address, host, sizeof(host), port, sizeof(port));
        if (r < 0)
                return r;
        struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
        struct addrinfo *res;
        int e = getaddrinfo(*host ? host : "localhost", port, &hints, &res);
        if (e != 0)
                return error_set(-EHOSTUNREACH, "cannot resolve %s: %s", address, gai_strerror(e));
        r = -ECONNREFUSED;
        for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
                _cleanup_close_ int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
                if (fd < 0)
                        continue;
                if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
                        r = error_set_errno(-errno, "cannot connect to %s", address);
                        continue;
                }
                tune(fd);
                *ret_fd = TAKE_FD(fd);
                r = 0;
                break;
        }
        freeaddrinfo(res);
        return r;
}

int transport_connect(const char *address, int timeout_ms, int *ret_fd) {
        uint64_t deadline = clock_now_ns() + (uint64_t)(timeout_ms < 0 ? 0 : timeout_ms) * NSEC_PER_MSEC;
        for (;;) {
                int r = connect_once(address, ret_fd);
                if (r >= 0 || (r != -ECONNREFUSED && r != -ENOENT) || clock_now_ns() >= deadline)
                        return r;
                clock_sleep_ns(50 * NSEC_PER_MSEC);
        }
}
