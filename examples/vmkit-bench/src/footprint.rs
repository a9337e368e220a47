//! Footprint: each VMM boots the guest with `hold=serial`; while the guest waits for a byte
//! on COM1, its `/proc/PID/status` (VmHWM) and `/proc/PID/smaps` (the resident part of the
//! guest-RAM mapping) are read; then one byte on the VMM's stdin releases the guest and the
//! VMM's peak RSS comes from `wait4`. The VMM's own memory is VmHWM minus guest RAM resident.

use std::io::Write;
use std::process::{Child, Stdio};

use crate::run::run_with;
use crate::stats::median;
use crate::svg::Chart;
use crate::table::{ratio_cells, ratio_heads, Table};
use crate::vmm::{Setup, Vmm};

/// What the test guest prints when it starts to wait.
pub(crate) const HOLD_LINE: &str = "hold: waiting for a byte on COM1";
/// What it prints when a byte released it.
const RELEASED_LINE: &str = "hold: released";
/// Runs per VMM and memory size.
const RUNS: usize = 5;
/// Guest memory sizes: the VMM's argument and the bytes it means.
const SIZES: [(&str, u64); 2] = [("128M", 128 << 20), ("1G", 1 << 30)];

/// One held run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// `ru_maxrss` at the exit, KiB.
    peak_kib: u64,
    /// VmHWM minus guest RAM resident, both while the guest was held, KiB.
    own_kib: u64,
}

/// The Rss (KiB) summed over the anonymous mappings of exactly `bytes` in `smaps`, and how
/// many there were.
fn guest_ram_rss(smaps: &str, bytes: u64) -> (u64, usize) {
    let (mut rss, mut found) = (0, 0);
    let mut anon = false;
    let mut size_ok = false;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if !first.ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            let rest: Vec<&str> = fields.collect();
            let path = rest.get(4).copied().unwrap_or("");
            anon = rest.get(3) == Some(&"0") && (path.is_empty() || path.starts_with("[anon"));
            size_ok = false;
            continue;
        }
        let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Size:" => size_ok = anon && kib * 1024 == bytes,
            "Rss:" if size_ok => {
                rss += kib;
                found += 1;
            }
            _ => {}
        }
    }
    (rss, found)
}

/// VmHWM (KiB) from `/proc/PID/status`.
fn vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// VmHWM minus guest RAM resident (KiB) of the held VMM `pid` with `bytes` of guest RAM.
pub(crate) fn own_memory(pid: u32, bytes: u64) -> Result<u64, String> {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{what}"))
            .map_err(|e| format!("/proc/{pid}/{what}: {e}"))
    };
    let hwm = vm_hwm(&read("status")?).ok_or("no VmHWM in /proc/PID/status")?;
    let (guest, found) = guest_ram_rss(&read("smaps")?, bytes);
    if found == 0 {
        return Err(format!(
            "no anonymous mapping of {bytes} bytes in /proc/{pid}/smaps"
        ));
    }
    Ok(hwm.saturating_sub(guest))
}

/// Writes the byte that ends the guest's hold, and closes stdin.
pub(crate) fn release(child: &mut Child) -> Result<(), String> {
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    stdin
        .write_all(b".")
        .map_err(|e| format!("release the guest: {e}"))
}

/// One held run of `vmm` with `memory` (`bytes`) of guest RAM.
fn sample(setup: &Setup, vmm: Vmm, memory: &str, bytes: u64) -> Result<Sample, String> {
    let mut cmd = setup.command(vmm, memory, "hold=serial exit=poweroff");
    cmd.stdin(Stdio::piped());
    let mut own = None;
    let done = run_with(cmd, vmm.name(), |line, _, child| {
        if own.is_none() && line.contains(HOLD_LINE) {
            own = Some(own_memory(child.id(), bytes)?);
            release(child)?;
        }
        Ok(())
    })?
    .check(vmm.name())?;
    let own_kib =
        own.ok_or_else(|| format!("{}: the guest never held:\n{}", vmm.name(), done.stdout))?;
    if !done.stdout.contains(RELEASED_LINE) {
        return Err(format!(
            "{}: the guest was not released:\n{}",
            vmm.name(),
            done.stdout
        ));
    }
    Ok(Sample {
        peak_kib: done.max_rss_kib,
        own_kib,
    })
}

