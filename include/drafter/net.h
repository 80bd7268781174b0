/* net.h — Drafter's network model: a pool of identical network namespaces (<prefix>0 … N-1),
 * each with the same tap device and addresses for its VM (so a snapshot's network configuration
 * is valid in every one of them), a veth pair to the host, and NAT so that each VM reaches the
 * host interface and the host reaches each VM at an address of its own.
 *
 * Per namespace i (defaults in brackets):
 *   tap  <namespace_interface> [tap0]: <gateway>/<netmask> [172.16.0.1/30]; the VM is <guest>
 *        [172.16.0.2] with MAC <mac> (the VMM's business: recorded here for it)
 *   veth <prefix>i-h (host) <-> <prefix>i-n (namespace): the i-th /30 of host_veth_cidr
 *        [10.0.8.0/22]: .1 on the host, .2 in the namespace, default route of the namespace
 *   the VM's host-visible address: the (i+1)-th address of namespace_veth_cidr [10.0.15.0/24];
 *        the namespace DNATs it to the guest and SNATs the guest's traffic to it, the host
 *        routes it into the namespace
 *   host: forwarding for these ranges, MASQUERADE out of host_interface; with a
 *        blocked_subnet_cidr, VMs cannot open connections into it (other namespaces, the host's
 *        private networks); without allow_incoming_traffic, nothing from outside may open a
 *        connection to a VM.
 * Everything lives in one nftables table of ours on the host ("drafter-<prefix>", inet) and one
 * per namespace, netlink (libnl) makes the links and addresses; IPv4 forwarding is switched on
 * and its previous value restored at the end. nat_start() first removes what a crashed run with
 * the same prefix left (namespaces, host veths, the table, and restores the sysctl from its
 * record in /run/drafter). Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN for the namespace mounts). */
#pragma once

#include <stdbool.h>
#include <stdint.h>

#define NET_MAX_NAMESPACES 256
/* drafter-nat writes each namespace's host-visible address to NET_ADDRESS_DIR/<name>. */
#define NET_ADDRESS_DIR "/run/drafter/netns"

/* ---- port forwards (drafter-forwarder) ----
 * externalAddr ("127.0.0.1:3333", "192.168.1.2:3333") → the VM of namespace `netns`, port
 * internalPort, tcp or udp: DNAT in one table of ours per process ("drafter-forward-<pid>", inet)
 * for packets arriving (prerouting) and for local clients (output); local clients from a
 * loopback address are masqueraded onto the veth, which needs net.ipv4.conf.all.route_localnet
 * (switched on while any loopback forward exists, restored after). A table whose process is gone
 * is removed by the next forwarder. */
struct port_forward {
        char netns[64];
        char protocol[4]; /* "tcp" or "udp" */
        uint16_t internal_port, external_port;
        char external_ip[16];
        char target_ip[16]; /* the namespace's host-visible address */
};
/* Parse the --port-forwards JSON; each namespace must be one of drafter-nat's. */
int port_forwards_parse(const char *json, struct port_forward **ret, int *ret_count);
struct forwarder;
int forwarder_start(const struct port_forward *forwards, int count, struct forwarder **ret);
void forwarder_stop(struct forwarder *f);

struct nat_config {
        const char *host_interface;      /* required: where the VMs' traffic leaves */
        const char *host_veth_cidr;      /* one /30 per namespace */
        const char *namespace_veth_cidr; /* one host-visible address per namespace */
        const char *namespace_interface;
        const char *namespace_interface_gateway;
        int namespace_interface_netmask;
        const char *namespace_interface_guest;
        const char *namespace_interface_mac;
        const char *namespace_prefix;
        const char *blocked_subnet_cidr; /* "" for none */
        bool allow_incoming_traffic;
        int count; /* 1 … NET_MAX_NAMESPACES */
};

struct nat;

/* Check the configuration (CIDRs, sizes, overlaps, interface names, that the host interface
 * exists) without changing anything; -EINVAL with a message naming the field. */
int nat_config_check(const struct nat_config *cfg);
/* Remove leftovers, then create every namespace. On failure everything created is removed. */
int nat_start(const struct nat_config *cfg, struct nat **ret_nat);
/* Name and host-visible address of namespace i ("ark0", "10.0.15.1"). */
const char *nat_namespace_name(const struct nat *nat, int i);
const char *nat_namespace_address(const struct nat *nat, int i);
/* Remove every namespace, veth, table and sysctl change; free. NULL is fine. */
void nat_stop(struct nat *nat);
/* What a crashed run with this prefix left: removed. Returns how many namespaces it removed. */
int nat_clear_leftovers(const char *prefix);

/* Named network namespaces, as `ip netns` keeps them (a bind mount at /run/netns/NAME). */
int netns_create(const char *name);
int netns_delete(const char *name);
/* An fd of the namespace (O_RDONLY | O_CLOEXEC), or -errno with a message. */
int netns_open(const char *name);
/* Run fn(arg) with the calling thread in namespace fd, then back in its own. */
int netns_run(int fd, int (*fn)(void *arg), void *arg);
