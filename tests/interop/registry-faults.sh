#!/usr/bin/env bash
# drafter-registry under faults, with drafter-mounter as the peer (the same lazy migration a
# drafter-peer gets, without a VM): a proxy lets the first 20 blocks through, then stalls.
#  1. SIGINT to the registry while a peer is mid-fetch: the registry stops at once and exits 0
#     ("Stopping: … failed"); the peer, which took authority at the start, says the source went
#     away, serves the blocks that arrived (byte-exact) and fails reads of the others with EIO;
#  2. the same with the registry SIGKILLed;
#  3. a peer SIGKILLed mid-fetch: the registry logs the failed peer, keeps serving, and the next
#     peer receives the whole package byte-exact;
#  4. a registry with a pre-shared key: a peer with another key is refused in the handshake, a
#     peer with the key receives the package byte-exact.
. "$(dirname "$0")/lib.sh"
need python3 cmp dd
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}" "${DRAFTER_REGISTRY:?}"
HERE=$(dirname "$0")
random_file "$WORK/disk.img" $((16 << 20)) 53
BS=65536

registry() { # log [flags…]
        local log=$1
        shift
        rm -f "$WORK/r.sock"
        "$DRAFTER_REGISTRY" --laddr "unix:$WORK/r.sock" "$@" \
                --devices "[{\"name\":\"disk\",\"base\":\"$WORK/disk.img\",\"blockSize\":$BS}]" >"$WORK/$log.log" 2>&1 &
        R=$!
        on_exit "kill -9 $R 2>/dev/null"
        for _ in $(seq 1 200); do grep -q "Listening on" "$WORK/$log.log" && break; sleep 0.05; done
        grep -q "Listening on" "$WORK/$log.log" || { cat "$WORK/$log.log"; fail "the registry did not start"; }
}
peer() { # name raddr [flags…] -> P
        local name=$1 raddr=$2
        shift 2
        "$DRAFTER_MOUNTER" "$@" --devices "[{\"name\":\"disk\",\"base\":\"$WORK/$name/disk.img\",\"overlay\":\"$WORK/$name/overlay\",\"state\":\"$WORK/$name/state\",\"blockSize\":$BS}]" \
                --raddr "$raddr" --laddr '' --mount-dir "$WORK/$name/mnt" >"$WORK/$name.log" 2>&1 &
        P=$!
        on_exit "kill -9 $P 2>/dev/null; umount -l '$WORK/$name/mnt' 2>/dev/null"
}
# fetched_then_stopped case name registry-log: peer `name` (P) receives the package byte-exact;
# then it and the registry (R) stop cleanly, the registry counting one peer served, one failed.
fetched_then_stopped() {
        local case=$1 name=$2 log=$3
        for _ in $(seq 1 200); do grep -q "Completed all device migrations" "$WORK/$name.log" && break; sleep 0.05; done
        cmp "$WORK/$name/mnt/disk" "$WORK/disk.img" || { cat "$WORK/$name.log" "$WORK/$log.log"; fail "$case: $name's data differs"; }
        kill -INT $P
        wait $P || fail "$case: $name exited with an error"
        kill -INT $R
        wait $R || fail "$case: the registry exited with an error"
        grep -q "Stopping: 1 peers served, 1 failed" "$WORK/$log.log" || { cat "$WORK/$log.log"; fail "$case: the registry's count"; }
}
stalled_peer() { # name -> P, PROXY: a peer whose link stalls after 20 blocks
        rm -f "$WORK/p.sock" "$WORK/held"
        python3 "$HERE/link-proxy.py" "$WORK/p.sock" "$WORK/r.sock" bulk:20 "$WORK/held" &
        PROXY=$!
        on_exit "kill -9 $PROXY 2>/dev/null"
        for _ in $(seq 1 100); do [[ -S "$WORK/p.sock" ]] && break; sleep 0.05; done
        peer "$1" "unix:$WORK/p.sock"
        for _ in $(seq 1 200); do [[ -e "$WORK/held" ]] && break; sleep 0.05; done
        [[ -e "$WORK/held" ]] || { cat "$WORK/$1.log"; fail "$1: the link never reached 20 blocks"; }
}
source_gone() { # name how
        local name=$1 how=$2
        for _ in $(seq 1 200); do grep -q "Serving the blocks that arrived until stopped" "$WORK/$name.log" && break; sleep 0.05; done
        grep -q "after the authority transfer" "$WORK/$name.log" || { cat "$WORK/$name.log"; fail "$how: $name gave no clear error"; }
        dd if="$WORK/$name/mnt/disk" bs=$BS count=4 status=none >"$WORK/first" || fail "$how: $name cannot read blocks that arrived"
        cmp "$WORK/first" <(head -c $((4 * BS)) "$WORK/disk.img") || fail "$how: $name serves wrong data"
        if dd if="$WORK/$name/mnt/disk" bs=$BS skip=250 count=1 status=none of=/dev/null 2>"$WORK/eio"; then
                fail "$how: a block that never arrived was readable"
        fi
        grep -q "Input/output error" "$WORK/eio" || { cat "$WORK/eio"; fail "$how: a missing block did not fail with EIO"; }
        kill -INT "$P"
        local rc=0
        wait "$P" || rc=$?
        ((rc != 0)) || fail "$how: $name exited 0 after its source went away"
        wait "$PROXY" 2>/dev/null || true
        echo "$how: $name serves the 20 blocks that arrived, EIO for the rest ($(grep -o 'error: .*' "$WORK/$name.log" | head -1 | cut -c1-110))"
}

