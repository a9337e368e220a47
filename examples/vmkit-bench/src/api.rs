//! The API: `vmkit --api-sock` (Firecracker's REST API, HTTP/1.1 on a Unix socket), vmkit
//! only — QEMU has no such API (QMP is another protocol). Requests are written by hand on a
//! `UnixStream` (no client crate), one keep-alive connection per process: round trips of
//! `GET /` and `PUT /machine-config` on a VMM not started yet, as scheduled and with the bench
//! and the VMM pinned to one CPU; `InstanceStart` to its 204 and to guest entry (vmkit's
//! `--stats` line), beside the same guest booted from the command line; `PATCH /vm` Paused and
//! Resumed on a guest spinning in `hold=ticks:600`; and the VMM's own memory (as
//! [`footprint`](crate::footprint) measures it) and its thread count with and without the
//! socket.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::footprint::{own_memory, release, HOLD_LINE};
use crate::run::{entry_line, monotonic_ns, run_with};
use crate::stats::{fixed, median, percentile, Summary};
use crate::table::Table;
use crate::vmm::{Setup, Vmm};

/// Round trips timed per request on one connection.
const ROUND_TRIPS: usize = 1000;
/// Round trips made before those timed (not counted).
const WARM_UP: usize = 10;
/// Fresh processes started through the API, and booted from the command line.
const STARTS: usize = 10;
/// Pause and resume pairs on one running guest.
const PAUSES: usize = 20;
/// The guest's vCPU runs this long between a resume and the next pause.
const RUN_BETWEEN: Duration = Duration::from_millis(5);
/// Held runs per case (with and without the socket) for the memory.
const MEMORY_RUNS: usize = 5;
/// Guest RAM of every run, and the bytes it means.
const MEMORY: (&str, u64) = ("128M", 128 << 20);
/// `PUT /machine-config` body of every run.
const MACHINE_CONFIG: &str = r#"{"vcpu_count":1,"mem_size_mib":128}"#;
/// The socket is polled this often until vmkit has bound it.
const CONNECT_POLL: Duration = Duration::from_micros(100);
/// How long a VMM may take to bind its socket, or to end.
const TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP request with an optional JSON body.
fn request(method: &str, path: &str, body: Option<&str>) -> Vec<u8> {
    let mut s = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    match body {
        Some(b) => s.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => s.push_str("\r\n"),
    }
    s.into_bytes()
}

/// An HTTP response: its status and body.
#[derive(Debug, PartialEq, Eq)]
struct Response {
    status: u16,
    body: String,
}

/// Reads one response (the body by `Content-Length`, none without it) from `r`, leaving
/// whatever follows in `r`.
fn read_response(r: &mut impl BufRead) -> Result<Response, String> {
    let mut line = String::new();
    let mut next_line = |line: &mut String| -> Result<(), String> {
        line.clear();
        match r.read_line(line) {
            Ok(0) => Err("the connection closed".into()),
            Ok(_) => Ok(()),
            Err(e) => Err(format!("read a response: {e}")),
        }
    };
    next_line(&mut line)?;
    let mut words = line.split_whitespace();
    let status = match (words.next(), words.next().map(str::parse)) {
        (Some(v), Some(Ok(status))) if v.starts_with("HTTP/1.") => status,
        _ => return Err(format!("not an HTTP status line: {line:?}")),
    };
    let mut length = 0;
    loop {
        next_line(&mut line)?;
        let header = line.trim_end_matches(['\r', '\n']);
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("not a header: {header:?}"));
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| format!("bad Content-Length: {header:?}"))?;
        }
    }
    let mut body = vec![0; length];
    r.read_exact(&mut body)
        .map_err(|e| format!("read a body of {length} bytes: {e}"))?;
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The string value of `"key"` in the JSON object `json`.
fn json_str(json: &str, key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    Some(value.get(key)?.as_str()?.to_string())
}

/// `Threads:` from `/proc/PID/status`.
fn threads(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("Threads:"))?;
    line.trim().parse().ok()
}

/// One keep-alive connection to the API.
struct Conn {
    reader: BufReader<UnixStream>,
}

