//! Shared by the integration tests: the test guest, built once, and running `vmkit`.

#![allow(dead_code)]

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

/// Whether this host can run guests. Where /dev/kvm exists, the KVM tests must pass.
pub fn have_kvm() -> bool {
    let ok = Path::new("/dev/kvm").exists();
    if !ok {
        eprintln!("no /dev/kvm on this host: guest boot not exercised");
    }
    ok
}

/// `vmkit` with `args`, stdin closed, killed after `timeout`.
pub fn vmkit(args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
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

/// Boots the test guest with `cpus` vCPUs and `cmdline`; returns (exit code, stdout, stderr).
pub fn boot_guest(cpus: u32, memory: &str, cmdline: &str) -> (Option<i32>, String, String) {
    let guest = test_guest();
    let cpus = cpus.to_string();
    let out = vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cpus",
            &cpus,
            "--memory",
            memory,
            "--cmdline",
            cmdline,
        ],
        Duration::from_secs(60),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
