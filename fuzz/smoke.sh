#!/usr/bin/env bash
# Builds every fuzz target and runs each for a few seconds, one after the other.
#
#   fuzz/smoke.sh [SECONDS]     (default 10 per target; from any directory)
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain (`+nightly`, or
# set CARGO_FUZZ_TOOLCHAIN). Each target first replays its checked-in reproducers in
# fuzz/regressions/<target>/, then fuzzes from fuzz/corpus/<target>/ (git-ignored; created
# on the first run). Exits non-zero if any target crashes, panics, leaks or times out (a
# unit running over VMKIT_FUZZ_UNIT_TIMEOUT seconds, default 10, is a hang); the
# crashing input is in fuzz/artifacts/<target>/ and the log in fuzz/target/smoke/.
set -euo pipefail

secs="${1:-10}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
    echo "usage: $0 [SECONDS]" >&2
    exit 2
fi
toolchain="${CARGO_FUZZ_TOOLCHAIN:-nightly}"
# A unit that runs longer than this is reported as a hang (libFuzzer's default is 20 min).
unit_timeout="${VMKIT_FUZZ_UNIT_TIMEOUT:-10}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "smoke.sh: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

targets=$(cargo "+$toolchain" fuzz list)
echo "== building: $(echo $targets)"
cargo "+$toolchain" fuzz build

logs="$here/target/smoke"
mkdir -p "$logs"
failed=()
for t in $targets; do
    log="$logs/$t.log"
    # Fuzzer inputs are the files right in fuzz/regressions/<target>/ (subfolders hold
    # other material, e.g. raw kernel images for unit tests).
    mapfile -t repros < <(find "$here/regressions/$t" -maxdepth 1 -type f 2>/dev/null | sort)
    if [ "${#repros[@]}" -ne 0 ]; then
        echo "== $t: replaying ${#repros[@]} reproducer(s) from fuzz/regressions/$t"
        # A reproducer that still crashes is a known, unfixed bug: report it and go on
        # fuzzing, but fail the run.
        if ! cargo "+$toolchain" fuzz run "$t" "${repros[@]}" -- -timeout="$unit_timeout" \
            >"$log.regressions" 2>&1; then
            echo "!! $t: a reproducer in fuzz/regressions/$t still fails:"
            grep -E -A1 "panicked at|ERROR: " "$log.regressions" | head -n 6 || true
            failed+=("$t (regression)")
        fi
    fi
    echo "== $t: fuzzing for ${secs}s"
    if cargo "+$toolchain" fuzz run "$t" -- -max_total_time="$secs" -timeout="$unit_timeout" \
        -print_final_stats=1 >"$log" 2>&1; then
        grep -E "^stat::(number_of_executed_units|average_exec_per_sec)" "$log" | sed "s/^/   /" || true
    else
        echo "!! $t: crashed; log: $log"
        grep -E -A1 "panicked at|ERROR: |Test unit written" "$log" | head -n 8 || true
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "smoke.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "smoke.sh: all targets ran ${secs}s without a crash"
