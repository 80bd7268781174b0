/* nbd_kernel.c — /dev/nbdN backed by our NBD server, configured over generic netlink ("nbd"
 * family, linux/nbd-netlink.h) with libmnl. See nbd_kernel.h. */
#include "drafter/nbd_kernel.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/log.h"

#include <errno.h>
#include <libmnl/libmnl.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/nbd.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNECTIONS 8
#define NL_BUFFER_SIZE 8192 /* MNL_SOCKET_BUFFER_SIZE is a run-time value (page size) */

struct nbd_kernel {
        struct nbd_server *srv;
        size_t export_index;
        int index; /* N of /dev/nbdN */
        unsigned count;
        int our_fds[MAX_CONNECTIONS];
        pthread_t threads[MAX_CONNECTIONS];
};

struct serve_args {
        struct nbd_kernel *nbd;
        int fd;
};

bool nbd_kernel_available(void) {
        struct stat st;
        if (stat("/dev/nbd0", &st) == 0)
                return true;
        /* Try the module once, quietly. */
        if (system("modprobe nbd nbds_max=64 >/dev/null 2>&1") == 0 && stat("/dev/nbd0", &st) == 0)
                return true;
        return false;
}

/* Send one generic-netlink request and read replies until the ACK; with cb for data replies. */
static int genl_request(struct mnl_socket *nl, struct nlmsghdr *nlh, mnl_cb_t cb, void *data) {
        char buf[NL_BUFFER_SIZE];
        unsigned seq = nlh->nlmsg_seq, portid = mnl_socket_get_portid(nl);
        if (mnl_socket_sendto(nl, nlh, nlh->nlmsg_len) < 0)
                return -errno;
        for (;;) {
                ssize_t n = mnl_socket_recvfrom(nl, buf, sizeof(buf));
                if (n < 0)
                        return -errno;
                int r = mnl_cb_run(buf, (size_t)n, seq, portid, cb, data);
                if (r < 0)
                        return -errno;
                if (r == MNL_CB_STOP)
                        return 0;
        }
}

static int family_attr_cb(const struct nlattr *attr, void *data) {
        if (mnl_attr_get_type(attr) == CTRL_ATTR_FAMILY_ID)
                *(uint16_t *)data = mnl_attr_get_u16(attr);
        return MNL_CB_OK;
}

static int family_cb(const struct nlmsghdr *nlh, void *data) {
        mnl_attr_parse(nlh, sizeof(struct genlmsghdr), family_attr_cb, data);
        return MNL_CB_OK;
}

static struct nlmsghdr *genl_start(char *buf, uint16_t type, uint8_t cmd, uint8_t version) {
        struct nlmsghdr *nlh = mnl_nlmsg_put_header(buf);
        nlh->nlmsg_type = type;
        nlh->nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
        nlh->nlmsg_seq = (unsigned)time(NULL);
        struct genlmsghdr *g = mnl_nlmsg_put_extra_header(nlh, sizeof(*g));
        g->cmd = cmd;
        g->version = version;
        return nlh;
}

static int index_attr_cb(const struct nlattr *attr, void *data) {
        if (mnl_attr_get_type(attr) == NBD_ATTR_INDEX)
                *(int *)data = (int)mnl_attr_get_u32(attr);
        return MNL_CB_OK;
}

static int connect_reply_cb(const struct nlmsghdr *nlh, void *data) {
        mnl_attr_parse(nlh, sizeof(struct genlmsghdr), index_attr_cb, data);
        return MNL_CB_OK;
}

static int nbd_family(struct mnl_socket *nl, uint16_t *ret_family) {
        char buf[NL_BUFFER_SIZE];
        struct nlmsghdr *nlh = genl_start(buf, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1);
        mnl_attr_put_strz(nlh, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME);
        *ret_family = 0;
        int r = genl_request(nl, nlh, family_cb, ret_family);
        if (r < 0 || *ret_family == 0)
                return error_set(r < 0 ? r : -ENOENT, "nbd: the kernel has no \"nbd\" netlink family (module not loaded?)");
        return 0;
}

static void *serve_thread(void *arg) {
        struct serve_args *a = arg;
        nbd_server_serve_transmission(a->nbd->srv, a->fd, a->nbd->export_index);
        free(a);
        return NULL;
}

