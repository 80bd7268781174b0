#!/usr/bin/env bash
# The source of a live migration dies after handing the VM over, before the post-copy blocks
# arrive: a proxy passes the source's frames up to AUTHORITY and then stalls the link, and the
# source is SIGKILLed. The destination owns the VM now but lacks blocks only the source had (the
# final memory blocks; the VM's state and config came ahead of AUTHORITY, with EVENT FINAL, so
# QEMU is already loading it and dies of a bus error on a missing page): it must fail with an
# error that names the device and the block it could not get, exit non-zero, and leave no QEMU
# process or mount behind
# (docs/protocol.md, "When the connection breaks": the known limit of post-copy).
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
HERE=$(dirname "$0")
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-live-postcopy-fault
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
# The final set must follow the hand-over: pushed ahead of it (when the link is fast enough, as it
# often is here) nothing would be missing when the source dies.
DRAFTER_PUSH_BUDGET_MS=0 "$DRAFTER_PEER" --devices "$(devices "$P" "$WORK/a")" --chroot-base-dir "$WORK/vms" \
        --laddr "unix:$WORK/a.sock" >"$WORK/a.out" 2>"$WORK/a.log" &
A=$!
on_exit "kill -9 $A 2>/dev/null"
for _ in $(seq 1 300); do grep -q "Serving on" "$WORK/a.log" 2>/dev/null && break; sleep 0.1; done
python3 "$HERE/link-proxy.py" "$WORK/p.sock" "$WORK/a.sock" authority "$WORK/held" &
PROXY=$!
on_exit "kill -9 $PROXY 2>/dev/null"
for _ in $(seq 1 100); do [[ -S "$WORK/p.sock" ]] && break; sleep 0.05; done
"$DRAFTER_PEER" --devices "$(devices "$WORK/b/package" "$WORK/b")" --chroot-base-dir "$WORK/vms" \
        --raddr "unix:$WORK/p.sock" >"$WORK/b.out" 2>"$WORK/b.log" &
B=$!
on_exit "kill -9 $B 2>/dev/null"
for _ in $(seq 1 600); do [[ -e "$WORK/held" ]] && break; sleep 0.05; done
[[ -e "$WORK/held" ]] || { cat "$WORK/a.log" "$WORK/b.log"; fail "the migration never reached the hand-over"; }
sleep 0.3
kill -9 $A
rc=0
timeout 60 tail --pid=$B -f /dev/null || { cat "$WORK/b.log"; fail "the destination hung"; }
wait $B || rc=$?
[[ $rc != 0 ]] || { cat "$WORK/b.log"; fail "the destination exited 0 without the VM's state"; }
grep -q "error: .*block [0-9]* is not available" "$WORK/b.log" ||
        { cat "$WORK/b.log"; fail "the destination's error does not name the missing block"; }
grep "error: " "$WORK/b.log" | head -1 | sed 's/^[0-9/: ]*/destination: /'
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "a QEMU process was left behind"
# The killed source's FUSE mount is dead (and detached as stale by the next drafter on it); any
# other mount would be the destination's.
for m in "$WORK"/vms/*/mnt; do stat "$m" >/dev/null 2>&1 || umount -l "$m" 2>/dev/null || true; done
! grep -q "$WORK/vms" /proc/mounts || fail "the destination left a mount behind: $(grep "$WORK/vms" /proc/mounts)"
echo "ok"
