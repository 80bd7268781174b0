/* drafter-nat — a pool of identical network namespaces (<prefix>0 … N-1) with NAT to a host
 * interface, for VMs; everything removed again on SIGINT/SIGTERM (and at the next start after a
 * crash). See net.h for the layout. */
#include "drafter/error.h"
#include "drafter/flags.h"
#include "drafter/log.h"
#include "drafter/signals.h"
#include "drafter/net.h"

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

int main(int argc, char **argv) {
        struct nat_config c = {.host_interface = "",
                               .host_veth_cidr = "10.0.8.0/22",
                               .namespace_veth_cidr = "10.0.15.0/24",
                               .namespace_interface = "tap0",
                               .namespace_interface_gateway = "172.16.0.1",
                               .namespace_interface_guest = "172.16.0.2",
                               .namespace_interface_mac = "02:0e:d9:fd:68:3d",
                               .namespace_prefix = "ark",
                               .blocked_subnet_cidr = "10.0.15.0/24",
                               .allow_incoming_traffic = true};
        int64_t netmask = 30, count = 10;
        bool verbose = false;
        struct flag flags[] = {
                {"allow-incoming-traffic", FLAG_BOOL, &c.allow_incoming_traffic,
                 "Whether to allow incoming traffic to the namespaces (at host-veth-internal-ip:port)"},
                {"blocked-subnet-cidr", FLAG_STRING, &c.blocked_subnet_cidr,
                 "CIDR to block for the namespaces (e.g. the other VMs' addresses; empty: none)"},
                {"host-interface", FLAG_STRING, &c.host_interface, "Host gateway interface"},
                {"host-veth-cidr", FLAG_STRING, &c.host_veth_cidr, "CIDR for the veths outside the namespace"},
                {"max-namespaces", FLAG_INT, &count, "Number of namespaces to create"},
                {"namespace-interface", FLAG_STRING, &c.namespace_interface, "Name for the interface inside the namespace"},
                {"namespace-interface-gateway", FLAG_STRING, &c.namespace_interface_gateway,
                 "Gateway for the interface inside the namespace"},
                {"namespace-interface-guest", FLAG_STRING, &c.namespace_interface_guest,
                 "Guest IP for the interface inside the namespace"},
                {"namespace-interface-mac", FLAG_STRING, &c.namespace_interface_mac,
                 "MAC address for the interface inside the namespace"},
                {"namespace-interface-netmask", FLAG_INT, &netmask, "Netmask for the interface inside the namespace"},
                {"namespace-prefix", FLAG_STRING, &c.namespace_prefix, "Prefix for the namespace IDs"},
                {"namespace-veth-cidr", FLAG_STRING, &c.namespace_veth_cidr, "CIDR for the veths inside the namespace"},
                {"verbose", FLAG_BOOL, &verbose, "Whether to log debug messages"},
        };
        int r = flags_parse_command("drafter-nat", flags, sizeof(flags) / sizeof(flags[0]), argc, argv, &verbose);
        if (r >= 0)
                return r;
        c.namespace_interface_netmask = netmask < 0 || netmask > 32 ? -1 : (int)netmask;
        c.count = count < 1 || count > NET_MAX_NAMESPACES ? -1 : (int)count;
        if (nat_config_check(&c) < 0) {
                log_error("%s", error_message());
                return 2;
        }
        int sigfd = signals_stop_fd();
        if (sigfd < 0) {
                log_error("cannot take SIGINT/SIGTERM on a descriptor: %s", strerror(-sigfd));
                return 1;
        }
        struct nat *nat;
        if (nat_start(&c, &nat) < 0) {
                log_error("%s", error_message());
                return 1;
        }
        for (int i = 0; i < c.count; i++)
                log_info("Created namespace %s (the VM at %s is reachable from the host as %s)", nat_namespace_name(nat, i),
                         c.namespace_interface_guest, nat_namespace_address(nat, i));
        log_info("Ready: %d namespaces, traffic out of %s; Ctrl-C removes them", c.count, c.host_interface);
        struct signalfd_siginfo si;
        if (read(sigfd, &si, sizeof(si)) < 0)
                log_debug("signalfd: %m");
        log_info("Removing the namespaces");
        nat_stop(nat);
        close(sigfd);
        return 0;
}
