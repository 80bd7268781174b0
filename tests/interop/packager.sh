#!/usr/bin/env bash
# drafter-packager against GNU tar and zstd(1): round trips both ways (checksums), a 1 GiB
# mostly-zero memory device packed small and extracted sparse, and hostile or broken input —
# truncated and corrupted archives, path-escaping, absolute and symlink entries, a missing
# device, a device listed twice, an unwritable output directory, SIGINT mid-pack — each with a
# clear error, the old outputs untouched and no temporary file left behind.
# shellcheck source=tests/interop/lib.sh
. "$(dirname "$0")/lib.sh"
need tar zstd python3 sha256sum
: "${DRAFTER_PACKAGER:?run through meson test}"
P=$DRAFTER_PACKAGER
cd "$WORK"

devices() { # devices DIR: the --devices JSON of a package in DIR
        printf '[{"name":"state","path":"%s/state.bin"},{"name":"memory","path":"%s/memory.bin"},' "$1" "$1"
        printf '{"name":"kernel","path":"%s/vmlinux"},{"name":"disk","path":"%s/rootfs.ext4"},' "$1" "$1"
        printf '{"name":"config","path":"%s/config.json"}]' "$1"
}
sums() { (cd "$1" && sha256sum state.bin memory.bin vmlinux rootfs.ext4 config.json); }
no_temporaries() { # no_temporaries DIR…: nothing named .something.XXXXXX was left
        local left
        left=$(find "$@" -name '.*.??????' 2>/dev/null || true)
        [[ -z "$left" ]] || fail "temporary files left behind: $left"
}
expect_failure() { # expect_failure PATTERN CMD…: fails, and stderr matches PATTERN
        local pattern=$1
        shift
        if "$@" 2>"$WORK/err.log"; then fail "succeeded, should have failed: $*"; fi
        grep -Eq "$pattern" "$WORK/err.log" || { cat "$WORK/err.log" >&2; fail "error does not match /$pattern/: $*"; }
        echo "refused as expected: $(grep -E "$pattern" "$WORK/err.log" | head -1 | sed 's/^[0-9/]* [0-9:]* //')"
}

# A package: 1 GiB memory that is zeros but for 4 MiB written (not holes: zero data, as a VM's
# snapshot writes it), a 48 MiB disk of mixed data, a kernel, state and config.
mkdir src
random_file src/state.bin 300000 1
random_file src/vmlinux 2000000 2
truncate -s 1G src/memory.bin
dd if=/dev/zero of=src/memory.bin bs=1M count=256 conv=notrunc status=none
python3 - src/memory.bin <<'PY'
import random, sys
r = random.Random(3)
with open(sys.argv[1], "r+b") as f:
    for i in range(64):  # 64 KiB of noise at 64 scattered places
        f.seek(r.randrange(0, (1 << 30) - 65536) & ~4095)
        f.write(r.randbytes(65536))
PY
python3 -c 'import sys,random; r=random.Random(4); sys.stdout.buffer.write(b"".join((r.randbytes(4096) if i%3==0 else bytes([i%251])*4096) for i in range(12288)))' >src/rootfs.ext4
echo '{"backend":"qemu","memory":1073741824}' >src/config.json

"$P" --help 2>&1 | grep -q -- '-package-path string' || fail "--help does not list -package-path"
"$P" --package-path pkg.tar.zst --devices "$(devices src)" 2>pack.log || { cat pack.log >&2; fail "packing failed"; }
cat pack.log
size=$(stat -c %s pkg.tar.zst)
echo "package: $size bytes for 1.05 GiB of devices"
((size < 40 * 1024 * 1024)) || fail "the archive is $size bytes: zeros were not left out"
"$P" --extract --package-path pkg.tar.zst --devices "$(devices out)" 2>extract.log || { cat extract.log >&2; fail "extraction failed"; }
cat extract.log
diff <(sums src) <(sums out) || fail "extracted devices differ from the originals"
allocated=$(($(stat -c %b out/memory.bin) * 512))
echo "memory.bin extracted: $(stat -c %s out/memory.bin) bytes, $allocated allocated"
((allocated < 16 * 1024 * 1024)) || fail "memory.bin was extracted with $allocated bytes allocated: not sparse"

