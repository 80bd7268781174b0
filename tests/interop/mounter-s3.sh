#!/usr/bin/env bash
# S3-assisted device migration with real drafter-mounter processes and a real S3 server (s3rver):
# wrong credentials and a missing bucket fail at start; A syncs its device to S3 while a writer
# changes it, survives S3 going down and resumes uploading when it is back; A→B under writes
# takes most blocks from S3 (bytes over the link vs from S3 printed, the link's share asserted),
# byte-exact; B got the S3 configuration from A and B→C uses S3 again; C→D with S3 down falls
# back to the peer link, byte-exact. Then HTTPS ("s3secure"): with the server's CA the sync
# works; with only the system CAs the start fails naming the certificate.
. "$(dirname "$0")/lib.sh"
need python3 cmp
[[ -e /dev/fuse ]] || { echo "SKIP: no /dev/fuse"; exit 77; }
: "${DRAFTER_MOUNTER:?}"
HERE=$(dirname "$0")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
S3PORT=$(free_port)
start_s3rver "$WORK/s3" "$S3PORT" drafter-test

SIZE=$((32 << 20))
random_file "$WORK/orig.img" $SIZE 77
cp "$WORK/orig.img" "$WORK/expected.img"
devices() { # peer s3sync accesskey bucket
        echo "[{\"name\":\"disk\",\"base\":\"$WORK/$1/base/disk.img\",\"overlay\":\"$WORK/$1/overlay/disk\",\"state\":\"$WORK/$1/state/disk\",\"blockSize\":65536,\"minCycles\":1,\"maxCycles\":3,\"cycleThrottle\":200000000,\"s3sync\":$2,\"s3accesskey\":\"${3:-S3RVER}\",\"s3secretkey\":\"S3RVER\",\"s3endpoint\":\"127.0.0.1:$S3PORT\",\"s3secure\":false,\"s3bucket\":\"${4:-drafter-test}\",\"s3concurrency\":8}]"
}
mkdir -p "$WORK/a/base"
cp "$WORK/orig.img" "$WORK/a/base/disk.img"
wait_log() { # file pattern seconds
        for _ in $(seq 1 $(($3 * 20))); do grep -q "$2" "$1" && return 0; sleep 0.05; done
        cat "$1"
        fail "no \"$2\" in $1 within $3 s"
}
start_mounter() { # name raddr laddr s3sync [accesskey bucket]
        "$DRAFTER_MOUNTER" --devices "$(devices "$1" "$4" "${5:-}" "${6:-}")" --raddr "$2" --laddr "$3" \
                --mount-dir "$WORK/$1/mnt" >"$WORK/$1.log" 2>&1 &
        eval "PID_$1=$!"
        on_exit "kill -9 $! 2>/dev/null; umount -l '$WORK/$1/mnt' 2>/dev/null"
}

# 1. Bad S3 configuration: a clear error at start, nothing served.
mkdir -p "$WORK/x/base"
cp "$WORK/orig.img" "$WORK/x/base/disk.img"
for bad in "WRONGKEY drafter-test|refused the credentials" "S3RVER no-such-bucket|does not exist"; do
        set -- ${bad%%|*}
        start_mounter x '' "127.0.0.1:$(free_port)" true "$1" "$2"
        if wait "$PID_x"; then fail "a mounter with $1/$2 started"; fi
        grep -q "${bad#*|}" "$WORK/x.log" || { cat "$WORK/x.log"; fail "no \"${bad#*|}\" for $1/$2"; }
        ! mountpoint -q "$WORK/x/mnt" 2>/dev/null || fail "mount left behind for $1/$2"
        echo "bad config ($1, $2): $(grep -o 'S3 [^:]*' "$WORK/x.log" | head -1)"
done

# 2. A syncs; S3 goes down while a writer changes the device; S3 comes back.
PORT_A=$(free_port)
start_mounter a '' "127.0.0.1:$PORT_A" true
wait_log "$WORK/a.log" 'is in bucket' 30
grep -h 'is in bucket' "$WORK/a.log"
stop_s3rver
python3 "$HERE/s3-writer.py" "$WORK/a/mnt/disk" "$WORK/expected.img" "$WORK/stop1" $((4 << 20)) 1 >"$WORK/w1.out" &
W=$!
wait_log "$WORK/a.log" 'upload failed, the VM runs on' 30
touch "$WORK/stop1"
wait $W
echo "writes while S3 was down: $(cat "$WORK/w1.out") (all acknowledged)"
start_s3rver "$WORK/s3" "$S3PORT" drafter-test
wait_log "$WORK/a.log" 'uploads resumed' 30
sleep 1.5 # the objects written while S3 was down go up again

