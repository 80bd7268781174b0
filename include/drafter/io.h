/* io.h — whole reads and writes on file descriptors, restarting after signals and short
 * transfers. Writes to sockets never raise SIGPIPE (they fail with -EPIPE instead). */
#pragma once

#include <stddef.h>
#include <sys/uio.h>

/* Read exactly len bytes: 0, -ECONNRESET if the peer closed first, or -errno. */
int io_read_full(int fd, void *buf, size_t len);

/* Write every byte of the vector (which is consumed): 0 or -errno. */
int io_write_iov(int fd, struct iovec *iov, int count);
