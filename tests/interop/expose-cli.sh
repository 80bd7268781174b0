#!/usr/bin/env bash
# drafter-expose as a user meets it: --help in Go's format, clear one-line errors and exit codes
# for bad flags, bad --devices and missing files, and nothing left behind after a failed start.
. "$(dirname "$0")/lib.sh"

"$DRAFTER_EXPOSE" --help >"$WORK/help" 2>&1 || fail "--help exited non-zero"
grep -q '^Usage of drafter-expose:$' "$WORK/help" || fail "no usage line"
grep -q '^  -nbd-unix string$' "$WORK/help" || fail "flag listing not in Go's format"
grep -q 'Threads serving each NBD connection (default 4)' "$WORK/help" || fail "defaults not shown"

rc=0; "$DRAFTER_EXPOSE" --bogus 2>"$WORK/err" || rc=$?
[[ $rc == 2 ]] || fail "unknown flag: exit $rc, expected 2"
grep -q 'flag provided but not defined: -bogus' "$WORK/err" || fail "unknown flag message"

rc=0; "$DRAFTER_EXPOSE" --devices '[{"name":"disk","base":"x","blockSize":1000}]' --nbd-unix "$WORK/s" 2>"$WORK/err" || rc=$?
[[ $rc == 1 ]] || fail "bad devices: exit $rc"
grep -q 'field "blockSize": must be a power of two' "$WORK/err" || { cat "$WORK/err"; fail "bad devices message"; }
[[ $(wc -l <"$WORK/err") == 1 ]] || fail "error is not one line"

rc=0; "$DRAFTER_EXPOSE" --devices "[{\"name\":\"disk\",\"base\":\"$WORK/missing.img\"}]" --nbd-unix "$WORK/s" 2>"$WORK/err" || rc=$?
[[ $rc == 1 ]] || fail "missing base: exit $rc"
grep -q "field \"base\": $WORK/missing.img: No such file or directory" "$WORK/err" || { cat "$WORK/err"; fail "missing base message"; }
[[ ! -e "$WORK/s" ]] || fail "a socket was left behind after a failed start"

truncate -s 1M "$WORK/disk.img"
rc=0; "$DRAFTER_EXPOSE" --devices "[{\"name\":\"disk\",\"base\":\"$WORK/disk.img\",\"shared\":true}]" 2>"$WORK/err" || rc=$?
[[ $rc == 2 ]] || fail "nothing to serve on: exit $rc"
grep -q 'nothing to serve on' "$WORK/err" || fail "nothing-to-serve message"
echo "ok"
