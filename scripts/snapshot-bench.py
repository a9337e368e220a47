#!/usr/bin/env python3
"""Snapshot and restore figures of vmkit (issue 16), on the PVH test guest and optionally the
Linux guest, with QEMU microvm's own save/restore beside them. Prints markdown tables.

  1. create: `PUT /snapshot/create` wall time, vmkit's own "N bytes of memory written in M us",
     memory file apparent/allocated bytes and state file bytes, Full and Diff, 128 MiB and 1 GiB;
  2. restore: spawn -> "entering guest" (--stats, CLOCK_MONOTONIC like time.monotonic_ns())
     and spawn -> "hold: released" (a byte waits on stdin), beside a fresh boot, interleaved;
     one strace of a restore for where its time goes;
  3. clones: 50 restores of one snapshot at once versus 50 fresh boots: wall time until all
     run, total RSS and PSS (/proc/PID/smaps_rollup) while all 50 run;
  4. QEMU microvm: `migrate exec:cat > FILE` (live: a stopped source leaves the destination
     paused), then `-incoming exec:cat FILE`, timed the same way;
  5. (--linux) the Linux guest booted to /init's VMKIT-HOLD versus restored from a snapshot
     taken there, to the vCPUs' entry and to VMKIT-RELEASED after a Ctrl-Alt-Del; then N
     restores of it at once (RSS/PSS while all run, all released).

The test guest spins its vCPU while it holds, so N of them at once compete for the host's
cores; its `hold=serial` gives up after 10 s of guest time, hence `hold=ticks` where a guest
must outlive a long measurement.

Usage: scripts/snapshot-bench.py [--runs N] [--clones N] [--linux] [--no-qemu] [--vmkit PATH]
(after `cargo build --release -p vmkit-vmm` and the test guest's build: scripts/demo.sh does both)
"""
import argparse, json, os, re, shutil, signal, socket, statistics, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "examples/test-guest/target/x86_64-unknown-linux-gnu/release/vmkit-test-guest")
WORK = f"/tmp/vmkit-snapshot-bench-{os.getpid()}"
LINUX_CMDLINE = "console=ttyS0 panic=-1 tsc=reliable no_timer_check lpj=5000000 rodata=off quiet"
ENTRY = re.compile(rb"entering guest at monotonic_ns=(\d+) cpu_us=(\d+)")
CREATED = re.compile(r"snapshot \S+ created: (\d+) bytes of memory written in (\d+) \S+")


def now():
    return time.monotonic_ns()


def ms(ns):
    return ns / 1e6


def med(xs):
    return statistics.median(xs) if xs else float("nan")


class Proc:
    """A child whose stdout and stderr are read by threads into buffers, with the time each
    needle was first seen."""

    def __init__(self, args, stdin_bytes=None, t0=None):
        self.t0 = t0 if t0 is not None else now()
        self.p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.out, self.err = b"", b""
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.seen = {}
        if stdin_bytes:
            self.write(stdin_bytes)
        for name in ("out", "err"):
            threading.Thread(target=self._read, args=(name,), daemon=True).start()

    def _read(self, name):
        f = getattr(self.p, "std" + name)
        while True:
            chunk = os.read(f.fileno(), 65536)
            t = now()
            with self.cond:
                if not chunk:
                    setattr(self, name + "_eof", True)
                    self.cond.notify_all()
                    return
                setattr(self, name, getattr(self, name) + chunk)
                buf = getattr(self, name)
                for needle in list(self.seen):
                    if self.seen[needle] is None and needle in buf:
                        self.seen[needle] = t
                self.cond.notify_all()

    def write(self, data):
        try:
            self.p.stdin.write(data)
            self.p.stdin.flush()
        except OSError:
            pass

    def wait_for(self, needle, timeout=30, where="out"):
        """Waits until `needle` is in stdout (or stderr); returns ns since t0 it was seen."""
        end = time.monotonic() + timeout
        with self.cond:
            if needle not in self.seen:
                self.seen[needle] = now() if needle in getattr(self, where) else None
            while self.seen[needle] is None:
                if needle in getattr(self, where):
                    self.seen[needle] = now()
                    break
                left = end - time.monotonic()
                if left <= 0 or getattr(self, where + "_eof", False):
                    raise RuntimeError(f"no {needle!r} in {where} of {self.p.args[0]}:\n"
                                       f"{self.out.decode(errors='replace')[-2000:]}\n"
                                       f"{self.err.decode(errors='replace')[-2000:]}")
                self.cond.wait(min(left, 0.05))
            return self.seen[needle] - self.t0

    def entry_ns(self, timeout=30):
        """The --stats "entering guest" stamp, ns since t0."""
        self.wait_for(b"entering guest", timeout, "err")
        time.sleep(0.001)
        with self.lock:
            m = ENTRY.search(self.err)
        while m is None:
            time.sleep(0.001)
            with self.lock:
                m = ENTRY.search(self.err)
        self.cpu_us = int(m.group(2))
        return int(m.group(1)) - self.t0

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait()


