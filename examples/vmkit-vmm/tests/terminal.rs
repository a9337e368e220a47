//! `vmkit` in a real terminal (a pseudo-terminal from openpty): raw mode while the guest
//! owns stdin, the terminal restored on every way out, and the console escape.
//!
//! vmkit gets the pty's slave as stdin, stdout and stderr, in a session of its own with the
//! slave as its controlling terminal (`setsid` + `TIOCSCTTY`), as under a shell. That matters
//! for what the tests prove: if vmkit left the line discipline cooked, a Ctrl-C would become
//! a SIGINT to vmkit (its process group is the terminal's foreground group) instead of a
//! byte for the guest, and without ICANON off it would not reach vmkit before a newline.
//! The test keeps its own copy of the slave to read the terminal's settings (tcgetattr)
//! before, during and after a run, and reads the master on a thread so that vmkit never
//! blocks on a full pty.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One terminal test at a time. openpty's descriptors are not close-on-exec until fcntl
/// makes them so: a vmkit spawned by a parallel test in between would inherit the slave and
/// keep it open. (It also keeps these VM runs from competing for the CPUs.)
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// How long a run may take at most.
const TIMEOUT: Duration = Duration::from_secs(60);

fn set_cloexec(fd: RawFd) {
    // SAFETY: F_SETFD on a descriptor this process owns changes only its flags.
    let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    assert_eq!(rc, 0, "fcntl: {}", std::io::Error::last_os_error());
}

/// A terminal's settings.
fn termios(fd: RawFd) -> libc::termios {
    // SAFETY: termios is plain data that tcgetattr fills on success.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios; `fd` is open.
    let rc = unsafe { libc::tcgetattr(fd, &mut t) };
    assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
    t
}

/// Whether `t` is vmkit's raw mode: no line editing, echo, signals or flow control, no CR
/// translation, one byte at a time; output processing kept.
fn is_raw(t: &libc::termios) -> bool {
    t.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN) == 0
        && t.c_iflag & (libc::IXON | libc::ICRNL) == 0
        && t.c_oflag & libc::OPOST != 0
        && t.c_cc[libc::VMIN] == 1
        && t.c_cc[libc::VTIME] == 0
}

/// Asserts two settings are the same where raw mode changes them.
#[track_caller]
fn assert_same(before: &libc::termios, after: &libc::termios, context: &str) {
    assert_eq!(
        (before.c_iflag, before.c_oflag, before.c_lflag, before.c_cc),
        (after.c_iflag, after.c_oflag, after.c_lflag, after.c_cc),
        "the terminal was not restored (iflag, oflag, lflag, cc)\n{context}"
    );
}

/// `vmkit --kernel <the test guest> ARGS…` on a new pseudo-terminal.
struct Session {
    child: Child,
    /// The master, to type on.
    keys: File,
    /// The test's own copy of the slave, for tcgetattr.
    slave: OwnedFd,
    /// The terminal's settings before vmkit started.
    before: libc::termios,
    /// Everything vmkit wrote (stdout and stderr), as read from the master.
    output: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
    _one: MutexGuard<'static, ()>,
}

/// How a run ended.
struct Ended {
    code: Option<i32>,
    output: String,
    /// From the signal or key that ended it (or the start) to the exit.
    took: Duration,
    before: libc::termios,
    after: libc::termios,
}

impl Ended {
    #[track_caller]
    fn says(&self, needle: &str) -> &Self {
        assert!(self.output.contains(needle), "no {needle:?}\n{self}");
        self
    }

    #[track_caller]
    fn restored(&self) -> &Self {
        assert_same(&self.before, &self.after, &self.to_string());
        self
    }
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {:?}; terminal output:\n{}", self.code, self.output)
    }
}

impl Session {
    fn start(args: &[&str]) -> Self {
        let one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let guest = common::test_guest();
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: openpty writes two descriptors into the two ints; no name is asked for,
        // and null settings and size mean the defaults (a cooked terminal).
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        set_cloexec(master);
        set_cloexec(slave);
        // SAFETY: openpty just opened both; nothing else owns them.
        let (master, slave) =
            unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let before = termios(slave.as_raw_fd());
        // The defaults are a cooked terminal: what raw mode changes is set.
        assert!(
            before.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG) != 0 && !is_raw(&before),
            "a new pty is not cooked"
        );

