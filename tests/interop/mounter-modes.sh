#!/usr/bin/env bash
# drafter-mounter, real processes over loopback TCP: four devices of different sizes and block
# sizes (none a multiple of its block size but one), a writer changing all four through the
# source's files during the whole migration, in three modes — pre-copy and post-copy, pre-copy
# only (--disable-postcopy-migration: nothing arrives after the destination takes over), post-copy
# only (no cycles). Afterwards every byte of every device on the destination equals what the
# writer was told it wrote (checked block by block, so a difference names the block).
. "$(dirname "$0")/lib.sh"
need python3
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"

NAMES=(disk mem small tiny)
SIZES=($((8 << 20)) $((3 << 20 | 5)) 100000 1000)
BLOCKS=(65536 16384 4096 512)
for i in 0 1 2 3; do random_file "$WORK/${NAMES[i]}.img" "${SIZES[i]}" $((50 + i)); done

devices() { # instance maxDirty minCycles maxCycles throttle
        local sep="" i
        printf '['
        for i in 0 1 2 3; do
                printf '%s{"name":"%s","base":"%s/%s/base/%s.img","overlay":"%s/%s/overlay/%s","state":"%s/%s/state/%s","blockSize":%s,"maxDirtyBlocks":%s,"minCycles":%s,"maxCycles":%s,"cycleThrottle":%s}' \
                        "$sep" "${NAMES[i]}" "$WORK" "$1" "${NAMES[i]}" "$WORK" "$1" "${NAMES[i]}" "$WORK" "$1" "${NAMES[i]}" \
                        "${BLOCKS[i]}" "$2" "$3" "$4" "$5"
                sep=","
        done
        printf ']'
}

run_mode() { # label dest-flag maxDirty minCycles maxCycles throttle
        local label=$1 flag=$2
        shift 2
        echo "--- $label"
        for m in a b; do umount -l "$WORK/$m/mnt" 2>/dev/null || true; done
        rm -rf "$WORK/a" "$WORK/b" "$WORK/stop"
        fresh "$WORK/a.log" "$WORK/b.log" "$WORK/writer.log"
        mkdir -p "$WORK/a/base" "$WORK/expect"
        for n in "${NAMES[@]}"; do cp "$WORK/$n.img" "$WORK/a/base/"; cp "$WORK/$n.img" "$WORK/expect/$n"; done
        local port
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        "$DRAFTER_MOUNTER" --devices "$(devices a "$@")" --raddr '' --laddr "127.0.0.1:$port" \
                --mount-dir "$WORK/a/mnt" >"$WORK/a.log" 2>&1 &
        local A=$!
        on_exit "kill -9 $A 2>/dev/null; umount -l '$WORK/a/mnt' 2>/dev/null"
        for _ in $(seq 1 200); do grep -q "Serving on" "$WORK/a.log" && break; sleep 0.05; done
        # The writer: every device, until the source refuses (EROFS after the hand-over, or the
        # connection abort of its exit).
        local pairs=()
        for n in "${NAMES[@]}"; do pairs+=("$WORK/a/mnt/$n:$WORK/expect/$n"); done
        python3 "$(dirname "$0")/journal.py" mirror 9 "$WORK/stop" 0 0 "${pairs[@]}" >"$WORK/writer.log" 2>&1 &
        local W=$!
        # Python's start can take longer than a post-copy-only migration under load: the writer
        # must hold the files open before the destination connects.
        for _ in $(seq 1 200); do grep -q "writer: started" "$WORK/writer.log" && break; sleep 0.05; done
        grep -q "writer: started" "$WORK/writer.log" || { cat "$WORK/writer.log"; fail "$label: the writer did not start"; }
        sleep 0.3
        "$DRAFTER_MOUNTER" --devices "$(devices b "$@")" --raddr "127.0.0.1:$port" --laddr '' $flag \
                --mount-dir "$WORK/b/mnt" >"$WORK/b.log" 2>&1 &
        local B=$!
        on_exit "kill -9 $B 2>/dev/null; umount -l '$WORK/b/mnt' 2>/dev/null"
        for _ in $(seq 1 600); do grep -q "Completed all device migrations" "$WORK/b.log" && break; sleep 0.05; done
        grep -q "Completed all device migrations" "$WORK/b.log" || { cat "$WORK/a.log" "$WORK/b.log"; fail "$label: B did not complete"; }
        wait "$A" || { cat "$WORK/a.log"; fail "$label: the source failed"; }
        touch "$WORK/stop"
        wait "$W" || { cat "$WORK/writer.log"; fail "$label: the writer failed"; }
        cat "$WORK/writer.log"
        grep -q "writer: stopped by " "$WORK/writer.log" || fail "$label: the writer did not run until the hand-over"
        python3 - "$WORK/b/mnt" "$WORK/expect" "${BLOCKS[*]}" "${NAMES[@]}" <<'PY' || fail "$label: data differs"
import sys
mnt, expect, blocks, names = sys.argv[1], sys.argv[2], [int(b) for b in sys.argv[3].split()], sys.argv[4:]
for name, bs in zip(names, blocks):
    got, want = open(f"{mnt}/{name}", "rb").read(), open(f"{expect}/{name}", "rb").read()
    if len(got) != len(want):
        sys.exit(f"{name}: {len(got)} bytes, expected {len(want)}")
    for off in range(0, len(want), bs):
        if got[off:off + bs] != want[off:off + bs]:
            sys.exit(f"{name}: block {off // bs} differs")
print(f"every block of {', '.join(names)} matches")
PY
        grep "Completed all device migrations (" "$WORK/a.log" | sed 's/^[0-9/: ]*//'
        local received after
        received=$(grep "Received 4 devices" "$WORK/b.log" | sed 's/^[0-9/: ]*//')
        echo "$received"
        after=$(sed -n 's/.*, \([0-9]*\) after taking over).*/\1/p' <<<"$received")
        local cycles
        cycles=$(sed -n 's/.*Completed all device migrations (\([0-9]*\) cycles.*/\1/p' "$WORK/a.log")
        case $label in
        "pre-copy only") [[ $after == 0 ]] || fail "$label: $after blocks arrived after the destination took over"
                         [[ $cycles -gt 0 ]] || fail "$label: no pre-copy cycles ran" ;;
        "post-copy only") [[ $cycles == 0 ]] || fail "$label: $cycles pre-copy cycles ran" ;;
        *) [[ $cycles -gt 0 ]] || fail "$label: no pre-copy cycles ran" ;;
        esac
        kill -INT "$B"; wait "$B" || fail "$label: B exited with an error"
}

run_mode "pre-copy and post-copy" "" 4 2 6 50000000
run_mode "pre-copy only" --disable-postcopy-migration 4 2 6 50000000
run_mode "post-copy only" "" 0 0 0 0
echo "ok"
