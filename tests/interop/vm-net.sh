#!/usr/bin/env bash
# VMs on drafter-nat's namespaces: a blueprint whose app serves HTTP on port 8080 and keeps
# fetching a page from a server beyond the host interface (a WAN namespace, reached only through
# the NAT) is snapshotted in namespace 0, and the package resumed in namespaces 1 and 2 at once;
# each VM reaches the WAN server, and the host reaches each VM at its own address (10.0.15.2,
# 10.0.15.3). A package with a NIC refuses to run without --netns. Nothing is left afterwards.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 ip nft busybox
((EUID == 0)) || { echo "SKIP: needs root (network namespaces)"; exit 77; }
[[ -e /dev/net/tun && -e /dev/fuse ]] || { echo "SKIP: no /dev/net/tun or /dev/fuse"; exit 77; }
: "${DRAFTER_NAT:?}" "${DRAFTER_FORWARDER:?}" "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-net
P=dvn$$ P=${P:0:7}
WAN=${P}wan
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
on_exit "kill -9 \$(jobs -p) 2>/dev/null; sleep 0.2; net_teardown $P $forward_before"

# The WAN: a veth into a namespace with an HTTP server; the host interface for the NAT.
make_wan "$P"
mkdir -p "$WORK/wan"
echo "wan-ok" >"$WORK/wan/index.html"
ip netns exec "$WAN" busybox httpd -f -p 198.51.100.2:8000 -h "$WORK/wan" &

start_nat "$P" 4 "$WORK/nat.log"

# shellcheck disable=SC2016 # for the guest's shell
APP='mkdir -p /www; echo "hello from the VM" > /www/index.html; httpd -p 8080 -h /www; i=0; while :; do i=$((i+1)); r=$(printf "GET / HTTP/1.0\r\n\r\n" | nc -w 2 198.51.100.2 8000 2>/dev/null | tail -n 1); echo "count $i wan=$r"; sleep 0.3; done'
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        --app-cmd "$APP" >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }
snapshot_in_netns "$BP" "${P}0" "$WORK/package"
grep -q '"tap": "tap0"' "$WORK/package/config.json" || fail "config.json does not record the NIC"
peer_devices() { package_peer_devices "$WORK/package" "$1"; } # instance-dir

# Without --netns the package's NIC has nowhere to go.
rc=0
"$DRAFTER_PEER" --devices "$(peer_devices "$WORK/x")" --chroot-base-dir "$WORK/vms" >"$WORK/x.out" 2>"$WORK/x.log" || rc=$?
((rc == 1)) && grep -q "has a network interface (tap tap0): run it with --netns" "$WORK/x.log" ||
        { cat "$WORK/x.log"; fail "a NIC package without --netns: exit $rc"; }

for i in 1 2; do
        "$DRAFTER_PEER" --netns "$P$i" --devices "$(peer_devices "$WORK/i$i")" --chroot-base-dir "$WORK/vms" \
                >"$WORK/i$i.out" 2>"$WORK/i$i.log" &
        eval "PEER$i=$!"
done
wan_seen() { tr -d '\r' <"$1" | grep -c "wan=wan-ok" || true; }
for i in 1 2; do
        for _ in $(seq 1 300); do (($(wan_seen "$WORK/i$i.out") >= 3)) && break; sleep 0.1; done
        (($(wan_seen "$WORK/i$i.out") >= 3)) || { tail -n 5 "$WORK/i$i.out" "$WORK/i$i.log"; fail "VM in $P$i does not reach the WAN server"; }
        grep -q "Welcome to DrafterOS" "$WORK/i$i.out" && fail "the VM in $P$i booted instead of resuming"
        addr=10.0.15.$((i + 1))
        got=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' "http://$addr:8080/" 2>"$WORK/get.err") || { cat "$WORK/get.err"; fail "the host cannot reach the VM in $P$i at $addr"; }
        [[ $got == "hello from the VM" ]] || fail "the VM in $P$i answered '$got'"
        echo "VM in $P$i: reaches the WAN server through the NAT ($(wan_seen "$WORK/i$i.out") fetches), answers the host at $addr"
done
# drafter-forwarder: each VM's port 8080 on a loopback port of the host (route_localnet), as in
# the seed README; a forward to a namespace drafter-nat does not have is refused.
localnet_before=$(cat /proc/sys/net/ipv4/conf/all/route_localnet)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
L1=$(free_port) L2=$(free_port)
FW='[{"netns": "'$P'1", "internalPort": "8080", "protocol": "tcp", "externalAddr": "127.0.0.1:'$L1'"},
     {"netns": "'$P'2", "internalPort": "8080", "protocol": "tcp", "externalAddr": "127.0.0.1:'$L2'"}]'
"$DRAFTER_FORWARDER" --port-forwards "$FW" >"$WORK/fw.log" 2>&1 &
FWD=$!
for _ in $(seq 1 100); do grep -q "Ready" "$WORK/fw.log" && break; kill -0 $FWD 2>/dev/null || break; sleep 0.1; done
grep -q "Ready" "$WORK/fw.log" || { cat "$WORK/fw.log"; fail "drafter-forwarder did not start"; }
for port in $L1 $L2; do
        got=$(python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())' "http://127.0.0.1:$port/" 2>"$WORK/get.err") || { cat "$WORK/get.err" "$WORK/fw.log"; fail "no answer on the forward 127.0.0.1:$port"; }
        [[ $got == "hello from the VM" ]] || fail "127.0.0.1:$port answered '$got'"
done
echo "drafter-forwarder: 127.0.0.1:$L1 and 127.0.0.1:$L2 reach the VMs in ${P}1 and ${P}2"
kill -INT $FWD
wait $FWD || { cat "$WORK/fw.log"; fail "drafter-forwarder exited with $?"; }
! nft list tables | grep -q "drafter-forward-$FWD" || fail "the forwarder left its table"
[[ $(cat /proc/sys/net/ipv4/conf/all/route_localnet) == "$localnet_before" ]] || fail "route_localnet not restored"
rc=0
out=$("$DRAFTER_FORWARDER" --port-forwards '[{"netns": "nosuch9", "internalPort": "80", "protocol": "tcp", "externalAddr": "127.0.0.1:9"}]' 2>&1) || rc=$?
((rc == 2)) && grep -q 'netns "nosuch9" is not a namespace of a running drafter-nat' <<<"$out" || fail "forward to a missing namespace: exit $rc: $out"
echo "forwarder: rules and route_localnet removed on exit; a missing namespace is refused"

for i in 1 2; do
        eval "pid=\$PEER$i"
        kill -INT "$pid"
        wait "$pid" || { cat "$WORK/i$i.log"; fail "peer in $P$i exited with $?"; }
done
kill -INT $NAT
wait $NAT || fail "drafter-nat exited with $?"
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "QEMU processes left behind"
! grep -q "$WORK" /proc/mounts || fail "mounts left behind"
! ip netns list | grep -q "^$P[0-9]" || fail "namespaces left behind"
echo ok
