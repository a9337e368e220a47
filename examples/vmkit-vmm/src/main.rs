//! `vmkit`: the reference VMM composed from the vmkit crates.
//!
//! Reading order: [`config`] (the command line) → [`host`] (the operator's side: API socket,
//! signals, [`logger`], [`metrics`]) → [`setup`] (the VM described by the command line, a
//! config file or the API, via [`resources`]) → [`vm`] (the stages: machine, vCPUs,
//! devices, kernel; [`landlock`] just before the vCPUs start) → [`runtime`] (the run: API
//! calls, pause, shutdown) → [`devices`], [`output`], [`io`], [`terminal`], [`signals`],
//! [`stats`], [`descriptors`], [`error`]; [`sandbox`] (seccomp, `--user`) at its points in
//! [`host`] and [`vm`].

mod config;
mod descriptors;
mod devices;
mod error;
mod host;
mod io;
mod landlock;
mod limits;
mod logger;
mod metrics;
mod net;
mod output;
mod resources;
mod runtime;
mod sandbox;
mod setup;
mod signals;
mod snapshot;
mod stats;
mod terminal;
mod vm;

use std::io::Write;
use std::process::ExitCode;

use vmkit_legacy::ExitReason;

use crate::config::Args;
use crate::error::{Error, Result};

/// The exit statuses of `vmkit` (the table in README.md).
mod status {
    /// The guest powered off.
    pub const POWER_OFF: u8 = 0;
    /// vmkit failed: it could not start the VM, or could not keep it running.
    pub const FAILED: u8 = 1;
    /// The command line is wrong.
    pub const USAGE: u8 = 2;
    /// The guest reset (rebooted) the machine; vmkit does not boot it again.
    pub const RESET: u8 = 3;
    /// The guest crashed: a triple fault, a KVM internal error, a crash event.
    pub const CRASH: u8 = 4;
    /// The host stopped the VM: a shutdown signal's grace period ran out, a second signal
    /// came, the console escape was typed, or a signal came before the start.
    pub const STOPPED: u8 = 5;
}

/// Parses the command line; on an error prints one line (not clap's usage block).
fn parse_args() -> std::result::Result<Args, ExitCode> {
    Args::try_parse_checked().map_err(|e| {
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
        ExitCode::from(status::USAGE)
    })
}

/// The stages: what this process inherited made close-on-exec, the shutdown signals (caught before any thread starts), the log, the
/// host's side (API socket, metrics), the VM from the command line, a config file or the
/// API, and its run. `None`: a signal came before the VM started.
fn run(args: &Args) -> Result<Option<ExitReason>> {
    descriptors::inherited_close_on_exec().map_err(Error::Descriptors)?;
    let signals = signals::Signals::block().map_err(Error::Signals)?;
    let logger =
        logger::Logger::install(args.log_level, args.log_file.as_deref()).map_err(Error::Log)?;
    let sandbox = sandbox::Sandbox::new(args)?;
    let mut host = host::Host::open(args, signals, logger, sandbox)?;
    let restore = args.restore_args().map_err(Error::Restore)?;
    let started = match (&args.kernel, &args.config_file) {
        _ if restore.is_some() => restore
            .map(|r| setup::from_snapshot(args, &setup::Restore::of_cli(&r)))
            .transpose()?,
        (Some(_), _) => Some(setup::from_args(args)?),
        (None, Some(path)) => Some(setup::from_config_file(path, args, &mut host)?),
        (None, None) if host.has_api() => setup::through_api(args, &mut host)?,
        (None, None) => return Err(Error::NoKernel),
    };
    match started {
        Some(s) => Ok(Some(s.vm.run(&mut host, s.machine)?)),
        None => Ok(None),
    }
}

/// The exit status for how the VM ended, with a line on stderr unless the guest ended
/// itself.
fn exit_status(end: Result<Option<ExitReason>>) -> u8 {
    let (code, line) = match end {
        Ok(Some(ExitReason::PowerOff)) => (status::POWER_OFF, None),
        Ok(Some(ExitReason::Reset)) => (status::RESET, None),
        Ok(Some(e @ ExitReason::Crash(_))) => (status::CRASH, Some(format!("guest stopped: {e}"))),
        Ok(Some(e @ ExitReason::Stopped(_))) => (status::STOPPED, Some(e.to_string())),
        Ok(Some(ExitReason::Failed(why))) => {
            (status::FAILED, Some(format!("guest stopped: {why}")))
        }
        Ok(None) => (
            status::STOPPED,
            Some("stopped before the VM started".into()),
        ),
        Err(e) => (status::FAILED, Some(e.to_string())),
    };
    if let Some(line) = line {
        eprintln!("vmkit: {line}");
    }
    code
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let end = run(&args);
    let _ = std::io::stdout().flush();
    ExitCode::from(exit_status(end))
}
