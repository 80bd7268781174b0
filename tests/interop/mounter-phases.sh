#!/usr/bin/env bash
# drafter-mounter killed at each phase, real processes: a proxy passes the source's frames until a
# phase (during bulk, just after SUSPENDED, just after AUTHORITY), then stalls the link, and the
# source or the destination is SIGKILLed. A writer on the source fsyncs every write and journals
# it; the outcome each case checks is the one docs/protocol.md ("Broken connections") promises:
#  - during bulk, destination killed: the source keeps serving and writing, and a new destination
#    then gets every acknowledged write;
#  - during bulk or once suspended (before AUTHORITY reached the destination), source killed: the
#    destination fails with a clear error, unmounts and removes its partial copy; the source's
#    files hold every acknowledged write;
#  - once suspended, destination killed: the source had already sent AUTHORITY and cannot know
#    whether it arrived, so it does not resume (no write acknowledged after the suspension),
#    exits with an error, and its files hold every acknowledged write;
#  - after authority, source killed: the destination keeps serving what arrived (right data) and
#    fails reads of what never did (EIO); the source's files hold every acknowledged write;
#  - after authority, destination killed: the source does not resume (no write is acknowledged
#    after the transfer; its writer is refused), exits with an error, and its files hold every
#    acknowledged write.
. "$(dirname "$0")/lib.sh"
need python3
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"
HERE=$(dirname "$0")

random_file "$WORK/disk.img" $((8 << 20)) 41
devices() { # instance
        echo "[{\"name\":\"disk\",\"base\":\"$WORK/$1/base/disk.img\",\"overlay\":\"$WORK/$1/overlay/disk\",\"state\":\"$WORK/$1/state/disk\",\"blockSize\":65536,\"maxDirtyBlocks\":0,\"minCycles\":2,\"maxCycles\":2,\"cycleThrottle\":100000000}]"
}
start() { # variable instance raddr laddr log
        fresh "$WORK/$5.log"
        "$DRAFTER_MOUNTER" --devices "$(devices "$2")" --raddr "$3" --laddr "$4" --mount-dir "$WORK/$2/mnt" \
                >"$WORK/$5.log" 2>&1 &
        printf -v "$1" '%s' $!
        on_exit "kill -9 $! 2>/dev/null; umount -l '$WORK/$2/mnt' 2>/dev/null"
}
wait_log() { # log pattern
        for _ in $(seq 1 400); do grep -q "$2" "$WORK/$1.log" && return 0; sleep 0.05; done
        cat "$WORK/$1.log"; fail "$1: no \"$2\""
}
wait_gone() { # pid what log
        for _ in $(seq 1 400); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.05; done
        cat "$WORK/$3.log"; fail "$2 did not exit"
}
# The source's files, served again by a fresh mounter, hold every acknowledged write.
check_source_files() {
        umount -l "$WORK/a/mnt" 2>/dev/null || true
        start A2 a "" "" a2
        wait_log a2 "Serving 1 devices"
        python3 "$HERE/journal.py" check "$WORK/a/mnt/disk" "$WORK/disk.img" "$WORK/journal"
        kill -INT "$A2"; wait "$A2" || fail "the source's files could not be served again"
}

