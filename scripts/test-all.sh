#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy, docs, unit and integration
# tests (the KVM ones wherever /dev/kvm exists), the test guest's build, and the minimal Linux
# guest (kernel from Debian's linux-source-6.1, built and cached on first use) booting in vmkit
# with its virtio drivers on both transports.
# Installs what the tests need when it is missing and we are root: iasl (acpica-tools), for
# the ACPI table test that checks our tables with an independent disassembler.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Debian kernel the loader tests check against is fetched with apt-get download (see
# crates/vmkit-boot/tests/fetch-debian-kernel.sh) into ~/.cache/vmkit, once per machine.
need_apt=()
command -v iasl >/dev/null || need_apt+=(acpica-tools)
command -v setpriv >/dev/null || need_apt+=(util-linux)
command -v xz >/dev/null || need_apt+=(xz-utils)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v lz4 >/dev/null || need_apt+=(lz4)
# The virtio-net tests: a TAP in a network namespace (ip), the host pinging the guest (ping).
command -v ip >/dev/null || need_apt+=(iproute2)
command -v ping >/dev/null || need_apt+=(iputils-ping)
# The blk durability test watches vmkit's fdatasync from outside (strace).
command -v strace >/dev/null || need_apt+=(strace)
# The API tests: curl --unix-socket, and a venv for the Firecracker client from PyPI.
command -v curl >/dev/null || need_apt+=(curl)
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
kernel_cache="${VMKIT_CACHE_DIR:-$HOME/.cache/vmkit}/debian-kernel/vmlinux"
if [ "$(id -u)" = 0 ]; then
  if [ ${#need_apt[@]} -gt 0 ] || [ ! -s "$kernel_cache" ]; then
    echo "==> apt-get update${need_apt[*]:+, installing ${need_apt[*]}}" >&2
    apt-get update -qq
    if [ ${#need_apt[@]} -gt 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    fi
  fi
elif [ ${#need_apt[@]} -gt 0 ]; then
  echo "missing: ${need_apt[*]} (install them, e.g. sudo apt-get install ${need_apt[*]})" >&2
  exit 1
fi

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
(cd examples/test-guest && cargo fmt -- --check)
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --all-features --quiet -- -D warnings
echo "==> cargo doc" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "==> test guest build" >&2
(cd examples/test-guest && cargo build --release --quiet)
echo "==> cargo package (every library crate packages and builds on its own)" >&2
# cargo treats the packaged crates as registry crates: it reuses what it unpacked into
# $CARGO_HOME/registry/src/-<hash>/ and what it compiled for them when the version has not
# changed. Drop both, so the check builds today's sources rather than an older run's.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rm -rf "$cargo_home"/registry/src/-*/vmkit-* "$cargo_home"/registry/cache/-*/vmkit-* \
  target/package target/package-verify
# vmkit-bench is a binary that is never published and depends on vmkit-netns, the tests'
# unpublished namespace fixture, which a packaged crate cannot name: it is left out, as is
# vmkit-fuzz-common (the fuzz targets' library, never published).
cargo package --workspace --exclude vmkit-bench --exclude vmkit-fuzz-common --quiet --allow-dirty \
  --target-dir target/package-verify >/dev/null
echo "==> fuzz smoke (every fuzz target, reproducers replayed, ${VMKIT_FUZZ_SECS:-10} s each)" >&2
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
fuzz/smoke.sh "${VMKIT_FUZZ_SECS:-10}"
echo "==> minimal Linux guest (examples/linux-guest: built once per machine, ~5 min cold, cached in ~/.cache/vmkit)" >&2
t0=$(date +%s)
examples/linux-guest/build.sh
echo "    linux guest ready in $(( $(date +%s) - t0 )) s" >&2
echo "==> cargo test (last, so its summary closes the output; --all-features includes the Linux guest boots)" >&2
# Tests that need /dev/kvm are ignored where it is missing (cfg(no_kvm)); here they must run,
# and fail if this machine cannot run them.
cargo test --workspace --all-features -- --include-ignored
