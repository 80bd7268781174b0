/* fuse_export.c — devices as files in a FUSE mount (see fuse_export.h), libfuse3 low-level API. */
#define FUSE_USE_VERSION 312
#include <fuse3/fuse_lowlevel.h>

#include "drafter/fuse_export.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/fs.h"
#include "drafter/log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#define ROOT_INO FUSE_ROOT_ID
#define FIRST_DEVICE_INO 2
#define ATTR_TIMEOUT 3600.0 /* the tree never changes while mounted */
#define MAX_READ (1u << 20)
/* FUSE_EXPORT_NO_READAHEAD: one page. With the kernel's default (128 KiB) a resumed VM whose
 * memory arrives lazily fetched 2 to 3 blocks per first touch, most of them never used, each one
 * adding to every later fault's wait on a shared link (docs/performance.md, drafter-registry).
 * Otherwise the kernel's default: a VM resuming from local or pre-copied memory faults in
 * uncached (zero) pages 32 at a time. Reads asked for are never split by it. */
#define NO_READAHEAD 4096u
#define BLOCK_READAHEAD 65536u

struct fuse_export {
        struct fuse_session *se;
        struct fuse_export_device *devices;
        char **paths;
        size_t count;
        char *mountpoint;
        pthread_t thread;
        bool running;
        int sync_fd;   /* the mount's root, to check it answers */
        pid_t syncing_tid;
        unsigned flags; /* thread inside fuse_export_sync(): its fsyncs need no device flush */
        dev_t dev;   /* the mount's device: its minor number names the connection in fusectl */
        int loop_result;
};

static struct fuse_export *export_of(fuse_req_t req) {
        return fuse_req_userdata(req);
}

static const struct fuse_export_device *device_of(struct fuse_export *fx, fuse_ino_t ino) {
        if (ino < FIRST_DEVICE_INO || ino - FIRST_DEVICE_INO >= fx->count)
                return NULL;
        return &fx->devices[ino - FIRST_DEVICE_INO];
}

static void fill_attr(struct fuse_export *fx, fuse_ino_t ino, struct stat *st) {
        memset(st, 0, sizeof(*st));
        st->st_ino = ino;
        st->st_uid = getuid();
        st->st_gid = getgid();
        if (ino == ROOT_INO) {
                st->st_mode = S_IFDIR | 0755;
                st->st_nlink = 2;
                return;
        }
        const struct fuse_export_device *d = device_of(fx, ino);
        st->st_mode = S_IFREG | (d->read_only ? 0444 : 0644);
        st->st_nlink = 1;
        st->st_size = (off_t)d->dev->size;
        st->st_blksize = (blksize_t)d->dev->block_size;
        st->st_blocks = (blkcnt_t)((d->dev->size + 511) / 512);
}

