#!/usr/bin/env bash
# drafter-mounter under faults, real processes: the destination is SIGKILLed during pre-copy
# cycles (the source keeps its devices, its writer never notices, and a second destination —
# starting over a stale mount of the dead one — then completes with every byte right); the
# source is SIGKILLed during cycles (the destination fails with a clear error and unmounts).
. "$(dirname "$0")/lib.sh"
need python3 cmp
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"

random_file "$WORK/disk.img" $((16 << 20)) 21
cp "$WORK/disk.img" "$WORK/expect-disk"
devices() { # instance: slow cycles (10 × 200 ms) so there is time to kill a peer mid-migration
        echo "[{\"name\":\"disk\",\"base\":\"$WORK/$1/base/disk.img\",\"overlay\":\"$WORK/$1/overlay/disk\",\"state\":\"$WORK/$1/state/disk\",\"blockSize\":65536,\"maxDirtyBlocks\":0,\"minCycles\":10,\"maxCycles\":10,\"cycleThrottle\":200000000}]"
}
mkdir -p "$WORK/a/base"
cp "$WORK/disk.img" "$WORK/a/base/"
start_mounter() { # variable name raddr laddr log
        fresh "$WORK/$5.log"
        "$DRAFTER_MOUNTER" --devices "$(devices "$2")" --raddr "$3" --laddr "$4" --mount-dir "$WORK/$2/mnt" \
                >"$WORK/$5.log" 2>&1 &
        printf -v "$1" '%s' $!
        on_exit "kill -9 $! 2>/dev/null; umount -l '$WORK/$2/mnt' 2>/dev/null"
}
wait_for_log() { # log pattern
        for _ in $(seq 1 300); do grep -q "$2" "$WORK/$1.log" && return 0; sleep 0.05; done
        cat "$WORK/$1.log"; fail "$1: no \"$2\""
}

start_mounter A a "" "unix:$WORK/a.sock" a
wait_for_files "$WORK/a/mnt" disk
python3 "$(dirname "$0")/journal.py" mirror 5 "$WORK/writer.stop" 0 1 "$WORK/a/mnt/disk:$WORK/expect-disk" \
        >"$WORK/writer.log" 2>&1 &
WRITER=$!

# 1. The destination dies in the middle of pre-copy.
start_mounter B1 b "unix:$WORK/a.sock" "" b1
wait_for_log a "Migrating 1 devices"
sleep 0.8
kill -9 "$B1"
wait "$B1" 2>/dev/null || true
wait_for_log a "Kept the devices; serving"
grep -q "migration failed: destination: " "$WORK/a.log" || { cat "$WORK/a.log"; fail "no clear error on A"; }
kill -0 $WRITER 2>/dev/null || { cat "$WORK/writer.log"; fail "the writer on A stopped: A lost its devices"; }
sleep 0.3

# 2. A second destination over the dead one's stale mount completes.
start_mounter B2 b "unix:$WORK/a.sock" "" b2
wait_for_log b2 "Completed all device migrations"
wait "$A" || { cat "$WORK/a.log"; fail "A did not finish cleanly"; }
wait $WRITER
cat "$WORK/writer.log"
cmp "$WORK/b/mnt/disk" "$WORK/expect-disk" || fail "B: disk differs from what the writer was told it wrote"
grep -q "detached a stale mount\|Serving 1 devices" "$WORK/b2.log" || fail "B2 did not serve"

# 3. The source dies in the middle of pre-copy: the destination fails cleanly.
kill -INT "$B2"; wait "$B2" || fail "B2 exited with an error"
mkdir -p "$WORK/c/base"
cp "$WORK/disk.img" "$WORK/c/base/"
start_mounter A2 c "" "unix:$WORK/c.sock" a2
wait_for_files "$WORK/c/mnt" disk
start_mounter D d "unix:$WORK/c.sock" "" d
wait_for_log a2 "Migrating 1 devices"
sleep 0.8
kill -9 "$A2"
rc=0; wait "$D" || rc=$?
[[ $rc != 0 ]] || fail "D exited 0 although its source died"
grep -q "error: source: connection lost before the migration completed (the source keeps the devices)" "$WORK/d.log" ||
        { cat "$WORK/d.log"; fail "D: no clear error"; }
mountpoint -q "$WORK/d/mnt" && fail "D left its mount behind"
tail -2 "$WORK/d.log"
echo "ok"
