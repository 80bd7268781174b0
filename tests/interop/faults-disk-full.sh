#!/usr/bin/env bash
# A full disk, on a small loop-mounted ext4 file system, under each tool that writes device data:
#  1. drafter-mounter receiving a 24 MiB device into an 8 MiB file system: the destination fails
#     with an error naming the file and "No space left on device", removes what it created and
#     its mount; the source keeps its devices, serves again, and a second destination with room
#     receives them byte-exact;
#  2. drafter-packager packing into the small file system: the error names the archive, no
#     archive or temporary is left, a previous archive there is kept;
#  3. drafter-packager extracting into it: the error names the device file, no partial output.
# SIGINT is sent to a receiving mounter mid-migration too: it exits without keeping a partial
# copy, the source keeps its devices.
. "$(dirname "$0")/lib.sh"
need python3 cmp mkfs.ext4 losetup
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
[[ -e /dev/loop-control ]] || { echo "SKIP: no loop devices"; exit 77; }
: "${DRAFTER_MOUNTER:?}" "${DRAFTER_PACKAGER:?}"

truncate -s 8M "$WORK/small.img"
mkfs.ext4 -q -F "$WORK/small.img"
mkdir -p "$WORK/small"
mount -o loop "$WORK/small.img" "$WORK/small" || { echo "SKIP: cannot loop-mount (no loop device free?)"; exit 77; }
on_exit "umount -l '$WORK/small'"
echo "small file system: $(df -h --output=size,avail "$WORK/small" | tail -1 | xargs) on $(findmnt -n -o SOURCE "$WORK/small")"

random_file "$WORK/disk.img" $((24 << 20)) 47
devices() { # dir
        echo "[{\"name\":\"disk\",\"base\":\"$1/base/disk.img\",\"overlay\":\"$1/overlay/disk\",\"state\":\"$1/state/disk\",\"blockSize\":65536,\"minCycles\":1,\"maxCycles\":2,\"cycleThrottle\":100000000}]"
}
mkdir -p "$WORK/a/base"
cp "$WORK/disk.img" "$WORK/a/base/"
"$DRAFTER_MOUNTER" --devices "$(devices "$WORK/a")" --raddr '' --laddr "unix:$WORK/a.sock" --mount-dir "$WORK/a/mnt" \
        >"$WORK/a.log" 2>&1 &
A=$!
on_exit "kill -9 $A 2>/dev/null; umount -l '$WORK/a/mnt' 2>/dev/null"
for _ in $(seq 1 200); do grep -q "Serving on" "$WORK/a.log" && break; sleep 0.05; done

# 1. The destination's file system fills up.
rc=0
timeout 120 "$DRAFTER_MOUNTER" --devices "$(devices "$WORK/small/b")" --raddr "unix:$WORK/a.sock" --laddr '' \
        --mount-dir "$WORK/b-mnt" >"$WORK/b.log" 2>&1 || rc=$?
((rc == 1)) || { cat "$WORK/b.log"; fail "the destination on a full disk exited $rc"; }
grep -q "error: .*$WORK/small/b/.*No space left on device" "$WORK/b.log" ||
        { cat "$WORK/b.log"; fail "the error does not name the file and ENOSPC"; }
mountpoint -q "$WORK/b-mnt" && fail "the failed destination left its mount"
left=$(find "$WORK/small/b" -type f 2>/dev/null | head -5)
[[ -z $left ]] || fail "the failed destination left files on the full disk: $left"
for _ in $(seq 1 100); do grep -q "Kept the devices" "$WORK/a.log" && break; sleep 0.1; done
grep -q "Kept the devices; serving" "$WORK/a.log" || { cat "$WORK/a.log"; fail "the source did not keep its devices"; }
echo "full disk at the destination: $(grep -o 'error: .*' "$WORK/b.log" | head -1 | cut -c1-200); source kept its devices"

# SIGINT to a receiving mounter mid-migration (slow cycles so there is time).
"$DRAFTER_MOUNTER" --devices "$(devices "$WORK/i")" --raddr "unix:$WORK/a.sock" --laddr '' \
        --mount-dir "$WORK/i-mnt" >"$WORK/i.log" 2>&1 &
