#!/usr/bin/env bash
# S3-assisted live migration of a running VM, real drafter-peer processes and a real S3 server
# (s3rver): a peer with wrong S3 credentials fails at start and leaves no QEMU behind; peer A
# resumes the package with "s3sync" on every device and uploads it; S3 stops while A's VM runs
# (uploads fail, the guest's counter goes on) and comes back (uploads resume); A -> B takes most of the
# bytes from S3 (bytes over the link vs from S3 printed, the link's share asserted) and the guest's
# counter continues; B had no S3 configuration and got A's, so B -> C uses S3 again.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
BP=$CACHE/blueprint-vm-live-chain
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$BP" --cache "$CACHE" \
        >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest build failed"; }
P=$WORK/package
python3 - "$BP" "$P" >"$WORK/snap.json" <<'PY'
import json, sys
bp, out = sys.argv[1:3]
devs = [("state", "", "state.bin"), ("memory", "", "memory.bin"), ("kernel", "vmlinux", "vmlinux"),
        ("disk", "rootfs.ext4", "rootfs.ext4"), ("config", "", "config.json"), ("oci", "oci.ext4", "oci.ext4")]
print(json.dumps([{"name": n, "input": f"{bp}/{i}" if i else "", "output": f"{out}/{o}"} for n, i, o in devs]))
PY
"$DRAFTER_SNAPSHOTTER" --devices "$(cat "$WORK/snap.json")" --memory-size 256 --chroot-base-dir "$WORK/vms" \
        >"$WORK/snap.out" 2>"$WORK/snap.log" || { cat "$WORK/snap.log"; fail "snapshotter failed"; }

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
S3PORT=$(port)
start_s3rver "$WORK/s3" "$S3PORT" drafter-vm

devices() { # base-dir instance-dir s3sync accesskey
        python3 - "$@" "$S3PORT" <<'PY'
import json, sys
base, inst, s3, key, port = sys.argv[1:6]
files = {"state": "state.bin", "memory": "memory.bin", "kernel": "vmlinux", "disk": "rootfs.ext4",
         "config": "config.json", "oci": "oci.ext4"}
print(json.dumps([{"name": n, "base": f"{base}/{f}", "overlay": f"{inst}/overlay/{f}", "state": f"{inst}/state/{f}",
                   "blockSize": 65536, "maxDirtyBlocks": 200, "minCycles": 1, "maxCycles": 3,
                   "cycleThrottle": 100000000, "s3sync": s3 == "true", "s3accesskey": key, "s3secretkey": "S3RVER",
                   "s3endpoint": f"127.0.0.1:{port}", "s3secure": False, "s3bucket": "drafter-vm",
                   "s3concurrency": 8} for n, f in files.items()]))
PY
}
wait_counts() { # file n pid
        for _ in $(seq 1 600); do
                [[ $(counts "$1" | wc -l) -ge $2 ]] && return 0
                kill -0 "$3" 2>/dev/null || break
                sleep 0.1
        done
        tail -20 "$1"; fail "fewer than $2 counts in $1"
}
peer() { # name base-dir raddr laddr s3sync [accesskey] -> PID_<name>
        fresh "$WORK/$1.out" "$WORK/$1.log"
        "$DRAFTER_PEER" --devices "$(devices "$2" "$WORK/$1" "$5" "${6:-S3RVER}")" --chroot-base-dir "$WORK/vms" \
                --raddr "$3" --laddr "$4" >"$WORK/$1.out" 2>"$WORK/$1.log" &
        printf -v "PID_$1" '%s' $!
        on_exit "kill -9 $! 2>/dev/null"
}
continued() { # from to
        continues "$WORK/$1.out" "$WORK/$2.out" ||
                { cat "$WORK/$1.log" "$WORK/$2.log"; fail "counter '$LAST' at $1, '$FIRST' at $2"; }
        echo "$1 -> $2: counter $LAST -> $FIRST; $(grep "Resumed VM in" "$WORK/$2.log" | sed 's/.*Resumed VM in \([0-9.]*\) ms.*/resumed \1 ms after the hand-over/')"
}
finished() { # name
        local pid
        pid=$(eval echo "\$PID_$1")
        timeout 120 tail --pid="$pid" -f /dev/null || { cat "$WORK/$1.log"; fail "$1 did not finish"; }
        wait "$pid" || { cat "$WORK/$1.log"; fail "$1 failed"; }
}
received() { # name -> "From S3" line, after the last block arrived
        for _ in $(seq 1 600); do grep -q "Completed all device migrations" "$WORK/$1.log" && break; sleep 0.1; done
        grep -h "From S3:" "$WORK/$1.log" || { cat "$WORK/$1.log"; fail "$1 took nothing from S3"; }
}
share_ok() { # line max-link-share
        python3 - "$1" "$2" <<'PY'
import re, sys
m = re.search(r"From S3: \d+ blocks, ([0-9.]+) MB .*over the link: ([0-9.]+) MB", sys.argv[1])
s3, link = float(m.group(1)), float(m.group(2))
print(f"link share {100 * link / (s3 + link):.1f} %")
sys.exit(0 if link <= float(sys.argv[2]) * (s3 + link) else 1)
PY
}

