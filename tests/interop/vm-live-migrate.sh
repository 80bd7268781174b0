#!/usr/bin/env bash
# Live migration of a running VM between two drafter-peer processes: A resumes the package and
# offers it (--laddr), B receives it (--raddr) into empty files. The guest's counter (printed
# every 100 ms) must carry on at B from where it was at A — the next number or the one after,
# no reboot — with pre-copy and post-copy, pre-copy only (--disable-postcopy-migration) and
# post-copy only (no cycles); A exits cleanly once B has everything, and B suspends cleanly.
# The app also appends a line per count to a file on its disk (the oci device): after B has
# suspended (BeforeSuspend syncs the guest's file systems), B's copy of that disk passes e2fsck and
# holds every line, in order, up to at least the last count A printed.
# With WORKLOAD=memcheck (interop/vm-live-memcheck) the app is drafter-memcheck instead: it
# rewrites 64 MiB at 32 MiB/s and verifies the whole region after every step, with a counter;
# its counter must continue and no check may fail, before or after the migration.
. "$(dirname "$0")/lib.sh"
WORKLOAD=${WORKLOAD:-counter}
need qemu-system-x86_64 python3 qemu-img e2fsck debugfs busybox
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-live-migrate
printf '%s\n' "DRAFTER_BEFORE_SUSPEND_CMD='sync'" >"$WORK/agent.conf"
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        --agent-conf "$WORK/agent.conf" \
        --app-cmd 'i=0; while :; do i=$((i+1)); echo "count $i"; echo "line $i" >> /data.log; sleep 0.1; done' \
        >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }
OCI=$BP/oci.ext4
if [[ $WORKLOAD == memcheck ]]; then
        : "${DRAFTER_MEMCHECK:?}"
        # The app's bundle: busybox and drafter-memcheck.
        mkdir -p "$WORK/approot/bin" "$WORK/approot/usr/bin" "$WORK/approot/"{etc,tmp,proc,sys,dev,run}
        cp "$(readlink -f "$(command -v busybox)")" "$WORK/approot/bin/busybox"
        ln -s busybox "$WORK/approot/bin/sh"
        cp "$DRAFTER_MEMCHECK" "$WORK/approot/usr/bin/drafter-memcheck"
        OCI=$WORK/oci.ext4
        "$ROOT/guest/make-oci" --out "$OCI" --rootfs "$WORK/approot" --agent-conf "$WORK/agent.conf" \
                --app-cmd 'exec /usr/bin/drafter-memcheck --mib 64 --rate-mib 32' >"$WORK/oci.log" 2>&1 ||
                { cat "$WORK/oci.log"; fail "make-oci failed"; }
fi
P=$WORK/package
python3 - "$BP" "$P" "$OCI" >"$WORK/snap.json" <<'PY'
import json, sys
bp, out, oci = sys.argv[1:4]
devs = [("state", "", "state.bin"), ("memory", "", "memory.bin"), ("kernel", f"{bp}/vmlinux", "vmlinux"),
        ("disk", f"{bp}/rootfs.ext4", "rootfs.ext4"), ("config", "", "config.json"), ("oci", oci, "oci.ext4")]
print(json.dumps([{"name": n, "input": i, "output": f"{out}/{o}"} for n, i, o in devs]))
PY
"$DRAFTER_SNAPSHOTTER" --devices "$(cat "$WORK/snap.json")" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; fail "snapshotter failed"; }

devices() { # base-dir instance-dir maxDirty minCycles maxCycles throttle
        python3 - "$@" <<'PY'
import json, sys
base, inst, md, mn, mx, th = sys.argv[1:7]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{base}/{f}", "overlay": f"{inst}/overlay/{f}", "state": f"{inst}/state/{f}",
                   "blockSize": 65536, "maxDirtyBlocks": int(md), "minCycles": int(mn), "maxCycles": int(mx),
                   "cycleThrottle": int(th)} for n, f in files.items()]))
PY
}
counts() {
        [[ -f $1 ]] || return 0
        if [[ $WORKLOAD == memcheck ]]; then
                tr -d '\r' <"$1" | LC_ALL=C sed -n 's/.*memcheck \([0-9][0-9]*\) ok.*/\1/p'
        else
                tr -d '\r' <"$1" | LC_ALL=C sed -n 's/.*count \([0-9][0-9]*\).*/\1/p'
        fi
}
wait_counts() { # file n pid
        for _ in $(seq 1 600); do
                [[ $(counts "$1" | wc -l) -ge $2 ]] && return 0
                kill -0 "$3" 2>/dev/null || break
                sleep 0.1
        done
        tail -20 "$1"; fail "fewer than $2 counts in $1"
}

