#!/usr/bin/env bash
# Reports, per fuzz target, the edge coverage its corpus reaches in the code the target
# is meant to cover, so a target that never gets to its device's I/O path shows up.
#
#   fuzz/coverage.sh [TARGET...]     (default: every target of `cargo fuzz list`)
#
# Builds the targets (`cargo fuzz build`, the same build fuzz/smoke.sh uses), replays
# fuzz/corpus/<target>/ once with libFuzzer's `-runs=0 -print_coverage=1` (no fuzzing),
# and prints a table: edges covered / total in the target's source files (the mapping in
# `files_for` below), the share, and the functions there that no corpus input reaches.
# If a corpus is missing or empty it first writes the generated seeds
# (`cargo run -p vmkit-fuzz-common --example write-seeds`).
#
# "Edges" are libFuzzer's instrumented blocks (its PC table, as in its `cov:` count). Each
# one is counted in the source file of its innermost inlined frame that is in this
# repository (else its innermost frame): a device function inlined into the harness still
# counts for the device's file, and std/dependency code inlined into it (an `Option` or
# iterator branch) counts for it too. The PC table is read from the binary and symbolized
# with llvm-symbolizer; libFuzzer's -print_coverage says which of them the corpus covered
# (uncovered pcs by file:line, the rest of each function is covered). Code the optimizer
# removed from a target (a function the target never calls at all) is not in the binary
# and so is in neither count: a device method missing from the listing was never called.
#
# Output: the table on stdout; per target fuzz/target/coverage/<target>.txt (per-file and
# per-function counts, then libFuzzer's own COVERED_FUNC/UNCOVERED_FUNC listing) and
# <target>.log (the raw libFuzzer output).
#
# Needs cargo-fuzz, a nightly toolchain (`+nightly`, or set CARGO_FUZZ_TOOLCHAIN),
# python3, and llvm-symbolizer (Debian: `apt-get install llvm`; any version that reads
# rustc's DWARF works: LLVM 14's does). Exits non-zero only if a build or a replay fails,
# never for low coverage. Not part of scripts/test-all.sh.
set -euo pipefail

toolchain="${CARGO_FUZZ_TOOLCHAIN:-nightly}"
unit_timeout="${VMKIT_FUZZ_UNIT_TIMEOUT:-10}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cd "$root"

# The source the target is meant to cover: files, or directories ending in '/'.
files_for() {
    case "$1" in
    blk_device) echo "crates/vmkit-virtio-blk/src/" ;;
    blk_request) echo "crates/vmkit-virtio-blk/src/request.rs" ;;
    virtqueue) echo "crates/vmkit-virtio/src/queue.rs" ;;
    console) echo "crates/vmkit-virtio-console/src/" ;;
    rng) echo "crates/vmkit-virtio-rng/src/" ;;
    net_queues) echo "crates/vmkit-virtio-net/src/" ;;
    vsock_queues) echo "crates/vmkit-virtio-vsock/src/" ;;
    pci_config) echo "crates/vmkit-pci/src/bus.rs crates/vmkit-pci/src/config.rs" ;;
    msix) echo "crates/vmkit-pci/src/msix.rs" ;;
    io_bus) echo "crates/vmkit-bus/src/" ;;
    legacy_pio) echo "crates/vmkit-legacy/src/" ;;
    kernel_image) echo "crates/vmkit-boot/src/loader.rs" ;;
    virtio_mmio) echo "crates/vmkit-virtio/src/mmio.rs crates/vmkit-virtio/src/common.rs" ;;
    virtio_pci) echo "crates/vmkit-virtio/src/pci.rs crates/vmkit-virtio/src/common.rs" ;;
    api) echo "crates/vmkit-api/src/http.rs crates/vmkit-api/src/request.rs crates/vmkit-api/src/model.rs" ;;
    *) echo "" ;;
    esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "coverage.sh: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi
if ! command -v python3 >/dev/null; then
    echo "coverage.sh: python3 is needed" >&2
    exit 2
fi
# libFuzzer's -print_coverage symbolizes through the sanitizer runtime, which runs
# llvm-symbolizer; the PC table is symbolized with the same one.
symbolizer="${LLVM_SYMBOLIZER:-$(command -v llvm-symbolizer || true)}"
if [ -z "$symbolizer" ]; then
    symbolizer="$(compgen -c llvm-symbolizer- | sort -V | tail -n 1 || true)"
    [ -n "$symbolizer" ] && symbolizer="$(command -v "$symbolizer")"
fi
if [ -z "$symbolizer" ] || [ ! -x "$symbolizer" ]; then
    echo "coverage.sh: llvm-symbolizer not found (Debian/Ubuntu: apt-get install llvm;" \
        "or set LLVM_SYMBOLIZER=/path/to/llvm-symbolizer)" >&2
    exit 2
