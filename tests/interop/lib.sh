# lib.sh — shared by the interop tests: a scratch directory, a drafter-expose server, cleanup on
# every exit path, and skip (exit 77) only when a tool is genuinely missing.
set -euo pipefail

: "${DRAFTER_EXPOSE:?run through meson test}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/drafter-interop.XXXXXX")
SERVER_PID=""
CLEANUP_CMDS=()

cleanup() {
        local rc=$?
        for ((i = ${#CLEANUP_CMDS[@]} - 1; i >= 0; i--)); do eval "${CLEANUP_CMDS[i]}" || true; done
        if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
                kill -INT "$SERVER_PID" 2>/dev/null || true
                wait "$SERVER_PID" 2>/dev/null || true
        fi
        # A process killed by a failing test may have left its FUSE mounts behind.
        awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/mounts | xargs -r -n1 umount -l 2>/dev/null || true
        if [[ $rc -ne 0 && -n ${DRAFTER_TEST_KEEP:-} ]]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
        exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

on_exit() { CLEANUP_CMDS+=("$1"); }

need() {
        for tool in "$@"; do
                command -v "$tool" >/dev/null || { echo "SKIP: $tool is not installed"; exit 77; }
        done
}

fail() { echo "FAIL: $*" >&2; exit 1; }

# start_server DEVICES_JSON [extra flags…]: serve on $WORK/nbd.sock; sets SERVER_PID and URI_BASE.
start_server() {
        local devices=$1
        shift
        "$DRAFTER_EXPOSE" --devices "$devices" --nbd-unix "$WORK/nbd.sock" "$@" 2>"$WORK/server.log" &
        SERVER_PID=$!
        for _ in $(seq 1 200); do
                [[ -S "$WORK/nbd.sock" ]] && grep -q "Serving NBD" "$WORK/server.log" && break
                kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log" >&2; fail "server did not start"; }
                sleep 0.05
        done
        [[ -S "$WORK/nbd.sock" ]] || fail "server socket did not appear"
        URI_BASE="nbd+unix:///%s?socket=$WORK/nbd.sock"
}

uri() { printf "$URI_BASE" "$1"; }

stop_server() {
        kill -INT "$SERVER_PID"
        wait "$SERVER_PID" || fail "server exited with status $?"
        SERVER_PID=""
        [[ ! -e "$WORK/nbd.sock" ]] || fail "server left its socket behind"
}

# boot_raw_qemu NETDEV: boot $WORK/{bzImage,initrd,rootfs.ext4,oci.ext4} under QEMU as a host
# would (vda, vdb, a virtio-net NIC on -netdev NETDEV, the two named virtio-serial ports), the
# console in $WORK/console.log; sets QEMU_PID and start_ns, and defines show_console.
boot_raw_qemu() {
        start_ns=$(date +%s%N)
        qemu-system-x86_64 -nodefaults -no-user-config -machine q35 -accel tcg,thread=single -cpu max -m 256M \
                -display none -kernel "$WORK/bzImage" -initrd "$WORK/initrd" \
                -append "console=ttyS0 panic=-1 rootfstype=ext4 root=/dev/vda rootflags=rw" \
                -serial "file:$WORK/console.log" \
                -drive "if=none,id=disk,file=$WORK/rootfs.ext4,format=raw" -device virtio-blk-pci,drive=disk \
                -drive "if=none,id=oci,file=$WORK/oci.ext4,format=raw" -device virtio-blk-pci,drive=oci \
                -netdev "$1" -device virtio-net-pci,netdev=net0 \
                -device virtio-serial-pci \
                -chardev "socket,id=liveness,path=$WORK/liveness.sock,server=on,wait=off" \
                -device virtserialport,chardev=liveness,name=drafter.liveness \
                -chardev "socket,id=agent,path=$WORK/agent.sock,server=on,wait=off" \
                -device virtserialport,chardev=agent,name=drafter.agent \
                -no-reboot 2>"$WORK/qemu.log" &
        QEMU_PID=$!
        on_exit "kill $QEMU_PID 2>/dev/null; wait $QEMU_PID 2>/dev/null"
}

show_console() {
        echo "--- console (last 40 lines) ---" >&2
        tail -n 40 "$WORK/console.log" >&2 || true
        echo "--- qemu ---" >&2
        cat "$WORK/qemu.log" >&2 || true
}

# random_file PATH SIZE_BYTES SEED: deterministic data.
random_file() {
        python3 -c 'import random,sys; r=random.Random(int(sys.argv[2])); sys.stdout.buffer.write(r.randbytes(int(sys.argv[1])))' "$2" "$3" >"$1"
}

# make_wan PREFIX: a stand-in host interface for drafter-nat: PREFIXw0 (198.51.100.1/24) on the
# host, its veth peer in namespace PREFIXwan (198.51.100.2/24). The caller removes both.
make_wan() {
        ip netns add "$1wan"
        ip link add "$1w0" type veth peer name "$1w1"
        ip link set "$1w1" netns "$1wan"
        ip addr add 198.51.100.1/24 dev "$1w0" && ip link set "$1w0" up
        ip -n "$1wan" addr add 198.51.100.2/24 dev "$1w1" && ip -n "$1wan" link set "$1w1" up
        ip -n "$1wan" link set lo up
}

# ---- drafter-nat tests (need root) ----
# net_teardown PREFIX IP_FORWARD_BEFORE: what a test of drafter-nat made with this prefix (the
# WAN of make_wan, namespaces, the table, our records, FUSE mounts under $WORK), even after a failure.
net_teardown() {
        local m ns
        for m in $(grep "$WORK" /proc/mounts | awk '{print $2}'); do fusermount3 -uz "$m"; done
        ip netns del "$1wan"
        ip link del "$1w0"
        for ns in $(ip netns list | awk '{print $1}' | grep -E "^$1[0-9]+$"); do ip netns del "$ns"; done
        nft delete table inet "drafter-$1"
        echo "$2" >/proc/sys/net/ipv4/ip_forward
        rm -f "/run/drafter/nat-$1.ip_forward" "/run/drafter/netns/$1"*
} 2>/dev/null

# start_nat PREFIX COUNT LOG: drafter-nat on make_wan's interface; sets NAT to its pid.
start_nat() {
        "$DRAFTER_NAT" --host-interface "$1w0" --max-namespaces "$2" --namespace-prefix "$1" >"$3" 2>&1 &
        NAT=$!
        for _ in $(seq 1 100); do grep -q "Ready" "$3" && return 0; kill -0 $NAT 2>/dev/null || break; sleep 0.1; done
        cat "$3"; fail "drafter-nat did not get ready"
}

# The six devices of a package, and Python-literal JSON.
PKG_FILES='[("state","state.bin"),("memory","memory.bin"),("kernel","vmlinux"),("disk","rootfs.ext4"),("config","config.json"),("oci","oci.ext4")]'
pyjson() { python3 -c 'import json,sys; print(json.dumps(eval(sys.argv[1])))' "$1"; }

# snapshot_in_netns BLUEPRINT NETNS PACKAGE: drafter-snapshotter --netns, 256 MiB.
snapshot_in_netns() {
        local inputs='{"kernel":"vmlinux","disk":"rootfs.ext4","oci":"oci.ext4"}'
        "$DRAFTER_SNAPSHOTTER" --netns "$2" --memory-size 256 --chroot-base-dir "$WORK/vms" --devices "$(pyjson \
                "[{'name': n, 'input': ('$1/' + $inputs[n]) if n in $inputs else '', 'output': '$3/' + f} for n, f in $PKG_FILES]")" \
                >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; fail "snapshotter failed"; }
}

# package_peer_devices PACKAGE INSTANCE [PYTHON-DICT-OF-MORE-FIELDS]: --devices of a peer.
package_peer_devices() {
        pyjson "[dict({'name': n, 'base': '$1/' + f, 'overlay': '$2/overlay/' + f, 'state': '$2/state/' + f,
                       'blockSize': 65536}, **${3:-{\}}) for n, f in $PKG_FILES]"
}

