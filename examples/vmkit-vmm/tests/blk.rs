//! virtio-blk through the test guest's virtio-drivers, on both transports and both engines:
//! verify passes, requests in flight, read-only disks, durability after FLUSH + SIGKILL, and
//! discard holes the host sees.

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

/// Waits for the guest's `blk-flushed` line, SIGKILLs the VMM, and returns sector 100.
fn flush_then_kill(transport: &str, engine: &str) -> Vec<u8> {
    let img = Image::new(&format!("flush-{transport}-{engine}"), 4, 0);
    let guest = common::test_guest();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
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
        .unwrap();
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
    // SIGKILL: no chance for the VMM to flush anything after the guest was told "durable".
    child.kill().unwrap();
    let _ = child.wait();
    let data = std::fs::read(&img.0).unwrap();
    data[100 * 512..101 * 512].to_vec()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn flushed_data_survives_sigkill() {
    for (transport, engine) in [("mmio", "sync"), ("mmio", "io_uring"), ("pci", "io_uring")] {
        let sector = flush_then_kill(transport, engine);
        let want: Vec<u8> = std::iter::repeat_n(0xdeadbeefu32.to_le_bytes(), 128)
            .flatten()
            .collect();
        assert_eq!(sector, want, "{transport}/{engine}");
    }
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
