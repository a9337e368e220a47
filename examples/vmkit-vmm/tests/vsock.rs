//! virtio-vsock (`--vsock cid=N,socket=PATH`, Firecracker's hybrid vsock) through the test
//! guest's virtio-drivers `VsockConnectionManager` (`test=virtio-vsock`), on both transports:
//! 64 MiB each way checked at both ends (the streams and their FNV-1a 64, as for virtio-net,
//! see `examples/test-guest/src/cases/virtio_net/data.rs`), 32 connections at once to a host
//! echo, a connection to a port nothing listens on, and a guest that does not read while the
//! host pushes 256 MiB: the VMM's RSS stays bounded and the host's writes block.
//!
//! The host side follows the convention: the guest's connection to host port P arrives on
//! the Unix socket `PATH_P`; a host program reaches the guest's port P by connecting to
//! `PATH` and writing `CONNECT P\n`, answered with `OK <hostport>\n`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::test_guest;

/// The guest's CID.
const CID: u32 = 42;
/// Bytes of each stream of `tx` and `rx`.
const BYTES: u64 = 64 << 20;
/// Bytes the host pushes at the guest that does not read.
const HOLD_BYTES: u64 = 256 << 20;
/// How much the VMM's RSS, and the bytes the host got written, may grow while the guest
/// does not read.
const HOLD_BOUND: u64 = 32 << 20;
/// The guest's defaults (`VsockParams::DEFAULT`): host ports of its stream, of the echo, of
/// nothing; its own listening port; the echo's connections and their sizes.
const TX_PORT: u32 = 1234;
const ECHO_PORT: u32 = 1235;
const REFUSED_PORT: u32 = 1236;
const LISTEN_PORT: u32 = 5000;
const CONNS: usize = 32;
/// The guest's streams (`GUEST_SEED`, `HOST_SEED` in the test guest).
const GUEST_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const HOST_SEED: u64 = 0xd1b5_4a32_d192_ed03;
/// How long the VM may run.
const VM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the host waits for the guest's lines and connections, and one read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Host writes that made no progress for this long count as blocked.
const BLOCKED_AFTER: Duration = Duration::from_secs(2);

/// xorshift64 (13, 7, 17) from a seed: the state after step k+1, little-endian, is bytes
/// 8k..8k+8; produced in pieces of any size.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.word = x.to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }
}

/// FNV-1a 64 of `data`, continuing from `h`.
fn fnv1a64(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 of the first `n` bytes of the stream from `seed`.
fn stream_fnv(seed: u64, n: u64) -> u64 {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 1 << 16];
    let (mut h, mut left) = (FNV_START, n);
    while left > 0 {
        let k = buf.len().min(left as usize);
        pattern.fill(&mut buf[..k]);
        h = fnv1a64(h, &buf[..k]);
        left -= k as u64;
    }
    h
}

/// A fresh directory for one test's sockets, removed afterwards.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmkit-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("socket directory");
        Self(dir)
    }

    /// The `socket=` path.
    fn path(&self) -> PathBuf {
        self.0.join("v.sock")
    }

    /// Where the guest's connections to host `port` arrive.
    fn port_path(&self, port: u32) -> PathBuf {
        self.0.join(format!("v.sock_{port}"))
    }

    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.port_path(port)).expect("listen on PATH_port")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running vmkit: the guest's lines as they come, stdin to release a holding guest.
struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stdout: Arc<Mutex<String>>,
    stderr: JoinHandle<String>,
}

/// A finished vmkit.
struct Done {
    code: Option<i32>,
    stdout: String,
    context: String,
}

