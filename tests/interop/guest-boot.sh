#!/usr/bin/env bash
# Build the DrafterOS blueprint (guest/build) and boot it under QEMU exactly as a host would:
# split the kernel bundle, attach rootfs.ext4 (vda) and oci.ext4 (vdb), a NIC and the two named
# virtio-serial ports. The console must show init's welcome and then the OCI counter app (run by
# crun) reaching "count 5", within 60 s. Checks the bundle layout and the initramfs with cpio(1).
# The blueprint is cached between runs in $DRAFTER_GUEST_CACHE (default
# /var/tmp/drafter-guest-cache); $DRAFTER_AGENT / $DRAFTER_LIVENESS are the guest binaries, and
# the host's static busybox stands in for them when they are unset.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 cpio busybox crun apt-get dpkg-deb depmod mkfs.ext4

SRC=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
AGENT=${DRAFTER_AGENT:-$(command -v busybox)}
LIVENESS=${DRAFTER_LIVENESS:-$(command -v busybox)}
BLUEPRINT=$CACHE/blueprint-guest-boot
TIMEOUT=60

"$SRC/guest/build" --agent "$AGENT" --liveness "$LIVENESS" --cache "$CACHE" --out "$BLUEPRINT" ||
        fail "guest/build failed"
"$SRC/guest/kernel-bundle-split" "$BLUEPRINT/vmlinux" "$WORK" || fail "kernel-bundle-split failed"

python3 - "$BLUEPRINT/vmlinux" "$WORK/bzImage" "$WORK/initrd" <<'PY' || fail "the kernel bundle is malformed"
import struct, sys
bundle, kernel, initrd = (open(p, "rb").read() for p in sys.argv[1:])
magic, k_off, k_size, i_off, i_size = struct.unpack("<8sQQQQ", bundle[-40:])
pad = lambda n: (n + 4095) // 4096 * 4096
assert magic == b"DRAFTKB1", magic
assert k_off == 0 and k_size == len(kernel) and i_off == pad(k_size) and i_size == len(initrd)
assert len(bundle) == pad(k_size) + pad(i_size) + 40, "bundle size"
assert bundle[k_size:i_off] == bytes(i_off - k_size), "kernel padding is not zeros"
assert bundle[i_off + i_size:-40] == bytes(len(bundle) - 40 - i_off - i_size), "initrd padding"
assert kernel[0x202:0x206] == b"HdrS", "bzImage has no x86 boot header"
assert initrd[:2] == b"\x1f\x8b", "initrd is not gzip"
print(f"kernel bundle: kernel {k_size} bytes, initrd {i_size} bytes at {i_off}")
PY
gzip -dc "$WORK/initrd" | (cd "$WORK" && cpio -it --quiet) >"$WORK/initrd.list" || fail "cpio cannot read the initrd"
for entry in init bin/busybox bin/sh sbin/insmod sbin/switch_root dev/console etc/modules \
        lib/modules/virtio_pci.ko lib/modules/virtio_blk.ko lib/modules/virtio_console.ko lib/modules/virtio_net.ko; do
        grep -qx "$entry" "$WORK/initrd.list" || fail "the initrd has no $entry"
done

cp --sparse=always "$BLUEPRINT/rootfs.ext4" "$WORK/rootfs.ext4"
cp --sparse=always "$BLUEPRINT/oci.ext4" "$WORK/oci.ext4"
boot_raw_qemu "user,id=net0,restrict=on"
elapsed() { echo "$((($(date +%s%N) - start_ns) / 1000000))"; } # ms since QEMU started

welcome_ms='' count_ms=''
deadline=$(($(date +%s) + TIMEOUT))
while [[ -z "$count_ms" ]]; do
        if [[ -z "$welcome_ms" ]] && grep -q '^Welcome to DrafterOS' "$WORK/console.log" 2>/dev/null; then
                welcome_ms=$(elapsed)
        fi
        if [[ -n "$welcome_ms" ]] && grep -q '^count 5[[:space:]]*$' "$WORK/console.log"; then
                count_ms=$(elapsed)
                break
        fi
        kill -0 "$QEMU_PID" 2>/dev/null || { show_console; fail "QEMU exited before the app ran"; }
        (($(date +%s) < deadline)) || { show_console; fail "no ${welcome_ms:+count 5 after }Welcome within ${TIMEOUT}s"; }
        sleep 0.05
done

# Welcome comes first (init prints it right after starting the app), and the guest saw its devices.
welcome_line=$(grep -n -m1 '^Welcome to DrafterOS' "$WORK/console.log" | cut -d: -f1)
count_line=$(grep -n -m1 '^count 5[[:space:]]*$' "$WORK/console.log" | cut -d: -f1)
((welcome_line < count_line)) || { show_console; fail "count 5 appeared before the welcome"; }
grep -q '^drafter-init: virtio-serial ports:.*drafter\.liveness.*drafter\.agent' "$WORK/console.log" ||
        grep -q '^drafter-init: virtio-serial ports:.*drafter\.agent.*drafter\.liveness' "$WORK/console.log" ||
        { show_console; fail "the guest did not list both named virtio-serial ports"; }
grep -q '^drafter-init: eth0 172.16.0.2/30 up' "$WORK/console.log" || { show_console; fail "eth0 was not configured"; }
if grep -q 'FATAL' "$WORK/console.log"; then show_console; fail "the initramfs reported a fatal error"; fi

printf 'boot: "Welcome to DrafterOS" after %d.%03d s, "count 5" after %d.%03d s (QEMU TCG, from launch)\n' \
        $((welcome_ms / 1000)) $((welcome_ms % 1000)) $((count_ms / 1000)) $((count_ms % 1000))
echo "ok"
