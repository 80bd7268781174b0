/* forward.c — port forwards from host addresses to VMs in drafter-nat's namespaces (net.h). */
#include "drafter/address.h"
#include "drafter/cleanup.h"
#include "drafter/error.h"
#include "drafter/log.h"
#include "drafter/net.h"
#include "host.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ROUTE_LOCALNET "/proc/sys/net/ipv4/conf/all/route_localnet"

struct forwarder {
        char table[64];
        char localnet_before[8]; /* "" if untouched */
};

static int parse_port(const char *text, const char *what, uint16_t *ret) {
        char *end;
        errno = 0;
        long v = strtol(text, &end, 10);
        if (errno || *end || end == text || v < 1 || v > 65535)
                return error_set(-EINVAL, "%s \"%s\" is not a port (1-65535)", what, text);
        *ret = (uint16_t)v;
        return 0;
}

static int namespace_address(const char *netns, char *buf, size_t size) {
        char path[256];
        if (!*netns || strchr(netns, '/'))
                return error_set(-EINVAL, "netns \"%s\" is not a namespace name", netns);
        snprintf(path, sizeof(path), NET_ADDRESS_DIR "/%s", netns);
        if (access(path, F_OK) < 0)
                return error_set(-ENOENT, "netns \"%s\" is not a namespace of a running drafter-nat", netns);
        net_read_line(path, buf, size);
        struct in_addr a;
        return inet_pton(AF_INET, buf, &a) == 1 ? 0 : error_set(-EINVAL, "%s: no address in it", path);
}

int port_forwards_parse(const char *text, struct port_forward **ret, int *ret_count) {
        json_error_t e;
        json_t *root = json_loads(text, JSON_REJECT_DUPLICATES, &e);
        if (!root)
                return error_set(-EINVAL, "--port-forwards: not valid JSON (line %d: %s)", e.line, e.text);
        int r = 0;
        size_t n = json_is_array(root) ? json_array_size(root) : 0;
        if (!json_is_array(root) || n == 0 || n > 1024)
                r = error_set(-EINVAL, "--port-forwards: must be an array of 1-1024 forwards");
        struct port_forward *list = r < 0 ? NULL : calloc(n, sizeof(*list));
        if (r == 0 && !list)
                r = -ENOMEM;
        for (size_t i = 0; r == 0 && i < n; i++) {
                json_t *o = json_array_get(root, i);
                const char *keys[] = {"netns", "internalPort", "protocol", "externalAddr"};
                const char *v[4];
                for (int k = 0; k < 4 && r == 0; k++) {
                        json_t *s = json_is_object(o) ? json_object_get(o, keys[k]) : NULL;
                        if (!json_is_string(s))
                                r = error_set(-EINVAL, "--port-forwards[%zu]: field \"%s\" must be a string", i, keys[k]);
                        else
                                v[k] = json_string_value(s);
                }
                if (r < 0)
                        break;
                struct port_forward *p = &list[i];
                char host[64], port[16];
                struct in_addr a;
                if (strcmp(v[2], "tcp") != 0 && strcmp(v[2], "udp") != 0)
                        r = error_set(-EINVAL, "--port-forwards[%zu]: protocol \"%s\": tcp or udp", i, v[2]);
                else if ((r = parse_port(v[1], "internalPort", &p->internal_port)) < 0 ||
                         (r = address_split(v[3], host, sizeof(host), port, sizeof(port))) < 0 ||
                         (r = parse_port(port, "the port of externalAddr", &p->external_port)) < 0)
                        r = error_prefix(r, "--port-forwards[%zu]", i);
                else if (inet_pton(AF_INET, host, &a) != 1)
                        r = error_set(-EINVAL, "--port-forwards[%zu]: externalAddr \"%s\" needs an IPv4 address", i, v[3]);
                else if ((r = namespace_address(v[0], p->target_ip, sizeof(p->target_ip))) < 0)
                        r = error_prefix(r, "--port-forwards[%zu]", i);
                if (r < 0)
                        break;
                snprintf(p->netns, sizeof(p->netns), "%s", v[0]);
                snprintf(p->protocol, sizeof(p->protocol), "%s", v[2]);
                snprintf(p->external_ip, sizeof(p->external_ip), "%s", host);
                for (size_t j = 0; j < i; j++)
                        if (list[j].external_port == p->external_port && strcmp(list[j].protocol, p->protocol) == 0 &&
                            strcmp(list[j].external_ip, p->external_ip) == 0)
                                r = error_set(-EINVAL, "--port-forwards[%zu]: %s %s is forwarded twice", i, p->protocol, v[3]);
        }
        json_decref(root);
        if (r < 0) {
                free(list);
                return r;
        }
        *ret = list;
        *ret_count = (int)n;
        return 0;
}

