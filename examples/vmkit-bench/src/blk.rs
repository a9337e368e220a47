//! virtio-blk: the guest reads a 1 GiB file of random bytes through its driver (4 KiB random
//! and 128 KiB sequential, at QD 1 and 32), through the host page cache and with O_DIRECT;
//! every vmkit on both transports with both engines, QEMU on virtio-mmio, and host fio on the
//! same file as the ceiling.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::fio::{self, Buffers};
use crate::run::{run_with, vcpu_exits};
use crate::stats::ratio;
use crate::svg::Chart;
use crate::table::Table;
use crate::vmm::{runs, Setup, Vmm, QEMU_FIRST_VIRTIO_MMIO};

/// The four block workloads of the test guest, in the order it runs them: label, the
/// guest's name, queue depth.
const WORKLOADS: [(&str, &str, u32); 4] = [
    ("4 KiB random read, QD 1", "blk-rand4k", 1),
    ("4 KiB random read, QD 32", "blk-rand4k", 32),
    ("128 KiB sequential read, QD 1", "blk-seq128k", 1),
    ("128 KiB sequential read, QD 32", "blk-seq128k", 32),
];

/// The (transport, engine) pairs each vmkit runs.
const VMKIT_CONFIGS: [(&str, &str); 4] = [
    ("mmio", "sync"),
    ("mmio", "io_uring"),
    ("pci", "sync"),
    ("pci", "io_uring"),
];

/// One boot of one VMM configuration running every workload.
#[derive(Debug)]
struct Boot {
    /// The column heading, e.g. `vmkit mmio sync`.
    name: String,
    vmm: Vmm,
    /// Per workload: (req/s, MiB/s) by the guest.
    results: Vec<(f64, f64)>,
    /// The VMM's CPU time, whole boot, ms.
    cpu_ms: f64,
    /// vCPU exits to the VMM (vmkit only).
    exits: Option<f64>,
}

/// (req/s, MiB/s) of each workload from the guest's
/// `bench blk-rand4k qd1: N requests in M ms, R req/s, B MiB/s` lines.
fn guest_lines(text: &str) -> Option<Vec<(f64, f64)>> {
    WORKLOADS
        .iter()
        .map(|(_, name, qd)| {
            let prefix = format!("bench {name} qd{qd}: ");
            let line = text.lines().find_map(|l| l.strip_prefix(&prefix))?;
            let mut parts = line.split(", ");
            parts.next()?;
            let rps = parts.next()?.strip_suffix(" req/s")?.parse().ok()?;
            let mbs = parts.next()?.split(" MiB/s").next()?.parse().ok()?;
            Some((rps, mbs))
        })
        .collect()
}

/// Boots `vmm` with `cmdline` and `extra` arguments once.
fn boot(
    setup: &Setup,
    vmm: Vmm,
    name: String,
    cmdline: &str,
    extra: &[String],
) -> Result<Boot, String> {
    let mut cmd = setup.command(vmm, "128M", cmdline);
    cmd.args(extra).stdin(Stdio::null());
    let done = run_with(cmd, vmm.name(), |_, _, _| Ok(()))?;
    let results = guest_lines(&done.stdout).ok_or_else(|| {
        format!(
            "{name}: no blk bench lines:\n{}\n{}",
            done.stdout, done.stderr
        )
    })?;
    Ok(Boot {
        name,
        vmm,
        results,
        cpu_ms: done.cpu_ms,
        exits: vcpu_exits(&done.stderr),
    })
}

/// Every configuration once: each vmkit's four, then QEMU's.
fn boots(setup: &Setup, img: &Path, cmdline: &str, direct: bool) -> Result<Vec<Boot>, String> {
    let mut all = Vec::new();
    for vmm in setup.vmkits() {
        for (transport, engine) in VMKIT_CONFIGS {
            let direct = if direct { ",direct=on" } else { "" };
            let disk = format!("path={},engine={engine}{direct}", img.display());
            let extra = [
                "--disk".into(),
                disk,
                "--transport".into(),
                transport.into(),
            ];
            let name = format!("{} {transport} {engine}", vmm.name());
            all.push(boot(setup, vmm, name, cmdline, &extra)?);
        }
    }
    if setup.qemu {
        let cache = if direct { "none" } else { "writeback" };
        let drive = format!(
            "if=none,id=d0,file={},format=raw,aio=io_uring,cache={cache}",
            img.display()
        );
        let extra = ["-drive", &drive, "-device", "virtio-blk-device,drive=d0"].map(String::from);
        let cmdline = format!("{cmdline} {QEMU_FIRST_VIRTIO_MMIO}");
        all.push(boot(
            setup,
            Vmm::Qemu,
            "QEMU mmio io_uring".into(),
            &cmdline,
            &extra,
        )?);
    }
    Ok(all)
}

/// A 1 GiB image of random bytes in the workspace's target directory, made once.
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

/// How one mode (page cache or O_DIRECT) is run and labelled.
struct Mode<'a> {
    img: &'a Path,
    secs: u64,
    direct: bool,
    /// The fio runs and their column headings (none without fio).
    fio: Vec<(Buffers, String)>,
}