# Interop: GNU tar reads ours (pax sparse entries); we read GNU tar's (no sparse map, plain zeros).
mkdir gnu
tar -I zstd -xf pkg.tar.zst -C gnu
for f in state:state.bin memory:memory.bin kernel:vmlinux disk:rootfs.ext4 config:config.json; do
        cmp "gnu/${f%%:*}" "src/${f#*:}" || fail "GNU tar extracts entry ${f%%:*} differently"
done
(cd src && tar -I 'zstd -T0' -cf ../gnu.tar.zst --transform 's/state.bin/state/;s/memory.bin/memory/;s/vmlinux/kernel/;s/rootfs.ext4/disk/;s/config.json/config/' \
        state.bin memory.bin vmlinux rootfs.ext4 config.json)
"$P" --extract --package-path gnu.tar.zst --devices "$(devices fromgnu)" 2>/dev/null || fail "cannot extract GNU tar's archive"
diff <(sums src) <(sums fromgnu) || fail "GNU tar's archive extracts differently"
allocated=$(($(stat -c %b fromgnu/memory.bin) * 512))
((allocated < 16 * 1024 * 1024)) || fail "memory.bin from GNU tar's archive is not sparse ($allocated bytes allocated)"
echo "GNU tar archive extracted, memory.bin $allocated bytes allocated"
# An archive we pack from files with holes (the copy above is sparse).
"$P" --package-path sparse.tar.zst --devices "$(devices out)" 2>/dev/null || fail "packing sparse files failed"
cmp <("$P" --extract --package-path sparse.tar.zst --devices '[{"name":"memory","path":"m2"}]' 2>/dev/null && cat m2) src/memory.bin ||
        fail "sparse input round trip differs"

# ---- bad input: the previous outputs stay as they were, nothing half-written appears ----
mkdir keep
echo old >keep/memory.bin
keep='[{"name":"memory","path":"keep/memory.bin"},{"name":"state","path":"keep/new/state.bin"}]'
check_kept() {
        [[ "$(cat keep/memory.bin)" == old ]] || fail "a failed extraction changed keep/memory.bin"
        [[ ! -e keep/new ]] || fail "a failed extraction left the directory keep/new"
        no_temporaries keep
}
head -c $((size / 2)) pkg.tar.zst >truncated.tar.zst
expect_failure 'truncated' "$P" --extract --package-path truncated.tar.zst --devices "$keep"
check_kept
head -c $((size - 3)) pkg.tar.zst >truncated-end.tar.zst
expect_failure 'truncated|corrupt' "$P" --extract --package-path truncated-end.tar.zst --devices "$keep"
check_kept
for at in 200 $((size / 3)) $((size - 20)); do
        cp pkg.tar.zst flipped.tar.zst
        python3 -c 'import sys; f=open(sys.argv[1],"r+b"); f.seek(int(sys.argv[2])); b=f.read(1); f.seek(int(sys.argv[2])); f.write(bytes([b[0]^0x5a]))' flipped.tar.zst "$at"
        expect_failure 'corrupt|checksum|truncated|bad entry|not a' "$P" --extract --package-path flipped.tar.zst --devices "$keep"
        check_kept
