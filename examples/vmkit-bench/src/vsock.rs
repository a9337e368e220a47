//! virtio-vsock (`--vsock cid=N,socket=PATH`, Firecracker's hybrid vsock over Unix sockets):
//! in one boot per run, the test guest streams to the host for S seconds
//! (`bench=vsock-tx:S`: packets of 64 KiB through virtio-drivers' `VsockConnectionManager`,
//! as fast as the host's credit allows, to a host program reading the Unix socket
//! `PATH_1234`), the host streams to the guest for S seconds (`bench=vsock-rx:S`: a host
//! program connects to `PATH`, `CONNECT 5000`, writes 64 KiB at a time), then N connections
//! each way are timed from the connection request to the first byte back
//! (`bench=vsock-lat:N`: one byte sent and echoed; guest-initiated to a host echo on
//! `PATH_1235`, host-initiated through `PATH` and `CONNECT`, both including the close of the
//! previous connection no more than the connect). vmkit on virtio-mmio and on virtio-pci;
//! the ceiling is the host's own Unix sockets on the same machine: the same bytes in the
//! same 64 KiB pieces from one thread to another, and connect + one byte echoed.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::run::run_with;
use crate::stats::{fixed, median};
use crate::svg::Chart;
use crate::table::Table;
use crate::vmm::{Setup, Vmm};

/// Boots per transport, alternating.
const RUNS: usize = 3;
/// The guest's CID.
const CID: u32 = 3;
/// The guest's defaults (`VsockParams::DEFAULT`): host port of its stream, of the echo; its
/// own listening port.
const TX_PORT: u32 = 1234;
const ECHO_PORT: u32 = 1235;
const LISTEN_PORT: u32 = 5000;
/// Every read and write, host and guest.
const CHUNK: usize = 64 << 10;
/// How long one blocking host read or write may take.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// The rows: heading, digits.
const ROWS: [(&str, usize); 5] = [
    ("guest → host (MiB/s at the host)", 1),
    ("… MiB/s sent by the guest", 1),
    ("host → guest (MiB/s at the guest)", 1),
    ("connect to first byte, guest-initiated (µs, median)", 0),
    (
        "connect to first byte, host-initiated with CONNECT (µs, median)",
        0,
    ),
];

/// A fresh directory for the sockets of one boot, removed afterwards.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Result<Self, String> {
        let dir =
            std::env::temp_dir().join(format!("vmkit-bench-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> PathBuf {
        self.0.join("v.sock")
    }

    /// Where the guest's connections to host `port` arrive.
    fn port_path(&self, port: u32) -> PathBuf {
        self.0.join(format!("v.sock_{port}"))
    }

    fn listen(&self, port: u32) -> Result<UnixListener, String> {
        let path = self.port_path(port);
        UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn text(e: std::io::Error) -> String {
    e.to_string()
}

/// A host program on a listening socket: serves one connection after another on a thread
/// (blocking `accept`, nothing polled: the connections the guest makes here come one at a
/// time, and the latency includes no wake-up delay of ours).
struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Server {
    /// Serves connections to `port` of `dir` with `serve`.
    fn start(
        dir: &Dir,
        port: u32,
        mut serve: impl FnMut(UnixStream) + Send + 'static,
    ) -> Result<Self, String> {
        let listener = dir.listen(port)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                    serve(conn);
                }
            }
        });
        Ok(Self {
            path: dir.port_path(port),
            stop,
            thread,
        })
    }

    /// Stops after the connection being served (a connection of our own wakes `accept`).
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = UnixStream::connect(&self.path);
        let _ = self.thread.join();
    }
}

