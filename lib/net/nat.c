/* nat.c — the namespace pool with NAT (net.h): libnl for links, addresses and routes, libnftables
 * for the rules, one table on the host and one per namespace. */
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/log.h"
#include "drafter/net.h"
#include "host.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <netlink/route/addr.h>
#include <netlink/route/link.h>
#include <netlink/route/link/veth.h>
#include <netlink/route/route.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define STATE_DIR "/run/drafter"

struct cidr {
        uint32_t addr; /* host order, network address */
        int prefix;
};

struct nat_namespace {
        char name[32], host_veth[IFNAMSIZ], ns_veth[IFNAMSIZ];
        char address[INET_ADDRSTRLEN]; /* host-visible */
        uint32_t host_ip, ns_ip, visible_ip;
        bool made;
};

struct nat {
        struct nat_config cfg;
        char table[64];
        struct nat_namespace *ns;
        int count;
        bool table_made;
        char forward_before[8]; /* the host's net.ipv4.ip_forward before us, "" if untouched */
};

static int parse_ip(const char *text, const char *what, uint32_t *ret) {
        struct in_addr a = {0};
        if (inet_pton(AF_INET, text, &a) != 1)
                return error_set(-EINVAL, "%s: \"%s\" is not an IPv4 address", what, text);
        *ret = ntohl(a.s_addr);
        return 0;
}

static int parse_cidr(const char *text, const char *what, struct cidr *ret) {
        char ip[32];
        const char *slash = strchr(text, '/');
        char *end;
        if (!slash || (size_t)(slash - text) >= sizeof(ip))
                return error_set(-EINVAL, "%s: \"%s\" is not a CIDR (address/prefix)", what, text);
        memcpy(ip, text, (size_t)(slash - text));
        ip[slash - text] = '\0';
        errno = 0;
        long prefix = strtol(slash + 1, &end, 10);
        if (errno || *end || end == slash + 1 || prefix < 0 || prefix > 32)
                return error_set(-EINVAL, "%s: \"%s\" has no prefix length of 0-32", what, text);
        uint32_t a = 0;
        int r = parse_ip(ip, what, &a);
        if (r < 0)
                return r;
        uint32_t mask = prefix ? ~0u << (32 - prefix) : 0;
        *ret = (struct cidr){a & mask, (int)prefix};
        return 0;
}

static uint64_t cidr_size(const struct cidr *c) {
        return 1ull << (32 - c->prefix);
}

static bool cidr_overlap(const struct cidr *a, const struct cidr *b) {
        uint64_t a_end = a->addr + cidr_size(a), b_end = b->addr + cidr_size(b);
        return a->addr < b_end && b->addr < a_end;
}

static void ip_text(uint32_t ip, char *buf, size_t size) {
        struct in_addr a = {htonl(ip)};
        inet_ntop(AF_INET, &a, buf, (socklen_t)size);
}

