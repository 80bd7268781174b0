#!/usr/bin/env bash
# Running VMs moved along a chain and under faults, real drafter-peer processes over TCP:
#  1. the destination is SIGKILLed during pre-copy: the source's VM keeps running (its counter
#     advances), the source reports the error, and a second migration to a new peer succeeds;
#  2. that VM then goes on along a chain B -> C -> A' (each peer receives and offers onward),
#     and the counter continues at every hop;
#  3. then ping-pong: 10 more hops between two sides, each hop a new peer process with a fresh
#     overlay over its side's base file (created empty by the side's first receiver).
# Every link is secured with a pre-shared key (TLS 1.3); first of all a peer with a wrong key
# tries to take A's VM and is refused, and A's VM keeps running.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 openssl
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-live-chain
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }
P=$WORK/package
python3 - "$BP" "$P" >"$WORK/snap.json" <<'PY'
import json, sys
bp, out = sys.argv[1:3]
devs = [("state", "", "state.bin"), ("memory", "", "memory.bin"), ("kernel", "vmlinux", "vmlinux"),
        ("disk", "rootfs.ext4", "rootfs.ext4"), ("config", "", "config.json"), ("oci", "oci.ext4", "oci.ext4")]
print(json.dumps([{"name": n, "input": f"{bp}/{i}" if i else "", "output": f"{out}/{o}"} for n, i, o in devs]))
PY
"$DRAFTER_SNAPSHOTTER" --devices "$(cat "$WORK/snap.json")" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; fail "snapshotter failed"; }

devices() { # base-dir instance-dir minCycles throttle
        python3 - "$@" <<'PY'
import json, sys
base, inst, mn, th = sys.argv[1:5]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{base}/{f}", "overlay": f"{inst}/overlay/{f}", "state": f"{inst}/state/{f}",
                   "blockSize": 65536, "maxDirtyBlocks": 200, "minCycles": int(mn), "maxCycles": int(mn) + 2,
                   "cycleThrottle": int(th)} for n, f in files.items()]))
PY
}
wait_counts() { # file n pid
        for _ in $(seq 1 600); do
                [[ $(counts "$1" | wc -l) -ge $2 ]] && return 0
                kill -0 "$3" 2>/dev/null || break
                sleep 0.1
        done
        tail -20 "$1"; fail "fewer than $2 counts in $1"
}
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
(umask 077 && openssl rand -hex 32 >"$WORK/link.psk" && openssl rand -hex 32 >"$WORK/wrong.psk")
peer() { # name base-dir raddr laddr minCycles throttle -> PID_<name>; the key file in $PSK
        fresh "$WORK/$1.out" "$WORK/$1.log"
        "$DRAFTER_PEER" --devices "$(devices "$2" "$WORK/$1" "$5" "$6")" --chroot-base-dir "$WORK/vms" \
                --raddr "$3" --laddr "$4" --psk-file "${PSK:-$WORK/link.psk}" >"$WORK/$1.out" 2>"$WORK/$1.log" &
        printf -v "PID_$1" '%s' $!
        on_exit "kill -9 $! 2>/dev/null"
}
continued() { # from to
        continues "$WORK/$1.out" "$WORK/$2.out" ||
                { cat "$WORK/$1.log" "$WORK/$2.log"; fail "counter '$LAST' at $1, '$FIRST' at $2"; }
        echo "$1 -> $2: counter $LAST -> $FIRST; $(grep "Resumed VM in" "$WORK/$2.log" | sed 's/.*Resumed VM in \([0-9.]*\) ms.*/resumed \1 ms after the hand-over/')"
}
finished() { # name
        local pid
        pid=$(eval echo "\$PID_$1")
        timeout 120 tail --pid="$pid" -f /dev/null || { cat "$WORK/$1.log"; fail "$1 did not finish"; }
        wait "$pid" || { cat "$WORK/$1.log"; fail "$1 failed"; }
}

