/* package.c — .tar.zst packages of a VM's devices (see package.h).
 *
 * libarchive writes and reads the tar stream (pax, with sparse maps); libzstd compresses it here
 * rather than through libarchive's filter, so that compression is multi-threaded, the stream
 * carries a checksum, and a truncated or corrupt archive gets an error that says which. */
#include "drafter/package.h"

#include "drafter/block_device.h"
#include "drafter/cleanup.h"
#include "drafter/clock.h"
#include "drafter/error.h"
#include "drafter/log.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#define CHUNK (1u << 20)       /* read and write unit */
#define PAGE_GRAIN 4096u       /* zero detection when packing */
#define WRITE_GRAIN (64u << 10) /* zero pages are not written when extracting */
#define MAX_CREATED_DIRS 16
#define JOB_SIZE (4u << 20) /* zstd worker job */

static const uint8_t zeros[CHUNK];

static bool stop_requested(const struct package_options *o) {
        if (o->stop_fd < 0)
                return false;
        struct pollfd p = {.fd = o->stop_fd, .events = POLLIN};
        return poll(&p, 1, 0) > 0;
}

/* ---- progress: a line per second ---- */

struct progress {
        const struct package_options *o;
        const char *verb, *name;
        uint64_t total, done, next_ns;
};

static void progress_start(struct progress *p, const struct package_options *o, const char *verb, const char *name,
                           uint64_t total) {
        *p = (struct progress){o, verb, name, total, 0, clock_now_ns() + NSEC_PER_SEC};
}

static void progress_add(struct progress *p, uint64_t bytes) {
        p->done += bytes;
        if (!p->o->progress || clock_now_ns() < p->next_ns)
                return;
        p->next_ns = clock_now_ns() + NSEC_PER_SEC;
        if (p->total)
                log_info("%s %s: %" PRIu64 " of %" PRIu64 " MiB (%.0f%%)", p->verb, p->name, p->done >> 20,
                         p->total >> 20, 100.0 * (double)p->done / (double)p->total);
        else
                log_info("%s %s: %" PRIu64 " MiB", p->verb, p->name, p->done >> 20);
}

/* ---- outputs under temporary names ---- */

/* Directories this call created, removed again (deepest first) if it fails. */
struct created_dirs {
        char *path[MAX_CREATED_DIRS];
        size_t count;
};

static int make_parents(const char *path, struct created_dirs *dirs) {
        _cleanup_free_ char *copy = strdup(path);
        if (!copy)
                return -ENOMEM;
        char *dir = dirname(copy);
        struct stat st;
        if (stat(dir, &st) == 0)
                return S_ISDIR(st.st_mode) ? 0 : error_set(-ENOTDIR, "%s: not a directory", dir);
        if (errno != ENOENT)
                return error_set_errno(-errno, "%s", dir);
        int r = make_parents(dir, dirs);
        if (r < 0)
                return r;
        if (mkdir(dir, 0755) < 0 && errno != EEXIST)
                return error_set_errno(-errno, "cannot create directory %s", dir);
        if (dirs->count < MAX_CREATED_DIRS)
                dirs->path[dirs->count++] = strdup(dir);
        return 0;
}

static void remove_created_dirs(struct created_dirs *dirs, bool remove) {
        while (dirs->count > 0) {
                char *d = dirs->path[--dirs->count];
                if (remove && d)
                        rmdir(d);
                free(d);
        }
}

/* A file being written: `tmp` in the directory of `path`, renamed over it at the end. */
struct output {
        const char *path;
        char tmp[PATH_MAX];
        int fd;
};

static int output_open(struct output *out, const char *path, struct created_dirs *dirs) {
        out->path = path;
        out->fd = -1;
        out->tmp[0] = '\0';
        int r = make_parents(path, dirs);
        if (r < 0)
                return r;
        _cleanup_free_ char *c1 = strdup(path), *c2 = strdup(path);
        if (!c1 || !c2)
                return -ENOMEM;
        if (snprintf(out->tmp, sizeof(out->tmp), "%s/.%s.XXXXXX", dirname(c1), basename(c2)) >= (int)sizeof(out->tmp))
                return error_set(-ENAMETOOLONG, "%s: path too long", path);
        out->fd = mkostemp(out->tmp, O_CLOEXEC);
        if (out->fd < 0) {
                r = -errno;
                out->tmp[0] = '\0';
                return error_set_errno(r, "cannot write %s", path);
        }
        if (fchmod(out->fd, 0644) < 0)
                return error_set_errno(-errno, "%s", out->tmp);
        return 0;
}

