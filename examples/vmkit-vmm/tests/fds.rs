//! What a running vmkit holds, read from `/proc/PID`: every file descriptor but 0, 1 and 2 is
//! close-on-exec (nothing vmkit ever spawned would inherit one: a disk, the TAP, a KVM fd, an
//! eventfd), and the guest's RAM is out of core dumps (`dd` in its VmFlags).
//!
//! The VM has every kind of device at once, on each transport: two disks (the sync and the
//! io_uring engine, one read-only), rng, console (a file on mmio, a pty on PCI), vsock with a
//! guest connection to the host and a host client connected, net on a TAP opened by name and
//! on a TAP fd handed over by this test (which it opened without close-on-exec, as a parent
//! does), the API socket with a client connected, the log and metrics files; the guest has
//! driven rng, console and vsock, and is holding a vsock connection when it is looked at.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::api::Dir;
use common::test_guest;
use vmkit_netns::NetNs;

/// The guest's RAM: a size no other mapping of vmkit has.
const MEMORY_MIB: u64 = 136;
/// How long the guest may take to reach its vsock hold, and the VMM to accept a client.
const TIMEOUT: Duration = Duration::from_secs(60);
/// The host port the guest connects to (`vsock_port`, the test guest's default).
const VSOCK_PORT: u32 = 1234;
/// `O_CLOEXEC` in the `flags:` line of /proc/PID/fdinfo (octal there).
const O_CLOEXEC_OCTAL: u32 = 0o2000000;

/// Where a descriptor of `pid` points (`/proc/PID/fd/N`).
fn target(pid: u32, fd: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| format!("({e})"))
}

/// The open descriptors of `pid` above 2: number, whether close-on-exec, target.
fn descriptors(pid: u32) -> Vec<(u32, bool, String)> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("/proc/PID/fdinfo") {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let fd: u32 = name.parse().expect("an fd number");
        if fd <= 2 {
            continue;
        }
        // An fd closed between readdir and read is gone: nothing to check.
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or_else(|| panic!("no flags in fdinfo {fd}:\n{info}"));
        fds.push((fd, flags & O_CLOEXEC_OCTAL != 0, target(pid, &name)));
    }
    fds.sort();
    fds
}

/// The kind of a descriptor's target, for the summary: `socket`, `file` for a path, the
/// target itself for a device or an anonymous inode (`anon_inode:[eventfd]`, `/dev/kvm`).
fn kind(target: &str) -> String {
    if target.starts_with("socket:") {
        "socket".into()
    } else if target.starts_with("/dev/pts/") {
        "/dev/pts/N".into()
    } else if target.starts_with("anon_inode:") || target.starts_with("/dev/") {
        target.into()
    } else {
        "file".into()
    }
}

/// The VmFlags of `pid`'s mappings of exactly `size` bytes.
fn vm_flags_of_size(pid: u32, size: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("/proc/PID/smaps");
    let mut found = Vec::new();
    let mut current = false;
    for line in smaps.lines() {
        let head = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = head.split_once('-') {
            if let (Ok(s), Ok(e)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
                current = e - s == size;
                continue;
            }
        }
        if let (true, Some(flags)) = (current, line.strip_prefix("VmFlags:")) {
            found.push(flags.trim().to_string());
        }
    }
    found
}

/// vmkit, its guest's lines as they come.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: String,
}

