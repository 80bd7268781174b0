#!/usr/bin/env bash
# The seed README's walkthrough end to end, with Redis (Debian's) in place of Valkey:
#   blueprints (DrafterOS + the Redis OCI image) → drafter-packager and --extract → drafter-nat →
#   drafter-snapshotter --netns → drafter-packager (package) and --extract, checksums compared →
#   drafter-peer resume → drafter-forwarder to 127.0.0.1:3333 → redis-cli SET/GET → two
#   copy-on-write instances on namespaces 0 and 1 with different data → live migration 0 → 1
#   while a client writes keys (every acknowledged key must be there afterwards) → then three
#   peers started at once from one drafter-registry behind a 200 Mbit/s link, each answering
#   PING long before its package has arrived (time and bytes printed).
# The namespaces are drafter-nat's with a test prefix instead of "ark", so runs never collide.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/../interop/lib.sh"
need qemu-system-x86_64 python3 ip nft tc ss redis-cli umoci zstd busybox
((EUID == 0)) || { echo "SKIP: needs root (network namespaces)"; exit 77; }
[[ -e /dev/net/tun && -e /dev/fuse ]] || { echo "SKIP: no /dev/net/tun or /dev/fuse"; exit 77; }
: "${DRAFTER_NAT:?}" "${DRAFTER_FORWARDER:?}" "${DRAFTER_SNAPSHOTTER:?}" "${DRAFTER_PEER:?}" "${DRAFTER_PACKAGER:?}"
: "${DRAFTER_REGISTRY:?}" "${DRAFTER_AGENT:?}" "${DRAFTER_LIVENESS:?}"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
P=dr$$ P=${P:0:6}
for port in 3333 4444; do
        ! ss -ltn | grep -q "127.0.0.1:$port " || fail "127.0.0.1:$port is taken: the walkthrough forwards to it"
