/* kernel_bundle.c — read and write kernel + initramfs bundles (see kernel_bundle.h). */
#include "drafter/kernel_bundle.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/fs.h"

#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define COPY_CHUNK (1u << 20)

struct bundle_trailer {
        uint64_t kernel_offset, kernel_size, initrd_offset, initrd_size;
};

static uint64_t get_le64(const unsigned char *p) {
        uint64_t v;
        memcpy(&v, p, sizeof(v));
        return le64toh(v);
}

static void put_le64(unsigned char *p, uint64_t v) {
        v = htole64(v);
        memcpy(p, &v, sizeof(v));
}

static int pread_full(int fd, void *buf, size_t len, uint64_t off) {
        char *p = buf;
        while (len > 0) {
                ssize_t n = pread(fd, p, len, (off_t)off);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                if (n == 0)
                        return -EIO; /* shrank under us */
                p += n, off += (uint64_t)n, len -= (size_t)n;
        }
        return 0;
}

static int write_full(int fd, const void *buf, size_t len) {
        const char *p = buf;
        while (len > 0) {
                ssize_t n = write(fd, p, len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return -errno;
                p += n, len -= (size_t)n;
        }
        return 0;
}

/* [offset, offset + size) of a part must lie in [0, payload). */
static int check_part(const char *path, const char *part, uint64_t offset, uint64_t size, uint64_t payload) {
        if (offset % KERNEL_BUNDLE_ALIGN != 0)
                return error_set(-EINVAL, "kernel bundle %s: %s offset %" PRIu64 " is not a multiple of %d",
                                 path, part, offset, KERNEL_BUNDLE_ALIGN);
        if (offset > payload || size > payload - offset)
                return error_set(-EINVAL,
                                 "kernel bundle %s: %s of %" PRIu64 " bytes at offset %" PRIu64
                                 " goes beyond the %" PRIu64 " bytes before the trailer",
                                 path, part, size, offset, payload);
        return 0;
}

/* Parse and check the trailer; *ret_is_bundle false for a plain kernel. */
static int read_trailer(int fd, const char *path, uint64_t file_size, bool *ret_is_bundle,
                        struct bundle_trailer *ret) {
        *ret_is_bundle = false;
        if (file_size < KERNEL_BUNDLE_TRAILER_SIZE)
                return 0;
        unsigned char raw[KERNEL_BUNDLE_TRAILER_SIZE];
        int r = pread_full(fd, raw, sizeof(raw), file_size - KERNEL_BUNDLE_TRAILER_SIZE);
        if (r < 0)
                return error_set_errno(r, "kernel bundle %s: cannot read the trailer", path);
        if (memcmp(raw, KERNEL_BUNDLE_MAGIC, 8) != 0)
                return 0;

        struct bundle_trailer t = {
                .kernel_offset = get_le64(raw + 8),
                .kernel_size = get_le64(raw + 16),
                .initrd_offset = get_le64(raw + 24),
                .initrd_size = get_le64(raw + 32),
        };
        uint64_t payload = file_size - KERNEL_BUNDLE_TRAILER_SIZE;
        if (t.kernel_size == 0)
                return error_set(-EINVAL, "kernel bundle %s: the kernel is empty", path);
        if ((r = check_part(path, "kernel", t.kernel_offset, t.kernel_size, payload)) < 0)
                return r;
        if (t.initrd_size == 0 && t.initrd_offset != 0)
                return error_set(-EINVAL,
                                 "kernel bundle %s: an empty initrd at offset %" PRIu64 " (0 means none)",
                                 path, t.initrd_offset);
        if (t.initrd_size > 0) {
                if ((r = check_part(path, "initrd", t.initrd_offset, t.initrd_size, payload)) < 0)
                        return r;
                bool disjoint = t.kernel_offset + t.kernel_size <= t.initrd_offset ||
                                t.initrd_offset + t.initrd_size <= t.kernel_offset;
                if (!disjoint)
                        return error_set(-EINVAL,
                                         "kernel bundle %s: kernel [%" PRIu64 ", +%" PRIu64
                                         ") and initrd [%" PRIu64 ", +%" PRIu64 ") overlap",
                                         path, t.kernel_offset, t.kernel_size, t.initrd_offset,
                                         t.initrd_size);
        }
        *ret_is_bundle = true;
        *ret = t;
        return 0;
}

/* Copy [offset, offset + size) of in_fd to out_path via a temporary file and a rename. pread and
 * write rather than copy_file_range: the bundle often sits on a FUSE mount, the output elsewhere. */
static int extract_part(int in_fd, const char *bundle_path, uint64_t offset, uint64_t size,
                        const char *out_path) {
        _cleanup_free_ char *tmp = NULL;
        if (asprintf(&tmp, "%s.tmpXXXXXX", out_path) < 0)
                return -ENOMEM;
        _cleanup_close_ int out = mkostemp(tmp, O_CLOEXEC);
        if (out < 0)
                return error_set_errno(-errno, "kernel bundle: cannot create %s", out_path);
        _cleanup_free_ char *buf = malloc(COPY_CHUNK);
        int r = buf ? 0 : -ENOMEM;
        for (uint64_t done = 0; r >= 0 && done < size;) {
                size_t n = (size_t)(size - done < COPY_CHUNK ? size - done : COPY_CHUNK);
                if ((r = pread_full(in_fd, buf, n, offset + done)) < 0)
                        error_set_errno(r, "kernel bundle %s: cannot read", bundle_path);
                else if ((r = write_full(out, buf, n)) < 0)
                        error_set_errno(r, "kernel bundle: cannot write %s", tmp);
                done += n;
        }
        if (r >= 0 && fchmod(out, 0644) < 0)
                r = error_set_errno(-errno, "kernel bundle: %s", tmp);
        if (r >= 0 && rename(tmp, out_path) < 0)
                r = error_set_errno(-errno, "kernel bundle: cannot rename %s to %s", tmp, out_path);
        if (r < 0)
                unlink(tmp);
        return r;
}

int kernel_bundle_extract(const char *bundle_path, const char *out_dir, char **ret_kernel_path,
                          char **ret_initrd_path) {
        _cleanup_close_ int fd = open(bundle_path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "kernel bundle %s", bundle_path);
        struct stat st;
        if (fstat(fd, &st) < 0)
                return error_set_errno(-errno, "kernel bundle %s", bundle_path);
        if (!S_ISREG(st.st_mode))
                return error_set(-EINVAL, "kernel bundle %s is not a regular file", bundle_path);
        if (st.st_size == 0)
                return error_set(-EINVAL, "kernel bundle %s is empty", bundle_path);

        bool is_bundle;
        struct bundle_trailer t;
        int r = read_trailer(fd, bundle_path, (uint64_t)st.st_size, &is_bundle, &t);
        if (r < 0)
                return r;
        if (!is_bundle)
                t = (struct bundle_trailer){.kernel_offset = 0, .kernel_size = (uint64_t)st.st_size};

        _cleanup_free_ char *kernel_path = NULL, *initrd_path = NULL;
        if (asprintf(&kernel_path, "%s/kernel", out_dir) < 0 ||
            asprintf(&initrd_path, "%s/initrd", out_dir) < 0)
                return -ENOMEM;
        if ((r = extract_part(fd, bundle_path, t.kernel_offset, t.kernel_size, kernel_path)) < 0)
                return r;
        if (t.initrd_size > 0) {
                if ((r = extract_part(fd, bundle_path, t.initrd_offset, t.initrd_size, initrd_path)) < 0)
                        return r;
        } else {
                if (unlink(initrd_path) < 0 && errno != ENOENT)
                        return error_set_errno(-errno, "kernel bundle: cannot remove the stale %s",
                                               initrd_path);
                free(initrd_path);
                initrd_path = NULL;
        }
        *ret_kernel_path = TAKE_PTR(kernel_path);
        *ret_initrd_path = TAKE_PTR(initrd_path);
        return 0;
}

/* Append in_path to out at *pos, zero-padded to KERNEL_BUNDLE_ALIGN; *ret_size its length. */
static int append_part(int out, const char *out_tmp, const char *in_path, uint64_t *pos, uint64_t *ret_size) {
        _cleanup_close_ int in = open(in_path, O_RDONLY | O_CLOEXEC);
        if (in < 0)
                return error_set_errno(-errno, "kernel bundle: %s", in_path);
        _cleanup_free_ char *buf = malloc(COPY_CHUNK);
        if (!buf)
                return -ENOMEM;
        uint64_t size = 0;
        for (;;) {
                ssize_t n = read(in, buf, COPY_CHUNK);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "kernel bundle: cannot read %s", in_path);
                if (n == 0)
                        break;
                int r = write_full(out, buf, (size_t)n);
                if (r < 0)
                        return error_set_errno(r, "kernel bundle: cannot write %s", out_tmp);
                size += (uint64_t)n;
        }
        if (size == 0)
                return error_set(-EINVAL, "kernel bundle: %s is empty", in_path);
        uint64_t pad = (KERNEL_BUNDLE_ALIGN - size % KERNEL_BUNDLE_ALIGN) % KERNEL_BUNDLE_ALIGN;
        memset(buf, 0, pad);
        int r = write_full(out, buf, (size_t)pad);
        if (r < 0)
                return error_set_errno(r, "kernel bundle: cannot write %s", out_tmp);
        *ret_size = size;
        *pos += size + pad;
        return 0;
}

