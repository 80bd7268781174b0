#!/usr/bin/env bash
# Faults around running VMs (real drafter-peer and drafter-snapshotter processes, QEMU, a guest
# whose BeforeSuspend hook takes 2 s):
#  1. the agent hangs at the hand-over (BeforeSuspend does not answer within the peer's
#     --agent-timeout): the migration fails before anything is handed over, the source's VM runs
#     on, the destination fails cleanly;
#  2. SIGINT to that source while its agent hangs: the VM is not suspended and runs on (a
#     suspend without BeforeSuspend is offered); a second SIGINT suspends it without the hook
#     into its devices, and a new peer resumes it from them with the counter continuing;
#  3. SIGINT to a source during pre-copy and to its destination while it receives: the
#     hand-over completes, the source exits 0, the destination suspends the VM into its own
#     devices once everything arrived, and a peer resumed from those devices counts on;
#  4. QEMU killed under a running peer: the peer says so and exits 1, nothing left behind;
#  5. SIGINT to a peer while it resumes: it finishes resuming, then suspends; nothing left;
#  6. SIGINT to the snapshotter while the guest boots: exit 1, no package, nothing left;
#  7. the source SIGKILLed during pre-copy: the destination fails cleanly (nothing left);
#  8. the destination SIGKILLed just after the authority transfer (a proxy holds the link
#     there): the source cannot know whether it took over, so it does not resume its VM (no two
#     copies run), reports the error and exits 1.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
HERE=$(dirname "$0")
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-live-suspend-fault # the same guest as vm-live-suspend-fault
printf '%s\n' "DRAFTER_BEFORE_SUSPEND_CMD='sleep 2'" >"$WORK/agent.conf"
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        --agent-conf "$WORK/agent.conf" \
        >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }
P=$WORK/package
on_exit 'for m in "$WORK"/vms/*/mnt; do umount -l "$m" 2>/dev/null || true; done'
snap_devices() { # out-dir
        python3 - "$BP" "$1" <<'PY'
import json, sys
bp, out = sys.argv[1:3]
devs = [("state", "", "state.bin"), ("memory", "", "memory.bin"), ("kernel", "vmlinux", "vmlinux"),
        ("disk", "rootfs.ext4", "rootfs.ext4"), ("config", "", "config.json"), ("oci", "oci.ext4", "oci.ext4")]
print(json.dumps([{"name": n, "input": f"{bp}/{i}" if i else "", "output": f"{out}/{o}"} for n, i, o in devs]))
PY
}

# 6. SIGINT while the snapshotter boots the guest.
"$DRAFTER_SNAPSHOTTER" --devices "$(snap_devices "$WORK/int-package")" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap-int.out" 2>"$WORK/snap-int.log" &
S=$!
on_exit "kill -9 $S 2>/dev/null"
for _ in $(seq 1 300); do grep -q "Booting the blueprint" "$WORK/snap-int.log" && break; sleep 0.05; done
sleep 1
kill -INT $S
rc=0
timeout 60 tail --pid=$S -f /dev/null || fail "the snapshotter did not stop on SIGINT"
wait $S || rc=$?
((rc == 1)) || { cat "$WORK/snap-int.log"; fail "the interrupted snapshotter exited $rc"; }
grep -q "error: interrupted: the package was not written" "$WORK/snap-int.log" ||
        { cat "$WORK/snap-int.log"; fail "the snapshotter failed, but not because of the SIGINT"; }
[[ -z $(ls -A "$WORK/int-package" 2>/dev/null) ]] || fail "the interrupted snapshotter left outputs: $(ls -A "$WORK/int-package")"
! pgrep -f "qemu-system-x86_64.*$WORK/vms" >/dev/null || fail "the interrupted snapshotter left QEMU running"
! grep -q "$WORK/vms" /proc/mounts || fail "the interrupted snapshotter left a mount"
echo "6. SIGINT while the snapshotter boots: exit 1 ($(grep -o 'error: .*' "$WORK/snap-int.log" | head -1 | cut -c1-100)), nothing left"

