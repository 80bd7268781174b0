#!/usr/bin/env bash
# drafter-nat against the kernel: a stand-in "host interface" (a veth into a WAN namespace), four
# namespaces; every link, address, route, table and sysctl checked with ip and nft, the host
# reaching each namespace over its veth; SIGINT removes all of it and restores ip_forward; a
# SIGKILLed run's leftovers are removed by the next start; bad input changes nothing.
. "$(dirname "$0")/lib.sh"
need ip nft busybox
((EUID == 0)) || { echo "SKIP: needs root (network namespaces)"; exit 77; }
[[ -e /dev/net/tun ]] || { echo "SKIP: no /dev/net/tun"; exit 77; }
: "${DRAFTER_NAT:?}"
P=dtst$$ P=${P:0:7}  # the prefix: unique to this run, short enough for veth names
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
leftovers() { # everything of ours that exists, one item a line
        ip netns list | awk '{print $1}' | grep -E "^${P}[0-9]+$" | sed 's/^/netns /' || true
        ip -o link show | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E "^${P}-h[0-9]+$" | sed 's/^/link /' || true
        nft list tables | grep -F "drafter-$P" | sed 's/^/nft /' || true
        [[ ! -e /run/drafter/nat-$P.ip_forward ]] || echo "record /run/drafter/nat-$P.ip_forward"
}
on_exit "kill -9 \$(jobs -p) 2>/dev/null; net_teardown $P $forward_before"
make_wan "$P"

start_nat "$P" 4 "$WORK/nat.log"
for i in 0 1 2 3; do
        ns=$P$i
        ip netns list | grep -qw "$ns" || fail "namespace $ns missing"
        ip -n "$ns" -4 -o addr show tap0 | grep -q "172.16.0.1/30" || fail "$ns: tap0 lacks 172.16.0.1/30"
        ip -n "$ns" -o link show tap0 | grep -q "tap0" || fail "$ns: no tap0"
        host_ip=10.0.8.$((4 * i + 1)) ns_ip=10.0.8.$((4 * i + 2)) visible=10.0.15.$((i + 1))
        ip -4 -o addr show "$P-h$i" | grep -q "$host_ip/30" || fail "host veth $P-h$i lacks $host_ip/30"
        ip -n "$ns" -4 -o addr show "$P-n$i" | grep -q "$ns_ip/30" || fail "$ns: veth lacks $ns_ip/30"
        ip -n "$ns" route show default | grep -q "via $host_ip" || fail "$ns: no default route via $host_ip"
        ip route show "$visible" | grep -q "via $ns_ip dev $P-h$i" || fail "no host route to $visible"
        grep -q "dnat to 172.16.0.2" <<<"$(ip netns exec "$ns" nft list table ip drafter)" || fail "$ns: no DNAT rule"
        [[ $(ip netns exec "$ns" cat /proc/sys/net/ipv4/ip_forward) == 1 ]] || fail "$ns: forwarding off"
        busybox ping -c 1 -W 2 "$ns_ip" >/dev/null || fail "the host cannot reach $ns over its veth"
        grep -q "Created namespace $ns .* as $visible" "$WORK/nat.log" || fail "log does not name $ns and $visible"
done
table=$(nft list table inet "drafter-$P")  # (grep -q in a pipe would cut nft short: pipefail)
grep -q "masquerade" <<<"$table" || fail "no masquerade rule on the host"
grep -q 'oifname "'"${P}w0"'"' <<<"$table" || fail "masquerade is not out of ${P}w0"
[[ $(cat /proc/sys/net/ipv4/ip_forward) == 1 ]] || fail "host forwarding off"
echo "4 namespaces, veths, routes, tables and forwarding in place"

kill -INT $NAT
wait $NAT || { cat "$WORK/nat.log"; fail "drafter-nat exited with $?"; }
left=$(leftovers)
[[ -z "$left" ]] || fail "left behind after SIGINT: $left"
[[ $(cat /proc/sys/net/ipv4/ip_forward) == "$forward_before" ]] || fail "ip_forward not restored"
echo "SIGINT: nothing left, ip_forward back to $forward_before"

start_nat "$P" 4 "$WORK/nat2.log"
kill -9 $NAT
wait $NAT 2>/dev/null || true
[[ -n "$(leftovers)" ]] || fail "a SIGKILLed run left nothing? (the test would prove nothing)"
start_nat "$P" 4 "$WORK/nat3.log"
grep -q "Removed 4 namespaces a previous run left behind" "$WORK/nat3.log" || { cat "$WORK/nat3.log"; fail "leftovers not reported"; }
kill -INT $NAT
wait $NAT || fail "drafter-nat exited with $?"
left=$(leftovers)
[[ -z "$left" ]] || fail "left behind after a SIGKILL and a restart: $left"
[[ $(cat /proc/sys/net/ipv4/ip_forward) == "$forward_before" ]] || fail "ip_forward not restored after a crash"
echo "SIGKILL: the next start removed the leftovers; nothing left after it"

bad() { # expected-message flags...
        local want=$1
        shift
        local out rc=0
        out=$("$DRAFTER_NAT" --namespace-prefix "$P" --max-namespaces 2 "$@" 2>&1) || rc=$?
        ((rc == 2)) || fail "$*: exit $rc, expected 2 ($out)"
        grep -qF -- "$want" <<<"$out" || fail "$*: said '$out', expected '$want'"
        [[ -z "$(leftovers)" ]] || fail "$*: created something"
}
bad "--host-interface is required"
bad "--host-interface nosuch0: no such interface" --host-interface nosuch0
bad '--host-veth-cidr: "10.0.8.0/33" has no prefix length' --host-interface "${P}w0" --host-veth-cidr 10.0.8.0/33
bad '--namespace-veth-cidr: "banana" is not a CIDR' --host-interface "${P}w0" --namespace-veth-cidr banana
bad "overlap" --host-interface "${P}w0" --host-veth-cidr 10.0.0.0/16 --namespace-veth-cidr 10.0.15.0/24
bad "holds 1 /30 networks, 2 namespaces need one each" --host-interface "${P}w0" --host-veth-cidr 10.0.8.0/30
bad "is not another address of" --host-interface "${P}w0" --namespace-interface-guest 172.16.0.9
bad "is not a MAC address" --host-interface "${P}w0" --namespace-interface-mac 02:0e:d9
echo "8 bad inputs: exit 2, clear message, nothing created"
echo ok