static void op_init(void *userdata, struct fuse_conn_info *conn) {
        struct fuse_export *fx = userdata;
        /* The writeback cache is what makes shared writable mappings and syncfs write-back work. */
        if (fx->flags & FUSE_EXPORT_WRITE_THROUGH)
                conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
        else if (conn->capable & FUSE_CAP_WRITEBACK_CACHE)
                conn->want |= FUSE_CAP_WRITEBACK_CACHE;
        if (conn->capable & FUSE_CAP_ASYNC_READ)
                conn->want |= FUSE_CAP_ASYNC_READ;
        conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA; /* sizes never change; we invalidate ourselves */
        conn->max_write = MAX_READ;
        conn->max_readahead = fuse_export_read_window(fx);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
        struct fuse_export *fx = export_of(req);
        if (parent != ROOT_INO) {
                fuse_reply_err(req, ENOENT);
                return;
        }
        for (size_t i = 0; i < fx->count; i++)
                if (strcmp(fx->devices[i].name, name) == 0) {
                        struct fuse_entry_param e = {.ino = FIRST_DEVICE_INO + i,
                                                     .attr_timeout = ATTR_TIMEOUT,
                                                     .entry_timeout = ATTR_TIMEOUT};
                        fill_attr(fx, e.ino, &e.attr);
                        fuse_reply_entry(req, &e);
                        return;
                }
        fuse_reply_err(req, ENOENT);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct fuse_export *fx = export_of(req);
        if (ino != ROOT_INO && !device_of(fx, ino)) {
                fuse_reply_err(req, ENOENT);
                return;
        }
        struct stat st;
        fill_attr(fx, ino, &st);
        fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set, struct fuse_file_info *fi) {
        struct fuse_export *fx = export_of(req);
        const struct fuse_export_device *d = device_of(fx, ino);
        if (!d) {
                fuse_reply_err(req, ino == ROOT_INO ? EPERM : ENOENT);
                return;
        }
        /* Devices have a fixed size; times and modes are accepted and ignored. */
        if ((to_set & FUSE_SET_ATTR_SIZE) && (uint64_t)attr->st_size != d->dev->size) {
                fuse_reply_err(req, EPERM);
                return;
        }
        struct stat st;
        fill_attr(fx, ino, &st);
        fuse_reply_attr(req, &st, ATTR_TIMEOUT);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
        struct fuse_export *fx = export_of(req);
        if (ino != ROOT_INO) {
                fuse_reply_err(req, ENOTDIR);
                return;
        }
        _cleanup_free_ char *buf = malloc(size);
        if (!buf) {
                fuse_reply_err(req, ENOMEM);
                return;
        }
        size_t used = 0;
        for (off_t i = off; (size_t)i < fx->count + 2; i++) {
                struct stat st = {0};
                const char *name;
                if (i == 0) {
                        name = ".", st.st_ino = ROOT_INO, st.st_mode = S_IFDIR;
                } else if (i == 1) {
                        name = "..", st.st_ino = ROOT_INO, st.st_mode = S_IFDIR;
                } else {
                        name = fx->devices[i - 2].name;
                        st.st_ino = FIRST_DEVICE_INO + (fuse_ino_t)(i - 2);
                        st.st_mode = S_IFREG;
                }
                size_t n = fuse_add_direntry(req, buf + used, size - used, name, &st, i + 1);
                if (n > size - used)
                        break;
                used += n;
        }
        fuse_reply_buf(req, buf, used);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
        struct fuse_export *fx = export_of(req);
        const struct fuse_export_device *d = device_of(fx, ino);
        if (!d) {
                fuse_reply_err(req, ino == ROOT_INO ? EISDIR : ENOENT);
                return;
        }
        if (d->read_only && (fi->flags & O_ACCMODE) != O_RDONLY) {
                fuse_reply_err(req, EACCES);
                return;
        }
        if (fi->flags & O_TRUNC) {
                fuse_reply_err(req, EPERM);
                return;
        }
        fi->keep_cache = 1; /* the page cache stays valid across opens; we invalidate what changes */
        fi->direct_io = 0;
        fuse_reply_open(req, fi);
}

/* One read buffer per request thread (freed when libfuse ends the thread): a fresh megabyte per
 * read would be mapped, faulted in page by page and unmapped again, every time. */
static pthread_key_t read_buffer_key;
static pthread_once_t read_buffer_once = PTHREAD_ONCE_INIT;

static void make_read_buffer_key(void) {
        if (pthread_key_create(&read_buffer_key, free) != 0)
                abort();
}

static char *read_buffer(void) {
        pthread_once(&read_buffer_once, make_read_buffer_key);
        char *buf = pthread_getspecific(read_buffer_key);
        if (!buf && (buf = malloc(MAX_READ)) && pthread_setspecific(read_buffer_key, buf) != 0) {
                free(buf);
                buf = NULL;
        }
        return buf;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
        const struct fuse_export_device *d = device_of(export_of(req), ino);
        if (!d) {
                fuse_reply_err(req, EBADF);
                return;
        }
        if (off < 0 || (uint64_t)off >= d->dev->size) {
                fuse_reply_buf(req, NULL, 0);
                return;
        }
        size = (size_t)MIN((uint64_t)size, d->dev->size - (uint64_t)off);
        _cleanup_free_ char *big = size > MAX_READ ? malloc(size) : NULL; /* max_read says it will not be */
        char *buf = size > MAX_READ ? big : read_buffer();
        if (!buf) {
                fuse_reply_err(req, ENOMEM);
                return;
        }
        log_debug("fuse: read %s %zu at %lld", d->name, size, (long long)off);
        int r = block_device_read_at(d->dev, buf, size, (uint64_t)off);
        if (r < 0) {
                log_debug("fuse: %s", error_message());
                fuse_reply_err(req, r == -ETIMEDOUT ? EIO : -r);
                return;
        }
        fuse_reply_buf(req, buf, size);
}