static void output_discard(struct output *out) {
        if (out->fd >= 0)
                close(out->fd);
        out->fd = -1;
        if (out->tmp[0])
                unlink(out->tmp);
        out->tmp[0] = '\0';
}

static int output_sync(struct output *out) {
        return fsync(out->fd) < 0 ? error_set_errno(-errno, "%s: fsync", out->tmp) : 0;
}

static int output_commit(struct output *out) {
        if (rename(out->tmp, out->path) < 0)
                return error_set_errno(-errno, "cannot rename %s to %s", out->tmp, out->path);
        out->tmp[0] = '\0';
        close(out->fd);
        out->fd = -1;
        _cleanup_free_ char *c = strdup(out->path);
        if (c) {
                int d = open(dirname(c), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                if (d >= 0) {
                        fsync(d);
                        close(d);
                }
        }
        return 0;
}

static int write_all_at(int fd, const void *buf, size_t len, off_t off, const char *what) {
        const uint8_t *p = buf;
        while (len > 0) {
                ssize_t n = off >= 0 ? pwrite(fd, p, len, off) : write(fd, p, len);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0)
                        return error_set_errno(-errno, "writing %s", what);
                p += n, len -= (size_t)n;
                if (off >= 0)
                        off += n;
        }
        return 0;
}

/* ---- packing ---- */

struct extent {
        uint64_t offset, length;
};

struct extents {
        struct extent *v;
        size_t count, cap;
};

static int extents_add(struct extents *e, uint64_t offset, uint64_t length) {
        if (e->count > 0 && e->v[e->count - 1].offset + e->v[e->count - 1].length == offset) {
                e->v[e->count - 1].length += length;
                return 0;
        }
        if (e->count == e->cap) {
                size_t cap = e->cap ? 2 * e->cap : 64;
                struct extent *v = realloc(e->v, cap * sizeof(*v));
                if (!v)
                        return -ENOMEM;
                e->v = v, e->cap = cap;
        }
        e->v[e->count++] = (struct extent){offset, length};
        return 0;
}

/* The file's data extents: what SEEK_DATA/SEEK_HOLE say is allocated, less zero runs of at least
 * PACKAGE_HOLE_MIN (a memory image is mostly zeros written out, not holes). */
static int scan_extents(int fd, uint64_t size, const char *path, uint8_t *buf, const struct package_options *o,
                        struct extents *ret) {
        struct extents e = {0};
        uint64_t off = 0, run_start = 0, run_len = 0; /* the pending data run */
        int r = 0;
        while (off < size && r == 0) {
                off_t data = lseek(fd, (off_t)off, SEEK_DATA);
                if (data < 0 && errno == ENXIO)
                        break;
                off_t hole = data < 0 ? (off_t)size : lseek(fd, data, SEEK_HOLE);
                if (data < 0) /* no SEEK_DATA here: everything is data */
                        data = (off_t)off;
                if (hole < 0)
                        hole = (off_t)size;
                for (uint64_t at = (uint64_t)data; at < (uint64_t)hole && r == 0;) {
                        if (stop_requested(o)) {
                                r = error_set(-EINTR, "interrupted");
                                break;
                        }
                        size_t len = (size_t)MIN((uint64_t)CHUNK, (uint64_t)hole - at);
                        ssize_t n = pread(fd, buf, len, (off_t)at);
                        if (n <= 0) {
                                r = n < 0 ? error_set_errno(-errno, "reading %s", path)
                                          : error_set(-EIO, "%s: shorter than its size (changed while packing?)", path);
                                break;
                        }
                        for (size_t p = 0; p < (size_t)n && r == 0; p += PAGE_GRAIN) {
                                size_t l = MIN((size_t)PAGE_GRAIN, (size_t)n - p);
                                if (buffer_is_zero(buf + p, l))
                                        continue;
                                uint64_t page = at + p;
                                if (run_len && page - (run_start + run_len) < PACKAGE_HOLE_MIN) {
                                        run_len = page + l - run_start;
                                        continue;
                                }
                                if (run_len)
                                        r = extents_add(&e, run_start, run_len);
                                run_start = page, run_len = l;
                        }
                        at += (uint64_t)n;
                }
                off = (uint64_t)hole;
        }
        if (r == 0 && run_len)
                r = extents_add(&e, run_start, run_len);
        if (r < 0) {
                free(e.v);
                return r;
        }
        *ret = e;
        return 0;
}