int nat_config_check(const struct nat_config *c) {
        struct cidr host, ns, tap, blocked;
        uint32_t gw = 0, guest = 0;
        int r;
        if (!c->host_interface || !*c->host_interface)
                return error_set(-EINVAL, "--host-interface is required");
        if (strlen(c->host_interface) >= IFNAMSIZ || if_nametoindex(c->host_interface) == 0)
                return error_set(-ENODEV, "--host-interface %s: no such interface", c->host_interface);
        if (c->count < 1 || c->count > NET_MAX_NAMESPACES)
                return error_set(-EINVAL, "namespace count %d: must be 1-%d", c->count, NET_MAX_NAMESPACES);
        size_t plen = strlen(c->namespace_prefix);
        if (plen == 0 || plen > 9 || strspn(c->namespace_prefix, "abcdefghijklmnopqrstuvwxyz0123456789") != plen)
                return error_set(-EINVAL, "--namespace-prefix \"%s\": 1-9 lowercase letters or digits (veth names "
                                 "<prefix>-h<N> must fit 15 characters)", c->namespace_prefix);
        size_t ilen = strlen(c->namespace_interface);
        if (ilen == 0 || ilen >= IFNAMSIZ || strchr(c->namespace_interface, '/') || strchr(c->namespace_interface, ' '))
                return error_set(-EINVAL, "--namespace-interface \"%s\": not an interface name", c->namespace_interface);
        if ((r = parse_cidr(c->host_veth_cidr, "--host-veth-cidr", &host)) < 0 ||
            (r = parse_cidr(c->namespace_veth_cidr, "--namespace-veth-cidr", &ns)) < 0 ||
            (r = parse_ip(c->namespace_interface_gateway, "--namespace-interface-gateway", &gw)) < 0 ||
            (r = parse_ip(c->namespace_interface_guest, "--namespace-interface-guest", &guest)) < 0)
                return r;
        if (c->namespace_interface_netmask < 1 || c->namespace_interface_netmask > 30)
                return error_set(-EINVAL, "--namespace-interface-netmask %d: must be 1-30", c->namespace_interface_netmask);
        tap = (struct cidr){gw & (~0u << (32 - c->namespace_interface_netmask)), c->namespace_interface_netmask};
        if ((guest & (~0u << (32 - tap.prefix))) != tap.addr || guest == gw)
                return error_set(-EINVAL, "--namespace-interface-guest %s is not another address of %s/%d",
                                 c->namespace_interface_guest, c->namespace_interface_gateway, tap.prefix);
        if (cidr_size(&host) / 4 < (uint64_t)c->count)
                return error_set(-EINVAL, "--host-veth-cidr %s holds %llu /30 networks, %d namespaces need one each",
                                 c->host_veth_cidr, (unsigned long long)(cidr_size(&host) / 4), c->count);
        if (cidr_size(&ns) < (uint64_t)c->count + 2)
                return error_set(-EINVAL, "--namespace-veth-cidr %s holds too few addresses for %d namespaces",
                                 c->namespace_veth_cidr, c->count);
        if (cidr_overlap(&host, &ns))
                return error_set(-EINVAL, "--host-veth-cidr %s and --namespace-veth-cidr %s overlap", c->host_veth_cidr,
                                 c->namespace_veth_cidr);
        if (cidr_overlap(&tap, &host) || cidr_overlap(&tap, &ns))
                return error_set(-EINVAL, "the VM network %s/%d overlaps the veth networks", c->namespace_interface_gateway,
                                 tap.prefix);
        if (c->blocked_subnet_cidr && *c->blocked_subnet_cidr &&
            (r = parse_cidr(c->blocked_subnet_cidr, "--blocked-subnet-cidr", &blocked)) < 0)
                return r;
        unsigned mac[6];
        char extra;
        if (sscanf(c->namespace_interface_mac, "%x:%x:%x:%x:%x:%x%c", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4],
                   &mac[5], &extra) != 6)
                return error_set(-EINVAL, "--namespace-interface-mac \"%s\" is not a MAC address",
                                 c->namespace_interface_mac);
        return 0;
}

/* ---- netlink ---- */

static struct nl_sock *nl_open(void) {
        struct nl_sock *sk = nl_socket_alloc();
        if (sk && nl_connect(sk, NETLINK_ROUTE) < 0) {
                nl_socket_free(sk);
                return NULL;
        }
        return sk;
}

/* "<what>: <doing>: <libnl's reason>" */
static int nl_fail(int nlerr, const char *what, const char *doing) {
        return error_set(-EIO, "%s: %s: %s", what, doing, nl_geterror(nlerr));
}

static int link_up(struct nl_sock *sk, const char *name) {
        struct rtnl_link *link = NULL, *change = rtnl_link_alloc();
        int e = rtnl_link_get_kernel(sk, 0, name, &link);
        if (e >= 0) {
                rtnl_link_set_flags(change, IFF_UP);
                e = rtnl_link_change(sk, link, change, 0);
        }
        rtnl_link_put(link);
        rtnl_link_put(change);
        return e < 0 ? nl_fail(e, name, "cannot bring it up") : 0;
}

static int add_address(struct nl_sock *sk, const char *dev, uint32_t ip, int prefix) {
        int index = (int)if_nametoindex(dev);
        if (!index)
                return error_set(-ENODEV, "%s: no such interface", dev);
        char text[40];
        ip_text(ip, text, sizeof(text));
        snprintf(text + strlen(text), sizeof(text) - strlen(text), "/%d", prefix);
        struct nl_addr *a = NULL;
        struct rtnl_addr *addr = rtnl_addr_alloc();
        int e = nl_addr_parse(text, AF_INET, &a);
        if (e >= 0) {
                rtnl_addr_set_ifindex(addr, index);
                rtnl_addr_set_local(addr, a);
                e = rtnl_addr_add(sk, addr, 0);
        }
        nl_addr_put(a);
        rtnl_addr_put(addr);
        return e < 0 ? error_set(-EIO, "%s: cannot add address %s: %s", dev, text, nl_geterror(e)) : 0;
}