fi
export ASAN_SYMBOLIZER_PATH="$symbolizer"

all_targets=$(cargo "+$toolchain" fuzz list)
if [ "$#" -gt 0 ]; then
    for t in "$@"; do
        if ! grep -qx -- "$t" <<<"$all_targets"; then
            echo "coverage.sh: no fuzz target '$t' (cargo fuzz list: $(echo $all_targets))" >&2
            exit 2
        fi
    done
    targets="$*"
else
    targets="$all_targets"
fi

for t in $targets; do
    [ -n "$(files_for "$t")" ] || echo "coverage.sh: warning: no source mapping for '$t' in fuzz/coverage.sh" >&2
    for f in $(files_for "$t"); do
        [ -e "$f" ] || echo "coverage.sh: warning: '$t' maps to $f, which does not exist" >&2
    done
done

# Seeds for any target whose corpus is missing or empty (written for every target).
need_seeds=0
for t in $targets; do
    if [ -z "$(find "$here/corpus/$t" -maxdepth 1 -type f -print -quit 2>/dev/null)" ]; then
        need_seeds=1
    fi
done
if [ "$need_seeds" = 1 ]; then
    echo "== a corpus is missing or empty: writing the generated seeds" >&2
    cargo run -q -p vmkit-fuzz-common --example write-seeds >&2
fi

echo "== building: $(echo $targets)" >&2
if [ "$#" -eq 0 ]; then
    cargo "+$toolchain" fuzz build >&2
else
    for t in $targets; do cargo "+$toolchain" fuzz build "$t" >&2; done
fi

triple="$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')"
bindir="$here/target/$triple/release"
out="$here/target/coverage"
mkdir -p "$out"
results="$out/summary.tsv"
: >"$results"
failed=()

for t in $targets; do
    corpus="$here/corpus/$t"
    log="$out/$t.log"
    if [ -z "$(find "$corpus" -maxdepth 1 -type f -print -quit 2>/dev/null)" ]; then
        echo "!! $t: corpus fuzz/corpus/$t is missing or empty" >&2
        printf '%s\tNOCORPUS\n' "$t" >>"$results"
        continue
    fi
    # Replay the whole corpus untruncated (libFuzzer caps inputs at 1 MiB by default).
    max_len=$(find "$corpus" -maxdepth 1 -type f -printf '%s\n' | sort -n | tail -n 1)
    [ "$max_len" -ge 4096 ] || max_len=4096
    echo "== $t: replaying $(find "$corpus" -maxdepth 1 -type f | wc -l) inputs" >&2
    if ! "$bindir/$t" -runs=0 -print_coverage=1 -timeout="$unit_timeout" -max_len="$max_len" \
        "$corpus" >"$log" 2>&1; then
        echo "!! $t: replay failed; log: $log" >&2
        grep -E -A1 "panicked at|ERROR: " "$log" | head -n 6 >&2 || true
        failed+=("$t")
        printf '%s\tFAILED\n' "$t" >>"$results"
        continue
    fi
    if ! python3 - "$bindir/$t" "$log" "$symbolizer" "$root" "$out/$t.txt" "$t" \
        "$(files_for "$t")" >>"$results" <<'PY'; then
import collections, json, re, struct, subprocess, sys

binary, log, symbolizer, root, listing, target, spec = sys.argv[1:8]
prefixes = spec.split()


def fail(msg):
    sys.stderr.write("!! %s: %s\n" % (target, msg))
    sys.exit(1)


# --- The PC table (__sancov_pcs: pairs of pc, flags; flags & 1 = function entry). In a
# PIE binary the pcs are filled in by R_X86_64_RELATIVE relocations at load time.
data = open(binary, "rb").read()
if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
    fail("not a little-endian ELF64 binary")
shoff, = struct.unpack_from("<Q", data, 0x28)
shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
sections = []
for i in range(shnum):
    name, typ, _flags, addr, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    sections.append((name, typ, addr, off, size))
stroff = sections[shstrndx][3]
byname = {}
for name, typ, addr, off, size in sections:
    end = data.index(b"\0", stroff + name)
    byname[data[stroff + name:end].decode()] = (typ, addr, off, size)
if "__sancov_pcs" not in byname:
    fail("no __sancov_pcs section (not built with -fsanitize-coverage pc-table?)")
