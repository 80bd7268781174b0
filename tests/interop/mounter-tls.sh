#!/usr/bin/env bash
# Secured migration links (TLS 1.3, PSK and certificates) between drafter-mounters. A source with
# a PSK refuses a client with the wrong key and one without TLS; a source with certificates
# refuses a client whose certificate another CA signed, and a client that trusts another CA
# refuses the source. Every refusal happens before any device data moves: a proxy between the
# two counts the bytes (a handshake is a few kB, the device is 16 MiB). Correct peers migrate,
# byte-exact, and the source stays up and serving after each refusal.
. "$(dirname "$0")/lib.sh"
need python3 cmp openssl
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"
HERE=$(dirname "$0")
SIZE=$((16 << 20))
REFUSED_MAX=16384 # bytes a refused client may receive: the handshake and an alert

random_file "$WORK/disk.img" $SIZE 43
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
devices() {
        echo "[{\"name\":\"disk\",\"base\":\"$WORK/$1/base/disk.img\",\"overlay\":\"$WORK/$1/overlay/disk\",\"state\":\"$WORK/$1/state/disk\",\"blockSize\":65536}]"
}

# Keys and certificates: CA one signs the source's and a good client's; CA two signs an outsider's.
umask 077
openssl rand -hex 32 >"$WORK/good.psk"
openssl rand -hex 32 >"$WORK/wrong.psk"
printf 'drafter:%s\n' "$(cat "$WORK/good.psk")" >"$WORK/good-identity.psk"
make_ca() { # name
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=$1" \
                -keyout "$WORK/$1.key" -out "$WORK/$1.pem" 2>/dev/null
}
make_cert() { # name ca
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" \
                -keyout "$WORK/$1.key" -out "$WORK/$1.csr" 2>/dev/null
        openssl x509 -req -in "$WORK/$1.csr" -CA "$WORK/$2.pem" -CAkey "$WORK/$2.key" -CAcreateserial -days 2 \
                -out "$WORK/$1.pem" 2>/dev/null
}
make_ca ca-one
make_ca ca-two
make_cert source ca-one
make_cert client ca-one
make_cert outsider ca-two
umask 022
certs() { echo --tls-cert "$WORK/$1.pem" --tls-key "$WORK/$1.key" --tls-ca "$WORK/$2.pem"; }