/* A route to dst/prefix via gw (over dev). */
static int add_route(struct nl_sock *sk, const char *dst, const char *dev, uint32_t gw) {
        int index = (int)if_nametoindex(dev);
        if (!index)
                return error_set(-ENODEV, "%s: no such interface", dev);
        char gws[INET_ADDRSTRLEN];
        ip_text(gw, gws, sizeof(gws));
        struct nl_addr *d = NULL, *g = NULL;
        struct rtnl_route *route = rtnl_route_alloc();
        struct rtnl_nexthop *nh = rtnl_route_nh_alloc();
        int e = nl_addr_parse(dst, AF_INET, &d);
        if (e >= 0)
                e = nl_addr_parse(gws, AF_INET, &g);
        if (e >= 0) {
                rtnl_route_set_family(route, AF_INET);
                rtnl_route_set_dst(route, d);
                rtnl_route_nh_set_ifindex(nh, index);
                rtnl_route_nh_set_gateway(nh, g);
                rtnl_route_add_nexthop(route, nh);
                nh = NULL;
                e = rtnl_route_add(sk, route, 0);
        }
        if (nh)
                rtnl_route_nh_free(nh);
        nl_addr_put(d);
        nl_addr_put(g);
        rtnl_route_put(route);
        return e < 0 ? error_set(-EIO, "route %s via %s dev %s: %s", dst, gws, dev, nl_geterror(e)) : 0;
}

static int delete_link(struct nl_sock *sk, const char *name) {
        struct rtnl_link *link = rtnl_link_alloc();
        rtnl_link_set_name(link, name);
        int e = rtnl_link_delete(sk, link);
        rtnl_link_put(link);
        return e < 0 && e != -NLE_NODEV && e != -NLE_OBJ_NOTFOUND ? nl_fail(e, name, "cannot delete it") : 0;
}

/* ---- nftables and sysctl ---- */

static void state_path(const char *prefix, char *path, size_t size) {
        snprintf(path, size, STATE_DIR "/nat-%s.ip_forward", prefix);
}

/* ---- one namespace ---- */

struct inside {
        const struct nat *nat;
        const struct nat_namespace *ns;
};

static int make_tap(const char *name) {
        _cleanup_close_ int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
        if (fd < 0)
                return error_set_errno(-errno, "/dev/net/tun");
        struct ifreq ifr = {.ifr_flags = IFF_TAP | IFF_NO_PI};
        snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
        if (ioctl(fd, TUNSETIFF, &ifr) < 0 || ioctl(fd, TUNSETPERSIST, 1) < 0)
                return error_set_errno(-errno, "cannot create tap %s", name);
        return 0;
}

static int setup_inside(void *arg) {
        const struct inside *in = arg;
        const struct nat_config *c = &in->nat->cfg;
        const struct nat_namespace *ns = in->ns;
        struct nl_sock *sk = nl_open();
        if (!sk)
                return error_set(-EIO, "netlink: cannot connect");
        uint32_t gw = 0, guest = 0;
        parse_ip(c->namespace_interface_gateway, "gateway", &gw);
        parse_ip(c->namespace_interface_guest, "guest", &guest);
        char visible[INET_ADDRSTRLEN], guests[INET_ADDRSTRLEN], cmd[1024];
        ip_text(ns->visible_ip, visible, sizeof(visible));
        ip_text(guest, guests, sizeof(guests));
        snprintf(cmd, sizeof(cmd),
                 "add table ip drafter\n"
                 "add chain ip drafter prerouting { type nat hook prerouting priority -100; }\n"
                 "add chain ip drafter postrouting { type nat hook postrouting priority 100; }\n"
                 "add rule ip drafter prerouting ip daddr %s dnat to %s\n"
                 "add rule ip drafter postrouting ip saddr %s oifname \"%s\" snat to %s\n",
                 visible, guests, guests, ns->ns_veth, visible);
        int r = link_up(sk, "lo");
        if (r >= 0 && (r = add_address(sk, ns->ns_veth, ns->ns_ip, 30)) >= 0 && (r = link_up(sk, ns->ns_veth)) >= 0 &&
            (r = make_tap(c->namespace_interface)) >= 0 &&
            (r = add_address(sk, c->namespace_interface, gw, c->namespace_interface_netmask)) >= 0 &&
            (r = link_up(sk, c->namespace_interface)) >= 0 && (r = add_route(sk, "0.0.0.0/0", ns->ns_veth, ns->host_ip)) >= 0 &&
            (r = net_write_line("/proc/sys/net/ipv4/ip_forward", "1")) >= 0)
                r = net_nft(cmd, false);
        nl_socket_free(sk);
        return r;
}

