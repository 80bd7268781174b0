# common.sh — helpers shared by guest/build and guest/make-oci (sourced, not run).
# The caller sets PROG (the name messages start with) and `set -euo pipefail`.

log() { echo "$PROG: $*"; }
die() {
        echo "$PROG: error: $*" >&2
        exit 1
}

need_tools() {
        local tool
        for tool in "$@"; do
                command -v "$tool" >/dev/null ||
                        die "$tool is not installed (scripts/install-deps installs what the guest build needs)"
        done
}

# static_busybox: print the path of the host's busybox after checking it is statically linked
# (busybox-static), since it is copied into guests that have no shared libraries for it.
static_busybox() {
        local busybox
        busybox=$(command -v busybox) || die "busybox is not installed (Debian package busybox-static)"
        busybox=$(readlink -f "$busybox")
        if ldd "$busybox" >/dev/null 2>&1; then
                die "$busybox is dynamically linked; install Debian's busybox-static"
        fi
        echo "$busybox"
}

# install_busybox BUSYBOX ROOT: /bin/busybox plus a symlink for every applet at the path busybox
# itself lists (bin/sh, sbin/ip, usr/bin/awk, …); existing files in ROOT are left alone.
install_busybox() {
        local busybox=$1 root=$2 applet
        mkdir -p "$root/bin"
        cp "$busybox" "$root/bin/busybox"
        chmod 0755 "$root/bin/busybox"
        while read -r applet; do
                applet=${applet#/}
                [[ -n "$applet" && "$applet" == */* ]] || continue # skips linuxrc
                [[ -e "$root/$applet" || -L "$root/$applet" ]] && continue
                mkdir -p "$root/$(dirname "$applet")"
                ln -s /bin/busybox "$root/$applet"
        done < <("$busybox" --list-full)
}

# make_ext4 DIR FILE LABEL MIN_MIB: an ext4 image of DIR's contents written without mounting
# (mkfs.ext4 -d), MIN_MIB or twice the contents plus 16 MiB, whichever is larger, in whole MiB.
# Ownership comes from DIR's files (root-owned when built as root); the image root is 0:0.
make_ext4() {
        local dir=$1 file=$2 label=$3 min_mib=$4 content_kib size_mib
        content_kib=$(du -sk --apparent-size "$dir" | cut -f1)
        size_mib=$(((content_kib * 2 + 1023) / 1024 + 16))
        ((size_mib >= min_mib)) || size_mib=$min_mib
        : >"$file" # an existing file, so mkfs does not announce creating one
        mkfs.ext4 -q -F -b 4096 -m 0 -L "$label" -E root_owner=0:0 -d "$dir" "$file" "${size_mib}M" ||
                die "mkfs.ext4 could not build $file from $dir"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }
