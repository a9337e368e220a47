//! The sandbox: every thread of a running vmkit under its seccomp filter (and none with
//! `--seccomp off`), a call outside a thread's list killing vmkit with SIGSYS for each
//! thread kind (the `seccomp-test-hook` feature's hidden flag) and going through with
//! `--seccomp log`/`off`, and `--user`: every thread runs as that user, with a disk it
//! could not open itself.

mod common;

use std::os::unix::fs::PermissionsExt;
#[cfg(feature = "seccomp-test-hook")]
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::test_guest;

/// A directory of its own for one test, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmkit-seccomp-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A disk image of `mib` MiB, readable and writable by root only.
fn root_only_disk(dir: &Dir, mib: u64) -> String {
    let path = dir.file("disk.img");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(mib << 20).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A vmkit running the test guest with a disk, rng, vsock and the API, COM1 to a file;
/// killed when dropped.
struct Running {
    child: Child,
    serial: String,
}

impl Running {
    fn start(dir: &Dir, extra: &[&str], cmdline: &str) -> Self {
        let guest = test_guest();
        let serial = dir.file("serial.txt");
        let disk = format!("path={},engine=io_uring", root_only_disk(dir, 8));
        let vsock = format!("cid=3,socket={}", dir.file("v.sock"));
        let child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
            .args(["--kernel", guest.to_str().unwrap(), "--cpus", "2", "--rng"])
            .args(["--disk", &disk, "--vsock", &vsock])
            .args(["--api-sock", &dir.file("api.sock")])
            .args(["--serial", &format!("file={serial}")])
            .args(extra)
            .args(["--cmdline", cmdline])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmkit");
        Self { child, serial }
    }

    /// Waits (60 s at most) until the guest printed `needle` on COM1.
    fn wait_for(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.serial).unwrap_or_default();
            if text.contains(needle) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("vmkit ended ({status:?}) before {needle:?}; COM1:\n{text}");
            }
            assert!(Instant::now() < deadline, "no {needle:?}; COM1:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `/proc/PID/task/*/status` of every thread vmkit runs: (name, status text). The
    /// kernel's own workers in the process (`PF_USER_WORKER`: io_uring's `iou-wrk-*`, KVM's
    /// `kvm-nx-lpage-recovery`) run no user code, so no filter applies to them: left out.
    fn threads(&self) -> Vec<(String, String)> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let mut all: Vec<_> = std::fs::read_dir(&tasks)
            .unwrap()
            .filter_map(|e| {
                let dir = e.ok()?.path();
                let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
                let status = std::fs::read_to_string(dir.join("status")).ok()?;
                Some((stat, status))
            })
            .filter(|(stat, _)| !kernel_worker(stat))
            .map(|(_, s)| (field(&s, "Name").to_string(), s))
            .collect();
        all.sort();
        all
    }
}