done
hostile() { # hostile NAME KIND: a tar.zst with one such entry beside a good "memory"
        python3 - "$1" "$2" <<'PY'
import io, sys, tarfile
name, kind = sys.argv[1], sys.argv[2]
with tarfile.open("hostile.tar", "w", format=tarfile.PAX_FORMAT) as t:
    data = b"x" * 1000
    good = tarfile.TarInfo("memory"); good.size = len(data); t.addfile(good, io.BytesIO(data))
    bad = tarfile.TarInfo(name)
    if kind == "symlink":
        bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(bad)
    elif kind == "hardlink":
        bad.type, bad.linkname = tarfile.LNKTYPE, "memory"
        t.addfile(bad)
    else:
        bad.size = len(data); t.addfile(bad, io.BytesIO(data))
PY
        zstd -q -f hostile.tar -o hostile.tar.zst
}
hostile ../x file
expect_failure '"\.\./x" is not a device name' "$P" --extract --package-path hostile.tar.zst --devices "$keep"
check_kept
[[ ! -e ../x && ! -e "$WORK/../x" ]] || fail "../x was written"
hostile /etc/drafter-test-escape file
expect_failure 'not a device name' "$P" --extract --package-path hostile.tar.zst --devices "$keep"
check_kept
[[ ! -e /etc/drafter-test-escape ]] || fail "an absolute entry was written"
hostile state symlink
expect_failure 'entry state is a symbolic link' "$P" --extract --package-path hostile.tar.zst --devices "$keep"
check_kept
hostile state hardlink
expect_failure 'entry state is a hard link' "$P" --extract --package-path hostile.tar.zst --devices "$keep"
check_kept
hostile memory file # the same device twice
expect_failure 'entry memory appears twice' "$P" --extract --package-path hostile.tar.zst --devices "$keep"
check_kept
expect_failure 'device oci is not in the archive' "$P" --extract --package-path pkg.tar.zst \
        --devices '[{"name":"memory","path":"keep/memory.bin"},{"name":"oci","path":"keep/new/oci.ext4"}]'
check_kept
expect_failure 'listed twice|duplicate' "$P" --extract --package-path pkg.tar.zst \
        --devices '[{"name":"memory","path":"keep/memory.bin"},{"name":"memory","path":"keep/m2"}]'
check_kept
expect_failure 'limit' "$P" --extract --package-path pkg.tar.zst --max-device-size 1000000 --devices "$keep"
check_kept
expect_failure 'not-there.tar.zst: No such file' "$P" --extract --package-path not-there.tar.zst --devices "$keep"
echo 'not an archive at all' >text.tar.zst
expect_failure 'corrupt|not a' "$P" --extract --package-path text.tar.zst --devices "$keep"
check_kept
expect_failure 'memory.*missing.bin: No such file' "$P" --package-path never.tar.zst \
        --devices '[{"name":"memory","path":"missing.bin"}]'
[[ ! -e never.tar.zst ]] || fail "a failed pack left an archive"
no_temporaries .

# An unwritable output directory (root ignores modes: a read-only mount).
mkdir ro
mount -t tmpfs -o ro,size=1m tmpfs ro
on_exit "umount '$WORK/ro'"
expect_failure 'cannot write ro/memory.bin: Read-only file system' "$P" --extract --package-path pkg.tar.zst \
        --devices '[{"name":"memory","path":"ro/memory.bin"}]'
expect_failure 'cannot write ro/p.tar.zst: Read-only file system' "$P" --package-path ro/p.tar.zst --devices "$(devices src)"
# A full file system mid-extraction: the partial copy is removed.
mkdir small
mount -t tmpfs -o size=2m tmpfs small
on_exit "umount '$WORK/small'"
expect_failure 'No space left on device' "$P" --extract --package-path pkg.tar.zst \
        --devices '[{"name":"disk","path":"small/rootfs.ext4"}]'
no_temporaries small
[[ -z "$(ls -A small)" ]] || fail "a failed extraction left files in small/: $(ls -A small)"

# SIGINT while packing (slow: text at level 19): no archive, no temporary file.
head -c $((72 * 1024 * 1024)) /dev/urandom | base64 -w0 >big.bin
echo old-archive >int.tar.zst
"$P" --package-path int.tar.zst --compression-level 19 --devices '[{"name":"disk","path":"big.bin"}]' 2>int.log &
pid=$!
sleep 1
kill -INT "$pid"
if wait "$pid"; then fail "an interrupted pack succeeded (too fast? see int.log)"; fi
grep -q interrupted int.log || { cat int.log >&2; fail "no 'interrupted' message"; }
[[ "$(cat int.tar.zst)" == old-archive ]] || fail "an interrupted pack replaced the archive"
no_temporaries .
echo "SIGINT: $(tail -1 int.log | sed 's/^[0-9/]* [0-9:]* //')"
echo "packager: all checks passed"
