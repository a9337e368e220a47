#!/usr/bin/env bash
# Boots the minimal Linux guest in vmkit and in QEMU (microvm, from apt) with the same kernel,
# initramfs, command line and devices (virtio-blk, virtio-rng, virtio-console), in the same
# run, and prints a markdown table: host wall time to the guest's ready line (its /init
# started) and to the VMM's exit, the guest's own uptime when /init started, and whether every
# device test passed. Reports numbers; asserts nothing on time.
#
#   examples/linux-guest/compare.sh [--runs N]        (default 1 run per configuration)
#
# Configurations: "mmio" (plain kernel, virtio-mmio from the command line), "acpi-mmio" (ACPI
# kernel, virtio-mmio found through the DSDT) and "acpi-pci" (ACPI kernel, virtio-pci). The
# plain kernel ends the VM with reboot=k (keyboard controller), the ACPI one with reboot=a (the
# FADT's reset register): QEMU's microvm with ACPI has no keyboard controller, and the kernel's
# last fallback (a triple fault through int3) is rejected by kvm_pvm's emulator, so a
# keyboard-controller reset would leave QEMU spinning.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
runs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --runs) runs="${2:?}"; shift 2 ;;
    *) echo "compare.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
command -v qemu-system-x86_64 >/dev/null || {
  [ "$(id -u)" = 0 ] || { echo "compare.sh: needs qemu-system-x86_64" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
}
eval "$("$here/build.sh" --quiet)"
(cd "$root" && cargo build --release --quiet -p vmkit-vmm)
vmkit="$root/target/release/vmkit"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The host-side image: a 64 KiB pattern, then zeros (1 MiB).
head -c 65536 /dev/urandom >"$work/pattern"
sha="$(sha256sum "$work/pattern" | cut -d' ' -f1)"
base="console=ttyS0 panic=-1 tsc=reliable no_timer_check lpj=5000000 rodata=off quiet"
tests="vmkit_test=blk,rng,console vmkit_blk_sha=$sha vmkit_token=compare"

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Runs "$@" with stdout read line by line; prints
# "<ready ms> <exit ms> <uptime at /init s> <uptime at the end of /init's tests s> <ok>"
# where ok is the number of "VMKIT-RESULT <dev> ok" lines (3 when everything passed). A VMM that
# has not exited 20 s after the guest's last line (its reset did not end it) is killed and its
# exit time shows as "hung".
measure() {
  local t0 ready=- line up=- fin=- ok=0 log="$work/log" fifo="$work/fifo" pid end
  (cat "$work/pattern"; head -c $((1048576 - 65536)) /dev/zero) >"$work/disk.img"
  rm -f "$fifo" "$work/killed"
  mkfifo "$fifo"
  t0=$(now_ms)
  timeout 600 "$@" >"$fifo" 2>>"$log" &
  pid=$!
  while IFS= read -r line; do
    echo "$line" >>"$log"
    case "$line" in
      VMKIT-LINUX-READY*) ready=$(( $(now_ms) - t0 )) ;;
      VMKIT-LINUX-UPTIME*) up="${line##*init=}" ;;
      VMKIT-LINUX-DONE*)
        fin="${line##*uptime=}"
        (sleep 20; kill -0 "$pid" 2>/dev/null && touch "$work/killed" && kill "$pid") >/dev/null 2>&1 &
        ;;
      "VMKIT-RESULT "*" ok"*) ok=$((ok + 1)) ;;
    esac
  done <"$fifo"
  wait "$pid" || true
  end=$(( $(now_ms) - t0 ))
  [ -e "$work/killed" ] && end=hung
  echo "$ready $end $up $fin $ok"
}

# The command line vmkit gave the guest (with its clearcpuid=, without virtio_mmio.device=):
# QEMU gets the same one; its microvm adds its own virtio_mmio.device= when ACPI is off.
vmkit_cmdline() {
  sed -n 's/^VMKIT-CMDLINE //p' "$work/log" | tail -n1 | sed 's/ virtio_mmio.device=[^ ]*//g'
}

echo "| guest | VMM | ready line (ms) | guest uptime at /init (s) | guest uptime after the tests (s) | exit (ms) | device tests ok |"
echo "|---|---|---:|---:|---:|---:|---:|"
for config in mmio acpi-mmio acpi-pci; do
  case "$config" in
    mmio) kernel="$VMKIT_LINUX_KERNEL_MMIO"; transport=mmio; extra=(); machine=microvm,acpi=off; reboot=k
      qdev=(-device virtio-blk-device,drive=d0 -device virtio-rng-device -device virtio-serial-device) ;;
    acpi-mmio) kernel="$VMKIT_LINUX_KERNEL_ACPI_PCI"; transport=mmio; extra=(--no-mmio-cmdline)
      machine=microvm,acpi=on; reboot=a
      qdev=(-device virtio-blk-device,drive=d0 -device virtio-rng-device -device virtio-serial-device) ;;
    acpi-pci) kernel="$VMKIT_LINUX_KERNEL_ACPI_PCI"; transport=pci; extra=(); machine=microvm,acpi=on,pcie=on
      reboot=a
      qdev=(-device virtio-blk-pci,drive=d0 -device virtio-rng-pci -device virtio-serial-pci) ;;
  esac
  for _ in $(seq "$runs"); do
    : >"$work/log"
    r=$(measure "$vmkit" --kernel "$kernel" --initramfs "$VMKIT_LINUX_INITRAMFS" --cpu-template pvm \
      --transport "$transport" "${extra[@]}" --rng --console "file=$work/hvc" \
      --disk "path=$work/disk.img" --serial stdio --cmdline "$base reboot=$reboot $tests")
    read -r ready total up fin ok <<<"$r"
    echo "| $config | vmkit | $ready | $up | $fin | $total | $ok/3 |"
    cmdline="$(vmkit_cmdline)"
    : >"$work/log"
    r=$(measure qemu-system-x86_64 -M "$machine" -enable-kvm -cpu host,-arch-capabilities -m 128M -smp 1 \
      -nodefaults -no-user-config -nographic -no-reboot -serial stdio \
      -kernel "$kernel" -initrd "$VMKIT_LINUX_INITRAMFS" -append "$cmdline" \
      -drive "id=d0,file=$work/disk.img,format=raw,if=none" "${qdev[@]}" \
      -chardev "file,id=c0,path=$work/hvc-qemu" -device virtconsole,chardev=c0)
    read -r ready total up fin ok <<<"$r"
    echo "| $config | QEMU | $ready | $up | $fin | $total | $ok/3 |"
  done
done