impl Done {
    /// Asserts a guest line starting with `prefix` that contains `part` after it (pci detail
    /// lines end in ` (pci <bdf>)`).
    #[track_caller]
    fn has(&self, prefix: &str, part: &str) {
        let found = self
            .stdout
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix(prefix))
            .any(|rest| rest.contains(part));
        assert!(found, "no line {prefix:?}…{part:?}\n{}", self.context);
    }

    /// Asserts the guest printed exactly the line `line` (a `test ...:` result).
    #[track_caller]
    fn result(&self, line: &str) {
        let found = self.stdout.lines().any(|l| l.trim_end() == line);
        assert!(found, "no line {line:?}\n{}", self.context);
    }

    /// The first guest line starting with `prefix`.
    #[track_caller]
    fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}\n{}", self.context))
    }
}

impl Vm {
    /// The test guest with `--vsock cid=CID,socket=<dir>/v.sock` on `transport`, `cmdline`.
    fn start(transport: &str, dir: &Dir, cmdline: &str) -> Self {
        let guest = test_guest();
        let vsock = format!("cid={CID},socket={}", dir.path().display());
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
            .arg("--kernel")
            .arg(&guest)
            .args(["--memory", "256M", "--transport", transport])
            .args(["--vsock", &vsock, "--cmdline", cmdline])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmkit");
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let all = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                all.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// Waits for a guest line starting with `prefix`; the line, or what the guest said.
    fn wait_line(&self, prefix: &str) -> Result<String, String> {
        let deadline = Instant::now() + IO_TIMEOUT;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Err(format!(
            "no guest line {prefix:?}; the guest said:\n{}",
            self.stdout.lock().unwrap()
        ))
    }

    /// VmRSS of the vmkit process, bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        kib << 10
    }

    /// Writes one byte to vmkit's stdin (the guest's COM1 receiver).
    fn poke(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(b"x").expect("write to vmkit's stdin");
        stdin.flush().unwrap();
    }