"$DRAFTER_SNAPSHOTTER" --devices "$(snap_devices "$P")" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; fail "snapshotter failed"; }
peer() { # name instance-dir raddr laddr [flags…] -> PID_<name>
        local name=$1 inst=$2 raddr=$3 laddr=$4
        shift 4
        fresh "$WORK/$name.out" "$WORK/$name.log"
        "$DRAFTER_PEER" --devices "$(package_peer_devices "$P" "$inst" "{'minCycles': 4, 'maxCycles': 6, 'cycleThrottle': 300000000}")" --chroot-base-dir "$WORK/vms" --raddr "$raddr" \
                --laddr "$laddr" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
        printf -v "PID_$name" '%s' $!
        on_exit "kill -9 $! 2>/dev/null"
}
pid() { eval echo "\$PID_$1"; }
wait_log() { # name pattern [count]
        for _ in $(seq 1 600); do [[ $(grep -c "$2" "$WORK/$1.log" 2>/dev/null) -ge ${3:-1} ]] && return 0; sleep 0.1; done
        cat "$WORK/$1.log"; fail "$1: no '$2' in its log"
}
advancing() { # name
        local before after
        before=$(counts "$WORK/$1.out" | tail -1)
        sleep 1.5
        after=$(counts "$WORK/$1.out" | tail -1)
        (( after > before )) || { cat "$WORK/$1.log"; fail "$1's VM is not running ($before, $after)"; }
        echo "$before -> $after"
}
finished() { # name expected-status
        local rc=0
        timeout 120 tail --pid="$(pid "$1")" -f /dev/null || { cat "$WORK/$1.log"; fail "$1 did not finish"; }
        wait "$(pid "$1")" || rc=$?
        ((rc == $2)) || { cat "$WORK/$1.log"; fail "$1 exited $rc, expected $2"; }
}
continued() { # from to
        for _ in $(seq 1 300); do [[ $(counts "$WORK/$2.out" | wc -l) -ge 2 ]] && break; sleep 0.1; done
        continues "$WORK/$1.out" "$WORK/$2.out" ||
                { cat "$WORK/$1.log" "$WORK/$2.log"; fail "counter '$LAST' at $1, '$FIRST' at $2"; }
        echo "counter $LAST at $1 -> $FIRST at $2"
}
no_leftovers() { # what
        ! pgrep -f "qemu-system-x86_64.*$WORK/vms" >/dev/null || fail "$1: QEMU left running"
        ! grep -q "$WORK/vms" /proc/mounts || fail "$1: a mount left: $(grep "$WORK/vms" /proc/mounts)"
}

# 1. The agent hangs at the hand-over.
peer A "$WORK/a" "" "unix:$WORK/a.sock" --agent-timeout 400ms
wait_log A "Serving on"
peer B "$WORK/b" "unix:$WORK/a.sock" ""
finished B 1
wait_log A "Kept the VM; serving"
grep -q "migration failed: .*BeforeSuspend" "$WORK/A.log" || { cat "$WORK/A.log"; fail "A's error does not name BeforeSuspend"; }
echo "1. agent hangs at the hand-over: $(grep -o 'migration failed: .*' "$WORK/A.log" | head -1 | cut -c1-140)"
echo "   A's VM runs on: $(advancing A); B: $(grep -o 'error: .*' "$WORK/B.log" | head -1 | cut -c1-100)"
[[ $(grep -c "$WORK/vms" /proc/mounts) -le 1 ]] || fail "B left a mount"

# 2. SIGINT to A while its agent hangs, then again.
kill -INT "$(pid A)"
wait_log A "SIGINT again suspends it without BeforeSuspend"
echo "2. SIGINT with a hanging agent: not suspended ($(grep -o 'error: .*BeforeSuspend.*' "$WORK/A.log" | tail -1 | cut -c1-100)); VM runs on: $(advancing A)"
kill -INT "$(pid A)"
finished A 0
grep -q "Suspending the VM without BeforeSuspend" "$WORK/A.log" || fail "A's second suspend asked the agent again"
grep -q "Suspended the VM into its devices" "$WORK/A.log" || fail "A did not suspend into its devices"
no_leftovers "A after its suspend"
peer A2 "$WORK/a" "" ""
wait_log A2 "Resumed VM in"
echo "   second SIGINT suspended it without the hook; resumed from A's devices: $(continued A A2)"

