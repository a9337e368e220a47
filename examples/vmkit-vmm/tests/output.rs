//! The guest's output: a stdout nobody reads does not stall the guest or the VMM, output files
//! are opened last and never through a symbolic link, and `max_size` caps them.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api::Dir;
use common::{test_guest, vmkit};

/// A command line on which the test guest prints about 27 KB: it echoes the line, then a
/// line for each of its 1000 unknown keys.
fn chatty_cmdline(extra: &str) -> String {
    let mut line = vec!["z=1"; 1000].join(" ");
    line.push(' ');
    line.push_str(extra);
    line
}

/// A pipe holding one page (4096 bytes): (read end, write end).
fn small_pipe() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just opened and nothing else owns them.
    let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETPIPE_SZ on our own pipe.
    let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert_eq!(size, 4096);
    (r, w)
}

/// Bytes waiting in a pipe.
fn queued(r: &File) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    unsafe { libc::ioctl(r.as_raw_fd(), libc::FIONREAD, &mut n) };
    n as usize
}

fn curl_get(sock: &std::path::Path) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "20", "--unix-socket"])
        .arg(sock)
        .arg("http://localhost/")
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// vmkit's stdout is a pipe that nobody reads: once it and the 4 KiB output buffer are full,
/// the guest's output is dropped and counted, the API still answers, and the guest still
/// runs to its end (it waits for a byte on COM1, then powers off). Before the sink, vCPU 0
/// blocked in `write` inside the serial lock and the guest never ended.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_stdout_nobody_reads_does_not_stall_the_guest() {
    let dir = Dir::new("stdout-unread");
    let (sock, metrics) = (dir.file("api.sock"), dir.file("metrics"));
    let (mut pipe, stdout) = small_pipe();
    let guest = test_guest();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .arg("--kernel")
        .arg(&guest)
        .args(["--cmdline", &chatty_cmdline("hold=serial")])
        .args(["--output-buffer", "4K", "--metrics-interval", "0"])
        .arg("--api-sock")
        .arg(&sock)
        .arg("--metrics-file")
        .arg(&metrics)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while queued(&pipe) < 4096 || !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pipe never filled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The pipe is full and nobody reads it: the VMM still answers.
    let info = curl_get(&sock);
    assert!(info.contains(r#""state":"Running""#), "GET /: {info:?}");
    // Release the guest's hold (a byte sent early waits in the UART for it).
    child.stdin.as_mut().unwrap().write_all(b"x").unwrap();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("vmkit never ended with its stdout unread");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // One warning for the drops, not one per byte.
    assert_eq!(stderr.matches("output is dropped").count(), 1, "{stderr}");
    // What reached the pipe is the start of the output, in order.
    let mut got = Vec::new();
    pipe.read_to_end(&mut got).unwrap();
    let got = String::from_utf8(got).unwrap();
    assert!(
        got.starts_with("vmkit-test-guest: ready\ncmdline: z=1 z=1 z=1"),
        "{got:?}"
    );
    let last = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    let s = &m["stdout"];
    assert_eq!(s["bytes"], got.len(), "{m}");
    assert!(s["dropped_bytes"].as_u64().unwrap() > 20_000, "{m}");
    assert_eq!(s["buffered_bytes"], 0, "{m}");
    println!("stdout unread: {s}, {} s", start.elapsed().as_secs_f32());
}

/// Whether a line of the metrics file counts a stdout write that would have blocked.
fn met_a_full_pipe(metrics: &std::path::Path) -> bool {
    std::fs::read_to_string(metrics)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|m| m["stdout"]["would_block"].as_u64().unwrap_or(0) >= 1)
}

/// A reader that stops for a while, then catches up, loses nothing: what waited is written
/// by the event loop once the pipe is writable again (not only at the end: the guest's
/// `hold` line must arrive while it waits, or it never gets its byte).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_reader_that_catches_up_loses_nothing() {
    let dir = Dir::new("stdout-late");
    let metrics = dir.file("metrics");
    let (pipe, stdout) = small_pipe();
    let guest = test_guest();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .arg("--kernel")
        .arg(&guest)
        .args(["--cmdline", &chatty_cmdline("hold=serial")])
        .args(["--metrics-interval", "1", "--metrics-file"])
        .arg(&metrics)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Nobody reads until the pipe is full and the VMM has met it full (a metrics line
    // counts a write that would have blocked): only then is the buffer in play.
    let start = Instant::now();
    while queued(&pipe) < 4096 || !met_a_full_pipe(&metrics) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the pipe never filled, or vmkit never found it full"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut got = Vec::new();
    let mut reader = std::io::BufReader::new(pipe);
    let mut line = String::new();
    while !got.ends_with(b"hold: waiting for a byte on COM1\n") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0);
        got.extend_from_slice(line.as_bytes());
    }
    child.stdin.as_mut().unwrap().write_all(b"x").unwrap();
    reader.read_to_end(&mut got).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let text = String::from_utf8(got).unwrap();
    assert_eq!(text.matches("cmdline: unknown key z\n").count(), 1000);
    let tail = &text[text.len().saturating_sub(300)..];
    assert!(
        text.contains("hold: released\n") && text.ends_with("exit: poweroff\n"),
        "ends with: {tail}"
    );
    let last = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    let s = &m["stdout"];
    assert_eq!(s["bytes"], text.len(), "{m}");
    assert_eq!(s["dropped_bytes"], 0, "{m}");
    assert!(s["would_block"].as_u64().unwrap() >= 1, "{m}");
    println!("stdout late reader: {s}");
}

