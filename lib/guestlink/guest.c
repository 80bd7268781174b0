/* guest.c — the guest end of a link: a named virtio-serial port, or AF_VSOCK (see guestlink.h). */
#include "drafter/guestlink.h"
#include "drafter/clock.h"
#include "drafter/error.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* /dev/vportNpM of the port called `name`, from /sys/class/virtio-ports/<dev>/name. */
static int find_port(const char *name, char *path, size_t size) {
        DIR *d = opendir("/sys/class/virtio-ports");
        if (!d)
                return -ENOENT;
        int r = -ENOENT;
        struct dirent *e;
        while ((e = readdir(d))) {
                if (e->d_name[0] == '.')
                        continue;
                char file[512], got[256] = "";
                snprintf(file, sizeof(file), "/sys/class/virtio-ports/%s/name", e->d_name);
                FILE *f = fopen(file, "re");
                if (!f)
                        continue;
                if (fgets(got, sizeof(got), f))
                        got[strcspn(got, "\n")] = '\0';
                fclose(f);
                if (strcmp(got, name) == 0) {
                        snprintf(path, size, "/dev/%s", e->d_name);
                        r = 0;
                        break;
                }
        }
        closedir(d);
        return r;
}

static int open_vsock(uint32_t port) {
        int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_HOST, .svm_port = port};
        if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
                int e = errno;
                close(fd);
                return -e;
        }
        return fd;
}

int guestlink_guest_open(const char *name, uint32_t vsock_port, uint64_t timeout_ns, int *ret_fd) {
        uint64_t deadline = clock_now_ns() + timeout_ns;
        int last = -ENOENT;
        for (;;) {
                char path[300];
                if (find_port(name, path, sizeof(path)) == 0) {
                        int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
                        if (fd >= 0) {
                                *ret_fd = fd;
                                return 0;
                        }
                        last = -errno;
                } else {
                        int fd = open_vsock(vsock_port);
                        if (fd >= 0) {
                                *ret_fd = fd;
                                return 0;
                        }
                        last = fd;
                }
                if (clock_now_ns() >= deadline)
                        return error_set_errno(last, "no virtio-serial port \"%s\" and no vsock port %u", name,
                                               vsock_port);
                clock_sleep_ns(20 * NSEC_PER_MSEC);
        }
}
