#!/usr/bin/env bash
# Builds vmkit and the PVH test guest, then boots the guest with 2 vCPUs and a virtio-rng:
# it reports the machine it finds (memory map, CPUs, APIC IDs, interrupts, virtio devices),
# reads entropy through the virtio-drivers crate, and powers off. Extra arguments
# go to vmkit (e.g. --cpus 4).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> building vmkit (release)" >&2
cargo build --release --quiet -p vmkit-vmm --bin vmkit
echo "==> building the test guest" >&2
(cd examples/test-guest && cargo build --release --quiet)
guest=examples/test-guest/target/x86_64-unknown-linux-gnu/release/vmkit-test-guest
echo "==> target/release/vmkit --kernel $guest --cpus 2 --memory 256M --rng --cmdline 'test=all' $*" >&2
exec target/release/vmkit --kernel "$guest" --cpus 2 --memory 256M --rng --cmdline "test=all" "$@"