done
! ip -br addr | grep -q ' 10\.213\.7\.' || fail "10.213.7.0/30 is in use on this host: the registry's link needs it"
forward_before=$(cat /proc/sys/net/ipv4/ip_forward)
on_exit "kill -9 \$(jobs -p) 2>/dev/null; sleep 0.3; ip netns del ${P}reg; ip link del ${P}r0; net_teardown $P $forward_before"
OUT=$WORK/out
mkdir -p "$OUT"
ms() { echo $(($(date +%s%N) / 1000000)); }
step() { echo "== $*"; }
wait_for_line() { # wait_for_line FILE PATTERN SECONDS PID WHAT
        for _ in $(seq 1 $(($3 * 10))); do
                grep -qs "$2" "$1" && return 0
                kill -0 "$4" 2>/dev/null || break
                sleep 0.1
        done
        tail -20 "$1"
        fail "$5"
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

step "blueprints: DrafterOS and the Redis OCI image, packaged and extracted as the seed does"
"$ROOT/guest/build" --agent "$DRAFTER_AGENT" --liveness "$DRAFTER_LIVENESS" --out "$CACHE/blueprint-drafteros" \
        --cache "$CACHE" >"$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; fail "guest/build failed"; }
"$ROOT/guest/oci-image-redis" --out "$WORK/redis-image" >"$WORK/image.log" 2>&1 || { cat "$WORK/image.log"; fail "oci-image-redis failed"; }
"$ROOT/guest/make-oci" --image "oci:$WORK/redis-image:redis" --agent-conf "$ROOT/guest/redis-agent.conf" --out "$WORK/oci-redis.ext4" >>"$WORK/image.log" 2>&1 ||
        { cat "$WORK/image.log"; fail "make-oci --image failed"; }
"$DRAFTER_PACKAGER" --package-path "$OUT/drafteros-oci.tar.zst" --devices "$(pyjson "[{'name':'kernel','path':'$CACHE/blueprint-drafteros/vmlinux'},{'name':'disk','path':'$CACHE/blueprint-drafteros/rootfs.ext4'}]")"
"$DRAFTER_PACKAGER" --package-path "$OUT/oci-redis.tar.zst" --devices "$(pyjson "[{'name':'oci','path':'$WORK/oci-redis.ext4'}]")"
"$DRAFTER_PACKAGER" --package-path "$OUT/drafteros-oci.tar.zst" --extract --devices "$(pyjson "[{'name':'kernel','path':'$OUT/blueprint/vmlinux'},{'name':'disk','path':'$OUT/blueprint/rootfs.ext4'}]")"
"$DRAFTER_PACKAGER" --package-path "$OUT/oci-redis.tar.zst" --extract --devices "$(pyjson "[{'name':'oci','path':'$OUT/blueprint/oci.ext4'}]")"
cmp "$OUT/blueprint/vmlinux" "$CACHE/blueprint-drafteros/vmlinux" && cmp "$OUT/blueprint/oci.ext4" "$WORK/oci-redis.ext4" ||
        fail "the extracted blueprint differs"

step "drafter-nat, and a snapshot of the Redis VM in namespace ${P}0"
make_wan "$P"
start_nat "$P" 3 "$WORK/nat.log"
t=$(ms)
snapshot_in_netns "$OUT/blueprint" "${P}0" "$OUT/package"
echo "snapshot made in $(($(ms) - t)) ms"
ls -ls "$OUT/package"

step "drafter-packager: the package into one archive and back (checksums)"
pkg_devices() { # pkg_devices DIR: the seed's packager devices (oci from the blueprint, as there)
        pyjson "[{'name': n, 'path': ('$OUT/blueprint/oci.ext4' if n == 'oci' and '$1' == '$OUT/package' else '$1/' + f)} for n, f in $PKG_FILES]"
}
t=$(ms)
"$DRAFTER_PACKAGER" --package-path "$OUT/redis.tar.zst" --devices "$(pkg_devices "$OUT/package")"
t_pack=$(($(ms) - t)) t=$(ms)
"$DRAFTER_PACKAGER" --package-path "$OUT/redis.tar.zst" --extract --devices "$(pkg_devices "$OUT/extracted")"
t_unpack=$(($(ms) - t))
cp "$OUT/blueprint/oci.ext4" "$OUT/package/oci.ext4"
(cd "$OUT/package" && sha256sum -- *) >"$WORK/package.sha256"
(cd "$OUT/extracted" && sha256sum -c --quiet "$WORK/package.sha256") || fail "the extracted package differs"
# For experiments by hand: DRAFTER_E2E_KEEP=DIR keeps a copy of the package.
[[ -z "${DRAFTER_E2E_KEEP:-}" ]] || { mkdir -p "$DRAFTER_E2E_KEEP" && cp --sparse=always "$OUT/extracted"/* "$DRAFTER_E2E_KEEP/"; }
echo "package: $(du -sh --apparent-size "$OUT/package" | cut -f1) of devices ($(du -sh "$OUT/package" | cut -f1) on disk) → $(stat -c %s "$OUT/redis.tar.zst") bytes archive in $t_pack ms, extracted in $t_unpack ms, $(du -sh "$OUT/extracted" | cut -f1) on disk; every device's sha256 matches"

peer_devices() { # peer_devices PACKAGE INSTANCE: copy-on-write over the package
        package_peer_devices "$1" "$2" "{'maxDirtyBlocks': 64, 'minCycles': 1, 'maxCycles': 5, 'cycleThrottle': 0}"
}
forward() { # forward NETNS PORT LOG: drafter-forwarder NETNS:6379 → 127.0.0.1:PORT; sets FWD
        "$DRAFTER_FORWARDER" --port-forwards '[{"netns": "'"$1"'", "internalPort": "6379", "protocol": "tcp", "externalAddr": "127.0.0.1:'"$2"'"}]' >"$3" 2>&1 &
        FWD=$!
        wait_for_line "$3" Ready 10 $FWD "drafter-forwarder did not start"
}
redis_ok() { # redis_ok PORT: PING answered within 30 s
        for _ in $(seq 1 300); do
                [[ "$(timeout 2 redis-cli -p "$1" PING 2>/dev/null)" == PONG ]] && return 0
                sleep 0.1
        done
        fail "Redis on 127.0.0.1:$1 does not answer PING"
}

step "drafter-peer: resume instance 0 in ${P}0 (listening for a migration), forward to 127.0.0.1:3333"
MIG=$(free_port)
"$DRAFTER_PEER" --netns "${P}0" --raddr '' --laddr "127.0.0.1:$MIG" --chroot-base-dir "$WORK/vms" \
        --devices "$(peer_devices "$OUT/extracted" "$OUT/instance-0")" >"$WORK/a.out" 2>"$WORK/a.log" &
A=$!
wait_for_line "$WORK/a.log" "Resumed VM" 60 $A "instance 0 did not resume"
grep "Resumed VM" "$WORK/a.log" | sed 's/^[0-9/: ]*/  instance 0: /'
forward "${P}0" 3333 "$WORK/fw0.log"
FWD0=$FWD
redis_ok 3333
[[ "$(redis-cli -p 3333 SET greeting "hello from instance 0")" == OK ]] || fail "SET through the forward"
[[ "$(redis-cli -p 3333 GET greeting)" == "hello from instance 0" ]] || fail "GET through the forward"
echo "  redis-cli -p 3333: SET/GET work"

step "a second copy-on-write instance from the same package in ${P}1, on 127.0.0.1:4444"
"$DRAFTER_PEER" --netns "${P}1" --raddr '' --laddr '' --chroot-base-dir "$WORK/vms" \
        --devices "$(peer_devices "$OUT/extracted" "$OUT/instance-1")" >"$WORK/c.out" 2>"$WORK/c.log" &
C=$!
wait_for_line "$WORK/c.log" "Resumed VM" 60 $C "instance 1 did not resume"
forward "${P}1" 4444 "$WORK/fw1.log"
FWD1=$FWD
redis_ok 4444
[[ "$(redis-cli -p 4444 GET greeting)" == "" ]] || fail "instance 1 sees instance 0's key: not independent"
redis-cli -p 4444 SET greeting "hello from instance 1" >/dev/null
[[ "$(redis-cli -p 3333 GET greeting)" == "hello from instance 0" && "$(redis-cli -p 4444 GET greeting)" == "hello from instance 1" ]] ||
        fail "the two instances do not keep their own data"
echo "  two instances, each with its own data"
(cd "$OUT/extracted" && sha256sum -c --quiet "$WORK/package.sha256") || fail "an instance wrote into the package"
kill -INT $FWD1 $C
wait $C || { tail -20 "$WORK/c.log"; fail "instance 1 did not stop cleanly"; }
wait $FWD1 || true

step "live migration of instance 0 (${P}0) to a peer in ${P}1 while a client writes keys"
"$ROOT/scripts/redis-keys" write 3333 >"$WORK/client.log" 2>&1 &
CLIENT=$!
sleep 1.5
"$DRAFTER_PEER" --netns "${P}1" --raddr "127.0.0.1:$MIG" --laddr '' --chroot-base-dir "$WORK/vms" \
        --devices "$(peer_devices "$OUT/instance-b/package" "$OUT/instance-b")" >"$WORK/b.out" 2>"$WORK/b.log" &
B=$!
timeout 120 tail --pid=$A -f /dev/null || fail "instance 0 did not hand over"
wait $A || { tail -20 "$WORK/a.log" "$WORK/b.log"; fail "the migration failed"; }
wait_for_line "$WORK/b.log" "Resumed VM" 30 $B "the destination did not resume"
kill -INT $FWD0
wait $FWD0 || true
forward "${P}1" 3333 "$WORK/fw0b.log"
FWD0=$FWD
sleep 1.5
kill $CLIENT
wait $CLIENT 2>/dev/null || true
acked=$(grep -c ' ack ' "$WORK/client.log")
((acked > 50)) || fail "only $acked writes were acknowledged"
checked=$("$ROOT/scripts/redis-keys" check 3333 "$WORK/client.log") || fail "acknowledged keys are missing after the migration"
echo "  $checked"
grep "Resumed VM" "$WORK/b.log" | sed 's/^[0-9/: ]*/  destination: /'
[[ "$(redis-cli -p 3333 GET greeting)" == "hello from instance 0" ]] || fail "instance 0's first key did not survive"
kill -INT $FWD0 $B
wait $B || { tail -20 "$WORK/b.log"; fail "the destination did not stop cleanly"; }
wait $FWD0 || true

step "drafter-registry: three peers at once from one package behind a 200 Mbit/s link"
# The registry in its own namespace, reached over a veth shaped with tbf both ways.
ip netns add "${P}reg"
ip link add "${P}r0" type veth peer name "${P}r1"
ip link set "${P}r1" netns "${P}reg"
ip addr add 10.213.7.1/30 dev "${P}r0" && ip link set "${P}r0" up
ip -n "${P}reg" addr add 10.213.7.2/30 dev "${P}r1" && ip -n "${P}reg" link set "${P}r1" up && ip -n "${P}reg" link set lo up
tc qdisc add dev "${P}r0" root tbf rate 200mbit burst 250000b latency 10ms
tc -n "${P}reg" qdisc add dev "${P}r1" root tbf rate 200mbit burst 250000b latency 10ms
REG_PORT=1337
# 16 KiB memory blocks on both sides (they must match): a resumed VM's first touches are scattered,
# and each fetches one block (docs/performance.md, drafter-registry).
small_memory_blocks() { python3 -c 'import json, sys
d = json.loads(sys.argv[1])
for x in d:
    if x["name"] == "memory": x["blockSize"] = 16384
print(json.dumps(d))' "$1"; }
ip netns exec "${P}reg" "$DRAFTER_REGISTRY" --laddr "10.213.7.2:$REG_PORT" \
        --devices "$(small_memory_blocks "$(package_peer_devices "$OUT/extracted" "$WORK/unused")")" >"$WORK/reg.out" 2>"$WORK/reg.log" &
REG=$!
wait_for_line "$WORK/reg.log" Listening 10 $REG "drafter-registry did not start"
pids=()
for i in 0 1 2; do
        "$DRAFTER_PEER" --netns "${P}$i" --raddr "10.213.7.2:$REG_PORT" --laddr '' --chroot-base-dir "$WORK/vms" \
                --devices "$(small_memory_blocks "$(package_peer_devices "$OUT/reg-$i/package" "$OUT/reg-$i")")" >"$WORK/r$i.out" 2>"$WORK/r$i.log" &
        pids+=($!)
done
# Every peer probed at once (every 20 ms): its first PONG's time and its received bytes then.
"$ROOT/scripts/redis-first-pong" "$P" "$REG_PORT" 90 "${pids[@]}" >"$WORK/pong.txt"
answered=()
while read -r i at got; do
        [[ $at != - ]] || { for f in "$WORK"/r?.log "$WORK/reg.log"; do echo "--- $f"; tail -n 15 "$f"; done; fail "peer $i's Redis did not answer"; }
        answered[i]="$at $got" # ms since the prober started, right after the peers
        echo "  peer $i (${P}$i): PONG after $at ms, $got bytes received by then"
done <"$WORK/pong.txt"
total_bytes=$(($(du -b --apparent-size -c "$OUT/extracted"/* | tail -1 | cut -f1)))
data_bytes=$(($(du -B1 -c "$OUT/extracted"/* | tail -1 | cut -f1)))
for i in 0 1 2; do
        wait_for_line "$WORK/reg.log" "peer .*: sent the whole package" 120 $REG "the registry did not finish a peer"
done
for _ in $(seq 1 1200); do (($(grep -c 'sent the whole package' "$WORK/reg.log") == 3)) && break; sleep 0.1; done
(($(grep -c 'sent the whole package' "$WORK/reg.log") == 3)) || { cat "$WORK/reg.log"; fail "the registry did not send all three packages"; }
sed -n 's/^[0-9/: ]*\(peer [0-9]*: sent the whole package.*\)/  registry: \1/p' "$WORK/reg.log"
# Each peer's whole transfer, as the registry counted it (the smallest of the three).
sent=$(sed -n 's/.*sent the whole package in [0-9]* ms: .*, \([0-9.]*\) MB,.*/\1/p' "$WORK/reg.log" | sort -n | head -1)
sent_bytes=$(python3 -c "print(int(float('$sent') * 1e6))")
echo "  package: $total_bytes bytes of devices, $data_bytes allocated; each peer was sent $sent_bytes bytes in all"
for i in 0 1 2; do
        read -r at got <<<"${answered[$i]}"
        ((got > 0)) || fail "could not read peer $i's received bytes from ss"
        # Lazy: Redis answers with most of its package still on the way (bench-registry: 24-25 %).
        ((got * 100 < sent_bytes * 50)) || fail "peer $i had received $got of $sent_bytes bytes before Redis answered: not lazy enough"
        echo "  peer $i: first PONG with $((got * 100 / sent_bytes))% of its package received"
done
for i in 0 1 2; do redis-cli -h "$(cat "/run/drafter/netns/${P}$i")" SET who "peer $i" >/dev/null; done
for i in 0 1 2; do
        [[ "$(redis-cli -h "$(cat "/run/drafter/netns/${P}$i")" GET who)" == "peer $i" ]] || fail "peer $i's data"
done
kill -INT "${pids[@]}"
for p in "${pids[@]}"; do wait "$p" || fail "a registry peer did not stop cleanly"; done
kill -INT $REG
wait $REG || { cat "$WORK/reg.log"; fail "drafter-registry exited with $?"; }
grep -q "Stopping: 3 peers served, 0 failed" "$WORK/reg.log" || { cat "$WORK/reg.log"; fail "registry summary"; }
kill -INT $NAT
wait $NAT || fail "drafter-nat exited with $?"
! pgrep -f "qemu-system-x86_64.*$WORK" >/dev/null || fail "QEMU processes left behind"
echo "walkthrough: ok"