impl Vm {
    fn wait_line(&mut self, prefix: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if line.starts_with(prefix) {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        panic!(
            "no guest line {prefix:?}; the guest said:\n{}\nstderr:\n{stderr}",
            self.seen
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sockets `pid` holds.
fn sockets(pid: u32) -> usize {
    descriptors(pid)
        .iter()
        .filter(|(_, _, t)| t.starts_with("socket:"))
        .count()
}

/// Makes `cmd`'s child enter `ns`'s network namespace before it runs (so that the child is
/// vmkit itself, not `ip netns exec`, which forks).
fn enter_on_spawn(cmd: &mut Command, ns: &NetNs) {
    let path = format!("/var/run/netns/{}", ns.name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: the closure runs in the child between fork and exec, and only calls setns, an
    // async-signal-safe system call, on `file`, which is open (the closure owns it, and the
    // child has its copy of the parent's descriptors).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts vmkit in `ns` with every device on `transport`.
fn start(ns: &NetNs, dir: &Dir, transport: &str) -> Vm {
    let write = |name: &str, mib: u64| {
        let p = dir.file(name);
        std::fs::File::create(&p)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        p.display().to_string()
    };
    let (sync, uring) = (write("sync.img", 4), write("uring.img", 4));
    let console = match transport {
        "pci" => "pty".to_string(),
        _ => format!("file={}", dir.file("console").display()),
    };
    let file = |name: &str| dir.file(name).display().to_string();
    ns.add_tap("vmtap1").expect("a second TAP");
    let handed = ns.open_inheritable_tap("vmtap1").expect("open vmtap1");
    let guest = test_guest();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmkit"));
    enter_on_spawn(&mut cmd, ns);
    cmd.arg("--kernel").arg(&guest);
    cmd.args(["--memory", &format!("{MEMORY_MIB}M"), "--cpus", "2"]);
    cmd.args(["--transport", transport, "--rng", "--console", &console]);
    cmd.args(["--disk", &format!("path={sync},engine=sync,readonly=on")]);
    cmd.args(["--disk", &format!("path={uring},engine=io_uring")]);
    cmd.args(["--net", &format!("tap={}", ns.tap)]);
    cmd.args(["--net", &format!("fd={}", handed.as_raw_fd())]);
    cmd.args(["--vsock", &format!("cid=42,socket={}", file("v.sock"))]);
    cmd.args(["--api-sock", &file("api.sock"), "--log-file", &file("log")]);
    cmd.args(["--metrics-file", &file("metrics"), "--log-level", "info"]);
    cmd.args([
        "--cmdline",
        &format!(
            "test=virtio-rng,virtio-console,virtio-vsock vsock_cases=hold-connect \
             vsock_port={VSOCK_PORT}"
        ),
    ]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit in the namespace");
    // vmkit has its own copy now.
    drop(handed);
    let (tx, lines) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Vm {
        child,
        lines,
        seen: String::new(),
    }
}

/// Runs the VM on `transport`, checks its descriptors and its RAM's flags.
fn every_fd_is_close_on_exec(transport: &str) {
    let ns = NetNs::create(&format!("fds-{transport}"), 1).expect("network namespace with a TAP");
    let dir = Dir::new(&format!("fds-{transport}"));
    let listener = UnixListener::bind(dir.file(&format!("v.sock_{VSOCK_PORT}"))).unwrap();
    let mut vm = start(&ns, &dir, transport);
    let pid = vm.child.id();
    vm.wait_line("test virtio-rng: ok");
    vm.wait_line("test virtio-console: ok");
    // The guest's connection to the host (a socket vmkit made), then host clients of the
    // vsock and of the API, which vmkit accepts.
    listener.set_nonblocking(false).unwrap();
    let (_guest_conn, _) = listener.accept().expect("the guest's vsock connection");
    vm.wait_line("vsock-hold: connected with host port ");
    let before = sockets(pid);
    let _vsock_client = UnixStream::connect(dir.file("v.sock")).expect("connect to v.sock");
    let _api_client = UnixStream::connect(dir.file("api.sock")).expect("connect to the API");
    let start = Instant::now();
    while sockets(pid) < before + 2 {
        assert!(
            start.elapsed() < TIMEOUT,
            "vmkit did not accept both clients"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let fds = descriptors(pid);
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, t) in &fds {
        *kinds.entry(kind(t)).or_default() += 1;
    }
    eprintln!("{transport}: {} descriptors above 2: {kinds:?}", fds.len());
    let offenders: Vec<String> = fds
        .iter()
        .filter(|(_, cloexec, _)| !cloexec)
        .map(|(fd, _, t)| format!("fd {fd} -> {t}"))
        .collect();
    assert!(
        offenders.is_empty(),
        "{} of {} descriptors of vmkit are inherited by a child it spawns (no O_CLOEXEC):\n{}",
        offenders.len(),
        fds.len(),
        offenders.join("\n")
    );
    // Every kind the VM described holds was looked at.
    let mut needed = vec![
        "/dev/kvm",
        "anon_inode:kvm-vm",
        "anon_inode:kvm-vcpu:1",
        "anon_inode:[io_uring]",
        "anon_inode:[eventfd]",
        "anon_inode:[eventpoll]",
        "anon_inode:[signalfd]",
        "anon_inode:[timerfd]",
        "/dev/net/tun",
        "socket",
        "file",
    ];
    if transport == "pci" {
        needed.extend(["/dev/ptmx", "/dev/pts/N"]);
    }
    for kind in needed {
        assert!(
            kinds.contains_key(kind),
            "no {kind} descriptor in {kinds:?}"
        );
    }

    let ram = vm_flags_of_size(pid, MEMORY_MIB << 20);
    assert!(
        !ram.is_empty(),
        "no {MEMORY_MIB} MiB mapping in /proc/{pid}/smaps"
    );
    for flags in &ram {
        assert!(
            flags.split_whitespace().any(|f| f == "dd"),
            "guest RAM would be in a core dump (no dd): {flags}"
        );
    }
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm, and root for a TAP in a network namespace"
)]
fn every_fd_is_close_on_exec_and_ram_is_not_dumped_mmio() {
    every_fd_is_close_on_exec("mmio");
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm, and root for a TAP in a network namespace"
)]
fn every_fd_is_close_on_exec_and_ram_is_not_dumped_pci() {
    every_fd_is_close_on_exec("pci");
}
