#!/usr/bin/env bash
# drafter-mounter, real processes over unix sockets: A serves two devices while a writer keeps
# changing one of them through A's device file; B takes them over (pre-copy cycles, suspend,
# authority, post-copy), then serves them onward to C, which hands them back to a new A. Writes
# happen at every stop. At the end every byte equals what the writers were told was written.
. "$(dirname "$0")/lib.sh"
need python3 cmp
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"

random_file "$WORK/disk.img" $((8 << 20)) 11
random_file "$WORK/small.img" 100000 12
cp "$WORK/disk.img" "$WORK/expect-disk"
cp "$WORK/small.img" "$WORK/expect-small"

devices() { # instance
        echo "[{\"name\":\"disk\",\"base\":\"$WORK/$1/base/disk.img\",\"overlay\":\"$WORK/$1/overlay/disk\",\"state\":\"$WORK/$1/state/disk\",\"blockSize\":65536,\"maxDirtyBlocks\":4,\"minCycles\":2,\"maxCycles\":8,\"cycleThrottle\":20000000},
{\"name\":\"small\",\"base\":\"$WORK/$1/base/small.img\",\"overlay\":\"$WORK/$1/overlay/small\",\"state\":\"$WORK/$1/state/small\",\"blockSize\":4096,\"maxDirtyBlocks\":4,\"minCycles\":1,\"maxCycles\":4,\"cycleThrottle\":10000000}]"
}
mkdir -p "$WORK/a/base"
cp "$WORK/disk.img" "$WORK/small.img" "$WORK/a/base/"

start_mounter() { # variable name raddr laddr
        fresh "$WORK/$2.log"
        "$DRAFTER_MOUNTER" --devices "$(devices "$2")" --raddr "$3" --laddr "$4" --mount-dir "$WORK/$2/mnt" \
                >"$WORK/$2.log" 2>&1 &
        printf -v "$1" '%s' $!
        on_exit "kill -INT $! 2>/dev/null; sleep 0.2; kill -9 $! 2>/dev/null; umount -l '$WORK/$2/mnt' 2>/dev/null"
}
# expect_arrived NAME LABEL: NAME's mounter completed and holds what the writers were told.
expect_arrived() {
        wait_for_files "$WORK/$1/mnt" disk small
        for _ in $(seq 1 200); do grep -q "Completed all device migrations" "$WORK/$1.log" && break; sleep 0.05; done
        cmp "$WORK/$1/mnt/disk" "$WORK/expect-disk" || fail "$2: disk differs"
        cmp "$WORK/$1/mnt/small" "$WORK/expect-small" || fail "$2: small differs"
}

# The writer applies seeded random writes to a device file and mirrors every write that returned
# success into the expected image; it stops at the first refused write (the device moved away).
writer() { # file expect seconds seed
        python3 "$(dirname "$0")/journal.py" mirror "$4" "$WORK/no-stop" "$3" 0 "$1:$2"
}

start_mounter A a "" "unix:$WORK/a.sock"
wait_for_files "$WORK/a/mnt" disk small
writer "$WORK/a/mnt/disk" "$WORK/expect-disk" 30 1 >"$WORK/writer-a.log" &
WRITER=$!
sleep 0.5
start_mounter B b "unix:$WORK/a.sock" "unix:$WORK/b.sock"
wait "$A" || { cat "$WORK/a.log"; fail "A did not finish its migration cleanly"; }
wait $WRITER
grep -q "Completed all device migrations" "$WORK/a.log" || fail "A did not complete"
grep -q "stopped by Read-only file system\|stopped by Transport endpoint\|stopped by Software caused" "$WORK/writer-a.log" ||
        { cat "$WORK/writer-a.log"; fail "the writer on A was not stopped by the handover"; }
wait_for_files "$WORK/b/mnt" disk small
for _ in $(seq 1 200); do grep -q "Completed all device migrations" "$WORK/b.log" && break; sleep 0.05; done
cmp "$WORK/b/mnt/disk" "$WORK/expect-disk" || { cat "$WORK/a.log" "$WORK/b.log"; fail "B: disk differs from what was written on A"; }
cmp "$WORK/b/mnt/small" "$WORK/expect-small" || fail "B: small differs"

# Writes on B, then B → C.
writer "$WORK/b/mnt/small" "$WORK/expect-small" 0.3 2 >/dev/null
writer "$WORK/b/mnt/disk" "$WORK/expect-disk" 0.3 3 >/dev/null
start_mounter C c "unix:$WORK/b.sock" "unix:$WORK/c.sock"
wait "$B" || { cat "$WORK/b.log"; fail "B did not hand over cleanly"; }
expect_arrived c C

# Writes on C, then back to a fresh A (its old overlay is replaced by what arrives).
writer "$WORK/c/mnt/disk" "$WORK/expect-disk" 0.3 4 >/dev/null
rm -rf "$WORK/a/overlay" "$WORK/a/state"
start_mounter A2 a "unix:$WORK/c.sock" ""
wait "$C" || { cat "$WORK/c.log"; fail "C did not hand over cleanly"; }
expect_arrived a "A again"
kill -INT "$A2"
wait "$A2" || fail "A exited with an error on SIGINT"
mountpoint -q "$WORK/a/mnt" && fail "A left its mount behind"
cat "$WORK/writer-a.log"
grep -h "Completed all device migrations (" "$WORK"/*.log
echo "ok"