struct zwriter {
        int fd;
        const char *what;
        const struct package_options *o;
        ZSTD_CCtx *cctx;
        uint8_t *out;
        size_t out_cap;
        uint64_t written;
        int err;
        char message[512];
};

static int zwriter_push(struct zwriter *w, const void *buf, size_t len, ZSTD_EndDirective mode) {
        ZSTD_inBuffer in = {buf, len, 0};
        for (;;) {
                if (stop_requested(w->o))
                        return error_set(-EINTR, "interrupted");
                ZSTD_outBuffer out = {w->out, w->out_cap, 0};
                size_t left = ZSTD_compressStream2(w->cctx, &out, &in, mode);
                if (ZSTD_isError(left))
                        return error_set(-EIO, "package %s: compressing: %s", w->what, ZSTD_getErrorName(left));
                if (out.pos > 0) {
                        int r = write_all_at(w->fd, w->out, out.pos, -1, w->what);
                        if (r < 0)
                                return r;
                        w->written += out.pos;
                }
                if (mode == ZSTD_e_end ? left == 0 : in.pos == in.size)
                        return 0;
        }
}

static la_ssize_t zwriter_write(struct archive *a, void *ctx, const void *buf, size_t len) {
        struct zwriter *w = ctx;
        int r = zwriter_push(w, buf, len, ZSTD_e_continue);
        if (r < 0) {
                w->err = r;
                snprintf(w->message, sizeof(w->message), "%s", error_message());
                archive_set_error(a, -r, "%s", w->message);
                return -1;
        }
        return (la_ssize_t)len;
}

/* The error of a failed libarchive write call: ours if our callback failed, else libarchive's. */
static int archive_failed(struct archive *a, const struct zwriter *w, const char *what) {
        if (w->err < 0)
                return error_set(w->err, "%s", w->message);
        int e = archive_errno(a);
        return error_set(e > 0 ? -e : -EIO, "%s: %s", what, archive_error_string(a) ? archive_error_string(a) : "error");
}

