#!/usr/bin/env bash
# The destination of a live migration dies during the source's suspend step (the guest's
# BeforeSuspend hook takes 2 s here, so there is time to kill it): the source has not handed
# anything over, so it resumes its VM (the counter advances again), reports the error, and a
# second migration to a new destination succeeds with the counter continuing. Before that, the
# link is cut during pre-copy (a proxy closes it after 20 MB): the source's VM runs on and the
# destination fails with a clear error.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
HERE=$(dirname "$0")
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-live-suspend-fault
printf '%s\n' "DRAFTER_BEFORE_SUSPEND_CMD='sleep 2'" >"$WORK/agent.conf"
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        --agent-conf "$WORK/agent.conf" \
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
devices() { # base-dir instance-dir
        python3 - "$@" <<'PY'
import json, sys
base, inst = sys.argv[1:3]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{base}/{f}", "overlay": f"{inst}/overlay/{f}", "state": f"{inst}/state/{f}",
                   "blockSize": 65536, "minCycles": 1, "maxCycles": 2, "cycleThrottle": 100000000}
                  for n, f in files.items()]))
PY
}
"$DRAFTER_PEER" --devices "$(devices "$P" "$WORK/a")" --chroot-base-dir "$WORK/vms" --laddr "unix:$WORK/a.sock" \
        --agent-timeout 10s >"$WORK/a.out" 2>"$WORK/a.log" &
A=$!
on_exit "kill -9 $A 2>/dev/null"
for _ in $(seq 1 300); do grep -q "Serving on" "$WORK/a.log" 2>/dev/null && break; sleep 0.1; done

# The link is cut during pre-copy.
python3 "$(dirname "$0")/link-proxy.py" "$WORK/p.sock" "$WORK/a.sock" cut:20000000 &
PROXY=$!
on_exit "kill -9 $PROXY 2>/dev/null"
for _ in $(seq 1 100); do [[ -S "$WORK/p.sock" ]] && break; sleep 0.05; done
rc=0
timeout 120 "$DRAFTER_PEER" --devices "$(devices "$WORK/x/package" "$WORK/x")" --chroot-base-dir "$WORK/vms" \
        --raddr "unix:$WORK/p.sock" >"$WORK/x.out" 2>"$WORK/x.log" || rc=$?
[[ $rc == 1 ]] || { cat "$WORK/x.log"; fail "the cut-off destination exited $rc, expected 1"; }
grep -q "error: .*connection" "$WORK/x.log" || { cat "$WORK/x.log"; fail "no clear error on the cut-off destination"; }
grep "error: " "$WORK/x.log" | head -1 | sed 's/^[0-9/: ]*/cut-off destination: /'
for _ in $(seq 1 300); do grep -q "Kept the VM" "$WORK/a.log" && break; sleep 0.1; done
grep -q "Kept the VM; serving" "$WORK/a.log" || { cat "$WORK/a.log"; fail "A did not keep its VM after the cut"; }
before=$(counts "$WORK/a.out" | tail -1)
sleep 1
after=$(counts "$WORK/a.out" | tail -1)
(( after > before )) || fail "A's VM stopped after the cut ($before, $after)"
echo "link cut during pre-copy: A's VM runs on (counter $before -> $after)"
! grep -q "$WORK/vms" /proc/mounts || [[ $(grep -c "$WORK/vms" /proc/mounts) == 1 ]] ||
        fail "the cut-off destination left a mount behind"

# The destination dies during the suspend step.
"$DRAFTER_PEER" --devices "$(devices "$WORK/b/package" "$WORK/b")" --chroot-base-dir "$WORK/vms" \
        --raddr "unix:$WORK/a.sock" >"$WORK/b.out" 2>"$WORK/b.log" &
B=$!
on_exit "kill -9 $B 2>/dev/null"
for _ in $(seq 1 600); do grep -q "Suspending the VM for the hand-over" "$WORK/a.log" && break; sleep 0.05; done
grep -q "Suspending the VM for the hand-over" "$WORK/a.log" || { cat "$WORK/a.log"; fail "A never reached its suspend step"; }
sleep 0.5
kill -9 $B
for _ in $(seq 1 300); do [[ $(grep -c "Kept the VM" "$WORK/a.log") -ge 2 ]] && break; sleep 0.1; done
[[ $(grep -c "Kept the VM; serving" "$WORK/a.log") -ge 2 ]] || { cat "$WORK/a.log"; fail "A did not keep its VM"; }
grep -o "migration failed: .*" "$WORK/a.log" | tail -1 | sed 's/^/A: /'
before=$(counts "$WORK/a.out" | tail -1)
sleep 1.5
after=$(counts "$WORK/a.out" | tail -1)
(( after > before )) || { cat "$WORK/a.log"; fail "A's VM is not running after the failed hand-over ($before, $after)"; }
echo "A's VM runs on: counter $before -> $after"
for m in "$WORK"/vms/*/mnt; do stat "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
"$DRAFTER_PEER" --devices "$(devices "$WORK/c/package" "$WORK/c")" --chroot-base-dir "$WORK/vms" \
        --raddr "unix:$WORK/a.sock" >"$WORK/c.out" 2>"$WORK/c.log" &
C=$!
on_exit "kill -9 $C 2>/dev/null"
timeout 120 tail --pid=$A -f /dev/null || { cat "$WORK/a.log"; fail "the second migration did not finish"; }
wait $A || { cat "$WORK/a.log" "$WORK/c.log"; fail "the second migration failed"; }
for _ in $(seq 1 300); do [[ $(counts "$WORK/c.out" | wc -l) -ge 3 ]] && break; sleep 0.1; done
continues "$WORK/a.out" "$WORK/c.out" || fail "counter '$LAST' at A, '$FIRST' at C"
echo "second migration: counter $LAST at A -> $FIRST at C"
kill -INT $C
timeout 60 tail --pid=$C -f /dev/null || fail "C did not stop"
wait $C || { cat "$WORK/c.log"; fail "C failed"; }
echo "ok"