/// A start that fails after the output files were named leaves existing ones as they were
/// (content and mtime): they are opened last.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_failed_start_leaves_existing_output_files_untouched() {
    let dir = Dir::new("failed-start");
    let (serial, console) = (dir.file("serial.log"), dir.file("console.log"));
    for f in [&serial, &console] {
        std::fs::write(f, b"yesterday's log\n").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let guest = test_guest();
    let out = vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--serial",
            &format!("file={}", serial.display()),
            "--console",
            &format!("file={}", console.display()),
            "--disk",
            "path=/nonexistent/disk.img",
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent/disk.img"), "{err}");
    for f in [&serial, &console] {
        assert_eq!(std::fs::read(f).unwrap(), b"yesterday's log\n", "{f:?}");
        assert_eq!(
            std::fs::metadata(f).unwrap().mtime(),
            1_000_000_000,
            "{f:?}"
        );
    }
}

/// `file=` naming a symbolic link is refused with one line, and the link's target is left
/// alone.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_symbolic_link_as_output_file_is_refused() {
    let dir = Dir::new("symlink");
    let (target, link) = (dir.file("precious"), dir.file("serial.log"));
    std::fs::write(&target, b"not a log\n").unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let guest = test_guest();
    for flag in ["--serial", "--console"] {
        let out = vmkit(
            &[
                "--kernel",
                guest.to_str().unwrap(),
                flag,
                &format!("file={}", link.display()),
            ],
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("is a symbolic link, which is refused"),
            "{err}"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"not a log\n");
    }
}

/// An output file that cannot be opened (a symbolic link, a missing directory) fails the
/// start before any other output file is truncated: every file is opened, then all are
/// truncated.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn an_output_file_that_cannot_be_opened_leaves_the_others_untouched() {
    let dir = Dir::new("open-then-truncate");
    let serial = dir.file("serial.log");
    let link = dir.file("console-link");
    std::os::unix::fs::symlink(dir.file("elsewhere"), &link).unwrap();
    let missing = dir.file("no-such-dir/console.log");
    let guest = test_guest();
    for (console, why) in [
        (&link, "is a symbolic link, which is refused"),
        (&missing, "No such file or directory"),
    ] {
        std::fs::write(&serial, b"yesterday's log\n").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        File::options()
            .write(true)
            .open(&serial)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // The serial port's sink comes first: its file is opened before the console's fails.
        let out = vmkit(
            &[
                "--kernel",
                guest.to_str().unwrap(),
                "--serial",
                &format!("file={}", serial.display()),
                "--console",
                &format!("file={}", console.display()),
            ],
            Duration::from_secs(30),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(why), "{err}");
        assert_eq!(std::fs::read(&serial).unwrap(), b"yesterday's log\n");
        assert_eq!(std::fs::metadata(&serial).unwrap().mtime(), 1_000_000_000);
    }
}

/// A FIFO as output file with nobody reading it is a one-line error at start, not a start
/// blocked forever in `open` (the helper kills vmkit and fails the test after 30 s).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_fifo_nobody_reads_is_an_error_not_a_hang() {
    let dir = Dir::new("fifo");
    let fifo = dir.file("serial.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives for the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let guest = test_guest();
    let out = vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--serial",
            &format!("file={}", fifo.display()),
        ],
        Duration::from_secs(30),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("it is a FIFO nobody reads"), "{err}");
}

/// `max_size=` caps an output file; the guest runs to its end regardless.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn max_size_caps_an_output_file() {
    let dir = Dir::new("max-size");
    let (log, metrics) = (dir.file("serial,log"), dir.file("metrics"));
    let guest = test_guest();
    let out = vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            &chatty_cmdline(""),
            "--serial",
            // A comma in the path too.
            &format!(
                "file={},max_size=1000",
                log.display().to_string().replace(',', ",,")
            ),
            "--metrics-file",
            metrics.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.len(), 1000);
    assert!(text.starts_with("vmkit-test-guest: ready\n"), "{text}");
    assert_eq!(err.matches("max_size").count(), 1, "{err}");
    let last = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
    assert_eq!(m["serial_file"]["bytes"], 1000, "{m}");
    assert!(
        m["serial_file"]["dropped_bytes"].as_u64().unwrap() > 20_000,
        "{m}"
    );
}