# Wrong credentials: a clear error at start, no VM left running.
peer X "$P" "" "" true WRONGKEY
if wait "$PID_X"; then fail "a peer with a wrong access key started"; fi
grep -q "refused the credentials" "$WORK/X.log" || { cat "$WORK/X.log"; fail "no clear credentials error"; }
! pgrep -f "qemu-system-x86_64.*$WORK/vms" >/dev/null || fail "QEMU left running after the credentials error"
echo "wrong access key: $(grep -o 'S3 refused[^(]*' "$WORK/X.log" | head -1)"

PA=$(port) PB=$(port) PC=$(port)
peer A "$P" "" "127.0.0.1:$PA" true
wait_counts "$WORK/A.out" 3 "$PID_A"
for _ in $(seq 1 600); do (( $(grep -c 'is in bucket' "$WORK/A.log") >= 6 )) && break; sleep 0.1; done
(( $(grep -c 'is in bucket' "$WORK/A.log") >= 6 )) || { cat "$WORK/A.log"; fail "A did not upload its devices"; }
grep -h 'is in bucket' "$WORK/A.log" | sed 's/^[0-9/: ]*//'

# S3 goes away while the VM runs: uploads fail, the VM goes on; S3 back: uploads resume.
stop_s3rver
for _ in $(seq 1 900); do grep -q 'upload failed, the VM runs on' "$WORK/A.log" && break; sleep 0.1; done
grep -q 'upload failed, the VM runs on' "$WORK/A.log" || { cat "$WORK/A.log"; fail "A never tried to upload while S3 was down"; }
before=$(counts "$WORK/A.out" | tail -1)
sleep 1
after=$(counts "$WORK/A.out" | tail -1)
(( after > before )) || fail "A's VM stopped while S3 was down ($before, $after)"
start_s3rver "$WORK/s3" "$S3PORT" drafter-vm
for _ in $(seq 1 600); do grep -q 'uploads resumed' "$WORK/A.log" && break; sleep 0.1; done
grep -q 'uploads resumed' "$WORK/A.log" || { cat "$WORK/A.log"; fail "A's uploads did not resume"; }
echo "S3 down while A runs: $(grep -h -m1 -o 'S3: device "[a-z]*": upload failed' "$WORK/A.log"), counter $before -> $after; back: $(grep -h -m1 -o 'S3: device "[a-z]*": uploads resumed' "$WORK/A.log")"
sleep 2 # what changed meanwhile goes up

peer B "$WORK/b/package" "127.0.0.1:$PA" "127.0.0.1:$PB" false
finished A
wait_counts "$WORK/B.out" 3 "$PID_B"
continued A B
line=$(received B)
echo "A -> B: ${line#* * }"
share_ok "$line" 0.25 || fail "A -> B: the link carried too large a share"

sleep 3 # B uploads what came over the link
peer C "$WORK/c/package" "127.0.0.1:$PB" "" false
finished B
wait_counts "$WORK/C.out" 3 "$PID_C"
continued B C
line=$(received C)
echo "B -> C: ${line#* * }"
share_ok "$line" 0.5 || fail "B -> C: the link carried too large a share"
kill -INT "$PID_C"
finished C
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "QEMU processes left behind"
echo "ok"