impl Conn {
    /// Writes a request.
    fn send(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<(), String> {
        self.reader
            .get_mut()
            .write_all(&request(method, path, body))
            .map_err(|e| format!("{method} {path}: {e}"))
    }

    /// Reads the next response.
    fn receive(&mut self) -> Result<Response, String> {
        read_response(&mut self.reader)
    }

    /// A request and its response, which must have `status`; the body.
    fn expect(
        &mut self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<String, String> {
        self.send(method, path, body)?;
        let r = self.receive()?;
        if r.status != status {
            return Err(format!(
                "{method} {path} {body:?}: {} {} (expected {status})",
                r.status, r.body
            ));
        }
        Ok(r.body)
    }

    /// µs of a request and its response with `status`.
    fn time(
        &mut self,
        status: u16,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<f64, String> {
        let start = Instant::now();
        self.expect(status, method, path, body)?;
        Ok(start.elapsed().as_secs_f64() * 1e6)
    }
}

/// A scratch directory for one process's socket and stderr, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Result<Self, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vmkit-bench-api-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self(p))
    }

    fn sock(&self) -> PathBuf {
        self.0.join("api.sock")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `vmkit --api-sock DIR/api.sock --stats --serial off` and no kernel: stderr to a file,
/// killed (if still running) and reaped at the end.
struct ApiVmm {
    child: Child,
    /// CLOCK_MONOTONIC just before the spawn, ns.
    t0_ns: u64,
    stderr: PathBuf,
    dir: Dir,
}

impl ApiVmm {
    fn spawn(setup: &Setup) -> Result<Self, String> {
        let dir = Dir::new()?;
        let stderr = dir.0.join("stderr");
        let file = File::create(&stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let mut cmd = Command::new(&setup.vmkit);
        cmd.arg("--api-sock")
            .arg(dir.sock())
            .args(["--stats", "--serial", "off"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let t0_ns = monotonic_ns();
        let child = cmd.spawn().map_err(|e| format!("spawn vmkit: {e}"))?;
        Ok(Self {
            child,
            t0_ns,
            stderr,
            dir,
        })
    }

    /// Connects as soon as the socket accepts (polled every [`CONNECT_POLL`]).
    fn connect(&mut self) -> Result<Conn, String> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(self.dir.sock()) {
                Ok(s) => {
                    return Ok(Conn {
                        reader: BufReader::new(s),
                    })
                }
                Err(e) if start.elapsed() > TIMEOUT => {
                    return Err(format!(
                        "no API socket after {TIMEOUT:?}: {e}\n{}",
                        self.log()
                    ))
                }
                Err(_) => {}
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("vmkit ended ({status}):\n{}", self.log()));
            }
            std::thread::sleep(CONNECT_POLL);
        }
    }

    /// Its `--api-sock` configured for the test guest with `boot_args`.
    fn configure(&self, conn: &mut Conn, setup: &Setup, boot_args: &str) -> Result<(), String> {
        let kernel = setup
            .guest
            .to_str()
            .ok_or("the guest's path is not UTF-8")?;
        let boot =
            serde_json::json!({"kernel_image_path": kernel, "boot_args": boot_args}).to_string();
        conn.expect(204, "PUT", "/machine-config", Some(MACHINE_CONFIG))?;
        conn.expect(204, "PUT", "/boot-source", Some(&boot))?;
        Ok(())
    }

    /// Its stderr so far.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for its end.
    fn wait(&mut self) -> Result<ExitStatus, String> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if start.elapsed() > TIMEOUT => {
                    return Err(format!(
                        "vmkit still runs after {TIMEOUT:?}:\n{}",
                        self.log()
                    ))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(format!("wait for vmkit: {e}")),
            }
        }
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pins the calling thread — and so the processes it spawns, which inherit its mask — to the
/// first CPU it may run on; that CPU.
fn pin_to_one_cpu() -> Result<usize, String> {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is a plain bit array, for which all-zero bytes are valid.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; sched_getaffinity writes at most `size` bytes to
    // `allowed`, a local we own of that size.
    if unsafe { libc::sched_getaffinity(0, size, &mut allowed) } != 0 {
        return Err(format!(
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    let cpu = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, the bits `allowed` has.
        .find(|&c| unsafe { libc::CPU_ISSET(c, &allowed) })
        .ok_or("no CPU in the affinity mask")?;
    // SAFETY: as above.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    // SAFETY: pid 0 is the calling thread; sched_setaffinity reads `size` bytes of `one`.
    if unsafe { libc::sched_setaffinity(0, size, &one) } != 0 {
        return Err(format!(
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(cpu)
}

/// µs of [`ROUND_TRIPS`] round trips of `GET /` and of `PUT /machine-config`.
fn round_trips(setup: &Setup) -> Result<(Vec<f64>, Vec<f64>), String> {
    let mut vmm = ApiVmm::spawn(setup)?;
    let mut conn = vmm.connect()?;
    let state = conn.expect(200, "GET", "/", None)?;
    if json_str(&state, "state").as_deref() != Some("Not started") {
        return Err(format!("GET / before the start: {state}"));
    }
    let mut timed = |method: &str, path: &str, status: u16, body: Option<&str>| {
        for _ in 0..WARM_UP {
            conn.time(status, method, path, body)?;
        }
        (0..ROUND_TRIPS)
            .map(|_| conn.time(status, method, path, body))
            .collect::<Result<Vec<f64>, String>>()
    };
    let get = timed("GET", "/", 200, None)?;
    let put = timed("PUT", "/machine-config", 204, Some(MACHINE_CONFIG))?;
    Ok((get, put))
}

/// One start through the API, ms: write of `InstanceStart` → its 204, → guest entry,
/// and process spawn → guest entry.
fn api_start(setup: &Setup) -> Result<(f64, f64, f64), String> {
    let mut vmm = ApiVmm::spawn(setup)?;
    let mut conn = vmm.connect()?;
    vmm.configure(&mut conn, setup, "exit=poweroff")?;
    let sent_ns = monotonic_ns();
    conn.send(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    )?;
    let answer = conn.receive()?;
    let answered_ns = monotonic_ns();
    if answer.status != 204 {
        return Err(format!("InstanceStart: {} {}", answer.status, answer.body));
    }
    let status = vmm.wait()?;
    let log = vmm.log();
    if !status.success() {
        return Err(format!("vmkit through the API failed ({status}):\n{log}"));
    }
    let no_entry = || format!("no `entering guest` line from --stats:\n{log}");
    let (to_entry, _) = entry_line(&log, sent_ns).ok_or_else(no_entry)?;
    let (spawn_to_entry, _) = entry_line(&log, vmm.t0_ns).ok_or_else(no_entry)?;
    Ok((
        answered_ns.saturating_sub(sent_ns) as f64 / 1e6,
        to_entry,
        spawn_to_entry,
    ))
}

/// One boot from the command line (`--kernel`, `--serial off`), ms from spawn to guest entry.
fn cmdline_start(setup: &Setup) -> Result<f64, String> {
    let guest = setup
        .guest
        .to_str()
        .ok_or("the guest's path is not UTF-8")?;
    let mut cmd = Command::new(&setup.vmkit);
    cmd.args(["--kernel", guest, "--memory", MEMORY.0])
        .args(["--cmdline", "exit=poweroff", "--stats", "--serial", "off"])
        .stdin(Stdio::null());
    let done = run_with(cmd, "vmkit", |_, _, _| Ok(()))?.check("vmkit")?;
    let (ms, _) = entry_line(&done.stderr, done.t0_ns)
        .ok_or_else(|| format!("no `entering guest` line from --stats:\n{}", done.stderr))?;
    Ok(ms)
}

/// ms of [`PAUSES`] `PATCH /vm` Paused and of as many Resumed, on a guest in
/// `hold=ticks:600`; the VMM is killed after.
fn pause_resume(setup: &Setup) -> Result<(Vec<f64>, Vec<f64>), String> {
    let mut vmm = ApiVmm::spawn(setup)?;
    let mut conn = vmm.connect()?;
    vmm.configure(&mut conn, setup, "hold=ticks:600 exit=poweroff")?;
    conn.expect(
        204,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"InstanceStart"}"#),
    )?;
    let start = Instant::now();
    while !vmm.log().contains("entering guest") {
        if start.elapsed() > TIMEOUT {
            return Err(format!("the guest was not entered:\n{}", vmm.log()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(RUN_BETWEEN);
    let (mut paused, mut resumed) = (Vec::new(), Vec::new());
    for _ in 0..PAUSES {
        paused.push(conn.time(204, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#))? / 1e3);
        let state = conn.expect(200, "GET", "/", None)?;
        if json_str(&state, "state").as_deref() != Some("Paused") {
            return Err(format!("GET / after a pause: {state}"));
        }
        resumed.push(conn.time(204, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#))? / 1e3);
        std::thread::sleep(RUN_BETWEEN);
    }
    let state = conn.expect(200, "GET", "/", None)?;
    if json_str(&state, "state").as_deref() != Some("Running") {
        return Err(format!("GET / after the resumes: {state}"));
    }
    drop(conn);
    drop(vmm);
    Ok((paused, resumed))
}

/// One held run from the command line, with `--api-sock` or not: (own memory KiB, threads).
fn held(setup: &Setup, api: bool) -> Result<(u64, u64), String> {
    let dir = Dir::new()?;
    let mut cmd = setup.command(Vmm::Vmkit, MEMORY.0, "hold=serial exit=poweroff");
    if api {
        cmd.arg("--api-sock").arg(dir.sock());
    }
    cmd.stdin(Stdio::piped());
    let mut got = None;
    run_with(cmd, "vmkit", |line, _, child| {
        if got.is_none() && line.contains(HOLD_LINE) {
            let own = own_memory(child.id(), MEMORY.1)?;
            let path = format!("/proc/{}/status", child.id());
            let status = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            let n = threads(&status).ok_or("no Threads: in /proc/PID/status")?;
            got = Some((own, n));
            release(child)?;
        }
        Ok(())
    })?
    .check("vmkit")?;
    got.ok_or_else(|| "the guest never held".to_string())
}

/// "median (min–max)" with `digits` decimals.
fn range(samples: &[f64], digits: usize) -> String {
    match Summary::of(samples.to_vec()) {
        Some(s) => format!(
            "{} ({}–{})",
            fixed(s.median, digits),
            fixed(s.min, digits),
            fixed(s.max, digits)
        ),
        None => "–".into(),
    }
}

/// The API section.
pub fn section(setup: &Setup) -> Result<(), String> {
    println!(
        "\n## API (`vmkit --api-sock`, Firecracker's REST API on a Unix socket; vmkit only: \
         QEMU has no such API)\n"
    );
    let (get, put) = round_trips(setup)?;
    // The same on one CPU: a thread of its own pinned, which the VMM it spawns inherits.
    let pinned = std::thread::scope(|s| {
        s.spawn(|| {
            let cpu = pin_to_one_cpu()?;
            round_trips(setup).map(|r| (cpu, r))
        })
        .join()
    });
    let (cpu, (get1, put1)) = pinned.map_err(|_| "the pinned thread panicked")??;
    let mut t = Table::new([
        format!("round trip on one keep-alive connection, {ROUND_TRIPS} each, VM not started"),
        "median (µs)".into(),
        "p99 (µs)".into(),
        "max (µs)".into(),
    ]);
    let (get_on, put_on) = (
        format!("`GET /`, bench and vmkit on CPU {cpu} only"),
        format!("`PUT /machine-config`, bench and vmkit on CPU {cpu} only"),
    );
    let rows = [
        ("`GET /`", &get),
        ("`PUT /machine-config`", &put),
        (get_on.as_str(), &get1),
        (put_on.as_str(), &put1),
    ];
    for (name, s) in rows {
        let max = s.iter().copied().fold(f64::NAN, f64::max);
        t.row([
            name.to_string(),
            fixed(median(s.clone()), 1),
            fixed(percentile(s.clone(), 99.0), 1),
            fixed(max, 1),
        ]);
    }
    t.print();

    let (mut answered, mut entered, mut api_spawn, mut cmdline) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..STARTS {
        let (a, e, s) = api_start(setup)?;
        answered.push(a);
        entered.push(e);
        api_spawn.push(s);
        cmdline.push(cmdline_start(setup)?);
    }
    println!();
    let mut t = Table::new([
        format!("start, 1 vCPU, 128 MiB, guest `exit=poweroff` ({STARTS} runs each, alternating)"),
        "median (min–max), ms".into(),
    ]);
    t.row([
        "`InstanceStart` written → its 204".into(),
        range(&answered, 2),
    ]);
    t.row([
        "`InstanceStart` written → entering the guest".into(),
        range(&entered, 2),
    ]);
    t.row([
        "API: process spawn → entering the guest (socket polled every 100 µs, 2 `PUT`s, `InstanceStart`)".into(),
        range(&api_spawn, 2),
    ]);
    t.row([
        "command line (`--kernel`): process spawn → entering the guest".into(),
        range(&cmdline, 2),
    ]);
    t.print();

    let (paused, resumed) = pause_resume(setup)?;
    println!();
    let mut t = Table::new([
        format!("`PATCH /vm` on a guest spinning in `hold=ticks:600` ({PAUSES} each)"),
        "median (min–max), ms".into(),
    ]);
    t.row(["`{\"state\":\"Paused\"}` → 204".into(), range(&paused, 3)]);
    t.row(["`{\"state\":\"Resumed\"}` → 204".into(), range(&resumed, 3)]);
    t.print();

    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..MEMORY_RUNS {
        without.push(held(setup, false)?);
        with.push(held(setup, true)?);
    }
    let mib = |s: &[(u64, u64)]| median(s.iter().map(|s| s.0 as f64 / 1024.0).collect());
    let count = |s: &[(u64, u64)]| median(s.iter().map(|s| s.1 as f64).collect());
    let (m0, m1) = (mib(&without), mib(&with));
    let (n0, n1) = (count(&without), count(&with));
    println!();
    let mut t = Table::new([
        format!(
            "`--kernel`, {} guest in `hold=serial` (median of {MEMORY_RUNS}, alternating)",
            MEMORY.0
        ),
        "own memory (MiB)".into(),
        "threads".into(),
    ]);
    t.row(["without `--api-sock`".into(), fixed(m0, 2), fixed(n0, 0)]);
    t.row(["with `--api-sock`".into(), fixed(m1, 2), fixed(n1, 0)]);
    t.row([
        "the API's share".into(),
        fixed(m1 - m0, 2),
        fixed(n1 - n0, 0),
    ]);
    t.print();
    println!(
        "\nRequests are written by hand on a `UnixStream` and each response read to its \
         Content-Length before the next request ({WARM_UP} untimed round trips first); each \
         round trip wakes four threads in turn (the API thread, the VMM's thread that answers \
         it, the API thread, the bench), which may cross CPUs unless all are pinned to one, as \
         in the last two rows (a bench thread pinned before it spawns vmkit). \
         `InstanceStart` runs are fresh `vmkit --api-sock PATH --stats --serial off` processes \
         given `PUT /machine-config` and `PUT /boot-source` first; guest entry is the \
         CLOCK_MONOTONIC time `--stats` prints just before the vCPUs start. The pause and \
         resume pairs are {} ms apart, the guest's vCPU spinning on its TSC in between. Own \
         memory is as in the footprint section (VmHWM minus the guest-RAM mapping's Rss, read \
         while the guest waits for a byte on COM1); threads is `Threads:` of \
         /proc/PID/status at the same moment.",
        RUN_BETWEEN.as_millis()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_their_length() {
        assert_eq!(
            request("GET", "/", None),
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
        );
        let put = String::from_utf8(request("PATCH", "/vm", Some("{\"a\":1}"))).unwrap();
        assert!(put.starts_with("PATCH /vm HTTP/1.1\r\n"), "{put}");
        assert!(put.ends_with("Content-Length: 7\r\n\r\n{\"a\":1}"), "{put}");
    }

    #[test]
    fn responses_one_after_another() {
        let wire = "HTTP/1.1 204 No Content\r\nServer: vmkit\r\nContent-Length: 0\r\n\r\n\
                    HTTP/1.1 200 OK\r\ncontent-length:  18\r\n\r\n{\"state\":\"Paused\"}\
                    HTTP/1.1 400 Bad Request\r\n\r\n";
        let mut r = std::io::Cursor::new(wire.as_bytes());
        assert_eq!(
            read_response(&mut r),
            Ok(Response {
                status: 204,
                body: String::new()
            })
        );
        let ok = read_response(&mut r).unwrap();
        assert_eq!(
            (ok.status, ok.body.as_str()),
            (200, "{\"state\":\"Paused\"}")
        );
        assert_eq!(read_response(&mut r).unwrap().status, 400);
        assert!(read_response(&mut r).unwrap_err().contains("closed"));
    }

    #[test]
    fn malformed_responses_are_errors() {
        let bad = |wire: &str| read_response(&mut std::io::Cursor::new(wire.as_bytes()));
        assert!(bad("SSH-2.0\r\n\r\n").is_err());
        assert!(bad("HTTP/1.1 abc OK\r\n\r\n").is_err());
        assert!(bad("HTTP/1.1 200 OK\r\nno colon\r\n\r\n").is_err());
        assert!(bad("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(bad("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab").is_err());
        assert!(bad("HTTP/1.1 200 OK\r\nServer: vmkit\r\n").is_err());
    }

    #[test]
    fn json_fields() {
        let info = r#"{"app_name":"vmkit","id":"x","state": "Not started","vmm_version":"0.1"}"#;
        assert_eq!(json_str(info, "state").as_deref(), Some("Not started"));
        assert_eq!(json_str(info, "id").as_deref(), Some("x"));
        assert_eq!(json_str(info, "missing"), None);
        assert_eq!(json_str(r#"{"state":3}"#, "state"), None);
    }

    #[test]
    fn thread_count() {
        assert_eq!(
            threads("Name:\tvmkit\nThreads:\t3\nVmHWM:\t1 kB\n"),
            Some(3)
        );
        assert_eq!(threads("Name:\tvmkit\n"), None);
    }
}