/// Echoes what `conn` sends until its end.
fn echo(mut conn: UnixStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        if conn.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// What a reader saw: bytes, and the first and last byte's arrival.
#[derive(Debug, Default, Clone, Copy)]
struct Sink {
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Sink {
    /// MiB/s from the first byte to the last.
    fn rate(&self) -> f64 {
        match (self.first, self.last) {
            (Some(f), Some(l)) if l > f => {
                self.bytes as f64 / (1 << 20) as f64 / (l - f).as_secs_f64()
            }
            _ => f64::NAN,
        }
    }
}

/// Reads `conn` to its end in `CHUNK` pieces.
fn sink(mut conn: UnixStream) -> Sink {
    let mut buf = vec![0u8; CHUNK];
    let mut s = Sink::default();
    while let Ok(n @ 1..) = conn.read(&mut buf) {
        let now = Instant::now();
        s.first.get_or_insert(now);
        s.last = Some(now);
        s.bytes += n as u64;
    }
    s
}

/// Connects to the guest's `port` through `path` (`CONNECT`, then `OK <hostport>`).
fn connect_guest(path: &Path, port: u32) -> Result<UnixStream, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(text)?;
    conn.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(text)?;
    let (mut line, mut byte) = (Vec::new(), [0u8; 1]);
    while byte[0] != b'\n' {
        match conn.read(&mut byte).map_err(text)? {
            1 => line.push(byte[0]),
            _ => return Err("closed before OK".into()),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(format!(
            "CONNECT answered {:?}",
            String::from_utf8_lossy(&line)
        ));
    }
    Ok(conn)
}

/// Writes `CHUNK`s to `conn` until the peer goes; the bytes written.
fn flood(mut conn: UnixStream) -> u64 {
    let buf = vec![0x76u8; CHUNK];
    let mut sent = 0;
    while conn.write_all(&buf).is_ok() {
        sent += CHUNK as u64;
    }
    sent
}

/// One byte written, one read back: the time from `start`, µs.
fn first_byte(conn: &mut UnixStream, start: Instant) -> Result<f64, String> {
    conn.write_all(&[0x5a]).map_err(text)?;
    let mut b = [0u8; 1];
    match conn.read(&mut b).map_err(text)? {
        1 if b[0] == 0x5a => Ok(start.elapsed().as_secs_f64() * 1e6),
        _ => Err("no echo".into()),
    }
}

/// `n` connections to the guest's `port`, each timed from `connect` to the echoed byte.
fn host_connects(path: &Path, port: u32, n: u64) -> Result<Vec<f64>, String> {
    (0..n)
        .map(|_| {
            let start = Instant::now();
            let mut conn = connect_guest(path, port)?;
            first_byte(&mut conn, start)
        })
        .collect()
}

/// The number after `key` up to `end` in the first line starting with `prefix`.
fn number(out: &str, prefix: &str, key: &str, end: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(key))?;
    line.split(key)
        .nth(1)?
        .split(end)
        .next()?
        .trim()
        .parse()
        .ok()
}

/// The median of `bench vsock-lat: guest ... min/median/mean/max a/b/c/d us`.
fn guest_latency(out: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with("bench vsock-lat: guest"))?;
    let values = line.split("min/median/mean/max ").nth(1)?;
    values.split('/').nth(1)?.parse().ok()
}

/// One boot on `transport`: the row values (NaN where missing).
fn boot(setup: &Setup, transport: &str, secs: u64, conns: u64) -> Result<[f64; 5], String> {
    let dir = Dir::new(transport)?;
    let got = Arc::new(Mutex::new(Vec::<Sink>::new()));
    let sunk = got.clone();
    let tx_sink = Server::start(&dir, TX_PORT, move |c| {
        let s = sink(c);
        sunk.lock().unwrap().push(s);
    })?;
    let echo_server = Server::start(&dir, ECHO_PORT, echo)?;
    let flooded = Arc::new(AtomicU64::new(0));
    let mut threads: Vec<JoinHandle<Result<Vec<f64>, String>>> = Vec::new();
    let cmdline =
        format!("bench=vsock-tx:{secs},vsock-rx:{secs},vsock-lat:{conns} vsock_chunk={CHUNK}");
    let mut cmd = setup.command(Vmm::Vmkit, "256M", &cmdline);
    cmd.args(["--transport", transport])
        .arg("--vsock")
        .arg(format!("cid={CID},socket={}", dir.path().display()))
        .stdin(Stdio::null());
    let path = dir.path();
    let who = format!("vmkit {transport}");
    let done = run_with(cmd, &who, |line, _, _| {
        if line.starts_with("bench vsock-rx: listening on port") {
            let (path, flooded) = (path.clone(), flooded.clone());
            threads.push(std::thread::spawn(move || {
                let conn = connect_guest(&path, LISTEN_PORT)?;
                flooded.store(flood(conn), Ordering::Relaxed);
                Ok(Vec::new())
            }));
        } else if line.starts_with("bench vsock-lat: listening on port") {
            let path = path.clone();
            threads.push(std::thread::spawn(move || {
                host_connects(&path, LISTEN_PORT, conns)
            }));
        }
        Ok(())
    });
    tx_sink.stop();
    echo_server.stop();
    let mut host_lat = Vec::new();
    for t in threads {
        host_lat.extend(t.join().map_err(|_| "host thread panicked")??);
    }
    let done = done?.check(&who)?;
    let out = &done.stdout;
    if let Some(fail) = out
        .lines()
        .find(|l| l.starts_with("bench vsock-") && l.contains("FAIL"))
    {
        return Err(format!("{who}: {fail}\n{out}"));
    }
    let at_host = got
        .lock()
        .unwrap()
        .iter()
        .map(Sink::rate)
        .fold(f64::NAN, f64::max);
    Ok([
        at_host,
        number(out, "bench vsock-tx: ", " ms (", " MiB/s").unwrap_or(f64::NAN),
        number(out, "bench vsock-rx: ", " ms (", " MiB/s").unwrap_or(f64::NAN),
        guest_latency(out).unwrap_or(f64::NAN),
        median(host_lat),
    ])
}