    /// Waits for vmkit to exit (killed after `VM_TIMEOUT` from now).
    fn finish(mut self) -> Done {
        drop(self.stdin.take());
        let start = Instant::now();
        while self.child.try_wait().expect("wait").is_none() && start.elapsed() < VM_TIMEOUT {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("vmkit's status");
        let stderr = self.stderr.join().unwrap_or_default();
        // The reader ends at EOF, after the child is gone.
        std::thread::sleep(Duration::from_millis(50));
        let stdout = self.stdout.lock().unwrap().clone();
        let context = format!(
            "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            status.code()
        );
        Done {
            code: status.code(),
            stdout,
            context,
        }
    }
}

/// Accepts one connection on `listener` (polled, so that it gives up after `IO_TIMEOUT`).
fn accept(listener: &UnixListener) -> Result<UnixStream, String> {
    listener.set_nonblocking(true).unwrap();
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > IO_TIMEOUT {
                    return Err("the guest never connected".into());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}

/// Connects to the guest's `port` through `path`: `CONNECT port\n`, then `OK <hostport>\n`;
/// the stream and the host port the line named.
fn connect_guest(path: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("connect to PATH: {e}"))?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    conn.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        match conn.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => return Err(format!("EOF after {:?}", String::from_utf8_lossy(&line))),
            Err(e) => return Err(format!("reading the answer to CONNECT: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let hostport = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .ok_or_else(|| format!("CONNECT {port} answered {line:?}"))?;
    Ok((conn, hostport))
}

/// What the host read on a connection: bytes, their FNV-1a 64, the offset of the first one
/// not in the expected stream, and whether it ended with EOF.
#[derive(Debug)]
struct Got {
    bytes: u64,
    fnv: u64,
    mismatch: Option<u64>,
    eof: bool,
}

/// Reads `conn` until EOF (or an error, or `limit` bytes past which anything is wrong),
/// checking against the stream from `seed`.
fn read_stream(conn: &mut UnixStream, seed: u64, limit: u64) -> Got {
    let mut pattern = Pattern::new(seed);
    let (mut buf, mut want) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut got = Got {
        bytes: 0,
        fnv: FNV_START,
        mismatch: None,
        eof: false,
    };
    while got.bytes <= limit {
        let n = match conn.read(&mut buf) {
            Ok(0) => {
                got.eof = true;
                break;
            }
            Ok(n) => n,
            Err(_) => break,
        };
        pattern.fill(&mut want[..n]);
        if got.mismatch.is_none() {
            if let Some(at) = buf[..n].iter().zip(&want[..n]).position(|(a, b)| a != b) {
                got.mismatch = Some(got.bytes + at as u64);
            }
        }
        got.fnv = fnv1a64(got.fnv, &buf[..n]);
        got.bytes += n as u64;
    }
    got
}

/// Writes `n` bytes of the stream from `seed`, counting them in `written` as they go.
fn write_stream(
    conn: &mut UnixStream,
    seed: u64,
    n: u64,
    written: &AtomicU64,
) -> Result<(), String> {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 1 << 16];
    let mut left = n;
    while left > 0 {
        let k = buf.len().min(left as usize);
        pattern.fill(&mut buf[..k]);
        conn.write_all(&buf[..k])
            .map_err(|e| format!("after {} bytes: {e}", n - left))?;
        left -= k as u64;
        written.fetch_add(k as u64, Ordering::Relaxed);
    }
    Ok(())
}

fn suffix(transport: &str) -> &'static str {
    if transport == "pci" {
        " (pci)"
    } else {
        ""
    }
}

/// `tx` and `rx`: the guest sends 64 MiB of its stream to host port 1234, then the host
/// connects to the guest's port 5000 and sends 64 MiB of its own; both checked at both ends,
/// and each side's SHUTDOWN reaches the other as the end of the stream.
fn streams(transport: &str) {
    let dir = Dir::new(&format!("streams-{transport}"));
    let listener = dir.listen(TX_PORT);
    let from_guest = std::thread::spawn(move || -> Result<Got, String> {
        let mut conn = accept(&listener)?;
        Ok(read_stream(&mut conn, GUEST_SEED, BYTES))
    });
    let vm = Vm::start(
        transport,
        &dir,
        &format!("test=virtio-vsock vsock_cases=tx,rx vsock_bytes={BYTES}"),
    );
    let to_guest = vm
        .wait_line("vsock-rx: listening on port 5000")
        .and_then(|_| connect_guest(&dir.path(), LISTEN_PORT))
        .and_then(|(mut conn, hostport)| {
            write_stream(&mut conn, HOST_SEED, BYTES, &AtomicU64::new(0))?;
            // The guest reads it all, then shuts down: the end of the stream here.
            let mut rest = Vec::new();
            let end = conn.read_to_end(&mut rest).map_err(|e| format!("EOF: {e}"));
            Ok((hostport, end.map(|_| rest.len())))
        });
    let done = vm.finish();
    let c = &done.context;
    let from_guest = from_guest
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{c}"));
    let (hostport, end) = to_guest.unwrap_or_else(|e| panic!("host → guest: {e}\n{c}"));
    let s = suffix(transport);
    // The config space's CID.
    done.has(&format!("virtio-vsock: guest cid {CID}"), "");
    // Guest → host: every byte of the guest's stream, then EOF from its SHUTDOWN; the FNV the
    // guest printed is the host's.
    assert_eq!(from_guest.bytes, BYTES, "{from_guest:?}\n{c}");
    assert_eq!(from_guest.mismatch, None, "{c}");
    assert!(from_guest.eof, "no EOF after the guest's stream\n{c}");
    done.has(
        &format!("vsock-tx: sent {BYTES} bytes to port {TX_PORT} in "),
        &format!("fnv1a64 0x{:016x}", from_guest.fnv),
    );
    done.result(&format!("test vsock-tx: ok{s}"));
    // Host → guest: the guest got the host's stream from the port `OK` named (it checks every
    // byte against the stream; the FNV is checked here), then its SHUTDOWN is EOF here.
    done.has(
        &format!("vsock-rx: received {BYTES} bytes from port {hostport} in "),
        &format!("fnv1a64 0x{:016x}", stream_fnv(HOST_SEED, BYTES)),
    );
    assert_eq!(end, Ok(0), "after the host's stream\n{c}");
    done.result(&format!("test vsock-rx: ok{s}"));
    done.result(&format!("test virtio-vsock: ok{s}"));
    assert_eq!(done.code, Some(0), "{c}");
}

/// What the echo saw: connections, the most open at once, bytes echoed.
#[derive(Debug, Default)]
struct Echoed {
    conns: usize,
    peak: usize,
    bytes: u64,
}

/// Echoes every connection on `listener` (each on a thread) until `stop`.
fn echo_server(listener: UnixListener, stop: Arc<AtomicBool>) -> JoinHandle<Echoed> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let (open, peak) = (open.clone(), peak.clone());
            threads.push(std::thread::spawn(move || {
                peak.fetch_max(open.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                let mut bytes = 0u64;
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    bytes += n as u64;
                }
                open.fetch_sub(1, Ordering::SeqCst);
                bytes
            }));
        }
        let conns = threads.len();
        let bytes = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        Echoed {
            conns,
            peak: peak.load(Ordering::SeqCst),
            bytes,
        }
    })
}