static int pack_file(struct archive *a, struct zwriter *w, const struct package_file *f, uint8_t *buf,
                     const struct package_options *o, struct package_stats *st) {
        _cleanup_close_ int fd = open(f->path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "device %s: %s", f->name, f->path);
        struct stat s;
        if (fstat(fd, &s) < 0)
                return error_set_errno(-errno, "device %s: %s", f->name, f->path);
        if (!S_ISREG(s.st_mode) && !S_ISBLK(s.st_mode))
                return error_set(-EINVAL, "device %s: %s is not a regular file or block device", f->name, f->path);
        off_t end = S_ISBLK(s.st_mode) ? lseek(fd, 0, SEEK_END) : s.st_size;
        if (end < 0)
                return error_set_errno(-errno, "device %s: %s", f->name, f->path);
        uint64_t size = (uint64_t)end;
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);

        struct extents e;
        int r = scan_extents(fd, size, f->path, buf, o, &e);
        if (r < 0)
                return error_prefix(r, "device %s", f->name);
        uint64_t data = 0;
        for (size_t i = 0; i < e.count; i++)
                data += e.v[i].length;

        struct archive_entry *entry = archive_entry_new();
        if (!entry) {
                free(e.v);
                return -ENOMEM;
        }
        archive_entry_set_pathname(entry, f->name);
        archive_entry_set_filetype(entry, AE_IFREG);
        archive_entry_set_perm(entry, 0644);
        archive_entry_set_size(entry, (la_int64_t)size);
        archive_entry_set_mtime(entry, s.st_mtim.tv_sec, s.st_mtim.tv_nsec);
        /* A file that is all data needs no map; any hole makes the entry sparse. */
        if (!(e.count == 1 && e.v[0].offset == 0 && e.v[0].length == size))
                for (size_t i = 0; i < e.count; i++)
                        archive_entry_sparse_add_entry(entry, (la_int64_t)e.v[i].offset, (la_int64_t)e.v[i].length);
        if (archive_write_header(a, entry) != ARCHIVE_OK) {
                r = archive_failed(a, w, f->name);
                archive_entry_free(entry);
                free(e.v);
                return r;
        }
        archive_entry_free(entry);

        /* The writer takes the whole logical stream and drops what falls in holes. */
        struct progress p;
        progress_start(&p, o, "Packing", f->name, size);
        uint64_t at = 0;
        for (size_t i = 0; i <= e.count && r == 0; i++) {
                uint64_t data_at = i < e.count ? e.v[i].offset : size;
                uint64_t data_end = i < e.count ? e.v[i].offset + e.v[i].length : size;
                for (; at < data_end && r == 0;) {
                        if (stop_requested(o)) {
                                r = error_set(-EINTR, "interrupted");
                                break;
                        }
                        bool hole = at < data_at;
                        size_t len = (size_t)MIN((uint64_t)CHUNK, (hole ? data_at : data_end) - at);
                        const void *src = zeros;
                        if (!hole) {
                                ssize_t n = pread(fd, buf, len, (off_t)at);
                                if (n != (ssize_t)len) {
                                        r = n < 0 ? error_set_errno(-errno, "device %s: reading %s", f->name, f->path)
                                                  : error_set(-EIO, "device %s: %s shrank while packing", f->name, f->path);
                                        break;
                                }
                                src = buf;
                        }
                        if (archive_write_data(a, src, len) != (la_ssize_t)len) {
                                r = archive_failed(a, w, f->name);
                                break;
                        }
                        at += len;
                        progress_add(&p, len);
                }
        }
        free(e.v);
        if (r < 0)
                return r;
        if (archive_write_finish_entry(a) != ARCHIVE_OK)
                return archive_failed(a, w, f->name);
        st->logical_bytes += size;
        st->data_bytes += data;
        log_debug("package: %s: %" PRIu64 " bytes, %" PRIu64 " of them data", f->name, size, data);
        return 0;
}

static int check_names(const struct package_file *files, size_t count) {
        if (count == 0)
                return error_set(-EINVAL, "devices: the list is empty");
        for (size_t i = 0; i < count; i++) {
                const char *n = files[i].name;
                if (!n || !*n || strchr(n, '/') || strcmp(n, ".") == 0 || strcmp(n, "..") == 0)
                        return error_set(-EINVAL, "devices: \"%s\" is not a device name", n ? n : "");
                if (!files[i].path || !*files[i].path)
                        return error_set(-EINVAL, "devices: device %s has no path", n);
                for (size_t j = 0; j < i; j++)
                        if (strcmp(files[j].name, n) == 0)
                                return error_set(-EINVAL, "devices: device %s is listed twice", n);
        }
        return 0;
}

