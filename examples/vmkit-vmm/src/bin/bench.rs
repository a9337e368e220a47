//! `vmkit-bench`: start-up, footprint and PIO-exit figures of `vmkit` on the PVH test guest.
//!
//! ```text
//! vmkit-bench [--runs N] [--pio N]
//! ```
//! It reports; it asserts nothing about time. Build the test guest and `vmkit` (release) first;
//! `scripts/bench.sh` does both and runs this.

#[path = "../clock.rs"]
mod clock;
use clock::monotonic_ns;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::GuestMemoryMmap;
use vmkit_boot::{BootConfig, EntryPoint};
use vmkit_irq::{Irqchip, IrqchipConfig};
/// The debug MMIO page of `vmkit` (see `src/virtio.rs`).
const DEBUG_MMIO: u64 = 0xD0F0_0000;

use vmkit_vcpu::{setup_entry, setup_fpu, setup_lint, CpuidConfig, CpuidTemplate, EntryState};

struct Run {
    ready_ms: f64,
    exit_ms: f64,
    setup_ms: Option<f64>,
    setup_cpu_ms: Option<f64>,
    total_cpu_ms: f64,
    max_rss_kib: u64,
    /// vmkit only: guest RAM resident at exit.
    guest_kib: Option<u64>,
}

/// The two VMMs, booting the same guest.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Vmkit,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Vmkit => "vmkit",
            Vmm::Qemu => "QEMU microvm",
        }
    }

    fn command(self, vmkit: &Path, guest: &Path, memory: &str, cmdline: &str) -> Command {
        let guest = guest.to_str().unwrap_or_default();
        match self {
            Vmm::Vmkit => {
                let mut c = Command::new(vmkit);
                c.args([
                    "--kernel",
                    guest,
                    "--memory",
                    memory,
                    "--cmdline",
                    cmdline,
                    "--stats",
                ]);
                c
            }
            Vmm::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args([
                    "-M",
                    "microvm",
                    "-enable-kvm",
                    "-cpu",
                    "host,-arch-capabilities",
                ])
                .args(["-m", memory, "-smp", "1", "-nodefaults", "-no-user-config"])
                .args(["-nographic", "-serial", "stdio", "-no-reboot"])
                .args(["-kernel", guest, "-append", cmdline]);
                c
            }
        }
    }
}

/// Runs a VMM once; times the ready line and the exit, reads its rusage.
fn run_vmm(
    vmm: Vmm,
    vmkit: &Path,
    guest: &Path,
    memory: &str,
    cmdline: &str,
    extra: &[&str],
) -> Result<Run, String> {
    let t0 = monotonic_ns();
    let start = Instant::now();
    let mut child = vmm
        .command(vmkit, guest, memory, cmdline)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", vmm.name()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut ready_ms = None;
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if ready_ms.is_none() && line.contains("vmkit-test-guest: ready") {
            ready_ms = Some(start.elapsed().as_secs_f64() * 1e3);
        }
        lines.push(line);
    }
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child and writes into locals we own.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let exit_ms = start.elapsed().as_secs_f64() * 1e3;
    if r != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!(
            "{} failed (status {status}): {stderr}\n{}",
            vmm.name(),
            lines.join("\n")
        ));
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    let (mut setup_ms, mut setup_cpu_ms) = (None, None);
    for l in stderr.lines() {
        if let Some(rest) = l.strip_prefix("vmkit: entering guest at monotonic_ns=") {
            let mut it = rest.split(" cpu_us=");
            let ns: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let cpu: u64 = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            setup_ms = Some(ns.saturating_sub(t0) as f64 / 1e6);
            setup_cpu_ms = Some(cpu as f64 / 1e3);
        }
    }
    Ok(Run {
        ready_ms: ready_ms.ok_or_else(|| format!("no ready line:\n{}", lines.join("\n")))?,
        exit_ms,
        setup_ms,
        setup_cpu_ms,
        total_cpu_ms: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kib: ru.ru_maxrss as u64,
        guest_kib: stderr.lines().find_map(|l| {
            l.strip_prefix("vmkit: guest memory resident: ")?
                .strip_suffix(" KiB")?
                .parse()
                .ok()
        }),
    })
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let med = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (v[0], med, v[v.len() - 1])
}

/// The same guest and command line under a bare kvm-ioctls loop: no bus, no devices, a
/// `match` on the exit. Setup reuses the vmkit crates (it is not what is measured).
fn bare_loop(guest: &Path, cmdline: &str) -> Result<(String, f64), String> {
    let kvm = Kvm::new().map_err(|e| e.to_string())?;
    let vm = kvm.create_vm().map_err(|e| e.to_string())?;
    let mem: GuestMemoryMmap =
        vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig::new(128 << 20))
            .map_err(|e| e.to_string())?;
    let _slots = vmkit_memory::register_memory_slots(&vm, &mem).map_err(|e| e.to_string())?;
    let _chip = Irqchip::new(&vm, IrqchipConfig::default()).map_err(|e| e.to_string())?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| e.to_string())?;
    let cpuid = CpuidTemplate::from_kvm(&kvm)
        .and_then(|t| {
            t.for_vcpu(
                0,
                &CpuidConfig {
                    num_cpus: 1,
                    masks: vec![],
                },
            )
        })
        .map_err(|e| e.to_string())?;
    vcpu.set_cpuid2(&cpuid).map_err(|e| e.to_string())?;
    setup_fpu(&vcpu).map_err(|e| e.to_string())?;
    setup_lint(&vcpu).map_err(|e| e.to_string())?;
    let rsdp = vmkit_boot::create_acpi_tables(&mem, &vmkit_boot::AcpiConfig::default())
        .map_err(|e| e.to_string())?;
    let mut kernel = std::fs::File::open(guest).map_err(|e| e.to_string())?;
    let loaded = vmkit_boot::load(
        &mem,
        &mut kernel,
        BootConfig {
            cmdline,
            rsdp: Some(rsdp),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let EntryPoint::Pvh { entry, start_info } = loaded.entry else {
        return Err("the test guest is not PVH".into());
    };
    setup_entry(&vcpu, &mem, EntryState::Pvh { entry, start_info }).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let start = Instant::now();
    let mut exits = 0u64;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => exits += 1,
            Ok(VcpuExit::MmioWrite(DEBUG_MMIO, _)) => exits += 1,
            Ok(VcpuExit::MmioRead(_, d)) => d.fill(0xff),
            Ok(VcpuExit::IoOut(0x3f8, d)) => out.push(d[0]),
            Ok(VcpuExit::IoIn(0x3fd, d)) => d[0] = 0x60, // THR empty
            Ok(VcpuExit::IoOut(0x600, _)) | Ok(VcpuExit::IoOut(0x64, _)) => break,
            Ok(VcpuExit::IoIn(_, d)) => d.fill(0xff),
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Hlt) => break,
            Ok(_) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    let wall = start.elapsed().as_secs_f64() * 1e9 / exits.max(1) as f64;
    Ok((String::from_utf8_lossy(&out).into_owned(), wall))
}

