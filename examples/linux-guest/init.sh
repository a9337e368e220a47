#!/bin/sh
# /init of vmkit's minimal Linux guest (busybox). It tests the devices named in the kernel
# command line's vmkit_test=dev,dev,... (the kernel hands unknown name=value words to init as
# environment), prints one "VMKIT-RESULT <dev> ok|FAIL ..." line per device, the driver-binding
# lines from dmesg, and ends the VM with `reboot -f` (reboot=k: keyboard-controller reset).
# The ACPI power button (acpi-pci kernel) powers it off with "VMKIT-POWER-BUTTON".
# Ctrl-Alt-Del from the host (the i8042 keyboard; Firecracker's SendCtrlAltDel) reaches it as
# SIGINT once /init has turned C-A-D off (before that the kernel reboots by itself): it prints
# "VMKIT-CTRL-ALT-DEL" and ends the VM the same way (after the running command, if any).
#
# Command-line parameters:
#   vmkit_test=blk,rng,console,net,vsock   devices to test, in order
#   vmkit_blk_sha=<sha256>       expected sha256 of the disk's first 64 KiB (the host's pattern)
#   vmkit_token=<word>           written to /dev/hvc0 so the host can find it in its console output
#   vmkit_net_ip=10.77.0.2       net: eth0's address (a /24)
#   vmkit_net_peer=10.77.0.1     net: the host's end of the TAP, pinged and connected to
#   vmkit_net_mac=<mac>          net: the MAC eth0 must have (the VMM's configured one)
#   vmkit_net_port=5556          net: the host listens there for the guest's stream (guest to
#                                host) and on port+1 for its own (host to guest)
#   vmkit_net_kib=N              net: KiB moved each way
#   vmkit_vsock_port=5000        vsock: the host echoes on this port, the guest listens on port+1
#                                for the host's connection, and nothing listens on port+2
#   vmkit_vsock_bytes=N          vsock: bytes moved each way on each connection
#   vmkit_wait=N                 after the tests, wait up to N seconds (for a Ctrl-Alt-Del:
#                                "VMKIT-WAITING" says when) before ending the VM
#   vmkit_hold=1                 before the tests, print "VMKIT-HOLD" and wait for a Ctrl-Alt-Del
#                                (a snapshot is taken there; each VM restored from it is released
#                                with one and runs the tests: "VMKIT-RELEASED")
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
# Ctrl-Alt-Del: the kernel reboots at once while C-A-D is on (its default); off, it sends init
# SIGINT, which a trap can take. The trap runs between commands, or at once in `wait`.
echo 0 >/proc/sys/kernel/ctrl-alt-del
ctrl_alt_del() {
  read up idle </proc/uptime
  echo "VMKIT-CTRL-ALT-DEL uptime=$up"
  reboot -f
}
trap ctrl_alt_del INT
# The ACPI power button (the acpi-pci kernel: the GED's Notify on the PNP0C0C device, Linux's
# button driver, an evdev node): a watcher waits for its first input event and sends init
# SIGUSR1, which powers the VM off (ACPI S5, through the FADT's sleep registers).
power_button() {
  read up idle </proc/uptime
  echo "VMKIT-POWER-BUTTON uptime=$up"
  poweroff -f
}
trap power_button USR1
for input in /sys/class/input/input*; do
  [ "$(cat "$input/name" 2>/dev/null)" = "Power Button" ] || continue
  for event in "$input"/event*; do
    [ -e "$event" ] && (head -c 24 "/dev/input/${event##*/}" >/dev/null && kill -USR1 1) &
  done
done
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

