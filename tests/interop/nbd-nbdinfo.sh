#!/usr/bin/env bash
# nbdinfo (libnbd) against our server: --list shows every export with its size, --size, the
# default export, an unknown export is refused, read-only is advertised.
. "$(dirname "$0")/lib.sh"
need nbdinfo

truncate -s 3M "$WORK/a.img"
truncate -s 5000000 "$WORK/b.img" # not a multiple of any block size
start_server "[{\"name\":\"memory\",\"base\":\"$WORK/a.img\",\"shared\":true},{\"name\":\"disk\",\"base\":\"$WORK/b.img\",\"shared\":true,\"blockSize\":4096}]" --read-only

nbdinfo --list "nbd+unix://?socket=$WORK/nbd.sock" >"$WORK/list.txt"
grep -q 'export="memory"' "$WORK/list.txt" || fail "memory export not listed"
grep -q 'export="disk"' "$WORK/list.txt" || fail "disk export not listed"
grep -q 'export-size: 3145728' "$WORK/list.txt" || fail "memory size wrong"
grep -q 'export-size: 5000000' "$WORK/list.txt" || fail "disk size wrong"
grep -q 'is_read_only: true' "$WORK/list.txt" || fail "read-only not advertised"

[[ "$(nbdinfo --size "$(uri disk)")" == 5000000 ]] || fail "--size of disk"
[[ "$(nbdinfo --size "nbd+unix://?socket=$WORK/nbd.sock")" == 3145728 ]] || fail "default export is the first"
if nbdinfo --size "$(uri nope)" 2>"$WORK/err"; then fail "unknown export accepted"; fi
grep -qi "nope\|unknown\|not found\|no export" "$WORK/err" || { cat "$WORK/err"; fail "no clear error for an unknown export"; }

echo "ok"
