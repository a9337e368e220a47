//! `vmkit`: the reference VMM composed from the vmkit crates.
//!
//! Reading order: [`config`] (the command line) → [`vm`] (the stages: machine, vCPUs,
//! devices, kernel; then run) → [`devices`] (legacy and virtio devices, attached through
//! vmkit-kvm) → [`io`] (host input into the guest) → [`stats`] (`--stats`) → [`error`].

mod config;
mod devices;
mod error;
mod io;
mod net;
mod stats;
mod vm;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use vmkit_legacy::ExitReason;

/// Parses the command line; on an error prints one line (not clap's usage block).
fn parse_args() -> Result<config::Args, ExitCode> {
    config::Args::try_parse().map_err(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            print!("{e}");
            return ExitCode::SUCCESS;
        }
        let msg = e.to_string();
        let head = msg.split("\n\n").next().unwrap_or("invalid arguments");
        let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
        eprintln!(
            "vmkit: {} (see vmkit --help)",
            line.trim_start_matches("error: ")
        );
        ExitCode::from(2)
    })
}

/// The `log` facade of every crate, to stderr at `level`, one line per record.
fn init_logger(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .target(env_logger::Target::Stderr)
        .format(|buf, record| {
            writeln!(
                buf,
                "vmkit: {} {}: {}",
                record.level(),
                record.target(),
                record.args()
            )
        })
        .init();
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    init_logger(args.log_level);
    let end = vm::Vm::build(&args).and_then(vm::Vm::run);
    let _ = std::io::stdout().flush();
    match end {
        Ok(end) if end.is_guest_request() => ExitCode::SUCCESS,
        Ok(ExitReason::Crash) => {
            eprintln!("vmkit: guest stopped: the guest crashed");
            ExitCode::FAILURE
        }
        Ok(end) => {
            eprintln!("vmkit: guest stopped: {end}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmkit: {e}");
            ExitCode::FAILURE
        }
    }
}
