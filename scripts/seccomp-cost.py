#!/usr/bin/env python3
"""What vmkit's seccomp filters cost at start: process start -> guest entry (--stats),
-> the test guest's `hold` line, and the peak RSS, with --seccomp kill and off interleaved.

Usage: scripts/seccomp-cost.py [VMKIT [RUNS]]   (after `cargo build --release -p vmkit-vmm`
and the test guest's build: scripts/demo.sh does both)
"""
import subprocess, time, os, sys, re, statistics
ROOT=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMKIT=sys.argv[1] if len(sys.argv)>1 else os.path.join(ROOT,"target/release/vmkit")
GUEST=os.path.join(ROOT,"examples/test-guest/target/x86_64-unknown-linux-gnu/release/vmkit-test-guest")
IMG="/tmp/vmkit-seccomp-cost.img"
if not os.path.exists(IMG):
    with open(IMG,"wb") as f: f.truncate(4<<20)
def run(mode, mem=128):
    sock=f"/tmp/vmkit-seccomp-cost-{os.getpid()}.sock"
    if os.path.exists(sock): os.remove(sock)
    args=[VMKIT,"--kernel",GUEST,"--memory",f"{mem}M","--cmdline","hold=serial exit=poweroff","--stats",
          "--rng","--disk",f"path={IMG},readonly=on","--api-sock",sock,"--seccomp",mode]
    t0=time.monotonic_ns()
    p=subprocess.Popen(args,stdin=subprocess.PIPE,stdout=subprocess.PIPE,stderr=subprocess.PIPE)
    out=b""
    os.set_blocking(p.stdout.fileno(), False)
    while b"hold: waiting" not in out and time.monotonic_ns()-t0<10e9:
        try:
            c=p.stdout.read()
            if c: out+=c
        except Exception: pass
        if b"hold: waiting" not in out: time.sleep(0.0005)
    t_line=(time.monotonic_ns()-t0)/1e6
    time.sleep(0.1)
    st=open(f"/proc/{p.pid}/status").read()
    hwm=int(re.search(r"VmHWM:\s+(\d+)",st).group(1))
    smaps=open(f"/proc/{p.pid}/smaps").read()
    guest=0; cur=None
    for line in smaps.splitlines():
        m=re.match(r"^([0-9a-f]+)-([0-9a-f]+) ",line)
        if m:
            cur=(int(m.group(2),16)-int(m.group(1),16))==mem<<20; continue
        if cur and line.startswith("Rss:"): guest+=int(line.split()[1])
    p.stdin.write(b"x"); p.stdin.flush()
    _,err=p.communicate(timeout=10)
    m=re.search(rb"entering guest at monotonic_ns=(\d+)",err)
    t_entry=(int(m.group(1))-t0)/1e6
    return t_entry, t_line, hwm/1024, (hwm-guest)/1024
res={"kill":[], "off":[]}
for i in range(int(sys.argv[2]) if len(sys.argv)>2 else 10):
    for mode in ("kill","off"):
        res[mode].append(run(mode))
for mode,v in res.items():
    med=lambda k: statistics.median(x[k] for x in v)
    print(f"--seccomp {mode}: runs {len(v)}; start->guest entry {med(0):.2f} ms; start->guest line {med(1):.2f} ms; VmHWM {med(2):.2f} MiB; own (VmHWM - guest RAM Rss) {med(3):.2f} MiB")