/* The device behind ino if it may be modified; otherwise replies with the error and returns NULL. */
static const struct fuse_export_device *writable_device(fuse_req_t req, fuse_ino_t ino) {
        const struct fuse_export_device *d = device_of(export_of(req), ino);
        if (!d || d->read_only) {
                fuse_reply_err(req, d ? EROFS : EBADF);
                return NULL;
        }
        return d;
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi) {
        const struct fuse_export_device *d = writable_device(req, ino);
        if (!d)
                return;
        if (off < 0 || (uint64_t)off > d->dev->size || size > d->dev->size - (uint64_t)off) {
                fuse_reply_err(req, ENOSPC); /* a device cannot grow */
                return;
        }
        int r = block_device_write_at(d->dev, buf, size, (uint64_t)off);
        if (r < 0) {
                log_debug("fuse: %s", error_message());
                fuse_reply_err(req, -r);
                return;
        }
        fuse_reply_write(req, size);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi) {
        struct fuse_export *fx = export_of(req);
        const struct fuse_export_device *d = device_of(fx, ino);
        if (!d) {
                fuse_reply_err(req, ino == ROOT_INO ? 0 : EBADF);
                return;
        }
        /* Our own fsync from fuse_export_sync() only needs the kernel's wait for written-back
         * pages, which is over once this request arrives; a VMM's fsync flushes the device. */
        if (fuse_req_ctx(req)->pid == __atomic_load_n(&fx->syncing_tid, __ATOMIC_ACQUIRE)) {
                fuse_reply_err(req, 0);
                return;
        }
        int r = block_device_flush(d->dev);
        if (r < 0)
                log_debug("fuse: %s", error_message());
        fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len, struct fuse_file_info *fi) {
        const struct fuse_export_device *d = writable_device(req, ino);
        if (!d)
                return;
        if (off < 0 || len <= 0 || (uint64_t)off > d->dev->size || (uint64_t)len > d->dev->size - (uint64_t)off) {
                fuse_reply_err(req, (mode & FALLOC_FL_KEEP_SIZE) ? EINVAL : EFBIG);
                return;
        }
        int r;
        if (mode == (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) || mode == FALLOC_FL_ZERO_RANGE ||
            mode == (FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE))
                r = block_device_discard(d->dev, (size_t)len, (uint64_t)off);
        else if (mode == 0 || mode == FALLOC_FL_KEEP_SIZE)
                r = 0; /* within the device: already "allocated" */
        else
                r = -EOPNOTSUPP;
        if (r < 0)
                log_debug("fuse: fallocate mode %d: %s", mode, error_message());
        fuse_reply_err(req, r < 0 ? -r : 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino) {
        struct fuse_export *fx = export_of(req);
        struct statvfs st = {.f_bsize = 4096, .f_frsize = 4096, .f_namemax = 255, .f_files = fx->count + 1};
        for (size_t i = 0; i < fx->count; i++)
                st.f_blocks += (fx->devices[i].dev->size + 4095) / 4096;
        fuse_reply_statfs(req, &st);
}

static const struct fuse_lowlevel_ops export_ops = {
        .init = op_init,
        .lookup = op_lookup,
        .getattr = op_getattr,
        .setattr = op_setattr,
        .readdir = op_readdir,
        .open = op_open,
        .read = op_read,
        .write = op_write,
        .fsync = op_fsync,
        .fallocate = op_fallocate,
        .statfs = op_statfs,
};

/* FUSE holds a mount to a strict share of the dirty limit (strict_limit, max_ratio 1 %): the
 * kernel writes its pages back as soon as a few tens of MB are dirty. Lifted, the mount is
 * written back like a disk's file system: when the system as a whole has much dirty data, or
 * pages are old. Best effort: Linux before 6.2 has no strict_limit file. */
static void unthrottle(struct fuse_export *fx) {
        static const char *const knobs[][2] = {{"strict_limit", "0"}, {"max_ratio", "100"}};
        for (size_t i = 0; i < ELEMENTSOF(knobs); i++) {
                char path[128];
                snprintf(path, sizeof(path), "/sys/class/bdi/%u:%u/%s", major(fx->dev), minor(fx->dev), knobs[i][0]);
                int fd = open(path, O_WRONLY | O_CLOEXEC);
                if (fd < 0 || write(fd, knobs[i][1], strlen(knobs[i][1])) < 0)
                        log_debug("fuse: cannot set %s to %s: %m", path, knobs[i][1]);
                if (fd >= 0)
                        close(fd);
        }
}

static void *loop_thread(void *arg) {
        struct fuse_export *fx = arg;
        struct fuse_loop_config *cfg = fuse_loop_cfg_create();
        if (cfg) {
                fuse_loop_cfg_set_clone_fd(cfg, 0);
                fuse_loop_cfg_set_max_threads(cfg, 16);
                fuse_loop_cfg_set_idle_threads(cfg, 4);
        }
        fx->loop_result = fuse_session_loop_mt(fx->se, cfg);
        if (cfg)
                fuse_loop_cfg_destroy(cfg);
        return NULL;
}

int fuse_export_clear_stale(const char *mountpoint) {
        /* statfs always asks the daemon (stat may be answered from cached attributes). */
        struct statfs sfs;
        if (statfs(mountpoint, &sfs) == 0 || errno != ENOTCONN)
                return 0;
        if (umount2(mountpoint, MNT_DETACH) < 0)
                return error_set_errno(-errno, "fuse: cannot detach the stale mount at %s", mountpoint);
        log_debug("fuse: detached a stale mount at %s", mountpoint);
        return 1;
}

/* Is `path` a mount point already (a live mount: we must not stack on it)? */
static bool is_mount_point(const char *path) {
        struct stat here, parent;
        char up[4200];
        snprintf(up, sizeof(up), "%s/..", path);
        if (stat(path, &here) < 0 || stat(up, &parent) < 0)
                return false;
        return here.st_dev != parent.st_dev;
}

static void export_free(struct fuse_export *fx) {
        if (!fx)
                return;
        for (size_t i = 0; fx->paths && i < fx->count; i++)
                free(fx->paths[i]);
        free(fx->paths);
        free(fx->devices);
        free(fx->mountpoint);
        free(fx);
}

int fuse_export_start(const char *mountpoint, const struct fuse_export_device *devices, size_t count,
                      struct fuse_export **ret_export) {
        return fuse_export_start_flags(mountpoint, devices, count, 0, ret_export);
}

int fuse_export_start_flags(const char *mountpoint, const struct fuse_export_device *devices, size_t count,
                            unsigned flags, struct fuse_export **ret_export) {
        int r;
        for (size_t i = 0; i < count; i++)
                if (!devices[i].name || !*devices[i].name || strchr(devices[i].name, '/') ||
                    strcmp(devices[i].name, ".") == 0 || strcmp(devices[i].name, "..") == 0)
                        return error_set(-EINVAL, "fuse: device %zu has no usable file name", i);

        r = fuse_export_clear_stale(mountpoint);
        if (r < 0)
                return r;
        char probe[4200];
        snprintf(probe, sizeof(probe), "%s/.", mountpoint);
        if ((r = fs_mkdir_parents(probe)) < 0)
                return error_prefix(r, "fuse");
        if (is_mount_point(mountpoint))
                return error_set(-EBUSY, "fuse: %s is already a mount point (another instance running?)", mountpoint);

        struct fuse_export *fx = calloc(1, sizeof(*fx));
        if (!fx)
                return -ENOMEM;
        fx->sync_fd = -1;
        fx->flags = flags;
        fx->count = count;
        fx->devices = calloc(count ? count : 1, sizeof(*fx->devices));
        fx->paths = calloc(count ? count : 1, sizeof(*fx->paths));
        fx->mountpoint = strdup(mountpoint);
        if (!fx->devices || !fx->paths || !fx->mountpoint) {
                export_free(fx);
                return -ENOMEM;
        }
        memcpy(fx->devices, devices, count * sizeof(*devices));
        for (size_t i = 0; i < count; i++)
                if (asprintf(&fx->paths[i], "%s/%s", mountpoint, devices[i].name) < 0) {
                        fx->paths[i] = NULL;
                        export_free(fx);
                        return -ENOMEM;
                }

        char *argv[] = {"drafter", "-o", "fsname=drafter,subtype=drafter,default_permissions", NULL};
        struct fuse_args args = FUSE_ARGS_INIT(3, argv);
        fx->se = fuse_session_new(&args, &export_ops, sizeof(export_ops), fx);
        fuse_opt_free_args(&args);
        if (!fx->se) {
                export_free(fx);
                return error_set(-EIO, "fuse: cannot create a session (is /dev/fuse available?)");
        }
        if (fuse_session_mount(fx->se, mountpoint) != 0) {
                fuse_session_destroy(fx->se);
                export_free(fx);
                return error_set(-EIO, "fuse: cannot mount on %s", mountpoint);
        }
        if (pthread_create(&fx->thread, NULL, loop_thread, fx) != 0) {
                fuse_session_unmount(fx->se);
                fuse_session_destroy(fx->se);
                export_free(fx);
                return error_set(-EAGAIN, "fuse: cannot start the request threads");
        }
        fx->running = true;
        /* Opening the root waits for INIT to be answered, so the mount is usable on return. */
        fx->sync_fd = open(mountpoint, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        struct stat st;
        if (fx->sync_fd < 0 || fstat(fx->sync_fd, &st) < 0) {
                r = error_set_errno(-errno, "fuse: the new mount at %s does not answer", mountpoint);
                fuse_export_stop(fx);
                return r;
        }
        fx->dev = st.st_dev;
        if (flags & FUSE_EXPORT_UNTHROTTLED)
                unthrottle(fx);
        /* We have no FLUSH handler: the first close() gets ENOSYS and the kernel stops sending
         * FLUSH at all, so no close() of a device file ever waits for us. Do that first close now. */
        if (count > 0) {
                int fd = open(fx->paths[0], O_RDONLY | O_CLOEXEC);
                if (fd < 0) {
                        r = error_set_errno(-errno, "fuse: cannot open %s", fx->paths[0]);
                        fuse_export_stop(fx);
                        return r;
                }
                close(fd);
        }
        *ret_export = fx;
        return 0;
}

uint32_t fuse_export_read_window(const struct fuse_export *fx) {
        return fx->flags & FUSE_EXPORT_NO_READAHEAD ? NO_READAHEAD
             : fx->flags & FUSE_EXPORT_BLOCK_READAHEAD ? BLOCK_READAHEAD
                                                      : MAX_READ;
}

const char *fuse_export_path(struct fuse_export *fx, size_t index) {
        return index < fx->count ? fx->paths[index] : NULL;
}

/* cachestat(2), Linux 6.5, declared here (Debian 12's headers predate it): one number on every
 * architecture. */
#ifndef __NR_cachestat
#define __NR_cachestat 451
#endif
struct page_cache_range {
        uint64_t off, len;
};
struct page_cache_stat {
        uint64_t nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted;
};

/* False only if the kernel says no page of [off, off+len) is dirty. */
static bool maybe_dirty(int fd, uint64_t off, uint64_t len) {
        struct page_cache_range range = {off, len};
        struct page_cache_stat st;
        return syscall(__NR_cachestat, fd, &range, &st, 0) < 0 || st.nr_dirty > 0;
}

/* Spans with no dirty page are skipped whole: a chunk's sync_file_range costs a system call even
 * when clean, and a VM's disk of gigabytes is mostly clean. */
#define CLEAN_SPAN (16u << 20)

/* [0, size) of fd, `chunk` bytes at a time, each chunk written back and waited for. */
static int write_back_chunks(int fd, uint64_t size, uint64_t chunk, const char *path) {
        for (uint64_t span = 0; span < size; span += CLEAN_SPAN) {
                if (!maybe_dirty(fd, span, CLEAN_SPAN))
                        continue;
                for (uint64_t off = span; off < MIN(span + CLEAN_SPAN, size); off += chunk)
                        if (sync_file_range(fd, (off_t)off, (off_t)MIN(chunk, span + CLEAN_SPAN - off),
                                            SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE |
                                                    SYNC_FILE_RANGE_WAIT_AFTER) < 0)
                                return error_set_errno(-errno, "fuse: write-back of %s at %" PRIu64, path, off);
        }
        return 0;
}

/* Every writable device file in turn, opened only for the call (a daemon holding files of its
 * own mount open could not exit cleanly if it were killed); one caller at a time. `chunk` 0:
 * fsync() each file; else write_back_chunks(). */
static int write_back(struct fuse_export *fx, uint64_t chunk) {
        int r = 0;
        static pthread_mutex_t one_at_a_time = PTHREAD_MUTEX_INITIALIZER;
        pthread_mutex_lock(&one_at_a_time);
        __atomic_store_n(&fx->syncing_tid, gettid(), __ATOMIC_RELEASE);
        for (size_t i = 0; i < fx->count && r == 0; i++) {
                if (fx->devices[i].read_only)
                        continue;
                int fd = open(fx->paths[i], O_RDONLY | O_CLOEXEC);
                if (fd < 0 || (!chunk && fsync(fd) < 0))
                        r = error_set_errno(-errno, "fuse: write-back of %s", fx->paths[i]);
                else if (chunk)
                        r = write_back_chunks(fd, fx->devices[i].dev->size, chunk, fx->paths[i]);
                if (fd >= 0)
                        close(fd);
        }
        __atomic_store_n(&fx->syncing_tid, 0, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&one_at_a_time);
        return r;
}

int fuse_export_sync(struct fuse_export *fx) {
        /* syncfs() starts write-back of the pages dirtied through mappings, but on FUSE it can
         * return before the daemon has received them. fsync() waits for every write-back request
         * of the file to be answered, so once it returns the device (and its dirty tracker) has
         * seen every page. */
        return write_back(fx, 0);
}

int fuse_export_write_back(struct fuse_export *fx, uint64_t chunk) {
        return write_back(fx, chunk ? chunk : CLEAN_SPAN);
}

int fuse_export_invalidate(struct fuse_export *fx, size_t index, uint64_t off, uint64_t len) {
        if (index >= fx->count)
                return -EINVAL;
        int r = fuse_lowlevel_notify_inval_inode(fx->se, FIRST_DEVICE_INO + index, (off_t)off, (off_t)len);
        /* -ENOENT: the kernel has nothing cached for the file, which is fine. */
        if (r < 0 && r != -ENOENT)
                return error_set_errno(r, "fuse: cannot invalidate %s", fx->paths[index]);
        return 0;
}

int fuse_export_store(struct fuse_export *fx, size_t index, uint64_t off, const void *data, size_t len) {
        if (index >= fx->count)
                return -EINVAL;
        struct fuse_bufvec buf = FUSE_BUFVEC_INIT(len);
        buf.buf[0].mem = (void *)data;
        int r = fuse_lowlevel_notify_store(fx->se, FIRST_DEVICE_INO + index, (off_t)off, &buf, 0);
        if (r < 0)
                return error_set_errno(r, "fuse: cannot store %zu bytes at %" PRIu64 " of %s in the page cache", len,
                                       off, fx->paths[index]);
        return 0;
}

/* End the connection even though files are still open or mapped (fusectl's abort): users get
 * ENOTCONN instead of hanging, and our request threads return. */
static void abort_connection(struct fuse_export *fx) {
        char path[128];
        snprintf(path, sizeof(path), "/sys/fs/fuse/connections/%u/abort", minor(fx->dev));
        if (access(path, W_OK) != 0)
                mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL);
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "1", 1) != 1)
                log_debug("fuse: cannot abort the connection of %s: %s", fx->mountpoint, strerror(errno));
        if (fd >= 0)
                close(fd);
}

void fuse_export_stop(struct fuse_export *fx) {
        if (!fx)
                return;
        if (fx->sync_fd >= 0)
                close(fx->sync_fd);
        if (fx->running) {
                fuse_session_exit(fx->se);
                /* Unmounting ends the connection, and with it the request threads' reads of
                 * /dev/fuse. If the mount is busy (a file still open or mapped elsewhere), abort the
                 * connection first, then detach the mount. */
                if (umount2(fx->mountpoint, 0) < 0) {
                        if (errno == EPERM) {
                                fuse_session_unmount(fx->se); /* not root: fusermount3 does it */
                        } else {
                                if (fx->dev)
                                        abort_connection(fx);
                                if (umount2(fx->mountpoint, MNT_DETACH) < 0 && errno != EINVAL)
                                        log_debug("fuse: unmount of %s: %s", fx->mountpoint, strerror(errno));
                        }
                }
                pthread_join(fx->thread, NULL);
                /* Already unmounted; this releases what libfuse keeps for the mount. */
                fuse_session_unmount(fx->se);
        }
        if (fx->se)
                fuse_session_destroy(fx->se);
        export_free(fx);
}