/// `echo`: 32 connections at once to a host echo on port 1235, each with its own pattern,
/// every byte of every echo checked by the guest.
fn echo(transport: &str) {
    let dir = Dir::new(&format!("echo-{transport}"));
    let stop = Arc::new(AtomicBool::new(false));
    let server = echo_server(dir.listen(ECHO_PORT), stop.clone());
    let done = Vm::start(transport, &dir, "test=virtio-vsock vsock_cases=echo").finish();
    stop.store(true, Ordering::Relaxed);
    let echoed = server.join().unwrap();
    let c = &done.context;
    let s = suffix(transport);
    // The guest's messages are 1000 + 61 k bytes, k < 32.
    let total: u64 = (0..CONNS as u64).map(|k| 1000 + 61 * k).sum();
    done.has(
        &format!("vsock-echo: {CONNS} connections to port {ECHO_PORT} connected in "),
        "",
    );
    done.result(&format!("test vsock-echo: ok{s}"));
    assert_eq!(echoed.conns, CONNS, "{echoed:?}\n{c}");
    // All open at once on the host too.
    assert_eq!(echoed.peak, CONNS, "{echoed:?}\n{c}");
    assert_eq!(echoed.bytes, total, "{echoed:?}\n{c}");
    assert_eq!(done.code, Some(0), "{c}");
}

/// `refused`: nothing listens on `PATH_1236`: the guest's connection is reset (within the
/// guest's 5 s bound), not left hanging.
fn refused(transport: &str) {
    let dir = Dir::new(&format!("refused-{transport}"));
    let done = Vm::start(transport, &dir, "test=virtio-vsock vsock_cases=refused").finish();
    let s = suffix(transport);
    done.has(
        &format!("vsock-refused: port {REFUSED_PORT}: reset after "),
        "",
    );
    done.result(&format!("test vsock-refused: ok{s}"));
    assert_eq!(done.code, Some(0), "{}", done.context);
}

/// How the guest that does not read gets its connection.
#[derive(Clone, Copy)]
enum Hold {
    /// It listens on 5000 and the host connects through `PATH`.
    Listen,
    /// It connects to host port 1234.
    Connect,
}

