//! `vmkit-bench`: the headline figures of `vmkit` beside QEMU microvm on the same PVH test
//! guest, in one run. It reports; it asserts nothing about time.
//!
//! Reading order: [`vmm`] (the VMMs compared and their command lines) → [`run`] (one run of
//! a VMM, timed, its rusage and `--stats`) → the sections in the order they print:
//! [`startup`], [`footprint`], [`api`] (vmkit only), [`rate`], [`rng`], [`blk`] (with the host ceiling in [`fio`]),
//! [`net`] (with the host's ends in [`peer`], a running VMM sampled by [`probe`] and
//! [`kvmtrace`], the namespace from `vmkit-netns`), [`vsock`], [`exits`] (with the bare
//! kvm-ioctls loop) → [`stats`], [`table`] and [`svg`] for the output.

mod api;
mod blk;
mod exits;
mod fio;
mod footprint;
mod kvmtrace;
mod net;
/// The integration tests' network namespace with a TAP, shared as is.
mod peer;
mod probe;
mod rate;
mod rng;
mod run;
mod startup;
mod stats;
mod svg;
mod table;
mod vmm;
mod vsock;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::svg::Chart;
use crate::vmm::Setup;

const AFTER_HELP: &str = "\
Build first: cargo build --release -p vmkit-vmm -p vmkit-bench; \
(cd examples/test-guest && cargo build --release). scripts/bench.sh does both and runs this.

--baseline runs a second vmkit binary beside the current one, on the same guest and in the \
same run, as an extra \"vmkit (baseline)\" column (rows for the row-wise tables) with the \
ratio vmkit / baseline: the way to show no regression against an earlier commit. For \
example:

  git worktree add /tmp/wt-base HEAD~1
  (cd /tmp/wt-base && CARGO_TARGET_DIR=/tmp/wt-base-target cargo build --release -p vmkit-vmm)
  vmkit-bench --baseline /tmp/wt-base-target/release/vmkit

The baseline is only given flags every vmkit so far has: --kernel --memory --cmdline --stats \
--cpus --rng --console --disk path=..,engine=..,direct=on --transport (so each runs with its \
own defaults, e.g. for transparent huge pages).";

/// Start-up, footprint, start rate, virtio-rng, virtio-blk, virtio-net, virtio-vsock and exit cost of vmkit, QEMU
/// microvm and optionally a baseline vmkit, on the PVH test guest. Prints markdown tables.
#[derive(Debug, Parser)]
#[command(name = "vmkit-bench", after_help = AFTER_HELP)]
pub struct Options {
    /// Start-up runs per VMM.
    #[arg(long, default_value_t = 20, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub runs: u64,
    /// Port writes, and MMIO writes, the guest times for the exit cost.
    #[arg(long, default_value_t = 1_000_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub pio: u64,
    /// Seconds per virtio-blk workload (and per host fio run).
    #[arg(long, default_value_t = 2, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub blk_secs: u64,
    /// Seconds per direction of 64-byte UDP frames (virtio-net).
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub net_secs: u64,
    /// MiB each way on the virtio-net TCP connection.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub net_mib: u64,
    /// Seconds per direction of the virtio-vsock streams.
    #[arg(long, default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=600))]
    pub vsock_secs: u64,
    /// Connections each way timed for the virtio-vsock connect-to-first-byte latency.
    #[arg(long, default_value_t = 100, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub vsock_conns: u64,
    /// Write the charts into DIR as SVG files and list them as markdown images.
    #[arg(long, value_name = "DIR")]
    pub svg_dir: Option<PathBuf>,
    /// A second vmkit binary (e.g. built from an earlier commit) measured beside the current
    /// one, as the column "vmkit (baseline)" with the ratio vmkit / baseline.
    #[arg(long, value_name = "PATH")]
    pub baseline: Option<PathBuf>,
    /// The vmkit binary measured [default: `vmkit` next to this program].
    #[arg(long, value_name = "PATH")]
    pub vmkit: Option<PathBuf>,
    /// The PVH test guest [default: examples/test-guest's release build].
    #[arg(long, value_name = "PATH")]
    pub guest: Option<PathBuf>,
    /// Only these sections, in the usual order [default: all].
    #[arg(long, value_enum, value_delimiter = ',', value_name = "SECTION,...")]
    pub only: Vec<Section>,
}

/// The sections, in the order they print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Start-up times and CPU.
    Startup,
    /// Peak RSS and the VMM's own memory.
    Footprint,
    /// The API socket (vmkit only): request round trips, `InstanceStart`, pause and resume,
    /// the API thread's memory.
    Api,
    /// 20 and 50 VMs started at once.
    Rate,
    /// virtio-rng throughput and exits.
    Rng,
    /// virtio-blk throughput, and host fio.
    Blk,
    /// virtio-net TCP and 64-byte UDP rates, exits and VMM CPU per frame (root: a network
    /// namespace with a TAP), and the host's loopback.
    Net,
    /// virtio-vsock throughput each way and connect-to-first-byte latency (hybrid vsock over
    /// Unix sockets), and the host's own Unix sockets.
    Vsock,
    /// PIO and MMIO exit cost, and the bare loop.
    Exits,
}

/// Every section, in the order they print, then the charts.
fn run_all(opts: &Options, setup: &Setup) -> Result<(), String> {
    let mut charts: Vec<Chart> = Vec::new();
    let on = |s: Section| opts.only.is_empty() || opts.only.contains(&s);
    if on(Section::Startup) {
        startup::section(setup, opts.runs, &mut charts)?;
    }
    if on(Section::Footprint) {
        footprint::section(setup, &mut charts)?;
    }
    if on(Section::Api) {
        api::section(setup)?;
    }
    if on(Section::Rate) {
        rate::section(setup, &mut charts)?;
    }
    if on(Section::Rng) {
        rng::section(setup, &mut charts)?;
    }
    if on(Section::Blk) {
        blk::section(setup, opts.blk_secs, &mut charts)?;
    }
    if on(Section::Net) {
        net::section(setup, opts.net_secs, opts.net_mib, &mut charts)?;
    }
    if on(Section::Vsock) {
        vsock::section(setup, opts.vsock_secs, opts.vsock_conns, &mut charts)?;
    }
    if on(Section::Exits) {
        exits::section(setup, opts.pio, &mut charts)?;
    }
    if let Some(dir) = &opts.svg_dir {
        svg::write_all(dir, &charts)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let opts = Options::parse();
    let result = Setup::find(&opts).and_then(|setup| run_all(&opts, &setup));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmkit-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