        let stdio = || Stdio::from(slave.try_clone().expect("dup the slave"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmkit"));
        cmd.arg("--kernel")
            .arg(&guest)
            .args(args)
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio());
        // SAFETY: between fork and exec the closure only makes async-signal-safe calls
        // (setsid, ioctl) and allocates nothing. A new session, with the pty (already on
        // fd 0) as its controlling terminal: vmkit's group is the foreground one, which
        // the line discipline would signal on a cooked Ctrl-C.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn vmkit");

        let output = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut from = File::from(master.try_clone().expect("dup the master"));
        let reader = {
            let (output, stop) = (output.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                loop {
                    let mut pfd = libc::pollfd {
                        fd: from.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: `pfd` is one valid pollfd for an open descriptor.
                    let n = unsafe { libc::poll(&mut pfd, 1, 50) };
                    if n == 0 {
                        // Nothing to read: done once asked to stop (all is read by then).
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        continue;
                    }
                    match from.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => output.lock().unwrap().extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        // EIO: no slave open any more.
                        Err(_) => return,
                    }
                }
            })
        };
        Self {
            child,
            keys: File::from(master),
            slave,
            before,
            output,
            stop,
            reader: Some(reader),
            _one: one,
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// The terminal's settings now.
    fn termios(&self) -> libc::termios {
        termios(self.slave.as_raw_fd())
    }

    /// Waits until vmkit has written `needle`.
    #[track_caller]
    fn wait_for(&mut self, needle: &str) {
        let start = Instant::now();
        while !self.output().contains(needle) {
            if start.elapsed() > TIMEOUT || self.child.try_wait().unwrap().is_some() {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("no {needle:?}; terminal output:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Types `keys` on the terminal.
    fn type_keys(&mut self, keys: &[u8]) {
        self.keys.write_all(keys).expect("write to the pty master");
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only sends a signal, to our own child (not yet reaped).
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for vmkit to exit (killing it after the timeout), reads what is left on the
    /// master, and the terminal's settings after.
    fn end(mut self) -> Ended {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > TIMEOUT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("vmkit did not exit; terminal output:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let took = start.elapsed();
        let after = self.termios();
        self.stop.store(true, Ordering::Release);
        self.reader.take().unwrap().join().unwrap();
        Ended {
            code: status.code(),
            output: self.output(),
            took,
            before: self.before,
            after,
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // After a failed assertion: no vmkit left behind.
        if self.reader.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.stop.store(true, Ordering::Release);
        }
    }
}

/// Boots the guest with `cmdline` on a terminal and waits until it runs with the
/// terminal raw (`needle` printed).
fn running(args: &[&str], needle: &str) -> Session {
    let mut s = Session::start(args);
    s.wait_for(needle);
    let now = s.termios();
    assert!(
        is_raw(&now),
        "the terminal is not raw while the guest runs: lflag {:#o} iflag {:#o} oflag {:#o}\n{}",
        now.c_lflag,
        now.c_iflag,
        now.c_oflag,
        s.output()
    );
    s
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ctrl_c_is_a_byte_for_the_guest() {
    let mut s = Session::start(&["--cmdline", "hold=serial exit=poweroff"]);
    s.wait_for("hold: waiting for a byte on COM1");
    // Cooked, this would be a SIGINT to vmkit (a shutdown request the guest ignores), and
    // held by the line editor until a newline: the guest would time out after 10 s.
    s.type_keys(&[0x03]);
    let end = s.end();
    assert_eq!(end.code, Some(0), "{end}");
    end.says("hold: released").says("exit: poweroff").restored();
    assert!(
        !end.output.contains("FAIL") && !end.output.contains("SIGINT"),
        "{end}"
    );
    assert!(end.took < Duration::from_secs(8), "{:?}\n{end}", end.took);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_terminal_is_raw_while_the_guest_runs() {
    let mut s = running(&["--cmdline", "hold=ticks:600"], "tick 2");
    let t = s.termios();
    assert_eq!(t.c_lflag & libc::ICANON, 0, "ICANON set");
    assert_eq!(t.c_lflag & libc::ECHO, 0, "ECHO set");
    assert_eq!(t.c_lflag & libc::ISIG, 0, "ISIG set");
    // Still raw a while later (nothing in the run turns it back).
    s.wait_for("tick 5");
    assert!(is_raw(&s.termios()));
    s.type_keys(b"\x01x");
    let end = s.end();
    assert_eq!(end.code, Some(5), "{end}");
    end.restored();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_terminal_is_restored_after_a_power_off() {
    // Short ticks: long enough to see raw mode on, so that a restore is proved.
    let s = running(&["--cmdline", "hold=ticks:10 exit=poweroff"], "tick 1");
    let end = s.end();
    assert_eq!(end.code, Some(0), "{end}");
    end.says("tick 10").says("exit: poweroff").restored();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_escape_ends_the_vm_and_restores_the_terminal() {
    let mut s = running(&["--cmdline", "hold=ticks:600"], "tick 2");
    s.type_keys(b"\x01x");
    let end = s.end();
    assert_eq!(end.code, Some(5), "{end}");
    end.says("vmkit: stopped by the host: the console escape (Ctrl-A x)")
        .restored();
    assert!(end.took < Duration::from_secs(5), "{:?}\n{end}", end.took);
    assert!(!end.output.contains("tick 600"), "{end}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_terminal_is_restored_after_sigterm_and_the_grace_period() {
    let s = running(
        &["--shutdown-timeout", "1", "--cmdline", "hold=ticks:600"],
        "tick 2",
    );
    // The test guest ignores Ctrl-Alt-Del: vmkit stops it after the grace period.
    s.signal(libc::SIGTERM);
    let end = s.end();
    assert_eq!(end.code, Some(5), "{end}");
    end.says("SIGTERM: the guest did not shut down within 1 s")
        .restored();
    assert!(
        end.took >= Duration::from_secs(1) && end.took < Duration::from_secs(5),
        "{:?}\n{end}",
        end.took
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_terminal_is_left_alone_by_a_start_up_error() {
    let s = Session::start(&["--disk", "path=/nonexistent/disk.img"]);
    let end = s.end();
    assert_eq!(end.code, Some(1), "{end}");
    end.says("/nonexistent/disk.img").restored();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn ctrl_a_twice_sends_one_ctrl_a() {
    let mut s = Session::start(&["--cmdline", "hold=serial exit=poweroff"]);
    s.wait_for("hold: waiting for a byte on COM1");
    s.type_keys(&[0x01, 0x01]);
    let end = s.end();
    // The guest got a byte, and vmkit ran on until the guest powered off.
    assert_eq!(end.code, Some(0), "{end}");
    end.says("hold: released").says("exit: poweroff").restored();
    assert!(
        !end.output.contains("FAIL") && !end.output.contains("stopped by the host"),
        "{end}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_console_on_stdio_gets_a_raw_terminal_and_the_escape() {
    // stdin goes to the virtio-console rather than to COM1 (which still prints the ticks).
    let mut s = running(
        &["--console", "stdio", "--cmdline", "hold=ticks:600"],
        "tick 2",
    );
    s.type_keys(b"\x01x");
    let end = s.end();
    assert_eq!(end.code, Some(5), "{end}");
    end.says("vmkit: stopped by the host: the console escape (Ctrl-A x)")
        .restored();
    assert!(end.took < Duration::from_secs(5), "{:?}\n{end}", end.took);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_escape_works_while_paused_and_past_a_full_uart() {
    let sock = std::env::temp_dir().join(format!("vmkit-tty-api-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let sock_arg = sock.to_str().unwrap().to_string();
    let mut s = running(
        &["--api-sock", &sock_arg, "--cmdline", "hold=ticks:600"],
        "tick 2",
    );
    // The guest never reads COM1: these fill the UART's FIFO and the backlog behind it.
    s.type_keys(&[b'a'; 512]);
    let paused = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH"])
        .args(["--unix-socket", &sock_arg, "http://localhost/vm"])
        .args(["--data", r#"{"state": "Paused"}"#])
        .output()
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&paused.stdout), "204");
    s.type_keys(b"\x01x");
    let end = s.end();
    assert_eq!(end.code, Some(5), "{end}");
    end.says("vmkit: stopped by the host: the console escape (Ctrl-A x)")
        .restored();
    assert!(end.took < Duration::from_secs(5), "{:?}\n{end}", end.took);
}
