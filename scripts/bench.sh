#!/usr/bin/env bash
# Start-up, footprint and PIO-exit figures of vmkit on the PVH test guest (see
# docs/benchmarks.md). Reports numbers; asserts nothing. Arguments go to vmkit-bench
# (--runs N, --pio N).
set -euo pipefail
cd "$(dirname "$0")/.."
# QEMU from Debian is the peer every figure is compared against, on the same guest.
if ! command -v qemu-system-x86_64 >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing qemu-system-x86" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
fi
cargo build --release --quiet -p vmkit-vmm
(cd examples/test-guest && cargo build --release --quiet)
echo "# vmkit benchmarks"
echo
echo "- host: $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "- vmkit $(git describe --always --dirty 2>/dev/null || echo unknown), $(rustc --version)"
echo "- $(qemu-system-x86_64 --version 2>/dev/null | head -n1 || echo 'QEMU: not installed')"
echo "- command: \`scripts/bench.sh $*\`"
echo
exec target/release/vmkit-bench "$@"
