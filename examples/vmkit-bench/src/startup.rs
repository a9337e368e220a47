//! Start-up: each VMM boots the guest to `exit=poweroff` `runs` times, the VMMs alternating;
//! medians (min–max) of when it entered the guest, printed its ready line and exited, and of
//! its CPU time.

use crate::run::{timed, Timed};
use crate::stats::{median, Summary};
use crate::svg::Chart;
use crate::table::{ratio_cells, ratio_heads, Table};
use crate::vmm::{Setup, Vmm};

type Figure = fn(&Timed) -> Option<f64>;

/// The rows of the table: heading, figure of one run.
const ROWS: [(&str, Figure); 5] = [
    ("process start → entering the guest", |r| r.setup_ms),
    ("VMM CPU time until guest entry", |r| r.setup_cpu_ms),
    ("process start → guest ready line", |r| Some(r.ready_ms)),
    ("process start → process exit", |r| Some(r.exit_ms)),
    ("VMM CPU time, whole run", |r| Some(r.cpu_ms)),
];

/// One row: per VMM "median (min–max)" of `figure`, then the ratios of the medians.
fn row(name: &str, vmms: &[Vmm], runs: &[Vec<Timed>], figure: Figure) -> Vec<String> {
    let summaries: Vec<Option<Summary>> = runs
        .iter()
        .map(|r| Summary::of(r.iter().filter_map(figure).collect()))
        .collect();
    let mut cells = vec![name.to_string()];
    cells.extend(summaries.iter().map(|s| match s {
        Some(s) => format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max),
        None => "–".into(),
    }));
    let medians: Vec<f64> = summaries
        .iter()
        .map(|s| s.map_or(f64::NAN, |s| s.median))
        .collect();
    cells.extend(ratio_cells(vmms, &medians, 2));
    cells
}

/// The start-up section; adds its two charts (ready line, exit) to `charts`.
pub fn section(setup: &Setup, runs: u64, charts: &mut Vec<Chart>) -> Result<(), String> {
    let vmms = setup.vmms();
    println!(
        "## Start-up ({runs} runs each, alternating, 1 vCPU, 128 MiB, guest `exit=poweroff`)\n"
    );
    let mut all: Vec<Vec<Timed>> = vec![Vec::new(); vmms.len()];
    for _ in 0..runs {
        for (i, &vmm) in vmms.iter().enumerate() {
            all[i].push(timed(setup, vmm, "exit=poweroff", &[])?);
        }
    }
    let mut header = vec!["median (min–max), ms".to_string()];
    header.extend(vmms.iter().map(|v| v.name().to_string()));
    header.extend(ratio_heads(&vmms));
    let mut table = Table::new(header);
    for (name, figure) in ROWS {
        table.row(row(name, &vmms, &all, figure));
    }
    table.print();
    let chart = |title: &str, f: fn(&Timed) -> f64| {
        let bars = vmms.iter().zip(&all);
        let bars = bars.map(|(v, r)| (v.name().to_string(), median(r.iter().map(f).collect())));
        Chart::new(title, bars.collect())
    };
    charts.push(chart(
        "process start to guest ready line (ms, lower is better)",
        |r| r.ready_ms,
    ));
    charts.push(chart("process start to exit (ms, lower is better)", |r| {
        r.exit_ms
    }));
    Ok(())
}
