#!/usr/bin/env bash
# Start-up, footprint and PIO-exit figures of vmkit on the PVH test guest (see
# docs/benchmarks.md). Reports numbers; asserts nothing. Arguments go to vmkit-bench
# (--runs N, --pio N).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p vmkit-vmm
(cd examples/test-guest && cargo build --release --quiet)
echo "# vmkit benchmarks"
echo
echo "- host: $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "- vmkit $(git describe --always --dirty 2>/dev/null || echo unknown), $(rustc --version)"
echo "- command: \`scripts/bench.sh $*\`"
echo
exec target/release/vmkit-bench "$@"
