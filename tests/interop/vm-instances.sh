#!/usr/bin/env bash
# Packages under real QEMU: two instances of one package with their own overlays run at the same
# time and each keeps its own disk writes (read back from the disk after dropping the guest's
# caches); the package's files stay unchanged. Then bad input, each with a clear error and no
# QEMU process, mount or half-written file left behind: a missing state file, a corrupt state, a
# memory file of the wrong size, a config.json from another backend, a guest that never reports
# ready (liveness timeout), and an agent command that hangs (agent timeout).
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 sha256sum
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-instances
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }

snap_devices() { # package-dir [kernel-input] [oci-input]
        python3 - "$BP" "$1" "${2:-$BP/vmlinux}" "${3:-$BP/oci.ext4}" <<'PY'
import json, sys
bp, out, kernel, oci = sys.argv[1:5]
devs = [("state", "", "state.bin"), ("memory", "", "memory.bin"), ("kernel", kernel, "vmlinux"),
        ("disk", f"{bp}/rootfs.ext4", "rootfs.ext4"), ("config", "", "config.json"), ("oci", oci, "oci.ext4")]
print(json.dumps([{"name": n, "input": i, "output": f"{out}/{o}"} for n, i, o in devs]))
PY
}
peer_devices() { # package-dir instance-dir
        python3 - "$1" "$2" <<'PY'
import json, sys
pkg, ov = sys.argv[1:3]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{pkg}/{f}", "overlay": f"{ov}/overlay/{f}", "state": f"{ov}/state/{f}",
                   "blockSize": 65536} for n, f in files.items()]))
PY
}
nothing_left() { # what
        ! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "$1: a QEMU process was left behind"
        ! grep -q "$WORK" /proc/mounts || fail "$1: a mount was left behind"
}
wait_out() { # file pattern pid
        for _ in $(seq 1 600); do
                tr -d '\r' <"$1" | grep -q "$2" && return 0
                kill -0 "$3" 2>/dev/null || break
                sleep 0.1
        done
        tail -20 "$1"; fail "no \"$2\" in $1"
}

P=$WORK/package
"$DRAFTER_SNAPSHOTTER" --devices "$(snap_devices "$P")" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; fail "snapshotter failed"; }
for f in "$P"/*; do sha256sum "$f"; done >"$WORK/package.sha256"

# Two instances at once, typing into their serial consoles.
start_instance() { # name
        mkfifo "$WORK/$1.in"
        "$DRAFTER_PEER" --devices "$(peer_devices "$P" "$WORK/$1")" --chroot-base-dir "$WORK/vms" --enable-input \
                <"$WORK/$1.in" >"$WORK/$1.out" 2>"$WORK/$1.log" &
        printf -v "PID_$1" '%s' $!
        on_exit "kill -9 $! 2>/dev/null"
        exec {fd}>"$WORK/$1.in"
        printf -v "FD_$1" '%s' "$fd"
}
type_in() { printf '%s\n' "$2" >&"$(eval echo "\$FD_$1")"; }
start_instance one
start_instance two
wait_out "$WORK/one.out" "hooks:\|count" "$PID_one"
wait_out "$WORK/two.out" "hooks:\|count" "$PID_two"
# Markers are computed in the guest, so the echo of the typed line never matches.
type_in one 'echo one > /root/mark-one; sync; echo "wrote-$((40+1))"'
type_in two 'echo two > /root/mark-two; sync; echo "wrote-$((40+2))"'
wait_out "$WORK/one.out" "wrote-41" "$PID_one"
wait_out "$WORK/two.out" "wrote-42" "$PID_two"
check='echo 3 > /proc/sys/vm/drop_caches; for f in one two; do test -e /root/mark-$f && echo "has-$f-$((1+1))" || echo "lacks-$f-$((1+1))"; done'
type_in one "$check"
type_in two "$check"
wait_out "$WORK/one.out" "lacks-two-2" "$PID_one"
wait_out "$WORK/two.out" "lacks-one-2" "$PID_two"
tr -d '\r' <"$WORK/one.out" | grep -q "has-one-2" || fail "instance one lost its own write"
tr -d '\r' <"$WORK/two.out" | grep -q "has-two-2" || fail "instance two lost its own write"
for i in one two; do
        pid=$(eval echo "\$PID_$i")
        kill -INT "$pid"
        timeout 60 tail --pid="$pid" -f /dev/null || fail "instance $i did not stop"
        wait "$pid" || { cat "$WORK/$i.log"; fail "instance $i exited with an error"; }
done
for f in "$P"/*; do sha256sum "$f"; done | cmp - "$WORK/package.sha256" || fail "the package changed"
nothing_left "two instances"
echo "two instances: each kept its own disk write, the package is unchanged"

# Bad input. expect_peer_error PACKAGE MESSAGE: drafter-peer fails with MESSAGE, leaves nothing.
expect_peer_error() {
        rm -rf "$WORK/bad"
        local rc=0
        timeout 120 "$DRAFTER_PEER" --devices "$(peer_devices "$1" "$WORK/bad")" --chroot-base-dir "$WORK/vms" \
                --resume-timeout 20s >"$WORK/bad.out" 2>"$WORK/bad.log" || rc=$?
        [[ $rc == 1 ]] || { cat "$WORK/bad.log"; fail "drafter-peer exited $rc on bad input, expected 1"; }
        grep -q "$2" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "no clear error (\"$2\")"; }
        nothing_left "$2"
        echo "bad input: $(grep 'error' "$WORK/bad.log" | head -1 | sed 's/^[0-9/: ]*//')"
}
copy_package() { rm -rf "$WORK/p2"; cp -a --sparse=always "$P" "$WORK/p2"; }

