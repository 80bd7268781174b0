#!/usr/bin/env bash
# qemu-img against our NBD server: info, convert out and in, compare; over a copy-on-write device,
# so the package base must stay untouched.
. "$(dirname "$0")/lib.sh"
need qemu-img cmp

random_file "$WORK/base.img" $((48 << 20)) 1
cp "$WORK/base.img" "$WORK/base.orig"
random_file "$WORK/new.img" $((48 << 20)) 2
start_server "[{\"name\":\"disk\",\"base\":\"$WORK/base.img\",\"overlay\":\"$WORK/o/disk\",\"state\":\"$WORK/s/disk\"}]"
U=$(uri disk)

qemu-img info --output=json "$U" >"$WORK/info.json"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["virtual-size"] == 48<<20, d' "$WORK/info.json" ||
        fail "qemu-img info reports the wrong size"

qemu-img convert -O raw "$U" "$WORK/out.img"
cmp "$WORK/out.img" "$WORK/base.img" || fail "convert from the export differs from the base"

qemu-img convert -n -f raw -O raw "$WORK/new.img" "$U"
qemu-img compare -f raw -F raw "$WORK/new.img" "$U" || fail "compare after convert into the export"
cmp "$WORK/base.img" "$WORK/base.orig" || fail "the base changed under a copy-on-write device"

stop_server
# Reopened from overlay + state, the device still holds what was written.
start_server "[{\"name\":\"disk\",\"base\":\"$WORK/base.img\",\"overlay\":\"$WORK/o/disk\",\"state\":\"$WORK/s/disk\"}]"
qemu-img compare -f raw -F raw "$WORK/new.img" "$(uri disk)" || fail "contents lost across a restart"
echo "ok"