static int setup_namespace(struct nat *nat, struct nl_sock *host, struct nat_namespace *ns) {
        int r = netns_create(ns->name);
        if (r < 0)
                return r;
        ns->made = true;
        _cleanup_close_ int fd = netns_open(ns->name);
        if (fd < 0)
                return fd;
        int e = rtnl_link_veth_add(host, ns->host_veth, ns->ns_veth, getpid());
        if (e < 0)
                return nl_fail(e, ns->host_veth, "cannot create the veth pair");
        struct rtnl_link *peer = NULL, *change = rtnl_link_alloc();
        e = rtnl_link_get_kernel(host, 0, ns->ns_veth, &peer);
        if (e >= 0) {
                rtnl_link_set_ns_fd(change, fd);
                e = rtnl_link_change(host, peer, change, 0);
        }
        rtnl_link_put(peer);
        rtnl_link_put(change);
        if (e < 0)
                return nl_fail(e, ns->ns_veth, "cannot move it into its namespace");
        char visible[40];
        ip_text(ns->visible_ip, visible, sizeof(visible));
        strcat(visible, "/32");
        if ((r = add_address(host, ns->host_veth, ns->host_ip, 30)) < 0 || (r = link_up(host, ns->host_veth)) < 0)
                return r;
        struct inside in = {nat, ns};
        if ((r = netns_run(fd, setup_inside, &in)) < 0)
                return error_prefix(r, "namespace %s", ns->name);
        if ((r = add_route(host, visible, ns->host_veth, ns->ns_ip)) < 0)
                return r;
        /* For drafter-forwarder: where the host reaches this namespace's VM. */
        char path[256];
        snprintf(path, sizeof(path), NET_ADDRESS_DIR "/%s", ns->name);
        mkdir(STATE_DIR, 0755);
        mkdir(NET_ADDRESS_DIR, 0755);
        return net_write_line(path, ns->address);
}

/* ---- the pool ---- */

static bool numbered(const char *name, const char *prefix) {
        size_t n = strlen(prefix);
        return strncmp(name, prefix, n) == 0 && name[n] && strspn(name + n, "0123456789") == strlen(name + n);
}

int nat_clear_leftovers(const char *prefix) {
        int removed = 0;
        DIR *d = opendir("/run/netns");
        struct dirent *e;
        while (d && (e = readdir(d)))
                if (numbered(e->d_name, prefix) && netns_delete(e->d_name) >= 0) {
                        char path[512];
                        snprintf(path, sizeof(path), NET_ADDRESS_DIR "/%s", e->d_name);
                        unlink(path);
                        removed++;
                }
        if (d)
                closedir(d);
        /* Host ends of veth pairs whose namespace went away are gone with it; any left by a
         * run killed between creating a pair and moving its end are removed here. */
        char veth_prefix[32];
        snprintf(veth_prefix, sizeof(veth_prefix), "%s-h", prefix);
        struct nl_sock *sk = nl_open();
        d = opendir("/sys/class/net");
        while (sk && d && (e = readdir(d)))
                if (numbered(e->d_name, veth_prefix) && delete_link(sk, e->d_name) < 0)
                        log_debug("%s", error_message());
        if (d)
                closedir(d);
        if (sk)
                nl_socket_free(sk);
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "delete table inet drafter-%s\n", prefix);
        net_nft(cmd, true); /* if a crashed run left it */
        char path[256], before[8] = "";
        state_path(prefix, path, sizeof(path));
        net_read_line(path, before, sizeof(before));
        if (*before && net_write_line("/proc/sys/net/ipv4/ip_forward", before) >= 0)
                unlink(path);
        return removed;
}

static int setup_host(struct nat *nat) {
        const struct nat_config *c = &nat->cfg;
        char path[256], cmd[2048];
        net_read_line("/proc/sys/net/ipv4/ip_forward", nat->forward_before, sizeof(nat->forward_before));
        state_path(c->namespace_prefix, path, sizeof(path));
        mkdir(STATE_DIR, 0755);
        int r = net_write_line(path, nat->forward_before);
        if (r < 0)
                return error_prefix(r, "cannot record the ip_forward setting");
        if ((r = net_write_line("/proc/sys/net/ipv4/ip_forward", "1")) < 0)
                return r;
        int n = snprintf(cmd, sizeof(cmd),
                         "add table inet %s\n"
                         "add chain inet %s postrouting { type nat hook postrouting priority 100; }\n"
                         "add chain inet %s forward { type filter hook forward priority 0; policy accept; }\n"
                         "add rule inet %s postrouting ip saddr %s oifname \"%s\" masquerade\n"
                         "add rule inet %s forward ct state established,related accept\n",
                         nat->table, nat->table, nat->table, nat->table, c->namespace_veth_cidr, c->host_interface,
                         nat->table);
        if (c->blocked_subnet_cidr && *c->blocked_subnet_cidr)
                n += snprintf(cmd + n, sizeof(cmd) - (size_t)n,
                              "add rule inet %s forward iifname \"%s-h*\" ip daddr %s drop\n", nat->table,
                              c->namespace_prefix, c->blocked_subnet_cidr);
        if (!c->allow_incoming_traffic)
                n += snprintf(cmd + n, sizeof(cmd) - (size_t)n,
                              "add rule inet %s forward oifname \"%s-h*\" ct state new drop\n", nat->table,
                              c->namespace_prefix);
        if ((size_t)n >= sizeof(cmd))
                return error_set(-ENAMETOOLONG, "nat: the nftables rules for table %s do not fit", nat->table);
        if ((r = net_nft(cmd, false)) < 0)
                return r;
        nat->table_made = true;
        return 0;
}

