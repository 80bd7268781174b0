#!/usr/bin/env bash
# Live migration between drafter-nat namespaces: a VM whose app serves a counter over HTTP runs
# in namespace 0 behind drafter-forwarder on 127.0.0.1; while a client keeps asking, the VM is
# migrated to a peer in namespace 1 and the forward is re-pointed there. The counter carries on
# (no restart, no step back), and the client's outage is measured and printed.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 ip nft busybox
((EUID == 0)) || { echo "SKIP: needs root (network namespaces)"; exit 77; }
[[ -e /dev/net/tun && -e /dev/fuse ]] || { echo "SKIP: no /dev/net/tun or /dev/fuse"; exit 77; }
: "${DRAFTER_NAT:?}" "${DRAFTER_FORWARDER:?}" "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-net-migrate
P=dvm$$ P=${P:0:7}
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
on_exit "kill -9 \$(jobs -p) 2>/dev/null; sleep 0.2; net_teardown $P $forward_before"
make_wan "$P"
start_nat "$P" 2 "$WORK/nat.log"

# shellcheck disable=SC2016 # for the guest's shell
APP='mkdir -p /www; echo "count 0" > /www/index.html; httpd -p 8080 -h /www; i=0; while :; do i=$((i+1)); echo "count $i" > /www/n; mv /www/n /www/index.html; sleep 0.1; done'
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        --app-cmd "$APP" >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }
snapshot_in_netns "$BP" "${P}0" "$WORK/package"
peer_devices() { # package-dir instance-dir
        package_peer_devices "$1" "$2" "{'maxDirtyBlocks': 64, 'minCycles': 1, 'maxCycles': 5, 'cycleThrottle': 0}"
}
L=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
forward() { # namespace log
        "$DRAFTER_FORWARDER" --port-forwards '[{"netns": "'"$1"'", "internalPort": "8080", "protocol": "tcp", "externalAddr": "127.0.0.1:'"$L"'"}]' >"$2" 2>&1 &
        FWD=$!
        for _ in $(seq 1 100); do grep -q "Ready" "$2" && return 0; kill -0 $FWD 2>/dev/null || break; sleep 0.05; done
        cat "$2"; fail "drafter-forwarder did not start"
}

"$DRAFTER_PEER" --netns "${P}0" --devices "$(peer_devices "$WORK/package" "$WORK/a")" --chroot-base-dir "$WORK/vms" \
        --laddr "unix:$WORK/a.sock" >"$WORK/a.out" 2>"$WORK/a.log" &
A=$!
forward "${P}0" "$WORK/fw0.log"
# The client: a request every 20 ms, each a new connection, "<monotonic s> <answer or FAIL>".
python3 - "$L" >"$WORK/client.log" 2>&1 <<'PY' &
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/"
while True:
    t = time.monotonic()
    try:
        body = urllib.request.urlopen(url, timeout=0.5).read().decode().strip()
    except Exception as e:
        body = "FAIL " + type(e).__name__
    print(f"{t:.3f} {body}", flush=True)
    time.sleep(0.02)
PY
CLIENT=$!
for _ in $(seq 1 200); do grep -q "count [1-9]" "$WORK/client.log" && break; sleep 0.05; done
grep -q "count [1-9]" "$WORK/client.log" || { tail -5 "$WORK/client.log" "$WORK/a.log"; fail "the client gets no answer through the forward"; }
sleep 1
"$DRAFTER_PEER" --netns "${P}1" --devices "$(peer_devices "$WORK/b/package" "$WORK/b")" --chroot-base-dir "$WORK/vms" \
        --raddr "unix:$WORK/a.sock" >"$WORK/b.out" 2>"$WORK/b.log" &
B=$!
timeout 120 tail --pid=$A -f /dev/null || fail "A did not finish"
wait $A || { cat "$WORK/a.log" "$WORK/b.log"; fail "the migration failed"; }
# Re-point the forward at namespace 1.
kill -INT $FWD
wait $FWD || fail "forwarder 0 exited with $?"
forward "${P}1" "$WORK/fw1.log"
sleep 1.5
kill $CLIENT
python3 - "$WORK/client.log" <<'PY' || fail "the service across the migration"
import sys
ok, last, worst, fails = [], None, 0.0, 0
for line in open(sys.argv[1]):
    t, _, body = line.strip().partition(" ")
    if body.startswith("count "):
        n = int(body.split()[1])
        if ok and n < ok[-1][1]:
            sys.exit(f"the counter went back from {ok[-1][1]} to {n}: the VM restarted or two ran")
        if ok:
            worst = max(worst, float(t) - ok[-1][0])
        ok.append((float(t), n))
    else:
        fails += 1
# The client ran 1.5 s past the re-pointing: the VM in namespace 1 must have answered then.
if len(ok) < 20 or sum(1 for t, _ in ok if t > ok[-1][0] - 1.0) < 10:
    sys.exit(f"too few answers ({len(ok)}), or none from namespace 1")
print(f"client: {len(ok)} answers, {fails} failed requests; counter {ok[0][1]} -> {ok[-1][1]}, never back; "
      f"service outage (longest time between two answers) {worst * 1000:.0f} ms")
PY
grep "Resumed VM" "$WORK/b.log" | sed 's/^[0-9/: ]*/  B: /'
kill -INT $FWD; wait $FWD || true
kill -INT $B; wait $B || { cat "$WORK/b.log"; fail "B exited with $?"; }
kill -INT $NAT; wait $NAT || fail "drafter-nat exited with $?"
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "QEMU processes left behind"
echo ok
