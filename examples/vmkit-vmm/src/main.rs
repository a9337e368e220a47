//! `vmkit`: the reference VMM composed from the vmkit crates.
//!
//! Reading order: [`config`] (the command line) → [`vm`] (memory, irqchip, vCPUs, buses,
//! devices, kernel, run) → [`virtio`] (how a virtio device is wired) → [`exit`] (how it ends).

mod clock;
mod config;
mod event_loop;
mod exit;
mod pci;
mod virtio;
mod vm;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = match config::Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                print!("{e}");
                return ExitCode::SUCCESS;
            }
            // One line, not clap's usage block: its message up to the usage, folded.
            let msg = e.to_string();
            let head = msg.split("\n\n").next().unwrap_or("invalid arguments");
            let line = head.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!(
                "vmkit: {} (see vmkit --help)",
                line.trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    match vm::run(&args) {
        Ok(exit::VmEnd::PowerOff) | Ok(exit::VmEnd::Reset) => ExitCode::SUCCESS,
        Ok(exit::VmEnd::Failed(msg)) => {
            eprintln!("vmkit: guest stopped: {msg}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vmkit: {e}");
            ExitCode::FAILURE
        }
    }
}