copy_package; rm "$WORK/p2/state.bin"
expect_peer_error "$WORK/p2" "state.bin"
copy_package; python3 -c 'import sys; f=open(sys.argv[1],"r+b"); f.seek(0); f.write(b"\x00garbage" * 4096)' "$WORK/p2/state.bin"
expect_peer_error "$WORK/p2" "error: .*state"
copy_package; truncate -s 128M "$WORK/p2/memory.bin"
expect_peer_error "$WORK/p2" "memory: 134217728 bytes, config.json says 268435456"
copy_package; sed -i 's/"backend": "qemu"/"backend": "firecracker"/' "$WORK/p2/config.json"
expect_peer_error "$WORK/p2" "the snapshot was made by firecracker"

# expect_snapshot_error MESSAGE FLAGS...: the snapshotter fails, writes no package, leaves nothing.
expect_snapshot_error() {
        local msg=$1 rc=0
        shift
        rm -rf "$WORK/p3"
        timeout 180 "$DRAFTER_SNAPSHOTTER" --memory-size 256 --chroot-base-dir "$WORK/vms" "$@" \
                >"$WORK/bad.out" 2>"$WORK/bad.log" || rc=$?
        [[ $rc == 1 ]] || { cat "$WORK/bad.log"; fail "drafter-snapshotter exited $rc, expected 1"; }
        grep -q "$msg" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "no clear error (\"$msg\")"; }
        [[ -z $(ls -A "$WORK/p3" 2>/dev/null) ]] || fail "files left in the package directory: $(ls "$WORK/p3")"
        nothing_left "$msg"
        echo "bad input: $(grep 'error' "$WORK/bad.log" | head -1 | sed 's/^[0-9/: ]*//')"
}
# A kernel that boots into a shell in its initramfs and never reports ready.
expect_snapshot_error "liveness: the guest did not report ready within 8s" \
        --devices "$(snap_devices "$WORK/p3")" --resume-timeout 8s \
        --boot-args "console=ttyS0 panic=-1 rdinit=/bin/sh quiet"
# An agent whose BeforeSuspend hangs.
printf '%s\n' "DRAFTER_BEFORE_SUSPEND_CMD='sleep 1000'" >"$WORK/hang.conf"
"$ROOT/guest/make-oci" --out "$WORK/hang-oci.ext4" --agent-conf "$WORK/hang.conf" >/dev/null 2>&1 ||
        fail "make-oci failed"
expect_snapshot_error "agent: BeforeSuspend: no answer within 1s (3 tries)" \
        --devices "$(snap_devices "$WORK/p3" "$BP/vmlinux" "$WORK/hang-oci.ext4")" --agent-timeout 1s
echo "ok"