/// The throughput table: a row per workload, a column per boot and per fio run (which runs
/// here, after the VMMs); a chart per workload.
fn throughput(mode: &Mode, boots: &[Boot], charts: &mut Vec<Chart>) -> Result<(), String> {
    let mut header = vec!["req/s (MiB/s)".to_string()];
    header.extend(boots.iter().map(|b| b.name.clone()));
    header.extend(mode.fio.iter().map(|f| f.1.clone()));
    let mut table = Table::new(header);
    for (w, (label, name, qd)) in WORKLOADS.iter().enumerate() {
        let mut cells = vec![label.to_string()];
        cells.extend(
            boots
                .iter()
                .map(|b| format!("{:.0} ({:.0})", b.results[w].0, b.results[w].1)),
        );
        let (rw, bs) = if *name == "blk-rand4k" {
            ("randread", "4k")
        } else {
            ("read", "128k")
        };
        for (buffers, _) in &mode.fio {
            let (iops, mbs) = fio::run(mode.img, (rw, bs, *qd), mode.secs, mode.direct, *buffers)?;
            cells.push(format!("{iops:.0} ({mbs:.0})"));
        }
        table.row(cells);
        let how = if mode.direct {
            "O_DIRECT"
        } else {
            "page cache"
        };
        charts.push(Chart::new(
            &format!("virtio-blk {label}, {how} (req/s, higher is better)"),
            boots
                .iter()
                .map(|b| (b.name.clone(), b.results[w].0))
                .collect(),
        ));
    }
    table.print();
    Ok(())
}

/// vmkit over the baseline, req/s, per workload and configuration (when there is a baseline).
fn against_baseline(boots: &[Boot]) {
    let of = |vmm: Vmm| boots.iter().filter(move |b| b.vmm == vmm);
    if of(Vmm::Baseline).next().is_none() {
        return;
    }
    let mut header = vec!["vmkit / baseline, req/s".to_string()];
    header.extend(VMKIT_CONFIGS.iter().map(|(t, e)| format!("{t} {e}")));
    let mut table = Table::new(header);
    for (w, (label, _, _)) in WORKLOADS.iter().enumerate() {
        let mut cells = vec![label.to_string()];
        let pairs = of(Vmm::Vmkit).zip(of(Vmm::Baseline));
        cells.extend(pairs.map(|(a, b)| ratio(a.results[w].0, b.results[w].0, 2)));
        table.row(cells);
    }
    println!();
    table.print();
}

/// VMM CPU time and vCPU exits per request, over the whole boot.
fn per_request(boots: &[Boot], secs: u64) {
    let mut header = vec!["per request, whole boot".to_string()];
    header.extend(boots.iter().map(|b| b.name.clone()));
    let requests = |b: &Boot| -> f64 { b.results.iter().map(|(rps, _)| rps * secs as f64).sum() };
    let mut cpu = vec!["VMM CPU µs per request (process total / requests)".to_string()];
    cpu.extend(
        boots
            .iter()
            .map(|b| format!("{:.1}", b.cpu_ms * 1e3 / requests(b))),
    );
    let mut exits = vec!["vCPU exits to the VMM per request".to_string()];
    exits.extend(boots.iter().map(|b| {
        b.exits
            .map_or_else(|| "–".into(), |e| format!("{:.3}", e / requests(b)))
    }));
    let mut table = Table::new(header);
    table.row(cpu);
    table.row(exits);
    println!();
    table.print();
}

/// One mode: the VMM boots, then the tables.
fn mode(setup: &Setup, mode: &Mode, charts: &mut Vec<Chart>) -> Result<(), String> {
    if !mode.direct {
        // Page cache: read the file once, so every VMM reads from memory.
        let _ = Command::new("cat")
            .arg(mode.img)
            .stdout(Stdio::null())
            .status();
    }
    let cmdline = WORKLOADS
        .iter()
        .map(|(_, name, qd)| format!("bench={name}:{qd}:{}", mode.secs))
        .collect::<Vec<_>>()
        .join(" ");
    let boots = boots(setup, mode.img, &cmdline, mode.direct)?;
    println!(
        "### {}\n",
        if mode.direct {
            "`direct=on` (O_DIRECT; QEMU `cache=none`)"
        } else {
            "host page cache (file read once beforehand; QEMU `cache=writeback`)"
        }
    );
    throughput(mode, &boots, charts)?;
    against_baseline(&boots);
    per_request(&boots, mode.secs);
    println!();
    Ok(())
}

/// The virtio-blk section; adds a chart per workload and mode to `charts`.
pub fn section(setup: &Setup, secs: u64, charts: &mut Vec<Chart>) -> Result<(), String> {
    let img = bench_image()?;
    let have_fio = runs("fio");
    println!(
        "\n## virtio-blk: reads of a 1 GiB file of random bytes through the guest's driver \
         ({secs} s per workload; host `fio` on the same file — psync at QD 1, io_uring at QD 32 \
         — is the ceiling)\n"
    );
    let (direct_fio, said) = fio::direct_buffers();
    let fio_columns = |direct: bool| -> Vec<(Buffers, String)> {
        match (have_fio, direct) {
            (false, _) => Vec::new(),
            (true, false) => vec![(Buffers::Malloc, "host fio".into())],
            (true, true) => direct_fio.iter().map(|&b| (b, b.label().into())).collect(),
        }
    };
    for direct in [false, true] {
        let m = Mode {
            img: &img,
            secs,
            direct,
            fio: fio_columns(direct),
        };
        mode(setup, &m, charts)?;
    }
    if have_fio {
        println!("{said}\n");
    }
    println!("{NOTE}");
    Ok(())
}

const NOTE: &str = "The guest's requests are 1 data segment each (4 KiB or 128 KiB), `qd` in \
flight, polled for completion; ring notifications are suppressed by the driver while the \
device is busy. CPU per request includes the VMM's boot (a few ms) and the guest's kernel-mode \
emulation on this host.";
