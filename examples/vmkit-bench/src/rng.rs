//! virtio-rng: the guest reads 1 MiB through its driver (256 requests of 4 KiB, one in
//! flight), with virtio-rng and virtio-console on each transport; throughput, vCPU exits per
//! request, and boot times with the same devices.

use crate::run::{run, timed, vcpu_exits};
use crate::stats::{fixed, median, ratio};
use crate::svg::Chart;
use crate::table::Table;
use crate::vmm::{Setup, Vmm, QEMU_FIRST_VIRTIO_MMIO};

/// Runs per VMM and transport.
const RUNS: usize = 5;
const TRANSPORTS: [&str; 2] = ["mmio", "pci"];

/// The medians of one vmkit on one transport.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// KiB/s.
    rate: f64,
    /// vCPU exits per 4 KiB request.
    exits_per_request: f64,
    /// Boot to ready line and to exit, ms, without the test.
    ready_ms: f64,
    exit_ms: f64,
}

/// The guest's rate (KiB/s) from `virtio-rng: 1048576 bytes in N ms (R KiB/s)`.
fn rate_of(text: &str, who: &str) -> Result<f64, String> {
    text.lines()
        .find_map(|l| l.strip_prefix("virtio-rng: 1048576 bytes in "))
        .and_then(|l| l.split(" ms (").nth(1))
        .and_then(|l| l.split(" KiB/s)").next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{who}: no virtio-rng line:\n{text}"))
}

/// [`RUNS`] runs of each vmkit of `vmms` on `transport`, alternating.
fn vmkit_rows(setup: &Setup, vmms: &[Vmm], transport: &str) -> Result<Vec<Row>, String> {
    let extra = [
        "--rng",
        "--console",
        "file=/dev/null",
        "--transport",
        transport,
    ];
    let mut samples = vec![Vec::new(); vmms.len()];
    for _ in 0..RUNS {
        for (i, &vmm) in vmms.iter().enumerate() {
            let test = run(setup, vmm, "test=virtio-rng", &extra)?;
            let rate = rate_of(&test.stdout, vmm.name())?;
            // The same devices without the test: what discovery and set-up cost, and the
            // boot times.
            let without = timed(setup, vmm, "exit=poweroff", &extra)?;
            let exits = match (vcpu_exits(&test.stderr), without.exits) {
                (Some(with), Some(without)) => (with - without).max(0.0) / 256.0,
                _ => f64::NAN,
            };
            samples[i].push((rate, exits, without.ready_ms, without.exit_ms));
        }
    }
    let rows = samples.iter().map(|s| Row {
        rate: median(s.iter().map(|x| x.0).collect()),
        exits_per_request: median(s.iter().map(|x| x.1).collect()),
        ready_ms: median(s.iter().map(|x| x.2).collect()),
        exit_ms: median(s.iter().map(|x| x.3).collect()),
    });
    Ok(rows.collect())
}

/// QEMU microvm's median rate (KiB/s) over virtio-mmio.
fn qemu_rate(setup: &Setup) -> Result<f64, String> {
    let cmdline = format!("test=virtio-rng {QEMU_FIRST_VIRTIO_MMIO}");
    let mut rates = Vec::new();
    for _ in 0..RUNS {
        let out = run(
            setup,
            Vmm::Qemu,
            &cmdline,
            &["-device", "virtio-rng-device"],
        )?;
        rates.push(rate_of(&out.stdout, "QEMU")?);
    }
    Ok(median(rates))
}

/// The sentences under the table: vmkit against QEMU and against the baseline.
fn ratios(vmms: &[Vmm], rows: &[(String, Vmm, Row)], qemu: Option<f64>) {
    let of = |vmm: Vmm, t: &str| rows.iter().find(|r| r.1 == vmm && r.0 == t).map(|r| r.2);
    if let (Some(q), Some(v)) = (qemu, of(Vmm::Vmkit, "mmio")) {
        println!(
            "\nvmkit virtio-mmio / QEMU virtio-mmio rng throughput = {}",
            ratio(v.rate, q, 2)
        );
    }
    if !vmms.contains(&Vmm::Baseline) {
        return;
    }
    let pairs = TRANSPORTS.map(|t| (t, of(Vmm::Vmkit, t), of(Vmm::Baseline, t)));
    let say = |f: fn(&Row) -> f64| {
        let each = pairs.iter().filter_map(|(t, a, b)| Some((t, (*a)?, (*b)?)));
        let each = each.map(|(t, a, b)| format!("virtio-{t} {}", ratio(f(&a), f(&b), 2)));
        each.collect::<Vec<_>>().join(", ")
    };
    println!(
        "\nvmkit / baseline: rng throughput {}; exits per request {}; boot to exit {}",
        say(|r| r.rate),
        say(|r| r.exits_per_request),
        say(|r| r.exit_ms)
    );
}

/// The virtio-rng section; adds its chart to `charts`.
pub fn section(setup: &Setup, charts: &mut Vec<Chart>) -> Result<(), String> {
    println!(
        "\n## virtio devices: rng throughput and exits, boot with rng + console \
         (median of {RUNS})\n"
    );
    let vmkits = setup.vmkits();
    let mut rows = Vec::new();
    for t in TRANSPORTS {
        let measured = vmkit_rows(setup, &vmkits, t)?;
        rows.extend(
            vmkits
                .iter()
                .zip(measured)
                .map(|(&v, r)| (t.to_string(), v, r)),
        );
    }
    let qemu = setup.qemu.then(|| qemu_rate(setup)).transpose()?;
    let mut table = Table::new([
        "VMM, transport",
        "rng KiB/s",
        "vCPU exits per 4 KiB request",
        "boot to ready (ms)",
        "boot to exit (ms)",
    ]);
    let mut bars = Vec::new();
    for (t, vmm, r) in &rows {
        table.row([
            format!("{}, virtio-{t}", vmm.name()),
            format!("{:.0}", r.rate),
            fixed(r.exits_per_request, 2),
            format!("{:.1}", r.ready_ms),
            format!("{:.1}", r.exit_ms),
        ]);
        bars.push((format!("{} virtio-{t}", vmm.name()), r.rate));
    }
    if let Some(q) = qemu {
        table.row([
            "QEMU microvm, virtio-mmio",
            &format!("{q:.0}"),
            "–",
            "–",
            "–",
        ]);
        bars.push(("QEMU virtio-mmio".into(), q));
    }
    table.print();
    ratios(&setup.vmms(), &rows, qemu);
    println!("\n{NOTE}");
    charts.push(Chart::new(
        "virtio-rng through the guest driver (KiB/s, higher is better)",
        bars,
    ));
    Ok(())
}

const NOTE: &str = "1 MiB is 256 requests of 4 KiB, one in flight. Exits per request are the \
vCPU exits to the VMM (MMIO + PIO) of a run with the test minus a run without it, over 256; \
they include two device initialisations and the test's own serial lines (~100 bytes at two \
PIO exits each, ~0.8 per request on their own). Queue notifications go through ioeventfds and \
interrupts through irqfds on both transports; what remains on PCI is the driver's \
(virtio-drivers 0.13 reads `queue_notify_off` on every notify).";