/* Tables of forwarders that are gone (killed), with what they changed. */
static void clear_stale(void) {
        DIR *d = opendir("/run/drafter");
        struct dirent *e;
        while (d && (e = readdir(d))) {
                int pid;
                char rest;
                if (sscanf(e->d_name, "forward-%d.route_localnet%c", &pid, &rest) != 1 || kill(pid, 0) == 0)
                        continue;
                char path[512], before[8], cmd[128];
                snprintf(path, sizeof(path), "/run/drafter/%s", e->d_name);
                net_read_line(path, before, sizeof(before));
                snprintf(cmd, sizeof(cmd), "delete table inet drafter-forward-%d\n", pid);
                net_nft(cmd, true);
                if (*before)
                        net_write_line(ROUTE_LOCALNET, before);
                unlink(path);
                log_info("Removed the rules of a forwarder that is gone (pid %d)", pid);
        }
        if (d)
                closedir(d);
}

int forwarder_start(const struct port_forward *fw, int count, struct forwarder **ret) {
        clear_stale();
        _cleanup_free_ struct forwarder *f = calloc(1, sizeof(*f));
        size_t cap = 1024 + (size_t)count * 512;
        _cleanup_free_ char *cmd = malloc(cap);
        if (!f || !cmd)
                return -ENOMEM;
        snprintf(f->table, sizeof(f->table), "drafter-forward-%d", (int)getpid());
        bool loopback = false;
        for (int i = 0; i < count; i++)
                loopback |= strncmp(fw[i].external_ip, "127.", 4) == 0;
        /* The record first: a crash from here on is undone by the next forwarder. */
        char path[256];
        snprintf(path, sizeof(path), "/run/drafter/forward-%d.route_localnet", (int)getpid());
        if (loopback)
                net_read_line(ROUTE_LOCALNET, f->localnet_before, sizeof(f->localnet_before));
        mkdir("/run/drafter", 0755);
        int r = net_write_line(path, f->localnet_before);
        if (r < 0)
                return r;
        int n = snprintf(cmd, cap,
                         "add table inet %s\n"
                         "add chain inet %s prerouting { type nat hook prerouting priority -100; }\n"
                         "add chain inet %s output { type nat hook output priority -100; }\n"
                         "add chain inet %s postrouting { type nat hook postrouting priority 100; }\n",
                         f->table, f->table, f->table, f->table);
        for (int i = 0; i < count; i++) {
                const struct port_forward *p = &fw[i];
                for (int hook = 0; hook < 2; hook++)
                        n += snprintf(cmd + n, cap - (size_t)n, "add rule inet %s %s ip daddr %s %s dport %u dnat ip to %s:%u\n",
                                      f->table, hook ? "output" : "prerouting", p->external_ip, p->protocol,
                                      p->external_port, p->target_ip, p->internal_port);
                /* A reply must come back to us: local clients (loopback sources above all)
                 * leave with the veth's address. */
                n += snprintf(cmd + n, cap - (size_t)n,
                              "add rule inet %s postrouting ip daddr %s %s dport %u fib saddr type local masquerade\n",
                              f->table, p->target_ip, p->protocol, p->internal_port);
        }
        if ((r = net_nft(cmd, false)) < 0) {
                net_nft(strcat(strcpy(cmd, "delete table inet "), f->table), true);
                unlink(path);
                return r;
        }
        if (loopback && (r = net_write_line(ROUTE_LOCALNET, "1")) < 0) {
                forwarder_stop(TAKE_PTR(f));
                return r;
        }
        *ret = TAKE_PTR(f);
        return 0;
}

void forwarder_stop(struct forwarder *f) {
        if (!f)
                return;
        char cmd[128], path[256];
        snprintf(cmd, sizeof(cmd), "delete table inet %s\n", f->table);
        if (net_nft(cmd, false) < 0)
                log_error("%s", error_message());
        if (*f->localnet_before && net_write_line(ROUTE_LOCALNET, f->localnet_before) < 0)
                log_error("%s", error_message());
        snprintf(path, sizeof(path), "/run/drafter/forward-%d.route_localnet", (int)getpid());
        unlink(path);
        free(f);
}