int package_create(const char *archive, const struct package_file *files, size_t count,
                   const struct package_options *options, struct package_stats *ret_stats) {
        struct package_options o = *options;
        int r = check_names(files, count);
        if (r < 0)
                return r;
        for (size_t i = 0; i < count; i++)
                if (access(files[i].path, R_OK) < 0)
                        return error_set_errno(-errno, "device %s: %s", files[i].name, files[i].path);
        struct created_dirs dirs = {0};
        struct output out;
        if ((r = output_open(&out, archive, &dirs)) < 0) {
                output_discard(&out);
                remove_created_dirs(&dirs, true);
                return error_prefix(r, "package");
        }
        struct package_stats st = {0};
        struct zwriter w = {.fd = out.fd, .what = archive, .o = &o, .out_cap = ZSTD_CStreamOutSize()};
        w.out = malloc(w.out_cap);
        w.cctx = ZSTD_createCCtx();
        uint8_t *buf = aligned_alloc(4096, CHUNK);
        struct archive *a = archive_write_new();
        r = w.out && w.cctx && buf && a ? 0 : -ENOMEM;
        if (r == 0) {
                long cpus = sysconf(_SC_NPROCESSORS_ONLN);
                ZSTD_CCtx_setParameter(w.cctx, ZSTD_c_compressionLevel, o.level ? o.level : 3);
                ZSTD_CCtx_setParameter(w.cctx, ZSTD_c_checksumFlag, 1);
                /* Fails on a libzstd built without threads: then one thread it is. */
                ZSTD_CCtx_setParameter(w.cctx, ZSTD_c_nbWorkers, o.threads ? o.threads : (int)MAX(cpus, 1L));
                /* Small jobs: the input is taken as fast as it is compressed, not buffered by the
                 * hundred MiB at high levels, so progress, memory and Ctrl-C stay in step. */
                ZSTD_CCtx_setParameter(w.cctx, ZSTD_c_jobSize, JOB_SIZE);
                archive_write_set_format_pax_restricted(a);
                archive_write_set_bytes_in_last_block(a, 1); /* zstd needs no padding to 10 KiB */
                if (archive_write_open(a, &w, NULL, zwriter_write, NULL) != ARCHIVE_OK)
                        r = archive_failed(a, &w, archive);
        }
        for (size_t i = 0; i < count && r == 0; i++)
                r = pack_file(a, &w, &files[i], buf, &o, &st);
        if (r == 0 && archive_write_close(a) != ARCHIVE_OK)
                r = archive_failed(a, &w, archive);
        if (r == 0)
                r = zwriter_push(&w, NULL, 0, ZSTD_e_end);
        if (r == 0 && (r = output_sync(&out)) == 0)
                r = output_commit(&out);
        if (a)
                archive_write_free(a);
        free(buf);
        free(w.out);
        ZSTD_freeCCtx(w.cctx);
        if (r < 0) {
                output_discard(&out);
                remove_created_dirs(&dirs, true);
                return r;
        }
        remove_created_dirs(&dirs, false);
        st.archive_bytes = w.written;
        if (ret_stats)
                *ret_stats = st;
        return 0;
}

/* ---- extraction ---- */

struct zreader {
        int fd;
        const char *what;
        ZSTD_DCtx *dctx;
        uint8_t *in, *out;
        size_t in_cap, out_cap;
        ZSTD_inBuffer inb;
        size_t frame_left; /* ZSTD_decompressStream's last hint: 0 at the end of a frame */
        bool eof;
        uint64_t read_bytes;
        int err;
        char message[512];
};

/* Next piece of the decompressed stream: its length, 0 at its proper end, or -errno. */
static ssize_t zreader_next(struct zreader *z, const void **ret) {
        for (;;) {
                if (z->inb.pos == z->inb.size && !z->eof) {
                        ssize_t n = read(z->fd, z->in, z->in_cap);
                        if (n < 0 && errno == EINTR)
                                continue;
                        if (n < 0)
                                return error_set_errno(-errno, "reading %s", z->what);
                        if (n == 0)
                                z->eof = true;
                        z->read_bytes += (uint64_t)n;
                        z->inb = (ZSTD_inBuffer){z->in, (size_t)n, 0};
                }
                if (z->inb.pos == z->inb.size && z->eof) {
                        if (z->frame_left != 0)
                                return error_set(-EIO, "package %s: truncated (the zstd stream ends early)", z->what);
                        return 0;
                }
                ZSTD_outBuffer out = {z->out, z->out_cap, 0};
                size_t left = ZSTD_decompressStream(z->dctx, &out, &z->inb);
                if (ZSTD_isError(left))
                        return error_set(-EIO, "package %s: corrupt (zstd: %s)", z->what, ZSTD_getErrorName(left));
                z->frame_left = left;
                if (out.pos > 0) {
                        *ret = z->out;
                        return (ssize_t)out.pos;
                }
        }
}

static la_ssize_t zreader_read(struct archive *a, void *ctx, const void **ret) {
        struct zreader *z = ctx;
        ssize_t n = zreader_next(z, ret);
        if (n < 0) {
                z->err = (int)n;
                snprintf(z->message, sizeof(z->message), "%s", error_message());
                archive_set_error(a, (int)-n, "%s", z->message);
                return -1;
        }
        return n;
}