/// The host's own Unix-socket throughput, MiB/s: `bytes` in `CHUNK` pieces from one thread
/// to another over a connected pair made through a listener.
fn unix_stream(bytes: u64) -> Result<f64, String> {
    let dir = Dir::new("ceiling")?;
    let listener = dir.listen(1)?;
    let path = dir.port_path(1);
    let writer = std::thread::spawn(move || -> Result<(), String> {
        let mut conn = UnixStream::connect(path).map_err(text)?;
        let buf = vec![0x76u8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let k = (CHUNK as u64).min(left) as usize;
            conn.write_all(&buf[..k]).map_err(text)?;
            left -= k as u64;
        }
        Ok(())
    });
    let (conn, _) = listener.accept().map_err(text)?;
    let s = sink(conn);
    writer.join().map_err(|_| "writer panicked")??;
    if s.bytes != bytes {
        return Err(format!("host pair moved {} of {bytes} bytes", s.bytes));
    }
    Ok(s.rate())
}

/// The host's own connect + one echoed byte over a Unix socket, µs (median of `n`).
fn unix_first_byte(n: u64) -> Result<f64, String> {
    let dir = Dir::new("ceiling-lat")?;
    let server = Server::start(&dir, 1, echo)?;
    let path = dir.port_path(1);
    let times: Result<Vec<f64>, String> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let mut conn = UnixStream::connect(&path).map_err(text)?;
            conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(text)?;
            first_byte(&mut conn, start)
        })
        .collect();
    server.stop();
    Ok(median(times?))
}

/// The virtio-vsock section; adds a chart per throughput row to `charts`.
pub fn section(
    setup: &Setup,
    secs: u64,
    conns: u64,
    charts: &mut Vec<Chart>,
) -> Result<(), String> {
    println!(
        "\n## virtio-vsock: {secs} s each way in 64 KiB packets and {conns} connections each \
         way, Unix sockets on the host (hybrid vsock; median of {RUNS} boots)\n"
    );
    let transports = ["mmio", "pci"];
    let mut boots: Vec<Vec<[f64; 5]>> = vec![Vec::new(); transports.len()];
    for _ in 0..RUNS {
        for (i, t) in transports.iter().enumerate() {
            boots[i].push(boot(setup, t, secs, conns)?);
        }
    }
    let columns: Vec<[f64; 5]> = boots
        .iter()
        .map(|b| std::array::from_fn(|r| median(b.iter().map(|x| x[r]).collect())))
        .collect();
    // The ceiling moves what the guest moved in its S seconds (the larger of the two
    // transports' medians), in the same pieces.
    let moved = columns
        .iter()
        .map(|c| c[0] * secs as f64)
        .fold(64.0, f64::max);
    let stream = median(
        (0..RUNS)
            .map(|_| unix_stream((moved * (1 << 20) as f64) as u64))
            .collect::<Result<Vec<_>, _>>()?,
    );
    let first = unix_first_byte(conns)?;
    let ceiling = [stream, f64::NAN, stream, first, first];
    let mut header = vec![format!("median of {RUNS}")];
    header.extend(transports.iter().map(|t| format!("vmkit {t}")));
    header.push("host Unix sockets".into());
    let mut table = Table::new(header);
    for (r, (label, digits)) in ROWS.iter().enumerate() {
        let mut cells = vec![label.to_string()];
        cells.extend(columns.iter().map(|c| fixed(c[r], *digits)));
        cells.push(fixed(ceiling[r], *digits));
        table.row(cells);
    }
    table.print();
    if setup.baseline.is_some() {
        println!("\nThe baseline vmkit is not run here (it may have no `--vsock`).");
    }
    for (r, what) in [(0, "guest → host"), (2, "host → guest")] {
        let mut bars: Vec<(String, f64)> = transports
            .iter()
            .zip(&columns)
            .map(|(t, c)| (format!("vmkit {t}"), c[r]))
            .collect();
        bars.push(("host Unix sockets".into(), ceiling[r]));
        charts.push(Chart::new(
            &format!("virtio-vsock {what} (MiB/s, higher is better)"),
            bars,
        ));
    }
    println!("\n{NOTE}");
    Ok(())
}

const NOTE: &str = "Guest → host is the host reader's rate (first byte to last on `PATH_1234`), \
the guest's sending rate under it (what the device took in S seconds); host → guest is the \
guest's (bytes read in the S seconds from the first; not checked, the tests check). The \
guest is the PVH test guest with virtio-drivers' `VsockConnectionManager`: one packet in \
flight (its transmit is synchronous), 8 receive buffers of 64 KiB, a 512 KiB receive buffer \
per connection for the host → guest stream, credit updates after each quarter read; \
everything polled at CPL3. Connect to first byte: guest-initiated from the connection \
request to the echo of one byte by a host program on `PATH_1235`; host-initiated from \
`connect(PATH)` through `CONNECT 5000`/`OK` to the guest's echo of one byte. The host \
Unix-socket column moves the same bytes in the same 64 KiB pieces between two threads of \
this program, and times connect + one echoed byte to a listener of its own. QEMU has no \
hybrid vsock (its vhost-vsock needs the host's vhost_vsock module), so there is no QEMU \
column.";