/// Whether a `/proc/.../stat` line is a kernel worker's (`PF_USER_WORKER` in its flags).
fn kernel_worker(stat: &str) -> bool {
    const PF_USER_WORKER: u64 = 0x4000;
    // The fields after the command's closing parenthesis: state, ppid, pgrp, session,
    // tty_nr, tpgid, flags.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let flags: u64 = after
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse().ok())
        .expect("flags in /proc stat");
    flags & PF_USER_WORKER != 0
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key:` in a /proc status file.
fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map_or("", str::trim)
}

fn names(threads: &[(String, String)]) -> Vec<&str> {
    threads.iter().map(|(n, _)| n.as_str()).collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_thread_runs_under_its_filter() {
    let dir = Dir::new("filters");
    let mut vm = Running::start(&dir, &[], "hold=ticks:600");
    vm.wait_for("tick 1");
    let threads = vm.threads();
    assert_eq!(
        names(&threads),
        ["vcpu0", "vcpu1", "vmkit", "vmkit-api"],
        "the threads of vmkit"
    );
    for (name, status) in &threads {
        assert_eq!(field(status, "Seccomp"), "2", "{name}: filter mode");
        // Exactly one: its own (a thread spawned after the main thread's filter, or a vCPU
        // left with an inherited one, would show two, or the wrong one).
        let filters: u32 = field(status, "Seccomp_filters").parse().unwrap();
        assert_eq!(filters, 1, "{name}: {filters} filters");
        assert_eq!(field(status, "NoNewPrivs"), "1", "{name}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn with_seccomp_off_no_thread_has_a_filter_but_no_new_privs_holds() {
    let dir = Dir::new("off");
    let mut vm = Running::start(&dir, &["--seccomp", "off"], "hold=ticks:600");
    vm.wait_for("tick 2");
    let threads = vm.threads();
    assert_eq!(threads.len(), 4, "{:?}", names(&threads));
    for (name, status) in &threads {
        assert_eq!(field(status, "Seccomp"), "0", "{name}");
        assert_eq!(field(status, "NoNewPrivs"), "1", "{name}");
    }
}

/// `vmkit` on the test guest (which powers off at once) with the API, `args` added.
#[cfg(feature = "seccomp-test-hook")]
fn short_run(dir: &Dir, args: &[&str]) -> std::process::Output {
    let guest = test_guest();
    let api = dir.file("api.sock");
    let _ = std::fs::remove_file(&api);
    let mut all = vec!["--kernel", guest.to_str().unwrap(), "--api-sock", &api];
    all.extend_from_slice(args);
    common::vmkit(&all, Duration::from_secs(120))
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg(feature = "seccomp-test-hook")]
fn a_forbidden_call_on_any_thread_kills_vmkit_with_sigsys_unless_log_or_off() {
    let dir = Dir::new("violate");
    for kind in ["vcpu", "vmm", "api"] {
        let hook = ["--seccomp-test-violate", kind];
        let killed = short_run(&dir, &hook);
        let stderr = String::from_utf8_lossy(&killed.stderr);
        assert!(
            stderr.contains(&format!("getppid on the {kind} thread")),
            "{kind}: {stderr}"
        );
        assert_eq!(
            killed.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {stderr}"
        );
        if kind == "vmm" {
            // The main thread's filter is the last, and the hook waits 500 ms after it before
            // its call: the vCPUs wait for that filter, so the guest never ran and its
            // serial port (stdout) is silent. A guest let in earlier would have printed.
            assert_eq!(
                String::from_utf8_lossy(&killed.stdout),
                "",
                "the guest ran before the main thread's filter"
            );
        }
        for mode in ["log", "off"] {
            let out = short_run(&dir, &[&hook[..], &["--seccomp", mode]].concat());
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("getppid on the"), "{kind} {mode}: {stderr}");
            assert_eq!(out.status.code(), Some(0), "{kind} {mode}: {stderr}");
            // The guest does print once let in (the silence above is not its own).
            assert!(!out.stdout.is_empty(), "{kind} {mode}: {stderr}");
        }
    }
    // Without the hook the same run is fine under the default (kill).
    let out = short_run(&dir, &[]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
#[cfg_attr(not_root, ignore = "needs root (to become another user)")]
fn user_drops_every_thread_to_nobody_after_the_disk_is_open() {
    let dir = Dir::new("user");
    // The guest can use the disk nobody may open: vmkit opened it before the drop.
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut vm = Running::start(
        &dir,
        &["--user", "65534:65534"],
        "test=blk-verify:1 hold=ticks:600",
    );
    vm.wait_for("tick 1");
    let serial = std::fs::read_to_string(&vm.serial).unwrap();
    assert!(serial.contains("test blk-verify: ok"), "{serial}");
    let threads = vm.threads();
    assert_eq!(threads.len(), 4, "{:?}", names(&threads));
    for (name, status) in &threads {
        assert_eq!(field(status, "Uid"), "65534\t65534\t65534\t65534", "{name}");
        assert_eq!(field(status, "Gid"), "65534\t65534\t65534\t65534", "{name}");
        assert_eq!(field(status, "Groups"), "65534", "{name}");
        // No capability left to any thread (root's are cleared by leaving uid 0).
        for caps in ["CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(field(status, caps), "0000000000000000", "{name}: {caps}");
        }
    }
}

#[test]
fn a_bad_user_is_a_one_line_usage_error() {
    for bad in ["nobody", "65534", "a:b", "1:2:3", "-1:0", "0:0", "0:65534"] {
        let user = format!("--user={bad}");
        let out = common::vmkit(
            &[&user, "--kernel", "/nonexistent"],
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{bad}: {stderr}");
        assert!(stderr.contains("--user"), "{bad}: {stderr}");
    }
}