/* The rest of the stream after the tar end: reading it checks the zstd checksum. Anything but
 * padding there is not ours. */
static int zreader_drain(struct zreader *z) {
        for (;;) {
                const void *p = NULL;
                ssize_t n = zreader_next(z, &p);
                if (n <= 0)
                        return (int)n;
                if (!buffer_is_zero(p, (size_t)n))
                        return error_set(-EINVAL, "package %s: data after the end of the tar archive", z->what);
        }
}

static int reader_failed(struct archive *a, const struct zreader *z, const char *what) {
        if (z->err < 0)
                return error_set(z->err, "%s", z->message);
        int e = archive_errno(a);
        return error_set(e > 0 ? -e : -EIO, "package %s: %s: %s", z->what, what,
                         archive_error_string(a) ? archive_error_string(a) : "unreadable");
}

/* The device name an entry's path stands for ("memory" or "./memory"), or NULL. */
static const char *entry_device_name(const char *path) {
        if (strncmp(path, "./", 2) == 0)
                path += 2;
        if (!*path || strchr(path, '/') || strcmp(path, ".") == 0 || strcmp(path, "..") == 0)
                return NULL;
        return path;
}

static const char *entry_kind(struct archive_entry *e) {
        switch (archive_entry_filetype(e)) {
        case AE_IFLNK: return "a symbolic link";
        case AE_IFDIR: return "a directory";
        case AE_IFCHR: return "a character device";
        case AE_IFBLK: return "a block device";
        case AE_IFIFO: return "a FIFO";
        case AE_IFSOCK: return "a socket";
        default: return "not a regular file";
        }
}

static int extract_entry(struct archive *a, struct zreader *z, struct archive_entry *e, struct output *out,
                         const char *name, uint64_t max, const struct package_options *o, struct package_stats *st) {
        if (!archive_entry_size_is_set(e) || archive_entry_size(e) < 0)
                return error_set(-EINVAL, "package %s: entry %s has no size", z->what, name);
        uint64_t size = (uint64_t)archive_entry_size(e);
        if (size > max)
                return error_set(-EFBIG, "package %s: entry %s is %" PRIu64 " bytes, more than the limit of %" PRIu64, z->what,
                                 name, size, max);
        struct progress p;
        progress_start(&p, o, "Extracting", name, size);
        for (;;) {
                if (stop_requested(o))
                        return error_set(-EINTR, "interrupted");
                const void *buf;
                size_t len;
                la_int64_t off;
                int r = archive_read_data_block(a, &buf, &len, &off);
                if (r == ARCHIVE_EOF)
                        break;
                if (r != ARCHIVE_OK && r != ARCHIVE_WARN)
                        return reader_failed(a, z, name);
                if (off < 0 || (uint64_t)off > size || len > size - (uint64_t)off)
                        return error_set(-EINVAL, "package %s: entry %s has data beyond its size", z->what, name);
                /* Zero pages stay holes: the file is new, so they read as zeros already. */
                const uint8_t *b = buf;
                for (size_t at = 0; at < len;) {
                        size_t l = MIN((size_t)WRITE_GRAIN - (size_t)(((uint64_t)off + at) % WRITE_GRAIN), len - at);
                        if (!buffer_is_zero(b + at, l)) {
                                if ((r = write_all_at(out->fd, b + at, l, (off_t)((uint64_t)off + at), out->path)) < 0)
                                        return error_prefix(r, "device %s", name);
                                st->data_bytes += l;
                        }
                        at += l;
                }
                progress_add(&p, len);
        }
        if (ftruncate(out->fd, (off_t)size) < 0)
                return error_set_errno(-errno, "device %s: %s", name, out->tmp);
        st->logical_bytes += size;
        return 0;
}