PROXY_PORT=$(free_port)
# Wait until a port listens, without connecting (a probe would be one more refused peer).
listening() { for _ in $(seq 1 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.05; done; fail "nothing listens on $1"; }
COUNTS="$WORK/counts"
: >"$COUNTS"
start_source() { # label tls-flags…
        local label=$1
        SOURCE_LABEL=$label
        shift
        SOURCE_PORT=$(free_port)
        umount -l "$WORK/a/mnt" 2>/dev/null || true
        rm -rf "$WORK/a"
        mkdir -p "$WORK/a/base"
        cp "$WORK/disk.img" "$WORK/a/base/"
        "$DRAFTER_MOUNTER" --devices "$(devices a)" --raddr '' --laddr "127.0.0.1:$SOURCE_PORT" \
                --mount-dir "$WORK/a/mnt" "$@" >"$WORK/a-$label.log" 2>&1 &
        A=$!
        on_exit "kill -9 $A 2>/dev/null; umount -l '$WORK/a/mnt' 2>/dev/null"
        for _ in $(seq 1 200); do grep -q "Serving on" "$WORK/a-$label.log" && break; sleep 0.05; done
        grep -q "Serving on" "$WORK/a-$label.log" || { cat "$WORK/a-$label.log"; fail "$label: source did not start"; }
        python3 "$HERE/count-proxy.py" "$PROXY_PORT" "$SOURCE_PORT" "$COUNTS" &
        PROXY=$!
        on_exit "kill $PROXY 2>/dev/null"
        listening "$PROXY_PORT"
}
stop_proxy() { kill $PROXY 2>/dev/null; wait $PROXY 2>/dev/null || true; }
restart_proxy() { # [cut:BYTES]
        stop_proxy
        python3 "$HERE/count-proxy.py" "$PROXY_PORT" "$SOURCE_PORT" "$COUNTS" "$@" &
        PROXY=$!
        on_exit "kill $PROXY 2>/dev/null"
        listening "$PROXY_PORT"
}
last_count() { # the newest connection's server-to-client bytes
        sleep 0.3
        tail -n 1 "$COUNTS" | sed -n 's/.*server_to_client=\([0-9]*\).*/\1/p'
}
# refused label expected-error tls-flags…: the client fails, gets at most a handshake's bytes,
# the source says it refused a peer and goes on serving.
refused() {
        local label=$1 expect=$2
        shift 2
        rm -rf "$WORK/b"
        local before refusals
        before=$(wc -l <"$COUNTS")
        refusals=$(grep -c "refused a peer" "$WORK/a-$SOURCE_LABEL.log" || true)
        local rc=0
        timeout 60 "$DRAFTER_MOUNTER" --devices "$(devices b)" --raddr "127.0.0.1:$PROXY_PORT" --laddr '' \
                --mount-dir "$WORK/b/mnt" "$@" >"$WORK/b-$label.log" 2>&1 || rc=$?
        ((rc != 0)) || { cat "$WORK/b-$label.log"; fail "$label: the client was let in"; }
        grep -q "$expect" "$WORK/b-$label.log" || { cat "$WORK/b-$label.log"; fail "$label: no '$expect' in the client's error"; }
        for _ in $(seq 1 60); do (($(wc -l <"$COUNTS") > before)) && break; sleep 0.1; done
        local got
        (($(wc -l <"$COUNTS") > before)) || fail "$label: the proxy counted no connection"
        got=$(last_count)
        ((got <= REFUSED_MAX)) || fail "$label: the refused client received $got bytes"
        for _ in $(seq 1 50); do (($(grep -c "refused a peer" "$WORK/a-$SOURCE_LABEL.log") > refusals)) && break; sleep 0.1; done
        (($(grep -c "refused a peer" "$WORK/a-$SOURCE_LABEL.log") > refusals)) || { cat "$WORK/a-$SOURCE_LABEL.log"; fail "$label: the source did not log this refusal"; }
        kill -0 $A 2>/dev/null || { cat "$WORK/a-$1.log" 2>/dev/null; fail "$label: the source died"; }
        [[ ! -e "$WORK/b/overlay/disk" || ! -s "$WORK/b/overlay/disk" ]] || fail "$label: the refused client kept a partial device"
        echo "$label: refused, the client received $got bytes ($(grep -m1 -o 'TLS handshake.*\|bad magic.*\|[^:]*the peer.*' "$WORK/b-$label.log" | head -c 160))"
}
migrated() { # label source-label tls-flags…
        local label=$1 source_label=$2
        shift 2
        local secured_before
        secured_before=$(grep -c "Secured the link with" "$WORK/a-$source_label.log" || true)
        rm -rf "$WORK/b"
        "$DRAFTER_MOUNTER" --devices "$(devices b)" --raddr "127.0.0.1:$PROXY_PORT" --laddr '' \
                --mount-dir "$WORK/b/mnt" "$@" >"$WORK/b-$label.log" 2>&1 &
        local B=$!
        on_exit "kill -9 $B 2>/dev/null; umount -l '$WORK/b/mnt' 2>/dev/null"
        wait $A || { cat "$WORK/a-$source_label.log" "$WORK/b-$label.log"; fail "$label: source failed"; }
        for _ in $(seq 1 200); do grep -q "Completed all device migrations" "$WORK/b-$label.log" && break; sleep 0.05; done
        grep -q "Secured the link with" "$WORK/b-$label.log" || fail "$label: the client did not log a secured link"
        (($(grep -c "Secured the link with" "$WORK/a-$source_label.log") > secured_before)) ||
                fail "$label: the source did not log a secured link for this client"
        cmp "$WORK/b/mnt/disk" "$WORK/disk.img" || fail "$label: data differs"
        kill -INT $B
        wait $B || fail "$label: destination exited with an error"
        local got
        got=$(last_count)
        ((got >= SIZE)) || fail "$label: only $got bytes went through the proxy"
        echo "$label: migrated, $got bytes from the source, $(grep -o 'Secured the link with.*' "$WORK/b-$label.log" | head -1)"
        stop_proxy
}

# Bad configurations are refused at start.
rc=0
"$DRAFTER_MOUNTER" --raddr '' --laddr 127.0.0.1:1 --psk-file "$WORK/missing.psk" >"$WORK/bad.log" 2>&1 || rc=$?
((rc == 1)) && grep -q "psk-file $WORK/missing.psk: No such file" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "missing PSK file"; }
echo 1234 >"$WORK/short.psk"
rc=0
"$DRAFTER_MOUNTER" --raddr '' --laddr 127.0.0.1:1 --psk-file "$WORK/short.psk" >"$WORK/bad.log" 2>&1 || rc=$?
((rc == 1)) && grep -q "the key must be 16 to 64 bytes" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "short PSK"; }
rc=0
"$DRAFTER_MOUNTER" --raddr '' --laddr 127.0.0.1:1 --tls-cert "$WORK/source.pem" >"$WORK/bad.log" 2>&1 || rc=$?
((rc == 1)) && grep -q "need all three" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "certificate without key"; }
rc=0
"$DRAFTER_MOUNTER" --raddr '' --laddr 127.0.0.1:1 $(certs source ca-one) --psk-file "$WORK/good.psk" >"$WORK/bad.log" 2>&1 || rc=$?
((rc == 1)) && grep -q "name one" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "PSK and certificates"; }
rc=0
"$DRAFTER_MOUNTER" --raddr '' --laddr 127.0.0.1:1 --tls-cert "$WORK/source.pem" --tls-key "$WORK/client.key" \
        --tls-ca "$WORK/ca-one.pem" >"$WORK/bad.log" 2>&1 || rc=$?