# Sets $ms to the guest's uptime in milliseconds (a shell built-in read: no fork).
uptime_ms() {
  read up idle </proc/uptime
  ms=$(( ${up%.*}${up#*.} * 10 ))
}

# Sets $offloads to the names of the set bits of the virtio feature string $1 (character i is
# feature bit i) that are about offloads and queues.
net_offloads() {
  offloads=
  for b in 0:CSUM 1:GUEST_CSUM 3:MTU 5:MAC 7:GUEST_TSO4 8:GUEST_TSO6 10:GUEST_UFO 11:HOST_TSO4 \
    12:HOST_TSO6 14:HOST_UFO 15:MRG_RXBUF 16:STATUS 17:CTRL_VQ 22:MQ 29:EVENT_IDX 32:VERSION_1; do
    [ "${1:${b%%:*}:1}" = 1 ] && offloads="$offloads${offloads:+,}${b#*:}"
  done
}

# Pings the peer 3 times; sets $ping to "<received>/3" and $rtt to busybox's min/avg/max.
net_ping() {
  out=$(ping -q -c 3 -i 0.2 -W 5 -w 20 "$vmkit_net_peer" 2>&1)
  ping=${out#*transmitted, }
  ping=${ping%% packets received*}/3
  case "$ping" in [0-3]/3) ;; *) echo "VMKIT-NET ping said: $out"; ping=0/3 ;; esac
  rtt=${out##*= }
  case "$out" in *round-trip*) ;; *) rtt=none ;; esac
}

# nc to the peer's port $1 with dd on the socket (`-e`), dd's other operands $2...: busybox nc
# copies through a 1 KiB buffer (a select, a read and a write per KiB each side, about 10 ms
# per KiB here), dd moves 64 KiB per syscall and lets TCP hand the device super-frames. Bounded
# by timeout; returns 1 with $why set on failure.
net_nc() {
  port=$1; shift
  timeout 60 nc -w 10 "$vmkit_net_peer" "$port" -e /bin/dd bs=65536 "$@" 2>/tmp/net-err && return 0
  why="nc $vmkit_net_peer:$port exit $?: $(cat /tmp/net-err)"
  return 1
}

# Guest to host: N KiB of "%015d\n" lines counting from 10^14 (so the host can rebuild them) to
# port; host to guest: whatever the host sends on port+1 until it closes. Sets tx_sha, rx_sha,
# rx_bytes, tx_ms, rx_ms; returns 1 with $why set on failure.
net_transfer() {
  first=100000000000000
  seq $first $((first + vmkit_net_kib * 64 - 1)) >/tmp/net-tx
  tx_sha=$(sha256sum </tmp/net-tx)
  tx_sha=${tx_sha%% *}
  uptime_ms; t0=$ms
  net_nc "$vmkit_net_port" if=/tmp/net-tx || return 1
  uptime_ms; tx_ms=$((ms - t0)); t0=$ms
  net_nc $((vmkit_net_port + 1)) of=/tmp/net-rx || return 1
  uptime_ms; rx_ms=$((ms - t0))
  rx_bytes=$(wc -c </tmp/net-rx)
  rx_sha=$(sha256sum </tmp/net-rx)
  rx_sha=${rx_sha%% *}
  rm -f /tmp/net-tx /tmp/net-rx /tmp/net-err
}

# The interface's counters. They also show segmentation offload at work: an average frame
# above 1514 bytes (ACKs and pings included) can only come from super-frames the stack handed
# the device (TX) or got from it (RX).
net_stats() {
  s=/sys/class/net/eth0/statistics
  read txb <$s/tx_bytes; read txp <$s/tx_packets; read rxb <$s/rx_bytes; read rxp <$s/rx_packets
  read mtu </sys/class/net/eth0/mtu
  set -- /sys/class/net/eth0/queues/rx-*
  echo "VMKIT-NET stats mtu=$mtu queues=$# tx_packets=$txp tx_bytes=$txb" \
    "tx_avg=$((txb / (txp ? txp : 1))) rx_packets=$rxp rx_bytes=$rxb rx_avg=$((rxb / (rxp ? rxp : 1)))"
}

test_net() {
  [ -e /sys/class/net/eth0 ] || { result net FAIL no eth0; return; }
  read mac </sys/class/net/eth0/address
  [ "$mac" = "$vmkit_net_mac" ] || { result net FAIL mac=$mac want=$vmkit_net_mac; return; }
  read features </sys/class/net/eth0/device/features || { result net FAIL no virtio features; return; }
  net_offloads "$features"
  echo "VMKIT-NET features=$features offloads=$offloads"
  ifconfig eth0 "$vmkit_net_ip" netmask 255.255.255.0 up || { result net FAIL ifconfig; return; }
  net_ping
  echo "VMKIT-NET ping=$ping rtt=$rtt"
  [ "$ping" = 3/3 ] || { result net FAIL ping=$ping; return; }
  net_transfer || { result net FAIL "$why"; return; }
  echo "VMKIT-NET tx kib=$vmkit_net_kib ms=$tx_ms rx bytes=$rx_bytes ms=$rx_ms"
  net_stats
  result net ok mac=$mac ping=$ping tx_sha256=$tx_sha rx_sha256=$rx_sha rx_bytes=$rx_bytes \
    features=$features offloads=$offloads
}

# vsock (vmw_vsock_virtio_transport) with /bin/vsock-test, the initramfs's AF_VSOCK tool (see
# vsock-test.c; a static glibc program, so the GLIBC_TUNABLES above matter to it too): the
# guest's CID; a connection to the host (CID 2) on a port where nothing listens is refused; N
# bytes to the host's echo on vmkit_vsock_port and back; then a listener on port+1 that prints
# "VMKIT-VSOCK listening port=..." on the console (the host connects when it sees it), sends N
# bytes and reads the host's N bytes, and waits for the host to close.
test_vsock() {
  drv=/sys/bus/virtio/drivers/vmw_vsock_virtio_transport
  [ -d $drv ] || { result vsock FAIL no driver vmw_vsock_virtio_transport; return; }
  set -- $drv/virtio*
  [ -e "$1" ] || { result vsock FAIL no device bound to vmw_vsock_virtio_transport; return; }
  dev=${1##*/}
  port=$vmkit_vsock_port
  bytes=$vmkit_vsock_bytes
  out=$(vsock-test cid) || { result vsock FAIL cid: $out; return; }
  cid=${out#cid=}
  out=$(timeout 90 vsock-test refused $((port + 2))) || { result vsock FAIL refused: $out; return; }
  echo "VMKIT-VSOCK $out"
  refused=${out#*errno=}
  refused=${refused%% *}
  out=$(timeout 90 vsock-test connect $port $bytes) || { result vsock FAIL connect: $out; return; }
  echo "VMKIT-VSOCK $out"
  echoed=${out#*echoed=}
  echoed=${echoed%% *}
  out=$(timeout 90 vsock-test listen $((port + 1)) $bytes) || { result vsock FAIL listen: $out; return; }
  echo "VMKIT-VSOCK $out"
  peer=${out#*peer=}
  peer=${peer%% *}
  received=${out#*received=}
  received=${received%% *}
  result vsock ok cid=$cid device=$dev refused=$refused echoed=$echoed peer=$peer received=$received
}

test_console() {
  [ -c /dev/hvc0 ] || { result console FAIL no /dev/hvc0; return; }
  echo "VMKIT-HVC0 token=$vmkit_token" >/dev/hvc0 || { result console FAIL write; return; }
  result console ok wrote=token
}

if [ -n "$vmkit_hold" ]; then
  held=1
  trap 'held=' INT
  echo "VMKIT-HOLD"
  while [ -n "$held" ]; do
    sleep 1 &
    wait $!
  done
  trap ctrl_alt_del INT
  read up idle </proc/uptime
  echo "VMKIT-RELEASED uptime=$up"
fi
for dev in $(echo "$vmkit_test" | tr , ' '); do
  case "$dev" in
    blk) test_blk ;;
    rng) test_rng ;;
    console) test_console ;;
    net) test_net ;;
    vsock) test_vsock ;;
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
dmesg | grep -E 'virtio|vsock|vda|hvc|eth0|pci 0000|PCI|ACPI: bus|PCI Root' | grep -v -e 'ommand line' -e vmkit_ | sed 's/^/VMKIT-DMESG /'
read up idle </proc/uptime
echo "VMKIT-LINUX-DONE uptime=$up"
if [ -n "$vmkit_wait" ]; then
  echo "VMKIT-WAITING seconds=$vmkit_wait"
  sleep "$vmkit_wait" &
  wait $!
fi
reboot -f