/// A guest that does not read: the host pushes 256 MiB at it; the VMM's RSS grows by less
/// than 32 MiB and the host's writes block after less than 32 MiB; once the guest reads
/// again (released through COM1), all 256 MiB arrive, checked.
fn hold(transport: &str, how: Hold) {
    let (name, cases) = match how {
        Hold::Listen => ("listen", "hold-listen"),
        Hold::Connect => ("connect", "hold-connect"),
    };
    let dir = Dir::new(&format!("hold-{name}-{transport}"));
    let listener = dir.listen(TX_PORT);
    let mut vm = Vm::start(
        transport,
        &dir,
        &format!("test=virtio-vsock vsock_cases={cases} vsock_bytes={HOLD_BYTES}"),
    );
    let conn = match how {
        Hold::Listen => vm
            .wait_line("vsock-hold: listening on port 5000")
            .and_then(|_| connect_guest(&dir.path(), LISTEN_PORT))
            .map(|(conn, _)| conn),
        Hold::Connect => accept(&listener),
    };
    let pushed = conn
        .and_then(|conn| {
            vm.wait_line("vsock-hold: connected with host port ")?;
            Ok(conn)
        })
        .map(|mut conn| {
            let rss_before = vm.rss();
            let written = Arc::new(AtomicU64::new(0));
            let count = written.clone();
            let writer = std::thread::spawn(move || {
                conn.set_write_timeout(None).unwrap();
                write_stream(&mut conn, HOST_SEED, HOLD_BYTES, &count)
            });
            // Until the writes make no progress for BLOCKED_AFTER (or all went through).
            let (mut last, mut since) = (0, Instant::now());
            let start = Instant::now();
            while since.elapsed() < BLOCKED_AFTER
                && start.elapsed() < IO_TIMEOUT
                && !writer.is_finished()
            {
                std::thread::sleep(Duration::from_millis(50));
                let now = written.load(Ordering::Relaxed);
                if now != last {
                    (last, since) = (now, Instant::now());
                }
            }
            let rss_after = vm.rss();
            let blocked_at = written.load(Ordering::Relaxed);
            // Release the guest: it reads everything now.
            vm.poke();
            (rss_before, rss_after, blocked_at, writer)
        });
    let done = vm.finish();
    let c = &done.context;
    let (rss_before, rss_after, blocked_at, writer) = pushed.unwrap_or_else(|e| panic!("{e}\n{c}"));
    let wrote = writer.join().unwrap();
    eprintln!(
        "hold {name} {transport}: VmRSS {} KiB before, {} KiB while blocked; writes blocked \
         after {blocked_at} bytes",
        rss_before >> 10,
        rss_after >> 10
    );
    let s = suffix(transport);
    assert!(
        blocked_at < HOLD_BOUND,
        "the host wrote {blocked_at} bytes to a guest that does not read\n{c}"
    );
    assert!(
        rss_after < rss_before + HOLD_BOUND,
        "VmRSS grew from {rss_before} to {rss_after} bytes\n{c}"
    );
    wrote.unwrap_or_else(|e| panic!("writing after the release: {e}\n{c}"));
    done.line("vsock-hold: released after ");
    done.has(
        &format!("vsock-hold: received {HOLD_BYTES} bytes from port "),
        &format!("fnv1a64 0x{:016x}", stream_fnv(HOST_SEED, HOLD_BYTES)),
    );
    done.result(&format!("test vsock-hold-{name}: ok{s}"));
    assert_eq!(done.code, Some(0), "{c}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn stream_each_way_mmio() {
    streams("mmio");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn stream_each_way_pci() {
    streams("pci");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn echo_on_32_connections_at_once_mmio() {
    echo("mmio");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn echo_on_32_connections_at_once_pci() {
    echo("pci");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_port_without_listener_resets_mmio() {
    refused("mmio");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_port_without_listener_resets_pci() {
    refused("pci");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_guest_that_does_not_read_bounds_the_vmm_mmio() {
    hold("mmio", Hold::Listen);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_guest_that_does_not_read_bounds_the_vmm_pci() {
    hold("pci", Hold::Listen);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_guest_connection_that_does_not_read_bounds_the_vmm_mmio() {
    hold("mmio", Hold::Connect);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_guest_connection_that_does_not_read_bounds_the_vmm_pci() {
    hold("pci", Hold::Connect);
}