_, pcs_addr, pcs_off, pcs_size = byname["__sancov_pcs"]
entries = list(struct.iter_unpack("<QQ", data[pcs_off:pcs_off + pcs_size]))
relocated = {}
for typ, _addr, off, size in byname.values():
    if typ != 4:  # SHT_RELA
        continue
    for r_off, info, addend in struct.iter_unpack("<QQq", data[off:off + size]):
        if pcs_addr <= r_off < pcs_addr + pcs_size and (info & 0xFFFFFFFF) == 8:
            relocated[r_off] = addend
pcs = []
for i, (pc, flags) in enumerate(entries):
    pcs.append((pc or relocated.get(pcs_addr + 16 * i, 0), flags & 1))
if not pcs or any(pc == 0 for pc, _ in pcs):
    fail("could not read the PC table")

# --- Symbolize every pc as libFuzzer does (pc + 1, innermost inlined frame first).
proc = subprocess.run(
    [symbolizer, "--obj=" + binary, "--output-style=JSON", "--demangle", "--inlining"],
    input="".join("0x%x\n" % (pc + 1) for pc, _ in pcs),
    capture_output=True, text=True, check=True)
syms = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
if len(syms) != len(pcs):
    fail("llvm-symbolizer answered %d of %d addresses" % (len(syms), len(pcs)))


def frame(fr):
    return (fr.get("FileName") or "??", fr.get("Line", 0), fr.get("FunctionName") or "??")


# pc_file/pc_line: the innermost frame (what libFuzzer prints, used to match its output);
# own_*: the innermost frame in this repository's source, so std/core/dependency code
# inlined into a vmkit function counts for that function (its `?`, iterator and
# Option branches are its branches).
pc_file, pc_line, own_file, own_line, own_func = [], [], [], [], []
for s in syms:
    frames = s.get("Symbol") or [{}]
    f, l, fn = frame(frames[0])
    pc_file.append(f)
    pc_line.append(l)
    for fr in frames:
        # A line-0 frame's file is whatever the line table last said: skip it (an
        # inlined frame's caller location is exact).
        if (fr.get("FileName") or "").startswith(root + "/") and fr.get("Line"):
            f, l, fn = frame(fr)
            break
    else:
        for fr in frames:
            if fr.get("Line"):
                f, l, fn = frame(fr)
                break
    own_file.append(f)
    own_line.append(l)
    own_func.append(fn)

# Function groups, in table order (as libFuzzer walks them).
groups = []
for i, (_, entry) in enumerate(pcs):
    if entry or not groups:
        groups.append([i, i + 1])
    else:
        groups[-1][1] = i + 1

# --- libFuzzer's listing: one line per function group whose entry file is "interesting",
# in table order, with the uncovered pcs (file:line) of each covered function.
text = open(log, errors="replace").read()
m = re.search(r"DONE\s+cov: (\d+)", text) or re.search(r"INITED\s+cov: (\d+)", text)
if not m:
    fail("no 'cov:' line in the libFuzzer log")
cov_total = int(m.group(1))
m = re.search(r"Loaded 1 PC tables \((\d+) PCs\)", text)
if not m or int(m.group(1)) != len(pcs):
    fail("libFuzzer's PC table is not the binary's (%s vs %d pcs)" % (m and m.group(1), len(pcs)))
if "COVERAGE:" not in text:
    fail("libFuzzer printed no coverage (no symbolizer?)")
funcs = []  # (covered?, edges covered, edges, file, line, [uncovered file:line])
func_re = re.compile(r"^(UN)?COVERED_FUNC: hits: (\d+) edges: (\d+)/(\d+) (.*) (\S*):(\d+)$")
lines = text.split("COVERAGE:\n", 1)[1].splitlines()
for line in lines:
    fm = func_re.match(line)
    if fm:
        funcs.append([int(fm.group(2)) > 0, int(fm.group(3)), int(fm.group(4)),
                      fm.group(6), int(fm.group(7)), [], line])
    elif line.startswith("  UNCOVERED_PC: ") and funcs:
        loc = line[len("  UNCOVERED_PC: "):]
        f, _, l = loc.rpartition(":")
        funcs[-1][5].append((f, int(l) if l.isdigit() else 0))

covered = [False] * len(pcs)
g = 0
for covd, ecov, edges, f, l, unc, raw in funcs:
    while g < len(groups):
        a, b = groups[g]
        if b - a == edges and pc_file[a] == f and pc_line[a] == l:
            break
        g += 1
    if g == len(groups):
        fail("cannot match libFuzzer's line to the PC table: " + raw)
    a, b = groups[g]
    g += 1
    if not covd:
        continue
    left = collections.Counter(unc)
    for i in range(a, b):
        key = (pc_file[i], pc_line[i])
        if left[key] > 0:
            left[key] -= 1
        else:
            covered[i] = True
    if +left or sum(covered[a:b]) != ecov:
        fail("uncovered pcs do not match the PC table in: " + raw)