# 1. SIGINT to the registry mid-fetch.
registry r1
stalled_peer b
kill -INT $R
timeout 20 tail --pid=$R -f /dev/null || fail "the registry did not stop on SIGINT while serving"
wait $R || { cat "$WORK/r1.log"; fail "the interrupted registry exited with an error"; }
grep -q "Stopping: 0 peers served, 1 failed" "$WORK/r1.log" || { cat "$WORK/r1.log"; fail "the registry did not report the interrupted peer"; }
source_gone b "1. SIGINT to the registry"

# 2. The registry SIGKILLed mid-fetch.
registry r2
stalled_peer c
kill -9 $R
source_gone c "2. registry killed"

# 3. A peer killed mid-fetch; the registry goes on.
registry r3
stalled_peer d
kill -9 $P
for _ in $(seq 1 100); do grep -q "peer 1: " "$WORK/r3.log" && break; sleep 0.1; done
grep -q "peer 1: " "$WORK/r3.log" || { cat "$WORK/r3.log"; fail "the registry did not notice its peer died"; }
kill -0 $R || fail "the registry died with its peer"
umount -l "$WORK/d/mnt" 2>/dev/null || true
peer e "unix:$WORK/r.sock"
fetched_then_stopped 3 e r3
echo "3. peer killed mid-fetch: the registry logged '$(grep -o 'peer 1: .*' "$WORK/r3.log" | head -1 | cut -c1-90)' and served the next peer byte-exact"

# 4. A registry with a pre-shared key.
key() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
(umask 077 && key >"$WORK/r.psk" && key >"$WORK/other.psk")
registry r4 --psk-file "$WORK/r.psk"
peer f "unix:$WORK/r.sock" --psk-file "$WORK/other.psk"
rc=0
timeout 60 tail --pid=$P -f /dev/null
wait $P || rc=$?
((rc == 1)) || { cat "$WORK/f.log"; fail "4. a peer with another key exited $rc"; }
grep -q "TLS handshake" "$WORK/f.log" || { cat "$WORK/f.log"; fail "4. no handshake error for the wrong key"; }
peer g "unix:$WORK/r.sock" --psk-file "$WORK/r.psk"
for _ in $(seq 1 200); do grep -q "Secured the link with PSK" "$WORK/g.log" && break; sleep 0.05; done
grep -q "Secured the link with PSK" "$WORK/g.log" || fail "4. the peer's link was not secured"
fetched_then_stopped 4 g r4
echo "4. registry with a PSK: another key refused ($(grep -o 'TLS handshake: .*' "$WORK/f.log" | head -1 | cut -c1-80)), the keyed peer byte-exact"
echo "ok"
