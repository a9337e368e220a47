//! virtio-blk through the test guest's virtio-drivers, on both transports and both engines:
//! verify passes, requests in flight, read-only disks, durability after FLUSH + SIGKILL, and
//! discard holes the host sees, and the image locks (a second VM on an image fails at start).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{vmkit, Run};

/// A disk image in the temp dir, removed on drop.
struct Image(PathBuf);

impl Image {
    /// `mib` MiB filled with `byte` (0 leaves it sparse).
    fn new(name: &str, mib: u64, byte: u8) -> Self {
        let path =
            std::env::temp_dir().join(format!("vmkit-blk-{name}-{}.img", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        if byte == 0 {
            f.set_len(mib << 20).unwrap();
        } else {
            let chunk = vec![byte; 1 << 20];
            for _ in 0..mib {
                f.write_all(&chunk).unwrap();
            }
            f.sync_all().unwrap();
        }
        Image(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).output();
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test guest on 2 vCPUs with `disk`, `extra` flags and `cmdline`.
fn boot(disk: &str, extra: &[&str], cmdline: &str) -> Run {
    let mut args = vec!["--cpus", "2", "--disk", disk];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--cmdline", cmdline]);
    Run::guest(&args)
}

fn verify_on(transport: &str, engine: &str) {
    let img = Image::new(&format!("verify-{transport}-{engine}"), 80, 0);
    let disk = format!("path={},engine={engine},serial=vmkit-{engine}", img.path());
    let cmdline = "test=blk-serial,blk-verify:64,blk-inflight";
    let run = boot(&disk, &["--transport", transport], cmdline).ok();
    run.says(&[
        "virtio-blk: capacity 163840 sectors, rw, serial vmkit-",
        "test blk-serial: ok",
        "blk-verify: 64 MiB written in",
        "test blk-verify: ok",
        "blk-inflight: 16 requests in flight, all completed",
        "test blk-inflight: ok",
    ]);
    // The guest's pattern is in the host file: sector 1 is not what truncate left.
    let data = std::fs::read(&img.0).unwrap();
    assert!(
        data[512..1024].iter().any(|&b| b != 0),
        "{transport}/{engine}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn verify_mmio_sync() {
    verify_on("mmio", "sync");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn verify_mmio_io_uring() {
    verify_on("mmio", "io_uring");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn verify_pci_sync() {
    verify_on("pci", "sync");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn verify_pci_io_uring() {
    verify_on("pci", "io_uring");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn read_only_disk_refuses_writes_and_the_vmm_keeps_running() {
    let img = Image::new("ro", 4, 0x5a);
    for engine in ["sync", "io_uring"] {
        let disk = format!("path={},readonly=on,engine={engine}", img.path());
        boot(&disk, &[], "test=blk-ro").ok().says(&[
            "virtio-blk: capacity 8192 sectors, ro",
            "test blk-ro: ok (write refused: IOERR)",
            "exit: poweroff",
        ]);
    }
    // Nothing was written.
    assert!(std::fs::read(&img.0).unwrap().iter().all(|&b| b == 0x5a));
}

/// A comma in a disk's path is written `,,`: the disk (read-only, so it must be the file
/// named, not one called `a`) boots.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_disk_path_with_a_comma_boots() {
    let img = Image::new("with,comma", 4, 0x5a);
    assert!(img.path().contains(','));
    let disk = format!("{},readonly=on", img.path().replace(',', ",,"));
    boot(&format!("path={disk}"), &[], "test=blk-ro")
        .ok()
        .says(&["virtio-blk: capacity 8192 sectors, ro", "test blk-ro: ok"]);
}

/// Spawns vmkit (under `wrapper`, e.g. strace, when not empty) on a 4 MiB image (`name` in
/// its file name: each test its own, or the image lock keeps the second out) with the
/// guest's `blk-write-flush=100:deadbeef`, waits for its `blk-flushed` line (the guest saw
/// the FLUSH complete), SIGKILLs the VMM (`pid` finds it under a wrapper), and returns
/// the image's sector 100 and the guest's output.
fn write_flush_kill(
    name: &str,
    transport: &str,
    engine: &str,
    wrapper: &[&str],
    pid: impl Fn(&std::process::Child) -> u32,
) -> (Vec<u8>, String) {
    let img = Image::new(&format!("{name}-{transport}-{engine}"), 4, 0);
    let guest = common::test_guest();
    let vmkit = env!("CARGO_BIN_EXE_vmkit");
    let (program, wrapped) = match wrapper.split_first() {
        Some((w, rest)) => (*w, [rest, &[vmkit]].concat()),
        None => (vmkit, Vec::new()),
    };
    let mut child = Command::new(program)
        .args(wrapped)
        .args([
            "--kernel",
            guest.to_str().unwrap(),
            "--transport",
            transport,
        ])
        .arg("--disk")
        .arg(format!("path={},engine={engine}", img.path()))
        .args(["--cmdline", "blk-write-flush=100:deadbeef"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} (for strace: apt-get install strace): {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = String::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !seen.contains("blk-flushed: 100") {
        assert!(
            std::time::Instant::now() < deadline,
            "no blk-flushed line:\n{seen}"
        );
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push_str(&l);
            seen.push('\n');
        }
    }
    // SIGKILL: no chance for the VMM to write anything after the guest was told "flushed".
    let vmm = pid(&child);
    // SAFETY: kill(2) on a process we started; no memory is involved.
    unsafe { libc::kill(vmm as libc::pid_t, libc::SIGKILL) };
    let _ = child.wait();
    let data = std::fs::read(&img.0).unwrap();
    (data[100 * 512..101 * 512].to_vec(), seen)
}

/// What this shows: the data the guest wrote (and flushed) is in the image file when the
/// VMM dies at once afterwards — it reached the file, with no write held back in the VMM.
/// What it does **not** show is durability: a SIGKILL keeps the host's page cache, so this
/// passes with `fdatasync` skipped entirely. The ordering of the sync is checked by
/// vmkit-virtio-blk's `tests/durability.rs`, and the system call itself by
/// `flush_is_an_fdatasync_before_the_guest_sees_it` below.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn written_data_reaches_the_file_before_sigkill() {
    for (transport, engine) in [("mmio", "sync"), ("mmio", "io_uring"), ("pci", "io_uring")] {
        let (sector, _) = write_flush_kill("flush", transport, engine, &[], |c| c.id());
        let want: Vec<u8> = std::iter::repeat_n(0xdeadbeefu32.to_le_bytes(), 128)
            .flatten()
            .collect();
        assert_eq!(sector, want, "{transport}/{engine}");
    }
}

/// The one child of process `pid` (strace's tracee).
fn only_child(pid: u32) -> u32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = children.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "strace started nothing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The text of a traced `write(N<pipe:[...]>, "...", n)`'s buffer, still escaped as strace
/// prints it (enough to find plain ASCII in), or `None` for another line. The guest's output
/// goes to the VMM's stdout pipe through a descriptor of its own (vmkit reopens stdout
/// non-blocking), so the pipe, not fd 1, marks it.
fn stdout_write(line: &str) -> Option<&str> {
    let rest = line.split_once("write(")?.1;
    let fd_end = rest.find(|c: char| !c.is_ascii_digit())?;
    if fd_end == 0 || !rest[fd_end..].starts_with("<pipe:") {
        return None;
    }
    let start = rest.find('"')? + 1;
    let end = rest.rfind('"')?;
    rest.get(start..end)
}

/// FLUSH is an `fdatasync(2)` of the image that returned before the guest saw the FLUSH
/// complete, watched from outside with strace: the trace of the VMM's `fdatasync`/`fsync`
/// calls and its writes to stdout (the guest's serial output) is one ordered log, in which
/// the `fdatasync` on the image must have returned 0 before any write carrying the
/// guest's `blk-flushed` line (the guest prints it once the FLUSH is in the used ring).
///
/// On the synchronous engine: io_uring's `IORING_OP_FSYNC` is a submission, not a system
/// call, so no tracer sees it (its ordering is covered by vmkit-virtio-blk's
/// `tests/durability.rs`, the CQE of the sync before the used ring).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn flush_is_an_fdatasync_before_the_guest_sees_it() {
    let log = std::env::temp_dir().join(format!("vmkit-blk-strace-{}.log", std::process::id()));
    let log_s = log.to_str().unwrap().to_string();
    let strace = [
        "strace",
        "-f",
        "-y",
        "-s",
        "4096",
        "-e",
        "signal=none",
        "-e",
        "trace=fdatasync,fsync,write,writev,pwritev,pwrite64",
        "-o",
        &log_s,
        "--",
    ];
    let (_, serial) = write_flush_kill("strace", "mmio", "sync", &strace, |c| only_child(c.id()));
    let trace = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let img = format!("vmkit-blk-strace-mmio-sync-{}.img", std::process::id());
    // The index of the first line where an fdatasync of the image returned 0 (entry and
    // exit may be apart, as "<unfinished ...>" and "<... fdatasync resumed>").
    let lines: Vec<&str> = trace.lines().collect();
    let mut pending_sync = std::collections::HashSet::new();
    let mut synced_at = None;
    for (i, l) in lines.iter().enumerate() {
        let tid = l.split_whitespace().next().unwrap_or("");
        if l.contains("fdatasync(") && l.contains(&img) {
            if l.ends_with("= 0") {
                synced_at = Some(i);
                break;
            }
            pending_sync.insert(tid.to_string());
        } else if l.contains("<... fdatasync resumed>")
            && pending_sync.contains(tid)
            && l.ends_with("= 0")
        {
            synced_at = Some(i);
            break;
        }
    }
    let stdout_before = |end: usize| -> String {
        lines[..end]
            .iter()
            .filter_map(|l| stdout_write(l))
            .collect()
    };
    let Some(at) = synced_at else {
        panic!(
            "no fdatasync of the image returned before the VMM was killed\nguest:\n{serial}\ntrace:\n{trace}"
        );
    };
    // The FLUSH's own sync, not a write-through one: the driver negotiated FLUSH.
    assert!(!serial.contains("no FLUSH feature"), "{serial}");
    // The guest's write of sector 100 reached the file (pwritev) before that sync.
    let wrote = lines[..at]
        .iter()
        .any(|l| l.contains("pwritev(") && l.contains(&img) && l.contains(", 51200) = 512"));
    assert!(
        wrote,
        "no pwritev of sector 100 before the fdatasync\n{trace}"
    );
    let before = stdout_before(at);
    let all = stdout_before(lines.len());
    assert!(
        all.contains("blk-flushed: 100"),
        "the trace shows no blk-flushed write\n{trace}"
    );
    assert!(
        !before.contains("blk-flushed"),
        "the guest saw the FLUSH complete before the fdatasync returned\n{trace}"
    );
}

fn seek(fd: i32, off: i64, whence: i32) -> i64 {
    // SAFETY: lseek on a descriptor we own; no memory is involved.
    unsafe { libc::lseek(fd, off, whence) }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn discard_punches_a_hole_the_host_sees() {
    for engine in ["sync", "io_uring"] {
        // Fully allocated (0xaa everywhere): any hole afterwards is the guest's doing.
        let img = Image::new(&format!("discard-{engine}"), 64, 0xaa);
        let disk = format!("path={},engine={engine}", img.path());
        let run = boot(&disk, &[], "test=blk-discard").ok();
        // The guest discards (then zeroes with unmap) 2048 sectors at sector 65536: 1 MiB
        // at 32 MiB.
        run.says(&["test blk-discard: ok", "2048 sectors at 65536"]);
        let ctx = run.context();
        let f = std::fs::File::open(&img.0).unwrap();
        let fd = f.as_raw_fd();
        assert_eq!(
            seek(fd, 0, libc::SEEK_HOLE),
            32 << 20,
            "first hole at 32 MiB\n{ctx}"
        );
        assert_eq!(
            seek(fd, 32 << 20, libc::SEEK_DATA),
            33 << 20,
            "data again at 33 MiB\n{ctx}"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn unusable_disks_are_one_line_errors() {
    let guest = common::test_guest();
    let run = |disk: &str| {
        let out = vmkit(
            &["--kernel", guest.to_str().unwrap(), "--disk", disk],
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{disk}: {err}");
        assert_eq!(err.lines().count(), 1, "{disk}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = run("path=/nonexistent/disk.img");
    assert!(err.contains("--disk /nonexistent/disk.img"), "{err}");
    let dir = std::env::temp_dir();
    let err = run(&format!("path={}", dir.display()));
    assert!(err.contains("directory"), "{err}");
    let odd = Image::new("odd", 0, 0);
    std::fs::File::options()
        .write(true)
        .open(&odd.0)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let err = run(&format!("path={}", odd.path()));
    assert!(err.contains("512"), "{err}");
    // Immutable: even root cannot open it for writing.
    let ro = Image::new("immutable", 1, 0);
    let chattr = Command::new("chattr")
        .arg("+i")
        .arg(&ro.0)
        .output()
        .expect("chattr (e2fsprogs)");
    assert!(
        chattr.status.success(),
        "chattr +i: {}",
        String::from_utf8_lossy(&chattr.stderr)
    );
    let err = run(&format!("path={}", ro.path()));
    assert!(
        err.contains("not writable") || err.contains("ermission"),
        "{err}"
    );
    // ... and with readonly=on the same file boots.
    let out = vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--disk",
            &format!("path={},readonly=on", ro.path()),
            "--cmdline",
            "exit=poweroff",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A VM on `disk` that booted (so it opened and locked the image) and waits, in the test
/// guest's `hold=serial`, for a byte on its stdin (at most 10 s), then powers off.
struct Held {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Held {
    fn start(disk: &str) -> Self {
        let guest = common::test_guest();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
            .args(["--kernel", guest.to_str().unwrap(), "--disk", disk])
            .args(["--cmdline", "hold=serial"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut held = Held {
            child,
            lines,
            seen: String::new(),
        };
        held.wait_for("hold: waiting for a byte on COM1");
        held
    }

    fn wait_for(&mut self, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.seen.contains(needle) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {needle:?}:\n{}",
                self.seen
            );
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(100)) {
                self.seen.push_str(&l);
                self.seen.push('\n');
            }
        }
    }

    /// Sends the byte; the guest powers off and the VMM exits 0.
    fn release(mut self) {
        self.child.stdin.as_mut().unwrap().write_all(b"x").unwrap();
        self.wait_for("exit: poweroff");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status}\n{}", self.seen);
        assert!(
            !self.seen.contains("FAIL"),
            "held past the guest's 10 s:\n{}",
            self.seen
        );
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vmkit` on `disk` that must fail at start: exit 1, and its one line.
fn refused(disk: &str) -> String {
    let guest = common::test_guest();
    let out = vmkit(
        &["--kernel", guest.to_str().unwrap(), "--disk", disk],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{disk}: {err}");
    assert_eq!(err.lines().count(), 1, "{disk}: {err}");
    err
}

/// `vmkit` on `disk` that must boot and power off.
fn boots(disk: &str) {
    boot(disk, &[], "exit=poweroff")
        .ok()
        .says(&["exit: poweroff"]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_second_vm_on_a_written_image_fails_at_start() {
    let img = Image::new("lock-rw", 4, 0);
    let locked = format!(
        "vmkit: --disk {p}: disk image {p} is in use by another process (locked)",
        p = img.path()
    );
    for engine in ["sync", "io_uring"] {
        let rw = format!("path={},engine={engine}", img.path());
        let ro = format!("path={},readonly=on", img.path());
        let first = Held::start(&rw);
        // Neither a writer nor a reader gets in while it runs.
        assert_eq!(refused(&rw).trim_end(), locked, "{engine}");
        assert_eq!(refused(&ro).trim_end(), locked, "{engine}");
        // lock=off is the way around it (on the caller's head).
        boots(&format!("{ro},lock=off"));
        // A clean exit releases it: a third VM starts.
        first.release();
        boots(&rw);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn read_only_vms_share_an_image_and_keep_writers_out() {
    let img = Image::new("lock-ro", 4, 0x5a);
    let ro = format!("path={},readonly=on", img.path());
    let a = Held::start(&ro);
    let b = Held::start(&ro); // both hold it at once
    let err = refused(&format!("path={}", img.path()));
    assert!(
        err.contains("is in use by another process (locked)"),
        "{err}"
    );
    a.release();
    // One reader left is still enough to keep a writer out.
    let err = refused(&format!("path={},engine=io_uring", img.path()));
    assert!(err.contains("(locked)"), "{err}");
    b.release();
    boots(&format!("path={}", img.path()));
}
