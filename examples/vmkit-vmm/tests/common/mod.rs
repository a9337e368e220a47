//! Shared by the integration tests: the test guest, built once, and runs of `vmkit`.
//!
//! Tests that boot a guest carry `#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]` (the build
//! script sets `no_kvm` where /dev/kvm is missing): they are reported as ignored there, and
//! run with `--include-ignored` in CI.

#![allow(dead_code)]

pub mod api;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// Builds `examples/test-guest` (its own cargo project) once per test binary and returns
/// the ELF. The outer cargo's environment is cleaned so its flags do not leak in.
pub fn test_guest() -> PathBuf {
    static GUEST: OnceLock<PathBuf> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let dir = repo_root().join("examples/test-guest");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "--release", "--quiet"])
                .current_dir(&dir);
            for (k, _) in std::env::vars() {
                if k.starts_with("CARGO_") || k == "RUSTFLAGS" || k == "RUSTC_WRAPPER" {
                    cmd.env_remove(&k);
                }
            }
            let out = cmd.output().expect("run cargo for the test guest");
            assert!(
                out.status.success(),
                "building the test guest failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let elf = dir.join("target/x86_64-unknown-linux-gnu/release/vmkit-test-guest");
            assert!(elf.exists(), "no test guest at {}", elf.display());
            elf
        })
        .clone()
}

/// `vmkit` with `args`, `input` on its stdin (then closed), killed after `timeout`.
pub fn vmkit_with_input(args: &[&str], input: &[u8], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit");
    if let Some(mut stdin) = child.stdin.take() {
        // The guest may end before reading it all: a broken pipe is fine.
        let _ = stdin.write_all(input);
    }
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "vmkit {args:?} did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `vmkit` with `args`, stdin closed, killed after `timeout`.
pub fn vmkit(args: &[&str], timeout: Duration) -> Output {
    vmkit_with_input(args, &[], timeout)
}

/// One run of `vmkit`, its outputs as text.
pub struct Run {
    /// The exit status (`None`: killed by a signal).
    pub code: Option<i32>,
    /// What the guest printed (COM1, and the console with `--console stdio`).
    pub stdout: String,
    /// What the VMM printed.
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `vmkit --kernel <the test guest> ARGS…`, stdin closed, 120 s at most.
    pub fn guest(args: &[&str]) -> Self {
        Self::guest_with_input(args, &[])
    }

    /// As [`guest`](Self::guest), with `input` on stdin.
    pub fn guest_with_input(args: &[&str], input: &[u8]) -> Self {
        let guest = test_guest();
        let mut all = vec!["--kernel", guest.to_str().unwrap()];
        all.extend_from_slice(args);
        Self::from(vmkit_with_input(&all, input, Duration::from_secs(120)))
    }

    /// Both outputs, for assertion messages.
    pub fn context(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Asserts the VMM exited with status 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert_eq!(self.code, Some(0), "{}", self.context());
        self
    }

    /// Asserts the guest printed each of `needles`.
    #[track_caller]
    pub fn says(&self, needles: &[&str]) -> &Self {
        for n in needles {
            assert!(self.stdout.contains(n), "no {n:?}\n{}", self.context());
        }
        self
    }

    /// The MMIO exits all vCPUs counted (from `--stats`).
    pub fn mmio_exits(&self) -> u64 {
        self.stderr
            .lines()
            .filter_map(|l| l.split(" pio exits, ").nth(1))
            .filter_map(|l| l.split(" mmio exits").next())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    }
}

/// Boots the test guest with `cpus` vCPUs, `memory` and `cmdline`.
pub fn boot_guest(cpus: u32, memory: &str, cmdline: &str) -> Run {
    let cpus = cpus.to_string();
    Run::guest(&["--cpus", &cpus, "--memory", memory, "--cmdline", cmdline])
}