fn main() {
    let mut runs = 20usize;
    let mut pio = 1_000_000u64;
    let rng_runs = 5usize;
    let mut blk_secs = 2u64;
    let mut svg_dir: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let raw = args.next();
        if a == "--svg-dir" {
            svg_dir = raw.map(PathBuf::from);
            continue;
        }
        let v = raw.and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), v) {
            ("--runs", Some(n)) if n > 0 => runs = n as usize,
            ("--pio", Some(n)) if n > 0 => pio = n,
            ("--blk-secs", Some(n)) if n > 0 => blk_secs = n,
            _ => {
                eprintln!("usage: vmkit-bench [--runs N] [--pio N] [--blk-secs N] [--svg-dir DIR]");
                std::process::exit(2);
            }
        }
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let exe = std::env::current_exe().expect("current exe");
    let vmkit = exe.with_file_name("vmkit");
    let guest =
        root.join("examples/test-guest/target/x86_64-unknown-linux-gnu/release/vmkit-test-guest");
    if !guest.exists() || !vmkit.exists() {
        eprintln!("build first: cargo build --release -p vmkit-vmm; (cd examples/test-guest && cargo build --release)");
        std::process::exit(1);
    }
    let fail = |e: String| -> ! {
        eprintln!("vmkit-bench: {e}");
        std::process::exit(1)
    };

    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut charts: Vec<Chart> = Vec::new();
    let vmms: Vec<Vmm> = if have_qemu {
        vec![Vmm::Vmkit, Vmm::Qemu]
    } else {
        eprintln!("vmkit-bench: qemu-system-x86_64 not found: QEMU columns left out");
        vec![Vmm::Vmkit]
    };

    println!(
        "## Start-up ({runs} runs each, alternating, 1 vCPU, 128 MiB, guest `exit=poweroff`)\n"
    );
    let mut rs: Vec<Vec<Run>> = vmms.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, &vmm) in vmms.iter().enumerate() {
            let r = run_vmm(vmm, &vmkit, &guest, "128M", "exit=poweroff", &[])
                .unwrap_or_else(|e| fail(e));
            rs[i].push(r);
        }
    }
    let cell = |v: Vec<f64>| -> (String, f64) {
        if v.is_empty() {
            return ("–".into(), f64::NAN);
        }
        let (min, med, max) = stats(v);
        (format!("{med:.2} ({min:.2}–{max:.2})"), med)
    };
    let header = vmms
        .iter()
        .map(|v| v.name())
        .collect::<Vec<_>>()
        .join(" | ");
    let ratio_col = vmms.len() > 1;
    println!(
        "| median (min–max), ms | {header} |{}",
        if ratio_col { " vmkit / QEMU |" } else { "" }
    );
    println!(
        "|---|{}",
        "---|".repeat(vmms.len() + usize::from(ratio_col))
    );
    let row = |name: &str, f: &dyn Fn(&Run) -> Option<f64>| {
        let cells: Vec<(String, f64)> = rs
            .iter()
            .map(|runs| cell(runs.iter().filter_map(f).collect()))
            .collect();
        let text = cells
            .iter()
            .map(|c| c.0.clone())
            .collect::<Vec<_>>()
            .join(" | ");
        let ratio = if ratio_col && cells[1].1.is_finite() && cells[0].1.is_finite() {
            format!(" {:.2} |", cells[0].1 / cells[1].1)
        } else if ratio_col {
            " – |".into()
        } else {
            String::new()
        };
        println!("| {name} | {text} |{ratio}");
    };
    row("process start → entering the guest", &|r| r.setup_ms);
    row("VMM CPU time until guest entry", &|r| r.setup_cpu_ms);
    row("process start → guest ready line", &|r| Some(r.ready_ms));
    row("process start → process exit", &|r| Some(r.exit_ms));
    row("VMM CPU time, whole run", &|r| Some(r.total_cpu_ms));
    let med = |runs: &Vec<Run>, f: &dyn Fn(&Run) -> f64| stats(runs.iter().map(f).collect()).1;
    charts.push(Chart::new(
        "process start to guest ready line (ms, lower is better)",
        vmms.iter()
            .zip(&rs)
            .map(|(v, r)| (v.name().to_string(), med(r, &|r| r.ready_ms)))
            .collect(),
    ));
    charts.push(Chart::new(
        "process start to exit (ms, lower is better)",
        vmms.iter()
            .zip(&rs)
            .map(|(v, r)| (v.name().to_string(), med(r, &|r| r.exit_ms)))
            .collect(),
    ));

    println!("\n## Footprint (peak RSS of the VMM process, guest `exit=poweroff`, median of 5)\n");
    println!(
        "| guest memory | {} |{}",
        vmms.iter()
            .map(|v| format!("{} (MiB)", v.name()))
            .collect::<Vec<_>>()
            .join(" | "),
        if ratio_col { " vmkit / QEMU |" } else { "" }
    );
    println!(
        "|---|{}",
        "---|".repeat(vmms.len() + usize::from(ratio_col))
    );
    let mut own = Vec::new();
    for mem in ["128M", "1G"] {
        let v = (0..5)
            .map(|_| {
                run_vmm(Vmm::Vmkit, &vmkit, &guest, mem, "exit=poweroff", &[])
                    .map(|r| (r.max_rss_kib as f64 - r.guest_kib.unwrap_or(0) as f64) / 1024.0)
            })
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| fail(e));
        own.push((mem, stats(v).1));
    }
    for mem in ["128M", "1G"] {
        let meds: Vec<f64> = vmms
            .iter()
            .map(|&vmm| {
                let v = (0..5)
                    .map(|_| {
                        run_vmm(vmm, &vmkit, &guest, mem, "exit=poweroff", &[])
                            .map(|r| r.max_rss_kib as f64 / 1024.0)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap_or_else(|e| fail(e));
                stats(v).1
            })
            .collect();
        let text = meds
            .iter()
            .map(|m| format!("{m:.2}"))
            .collect::<Vec<_>>()
            .join(" | ");
        let ratio = if ratio_col {
            format!(" {:.2} |", meds[0] / meds[1])
        } else {
            String::new()
        };
        println!("| {mem} | {text} |{ratio}");
        charts.push(Chart::new(
            &format!("peak RSS with a {mem} guest (MiB, lower is better)"),
            vmms.iter()
                .map(|v| v.name().to_string())
                .zip(meds.iter().copied())
                .collect(),
        ));
    }
    println!();
    for (mem, v) in own {
        println!(
            "vmkit's own memory with a {mem} guest (peak RSS minus the guest RAM resident at \
             exit): {v:.2} MiB"
        );
    }

    start_rate(&vmkit, &guest, &vmms, &mut charts).unwrap_or_else(|e| fail(e));

    println!(
        "\n## virtio devices: rng throughput and exits, boot with rng + console \
         (median of {rng_runs})\n"
    );
    // One vmkit run with --rng and --console on `transport`; returns its stdout and the
    // MMIO + PIO exits its vCPUs counted.
    let vmkit_run = |transport: &str, cmdline: &str| -> (String, f64, f64) {
        let mut c = Vmm::Vmkit.command(&vmkit, &guest, "128M", cmdline);
        c.args([
            "--rng",
            "--console",
            "file=/dev/null",
            "--transport",
            transport,
        ]);
        let out = c
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| fail(e.to_string()));
        let err = String::from_utf8_lossy(&out.stderr);
        let count = |what: &str| -> f64 {
            err.lines()
                .filter_map(|l| l.split(&format!(" {what} exits")).next())
                .filter_map(|l| l.rsplit(' ').next())
                .filter_map(|n| n.parse::<f64>().ok())
                .sum()
        };
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            count("mmio"),
            count("pio"),
        )
    };
    let rate_of = |text: &str, who: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("virtio-rng: 1048576 bytes in "))
            .and_then(|l| l.split(" ms (").nth(1))
            .and_then(|l| l.split(" KiB/s)").next())
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or_else(|| fail(format!("{who}: no virtio-rng line:\n{text}")))
    };
    println!(
        "| VMM, transport | rng KiB/s | vCPU exits per 4 KiB request | boot to ready (ms) | boot to exit (ms) |"
    );
    println!("|---|---|---|---|---|");
    let mut rng_by_transport = Vec::new();
    for transport in ["mmio", "pci"] {
        let mut rates = Vec::new();
        let mut per_req = Vec::new();
        for _ in 0..rng_runs {
            let (text, mmio, pio) = vmkit_run(transport, "test=virtio-rng");
            rates.push(rate_of(&text, "vmkit"));
            // The same devices without the test: what discovery and set-up cost.
            let (_, mmio0, pio0) = vmkit_run(transport, "exit=poweroff");
            // 256 requests, plus two device initialisations (the test resets and reuses).
            per_req.push(((mmio + pio) - (mmio0 + pio0)).max(0.0) / 256.0);
        }
        let mut ready = Vec::new();
        let mut exit = Vec::new();
        for _ in 0..rng_runs {
            let extra = [
                "--rng",
                "--console",
                "file=/dev/null",
                "--transport",
                transport,
            ];
            let r = run_vmm(Vmm::Vmkit, &vmkit, &guest, "128M", "exit=poweroff", &extra)
                .unwrap_or_else(|e| fail(e));
            ready.push(r.ready_ms);
            exit.push(r.exit_ms);
        }
        let rate = stats(rates).1;
        rng_by_transport.push(rate);
        println!(
            "| vmkit, virtio-{transport} | {rate:.0} | {:.2} | {:.1} | {:.1} |",
            stats(per_req).1,
            stats(ready).1,
            stats(exit).1
        );
    }
    if have_qemu {
        let mut rates = Vec::new();
        for _ in 0..rng_runs {
            // microvm with ACPI does not put virtio_mmio.device= on the command line; the
            // first -device takes the top transport slot (0xfeb02e00, GSI 47).
            let mut c = Vmm::Qemu.command(
                &vmkit,
                &guest,
                "128M",
                "test=virtio-rng virtio_mmio.device=512@0xfeb02e00:47",
            );
            c.args(["-device", "virtio-rng-device"]);
            let out = c
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| fail(e.to_string()));
            rates.push(rate_of(&String::from_utf8_lossy(&out.stdout), "QEMU"));
        }
        let q = stats(rates).1;
        charts.push(Chart::new(
            "virtio-rng through the guest driver (KiB/s, higher is better)",
            vec![
                ("vmkit virtio-mmio".into(), rng_by_transport[0]),
                ("vmkit virtio-pci".into(), rng_by_transport[1]),
                ("QEMU virtio-mmio".into(), q),
            ],
        ));
        println!("| QEMU microvm, virtio-mmio | {q:.0} | – | – | – |");
        println!(
            "\nvmkit virtio-mmio / QEMU virtio-mmio rng throughput = {:.2}",
            rng_by_transport[0] / q
        );
    }
    println!(
        "\n1 MiB is 256 requests of 4 KiB, one in flight. Exits per request are the vCPU exits \
         to the VMM (MMIO + PIO) of a run with the test minus a run without it, over 256; they \
         include two device initialisations and the test's own serial lines (~100 bytes at two \
         PIO exits each, ~0.8 per request on their own). Queue notifications go through ioeventfds and \
         interrupts through irqfds on both transports; what remains on PCI is the driver's \
         (virtio-drivers 0.13 reads `queue_notify_off` on every notify)."
    );

    blk_bench(&vmkit, &guest, blk_secs, have_qemu, &mut charts).unwrap_or_else(|e| fail(e));

    println!(
        "\n## Exit cost: {pio} port writes and {pio} MMIO writes at guest CPL3 \
         (ns per exit by the guest's TSC)\n"
    );
    println!(
        "| exit | bare kvm-ioctls loop | vmkit (`Vcpu::run` → `IoBus` → `DebugPort`) | vmkit / bare |{}",
        if have_qemu { " QEMU microvm | QEMU / bare |" } else { "" }
    );
    println!(
        "|---|---|---|---|{}",
        if have_qemu { "---|---|" } else { "" }
    );
    for kind in ["pio", "mmio"] {
        let cmd = match kind {
            "pio" => format!("bench=pio:{pio}"),
            _ => format!("bench=mmio:{pio}:0x{DEBUG_MMIO:x}"),
        };
        let line = |text: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("bench {kind}: ")))
                .and_then(|l| l.split(", ").nth(1))
                .and_then(|l| l.strip_suffix(" ns/exit"))
                .and_then(|n| n.parse().ok())
        };
        let of = |vmm: Vmm| -> f64 {
            let out = vmm
                .command(&vmkit, &guest, "128M", &cmd)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| fail(e.to_string()));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            line(&text).unwrap_or_else(|| fail(format!("{}: no {kind} line:\n{text}", vmm.name())))
        };
        let ours = of(Vmm::Vmkit);
        let (bare_out, _) = bare_loop(&guest, &cmd).unwrap_or_else(|e| fail(e));
        let bare =
            line(&bare_out).unwrap_or_else(|| fail(format!("bare: no {kind} line:\n{bare_out}")));
        let q = if have_qemu {
            let q = of(Vmm::Qemu);
            format!(" {q:.0} | {:.3} |", q / bare)
        } else {
            String::new()
        };
        println!("| {kind} | {bare:.0} | {ours:.0} | {:.3} |{q}", ours / bare);
        charts.push(Chart::new(
            &format!("{kind} exit round trip (ns, lower is better)"),
            vec![("bare loop".into(), bare), ("vmkit".into(), ours)],
        ));
    }
    println!(
        "\nThe bare loop runs the same guest under a `match` on `VcpuExit` with no bus and no \
         device; QEMU's port 0x80 and MMIO page 0x{DEBUG_MMIO:x} are unassigned (still an exit \
         to QEMU)."
    );
    if let Some(dir) = svg_dir {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail(format!("{}: {e}", dir.display())));
        println!("\n## Charts\n");
        for (i, c) in charts.iter().enumerate() {
            let name = format!("chart-{i:02}.svg");
            std::fs::write(dir.join(&name), c.svg())
                .unwrap_or_else(|e| fail(format!("{name}: {e}")));
            println!("![{}](bench/{name})\n", c.title);
        }
    }
}

