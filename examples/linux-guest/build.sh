#!/usr/bin/env bash
# Builds the minimal Linux guest: a kernel from Debian's linux-source-6.1 (apt-get download, no
# install) configured with `make allnoconfig KCONFIG_ALLCONFIG=<our fragment>`, plus an
# uncompressed busybox-static initramfs whose /init (init.sh) tests the devices named on the
# kernel command line, with /bin/vsock-test (vsock-test.c, gcc -static) for its vsock test.
#
#   examples/linux-guest/build.sh [--variant mmio|acpi-pci]... [--quiet]
#
# Variants: "mmio" (config-fragment: virtio-mmio devices from virtio_mmio.device=, MP table) and
# "acpi-pci" (config-fragment + config-acpi-pci: devices found through the DSDT and on the PCI
# bus). Without --variant both are built. Prints one line per artifact on stdout:
#   VMKIT_LINUX_KERNEL_MMIO=/path/vmlinux
#   VMKIT_LINUX_KERNEL_ACPI_PCI=/path/vmlinux
#   VMKIT_LINUX_INITRAMFS=/path/initramfs.cpio
#
# Everything is cached outside the clone in ${VMKIT_CACHE_DIR:-~/.cache/vmkit}/linux-guest, keyed
# by the hash of what goes into it (Debian package version, config fragments, patches, init.sh,
# vsock-test.c, a recipe number), so a machine builds each kernel once: from nothing, download,
# unpack and both kernels took 305 s on 2 cores (131 s "mmio", 163 s "acpi-pci"); then well
# under a second.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
# Bump when the kernel build steps below change in a way that changes the vmlinux they make
# (the cache key is this, the package version, the fragments and the patches).
kernel_recipe=1
cache="${VMKIT_CACHE_DIR:-$HOME/.cache/vmkit}/linux-guest"
variants=()
quiet=0
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) variants+=("${2:?--variant needs mmio or acpi-pci}"); shift 2 ;;
    --quiet) quiet=1; shift ;;
    -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#variants[@]} -gt 0 ] || variants=(mmio acpi-pci)
for v in "${variants[@]}"; do
  case "$v" in mmio|acpi-pci) ;; *) echo "build.sh: unknown variant '$v' (mmio or acpi-pci)" >&2; exit 2 ;; esac
done

log() { [ "$quiet" = 1 ] || echo "linux-guest: $*" >&2; }
die() { echo "linux-guest: $*" >&2; exit 1; }

mkdir -p "$cache"
# One builder at a time per machine: parallel tests wait for the first one's kernel.
exec 9>"$cache/.lock"
flock 9

