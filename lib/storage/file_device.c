/* file_device.c — a file or block device through pread/pwrite; optionally sparse. */
#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>

struct file_device {
        struct block_device dev;
        int fd;
        unsigned flags;
        bool seek_holes; /* a regular file whose holes lseek(SEEK_DATA) can find */
        char *path;
};

static struct file_device *to_file(struct block_device *dev) {
        return (struct file_device *)dev;
}

static int file_pread(struct file_device *f, char *p, size_t len, uint64_t off) {
        while (len > 0) {
                ssize_t n = pread(f->fd, p, len, (off_t)off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "%s: read of %s at %" PRIu64, f->dev.name, f->path, off);
                if (n == 0) {
                        /* The file shrank under us: what is past its end reads as zeros. */
                        memset(p, 0, len);
                        return 0;
                }
                p += n;
                len -= (size_t)n;
                off += (uint64_t)n;
        }
        return 0;
}

/*
 * Holes read as zeros without pread: reading a hole makes the kernel fill
 * fresh page-cache pages with zeros, which costs more than the copy itself
 * on a machine whose memory is touched for the first time (most of a
 * snapshot's memory and a new overlay are holes). A write that fills a
 * hole while this runs races with the read as any concurrent write does.
 */
static int file_read_at(struct block_device *dev, void *buf, size_t len, uint64_t off) {
        struct file_device *f = to_file(dev);
        char *p = buf;
        if (!f->seek_holes || len < 4096)
                return file_pread(f, p, len, off);

        uint64_t end = off + len;
        while (off < end) {
                off_t data = lseek(f->fd, (off_t)off, SEEK_DATA);
                if (data < 0 && errno != ENXIO) {
                        /* No SEEK_DATA here after all: read everything from now on. */
                        f->seek_holes = false;
                        return file_pread(f, p, (size_t)(end - off), off);
                }
                uint64_t start = data < 0 ? end : MIN((uint64_t)data, end);
                memset(p, 0, (size_t)(start - off));
                p += start - off;
                off = start;
                if (off == end)
                        break;
                off_t hole = lseek(f->fd, (off_t)off, SEEK_HOLE);
                uint64_t stop = hole < 0 ? end : MIN((uint64_t)hole, end);
                if (stop <= off)
                        stop = end; /* a hole appeared under us: pread sees what is there now */
                int r = file_pread(f, p, (size_t)(stop - off), off);
                if (r < 0)
                        return r;
                p += stop - off;
                off = stop;
        }
        return 0;
}

static int file_punch(struct file_device *f, size_t len, uint64_t off) {
        if (fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) < 0)
                return -errno;
        return 0;
}

static int file_write_at(struct block_device *dev, const void *buf, size_t len, uint64_t off) {
        struct file_device *f = to_file(dev);
        if (f->flags & FILE_DEVICE_READ_ONLY)
                return error_set(-EROFS, "%s: %s is read-only", dev->name, f->path);

        /* A sparse file keeps zero pages as holes; only page-aligned ranges can be punched. */
        if ((f->flags & FILE_DEVICE_SPARSE) && len >= 4096 && (off % 4096) == 0 && (len % 4096) == 0 &&
            buffer_is_zero(buf, len) && file_punch(f, len, off) == 0)
                return 0;

        const char *p = buf;
        while (len > 0) {
                ssize_t n = pwrite(f->fd, p, len, (off_t)off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "%s: write to %s at %" PRIu64, dev->name, f->path, off);
                p += n;
                len -= (size_t)n;
                off += (uint64_t)n;
        }
        return 0;
}

static int file_flush(struct block_device *dev) {
        struct file_device *f = to_file(dev);
        if (f->flags & FILE_DEVICE_READ_ONLY)
                return 0;
        if (fdatasync(f->fd) < 0)
                return error_set_errno(-errno, "%s: flush of %s", dev->name, f->path);
        return 0;
}

static int file_discard(struct block_device *dev, size_t len, uint64_t off) {
        struct file_device *f = to_file(dev);
        if (f->flags & FILE_DEVICE_READ_ONLY)
                return error_set(-EROFS, "%s: %s is read-only", dev->name, f->path);

        /* Punch the whole pages inside the range and zero the edges. */
        uint64_t first = (off + 4095) & ~4095ULL, last = (off + len) & ~4095ULL;
        static const char zeros[4096];
        if (first < last && file_punch(f, (size_t)(last - first), first) == 0) {
                int r = file_write_at(dev, zeros, (size_t)(first - off), off);
                if (r < 0)
                        return r;
                return file_write_at(dev, zeros, (size_t)(off + len - last), last);
        }
        while (len > 0) {
                size_t n = MIN(len, sizeof(zeros));
                int r = file_write_at(dev, zeros, n, off);
                if (r < 0)
                        return r;
                len -= n;
                off += n;
        }
        return 0;
}

static void file_close(struct block_device *dev) {
        struct file_device *f = to_file(dev);
        close(f->fd);
        free(f->path);
        free(f);
}

static const struct block_device_ops file_ops = {
        .read_at = file_read_at,
        .write_at = file_write_at,
        .flush = file_flush,
        .discard = file_discard,
        .close = file_close,
};

int file_device_fd(struct block_device *dev) {
        return dev->ops == &file_ops ? to_file(dev)->fd : -EINVAL;
}

int file_device_open(const char *name, const char *path, unsigned flags, uint64_t size, uint32_t block_size,
                     struct block_device **ret_dev) {
        bool read_only = flags & FILE_DEVICE_READ_ONLY;
        int oflags = (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC;
        if ((flags & FILE_DEVICE_CREATE) && !read_only)
                oflags |= O_CREAT;

        _cleanup_close_ int fd = open(path, oflags, 0644);
        if (fd < 0)
                return error_set_errno(-errno, "%s: cannot open %s", name, path);

        struct stat st;
        if (fstat(fd, &st) < 0)
                return error_set_errno(-errno, "%s: cannot stat %s", name, path);
        uint64_t actual;
        if (S_ISBLK(st.st_mode)) {
                if (ioctl(fd, BLKGETSIZE64, &actual) < 0)
                        return error_set_errno(-errno, "%s: cannot get the size of %s", name, path);
        } else if (S_ISREG(st.st_mode)) {
                actual = (uint64_t)st.st_size;
        } else {
                return error_set(-EINVAL, "%s: %s is not a regular file or block device", name, path);
        }

        if (size == 0) {
                size = actual;
        } else if (actual != size) {
                if (!(flags & FILE_DEVICE_CREATE) || actual != 0 || !S_ISREG(st.st_mode))
                        return error_set(-EINVAL, "%s: %s has %" PRIu64 " bytes, expected %" PRIu64, name, path,
                                         actual, size);
                if (ftruncate(fd, (off_t)size) < 0)
                        return error_set_errno(-errno, "%s: cannot size %s to %" PRIu64 " bytes", name, path,
                                               size);
        }

        _cleanup_free_ struct file_device *f = calloc(1, sizeof(*f));
        if (!f)
                return -ENOMEM;
        int r = block_device_init(&f->dev, &file_ops, name, size, block_size);
        if (r < 0)
                return r;
        f->path = strdup(path);
        if (!f->path) {
                free(f->dev.name);
                return -ENOMEM;
        }
        f->flags = flags;
        f->seek_holes = S_ISREG(st.st_mode);
        f->fd = TAKE_FD(fd);
        *ret_dev = &TAKE_PTR(f)->dev;
        return 0;
}