int package_extract(const char *archive, const struct package_file *files, size_t count,
                    const struct package_options *options, struct package_stats *ret_stats) {
        struct package_options o = *options;
        uint64_t max = o.max_entry_bytes ? o.max_entry_bytes : PACKAGE_DEFAULT_MAX_ENTRY;
        int r = check_names(files, count);
        if (r < 0)
                return r;
        _cleanup_close_ int fd = open(archive, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "package %s", archive);
        struct stat s;
        if (fstat(fd, &s) < 0)
                return error_set_errno(-errno, "package %s", archive);
        if (!S_ISREG(s.st_mode))
                return error_set(-EINVAL, "package %s: not a regular file", archive);
        posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);

        /* Every output is opened first: an unwritable place fails before any work. */
        struct created_dirs dirs = {0};
        _cleanup_free_ struct output *outs = calloc(count, sizeof(*outs));
        _cleanup_free_ bool *seen = calloc(count, sizeof(bool));
        if (!outs || !seen)
                return -ENOMEM;
        for (size_t i = 0; i < count; i++)
                outs[i].fd = -1;
        for (size_t i = 0; i < count && r == 0; i++)
                if ((r = output_open(&outs[i], files[i].path, &dirs)) < 0)
                        error_prefix(r, "device %s", files[i].name);

        struct package_stats st = {0};
        struct zreader z = {.fd = fd, .what = archive, .in_cap = ZSTD_DStreamInSize(), .out_cap = ZSTD_DStreamOutSize(),
                            .frame_left = 1};
        z.in = malloc(z.in_cap);
        z.out = malloc(z.out_cap);
        z.dctx = ZSTD_createDCtx();
        struct archive *a = r == 0 ? archive_read_new() : NULL;
        if (r == 0 && (!a || !z.in || !z.out || !z.dctx))
                r = -ENOMEM;
        if (r == 0) {
                archive_read_support_format_tar(a);
                if (archive_read_open(a, &z, NULL, zreader_read, NULL) != ARCHIVE_OK)
                        r = reader_failed(a, &z, "not a tar archive");
        }
        while (r == 0) {
                struct archive_entry *e;
                int h = archive_read_next_header(a, &e);
                if (h == ARCHIVE_EOF)
                        break;
                if (h != ARCHIVE_OK && h != ARCHIVE_WARN) {
                        r = reader_failed(a, &z, "bad entry header");
                        break;
                }
                const char *path = archive_entry_pathname(e) ? archive_entry_pathname(e) : "";
                const char *name = entry_device_name(path);
                if (!name) {
                        r = error_set(-EINVAL, "package %s: entry \"%s\" is not a device name (refusing paths)",
                                      archive, path);
                        break;
                }
                if (archive_entry_filetype(e) != AE_IFREG || archive_entry_hardlink(e)) {
                        r = error_set(-EINVAL, "package %s: entry %s is %s", archive, name,
                                      archive_entry_hardlink(e) ? "a hard link" : entry_kind(e));
                        break;
                }
                size_t i = 0;
                while (i < count && strcmp(files[i].name, name) != 0)
                        i++;
                if (i == count) {
                        log_debug("package: skipping entry %s (not asked for)", name);
                        st.skipped_entries++;
                        if (archive_read_data_skip(a) != ARCHIVE_OK)
                                r = reader_failed(a, &z, name);
                        continue;
                }
                if (seen[i]) {
                        r = error_set(-EINVAL, "package %s: entry %s appears twice", archive, name);
                        break;
                }
                seen[i] = true;
                r = extract_entry(a, &z, e, &outs[i], name, max, &o, &st);
        }
        if (r == 0 && (r = zreader_drain(&z)) == 0)
                for (size_t i = 0; i < count && r == 0; i++)
                        if (!seen[i])
                                r = error_set(-ENOENT, "package %s: device %s is not in the archive", archive,
                                              files[i].name);
        for (size_t i = 0; i < count && r == 0; i++)
                r = output_sync(&outs[i]);
        for (size_t i = 0; i < count && r == 0; i++)
                r = output_commit(&outs[i]);
        if (a)
                archive_read_free(a);
        free(z.in);
        free(z.out);
        ZSTD_freeDCtx(z.dctx);
        for (size_t i = 0; i < count; i++)
                output_discard(&outs[i]);
        remove_created_dirs(&dirs, r < 0);
        if (r < 0)
                return r;
        st.archive_bytes = (uint64_t)s.st_size;
        if (ret_stats)
                *ret_stats = st;
        return 0;
}
