#!/bin/sh
# /init of vmkit's minimal Linux guest (busybox). It tests the devices named in the kernel
# command line's vmkit_test=dev,dev,... (the kernel hands unknown name=value words to init as
# environment), prints one "VMKIT-RESULT <dev> ok|FAIL ..." line per device, the driver-binding
# lines from dmesg, and ends the VM with `reboot -f` (reboot=k: keyboard-controller reset).
#
# Command-line parameters:
#   vmkit_test=blk,rng,console   devices to test, in order
#   vmkit_blk_sha=<sha256>       expected sha256 of the disk's first 64 KiB (the host's pattern)
#   vmkit_token=<word>           written to /dev/hvc0 so the host can find it in its console output
#
# Everything here runs under an emulated guest kernel on kvm_pvm hosts (about 1 us per kernel
# instruction), so the I/O is kept to KiB, and echo/read/case (shell built-ins) are preferred to
# commands that fork and exec.
# On hosts whose KVM emulates guest kernel mode (kvm_pvm), user code runs natively: its CPUID
# and XGETBV show the host's AVX/AVX-512 and XCR0 whatever the VMM's CPU template says, while
# the kernel, with XSAVE hidden, saves only the SSE registers on a context switch. glibc
# (busybox-static is built on it) would pick AVX2/EVEX string functions and one process could
# clobber another's upper vector registers (a guest `grep` once died of SIGSEGV). Tell glibc
# not to use them, once, before anything else runs. Harmless on hardware KVM.
if [ -z "$GLIBC_TUNABLES" ]; then
  export GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load
  exec /bin/sh /init
fi
echo "VMKIT-LINUX-READY"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
read up idle </proc/uptime
echo "VMKIT-LINUX-UPTIME init=$up"
echo "VMKIT-CMDLINE $(cat /proc/cmdline)"

result() { echo "VMKIT-RESULT $*"; }

test_blk() {
  [ -b /dev/vda ] || { result blk FAIL no /dev/vda; return; }
  # Read: the host wrote a pattern into the first 64 KiB and passed its hash.
  got=$(dd if=/dev/vda bs=4096 count=16 2>/dev/null | sha256sum)
  got=${got%% *}
  [ "$got" = "$vmkit_blk_sha" ] || { result blk FAIL read sha256=$got want=$vmkit_blk_sha; return; }
  # Write 8 KiB (the first two blocks, copied to blocks 32-33) and flush them to the device; the
  # host checks the image file after the VM has ended.
  dd if=/dev/vda of=/tmp/w bs=4096 count=2 2>/dev/null
  dd if=/tmp/w of=/dev/vda bs=4096 seek=32 count=2 conv=fsync 2>/dev/null \
    || { result blk FAIL write; return; }
  # Drop the block device's page cache, so the read-back comes from the device.
  blockdev --flushbufs /dev/vda || { result blk FAIL flushbufs; return; }
  back=$(dd if=/dev/vda bs=4096 skip=32 count=2 2>/dev/null | sha256sum)
  want=$(sha256sum </tmp/w)
  [ "${back%% *}" = "${want%% *}" ] || { result blk FAIL readback sha256=${back%% *} want=${want%% *}; return; }
  result blk ok read=65536 written=8192 sha256=$got
}

test_rng() {
  current=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
  case "$current" in virtio_rng*) ;; *) result rng FAIL rng_current=$current; return ;; esac
  dd if=/dev/hwrng of=/tmp/r1 bs=4096 count=4 2>/dev/null
  dd if=/dev/hwrng of=/tmp/r2 bs=4096 count=1 2>/dev/null
  n=$(wc -c </tmp/r1)
  [ "$n" -eq 16384 ] || { result rng FAIL bytes=$n; return; }
  # Two reads of random bytes are never equal; equal ones mean a stuck or fake source.
  head -c 4096 /tmp/r1 | cmp -s - /tmp/r2 && { result rng FAIL repeated bytes; return; }
  result rng ok rng_current=$current bytes=$n
}

test_console() {
  [ -c /dev/hvc0 ] || { result console FAIL no /dev/hvc0; return; }
  echo "VMKIT-HVC0 token=$vmkit_token" >/dev/hvc0 || { result console FAIL write; return; }
  result console ok wrote=token
}

for dev in $(echo "$vmkit_test" | tr , ' '); do
  case "$dev" in
    blk) test_blk ;;
    rng) test_rng ;;
    console) test_console ;;
    *) result "$dev" FAIL unknown test ;;
  esac
done

# Which driver each virtio device is bound to, and the kernel's own lines about them.
for d in /sys/bus/virtio/devices/*; do
  [ -e "$d" ] || continue
  drv=$(ls -l "$d/driver" 2>/dev/null)
  echo "VMKIT-BOUND ${d##*/} device=$(cat "$d/device") at=$(readlink -f "$d") driver=${drv##*/}"
done
# The interrupts each device raised, and through what (IO-APIC pin or PCI MSI-X vector).
grep virtio /proc/interrupts | sed 's/^ */VMKIT-IRQ /'
dmesg | grep -E 'virtio|vda|hvc|pci 0000|PCI|ACPI: bus|PCI Root' | grep -v -e 'ommand line' -e vmkit_ | sed 's/^/VMKIT-DMESG /'
read up idle </proc/uptime
echo "VMKIT-LINUX-DONE uptime=$up"
reboot -f
