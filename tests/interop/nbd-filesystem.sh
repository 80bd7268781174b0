#!/usr/bin/env bash
# A real file system through our NBD server: an ext4 image served as a copy-on-write device,
# exposed by nbdfuse (libnbd) as a file, loop-mounted by the kernel, written to, unmounted,
# checked with e2fsck and read back after a server restart; the base image never changes.
# (No guest image exists yet at this stage of the project, so this stands in for booting QEMU
# from nbd+unix://; the VM issues boot real guests.)
. "$(dirname "$0")/lib.sh"
need nbdfuse mkfs.ext4 e2fsck debugfs qemu-img mount umount fusermount3 cmp
[[ $EUID -eq 0 ]] || { echo "SKIP: loop mounts need root"; exit 77; }
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }

mkdir -p "$WORK/seed" "$WORK/fuse" "$WORK/mnt"
echo "hello from the base" >"$WORK/seed/base.txt"
mkfs.ext4 -q -F -b 4096 -d "$WORK/seed" "$WORK/base.ext4" 64M
cp "$WORK/base.ext4" "$WORK/base.orig"
DEVICES="[{\"name\":\"disk\",\"base\":\"$WORK/base.ext4\",\"overlay\":\"$WORK/overlay\",\"state\":\"$WORK/state\"}]"
start_server "$DEVICES"

nbdfuse "$WORK/fuse/disk" "$(uri disk)" &
NBDFUSE_PID=$!
on_exit "fusermount3 -u '$WORK/fuse' 2>/dev/null; kill $NBDFUSE_PID 2>/dev/null; wait $NBDFUSE_PID 2>/dev/null"
for _ in $(seq 1 100); do [[ -f "$WORK/fuse/disk" ]] && break; sleep 0.05; done
[[ -f "$WORK/fuse/disk" ]] || fail "nbdfuse did not expose the export"

mount -o loop "$WORK/fuse/disk" "$WORK/mnt"
on_exit "umount '$WORK/mnt' 2>/dev/null"
[[ "$(cat "$WORK/mnt/base.txt")" == "hello from the base" ]] || fail "file from the base not readable"
random_file "$WORK/payload" $((8 << 20)) 7
cp "$WORK/payload" "$WORK/mnt/payload"
for i in $(seq 1 200); do echo "line $i" >>"$WORK/mnt/log.txt"; done
rm "$WORK/mnt/base.txt"
umount "$WORK/mnt"
fusermount3 -u "$WORK/fuse"
wait $NBDFUSE_PID || true

stop_server
cmp "$WORK/base.ext4" "$WORK/base.orig" || fail "the base image changed"
start_server "$DEVICES"
qemu-img convert -O raw "$(uri disk)" "$WORK/after.ext4"
e2fsck -fn "$WORK/after.ext4" >"$WORK/fsck.log" 2>&1 || { cat "$WORK/fsck.log"; fail "e2fsck found errors"; }
debugfs -R "cat /payload" "$WORK/after.ext4" 2>/dev/null | cmp - "$WORK/payload" || fail "payload differs"
[[ "$(debugfs -R "cat /log.txt" "$WORK/after.ext4" 2>/dev/null | wc -l)" == 200 ]] || fail "log lines missing"
if debugfs -R "stat /base.txt" "$WORK/after.ext4" 2>&1 | grep -q "Inode:"; then fail "deleted file is back"; fi
echo "ok"
