#!/usr/bin/env bash
# drafter-mounter over TCP, IPv4 and IPv6 loopback: A serves, B takes the devices over, byte-exact.
. "$(dirname "$0")/lib.sh"
need python3 cmp
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"

random_file "$WORK/disk.img" $((6 << 20)) 41
free_port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET); s.bind((sys.argv[1],0)); print(s.getsockname()[1])' "$1"; }
devices() {
        echo "[{\"name\":\"disk\",\"base\":\"$WORK/$1/base/disk.img\",\"overlay\":\"$WORK/$1/overlay/disk\",\"state\":\"$WORK/$1/state/disk\",\"blockSize\":65536}]"
}
family_run() { # host-as-in-address label
        local laddr="$1:$(free_port "${1//[\[\]]/}")" label=$2
        rm -rf "$WORK/a" "$WORK/b"
        mkdir -p "$WORK/a/base"
        cp "$WORK/disk.img" "$WORK/a/base/"
        "$DRAFTER_MOUNTER" --devices "$(devices a)" --raddr '' --laddr "$laddr" --mount-dir "$WORK/a/mnt" >"$WORK/a-$label.log" 2>&1 &
        local A=$!
        on_exit "kill -9 $A 2>/dev/null; umount -l '$WORK/a/mnt' 2>/dev/null"
        "$DRAFTER_MOUNTER" --devices "$(devices b)" --raddr "$laddr" --laddr '' --mount-dir "$WORK/b/mnt" >"$WORK/b-$label.log" 2>&1 &
        local B=$!
        on_exit "kill -9 $B 2>/dev/null; umount -l '$WORK/b/mnt' 2>/dev/null"
        wait $A || { cat "$WORK/a-$label.log" "$WORK/b-$label.log"; fail "$label: source failed"; }
        for _ in $(seq 1 200); do grep -q "Completed all device migrations" "$WORK/b-$label.log" && break; sleep 0.05; done
        cmp "$WORK/b/mnt/disk" "$WORK/disk.img" || fail "$label: data differs"
        kill -INT $B
        wait $B || fail "$label: destination exited with an error"
        echo "$label: $(grep -h 'Completed all device migrations (' "$WORK/a-$label.log" | cut -d' ' -f3-)"
}
family_run 127.0.0.1 ipv4
if ip -6 addr show lo 2>/dev/null | grep -q '::1'; then
        family_run '[::1]' ipv6
else
        echo "note: no IPv6 loopback here; IPv6 part not run"
fi
echo "ok"
