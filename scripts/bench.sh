#!/usr/bin/env bash
# Every headline figure of vmkit beside QEMU on the same PVH test guest, in one run: start-up,
# footprint, Firecracker's API (vmkit only: round trips, InstanceStart, pause, its memory),
# start rate, exit cost, virtio-rng, virtio-blk (with host fio as the ceiling),
# virtio-net (with the host's loopback as the ceiling; needs root for a network namespace and
# a TAP, else the section says it was not measured), virtio-vsock (hybrid vsock over Unix
# sockets, with the host's own Unix sockets as the ceiling). Reports numbers; asserts nothing
# on time.
# With --write, the output and its SVG charts replace the "Latest run" part of
# docs/benchmarks.md (docs/bench/*.svg). Other arguments go to vmkit-bench
# (examples/vmkit-bench; `target/release/vmkit-bench --help` lists them): --runs N, --pio N,
# --blk-secs N, --net-secs N, --net-mib N, --vsock-secs N, --vsock-conns N, --baseline PATH,
# and --only SECTION,... with SECTION one of startup, footprint, api, rate, rng, blk, net,
# vsock, exits (e.g. `--only net`).
#
# --baseline PATH runs a second vmkit binary beside the current one in the same run, as an
# extra "vmkit (baseline)" column (rows in the row-wise tables) with the ratio
# vmkit / baseline: how to show no regression against an earlier commit. Build it in a
# worktree, e.g. for the previous commit:
#   git worktree add /tmp/wt-base HEAD~1
#   (cd /tmp/wt-base && CARGO_TARGET_DIR=/tmp/wt-base-target cargo build --release -p vmkit-vmm)
#   scripts/bench.sh --baseline /tmp/wt-base-target/release/vmkit
# The baseline gets only flags every vmkit has had (--kernel --memory --cmdline --stats --cpus
# --rng --console --disk path=..,engine=..,direct=on --transport).
set -euo pipefail
cd "$(dirname "$0")/.."
# QEMU from Debian is the peer every figure is compared against, on the same guest.
# fio is the host ceiling for the block figures.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v fio >/dev/null || need+=(fio)
# ip (iproute2) makes the virtio-net section's namespace and TAP.
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  echo "==> installing ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
write=0
if [ "${1:-}" = "--write" ]; then
  write=1
  shift
fi
cargo build --release --quiet -p vmkit-vmm -p vmkit-bench
(cd examples/test-guest && cargo build --release --quiet)
report() {
echo "- host: $(uname -r), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "- vmkit $(git describe --always --dirty 2>/dev/null || echo unknown), $(rustc --version)"
echo "- $(qemu-system-x86_64 --version 2>/dev/null | head -n1 || echo 'QEMU: not installed')"
echo "- command: \`scripts/bench.sh $*\`"
echo
target/release/vmkit-bench "$@"
}
if [ "$write" = 1 ]; then
  out=$(mktemp)
  trap 'rm -f "$out"' EXIT
  report "$@" --svg-dir docs/bench > "$out"
  intro=$(sed '/^## Latest run/,$d' docs/benchmarks.md)
  { printf '%s\n\n## Latest run (%s)\n\n' "$intro" "$(date -u +%Y-%m-%d)"; cat "$out"; } > docs/benchmarks.md
  echo "wrote docs/benchmarks.md and docs/bench/*.svg" >&2
else
  echo "# vmkit benchmarks"
  echo
  report "$@"
fi