# wait_for_files DIR NAME…: a new mount's device files NAME… in DIR exist and open (listed is not
# enough: once in CI an open failed with ENOENT right after the file was seen), within 10 s.
wait_for_files() {
        local dir=$1 name ok
        shift
        for _ in $(seq 1 200); do
                ok=1
                for name in "$@"; do { : <"$dir/$name"; } 2>/dev/null || { ok=; break; }; done
                [[ $ok ]] && return 0
                sleep 0.05
        done
        fail "no device files $* in $dir"
}

# fresh FILE…: empty the files a background process is about to write. Its own `>FILE` runs in the
# forked child, after the parent may already have read the previous round's content.
fresh() { local f; for f in "$@"; do : >"$f"; done; }

# continues FROM TO: the first count in TO carries on from the last in FROM (the next number, or
# the one after: a count can be printed while the VM pauses), both present; sets LAST and FIRST.
continues() {
        LAST=$(counts "$1" | tail -1)
        FIRST=$(counts "$2" | head -1)
        [[ -n $LAST && -n $FIRST ]] && ((FIRST > LAST && FIRST <= LAST + 2))
}

# counts FILE: the counter values a guest workload printed ("… count N …") into FILE, in order.
counts() { [[ -f $1 ]] || return 0; tr -d '\r' <"$1" | LC_ALL=C sed -n 's/.*count \([0-9][0-9]*\).*/\1/p'; }

# s3rver (scripts/install-s3rver) on 127.0.0.1:PORT with its data in DIR and bucket BUCKET;
# S3RVER_PID is set. Skips (77) only if s3rver cannot be installed.
start_s3rver() { # DIR PORT BUCKET [s3rver options, e.g. --key K --cert C]
        local bin
        bin=$("$(dirname "${BASH_SOURCE[0]}")/../../scripts/install-s3rver" 2>"$WORK/install-s3rver.log") ||
                { cat "$WORK/install-s3rver.log"; echo "SKIP: s3rver cannot be installed"; exit 77; }
        mkdir -p "$1"
        "$bin" -d "$1" -a 127.0.0.1 -p "$2" -s --configure-bucket "$3" "${@:4}" >>"$WORK/s3rver.log" 2>&1 &
        S3RVER_PID=$!
        on_exit "kill -9 $S3RVER_PID 2>/dev/null"
        for _ in $(seq 1 100); do
                python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2)' "$2" 2>/dev/null && return 0
                sleep 0.1
        done
        cat "$WORK/s3rver.log"
        fail "s3rver did not start on port $2"
}
stop_s3rver() { kill -9 "$S3RVER_PID" 2>/dev/null || true; wait "$S3RVER_PID" 2>/dev/null || true; }