# --- host tools --------------------------------------------------------------------------------
need_apt=()
command -v flex >/dev/null || need_apt+=(flex)
command -v bison >/dev/null || need_apt+=(bison)
command -v bc >/dev/null || need_apt+=(bc)
command -v gcc >/dev/null || need_apt+=(gcc)
command -v make >/dev/null || need_apt+=(make)
command -v patch >/dev/null || need_apt+=(patch)
[ -e /usr/include/libelf.h ] || need_apt+=(libelf-dev)
# libc.a, for the static vsock-test.
[ -n "$(gcc -print-file-name=libc.a 2>/dev/null | grep /)" ] || need_apt+=(libc6-dev)
apt_updated=0
apt_update() { [ "$apt_updated" = 1 ] || { log "apt-get update"; apt-get update -qq; apt_updated=1; }; }
if [ ${#need_apt[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing build tools: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})"
  apt_update
  log "installing ${need_apt[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Downloads Debian package $1 into $cache/debs (no install) and prints the .deb's path.
fetch_deb() {
  local pkg="$1" deb
  mkdir -p "$cache/debs"
  deb="$(ls "$cache/debs/${pkg}"_*.deb 2>/dev/null | tail -n1 || true)"
  if [ -z "$deb" ]; then
    log "apt-get download $pkg"
    (cd "$cache/debs" && { apt-get download -qq "$pkg" 2>/dev/null || { apt_update; apt-get download -qq "$pkg"; }; }) >&2
    deb="$(ls "$cache/debs/${pkg}"_*.deb | tail -n1)"
  fi
  echo "$deb"
}

hash_of() { cat "$@" | sha256sum | cut -c1-16; }

# --- kernel source, patched once per (package version, patches) ---------------------------------
src_deb="$(fetch_deb linux-source-6.1)"
src_ver="$(dpkg-deb -f "$src_deb" Version)"
patch_hash="$(echo "$src_ver" | cat - "$here"/patches/*.patch | sha256sum | cut -c1-16)"
src="$cache/src-$patch_hash"
if [ ! -e "$src/.vmkit-ready" ]; then
  log "unpacking linux-source-6.1 $src_ver and applying $(ls "$here"/patches/*.patch | wc -l) patches"
  rm -rf "$src" "$src.tmp"
  mkdir -p "$src.tmp/deb"
  dpkg-deb -x "$src_deb" "$src.tmp/deb"
  tarball="$(ls "$src.tmp"/deb/usr/src/linux-source-6.1.tar.* | head -n1)"
  tar -xf "$tarball" -C "$src.tmp"
  mv "$src.tmp/linux-source-6.1" "$src"
  rm -rf "$src.tmp"
  for p in "$here"/patches/*.patch; do
    patch -d "$src" -p1 --quiet --forward <"$p" || die "patch $(basename "$p") does not apply to $src_ver"
  done
  touch "$src/.vmkit-ready"
fi

# --- kernels ------------------------------------------------------------------------------------
build_kernel() {
  local variant="$1" frags=("$here/config-fragment") key out build t0
  [ "$variant" = acpi-pci ] && frags+=("$here/config-acpi-pci")
  key="$(echo "$patch_hash $variant $kernel_recipe" | cat - "${frags[@]}" | sha256sum | cut -c1-16)"
  out="$cache/kernel-$variant-$key"
  if [ ! -s "$out/vmlinux" ]; then
    build="$cache/build-$variant-$key"
    rm -rf "$build"
    mkdir -p "$build"
    cat "${frags[@]}" >"$build/fragment"
    log "building the $variant kernel (2-3 minutes on 2 cores; log: $build/build.log)"
    t0=$(date +%s)
    local mk=(make -C "$src" O="$build" ARCH=x86_64 KBUILD_BUILD_USER=vmkit KBUILD_BUILD_HOST=vmkit
      KBUILD_BUILD_TIMESTAMP="$src_ver")
    "${mk[@]}" allnoconfig KCONFIG_ALLCONFIG="$build/fragment" >"$build/build.log" 2>&1 \
      || { tail -n 30 "$build/build.log" >&2; die "allnoconfig failed"; }
    # Every option the fragments set must have survived Kconfig's dependency resolution: a
    # typo or a missing dependency would otherwise silently drop a driver.
    local line missing=()
    while IFS= read -r line; do
      case "$line" in CONFIG_*=*) grep -qxF "$line" "$build/.config" || missing+=("$line") ;; esac
    done <"$build/fragment"
    [ ${#missing[@]} -eq 0 ] || die "$variant config: Kconfig did not keep ${missing[*]}"
    "${mk[@]}" -j"$(nproc)" vmlinux >>"$build/build.log" 2>&1 \
      || { tail -n 40 "$build/build.log" >&2; die "kernel build failed (log: $build/build.log)"; }
    mkdir -p "$out.tmp"
    cp "$build/vmlinux" "$build/.config" "$out.tmp/"
    echo "$(( $(date +%s) - t0 ))" >"$out.tmp/build-seconds"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    rm -rf "$build"
    log "$variant kernel built in $(cat "$out/build-seconds") s"
  fi
  echo "$out/vmlinux"
}

# --- initramfs ----------------------------------------------------------------------------------
# Applets init.sh uses; each becomes a symlink to busybox (creating them at boot would cost
# seconds of emulated kernel time).
applets="sh mount cat dd sha256sum head tail grep dmesg sleep wc tr cmp ls reboot poweroff echo
  ifconfig ping sed uname printf blockdev readlink nc seq timeout rm"
build_initramfs() {
  local bb_deb key out tmp
  bb_deb="$(fetch_deb busybox-static)"
  # vsock-test is linked with the host's gcc and libc.a: they are part of the key too.
  key="$(echo "$(basename "$bb_deb") $applets initramfs-recipe-2 $(gcc -dumpfullversion)" \
    | cat - "$here/init.sh" "$here/vsock-test.c" "$src/usr/gen_init_cpio.c" \
      "$(gcc -print-file-name=libc.a)" | sha256sum | cut -c1-16)"
  out="$cache/initramfs-$key"
  if [ ! -s "$out/initramfs.cpio" ]; then
    log "building the busybox initramfs"
    tmp="$out.tmp"
    rm -rf "$tmp"
    mkdir -p "$tmp/bb"
    dpkg-deb -x "$bb_deb" "$tmp/bb"
    gcc -O2 -o "$tmp/gen_init_cpio" "$src/usr/gen_init_cpio.c"
    # Static (the initramfs has no libc), small (the guest kernel copies it out of the archive
    # at emulated speed), stripped.
    gcc -static -Os -s -Wall -o "$tmp/vsock-test" "$here/vsock-test.c" \
      || die "vsock-test.c does not build (gcc -static needs libc6-dev's libc.a)"
    {
      echo "dir /dev 755 0 0"
      echo "nod /dev/console 600 0 0 c 5 1"
      for d in /bin /sbin /proc /sys /tmp /mnt; do echo "dir $d 755 0 0"; done
      echo "file /bin/busybox $tmp/bb/bin/busybox 755 0 0"
      for a in $applets; do echo "slink /bin/$a busybox 777 0 0"; done
      echo "file /bin/vsock-test $tmp/vsock-test 755 0 0"
      echo "file /init $here/init.sh 755 0 0"
    } >"$tmp/list"
    # -t: a fixed mtime, so the archive's bytes depend only on its inputs.
    "$tmp/gen_init_cpio" -t 0 "$tmp/list" >"$tmp/initramfs.cpio"
    rm -rf "$out"
    mkdir -p "$out"
    mv "$tmp/initramfs.cpio" "$out/"
    rm -rf "$tmp"
  fi
  echo "$out/initramfs.cpio"
}

for v in "${variants[@]}"; do
  k="$(build_kernel "$v")"
  name="$(echo "$v" | tr 'a-z-' 'A-Z_')"
  echo "VMKIT_LINUX_KERNEL_$name=$k"
done
echo "VMKIT_LINUX_INITRAMFS=$(build_initramfs)"
