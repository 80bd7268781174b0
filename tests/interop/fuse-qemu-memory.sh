#!/usr/bin/env bash
# QEMU maps guest RAM from our FUSE device file (memory-backend-file, share=on), as drafter-peer
# will. Guest RAM starts as the device's contents (QEMU reads through the mapping: pmemsave must
# show them) and what QEMU writes into guest RAM (the loader device copies a file in at reset)
# must reach the device. No guest runs here (-S); the VM issues boot real guests.
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 cmp mountpoint
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }

MEM=$((64 << 20))
random_file "$WORK/memory.bin" $MEM 8
cp "$WORK/memory.bin" "$WORK/memory.orig"
random_file "$WORK/pattern.bin" $((256 << 10)) 9
LOAD_ADDR=$((4 << 20))

"$DRAFTER_EXPOSE" --devices "[{\"name\":\"memory\",\"base\":\"$WORK/memory.bin\",\"shared\":true}]" \
        --fuse-dir "$WORK/vm" 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 200); do [[ -f "$WORK/vm/memory" ]] && break; sleep 0.05; done
[[ -f "$WORK/vm/memory" ]] || { cat "$WORK/server.log"; fail "FUSE mount did not come up"; }

qemu-system-x86_64 -machine q35,memory-backend=mem -accel tcg -m 64M -nodefaults -display none -S \
        -object "memory-backend-file,id=mem,size=64M,mem-path=$WORK/vm/memory,share=on" \
        -device "loader,file=$WORK/pattern.bin,addr=$LOAD_ADDR" \
        -qmp "unix:$WORK/qmp.sock,server=on,wait=off" 2>"$WORK/qemu.log" &
QEMU_PID=$!
on_exit "kill $QEMU_PID 2>/dev/null; wait $QEMU_PID 2>/dev/null"

python3 "$(dirname "$0")/qmp.py" "$WORK/qmp.sock" \
        "{\"execute\": \"pmemsave\", \"arguments\": {\"val\": 0, \"size\": $MEM, \"filename\": \"$WORK/guest-ram.bin\"}}" \
        '{"execute": "quit"}' >/dev/null || { cat "$WORK/qemu.log"; fail "QMP failed"; }
wait $QEMU_PID || true

python3 - "$WORK" $LOAD_ADDR <<'PY' || fail "guest RAM and device disagree"
import os, sys, ctypes
work, load = sys.argv[1], int(sys.argv[2])
ram = open(f"{work}/guest-ram.bin", "rb").read()
orig = open(f"{work}/memory.orig", "rb").read()
pattern = open(f"{work}/pattern.bin", "rb").read()
# 1. QEMU read guest RAM through the mapping: outside the loader window (and the first MiB, which
#    firmware regions shadow) guest RAM is the device's original contents.
lo, hi = load, load + len(pattern)
if ram[1 << 20:lo] != orig[1 << 20:lo] or ram[hi:] != orig[hi:]:
    sys.exit("guest RAM does not hold the device's contents")
if ram[lo:hi] != pattern:
    sys.exit("the loader's data is not in guest RAM")
# 2. What QEMU wrote reached the device once the mount is synced.
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(f"{work}/vm", os.O_RDONLY)
if libc.syncfs(fd) != 0:
    sys.exit("syncfs failed")
os.close(fd)
dev = open(f"{work}/memory.bin", "rb").read()
if dev[lo:hi] != pattern:
    sys.exit("QEMU's writes to guest RAM did not reach the device")
if dev[hi:] != orig[hi:]:
    sys.exit("bytes QEMU never wrote changed on the device")
print(f"guest RAM read through FUSE; {len(pattern)} bytes written by QEMU reached the device")
PY
# Ctrl-C unmounts cleanly.
kill -INT $SERVER_PID
wait $SERVER_PID || fail "drafter-expose exited with status $? on SIGINT"
SERVER_PID=""
if mountpoint -q "$WORK/vm"; then fail "the FUSE mount is still there after SIGINT"; fi
echo "ok"
