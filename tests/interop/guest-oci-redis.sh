#!/usr/bin/env bash
# OCI blueprints: an OCI image of Debian's Redis (guest/oci-image-redis) becomes oci.ext4 with
# `make-oci --image oci:LAYOUT:redis`, and DrafterOS (guest/build, booted under QEMU as
# guest-boot does) runs it with crun. QEMU's user network gives the guest its Drafter address
# 172.16.0.2/30 (gateway 172.16.0.1) and forwards a free host loopback port to 172.16.0.2:6379:
# after "Ready to accept connections" on the console, redis-cli must get PONG, OK and the value
# back. Without booting: the same image as a docker-archive and an oci-archive (skopeo copy)
# gives the same process.args, --app-cmd and --agent-conf work with --image, and bad REFs (no
# layout, unknown tag, unknown transport, corrupt archive) fail naming the REF and leave no file.
# The blueprint is cached in $DRAFTER_GUEST_CACHE (default /var/tmp/drafter-guest-cache);
# $DRAFTER_AGENT / $DRAFTER_LIVENESS are the guest binaries (the host's static busybox when unset).
# This test starts no drafter-expose server, so it also runs outside meson (lib.sh wants the variable).
export DRAFTER_EXPOSE=${DRAFTER_EXPOSE:-unused}
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
need qemu-system-x86_64 python3 busybox crun apt-get dpkg-deb depmod mkfs.ext4 debugfs umoci skopeo redis-cli
[[ -x /usr/bin/redis-check-rdb ]] || { echo "SKIP: redis-tools is not installed (/usr/bin/redis-check-rdb)"; exit 77; }

SRC=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${DRAFTER_GUEST_CACHE:-/var/tmp/drafter-guest-cache}
AGENT=${DRAFTER_AGENT:-$(command -v busybox)}
LIVENESS=${DRAFTER_LIVENESS:-$(command -v busybox)}
BLUEPRINT=$CACHE/blueprint-guest-oci-redis
TIMEOUT=90

# config_of EXT4 KEY: process.KEY of the bundle's config.json in EXT4, as JSON.
config_of() {
        debugfs -R 'cat /config.json' "$1" 2>/dev/null |
                python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["process"][sys.argv[1]]))' "$2"
}

# ---- the image and its oci.ext4 ----
"$SRC/guest/oci-image-redis" --out "$WORK/layout" --tag redis || fail "oci-image-redis failed"
umoci stat --image "$WORK/layout:redis" >/dev/null || fail "umoci cannot read the Redis image"
"$SRC/guest/make-oci" --image "oci:$WORK/layout:redis" --out "$WORK/oci.ext4" || fail "make-oci --image oci: failed"
args=$(config_of "$WORK/oci.ext4" args) || fail "oci.ext4 has no readable /config.json"
want='["/usr/bin/redis-server", "--bind", "0.0.0.0", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no", "--dir", "/data", "--daemonize", "no"]'
[[ "$args" == "$want" ]] || fail "process.args is $args, not $want"
[[ "$(config_of "$WORK/oci.ext4" cwd)" == '"/data"' ]] || fail "process.cwd is not /data"
[[ "$(config_of "$WORK/oci.ext4" terminal)" == false ]] || fail "process.terminal is not false"
debugfs -R 'cat /config.json' "$WORK/oci.ext4" 2>/dev/null | python3 -c '
import json, sys
c = json.load(sys.stdin)
types = [ns["type"] for ns in c["linux"]["namespaces"]]
assert "network" not in types and "user" not in types, types
assert c["root"]["readonly"] is False, c["root"]
' || fail "config.json keeps a network or user namespace, or a read-only root"
for f in /rootfs/usr/bin/redis-server /rootfs/usr/bin/redis-check-rdb /rootfs/bin/sh /rootfs/lib64/ld-linux-x86-64.so.2 /rootfs/data; do
        debugfs -R "stat $f" "$WORK/oci.ext4" 2>/dev/null | grep -q '^Inode:' || fail "oci.ext4 has no $f"
done

# ---- the same image through the archive transports, --app-cmd and --agent-conf ----
skopeo --insecure-policy copy -q "oci:$WORK/layout:redis" "docker-archive:$WORK/redis-docker.tar" ||
        fail "skopeo cannot write a docker-archive"
"$SRC/guest/make-oci" --image "docker-archive:$WORK/redis-docker.tar" --out "$WORK/oci-docker.ext4" ||
        fail "make-oci --image docker-archive: failed"
[[ "$(config_of "$WORK/oci-docker.ext4" args)" == "$want" ]] || fail "the docker-archive gives other process.args"
skopeo --insecure-policy copy -q "oci:$WORK/layout:redis" "oci-archive:$WORK/redis-oci.tar:redis" ||
        fail "skopeo cannot write an oci-archive"
"$SRC/guest/make-oci" --image "oci-archive:$WORK/redis-oci.tar:redis" --out "$WORK/oci-archive.ext4" ||
        fail "make-oci --image oci-archive: failed"
