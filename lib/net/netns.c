/* netns.c — named network namespaces the way `ip netns` keeps them (net.h). */
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/net.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define NETNS_DIR "/run/netns"

static int netns_path(const char *name, char *path, size_t size) {
        if (!*name || strchr(name, '/') || strlen(name) > 64)
                return error_set(-EINVAL, "network namespace \"%s\": not a valid name", name);
        snprintf(path, size, "%s/%s", NETNS_DIR, name);
        return 0;
}

int netns_open(const char *name) {
        char path[128];
        int r = netns_path(name, path, sizeof(path));
        if (r < 0)
                return r;
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "network namespace %s", name);
        return fd;
}

int netns_run(int fd, int (*fn)(void *arg), void *arg) {
        _cleanup_close_ int self = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC);
        if (self < 0)
                return error_set_errno(-errno, "cannot open this thread's network namespace");
        if (setns(fd, CLONE_NEWNET) < 0)
                return error_set_errno(-errno, "cannot enter a network namespace");
        int r = fn(arg);
        if (setns(self, CLONE_NEWNET) < 0)
                abort(); /* a thread stuck in another namespace would do harm anywhere */
        return r;
}

struct made {
        const char *path;
};

static int bind_new(void *arg) {
        struct made *m = arg;
        if (unshare(CLONE_NEWNET) < 0)
                return error_set_errno(-errno, "unshare(CLONE_NEWNET)");
        if (mount("/proc/thread-self/ns/net", m->path, NULL, MS_BIND, NULL) < 0)
                return error_set_errno(-errno, "cannot bind the new namespace to %s", m->path);
        return 0;
}

int netns_create(const char *name) {
        char path[128];
        int r = netns_path(name, path, sizeof(path));
        if (r < 0)
                return r;
        if (mkdir(NETNS_DIR, 0755) < 0 && errno != EEXIST)
                return error_set_errno(-errno, "cannot create %s", NETNS_DIR);
        int fd = open(path, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0444);
        if (fd < 0)
                return error_set_errno(-errno, "network namespace %s: cannot create %s", name, path);
        close(fd);
        /* The new namespace is entered (and left) by this thread alone: netns_run's switch back
         * works the same after an unshare. */
        _cleanup_close_ int self = open("/proc/self/ns/net", O_RDONLY | O_CLOEXEC);
        struct made m = {path};
        r = self < 0 ? error_set_errno(-errno, "cannot open our network namespace") : netns_run(self, bind_new, &m);
        if (r < 0) {
                unlink(path);
                return error_prefix(r, "network namespace %s", name);
        }
        return 0;
}

int netns_delete(const char *name) {
        char path[128];
        int r = netns_path(name, path, sizeof(path));
        if (r < 0)
                return r;
        if (umount2(path, MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT)
                return error_set_errno(-errno, "network namespace %s: cannot unmount %s", name, path);
        if (unlink(path) < 0 && errno != ENOENT)
                return error_set_errno(-errno, "network namespace %s: cannot remove %s", name, path);
        return 0;
}
