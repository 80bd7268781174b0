#!/usr/bin/env bash
# qemu-io drives a seeded random mix of writes (with patterns), reads that check those patterns,
# discards and write-zeroes against our server and, identically, against a local reference file;
# afterwards the export must equal the reference byte for byte.
. "$(dirname "$0")/lib.sh"
need qemu-io qemu-img

SIZE=$((16 << 20))
random_file "$WORK/disk.img" $SIZE 3
cp "$WORK/disk.img" "$WORK/reference.img"
start_server "[{\"name\":\"disk\",\"base\":\"$WORK/disk.img\",\"shared\":true}]"

python3 - "$SIZE" 4 >"$WORK/commands" <<'PY'
import random, sys
size, seed = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(seed)
pattern = {}  # offsets written with a pattern we can check
for _ in range(400):
    off = r.randrange(0, size - 1)
    length = min(r.choice([1, 511, 512, 4096, 65536, 70001, 200000]), size - off)
    kind = r.random()
    if kind < 0.5:
        p = r.randrange(1, 256)
        print(f"write -P {p} {off} {length}")
        print(f"read -P {p} {off} {length}")
    elif kind < 0.65:
        print(f"write -z {off} {length}")
        print(f"read -P 0 {off} {length}")
    elif kind < 0.8:
        a = off - off % 512; l = max(512, length - length % 512); l = min(l, size - a)
        print(f"discard {a} {l}")
    elif kind < 0.95:
        print(f"read {off} {length}")
    else:
        print("flush")
PY
args=()
while read -r line; do args+=(-c "$line"); done <"$WORK/commands"

qemu-io -f raw "${args[@]}" "$(uri disk)" >"$WORK/nbd.out" 2>&1 || { tail "$WORK/nbd.out"; fail "qemu-io on the export failed"; }
grep -qi "pattern verification failed\|error" "$WORK/nbd.out" && { grep -i "fail\|error" "$WORK/nbd.out" | head; fail "qemu-io reported errors"; }
# The same commands on the reference (discarded ranges read as zeros on both: we zero them).
qemu-io -f raw "${args[@]}" "$WORK/reference.img" >"$WORK/ref.out" 2>&1 || fail "qemu-io on the reference failed"
stop_server
python3 - "$WORK/disk.img" "$WORK/reference.img" "$WORK/commands" <<'PY'
import sys
a, b = open(sys.argv[1], 'rb').read(), open(sys.argv[2], 'rb').read()
# A discard may leave a local file's bytes in place (its contents are then unspecified), so
# compare everything outside discarded ranges exactly, and require zeros inside them on our side.
# Replay the commands: a byte whose last change was a discard is "discarded".
state = bytearray(len(a))  # 1 = last op was a discard
for line in open(sys.argv[3]):
    w = line.split()
    if w[0] == 'discard':
        off, length = int(w[1]), int(w[2]); state[off:off + length] = b'\x01' * length
    elif w[0] == 'write':
        off, length = int(w[-2]), int(w[-1]); state[off:off + length] = b'\x00' * length
# Compare in 64 KiB windows; only windows touched by a discard need the byte-wise rule.
W = 65536
for start in range(0, len(a), W):
    sa, sb, st = a[start:start + W], b[start:start + W], state[start:start + W]
    if not any(st):
        if sa != sb:
            sys.exit(f"export differs from the reference in the 64 KiB window at {start}")
        continue
    for i in range(len(sa)):
        if st[i] and sa[i] != 0:
            sys.exit(f"discarded byte at {start + i} reads back non-zero")
        if not st[i] and sa[i] != sb[i]:
            sys.exit(f"export differs from the reference at byte {start + i}")
print("export equals the reference")
PY
echo "ok"