run_case() { # phase victim
        local phase=$1 victim=$2
        echo "--- $phase, $victim killed"
        for m in a b c; do umount -l "$WORK/$m/mnt" 2>/dev/null || true; done
        rm -rf "$WORK/a" "$WORK/b" "$WORK/c" "$WORK"/*.sock "$WORK/held" "$WORK/stop" "$WORK/journal"
        mkdir -p "$WORK/a/base"
        cp "$WORK/disk.img" "$WORK/a/base/"
        start A a "" "unix:$WORK/a.sock" a
        wait_log a "Serving 1 devices"
        python3 "$HERE/journal.py" write "$WORK/a/mnt/disk" "$WORK/journal" "$WORK/stop" 7 >"$WORK/writer.log" 2>&1 &
        WRITER=$!
        python3 "$HERE/link-proxy.py" "$WORK/p.sock" "$WORK/a.sock" "$phase" "$WORK/held" &
        PROXY=$!
        for _ in $(seq 1 200); do [[ -S "$WORK/p.sock" ]] && break; sleep 0.02; done
        start B b "unix:$WORK/p.sock" "" b
        for _ in $(seq 1 600); do [[ -e "$WORK/held" ]] && break; sleep 0.05; done
        [[ -e "$WORK/held" ]] || { cat "$WORK/a.log" "$WORK/b.log"; fail "$phase never reached"; }
        sleep 0.3 # the destination's acknowledgements reach the source
        acked_at_hold=$(grep -c '^A' "$WORK/journal" || true)
        if [[ $victim == destination ]]; then kill -9 "$B"; else kill -9 "$A"; fi
        wait $PROXY 2>/dev/null || true

        case $phase,$victim in
        bulk:*,destination)
                wait_log a "Kept the devices; serving"
                grep -q "migration failed: destination: " "$WORK/a.log" || { cat "$WORK/a.log"; fail "no clear error on the source"; }
                sleep 0.3
                kill -0 $WRITER 2>/dev/null || { cat "$WORK/writer.log"; fail "the writer stopped: the source lost its devices"; }
                touch "$WORK/stop"; wait $WRITER
                cat "$WORK/writer.log"
                start C c "unix:$WORK/a.sock" "" c
                wait_log c "Completed all device migrations"
                wait "$A" || { cat "$WORK/a.log"; fail "the second migration failed on the source"; }
                python3 "$HERE/journal.py" check "$WORK/c/mnt/disk" "$WORK/disk.img" "$WORK/journal"
                kill -INT "$C"; wait "$C" || fail "C exited with an error"
                ;;
        bulk:*,source | suspended,source)
                local rc=0
                wait "$B" || rc=$?
                [[ $rc != 0 ]] || fail "the destination exited 0 although its source died"
                grep -q "error: source: connection lost before the migration completed (the source keeps the devices)" \
                        "$WORK/b.log" || { cat "$WORK/b.log"; fail "no clear error on the destination"; }
                mountpoint -q "$WORK/b/mnt" && fail "the destination left its mount behind"
                for f in base/disk.img overlay/disk state/disk; do
                        [[ ! -e "$WORK/b/$f" ]] || fail "the destination kept its partial copy ($f)"
                done
                wait $WRITER; cat "$WORK/writer.log"
                check_source_files
                ;;
        authority,source)
                wait_log b "Serving the blocks that arrived until stopped"
                grep -q "after the authority transfer" "$WORK/b.log" || { cat "$WORK/b.log"; fail "no clear error on the destination"; }
                wait $WRITER; cat "$WORK/writer.log"
                [[ $(grep -c '^A' "$WORK/journal") == "$acked_at_hold" ]] ||
                        fail "the source acknowledged writes after the authority transfer"
                python3 "$HERE/journal.py" check "$WORK/b/mnt/disk" "$WORK/disk.img" "$WORK/journal" --missing-ok 65536
                local rc=0
                kill -INT "$B"; wait "$B" || rc=$?
                [[ $rc != 0 ]] || fail "the destination exited 0 after a broken post-copy"
                check_source_files
                ;;
        authority,destination | suspended,destination)
                local rc=0
                wait_gone "$A" "the source" a
                wait "$A" || rc=$?
                [[ $rc != 0 ]] || fail "the source exited 0 after losing its destination"
                grep -q "migration failed: " "$WORK/a.log" || { cat "$WORK/a.log"; fail "no clear error on the source"; }
                grep -q "Kept the devices" "$WORK/a.log" && fail "the source resumed after sending AUTHORITY"
                wait $WRITER; cat "$WORK/writer.log"
                grep -q "writer: stopped by " "$WORK/writer.log" || fail "the source's writer was not refused"
                [[ $(grep -c '^A' "$WORK/journal") == "$acked_at_hold" ]] ||
                        fail "the source acknowledged writes after the authority transfer"
                check_source_files
                ;;
        esac
        tail -3 "$WORK/b.log"
}

for phase in ${PHASES:-bulk:20 suspended authority}; do
        for victim in ${VICTIMS:-destination source}; do
                run_case "$phase" "$victim"
        done
done
echo "ok"