/// Per memory size, per VMM: the samples of [`RUNS`] runs, the VMMs alternating.
fn measure(setup: &Setup, vmms: &[Vmm]) -> Result<Vec<Vec<Vec<Sample>>>, String> {
    let mut all = Vec::new();
    for (memory, bytes) in SIZES {
        let mut per_vmm = vec![Vec::new(); vmms.len()];
        for _ in 0..RUNS {
            for (i, &vmm) in vmms.iter().enumerate() {
                per_vmm[i].push(sample(setup, vmm, memory, bytes)?);
            }
        }
        all.push(per_vmm);
    }
    Ok(all)
}

/// One table: a row per memory size of the median of `figure` (MiB) per VMM, the ratios;
/// a chart per size titled by `chart`.
fn table(
    head: &str,
    vmms: &[Vmm],
    all: &[Vec<Vec<Sample>>],
    figure: fn(&Sample) -> u64,
    chart: &dyn Fn(&str) -> String,
    charts: &mut Vec<Chart>,
) {
    let mut header = vec![head.to_string()];
    header.extend(vmms.iter().map(|v| format!("{} (MiB)", v.name())));
    header.extend(ratio_heads(vmms));
    let mut t = Table::new(header);
    for ((memory, _), per_vmm) in SIZES.iter().zip(all) {
        let mib: Vec<f64> = per_vmm
            .iter()
            .map(|s| median(s.iter().map(|s| figure(s) as f64 / 1024.0).collect()))
            .collect();
        let mut cells = vec![memory.to_string()];
        cells.extend(mib.iter().map(|m| format!("{m:.2}")));
        cells.extend(ratio_cells(vmms, &mib, 2));
        t.row(cells);
        let names = vmms.iter().map(|v| v.name().to_string());
        charts.push(Chart::new(&chart(memory), names.zip(mib).collect()));
    }
    t.print();
}

/// The footprint section; adds a chart per memory size for peak RSS and for own memory.
pub fn section(setup: &Setup, charts: &mut Vec<Chart>) -> Result<(), String> {
    let vmms = setup.vmms();
    println!(
        "\n## Footprint (peak RSS of the VMM process, guest `hold=serial exit=poweroff`, \
         median of {RUNS})\n"
    );
    let all = measure(setup, &vmms)?;
    let peak = |m: &str| format!("peak RSS with a {m} guest (MiB, lower is better)");
    table("guest memory", &vmms, &all, |s| s.peak_kib, &peak, charts);
    println!();
    let own = |m: &str| format!("VMM's own memory with a {m} guest (MiB, lower is better)");
    let head = "own memory: peak RSS minus guest RAM resident, guest held";
    table(head, &vmms, &all, |s| s.own_kib, &own, charts);
    println!(
        "\nOwn memory is VmHWM (/proc/PID/status) minus the Rss of the guest-RAM mapping \
         (the anonymous mapping of the guest's size in /proc/PID/smaps), both read while the \
         guest waits in `hold=serial`; one byte on the VMM's stdin then lets it power off. \
         Peak RSS is `ru_maxrss` from `wait4`, guest pages included."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0001000 r-xp 00000000 fd:01 1234 /usr/bin/vmkit
Size:                  4 kB
Rss:                   4 kB
7f0000000000-7f0008000000 rw-p 00000000 00:00 0
Size:             131072 kB
KernelPageSize:        4 kB
Rss:                6144 kB
7f1000000000-7f1008000000 rw-s 00000000 00:01 77 /memfd:x (deleted)
Size:             131072 kB
Rss:                 100 kB
7f2000000000-7f2000021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  60 kB
";

    #[test]
    fn guest_ram_is_the_anonymous_mapping_of_its_size() {
        assert_eq!(guest_ram_rss(SMAPS, 128 << 20), (6144, 1));
        assert_eq!(guest_ram_rss(SMAPS, 1 << 30), (0, 0));
        assert_eq!(vm_hwm("Name:\tvmkit\nVmHWM:\t    3300 kB\n"), Some(3300));
        assert_eq!(vm_hwm("Name:\tvmkit\n"), None);
    }
}