((rc == 1)) && grep -q "tls-key $WORK/client.key" "$WORK/bad.log" || { cat "$WORK/bad.log"; fail "certificate with another's key"; }
echo "bad configurations: refused at start"

# Without TLS the tools warn.
start_source plain
grep -q "neither authenticated nor encrypted" "$WORK/a-plain.log" || fail "no warning without TLS"
kill -INT $A
wait $A || fail "plain source: exit status $?"
stop_proxy

# PSK.
start_source psk --psk-file "$WORK/good.psk"
grep -q "neither authenticated" "$WORK/a-psk.log" && fail "a warning with TLS"
refused psk-wrong-key "TLS handshake" --psk-file "$WORK/wrong.psk"
refused psk-no-tls "bad magic\|closed\|reset\|ended" # a plain client: the source only speaks TLS
grep -q "refused a peer" "$WORK/a-psk.log" || fail "the source did not log the refusals"
# The secured link breaks mid-transfer (after 4 MB): the client fails, the source keeps its devices.
restart_proxy cut:4000000
rm -rf "$WORK/b"
rc=0
timeout 60 "$DRAFTER_MOUNTER" --devices "$(devices b)" --raddr "127.0.0.1:$PROXY_PORT" --laddr '' \
        --mount-dir "$WORK/b/mnt" --psk-file "$WORK/good.psk" >"$WORK/b-cut.log" 2>&1 || rc=$?
((rc == 1)) || { cat "$WORK/b-cut.log"; fail "psk-cut: the cut-off client exited $rc"; }
grep -q "error: .*connection" "$WORK/b-cut.log" || { cat "$WORK/b-cut.log"; fail "psk-cut: no clear error"; }
for _ in $(seq 1 100); do grep -q "Kept the devices" "$WORK/a-psk.log" && break; sleep 0.1; done
grep -q "Kept the devices; serving" "$WORK/a-psk.log" || { cat "$WORK/a-psk.log"; fail "psk-cut: the source did not keep its devices"; }
mountpoint -q "$WORK/b/mnt" && fail "psk-cut: the client left its mount"
echo "psk-cut: link cut after $(last_count) bytes: $(grep -o 'error: .*' "$WORK/b-cut.log" | head -1 | cut -c1-120); the source kept its devices"
restart_proxy
migrated psk-good psk --psk-file "$WORK/good-identity.psk" # the same key, identity spelt out

# Certificates.
start_source cert $(certs source ca-one)
# (TLS 1.3: the client's handshake is over before the source checks its certificate, so the client
# learns it from the source's alert.)
refused cert-signed-by-other-ca "the alert .Certificate is bad." --tls-cert "$WORK/outsider.pem" --tls-key "$WORK/outsider.key" \
        --tls-ca "$WORK/ca-one.pem" # the source refuses it
grep -q "refused the peer's certificate" "$WORK/a-cert.log" || fail "the source did not say why it refused the certificate"
refused cert-trusts-other-ca "refused the peer's certificate" $(certs client ca-two) # it refuses the source
refused cert-no-tls "bad magic\|closed\|reset\|ended"
refused cert-psk-client "TLS handshake" --psk-file "$WORK/good.psk"
migrated cert-good cert $(certs client ca-one)
echo "ok"