def http(sock_path, method, path, body=None, timeout=60):
    """One request to vmkit's (Firecracker's) API on a Unix socket: (status, body)."""
    data = json.dumps(body).encode() if body is not None else b""
    req = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(sock_path)
    s.sendall(req)
    resp = b""
    while b"\r\n\r\n" not in resp:
        c = s.recv(65536)
        if not c:
            break
        resp += c
    head, _, rest = resp.partition(b"\r\n\r\n")
    m = re.search(rb"content-length:\s*(\d+)", head, re.I)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        c = s.recv(65536)
        if not c:
            break
        rest += c
    s.close()
    return int(head.split()[1]), rest.decode(errors="replace")


def api(sock, method, path, body=None, want=204):
    code, text = http(sock, method, path, body)
    if code != want:
        raise RuntimeError(f"{method} {path}: {code} {text}")


def wait_sock(path, timeout=10):
    end = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise RuntimeError(f"no API socket {path}")
        time.sleep(0.001)


def fresh_dir(name):
    d = os.path.join(WORK, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def boot(vmkit, d, mem, cmdline, extra=(), kernel=None):
    sock = os.path.join(d, "api.sock")
    args = [vmkit, "--api-sock", sock, "--kernel", kernel or GUEST, "--memory", mem,
            "--cmdline", cmdline, "--stats", "--log-level", "info",
            "--log-file", os.path.join(d, "log"), *extra]
    p = Proc(args)
    wait_sock(sock)
    return p, sock


def snapshot(sock, d, kind):
    """Pauses (if running), creates a `kind` snapshot into d: the API's wall ns."""
    os.makedirs(d, exist_ok=True)
    body = {"snapshot_path": os.path.join(d, "vmstate"),
            "mem_file_path": os.path.join(d, "memory"), "snapshot_type": kind}
    t = now()
    api(sock, "PUT", "/snapshot/create", body)
    return now() - t


def logged_create(logfile):
    with open(logfile, errors="replace") as f:
        found = CREATED.findall(f.read())
    return (int(found[-1][0]), int(found[-1][1])) if found else (None, None)


def logged_create_line(logfile):
    b, us = logged_create(logfile)
    return f"{mib(b)} written in {us / 1000:.1f} ms" if b is not None else "no create line"


def sizes(d):
    st = os.stat(os.path.join(d, "memory"))
    return st.st_size, st.st_blocks * 512, os.stat(os.path.join(d, "vmstate")).st_size


def mib(n):
    return f"{n / (1 << 20):.2f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


# -- 1. create ------------------------------------------------------------------------------

def bench_create(vmkit, runs):
    rows = {}
    for r in range(runs):
        for mem in ("128M", "1G"):
            d = fresh_dir(f"create-{mem}")
            p, sock = boot(vmkit, d, mem, "hold=ticks:6000", ["--track-dirty-pages"])
            p.wait_for(b"tick 1")
            api(sock, "PATCH", "/vm", {"state": "Paused"})
            full = os.path.join(d, "full")
            wall = snapshot(sock, full, "Full")
            rec = rows.setdefault((mem, "Full"), [])
            rec.append((wall, *logged_create(os.path.join(d, "log")), *sizes(full)))
            api(sock, "PATCH", "/vm", {"state": "Resumed"})
            p.wait_for(b"tick 3")
            api(sock, "PATCH", "/vm", {"state": "Paused"})
            diff = os.path.join(d, "diff")
            wall = snapshot(sock, diff, "Diff")
            rec = rows.setdefault((mem, "Diff (after 2 ticks)"), [])
            rec.append((wall, *logged_create(os.path.join(d, "log")), *sizes(diff)))
            p.kill()
            shutil.rmtree(d, ignore_errors=True)
    print(f"\n### Snapshot create (test guest, hold=ticks, --track-dirty-pages; medians of {runs})\n")
    print("| RAM | kind | API wall | vmkit's log: written in | memory bytes written | "
          "memory file apparent | allocated | state file |")
    print("|---|---|---|---|---|---|---|---|")
    for (mem, kind), v in rows.items():
        col = lambda i: med([x[i] for x in v if x[i] is not None])
        print(f"| {mem}iB | {kind} | {ms(col(0)):.2f} ms | {col(2) / 1000:.2f} ms | {mib(col(1))} "
              f"| {mib(col(3))} | {mib(col(4))} | {col(5):.0f} B |")


# -- 2. restore -----------------------------------------------------------------------------

def take_hold_snapshot(vmkit, name, mem="128M", hold="hold=serial"):
    """A snapshot of the test guest waiting in `hold`, taken right after its first line."""
    d = fresh_dir(name)
    p, sock = boot(vmkit, d, mem, hold + " exit=poweroff")
    p.wait_for(b"hold: waiting" if hold == "hold=serial" else b"tick 1")
    api(sock, "PATCH", "/vm", {"state": "Paused"})
    snapshot(sock, d, "Full")
    p.kill()
    return d


def restore_once(vmkit, snap, extra=()):
    t0 = now()
    p = Proc([vmkit, "--restore", snap, "--stats", *extra], stdin_bytes=b"x", t0=t0)
    released = p.wait_for(b"hold: released")
    entry = p.entry_ns()
    p.p.wait(timeout=30)
    return entry, released, p.cpu_us


def boot_once(vmkit):
    t0 = now()
    p = Proc([vmkit, "--kernel", GUEST, "--memory", "128M", "--cmdline",
              "hold=serial exit=poweroff", "--stats"], stdin_bytes=b"x", t0=t0)
    released = p.wait_for(b"hold: released")
    entry = p.entry_ns()
    p.p.wait(timeout=30)
    return entry, released, p.cpu_us


def entry_only(args):
    """Spawn -> the --stats stamp with nothing else running in this script (no reader
    threads, serial off), the process killed there: (ns, cpu_us)."""
    t0 = now()
    p = subprocess.Popen(args + ["--serial", "off"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    buf = b""
    while not (ENTRY.search(buf) and buf.endswith(b"\n")):
        chunk = p.stderr.read1(4096)
        if not chunk:
            raise RuntimeError(f"no entry stamp: {buf.decode(errors='replace')}")
        buf += chunk
    p.kill()
    p.wait()
    m = ENTRY.search(buf)
    return int(m.group(1)) - t0, int(m.group(2))


def bench_restore(vmkit, runs, qemu):
    snap = take_hold_snapshot(vmkit, "restore-snap")
    qsnap = qemu_save(qemu) if qemu else None
    res = {"vmkit --restore": [], "vmkit boot": [], "QEMU -incoming": [], "QEMU boot": []}
    alone = {"vmkit --restore": [], "vmkit boot": []}
    for _ in range(runs):
        alone["vmkit --restore"].append(entry_only([vmkit, "--restore", snap, "--stats"]))
        alone["vmkit boot"].append(entry_only([vmkit, "--kernel", GUEST, "--memory", "128M",
                                               "--cmdline", "hold=serial", "--stats"]))
    for _ in range(runs):
        res["vmkit --restore"].append(restore_once(vmkit, snap))
        res["vmkit boot"].append(boot_once(vmkit))
        if qsnap:
            res["QEMU -incoming"].append(qemu_restore_once(qemu, qsnap))
            res["QEMU boot"].append(qemu_boot_once(qemu))
    print(f"\n### Restore: process start -> guest running (test guest, 128 MiB, 1 vCPU, "
          f"hold=serial; medians of {runs}, interleaved)\n")
    print("| how | spawn -> vCPUs entered (--stats): median, min | VMM CPU until then | "
          "spawn -> first output (\"hold: released\"): median, min, max |")
    print("|---|---|---|---|")
    for k, v in res.items():
        if not v:
            continue
        e = [x[0] for x in v if x[0] is not None]
        e = f"{ms(med(e)):.2f}, {ms(min(e)):.2f} ms" if e else "n/a"
        c = f"{med([x[2] for x in v]) / 1000:.2f} ms" if v[0][0] is not None else "n/a"
        r = [x[1] for x in v]
        print(f"| {k} | {e} | {c} | {ms(med(r)):.2f}, {ms(min(r)):.2f}, {ms(max(r)):.2f} ms |")
    print(f"\nAlone (no reader threads, `--serial off`, killed at entry; {runs} each, interleaved): "
          + "; ".join(f"{k}: spawn -> entered {ms(med([x[0] for x in v])):.2f} ms median, "
                      f"{ms(min(x[0] for x in v)):.2f} min, VMM CPU {med([x[1] for x in v]) / 1000:.2f} ms"
                      for k, v in alone.items()))
    if QEMU_LINES:
        print(f"\nQEMU's restored guest printed: {sorted(QEMU_LINES)}")
    breakdown(vmkit, snap)
    return snap


def breakdown(vmkit, snap, runs=7):
    """Restores under `strace -f -ttt -T`: the stages' median lengths, and the syscalls of
    the last run before its first KVM_RUN, summed by kind."""
    if not shutil.which("strace"):
        print("\n(no strace: no breakdown)")
        return
    out = os.path.join(WORK, "restore.strace")
    per_stage = {}
    for _ in range(runs):
        p = Proc(["strace", "-f", "-ttt", "-T", "-o", out, vmkit, "--restore", snap, "--stats"],
                 stdin_bytes=b"x")
        p.wait_for(b"hold: released")
        p.p.wait(timeout=30)
        for name, t in stages(out):
            per_stage.setdefault(name, []).append(t)
    line = re.compile(r"^(\d+)\s+(\d+\.\d+) (\w+)\((.*?)(?:\)\s+=|<unfinished).*?(?:<(\d+\.\d+)>)?$")
    costs = {}
    with open(out, errors="replace") as f:
        for l in f:
            m = line.match(l.rstrip())
            if not m:
                continue
            name, arg = m.group(3), m.group(4)
            if name == "ioctl":
                km = re.search(r"(KVM_\w+|_IOC\([^)]*\)|TC\w+|FIO\w+)", arg)
                name = "ioctl " + (km.group(1) if km else arg.split(",")[1].strip())
            elif name == "openat":
                fm = re.search(r'"([^"]+)"', arg)
                name += " " + os.path.basename(fm.group(1)) if fm else ""
            if "KVM_RUN" in name:
                break  # the restore ends here
            c = costs.setdefault(name, [0.0, 0])
            c[0] += float(m.group(5) or 0)
            c[1] += 1
    top = sorted(costs.items(), key=lambda kv: -kv[1][0])[:6]
    print(f"\n### Where a restore's time goes (under `strace -f -ttt -T`, which slows "
          f"every syscall; medians of {runs})\n")
    print("| stage (from the strace timeline) | ms |")
    print("|---|---|")
    for name, t in per_stage.items():
        print(f"| {name} | {med(t):.2f} |")
    print("\n| syscall before the first KVM_RUN (time inside, summed by kind) | calls | ms |")
    print("|---|---|---|")
    for name, (t, n) in top:
        print(f"| `{name}` | {n} | {t * 1000:.2f} |")


def stages(path):
    """The restore's stages, from markers in an strace -ttt log."""
    evs = []
    with open(path, errors="replace") as f:
        for l in f:
            m = re.match(r"^(\d+)\s+(\d+\.\d+) (.*)$", l.rstrip())
            if m:
                evs.append((float(m.group(2)), m.group(3)))
    def at(pred, after=0):
        """Index of the first event from `after` on that matches."""
        return next((i for i in range(after, len(evs)) if pred(evs[i][1])), None)
    state = at(lambda e: e.startswith("openat") and "vmstate" in e)
    scratch = at(lambda e: "KVM_CREATE_VM" in e)
    vm = at(lambda e: "KVM_CREATE_VM" in e, scratch + 1) if scratch is not None else None
    threads = at(lambda e: e.startswith("clone"), vm or 0)
    run = at(lambda e: "KVM_RUN" in e)
    t0, state, scratch, vm, threads, run = (
        None if i is None else evs[i][0] for i in (0, state, scratch, vm, threads, run))
    marks = [("exec, dynamic loader, Rust start, arguments", t0, state),
             ("read and check the state file, open /dev/kvm, KVM_GET_SUPPORTED_CPUID", state, scratch),
             ("host CPU identity: a scratch VM and vCPU (KVM_SET_CPUID2, KVM_GET_CPUID2), closed", scratch, vm),
             ("the VM: RAM mapped from the memory file, irqchip, PIT, devices, vCPU and device state", vm, threads),
             ("threads, seccomp filters, to the first KVM_RUN", threads, run),
             ("total: execve -> first KVM_RUN", t0, run)]
    return [(n, (b - a) * 1000) for n, a, b in marks if a is not None and b is not None]


# -- 3. clones ------------------------------------------------------------------------------

def rollup(pid):
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for l in f:
            if l.startswith("Rss:"):
                rss = int(l.split()[1])
            elif l.startswith("Pss:"):
                pss = int(l.split()[1])
    return rss, pss


def many(n, start, proof):
    """Starts n VMs at once (start(i) -> Proc); wall until all entered the guest and until
    all printed `proof` after that; total RSS/PSS while all run."""
    t0 = now()
    ps = [start(i, t0) for i in range(n)]
    try:
        entered = max(p.entry_ns(120) for p in ps)
        proven = max(p.wait_for(proof, 120) for p in ps)
        time.sleep(0.5)
        alive = sum(p.p.poll() is None for p in ps)
        tot = [rollup(p.p.pid) for p in ps if p.p.poll() is None]
        return entered, proven, alive, sum(x[0] for x in tot), sum(x[1] for x in tot)
    finally:
        for p in ps:
            p.kill()


def bench_clones(vmkit, n):
    snap = take_hold_snapshot(vmkit, "clone-snap", hold="hold=ticks:6000")
    # a restored guest goes on from its tick 1: "tick 2" is printed after the restore
    clones = many(n, lambda i, t0: Proc([vmkit, "--restore", snap, "--stats"], t0=t0), b"tick 2")
    boots = many(n, lambda i, t0: Proc([vmkit, "--kernel", GUEST, "--memory", "128M", "--cmdline",
                                        "hold=ticks:6000", "--stats"], t0=t0), b"tick 1")
    print(f"\n### {n} VMs at once (test guest, 128 MiB each, hold=ticks: every guest spins "
          f"its vCPU, on this 2-core host)\n")
    print("| how | all entered the guest | all printed a tick | running | total RSS | total PSS "
          "| PSS per VM |")
    print("|---|---|---|---|---|---|---|")
    for k, v in (("restores of one snapshot", clones), ("fresh boots", boots)):
        print(f"| {n} {k} | {ms(v[0]):.0f} ms | {ms(v[1]):.0f} ms | {v[2]} | "
              f"{v[3] / 1024:.1f} MiB | {v[4] / 1024:.1f} MiB | {v[4] / 1024 / max(v[2], 1):.2f} MiB |")


# -- 4. QEMU --------------------------------------------------------------------------------

QEMU_LINES = set()


def qemu_args(qemu, extra=()):
    return [qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128M",
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-no-reboot", "-kernel", GUEST, "-append", "hold=serial exit=poweroff", *extra]


def qmp(sock_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    f = s.makefile("rwb")
    f.readline()

    def cmd(name, args=None):
        f.write(json.dumps({"execute": name, **({"arguments": args} if args else {})}).encode() + b"\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                if "error" in r:
                    raise RuntimeError(f"QMP {name}: {r['error']}")
                return r["return"]
    cmd("qmp_capabilities")
    return cmd


def qemu_save(qemu):
    d = fresh_dir("qemu-snap")
    sock = os.path.join(d, "qmp.sock")
    p = Proc(qemu_args(qemu, ["-qmp", f"unix:{sock},server=on,wait=off"]))
    try:
        p.wait_for(b"hold: waiting")
        wait_sock(sock)
        cmd = qmp(sock)
        # live: a stopped source leaves the destination paused after -incoming
        f = os.path.join(d, "state")
        t = now()
        cmd("migrate", {"uri": f"exec:cat > {f}"})
        while True:
            st = cmd("query-migrate").get("status")
            if st in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.001)
        wall = now() - t
        if st != "completed":
            raise RuntimeError(f"QEMU migrate: {st}")
        size = os.stat(f).st_size
        print(f"\nQEMU microvm save (`migrate exec:cat > FILE` of the running guest, 128 MiB): "
              f"{ms(wall):.1f} ms, {mib(size)}")
        return f
    except Exception as e:
        print(f"\nQEMU microvm save/restore not measured: {str(e).splitlines()[0]}")
        return None
    finally:
        p.kill()


def poke(p, until):
    """Writes a byte to p's stdin every 0.5 ms until `until` is in its stdout (QEMU's UART
    drops a byte that comes before it is ready)."""
    def run():
        while until not in p.out and p.p.poll() is None:
            p.write(b"x")
            time.sleep(0.0005)
    threading.Thread(target=run, daemon=True).start()


def qemu_restore_once(qemu, f):
    p = Proc(qemu_args(qemu, ["-incoming", f"exec:cat {f}"]))
    poke(p, b"hold: ")
    try:
        # its first line after the restore: "hold: released", or "hold: FAIL ..." when the
        # guest's 10 s deadline (TSC) passed before QEMU read stdin; either says it runs
        t = p.wait_for(b"hold: ")
        p.wait_for(b"\n", 5)
        time.sleep(0.01)
        QEMU_LINES.add(p.out.split(b"hold: ", 1)[1].split(b"\n")[0].decode(errors="replace"))
        return None, t, None
    finally:
        p.kill()


def qemu_boot_once(qemu):
    p = Proc(qemu_args(qemu))
    try:
        # QEMU's UART drops a byte that comes before the guest set it up: wait for the hold
        p.wait_for(b"hold: waiting")
        p.write(b"x")
        return None, p.wait_for(b"hold: released"), None
    finally:
        p.kill()


# -- 5. Linux -------------------------------------------------------------------------------

def linux_artifacts():
    out = subprocess.run(["bash", os.path.join(ROOT, "examples/linux-guest/build.sh")],
                         capture_output=True, text=True, check=True).stdout
    kv = dict(l.split("=", 1) for l in out.splitlines() if "=" in l)
    return kv


def bench_linux(vmkit, runs, n_clones):
    a = linux_artifacts()
    kernel, initramfs = a["VMKIT_LINUX_KERNEL_MMIO"], a["VMKIT_LINUX_INITRAMFS"]
    cmdline = f"{LINUX_CMDLINE} reboot=k vmkit_hold=1"
    d = fresh_dir("linux")
    sock = os.path.join(d, "api.sock")
    base = [vmkit, "--kernel", kernel, "--initramfs", initramfs, "--cpu-template", "pvm",
            "--memory", "128M", "--cmdline", cmdline, "--stats"]
    boots, restores = [], []
    snap = os.path.join(d, "snap")
    for r in range(runs):
        if os.path.exists(sock):
            os.remove(sock)
        t0 = now()
        p = Proc(base + ["--api-sock", sock, "--log-level", "info", "--log-file",
                         os.path.join(d, "log")], t0=t0)
        hold = p.wait_for(b"VMKIT-HOLD", 300)
        entry = p.entry_ns()
        if r == 0:
            boot_rss = rollup(p.p.pid)
            # the snapshot, of this boot's hold; then it goes on
            api(sock, "PATCH", "/vm", {"state": "Paused"})
            wall = snapshot(sock, snap, "Full")
            api(sock, "PATCH", "/vm", {"state": "Resumed"})
            app, alloc, state = sizes(snap)
            print(f"\nLinux guest snapshot at /init's hold (128 MiB): create {ms(wall):.1f} ms, "
                  f"memory file {mib(app)} apparent, {mib(alloc)} allocated, state {state} B; "
                  f"vmkit's log: {logged_create_line(os.path.join(d, 'log'))}")
        t1 = now()
        api(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        released = p.wait_for(b"VMKIT-RELEASED", 60) - (t1 - t0)
        p.kill()
        boots.append((entry, hold, released))
        rsock = os.path.join(d, "r.sock")
        if os.path.exists(rsock):
            os.remove(rsock)
        t0 = now()
        p = Proc([vmkit, "--restore", snap, "--stats", "--api-sock", rsock], t0=t0)
        entry = p.entry_ns()
        wait_sock(rsock)
        t1 = now()
        api(rsock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        released = p.wait_for(b"VMKIT-RELEASED", 60)
        restores.append((entry, released, released - (t1 - t0)))
        p.kill()
    clones = linux_clones(vmkit, snap, d, n_clones, boot_rss)
    print(f"\n### Linux guest (128 MiB, 1 vCPU, virtio-mmio kernel): boot to /init versus restore "
          f"(medians of {runs})\n")
    print("| how | spawn -> vCPUs entered | spawn -> VMKIT-HOLD | spawn -> VMKIT-RELEASED | "
          "Ctrl-Alt-Del -> VMKIT-RELEASED |")
    print("|---|---|---|---|---|")
    print(f"| boot | {ms(med([x[0] for x in boots])):.2f} ms | {ms(med([x[1] for x in boots])):.0f} ms "
          f"| | {ms(med([x[2] for x in boots])):.1f} ms |")
    print(f"| restore | {ms(med([x[0] for x in restores])):.2f} ms | (in the snapshot) "
          f"| {ms(med([x[1] for x in restores])):.1f} ms | {ms(med([x[2] for x in restores])):.1f} ms |")
    entered, rss, pss, released, ok, n = clones
    print(f"\n{n} restores of that snapshot at once (each idle in /init's `sleep` loop): all vCPUs "
          f"entered after {ms(entered):.0f} ms; while all {n} run, total RSS {rss / 1024:.1f} MiB, "
          f"total PSS {pss / 1024:.1f} MiB ({pss / 1024 / n:.2f} MiB per VM; one booted VM at its "
          f"hold: RSS {boot_rss[0] / 1024:.1f} MiB, PSS {boot_rss[1] / 1024:.1f} MiB); a Ctrl-Alt-Del "
          f"to each: {ok} of {n} printed VMKIT-RELEASED, all within {ms(released):.0f} ms of the first "
          f"request")


def linux_clones(vmkit, snap, d, n, boot_rss):
    """n restores of the Linux snapshot at once: wall until all entered, total RSS/PSS while
    all run, then a Ctrl-Alt-Del to each and the wall until all printed VMKIT-RELEASED."""
    ps, socks = [], []
    t0 = now()
    for i in range(n):
        sock = os.path.join(d, f"c{i}.sock")
        if os.path.exists(sock):
            os.remove(sock)
        socks.append(sock)
        ps.append(Proc([vmkit, "--restore", snap, "--stats", "--api-sock", sock], t0=t0))
    try:
        entered = max(p.entry_ns(120) for p in ps)
        time.sleep(0.5)
        tot = [rollup(p.p.pid) for p in ps]
        t1 = now()
        for sock in socks:
            wait_sock(sock)
            api(sock, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        ok, last = 0, 0
        for p in ps:
            try:
                last = max(last, p.wait_for(b"VMKIT-RELEASED", 60) - (t1 - t0))
                ok += 1
            except RuntimeError:
                pass
        return entered, sum(x[0] for x in tot), sum(x[1] for x in tot), last, ok, n
    finally:
        for p in ps:
            p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmkit", default=os.path.join(ROOT, "target/release/vmkit"))
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--create-runs", type=int, default=5)
    ap.add_argument("--clones", type=int, default=50)
    ap.add_argument("--linux", action="store_true", help="also the Linux guest (a boot is 15-40 s)")
    ap.add_argument("--linux-runs", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--only", default="create,restore,clones,linux")
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    qemu = None if a.no_qemu else shutil.which("qemu-system-x86_64")
    only = a.only.split(",")
    out = subprocess.run([a.vmkit, "--version"], capture_output=True, text=True).stdout.strip()
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    print(f"{out} ({rev}); {os.uname().release}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the start; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    try:
        if "create" in only:
            bench_create(a.vmkit, a.create_runs)
        if "restore" in only:
            bench_restore(a.vmkit, a.runs, qemu)
        if "clones" in only:
            bench_clones(a.vmkit, a.clones)
        if a.linux and "linux" in only:
            bench_linux(a.vmkit, a.linux_runs, a.clones)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