/// The four block workloads of the test guest, in the order it runs them.
const BLK_WORKLOADS: [(&str, &str, u32); 4] = [
    ("4 KiB random read, QD 1", "blk-rand4k", 1),
    ("4 KiB random read, QD 32", "blk-rand4k", 32),
    ("128 KiB sequential read, QD 1", "blk-seq128k", 1),
    ("128 KiB sequential read, QD 32", "blk-seq128k", 32),
];

/// (req/s, MiB/s) of each workload from the guest's `bench blk-…` lines.
fn guest_blk_lines(text: &str) -> Option<Vec<(f64, f64)>> {
    BLK_WORKLOADS
        .iter()
        .map(|(_, name, qd)| {
            let line = text
                .lines()
                .find_map(|l| l.strip_prefix(&format!("bench {name} qd{qd}: ")))?;
            let mut parts = line.split(", ");
            parts.next()?;
            let rps = parts.next()?.strip_suffix(" req/s")?.parse().ok()?;
            let mbs = parts.next()?.split(" MiB/s").next()?.parse().ok()?;
            Some((rps, mbs))
        })
        .collect()
}

/// One boot running every workload; returns the guest's figures and (for vmkit) the vCPU
/// exit count. The caller measures the VMM's CPU time around it (`children_cpu_ms`).
type BlkRun = (Vec<(f64, f64)>, Option<f64>);

