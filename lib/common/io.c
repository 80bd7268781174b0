/* io.c — whole reads and writes (see io.h). */
#include "drafter/io.h"

#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

int io_read_full(int fd, void *buf, size_t len) {
        char *p = buf;
        while (len > 0) {
                ssize_t n = read(fd, p, len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -ECONNRESET;
                p += n;
                len -= (size_t)n;
        }
        return 0;
}

int io_write_iov(int fd, struct iovec *iov, int count) {
        while (count > 0) {
                struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)count};
                ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL);
                if (n < 0 && errno == ENOTSOCK)
                        n = writev(fd, iov, count); /* pipes and files */
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                while (count > 0 && (size_t)n >= iov->iov_len) {
                        n -= (ssize_t)iov->iov_len;
                        iov++;
                        count--;
                }
                if (count > 0) {
                        iov->iov_base = (char *)iov->iov_base + n;
                        iov->iov_len -= (size_t)n;
                }
        }
        return 0;
}