static int disconnect_index(int index) {
        struct mnl_socket *nl = mnl_socket_open(NETLINK_GENERIC);
        if (!nl || mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) {
                if (nl)
                        mnl_socket_close(nl);
                return -errno;
        }
        uint16_t family;
        int r = nbd_family(nl, &family);
        if (r >= 0) {
                char buf[NL_BUFFER_SIZE];
                struct nlmsghdr *nlh = genl_start(buf, family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
                mnl_attr_put_u32(nlh, NBD_ATTR_INDEX, (uint32_t)index);
                r = genl_request(nl, nlh, NULL, NULL);
        }
        mnl_socket_close(nl);
        return r;
}

int nbd_kernel_connect(struct nbd_server *srv, size_t export_index, unsigned connections,
                       struct nbd_kernel **ret_nbd, int *ret_index) {
        if (connections == 0 || connections > MAX_CONNECTIONS)
                return error_set(-EINVAL, "nbd: %u connections (1-%d)", connections, MAX_CONNECTIONS);
        uint64_t size = nbd_server_export_size(srv, export_index);
        if (size == UINT64_MAX)
                return error_set(-EINVAL, "nbd: no export %zu", export_index);

        struct mnl_socket *nl = mnl_socket_open(NETLINK_GENERIC);
        if (!nl)
                return error_set_errno(-errno, "nbd: netlink socket");
        if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) {
                int r = error_set_errno(-errno, "nbd: netlink bind");
                mnl_socket_close(nl);
                return r;
        }
        uint16_t family;
        int r = nbd_family(nl, &family);
        if (r < 0) {
                mnl_socket_close(nl);
                return r;
        }

        _cleanup_free_ struct nbd_kernel *nbd = calloc(1, sizeof(*nbd));
        if (!nbd) {
                mnl_socket_close(nl);
                return -ENOMEM;
        }
        nbd->srv = srv;
        nbd->export_index = export_index;
        nbd->index = -1;
        int kernel_fds[MAX_CONNECTIONS];
        for (unsigned i = 0; i < connections; i++) {
                int sv[2];
                if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) {
                        r = error_set_errno(-errno, "nbd: socketpair");
                        for (unsigned j = 0; j < i; j++)
                                close(kernel_fds[j]), close(nbd->our_fds[j]);
                        mnl_socket_close(nl);
                        return r;
                }
                kernel_fds[i] = sv[0];
                nbd->our_fds[i] = sv[1];
        }

        char buf[NL_BUFFER_SIZE];
        struct nlmsghdr *nlh = genl_start(buf, family, NBD_CMD_CONNECT, NBD_GENL_VERSION);
        mnl_attr_put_u64(nlh, NBD_ATTR_SIZE_BYTES, size);
        mnl_attr_put_u64(nlh, NBD_ATTR_BLOCK_SIZE_BYTES, 4096);
        mnl_attr_put_u64(nlh, NBD_ATTR_SERVER_FLAGS, NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
                                                             NBD_FLAG_SEND_TRIM | NBD_FLAG_CAN_MULTI_CONN);
        mnl_attr_put_u64(nlh, NBD_ATTR_TIMEOUT, 30);
        struct nlattr *socks = mnl_attr_nest_start(nlh, NBD_ATTR_SOCKETS);
        for (unsigned i = 0; i < connections; i++) {
                struct nlattr *item = mnl_attr_nest_start(nlh, NBD_SOCK_ITEM);
                mnl_attr_put_u32(nlh, NBD_SOCK_FD, (uint32_t)kernel_fds[i]);
                mnl_attr_nest_end(nlh, item);
        }
        mnl_attr_nest_end(nlh, socks);
        r = genl_request(nl, nlh, connect_reply_cb, &nbd->index);
        mnl_socket_close(nl);
        /* The kernel holds its own references now (or failed); our copies of its ends go. */
        for (unsigned i = 0; i < connections; i++)
                close(kernel_fds[i]);
        if (r < 0 || nbd->index < 0) {
                for (unsigned i = 0; i < connections; i++)
                        close(nbd->our_fds[i]);
                return error_set(r < 0 ? r : -EIO, "nbd: the kernel refused the connection: %s",
                                 strerror(r < 0 ? -r : EIO));
        }
        for (unsigned i = 0; i < connections; i++) {
                struct serve_args *a = malloc(sizeof(*a));
                if (a) {
                        a->nbd = nbd;
                        a->fd = nbd->our_fds[i];
                }
                if (!a || pthread_create(&nbd->threads[i], NULL, serve_thread, a) != 0) {
                        free(a);
                        disconnect_index(nbd->index);
                        for (unsigned j = i; j < connections; j++)
                                close(nbd->our_fds[j]);
                        for (unsigned j = 0; j < i; j++)
                                pthread_join(nbd->threads[j], NULL);
                        return error_set(-EAGAIN, "nbd: cannot start serving threads");
                }
                nbd->count++;
        }
        log_debug("nbd: export %zu is /dev/nbd%d", export_index, nbd->index);
        *ret_index = nbd->index;
        *ret_nbd = TAKE_PTR(nbd);
        return 0;
}

void nbd_kernel_disconnect(struct nbd_kernel *nbd) {
        if (!nbd)
                return;
        int r = disconnect_index(nbd->index);
        if (r < 0)
                log_debug("nbd: disconnect of /dev/nbd%d: %s", nbd->index, strerror(-r));
        /* The kernel closes its ends; our serving threads see EOF and return. */
        for (unsigned i = 0; i < nbd->count; i++)
                pthread_join(nbd->threads[i], NULL);
        free(nbd);
}
