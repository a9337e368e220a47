//! Start rate: `n` VMs of one VMM started at once (128 MiB, 1 vCPU each); the time until
//! every one printed its ready line and until all exited with status 0.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::run::READY_LINE;
use crate::stats::ratio;
use crate::svg::Chart;
use crate::table::{ratio_head, Table, OTHERS};
use crate::vmm::{Setup, Vmm};

/// Watches one VM: reports on `ready` whether its ready line came, reads its output to the
/// end and waits for it; fails unless it was ready and exited with 0.
fn watch(mut child: Child, ready: Sender<bool>) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let was_ready = lines.any(|l| l.is_ok_and(|l| l.contains(READY_LINE)));
        let _ = ready.send(was_ready);
        lines.for_each(drop);
        let status = child.wait().map_err(|e| e.to_string())?;
        if !was_ready || !status.success() {
            return Err(format!("a VM failed (ready: {was_ready}, {status})"));
        }
        Ok(())
    })
}

/// Starts `n` VMs of `vmm` at once: (ms until all were ready, ms until all exited).
fn start_many(setup: &Setup, vmm: Vmm, n: usize) -> Result<(f64, f64), String> {
    let start = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut watchers = Vec::with_capacity(n);
    for _ in 0..n {
        let child = setup
            .command(vmm, "128M", "exit=poweroff")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", vmm.name()))?;
        watchers.push(watch(child, tx.clone()));
    }
    drop(tx);
    // Every VM reports once; the last report is when all were ready (or one never was).
    rx.iter().take(n).for_each(drop);
    let all_ready = start.elapsed().as_secs_f64() * 1e3;
    for w in watchers {
        w.join().map_err(|_| "a watcher panicked".to_string())??;
    }
    Ok((all_ready, start.elapsed().as_secs_f64() * 1e3))
}

/// The start-rate section; adds a chart per count to `charts`.
pub fn section(setup: &Setup, charts: &mut Vec<Chart>) -> Result<(), String> {
    println!(
        "\n## Start rate (VMs started at once, 128 MiB and 1 vCPU each, guest `exit=poweroff`)\n"
    );
    let vmms = setup.vmms();
    let mut table = Table::new(["VMs", "VMM", "all ready (ms)", "all exited, status 0 (ms)"]);
    for n in [20usize, 50] {
        let mut bars = Vec::new();
        for &vmm in &vmms {
            let (ready, exited) = start_many(setup, vmm, n)?;
            table.row([
                n.to_string(),
                vmm.name().into(),
                format!("{ready:.0}"),
                format!("{exited:.0}"),
            ]);
            bars.push((vmm, ready));
        }
        for other in OTHERS {
            if let Some(&(_, theirs)) = bars.iter().find(|b| b.0 == other) {
                let r = ratio(bars[0].1, theirs, 2);
                table.row([n.to_string(), ratio_head(other).into(), r, String::new()]);
            }
        }
        let bars = bars
            .iter()
            .map(|(v, r)| (v.name().to_string(), *r))
            .collect();
        charts.push(Chart::new(
            &format!("{n} VMs at once: all ready (ms, lower is better)"),
            bars,
        ));
    }
    table.print();
    Ok(())
}