I=$!
on_exit "kill -9 $I 2>/dev/null; umount -l '$WORK/i-mnt' 2>/dev/null"
for _ in $(seq 1 200); do grep -q "Migrating 1 devices" "$WORK/a.log" && [[ $(grep -c "Migrating 1 devices" "$WORK/a.log") -ge 2 ]] && break; sleep 0.02; done
kill -INT $I
rc=0
timeout 60 tail --pid=$I -f /dev/null
wait $I || rc=$?
grep -q "Completed all device migrations" "$WORK/i.log" && fail "the migration completed before the SIGINT"
grep -q "Interrupted: stopping the migration (the source keeps the devices)" "$WORK/i.log" ||
        { cat "$WORK/i.log"; fail "the interrupted destination did not say it stopped the migration"; }
((rc == 1)) || { cat "$WORK/i.log"; fail "a mounter interrupted mid-migration exited $rc"; }
mountpoint -q "$WORK/i-mnt" && fail "the interrupted destination left its mount"
left=$(find "$WORK/i" -type f 2>/dev/null | head -5)
[[ -z $left ]] || fail "the interrupted destination kept a partial copy: $left"
for _ in $(seq 1 100); do [[ $(grep -c "Kept the devices" "$WORK/a.log") -ge 2 ]] && break; sleep 0.1; done
[[ $(grep -c "Kept the devices" "$WORK/a.log") -ge 2 ]] || { cat "$WORK/a.log"; fail "the source did not keep its devices after the SIGINT"; }
echo "SIGINT to a receiving mounter mid-migration: exit $rc, $(grep -o 'error: .*' "$WORK/i.log" | head -1 | cut -c1-120); source kept its devices"

# A destination with room takes them.
"$DRAFTER_MOUNTER" --devices "$(devices "$WORK/c")" --raddr "unix:$WORK/a.sock" --laddr '' --mount-dir "$WORK/c-mnt" \
        >"$WORK/c.log" 2>&1 &
C=$!
on_exit "kill -9 $C 2>/dev/null; umount -l '$WORK/c-mnt' 2>/dev/null"
wait $A || { cat "$WORK/a.log"; fail "the source failed the second migration"; }
for _ in $(seq 1 200); do grep -q "Completed all device migrations" "$WORK/c.log" && break; sleep 0.05; done
cmp "$WORK/c-mnt/disk" "$WORK/disk.img" || fail "the second destination's data differs"
kill -INT $C
wait $C || fail "the second destination exited with an error"
echo "second destination with room: byte-exact"

# 2. Packing into the full file system: the old archive stays, nothing else is left.
echo old-archive >"$WORK/small/p.tar.zst"
rc=0
"$DRAFTER_PACKAGER" --package-path "$WORK/small/p.tar.zst" --compression-level 1 \
        --devices "[{\"name\":\"disk\",\"path\":\"$WORK/disk.img\"}]" >"$WORK/pack.log" 2>&1 || rc=$?
((rc == 1)) || { cat "$WORK/pack.log"; fail "packing onto a full disk exited $rc"; }
grep -q "small/p.tar.zst.*No space left on device" "$WORK/pack.log" || { cat "$WORK/pack.log"; fail "the pack error does not name the archive and ENOSPC"; }
[[ $(cat "$WORK/small/p.tar.zst") == old-archive ]] || fail "the previous archive was replaced"
[[ $(ls -A "$WORK/small" | grep -v -e '^lost+found$' -e '^p.tar.zst$' -e '^b$') == "" ]] || fail "packing left files: $(ls -A "$WORK/small")"
echo "packing onto a full disk: $(grep -o 'error: .*' "$WORK/pack.log" | head -1 | cut -c1-160); previous archive kept"

# 3. Extracting into it.
"$DRAFTER_PACKAGER" --package-path "$WORK/p.tar.zst" --compression-level 1 \
        --devices "[{\"name\":\"disk\",\"path\":\"$WORK/disk.img\"}]" >"$WORK/pack2.log" 2>&1 || fail "packing failed"
rc=0
"$DRAFTER_PACKAGER" --extract --package-path "$WORK/p.tar.zst" \
        --devices "[{\"name\":\"disk\",\"path\":\"$WORK/small/out/disk.img\"}]" >"$WORK/extract.log" 2>&1 || rc=$?
((rc == 1)) || { cat "$WORK/extract.log"; fail "extracting onto a full disk exited $rc"; }
grep -q "No space left on device" "$WORK/extract.log" || { cat "$WORK/extract.log"; fail "the extract error does not say ENOSPC"; }
[[ -z $(find "$WORK/small/out" -type f 2>/dev/null) ]] || fail "extraction left files: $(find "$WORK/small/out" -type f)"
echo "extracting onto a full disk: $(grep -o 'error: .*' "$WORK/extract.log" | head -1 | cut -c1-160); nothing left"
echo "ok"
