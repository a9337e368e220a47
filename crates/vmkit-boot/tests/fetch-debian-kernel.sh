#!/bin/sh
# Fetch Debian's cloud kernel (the package that linux-image-cloud-amd64 depends on),
# extract its bzImage and decompress the ELF vmlinux out of the bzImage payload.
#
# Idempotent: if both files are already cached it only prints their paths.
# Output (stdout, last two lines): the bzImage path, then the vmlinux path.
# Cache: $VMKIT_CACHE_DIR/debian-kernel, default ~/.cache/vmkit/debian-kernel.
#
# Needs: apt-get, apt-cache, dpkg-deb, od, dd, and xz, zstd, lz4 or gzip (whichever the
# kernel's payload uses).
set -eu

cache_root="${VMKIT_CACHE_DIR:-${HOME}/.cache/vmkit}"
dir="${cache_root}/debian-kernel"
bz="${dir}/vmlinuz"
elf="${dir}/vmlinux"

if [ -s "$bz" ] && [ -s "$elf" ]; then
    echo "$bz"
    echo "$elf"
    exit 0
fi

mkdir -p "$dir"
work="$(mktemp -d "${dir}/tmp.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# The meta package depends on the versioned image package, e.g. linux-image-6.1.0-56-cloud-amd64.
pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: *\(linux-image-[^ ]*\).*/\1/p' | head -n 1)"
if [ -z "$pkg" ]; then
    echo "fetch-debian-kernel: cannot resolve the dependency of linux-image-cloud-amd64" \
        "(run 'apt-get update' first?)" >&2
    exit 1
fi

(cd "$work" && apt-get download "$pkg" >&2) || {
    echo "fetch-debian-kernel: 'apt-get download $pkg' failed" >&2
    exit 1
}
deb="$(ls "$work"/*.deb | head -n 1)"
dpkg-deb -x "$deb" "$work/root"
vmlinuz="$(ls "$work"/root/boot/vmlinuz-* | head -n 1)"
if [ ! -s "$vmlinuz" ]; then
    echo "fetch-debian-kernel: no /boot/vmlinuz-* in $deb" >&2
    exit 1
fi

# Setup header: setup_sects at 0x1f1 (u8), payload_offset at 0x248 (u32),
# payload_length at 0x24c (u32). The payload starts at (setup_sects + 1) * 512 + payload_offset.
u8_at() { od -An -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
u32_at() { od -An -t u4 -j "$2" -N 4 "$1" | tr -d ' '; }
setup_sects="$(u8_at "$vmlinuz" 497)"
[ "$setup_sects" -eq 0 ] && setup_sects=4
payload_offset="$(u32_at "$vmlinuz" 584)"
payload_length="$(u32_at "$vmlinuz" 588)"
start=$(( (setup_sects + 1) * 512 + payload_offset ))
if [ "$payload_length" -le 4 ]; then
    echo "fetch-debian-kernel: bzImage payload_length $payload_length is too small" >&2
    exit 1
fi
# The kernel build appends the decompressed size (u32 LE) to the compressed stream
# (scripts/Makefile.lib size_append); strip it so the decompressors see a clean stream,
# and use it to check the result.
dd if="$vmlinuz" of="$work/payload" bs=4096 iflag=skip_bytes,count_bytes \
    skip="$start" count="$((payload_length - 4))" status=none
expected_size="$(u32_at "$vmlinuz" "$((start + payload_length - 4))")"

magic="$(od -An -t x1 -N 6 "$work/payload" | tr -d ' ')"
case "$magic" in
    fd377a585a00) xz -dc < "$work/payload" > "$work/vmlinux" ;;
    28b52ffd*) zstd -dcq < "$work/payload" > "$work/vmlinux" ;;
    # LZ4 legacy frame (what Debian bookworm's 6.1 kernels use).
    02214c18*) lz4 -dcq < "$work/payload" > "$work/vmlinux" ;;
    1f8b*) gzip -dc < "$work/payload" > "$work/vmlinux" ;;
    *)
        echo "fetch-debian-kernel: unknown payload compression (magic $magic)" >&2
        exit 1
        ;;
esac
actual_size="$(wc -c < "$work/vmlinux" | tr -d ' ')"
if [ "$actual_size" -ne "$expected_size" ]; then
    echo "fetch-debian-kernel: decompressed $actual_size bytes, the bzImage says $expected_size" >&2
    exit 1
fi
if [ "$(od -An -c -j 1 -N 3 "$work/vmlinux" | tr -d ' ')" != "ELF" ]; then
    echo "fetch-debian-kernel: decompressed payload is not an ELF file" >&2
    exit 1
fi

cp "$vmlinuz" "$work/vmlinuz.new"
mv "$work/vmlinux" "$elf"
mv "$work/vmlinuz.new" "$bz"
echo "$bz"
echo "$elf"