# 1. A destination dies during pre-copy (slow cycles: 10 x 300 ms).
PA=$(port)
peer A "$P" "" "127.0.0.1:$PA" 10 300000000
wait_counts "$WORK/A.out" 3 "$PID_A"
PSK=$WORK/wrong.psk peer W "$WORK/w/package" "127.0.0.1:$PA" "" 10 300000000
rc=0
timeout 60 tail --pid="$PID_W" -f /dev/null
wait "$PID_W" || rc=$?
((rc != 0)) || fail "a peer with the wrong key received the VM"
grep -q "TLS handshake: the peer refused us" "$WORK/W.log" || { cat "$WORK/W.log"; fail "no clear error for the wrong key"; }
grep -q "refused a peer: TLS handshake" "$WORK/A.log" || { cat "$WORK/A.log"; fail "A did not say it refused a peer"; }
! grep -q "Migrated .* initial blocks" "$WORK/A.log" || fail "A sent blocks to a peer with the wrong key"
before=$(counts "$WORK/A.out" | tail -1)
sleep 1
after=$(counts "$WORK/A.out" | tail -1)
(( after > before )) || fail "A's VM stopped counting after refusing a peer ($before, $after)"
echo "peer with a wrong key: refused ($(grep -o 'TLS handshake: .*' "$WORK/W.log" | head -1)), A kept running ($before -> $after)"
peer X "$WORK/x/package" "127.0.0.1:$PA" "" 10 300000000
for _ in $(seq 1 300); do grep -q "Migrated .* initial blocks" "$WORK/A.log" && break; sleep 0.05; done
sleep 1
kill -9 "$PID_X"
for _ in $(seq 1 300); do grep -q "Kept the VM" "$WORK/A.log" && break; sleep 0.1; done
grep -q "Kept the VM; serving" "$WORK/A.log" || { cat "$WORK/A.log"; fail "A did not keep its VM"; }
grep -q "migration failed: " "$WORK/A.log" || fail "no clear error on A"
before=$(counts "$WORK/A.out" | tail -1)
sleep 1
after=$(counts "$WORK/A.out" | tail -1)
(( after > before )) || fail "A's VM stopped counting after the failed migration ($before, $after)"
echo "destination killed during pre-copy: A kept running (counter $before -> $after), $(grep -o 'migration failed: .*' "$WORK/A.log" | head -1)"
for m in "$WORK"/vms/*/mnt; do # the dead peer's FUSE mount (only a dead one fails stat)
        stat "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true
done

# 2. Again, now to completion, and on along a chain B -> C -> A'.
PB=$(port) PC=$(port)
peer B "$WORK/b/package" "127.0.0.1:$PA" "127.0.0.1:$PB" 1 100000000
finished A
wait_counts "$WORK/B.out" 3 "$PID_B"
continued A B
peer C "$WORK/c/package" "127.0.0.1:$PB" "127.0.0.1:$PC" 1 100000000
finished B
wait_counts "$WORK/C.out" 3 "$PID_C"
continued B C
PA2=$(port)
peer A2 "$WORK/a2/package" "127.0.0.1:$PC" "127.0.0.1:$PA2" 1 100000000
finished C
wait_counts "$WORK/A2.out" 3 "$PID_A2"
continued C A2

# 3. Ping-pong between the files of P0 and P1.
prev=A2 prev_port=$PA2
for hop in $(seq 1 "${PINGPONG:-10}"); do
        name=H$hop side=p$((hop % 2)) next_port=$(port)
        peer "$name" "$WORK/$side/package" "127.0.0.1:$prev_port" "127.0.0.1:$next_port" 1 100000000
        finished "$prev"
        wait_counts "$WORK/$name.out" 3 "$(eval echo "\$PID_$name")"
        continued "$prev" "$name"
        rm -rf "$WORK/$prev" # the finished peer's overlay
        prev=$name prev_port=$next_port
done
kill -INT "$(eval echo "\$PID_$prev")"
finished "$prev"
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "QEMU processes left behind"
echo "ok"