fn blk_boot(mut cmd: Command) -> Result<BlkRun, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let rows =
        guest_blk_lines(&text).ok_or_else(|| format!("no blk bench lines:\n{text}\n{err}"))?;
    let exits: f64 = err
        .lines()
        .filter(|l| l.contains(" pio exits, "))
        .filter_map(|l| {
            // "vmkit: vcpu0: 782 pio exits, 128 mmio exits, 1 interrupted"
            let pio = l
                .split(": ")
                .nth(2)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()?;
            let mmio = l
                .split(" pio exits, ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()?;
            Some(pio + mmio)
        })
        .sum();
    Ok((rows, err.contains(" pio exits, ").then_some(exits)))
}

/// CPU time (ms) of all reaped children so far.
fn children_cpu_ms() -> f64 {
    // SAFETY: an all-zero rusage is valid for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// A 1 GiB image of random bytes next to the build, made once.
fn bench_image() -> Result<PathBuf, String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-disk-1g.img");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == 1 << 30) {
        return Ok(path);
    }
    let status = Command::new("dd")
        .args(["if=/dev/urandom", "bs=1M", "count=1024", "status=none"])
        .arg(format!("of={}", path.display()))
        .status()
        .map_err(|e| format!("dd: {e}"))?;
    if !status.success() {
        return Err("dd could not write the benchmark image".into());
    }
    Ok(path)
}