int kernel_bundle_create(const char *kernel_path, const char *initrd_path, const char *bundle_path) {
        _cleanup_free_ char *tmp = NULL;
        if (asprintf(&tmp, "%s.tmpXXXXXX", bundle_path) < 0)
                return -ENOMEM;
        _cleanup_close_ int out = mkostemp(tmp, O_CLOEXEC);
        if (out < 0)
                return error_set_errno(-errno, "kernel bundle: cannot create %s", bundle_path);

        struct bundle_trailer t = {0};
        uint64_t pos = 0;
        int r = append_part(out, tmp, kernel_path, &pos, &t.kernel_size);
        if (r >= 0 && initrd_path) {
                t.initrd_offset = pos;
                r = append_part(out, tmp, initrd_path, &pos, &t.initrd_size);
        }
        if (r >= 0) {
                unsigned char raw[KERNEL_BUNDLE_TRAILER_SIZE];
                memcpy(raw, KERNEL_BUNDLE_MAGIC, 8);
                put_le64(raw + 8, t.kernel_offset);
                put_le64(raw + 16, t.kernel_size);
                put_le64(raw + 24, t.initrd_offset);
                put_le64(raw + 32, t.initrd_size);
                if ((r = write_full(out, raw, sizeof(raw))) < 0)
                        error_set_errno(r, "kernel bundle: cannot write %s", tmp);
        }
        if (r >= 0 && (fchmod(out, 0644) < 0 || fsync(out) < 0))
                r = error_set_errno(-errno, "kernel bundle: cannot sync %s", tmp);
        if (r >= 0 && rename(tmp, bundle_path) < 0)
                r = error_set_errno(-errno, "kernel bundle: cannot rename %s to %s", tmp, bundle_path);
        if (r < 0) {
                unlink(tmp);
                return r;
        }
        return fs_fsync_parent(bundle_path);
}