# 3. A → B while the writer goes on: most blocks come from S3.
python3 "$HERE/s3-writer.py" "$WORK/a/mnt/disk" "$WORK/expected.img" "$WORK/stop2" $((512 << 10)) 2 >"$WORK/w2.out" &
W=$!
sleep 1
PORT_B=$(free_port)
start_mounter b "127.0.0.1:$PORT_A" "127.0.0.1:$PORT_B" false
wait "$PID_a" || { cat "$WORK/a.log" "$WORK/b.log"; fail "A: migration failed"; }
wait $W
echo "writes during the migration: $(cat "$WORK/w2.out")"
wait_log "$WORK/b.log" 'Completed all device migrations' 30
cmp "$WORK/b/mnt/disk" "$WORK/expected.img" || fail "B: data differs"
line=$(grep -h 'From S3:' "$WORK/b.log")
echo "A→B: $line"
link_mb=$(sed -n 's/.*over the link: \([0-9.]*\) MB.*/\1/p' <<<"$line")
s3_mb=$(sed -n 's/.*From S3: [0-9]* blocks, \([0-9.]*\) MB.*/\1/p' <<<"$line")
python3 -c "import sys; l, s = float(sys.argv[1]), float(sys.argv[2]); sys.exit(0 if l < 0.25 * 33.554432 and s > 0.5 * 33.554432 else 1)" \
        "$link_mb" "$s3_mb" || fail "A→B: $link_mb MB over the link, $s3_mb MB from S3 (want under 25 % / over 50 % of 33.6 MB)"

# 4. B → C: B has no S3 configuration of its own; it came from A.
PORT_C=$(free_port)
sleep 2 # B uploads the objects the link changed
start_mounter c "127.0.0.1:$PORT_B" "127.0.0.1:$PORT_C" false
wait "$PID_b" || { cat "$WORK/b.log" "$WORK/c.log"; fail "B: migration failed"; }
wait_log "$WORK/c.log" 'Completed all device migrations' 30
cmp "$WORK/c/mnt/disk" "$WORK/expected.img" || fail "C: data differs"
line=$(grep -h 'From S3:' "$WORK/c.log") || { cat "$WORK/c.log"; fail "C took nothing from S3"; }
echo "B→C: $line"

# 5. C → D with S3 down: D falls back to the peer link, nothing lost.
stop_s3rver
start_mounter d "127.0.0.1:$PORT_C" '' false
wait "$PID_c" || { cat "$WORK/c.log" "$WORK/d.log"; fail "C: migration failed"; }
wait_log "$WORK/d.log" 'Completed all device migrations' 60
cmp "$WORK/d/mnt/disk" "$WORK/expected.img" || fail "D: data differs"
grep -q 'giving up on S3' "$WORK/d.log" || { cat "$WORK/d.log"; fail "D did not report the S3 failure"; }
echo "C→D (S3 down): $(grep -h 'From S3:' "$WORK/d.log")"
kill -INT "$PID_d"
wait "$PID_d" || fail "D exited with an error"

# 6. HTTPS.
need openssl
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$WORK/key.pem" -out "$WORK/cert.pem" -days 1 \
        -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 >/dev/null 2>&1 || fail "openssl req failed"
S3PORT=$(free_port)
start_s3rver "$WORK/s3tls" "$S3PORT" drafter-test --key "$WORK/key.pem" --cert "$WORK/cert.pem"
mkdir -p "$WORK/t/base"
cp "$WORK/orig.img" "$WORK/t/base/disk.img"
tls_devices() { devices t true | sed 's/"s3secure":false/"s3secure":true/'; }
CURL_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt "$DRAFTER_MOUNTER" --devices "$(tls_devices)" --raddr '' --laddr '' \
        --mount-dir "$WORK/t/mnt" >"$WORK/t0.log" 2>&1 && fail "HTTPS without the CA started"
grep -qi 'certificate\|CA' "$WORK/t0.log" || { cat "$WORK/t0.log"; fail "no certificate error without the CA"; }
echo "https without the CA: $(grep -o 's3: PUT https[^ ]* [^(]*' "$WORK/t0.log" | head -1 | cut -c1-120)"
CURL_CA_BUNDLE=$WORK/cert.pem "$DRAFTER_MOUNTER" --devices "$(tls_devices)" --raddr '' --laddr '' \
        --mount-dir "$WORK/t/mnt" >"$WORK/t.log" 2>&1 &
T=$!
on_exit "kill -9 $T 2>/dev/null; umount -l '$WORK/t/mnt' 2>/dev/null"
wait_log "$WORK/t.log" 'is in bucket' 30
echo "https: $(grep -h 'is in bucket' "$WORK/t.log" | sed 's/^[0-9/: ]*//')"
kill -INT $T
wait $T || fail "the HTTPS mounter exited with an error"
echo "ok"