[[ "$(config_of "$WORK/oci-archive.ext4" args)" == "$want" ]] || fail "the oci-archive gives other process.args"
printf 'DRAFTER_AFTER_RESUME_CMD="echo resumed"\n' >"$WORK/agent.conf"
"$SRC/guest/make-oci" --image "oci:$WORK/layout" --app-cmd 'echo hi' --agent-conf "$WORK/agent.conf" \
        --out "$WORK/oci-cmd.ext4" || fail "make-oci --image with --app-cmd and --agent-conf failed"
[[ "$(config_of "$WORK/oci-cmd.ext4" args)" == '["/bin/sh", "-c", "echo hi"]' ]] || fail "--app-cmd did not replace process.args"
debugfs -R 'cat /agent.conf' "$WORK/oci-cmd.ext4" 2>/dev/null | cmp -s - "$WORK/agent.conf" || fail "/agent.conf is not the --agent-conf file"

# ---- bad REFs fail, name the REF, and leave nothing behind ----
head -c 4096 /dev/urandom >"$WORK/corrupt.tar"
mkdir "$WORK/bad"
for ref in oci:/nonexistent:redis bogus:x "oci:$WORK/layout:nosuchtag" "docker-archive:$WORK/corrupt.tar" \
        "oci-archive:$WORK/corrupt.tar" "docker-archive:$WORK/nonexistent.tar"; do
        if "$SRC/guest/make-oci" --image "$ref" --out "$WORK/bad/oci.ext4" 2>"$WORK/bad.err"; then
                fail "make-oci --image $ref succeeded"
        fi
        grep -qF -- "$ref" "$WORK/bad.err" || { cat "$WORK/bad.err" >&2; fail "the error for $ref does not name it"; }
        [[ -z "$(ls -A "$WORK/bad")" ]] || fail "make-oci --image $ref left $(ls -A "$WORK/bad")"
        echo "rejected $ref: $(tail -n 1 "$WORK/bad.err")"
done

# ---- boot it ----
"$SRC/guest/build" --agent "$AGENT" --liveness "$LIVENESS" --cache "$CACHE" --out "$BLUEPRINT" ||
        fail "guest/build failed"
"$SRC/guest/kernel-bundle-split" "$BLUEPRINT/vmlinux" "$WORK" || fail "kernel-bundle-split failed"
cp --sparse=always "$BLUEPRINT/rootfs.ext4" "$WORK/rootfs.ext4"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

boot_raw_qemu "user,id=net0,restrict=on,net=172.16.0.0/30,host=172.16.0.1,dhcpstart=172.16.0.2,hostfwd=tcp:127.0.0.1:$port-172.16.0.2:6379"
elapsed() { echo "$((($(date +%s%N) - start_ns) / 1000000))"; } # ms since QEMU started

welcome_ms='' ready_ms=''
deadline=$(($(date +%s) + TIMEOUT))
while :; do
        if [[ -z "$welcome_ms" ]] && grep -q '^Welcome to DrafterOS' "$WORK/console.log" 2>/dev/null; then
                welcome_ms=$(elapsed)
        fi
        if grep -q 'Ready to accept connections' "$WORK/console.log" 2>/dev/null; then
                ready_ms=$(elapsed)
                break
        fi
        if grep -q 'the OCI app exited' "$WORK/console.log" 2>/dev/null; then show_console; fail "Redis (crun) exited"; fi
        kill -0 "$QEMU_PID" 2>/dev/null || { show_console; fail "QEMU exited before Redis was ready"; }
        (($(date +%s) < deadline)) || { show_console; fail "Redis was not ready within ${TIMEOUT}s"; }
        sleep 0.05
done
grep -q '^drafter-init: eth0 172.16.0.2/30 up' "$WORK/console.log" || { show_console; fail "eth0 was not configured"; }
if grep -q 'FATAL' "$WORK/console.log"; then show_console; fail "the initramfs reported a fatal error"; fi

cli() { timeout 10 redis-cli -h 127.0.0.1 -p "$port" "$@"; }
pong=''
for _ in $(seq 1 100); do
        pong=$(cli PING 2>/dev/null) && [[ "$pong" == PONG ]] && break
        sleep 0.1
done
[[ "$pong" == PONG ]] || { show_console; fail "PING through 127.0.0.1:$port gave '$pong', not PONG"; }
[[ "$(cli SET k v)" == OK ]] || { show_console; fail "SET k v did not answer OK"; }
[[ "$(cli GET k)" == v ]] || { show_console; fail "GET k did not return v"; }
[[ "$(cli INFO server | tr -d '\r' | sed -n 's/^redis_version://p')" =~ ^[0-9] ]] || fail "INFO server has no redis_version"
kill -0 "$QEMU_PID" 2>/dev/null || { show_console; fail "QEMU exited"; }

printf 'boot: "Welcome to DrafterOS" after %d.%03d s, Redis "Ready to accept connections" after %d.%03d s (QEMU TCG, from launch)\n' \
        $((welcome_ms / 1000)) $((welcome_ms % 1000)) $((ready_ms / 1000)) $((ready_ms % 1000))
echo "ok"