fn fio(
    img: &Path,
    rw: &str,
    bs: &str,
    qd: u32,
    secs: u64,
    direct: bool,
) -> Result<(f64, f64), String> {
    // One request at a time: plain preadv (io_uring would punt buffered reads to its worker
    // threads); more: io_uring. `--invalidate=0` keeps fio from dropping the page cache.
    let engine = if qd == 1 {
        "--ioengine=psync"
    } else {
        "--ioengine=io_uring"
    };
    let out = Command::new("fio")
        .args([
            "--name=ceiling",
            engine,
            "--invalidate=0",
            "--time_based",
            "--output-format=terse",
        ])
        .arg(format!("--filename={}", img.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={qd}"))
        .arg(format!("--runtime={secs}"))
        .arg(format!("--direct={}", u8::from(direct)))
        .output()
        .map_err(|e| format!("fio: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // Terse v3: field 6 is read bandwidth (KiB/s), field 7 read IOPS.
    let f: Vec<&str> = text.trim().split(';').collect();
    let bw: f64 = f
        .get(6)
        .and_then(|v| v.parse().ok())
        .ok_or(format!("fio output: {text}"))?;
    let iops: f64 = f
        .get(7)
        .and_then(|v| v.parse().ok())
        .ok_or(format!("fio output: {text}"))?;
    Ok((iops, bw / 1024.0))
}

fn blk_bench(
    vmkit: &Path,
    guest: &Path,
    secs: u64,
    have_qemu: bool,
    charts: &mut Vec<Chart>,
) -> Result<(), String> {
    let img = bench_image()?;
    let have_fio = Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let cmdline = BLK_WORKLOADS
        .iter()
        .map(|(_, name, qd)| format!("bench={name}:{qd}:{secs}"))
        .collect::<Vec<_>>()
        .join(" ");
    println!(
        "\n## virtio-blk: reads of a 1 GiB file of random bytes through the guest's driver \
         ({secs} s per workload; host `fio` on the same file — psync at QD 1, io_uring at QD 32 — is the ceiling)\n"
    );
    for direct in [false, true] {
        // Page cache: warm it first, so every VMM reads from memory.
        if !direct {
            let _ = Command::new("cat").arg(&img).stdout(Stdio::null()).status();
        }
        // (name, per-workload (req/s, MiB/s), VMM CPU ms, vCPU exits)
        let mut configs: Vec<(String, BlkRun, f64)> = Vec::new();
        for (transport, engine) in [
            ("mmio", "sync"),
            ("mmio", "io_uring"),
            ("pci", "sync"),
            ("pci", "io_uring"),
        ] {
            let mut c = Vmm::Vmkit.command(vmkit, guest, "128M", &cmdline);
            c.arg("--disk")
                .arg(format!(
                    "path={},engine={engine},direct={}",
                    img.display(),
                    if direct { "on" } else { "off" }
                ))
                .args(["--transport", transport]);
            let before = children_cpu_ms();
            let (rows, exits) = blk_boot(c)?;
            let cpu = children_cpu_ms() - before;
            configs.push((format!("vmkit {transport} {engine}"), (rows, exits), cpu));
        }
        if have_qemu {
            let mut c = Vmm::Qemu.command(
                vmkit,
                guest,
                "128M",
                &format!("{cmdline} virtio_mmio.device=512@0xfeb02e00:47"),
            );
            c.arg("-drive")
                .arg(format!(
                    "if=none,id=d0,file={},format=raw,aio=io_uring,cache={}",
                    img.display(),
                    if direct { "none" } else { "writeback" }
                ))
                .args(["-device", "virtio-blk-device,drive=d0"]);
            let before = children_cpu_ms();
            let run = blk_boot(c)?;
            let cpu = children_cpu_ms() - before;
            configs.push(("QEMU mmio io_uring".into(), run, cpu));
        }
        println!(
            "### {}\n",
            if direct {
                "`direct=on` (O_DIRECT; QEMU `cache=none`)"
            } else {
                "host page cache (file read once beforehand; QEMU `cache=writeback`)"
            }
        );
        let header = configs
            .iter()
            .map(|c| c.0.as_str())
            .collect::<Vec<_>>()
            .join(" | ");
        println!(
            "| req/s (MiB/s) | {header} |{}",
            if have_fio { " host fio |" } else { "" }
        );
        println!(
            "|---|{}",
            "---|".repeat(configs.len() + usize::from(have_fio))
        );
        for (w, (label, name, qd)) in BLK_WORKLOADS.iter().enumerate() {
            let mut cells: Vec<String> = configs
                .iter()
                .map(|c| format!("{:.0} ({:.0})", c.1 .0[w].0, c.1 .0[w].1))
                .collect();
            if have_fio {
                let (rw, bs) = if *name == "blk-rand4k" {
                    ("randread", "4k")
                } else {
                    ("read", "128k")
                };
                let (iops, mbs) = fio(&img, rw, bs, *qd, secs, direct)?;
                cells.push(format!("{iops:.0} ({mbs:.0})"));
            }
            println!("| {label} | {} |", cells.join(" | "));
            charts.push(Chart::new(
                &format!(
                    "virtio-blk {label}, {} (req/s, higher is better)",
                    if direct { "O_DIRECT" } else { "page cache" }
                ),
                configs.iter().map(|c| (c.0.clone(), c.1 .0[w].0)).collect(),
            ));
        }
        println!(
            "\n| per request, whole boot | {header} |\n|---|{}",
            "---|".repeat(configs.len())
        );
        let requests: Vec<f64> = configs
            .iter()
            .map(|c| c.1 .0.iter().map(|(rps, _)| rps * secs as f64).sum())
            .collect();
        let cpu = configs
            .iter()
            .zip(&requests)
            .map(|(c, n)| format!("{:.1}", c.2 * 1e3 / n))
            .collect::<Vec<_>>()
            .join(" | ");
        println!("| VMM CPU µs per request (process total / requests) | {cpu} |");
        let exits = configs
            .iter()
            .zip(&requests)
            .map(|(c, n)| {
                c.1 .1
                    .map(|e| format!("{:.3}", e / n))
                    .unwrap_or_else(|| "–".into())
            })
            .collect::<Vec<_>>()
            .join(" | ");
        println!("| vCPU exits to the VMM per request | {exits} |\n");
    }
    println!(
        "The guest's requests are 1 data segment each (4 KiB or 128 KiB), `qd` in flight, \
         polled for completion; ring notifications are suppressed by the driver while the \
         device is busy. CPU per request includes the VMM's boot (a few ms) and the guest's \
         kernel-mode emulation on this host."
    );
    Ok(())
}

/// A horizontal bar chart, written as a small standalone SVG.
struct Chart {
    title: String,
    bars: Vec<(String, f64)>,
}

impl Chart {
    fn new(title: &str, bars: Vec<(String, f64)>) -> Self {
        Self {
            title: title.to_string(),
            bars,
        }
    }

    fn svg(&self) -> String {
        let esc = |t: &str| {
            t.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        let (w, label_w, bar_h, top) = (720.0, 220.0, 26.0, 40.0);
        let h = top + bar_h * self.bars.len() as f64 + 16.0;
        let max = self
            .bars
            .iter()
            .map(|b| b.1)
            .fold(0.0_f64, f64::max)
            .max(f64::MIN_POSITIVE);
        let colours = [
            "#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b7791f", "#4a5568",
        ];
        let mut out = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             font-family=\"sans-serif\" font-size=\"13\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
             <text x=\"10\" y=\"22\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
            esc(&self.title)
        );
        for (i, (label, v)) in self.bars.iter().enumerate() {
            let y = top + bar_h * i as f64;
            let len = (w - label_w - 110.0) * v / max;
            out.push_str(&format!(
                "<text x=\"10\" y=\"{:.1}\">{}</text>\n\
                 <rect x=\"{label_w}\" y=\"{:.1}\" width=\"{len:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n\
                 <text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                y + 17.0,
                esc(label),
                y + 4.0,
                bar_h - 8.0,
                colours[i % colours.len()],
                label_w + len + 6.0,
                y + 17.0,
                if *v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
            ));
        }
        out.push_str("</svg>\n");
        out
    }
}

/// Starts `n` VMs of `vmm` at once (128 MiB each); time until every one printed its ready line,
/// and whether all exited with status 0.
fn start_many(vmm: Vmm, vmkit: &Path, guest: &Path, n: usize) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        let child = vmm
            .command(vmkit, guest, "128M", "exit=poweroff")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", vmm.name()))?;
        children.push(child);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mut waiters = Vec::new();
    for mut child in children {
        let tx = tx.clone();
        waiters.push(std::thread::spawn(move || -> Result<(), String> {
            let stdout = child.stdout.take().ok_or("no stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let ready = lines.any(|l| l.is_ok_and(|l| l.contains("vmkit-test-guest: ready")));
            let _ = tx.send(ready);
            for _ in lines {}
            let status = child.wait().map_err(|e| e.to_string())?;
            if !ready || !status.success() {
                return Err(format!("a VM failed (ready: {ready}, {status})"));
            }
            Ok(())
        }));
    }
    drop(tx);
    let mut ready = 0;
    for r in rx.iter() {
        if r {
            ready += 1;
        }
        if ready == n {
            break;
        }
    }
    let all_ready = start.elapsed().as_secs_f64() * 1e3;
    for w in waiters {
        w.join().map_err(|_| "waiter panicked".to_string())??;
    }
    Ok((all_ready, start.elapsed().as_secs_f64() * 1e3))
}

fn start_rate(
    vmkit: &Path,
    guest: &Path,
    vmms: &[Vmm],
    charts: &mut Vec<Chart>,
) -> Result<(), String> {
    println!(
        "\n## Start rate (VMs started at once, 128 MiB and 1 vCPU each, guest `exit=poweroff`)\n"
    );
    println!("| VMs | VMM | all ready (ms) | all exited, status 0 (ms) |\n|---|---|---|---|");
    for n in [20usize, 50] {
        let mut bars = Vec::new();
        for &vmm in vmms {
            let (ready, exited) = start_many(vmm, vmkit, guest, n)?;
            println!("| {n} | {} | {ready:.0} | {exited:.0} |", vmm.name());
            bars.push((vmm.name().to_string(), ready));
        }
        if bars.len() == 2 {
            println!("| {n} | vmkit / QEMU | {:.2} | |", bars[0].1 / bars[1].1);
        }
        charts.push(Chart::new(
            &format!("{n} VMs at once: all ready (ms, lower is better)"),
            bars,
        ));
    }
    Ok(())
}
