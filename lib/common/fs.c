/* fs.c — parent directories and atomic file replacement (see fs.h). */
#include "drafter/fs.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int fs_mkdir_parents(const char *path) {
        _cleanup_free_ char *copy = strdup(path);
        if (!copy)
                return -ENOMEM;
        char *slash = strrchr(copy, '/');
        if (!slash || slash == copy)
                return 0;
        *slash = '\0';
        for (char *p = copy + 1; *p; p++) {
                if (*p != '/')
                        continue;
                *p = '\0';
                if (mkdir(copy, 0755) < 0 && errno != EEXIST)
                        return error_set_errno(-errno, "cannot create directory %s", copy);
                *p = '/';
        }
        if (mkdir(copy, 0755) < 0 && errno != EEXIST)
                return error_set_errno(-errno, "cannot create directory %s", copy);
        return 0;
}

int fs_fsync_parent(const char *path) {
        _cleanup_free_ char *copy = strdup(path);
        if (!copy)
                return -ENOMEM;
        _cleanup_close_ int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 || fsync(fd) < 0)
                return error_set_errno(-errno, "cannot sync directory of %s", path);
        return 0;
}

static int write_file(const char *path, const void *data, size_t len, bool durable) {
        size_t tmp_len = strlen(path) + 16;
        _cleanup_free_ char *tmp = malloc(tmp_len);
        if (!tmp)
                return -ENOMEM;
        snprintf(tmp, tmp_len, "%s.tmpXXXXXX", path);
        _cleanup_close_ int fd = mkostemp(tmp, O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "cannot create temporary file for %s", path);
        const char *p = data;
        size_t left = len;
        while (left > 0) {
                ssize_t n = write(fd, p, left);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0) {
                        int r = error_set_errno(-errno, "cannot write %s", tmp);
                        unlink(tmp);
                        return r;
                }
                p += n;
                left -= (size_t)n;
        }
        if (fchmod(fd, 0644) < 0 || (durable && fsync(fd) < 0) || rename(tmp, path) < 0) {
                int r = error_set_errno(-errno, "cannot replace %s", path);
                unlink(tmp);
                return r;
        }
        return durable ? fs_fsync_parent(path) : 0;
}

int fs_write_file_atomic(const char *path, const void *data, size_t len) {
        return write_file(path, data, len, true);
}

int fs_write_file_replace(const char *path, const void *data, size_t len) {
        return write_file(path, data, len, false);
}

int fs_copy_file(const char *from, const char *to, uint64_t min_size) {
        _cleanup_close_ int in = open(from, O_RDONLY | O_CLOEXEC);
        if (in < 0)
                return error_set_errno(-errno, "%s: cannot open", from);
        struct stat st;
        if (fstat(in, &st) < 0)
                return error_set_errno(-errno, "%s: stat", from);
        _cleanup_close_ int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (out < 0)
                return error_set_errno(-errno, "%s: cannot create", to);
        uint64_t size = (uint64_t)st.st_size;
        if (ftruncate(out, (off_t)MAX(size, min_size)) < 0)
                return error_set_errno(-errno, "%s: cannot size", to);
        /* Data extents only: holes stay holes. */
        off_t off = 0;
        while ((uint64_t)off < size) {
                off_t data = lseek(in, off, SEEK_DATA);
                if (data < 0 && errno == ENXIO)
                        break;
                if (data < 0)
                        data = off; /* no SEEK_DATA: copy everything */
                off_t hole = lseek(in, data, SEEK_HOLE);
                if (hole < 0)
                        hole = (off_t)size;
                off_t pos = data;
                while (pos < hole) {
                        loff_t src = pos, dst = pos;
                        ssize_t n = copy_file_range(in, &src, out, &dst, (size_t)(hole - pos), 0);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n < 0)
                                return error_set_errno(-errno, "copying %s to %s", from, to);
                        if (n == 0)
                                return error_set(-EIO, "copying %s to %s: %s shrank while copying", from, to, from);
                        pos += n;
                }
                off = hole;
        }
        if (fsync(out) < 0)
                return error_set_errno(-errno, "%s: fsync", to);
        return 0;
}
