/* qemu_touch.c — part of drafter-qemu-heap.so (qemu_heap.c): a thread inside QEMU that maps
 * ranges of the guest-RAM file into QEMU's page tables on drafter-peer's request
 * (qemu_touch.h), so that the VM's first steps after a migration do not fault them in.
 *
 * Why inside QEMU: page tables belong to a process, and a receiving peer fills the page cache
 * of the memory file, not QEMU's mappings of it. After the hand-over the VM's first touch of
 * each page then costs a fault (a shared FUSE mapping: fault-around for reads, a write-protect
 * fault with FUSE's page_mkwrite for every first write) and, where the host's page tables are
 * themselves shadowed by a hypervisor, a shadow fill. QEMU's own migration writes its guest RAM
 * as it arrives and pays all of that before the VM runs. MADV_POPULATE_READ maps a range in one
 * call; a read of each page afterwards has the CPU's (or the hypervisor's) own tables filled.
 *
 * Only ranges already in the page cache are asked for (page_warmer.h says when): a page that is
 * not would be read through FUSE, and that read may wait for the migration. Nothing here
 * changes the guest's memory. Active only where both variables of qemu_touch.h are set. */
#include "qemu_touch.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

struct toucher {
        int fd;
        char *path;
        unsigned char *base; /* QEMU's mapping of the file, once found */
        uint64_t size;
        long page;
};

/* QEMU's shared mapping of the whole file, from /proc/self/maps. */
static bool find_mapping(struct toucher *t) {
        FILE *f = fopen("/proc/self/maps", "re");
        if (!f)
                return false;
        char *line = NULL;
        size_t cap = 0;
        while (!t->base && getline(&line, &cap, f) > 0) {
                unsigned long start, end, off;
                char perms[8];
                int name = 0;
                if (sscanf(line, "%lx-%lx %7s %lx %*s %*s %n", &start, &end, perms, &off, &name) < 4 || !name)
                        continue;
                char *p = line + name;
                p[strcspn(p, "\n")] = '\0';
                if (off == 0 && perms[3] == 's' && strcmp(p, t->path) == 0) {
                        t->base = (unsigned char *)start;
                        t->size = end - start;
                        /* A page not in the cache after all is read alone: a readahead window
                         * could hold pages of a neighbour that is still on its way. */
                        madvise(t->base, t->size, MADV_RANDOM);
                }
        }
        free(line);
        fclose(f);
        return t->base != NULL;
}

static int touch(struct toucher *t, const struct qemu_touch_req *q) {
        /* Each time: the sender may have raised it meanwhile (vmm_touch_hurry). */
        struct sched_param sp = {0};
        sched_setscheduler(0, q->flags & QEMU_TOUCH_IDLE ? SCHED_IDLE : SCHED_OTHER, &sp);
        if (!t->base && !find_mapping(t))
                return -ENOENT;
        if (q->flags & QEMU_TOUCH_DONE) {
                madvise(t->base, t->size, MADV_NORMAL);
                return 0;
        }
        if (q->offset % (uint64_t)t->page || q->offset > t->size || q->length > t->size - q->offset)
                return -ERANGE;
        unsigned char *p = t->base + q->offset;
        if (madvise(p, q->length, MADV_POPULATE_READ) < 0)
                return -errno;
        /* The hardware's (or a hypervisor's shadow) entries are filled by an access, not by the
         * kernel's page tables alone. */
        volatile unsigned char sink = 0;
        for (uint64_t o = 0; o < q->length; o += (uint64_t)t->page)
                sink ^= ((volatile unsigned char *)p)[o];
        (void)sink;
        return 0;
}

static void *toucher_thread(void *arg) {
        struct toucher *t = arg;
        struct qemu_touch_req q;
        ssize_t n;
        while ((n = recv(t->fd, &q, sizeof(q), 0)) == (ssize_t)sizeof(q) || (n < 0 && errno == EINTR)) {
                if (n < 0)
                        continue;
                q.result = touch(t, &q);
                q.tid = (int32_t)gettid();
                if (q.flags & QEMU_TOUCH_REPLY && send(t->fd, &q, sizeof(q), MSG_NOSIGNAL) < 0)
                        break;
        }
        close(t->fd);
        free(t->path);
        free(t);
        return NULL;
}

__attribute__((constructor)) static void drafter_qemu_touch(void) {
        const char *fdv = getenv(QEMU_TOUCH_FD_ENV), *path = getenv(QEMU_TOUCH_PATH_ENV);
        struct toucher *t = fdv && path && *path ? calloc(1, sizeof(*t)) : NULL;
        if (t) {
                t->fd = (int)strtol(fdv, NULL, 10);
                t->path = strdup(path);
                t->page = sysconf(_SC_PAGESIZE);
        }
        unsetenv(QEMU_TOUCH_FD_ENV);
        unsetenv(QEMU_TOUCH_PATH_ENV);
        if (!t)
                return;
        if (t->fd < 0 || !t->path || t->page <= 0) {
                free(t->path);
                free(t);
                return;
        }
        /* QEMU's signals are for its own threads. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 64 << 10);
        if (pthread_create(&th, &attr, toucher_thread, t) == 0)
                pthread_setname_np(th, "drafter-touch");
        else {
                close(t->fd);
                free(t->path);
                free(t);
        }
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
}
