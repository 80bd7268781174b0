#!/usr/bin/env bash
# A real guest under QEMU: build the blueprint, snapshot it with drafter-snapshotter, then resume
# it with drafter-peer and suspend it again (Ctrl-C), three rounds. The guest's counter (an OCI
# app under crun) must carry on from where it was each time — the next number, never a reboot —
# and the agent's hooks must have run exactly once per suspend and resume, in order (the guest
# appends to a file in its RAM and prints it after each resume). The package's files stay
# unchanged (the instance writes to its overlay), and nothing is left running or mounted.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 sha256sum
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}

# BeforeSuspend first waits until the app counts (the snapshot is taken right after the guest
# reports ready, possibly before crun has started it): the app leaves its count in its rootfs.
cat >"$WORK/agent.conf" <<'CONF'
DRAFTER_BEFORE_SUSPEND_CMD='until [ -s /oci/rootfs/tmp/count ]; do sleep 0.1; done; echo suspend >> /run/hooks.log'
DRAFTER_AFTER_RESUME_CMD='echo resume >> /run/hooks.log; echo "hooks: $(tr "\n" " " < /run/hooks.log)" > /dev/console'
CONF
BP=$CACHE/blueprint-vm-snapshot-resume
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" \
        --cache "$CACHE" --agent-conf "$WORK/agent.conf" \
        --app-cmd 'i=0; while :; do i=$((i+1)); echo "count $i"; echo $i > /tmp/count; sleep 0.1; done' \
        >"$WORK/build.log" 2>&1 ||
        { tail -20 "$WORK/build.log"; fail "guest build failed"; }

P=$WORK/package
snap_devices() {
        python3 - "$BP" "$P" <<'PY'
import json, sys
bp, out = sys.argv[1:3]
devs = [("state", "", "state.bin"), ("memory", "", "memory.bin"), ("kernel", "vmlinux", "vmlinux"),
        ("disk", "rootfs.ext4", "rootfs.ext4"), ("config", "", "config.json"), ("oci", "oci.ext4", "oci.ext4")]
print(json.dumps([{"name": n, "input": f"{bp}/{i}" if i else "", "output": f"{out}/{o}"} for n, i, o in devs]))
PY
}
peer_devices() { # overlay-dir
        python3 - "$P" "$1" <<'PY'
import json, sys
pkg, ov = sys.argv[1:3]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{pkg}/{f}", "overlay": f"{ov}/overlay/{f}", "state": f"{ov}/state/{f}",
                   "blockSize": 65536} for n, f in files.items()]))
PY
}
base_devices() { # the package alone: changes are written back into it
        python3 - "$P" <<'PY'
import json, sys
pkg = sys.argv[1]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{pkg}/{f}"} for n, f in files.items()]))
PY
}

t0=$(date +%s%N)
"$DRAFTER_SNAPSHOTTER" --devices "$(snap_devices)" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; tail -20 "$WORK/snap.out"; fail "snapshotter failed"; }
echo "snapshot: $(( ($(date +%s%N) - t0) / 1000000 )) ms (boot, liveness, BeforeSuspend, state)"
grep -q "Welcome to DrafterOS" "$WORK/snap.out" || fail "the snapshot run never reached the guest's init"
last=$(counts "$WORK/snap.out" | tail -1)
[[ -n $last ]] || { tail -20 "$WORK/snap.out"; fail "the counter never ran before the snapshot"; }
for f in "$P"/*; do sha256sum "$f"; done >"$WORK/package.sha256"
echo "package: $(du -sh --apparent-size "$P" | cut -f1) apparent, $(du -sh "$P" | cut -f1) on disk; state $(stat -c %s "$P/state.bin") bytes"

hooks="suspend"
for round in 1 2 3; do
        "$DRAFTER_PEER" --devices "$(peer_devices "$WORK/instance")" --chroot-base-dir "$WORK/vms" \
                >"$WORK/peer$round.out" 2>"$WORK/peer$round.log" &
        PEER=$!
        on_exit "kill -9 $PEER 2>/dev/null"
        for _ in $(seq 1 600); do
                [[ $(counts "$WORK/peer$round.out" | wc -l) -ge 5 ]] && grep -q "hooks:" "$WORK/peer$round.out" && break
                kill -0 $PEER 2>/dev/null || break
                sleep 0.1
        done
        kill -INT $PEER
        rc=0
        timeout 60 tail --pid=$PEER -f /dev/null || fail "round $round: drafter-peer did not stop"
        wait $PEER || rc=$?
        [[ $rc == 0 ]] || { cat "$WORK/peer$round.log"; fail "round $round: drafter-peer exited with $rc"; }
        grep "Resumed VM in" "$WORK/peer$round.log" | sed 's/^[0-9/: ]*/  /'
        first=$(counts "$WORK/peer$round.out" | head -1)
        [[ -n $first ]] || { tail "$WORK/peer$round.out"; fail "round $round: no count after resume"; }
        (( first > last && first <= last + 2 )) ||
                fail "round $round: the counter went from $last to $first: the VM did not continue"
        grep -q "Welcome to DrafterOS" "$WORK/peer$round.out" && fail "round $round: the guest rebooted"
        hooks="$hooks resume"
        got=$(tr -d '\r' <"$WORK/peer$round.out" | sed -n 's/.*hooks: \(.*\)/\1/p' | head -1 | sed 's/ *$//')
        [[ $got == "$hooks" ]] || fail "round $round: hooks ran as \"$got\", expected \"$hooks\""
        echo "round $round: counter $last -> $first, hooks: $got"
        hooks="$hooks suspend"
        last=$(counts "$WORK/peer$round.out" | tail -1)
done

for f in "$P"/*; do sha256sum "$f"; done | cmp - "$WORK/package.sha256" || fail "the package changed"
snap_last=$(counts "$WORK/snap.out" | tail -1)

# Without overlays the instance writes back into the package: twice, each run continuing the last.
last=$snap_last
for round in 1 2; do
        "$DRAFTER_PEER" --devices "$(base_devices)" --chroot-base-dir "$WORK/vms" \
                >"$WORK/wb$round.out" 2>"$WORK/wb$round.log" &
        PEER=$!
        on_exit "kill -9 $PEER 2>/dev/null"
        for _ in $(seq 1 600); do
                [[ $(counts "$WORK/wb$round.out" | wc -l) -ge 3 ]] && break
                kill -0 $PEER 2>/dev/null || break
                sleep 0.1
        done
        kill -INT $PEER
        timeout 60 tail --pid=$PEER -f /dev/null || fail "write-back $round: drafter-peer did not stop"
        wait $PEER || { cat "$WORK/wb$round.log"; fail "write-back $round: drafter-peer failed"; }
        first=$(counts "$WORK/wb$round.out" | head -1)
        (( first > last && first <= last + 2 )) || fail "write-back $round: the counter went from $last to $first"
        echo "write-back $round: counter $last -> $first"
        last=$(counts "$WORK/wb$round.out" | tail -1)
done
for f in "$P"/*; do sha256sum "$f"; done | cmp -s - "$WORK/package.sha256" && fail "the package did not change"
pgrep -f "qemu-system-x86_64.*$WORK" && fail "QEMU processes left behind"
grep -q "$WORK" /proc/mounts && fail "mounts left behind: $(grep "$WORK" /proc/mounts)"
echo "ok"