int nat_start(const struct nat_config *cfg, struct nat **ret) {
        int r = nat_config_check(cfg);
        if (r < 0)
                return r;
        int removed = nat_clear_leftovers(cfg->namespace_prefix);
        if (removed > 0)
                log_info("Removed %d namespaces a previous run left behind", removed);
        struct nat *nat = calloc(1, sizeof(*nat));
        if (!nat || !(nat->ns = calloc((size_t)cfg->count, sizeof(*nat->ns)))) {
                free(nat);
                return -ENOMEM;
        }
        nat->cfg = *cfg;
        nat->count = cfg->count;
        snprintf(nat->table, sizeof(nat->table), "drafter-%s", cfg->namespace_prefix);
        struct cidr host = {0}, visible = {0};
        parse_cidr(cfg->host_veth_cidr, "", &host);
        parse_cidr(cfg->namespace_veth_cidr, "", &visible);
        for (int i = 0; i < nat->count; i++) {
                struct nat_namespace *ns = &nat->ns[i];
                snprintf(ns->name, sizeof(ns->name), "%s%d", cfg->namespace_prefix, i);
                snprintf(ns->host_veth, sizeof(ns->host_veth), "%s-h%d", cfg->namespace_prefix, i);
                snprintf(ns->ns_veth, sizeof(ns->ns_veth), "%s-n%d", cfg->namespace_prefix, i);
                ns->host_ip = host.addr + 4u * (uint32_t)i + 1;
                ns->ns_ip = ns->host_ip + 1;
                ns->visible_ip = visible.addr + (uint32_t)i + 1;
                ip_text(ns->visible_ip, ns->address, sizeof(ns->address));
        }
        struct nl_sock *sk = nl_open();
        r = sk ? setup_host(nat) : error_set(-EIO, "netlink: cannot connect");
        for (int i = 0; i < nat->count && r >= 0; i++)
                r = setup_namespace(nat, sk, &nat->ns[i]);
        if (sk)
                nl_socket_free(sk);
        if (r < 0) {
                char why[1024];
                snprintf(why, sizeof(why), "%s", error_message());
                nat_stop(nat);
                return error_set(r, "%s", why);
        }
        *ret = nat;
        return 0;
}

const char *nat_namespace_name(const struct nat *nat, int i) {
        return i >= 0 && i < nat->count ? nat->ns[i].name : NULL;
}

const char *nat_namespace_address(const struct nat *nat, int i) {
        return i >= 0 && i < nat->count ? nat->ns[i].address : NULL;
}

void nat_stop(struct nat *nat) {
        if (!nat)
                return;
        struct nl_sock *sk = nl_open();
        for (int i = 0; i < nat->count; i++) {
                /* Deleting one end of a veth pair deletes both; the namespace takes its tap
                 * and its table with it. */
                if (sk && delete_link(sk, nat->ns[i].host_veth) < 0)
                        log_error("%s", error_message());
                if (nat->ns[i].made && netns_delete(nat->ns[i].name) < 0)
                        log_error("%s", error_message());
                char path[256];
                snprintf(path, sizeof(path), NET_ADDRESS_DIR "/%s", nat->ns[i].name);
                unlink(path);
        }
        if (sk)
                nl_socket_free(sk);
        char cmd[128];
        snprintf(cmd, sizeof(cmd), "delete table inet %s\n", nat->table);
        if (nat->table_made && net_nft(cmd, false) < 0)
                log_error("%s", error_message());
        if (*nat->forward_before) {
                char path[256];
                state_path(nat->cfg.namespace_prefix, path, sizeof(path));
                if (net_write_line("/proc/sys/net/ipv4/ip_forward", nat->forward_before) < 0)
                        log_error("%s", error_message());
                else
                        unlink(path);
        }
        free(nat->ns);
        free(nat);
}