if sum(covered) != cov_total:
    fail("counted %d covered pcs, libFuzzer says cov: %d" % (sum(covered), cov_total))

# --- Per-file and per-function (innermost frame) counts.
def rel(f):
    return f[len(root) + 1:] if f.startswith(root + "/") else f


def mine(f):
    r = rel(f)
    return any(r == p or (p.endswith("/") and r.startswith(p)) for p in prefixes)


per_file = collections.defaultdict(lambda: [0, 0])
per_func = collections.defaultdict(lambda: [0, 0, 10**9, 0])
for i in range(len(pcs)):
    f = rel(own_file[i])
    per_file[f][0] += covered[i]
    per_file[f][1] += 1
    k = (f, own_func[i])
    per_func[k][0] += covered[i]
    per_func[k][1] += 1
    if own_line[i]:
        per_func[k][2] = min(per_func[k][2], own_line[i])
        per_func[k][3] = max(per_func[k][3], own_line[i])

ecov = sum(c for f, (c, n) in per_file.items() if mine(f))
etot = sum(n for f, (c, n) in per_file.items() if mine(f))
# Largest first: a never-entered I/O routine outweighs a derived Debug impl.
zero = sorted((k for k, v in per_func.items() if mine(k[0]) and v[0] == 0),
              key=lambda k: (-per_func[k][1], k[0], per_func[k][2]))


def short(key):
    # "<vmkit_x::Dev as vmkit_virtio::device::VirtioDevice>::f::<T>" -> "<Dev as VirtioDevice>::f"
    f, name = key
    prev = None
    while prev != name:
        prev = name
        name = re.sub(r"(?<=[\w}:])(::)?<[^<>]*>", "", name)
    name = re.sub(r"\b[a-z_][a-z0-9_]*::", "", name)
    return "%s@%s:%s" % (name, f.rsplit("/", 1)[-1], per_func[key][2] if per_func[key][3] else "?")


with open(listing, "w") as out:
    out.write("%s: %d/%d edges in %s; %d of %d in the whole binary\n\n"
              % (target, ecov, etot, spec or "(no mapping)", cov_total, len(pcs)))
    out.write("== per file (covered/total edges; each edge under its innermost inlined frame"
              " in this repository, else its innermost frame; * = meant to be covered)\n")
    for f in sorted(per_file, key=lambda f: (not mine(f), f)):
        c, n = per_file[f]
        out.write("%s %6d/%-6d %s\n" % ("*" if mine(f) else " ", c, n, f))
    out.write("\n== per function in the target's files (covered/total edges, lines)\n")
    for k in sorted((k for k in per_func if mine(k[0])), key=lambda k: (k[0], per_func[k][2])):
        c, n, lo, hi = per_func[k]
        out.write("%6d/%-6d %s:%s-%s %s\n" % (c, n, k[0], lo if hi else "?", hi or "?", k[1]))
    out.write("\n== libFuzzer -print_coverage (a function's edges, inlined code included,"
              " under the file of its entry)\n")
    for fn in funcs:
        out.write(fn[6] + "\n")

names = ", ".join("%s (%d)" % (short(k), per_func[k][1]) for k in zero[:4]) + (", ..." if len(zero) > 4 else "")
print("\t".join([target, "OK", str(ecov), str(etot), str(len(zero)), names, spec]))
PY
        failed+=("$t")
        printf '%s\tFAILED\n' "$t" >>"$results"
    fi
done

# --- The table.
echo
awk -F'\t' '
BEGIN { printf "%-14s %13s %7s  %-9s %s\n", "target", "edges", "share", "zero-cov", "meant to cover" }
$2 == "NOCORPUS" { printf "%-14s %13s %7s  %-9s %s\n", $1, "-", "-", "-", "(no corpus)"; next }
$2 == "FAILED"   { printf "%-14s %13s %7s  %-9s %s\n", $1, "-", "-", "-", "(failed, see above)"; next }
{
    share = $4 > 0 ? sprintf("%.1f%%", 100 * $3 / $4) : "n/a"
    printf "%-14s %13s %7s  %-9s %s\n", $1, $3 "/" $4, share, $5 " fns", ($7 == "" ? "(no mapping)" : $7)
    if ($4 == 0 && $7 != "") printf "%14s   none of that code is in the binary\n", ""
    if ($5 > 0) printf "%14s   never reached (edges): %s\n", "", $6
}' "$results"
echo
echo "per-function listings: fuzz/target/coverage/<target>.txt"

if [ "${#failed[@]}" -ne 0 ]; then
    echo "!! failed: ${failed[*]}" >&2
    exit 1
fi