run_mode() { # label B-flags maxDirty minCycles maxCycles throttle
        local label=$1 flags=$2
        shift 2
        echo "--- $label"
        rm -rf "$WORK/a" "$WORK/b" "$WORK/a.sock"
        fresh "$WORK"/{a,b}.{out,log}
        "$DRAFTER_PEER" --devices "$(devices "$P" "$WORK/a" "$@")" --chroot-base-dir "$WORK/vms" \
                --laddr "unix:$WORK/a.sock" --json-summary "$WORK/a.json" >"$WORK/a.out" 2>"$WORK/a.log" &
        local A=$!
        on_exit "kill -9 $A 2>/dev/null"
        wait_counts "$WORK/a.out" 3 $A
        # shellcheck disable=SC2086
        "$DRAFTER_PEER" --devices "$(devices "$WORK/b/package" "$WORK/b" "$@")" --chroot-base-dir "$WORK/vms" \
                --raddr "unix:$WORK/a.sock" --json-summary "$WORK/b.json" $flags >"$WORK/b.out" 2>"$WORK/b.log" &
        local B=$!
        on_exit "kill -9 $B 2>/dev/null"
        timeout 120 tail --pid=$A -f /dev/null || { cat "$WORK/a.log"; fail "$label: A did not finish"; }
        wait $A || { cat "$WORK/a.log" "$WORK/b.log"; fail "$label: A failed"; }
        wait_counts "$WORK/b.out" 3 $B
        continues "$WORK/a.out" "$WORK/b.out" || {
                for f in a.out b.out; do echo "== $f (last 1500 bytes)"; tail -c 1500 "$WORK/$f" | cat -v; done
                cat "$WORK/a.log" "$WORK/b.log"; fail "$label: counter '$LAST' at A, '$FIRST' at B"
        }
        local last=$LAST first=$FIRST
        grep -q "Welcome to DrafterOS" "$WORK/b.out" && fail "$label: the guest rebooted at B"
        for _ in $(seq 1 300); do grep -q "Completed all device migrations" "$WORK/b.log" && break; sleep 0.1; done
        kill -INT $B
        timeout 60 tail --pid=$B -f /dev/null || fail "$label: B did not stop"
        wait $B || { cat "$WORK/b.log"; fail "$label: B failed"; }
        if [[ $WORKLOAD == memcheck ]]; then
                if grep -a "FAILED" "$WORK/a.out" "$WORK/b.out"; then fail "$label: the guest found damaged memory"; fi
                echo "  checks of all 16384 pages: the last at A #$last, the first at B #$first, none failed"
        else
        # B's disk, read back through its overlay: a clean file system with every line.
        local devs
        devs=$(python3 -c 'import json,sys; print(json.dumps([{"name": "oci", "base": sys.argv[1] + "/package/oci.ext4", "overlay": sys.argv[1] + "/overlay/oci.ext4", "state": sys.argv[1] + "/state/oci.ext4", "blockSize": 65536}]))' "$WORK/b")
        rm -f "$WORK/nbd.sock" "$WORK/oci.img"
        "$DRAFTER_EXPOSE" --devices "$devs" --nbd-unix "$WORK/nbd.sock" --read-only 2>"$WORK/expose.log" &
        local X=$!
        for _ in $(seq 1 100); do [[ -S "$WORK/nbd.sock" ]] && break; sleep 0.05; done
        qemu-img convert -f raw -O raw "nbd+unix:///oci?socket=$WORK/nbd.sock" "$WORK/oci.img" || fail "$label: cannot read B's disk"
        kill -INT $X; wait $X || true
        local fsck=0
        e2fsck -fy "$WORK/oci.img" >"$WORK/fsck.log" 2>&1 || fsck=$?
        (( fsck <= 1 )) || { cat "$WORK/fsck.log"; fail "$label: B's disk fails e2fsck ($fsck)"; }
        debugfs -R "cat /rootfs/data.log" "$WORK/oci.img" 2>/dev/null >"$WORK/data.log"
        python3 - "$WORK/data.log" "$last" <<'PY' || fail "$label: the app's file on B's disk is wrong"
import sys
lines = open(sys.argv[1]).read().split("\n")[:-1]
want = [f"line {i}" for i in range(1, len(lines) + 1)]
if lines != want:
    bad = next(i for i, (a, b) in enumerate(zip(lines, want)) if a != b) if len(lines) else 0
    sys.exit(f"line {bad + 1} is {lines[bad]!r}")
if len(lines) < int(sys.argv[2]):
    sys.exit(f"{len(lines)} lines, but A had counted to {sys.argv[2]}")
print(f"  B's disk: e2fsck clean, data.log has lines 1-{len(lines)} in order")
PY
        fi
        # The machine-readable summaries agree with the logs.
        python3 - "$WORK/a.json" "$WORK/b.json" <<'PY' || fail "$label: bad --json-summary"
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
out = a["migratedOut"]
assert out["completed"] and out["suspendMs"] > 0 and out["bytesSent"] > 0, a
assert b["started"] == "received" and 0 < b["resumeMs"] < 10000 and b["handoverMs"] > 0, b
print(f"  summary: A paused {out['suspendMs']:.1f} ms, sent {out['bytesSent'] / 1e6:.1f} MB in {out['totalMs']:.0f} ms; "
      f"B running {b['resumeMs']:.1f} ms after the hand-over")
PY
        echo "counter $last at A -> $first at B"
        grep "Completed all device migrations (" "$WORK/a.log" | sed 's/^[0-9/: ]*/  A: /'
        grep "Resumed VM in" "$WORK/b.log" | sed 's/^[0-9/: ]*/  B: /'
}

run_mode "pre-copy and post-copy" "" 200 1 3 100000000
run_mode "pre-copy only" --disable-postcopy-migration 200 1 3 100000000
run_mode "post-copy only" "" 0 0 0 0
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "QEMU processes left behind"
! grep -q "$WORK" /proc/mounts || fail "mounts left behind"
echo "ok"