# 3. SIGINT to a source during pre-copy and to its destination while it receives.
kill -INT "$(pid A2)"
finished A2 0 # (BeforeSuspend answers within the default 10 s timeout)
peer S "$WORK/a" "" "unix:$WORK/s.sock"
wait_log S "Serving on"
peer D "$WORK/d" "unix:$WORK/s.sock" ""
wait_log S "Migrated .* initial blocks"
kill -INT "$(pid S)"
kill -INT "$(pid D)"
finished S 0
finished D 0
grep -q "Completed all device migrations" "$WORK/S.log" || { cat "$WORK/S.log"; fail "S did not complete the hand-over"; }
grep -q "Suspended the VM into its devices" "$WORK/D.log" || { cat "$WORK/D.log"; fail "D did not suspend into its devices"; }
no_leftovers "S and D"
peer E "$WORK/d" "" ""
wait_log E "Resumed VM in"
echo "3. SIGINT to both sides mid-migration: S handed over and exited 0, D suspended into its devices; $(continued D E)"

# 4. QEMU killed under a running peer.
qemu=$(pgrep -f "qemu-system-x86_64.*$WORK/vms" | head -1)
[[ -n $qemu ]] || fail "E's QEMU not found"
kill -9 "$qemu"
finished E 1
grep -q "the VM stopped on its own" "$WORK/E.log" || { cat "$WORK/E.log"; fail "E did not say its VM stopped"; }
no_leftovers "E after its QEMU died"
echo "4. QEMU killed under a running peer: $(grep -o 'error: .*' "$WORK/E.log" | head -1 | cut -c1-100), exit 1, nothing left"

# 5. SIGINT while a peer resumes.
peer F "$WORK/f" "" ""
for _ in $(seq 1 200); do pgrep -f "qemu-system-x86_64.*$WORK/vms" >/dev/null && break; sleep 0.02; done
kill -INT "$(pid F)"
finished F 0
grep -q "Resumed VM in" "$WORK/F.log" && grep -q "Suspended the VM into its devices" "$WORK/F.log" ||
        { cat "$WORK/F.log"; fail "F did not resume and suspend"; }
no_leftovers "F"
echo "5. SIGINT while resuming: resumed, then suspended into its devices; nothing left"

# 7. The source killed during pre-copy.
peer G "$WORK/g" "" "unix:$WORK/g.sock"
wait_log G "Serving on"
peer H "$WORK/h" "unix:$WORK/g.sock" ""
wait_log G "Migrated .* initial blocks"
kill -9 "$(pid G)"
finished H 1
grep -q "error: source: connection lost before the migration completed (the source keeps the devices)" "$WORK/H.log" ||
        { cat "$WORK/H.log"; fail "H: no clear error after its source died"; }
for m in "$WORK"/vms/*/mnt; do stat "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done # G's stale mount
for _ in $(seq 1 50); do pgrep -f "qemu-system-x86_64.*$WORK/vms" >/dev/null || break; sleep 0.1; done
no_leftovers "G and H"
echo "7. source killed during pre-copy: $(grep -o 'error: .*' "$WORK/H.log" | head -1 | cut -c1-110)"

# 8. The destination killed just after the authority transfer.
peer K "$WORK/k" "" "unix:$WORK/k.sock"
wait_log K "Serving on"
python3 "$HERE/link-proxy.py" "$WORK/kp.sock" "$WORK/k.sock" authority "$WORK/k-held" &
KPROXY=$!
on_exit "kill -9 $KPROXY 2>/dev/null"
for _ in $(seq 1 100); do [[ -S "$WORK/kp.sock" ]] && break; sleep 0.05; done
peer L "$WORK/l" "unix:$WORK/kp.sock" ""
for _ in $(seq 1 600); do [[ -e "$WORK/k-held" ]] && break; sleep 0.1; done
[[ -e "$WORK/k-held" ]] || { cat "$WORK/K.log" "$WORK/L.log"; fail "the link never reached the authority transfer"; }
kill -9 "$(pid L)"
finished K 1
grep -q "migration failed: " "$WORK/K.log" || { cat "$WORK/K.log"; fail "K: no clear error"; }
! grep -q "Kept the VM" "$WORK/K.log" || { cat "$WORK/K.log"; fail "K resumed its VM after handing over authority"; }
for m in "$WORK"/vms/*/mnt; do stat "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
for _ in $(seq 1 50); do pgrep -f "qemu-system-x86_64.*$WORK/vms" >/dev/null || break; sleep 0.1; done
no_leftovers "K and L"
echo "8. destination killed after the authority transfer: K did not resume ($(grep -o 'migration failed: .*' "$WORK/K.log" | head -1 | cut -c1-110)), exit 1"
echo "ok"
