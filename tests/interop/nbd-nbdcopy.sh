#!/usr/bin/env bash
# nbdcopy (libnbd, several connections at once when the server allows it) in both directions, over
# a unix socket, TCP on IPv4 and TCP on IPv6; sparse data goes through hole replies.
. "$(dirname "$0")/lib.sh"
need nbdcopy nbdinfo cmp

SIZE=$((64 << 20))
truncate -s $SIZE "$WORK/disk.img"
random_file "$WORK/src.img" $SIZE 5
# a partly sparse source: zero the second quarter
dd if=/dev/zero of="$WORK/src.img" bs=1M seek=16 count=16 conv=notrunc status=none
"$DRAFTER_EXPOSE" --devices "[{\"name\":\"disk\",\"base\":\"$WORK/disk.img\",\"shared\":true}]" \
        --nbd-unix "$WORK/nbd.sock" --nbd-tcp 127.0.0.1:0 2>"$WORK/server4.log" &
SERVER_PID=$!
for _ in $(seq 1 200); do grep -q "port [0-9]" "$WORK/server4.log" 2>/dev/null && break; sleep 0.05; done
PORT4=$(grep -o 'port [0-9]*' "$WORK/server4.log" | cut -d' ' -f2)
[[ -n "$PORT4" ]] || fail "no TCP port"

nbdcopy "$WORK/src.img" "nbd+unix:///disk?socket=$WORK/nbd.sock"
nbdcopy "nbd+unix:///disk?socket=$WORK/nbd.sock" "$WORK/back-unix.img"
cmp "$WORK/src.img" "$WORK/back-unix.img" || fail "unix round trip differs"
nbdcopy "nbd://127.0.0.1:$PORT4/disk" "$WORK/back-tcp4.img"
cmp "$WORK/src.img" "$WORK/back-tcp4.img" || fail "TCP/IPv4 copy differs"
random_file "$WORK/src2.img" $SIZE 6
nbdcopy "$WORK/src2.img" "nbd://127.0.0.1:$PORT4/disk"
cmp "$WORK/src2.img" "$WORK/disk.img" || fail "TCP/IPv4 write differs"
kill -INT $SERVER_PID; wait $SERVER_PID; SERVER_PID=""

if [[ -f /proc/net/if_inet6 ]] && ip -6 addr show lo 2>/dev/null | grep -q '::1'; then
        "$DRAFTER_EXPOSE" --devices "[{\"name\":\"disk\",\"base\":\"$WORK/disk.img\",\"shared\":true}]" \
                --nbd-tcp '[::1]:0' 2>"$WORK/server6.log" &
        SERVER_PID=$!
        for _ in $(seq 1 200); do grep -q "port [0-9]" "$WORK/server6.log" 2>/dev/null && break; sleep 0.05; done
        PORT6=$(grep -o 'port [0-9]*' "$WORK/server6.log" | cut -d' ' -f2)
        nbdcopy "$WORK/src.img" "nbd://[::1]:$PORT6/disk"
        nbdcopy "nbd://[::1]:$PORT6/disk" "$WORK/back-tcp6.img"
        cmp "$WORK/src.img" "$WORK/back-tcp6.img" || fail "TCP/IPv6 round trip differs"
        kill -INT $SERVER_PID; wait $SERVER_PID; SERVER_PID=""
else
        echo "note: no IPv6 loopback here; IPv6 part not run"
fi
echo "ok"
