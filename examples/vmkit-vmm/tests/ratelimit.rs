//! Rate limiters end to end: the test guest's own throughput measurement (its TSC) against
//! the limit given on the command line, and the VMM's event thread staying idle while the
//! guest is held. The bands are generous sanity bounds (the issue's acceptance check: within
//! 10% of 10 MiB/s), not benchmarks; each test prints its exact figures.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::test_guest;

/// A sparse disk image in the temp dir, removed on drop.
struct Image(PathBuf);

impl Image {
    fn new(name: &str, mib: u64) -> Self {
        let path = std::env::temp_dir().join(format!("vmkit-rl-{name}-{}.img", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(mib << 20).unwrap();
        Image(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a run printed, and the CPU time (user + system) of the VMM's main thread — the
/// event loop that serves the devices — against the run's wall time.
struct Measured {
    stdout: String,
    /// Each line of stdout with when the test read it, from the start.
    lines: Vec<(Duration, String)>,
    stderr: String,
    main_thread_cpu: Duration,
    wall: Duration,
}

/// The main thread's utime + stime, from `/proc/PID/task/PID/stat` (clock ticks).
fn main_thread_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `vmkit --kernel <test guest> ARGS…`, its main thread's CPU sampled every 50 ms until it
/// exits (at most 120 s).
fn measure(args: &[&str]) -> Measured {
    let guest = test_guest();
    let mut all = vec!["--kernel", guest.to_str().unwrap()];
    all.extend_from_slice(args);
    measure_vmkit(&all)
}

/// `vmkit ARGS…`, measured as [`measure`] does.
fn measure_vmkit(args: &[&str]) -> Measured {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmkit"));
    cmd.args(args);
    measure_command(cmd)
}

/// `cmd` (vmkit, or vmkit in a network namespace), measured as [`measure`] does; the CPU
/// figure is the main thread's of the process `cmd` starts.
fn measure_command(mut cmd: Command) -> Measured {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit");
    let pid = child.id();
    let start = Instant::now();
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .map(|l| (start.elapsed(), l))
            .collect::<Vec<_>>()
    });
    let mut ticks = 0;
    while child.try_wait().unwrap().is_none() {
        assert!(start.elapsed() < Duration::from_secs(120), "vmkit hung");
        if let Some(t) = main_thread_ticks(pid) {
            ticks = t;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = start.elapsed();
    let out = child.wait_with_output().unwrap();
    let lines = reader.join().expect("the stdout reader");
    // SAFETY: sysconf reads a constant.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
    let m = Measured {
        stdout: lines.iter().map(|(_, l)| format!("{l}\n")).collect(),
        lines,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        main_thread_cpu: Duration::from_millis(ticks * 1000 / hz.max(1)),
        wall,
    };
    assert_eq!(out.status.code(), Some(0), "{}\n{}", m.stdout, m.stderr);
    m
}

/// The figure before the unit `unit` (`"MiB/s"`, say) in the guest's first line that starts
/// with `prefix` and holds it.
fn figure(out: &str, prefix: &str, unit: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(unit))
        .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{out}"));
    let before = line
        .split_once(&format!(" {unit}"))
        .unwrap_or_else(|| panic!("no {unit} in '{line}'"))
        .0;
    let number = before.rsplit([' ', '(']).next().unwrap();
    number
        .parse()
        .unwrap_or_else(|_| panic!("'{number}' in '{line}'"))
}

/// The host's time between the guest's line starting with `end` and the last one before it
/// starting with `begin`: the interval the guest measured with its own clock (its TSC,
/// calibrated against the PIT at boot, which a loaded host can skew), on the host's clock.
fn host_interval(m: &Measured, begin: &str, end: &str) -> Duration {
    let at = m
        .lines
        .iter()
        .position(|(_, l)| l.starts_with(end))
        .unwrap_or_else(|| panic!("no '{end}' line in:\n{}", m.stdout));
    let from = m.lines[..at]
        .iter()
        .rev()
        .find(|(_, l)| l.starts_with(begin))
        .unwrap_or_else(|| panic!("no '{begin}' line before '{end}' in:\n{}", m.stdout));
    m.lines[at].0.saturating_sub(from.0)
}

/// The first number after `prefix` in the guest's line that starts with it.
fn count(out: &str, prefix: &str) -> f64 {
    let line = out.lines().find(|l| l.starts_with(prefix)).unwrap();
    let n = line[prefix.len()..].split_whitespace().next().unwrap();
    n.parse().unwrap_or_else(|_| panic!("'{n}' in '{line}'"))
}

/// The guest's frames/s of `bench=net-tx` or `net-rx` (`what`), and the same on the host's
/// clock: the frames it counted over the host's time from its start line
/// (`bench net-tx: sending …`; `bench net-rx: first frame`, as the guest's interval starts
/// there) to its result (`bench net-tx: N frames in …`).
fn net_frames_s(m: &Measured, what: &str) -> (f64, f64) {
    let prefix = format!("bench {what}: ");
    let got = figure(&m.stdout, &prefix, "frames/s");
    let at = m
        .lines
        .iter()
        .position(|(_, l)| l.starts_with(&prefix) && l.contains("frames/s"))
        .unwrap_or_else(|| {
            panic!(
                "no '{prefix}' result in:
{}",
                m.stdout
            )
        });
    let (end, line) = &m.lines[at];
    let frames: f64 = line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no frame count in '{line}'"));
    let (start, _) = m.lines[..at]
        .iter()
        .rev()
        .find(|(_, l)| l.starts_with(&prefix))
        .unwrap_or_else(|| {
            panic!(
                "no '{prefix}' start line in:
{}",
                m.stdout
            )
        });
    (got, frames / end.saturating_sub(*start).as_secs_f64())
}

/// Prints the figures; `got` is the guest's, `host` the same on the host's clock.
fn report(what: &str, target: f64, (got, host): (f64, f64), unit: &str, m: &Measured) {
    let cpu = m.main_thread_cpu.as_secs_f64() / m.wall.as_secs_f64() * 100.0;
    let line = format!(
        "rate limit {what}: target {target} {unit}, guest measured {got:.1} {unit} ({:+.1}%), \
         host clock {host:.1} {unit} ({:+.1}%); VMM main thread {:?} CPU in {:?} ({cpu:.1}%)",
        (got / target - 1.0) * 100.0,
        (host / target - 1.0) * 100.0,
        m.main_thread_cpu,
        m.wall
    );
    eprintln!("{line}");
    let _ = std::io::stderr().flush();
}

/// The guest's MiB/s of its sequential 128 KiB reads (the benchmark that follows its
/// `blk-serial` test), and the same on the host's clock.
fn blk_mib_s(m: &Measured) -> (f64, f64) {
    let end = "bench blk-seq128k qd4:";
    let got = figure(&m.stdout, end, "MiB/s");
    let secs = host_interval(m, "test blk-serial:", end).as_secs_f64();
    (got, count(&m.stdout, end) / 8.0 / secs)
}

/// The guest's KiB/s reading 1 MiB of entropy, and the same on the host's clock.
fn rng_kib_s(m: &Measured) -> (f64, f64) {
    let end = "virtio-rng: 1048576 bytes in";
    let got = figure(&m.stdout, end, "KiB/s");
    (got, 1024.0 / host_interval(m, "", end).as_secs_f64())
}

/// Sequential 128 KiB reads, 4 in flight, for `secs` seconds, on a disk limited by `limit`;
/// returns the guest's MiB/s and the host's.
fn blk_bandwidth(limit: &str, secs: u32) -> ((f64, f64), Measured) {
    let img = Image::new(&format!("bw-{limit}"), 512);
    let disk = format!("path={},serial=rl,bw={limit}", img.path());
    let cmdline = format!("test=blk-serial bench=blk-seq128k:4:{secs}");
    let m = measure(&["--disk", &disk, "--cmdline", &cmdline]);
    (blk_mib_s(&m), m)
}

/// Whether `(guest, host)` figures are both in `band`, or the host's is and the guest's
/// clock disagrees with the host's by more than 10% (its TSC calibration skewed by a busy
/// host: its figure then says nothing).
fn in_band((got, host): (f64, f64), band: std::ops::RangeInclusive<f64>) -> bool {
    let skewed = (got / host - 1.0).abs() > 0.1;
    band.contains(&host) && (band.contains(&got) || skewed)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn blk_bandwidth_holds_10_mib_per_second_with_the_vmm_idle() {
    // 6 s: a stall of the guest on a busy host (time a token bucket does not give back)
    // weighs less, and so does the first bucket.
    let (got, m) = blk_bandwidth("10M", 6);
    report("blk bw=10M", 10.0, got, "MiB/s", &m);
    // The issue's acceptance check: within 10% of 10 MiB/s (the guest alone reads several
    // times faster). The first 100 ms bucket adds 1.7% over 6 s.
    assert!(in_band(got, 9.0..=11.0), "{got:?} MiB/s\n{}", m.stdout);
    // The guest is held most of the time; the event thread sleeps on the limiter's timer
    // rather than polling (it wakes at most once per request here).
    let cpu = m.main_thread_cpu.as_secs_f64() / m.wall.as_secs_f64();
    assert!(
        cpu < 0.2,
        "main thread {:?} in {:?}",
        m.main_thread_cpu,
        m.wall
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn blk_bandwidth_follows_other_limits() {
    for (limit, target) in [("5M", 5.0), ("50M", 50.0)] {
        let (got, m) = blk_bandwidth(limit, 3);
        report(&format!("blk bw={limit}"), target, got, "MiB/s", &m);
        assert!(
            in_band(got, target * 0.8..=target * 1.1),
            "{limit}: {got:?} MiB/s\n{}",
            m.stdout
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn blk_iops_limit() {
    let img = Image::new("iops", 512);
    let disk = format!("path={},serial=rl,iops=500", img.path());
    let m = measure(&[
        "--disk",
        &disk,
        "--cmdline",
        "test=blk-serial bench=blk-rand4k:4:3",
    ]);
    let end = "bench blk-rand4k qd4:";
    let secs = host_interval(&m, "test blk-serial:", end).as_secs_f64();
    let got = (
        figure(&m.stdout, end, "req/s"),
        count(&m.stdout, end) / secs,
    );
    report("blk iops=500", 500.0, got, "req/s", &m);
    assert!(in_band(got, 400.0..=550.0), "{got:?} req/s\n{}", m.stdout);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn rng_bandwidth_limit() {
    // 1 MiB of entropy read by the guest at 256 KiB/s: about 4 s.
    let m = measure(&["--rng-bw", "256K", "--cmdline", "test=virtio-rng"]);
    assert!(m.stdout.contains("test virtio-rng: ok"), "{}", m.stdout);
    let got = rng_kib_s(&m);
    report("rng --rng-bw 256K", 256.0, got, "KiB/s", &m);
    assert!(in_band(got, 205.0..=282.0), "{got:?} KiB/s\n{}", m.stdout);
    let _ = &m.stderr;
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn net_transmit_frames_limit() {
    let ns = vmkit_netns::NetNs::create("rl-tx", 1).expect("network namespace with a TAP");
    let guest = test_guest();
    // 64-byte UDP frames for 3 s, as fast as the guest can queue them, held to 2000 a second.
    let net = format!("tap={},mac=52:54:00:12:34:56,tx_ops=2000", ns.tap);
    let cmdline = format!(
        "bench=net-tx:3 net_ip={} net_peer={} net_port=5556",
        ns.guest_ip, ns.host_ip
    );
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmkit"));
    cmd.arg("--kernel").arg(&guest);
    cmd.args(["--net", &net, "--cmdline", &cmdline]);
    let m = measure_command(cmd);
    // Frames the guest queued: the ones sent plus the 256 transmit buffers still full, and
    // the first bucket (200 frames) is full at the start: about 7% over 3 s. Without the limit
    // the guest queues some 48 000 a second.
    let got = net_frames_s(&m, "net-tx");
    report("net tx_ops=2000", 2000.0, got, "frames/s", &m);
    assert!(
        in_band(got, 1600.0..=2300.0),
        "{got:?} frames/s\n{}",
        m.stdout
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_config_file_s_rate_limiters_hold_the_drive_and_the_entropy() {
    let dir = common::api::Dir::new("rl-config");
    let img = Image::new("config", 512);
    // Firecracker's objects: 1 MiB refilled in 100 ms (10 MiB/s); 64 KiB in 125 ms (512 KiB/s).
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(),
                        "boot_args": "test=virtio-rng,blk-serial bench=blk-seq128k:4:3"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "rootfs", "path_on_host": img.path(), "is_root_device": false,
                    "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}],
        "entropy": {"rate_limiter": {"bandwidth": {"size": 65536, "refill_time": 125}}},
        "metrics": {"metrics_path": dir.file("metrics")},
    });
    let path = dir.file("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let m = measure_vmkit(&["--config-file", path.to_str().unwrap(), "--no-api"]);
    let (blk, rng) = (blk_mib_s(&m), rng_kib_s(&m));
    report("config file drive 1 MiB / 100 ms", 10.0, blk, "MiB/s", &m);
    report(
        "config file entropy 64 KiB / 125 ms",
        512.0,
        rng,
        "KiB/s",
        &m,
    );
    assert!(in_band(blk, 8.0..=11.0), "{blk:?} MiB/s\n{}", m.stdout);
    assert!(in_band(rng, 410.0..=563.0), "{rng:?} KiB/s\n{}", m.stdout);
    // The device metrics count the holds.
    let metrics = std::fs::read_to_string(dir.file("metrics")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    for device in ["block_rootfs", "entropy"] {
        let held = last[device]["throttled"].as_u64();
        assert!(held.is_some_and(|n| n > 0), "{device}: {metrics}");
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn patching_a_running_drive_s_rate_limiter_lifts_it() {
    let (dir, vm, _img) = drive_held_to_1_mib_per_second("patch", 6, |vm| {
        let typo =
            r#"{"drive_id": "data", "rate_limiter": {"bandwith": {"size": 1, "refill_time": 1}}}"#;
        vm.expect(400, "PATCH", "/drives/data", Some(typo));
    });
    std::thread::sleep(Duration::from_secs(1));
    // Lifted while the guest reads: a bucket of size 0 is no limit (Firecracker's rule).
    let lift =
        r#"{"drive_id": "data", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#;
    vm.expect(204, "PATCH", "/drives/data", Some(lift));
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = vm_serial(&dir);
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    let got = figure(&serial, "bench blk-seq128k qd4:", "MiB/s");
    eprintln!("rate limit lifted after ~1 s of 6 at 1 MiB/s: {got:.1} MiB/s on average");
    // Held to 1 MiB/s throughout it would be about 1; lifted, the guest reads far faster.
    assert!(got > 3.0, "{got} MiB/s\n{serial}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_patch_whose_image_fails_leaves_the_rate_limiter() {
    let (dir, vm, _img) = drive_held_to_1_mib_per_second("patch-bad", 4, |_| {});
    // A lift with an image that cannot be opened: refused, and nothing of it applied.
    let missing = dir.file("no-such-image");
    let bad = serde_json::json!({
        "drive_id": "data", "path_on_host": missing,
        "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}},
    });
    vm.expect(400, "PATCH", "/drives/data", Some(&bad.to_string()));
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = vm_serial(&dir);
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    let got = figure(&serial, "bench blk-seq128k qd4:", "MiB/s");
    eprintln!("after a refused PATCH lifting the 1 MiB/s limit: {got:.1} MiB/s");
    // Still held to 1 MiB/s (lifted, the guest reads many times faster).
    assert!(
        got < 2.0,
        "{got} MiB/s: the refused PATCH lifted the limit\n{serial}"
    );
}

/// A VM configured through the API whose drive `data` (a 1 GiB image) is held to 1 MiB/s
/// by a rate limiter, the guest reading it for `secs` s (`bench=blk-seq128k:4:SECS`);
/// `before_start` runs before InstanceStart. Returns once the guest found its disk.
fn drive_held_to_1_mib_per_second(
    name: &str,
    secs: u32,
    before_start: impl FnOnce(&common::api::Vmkit),
) -> (common::api::Dir, common::api::Vmkit, Image) {
    use common::api::{Dir, Vmkit};
    let dir = Dir::new(&format!("rl-{name}"));
    let img = Image::new(name, 1024);
    let vm = Vmkit::start(&dir, &[]);
    vm.expect(
        204,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    let boot = serde_json::json!({
        "kernel_image_path": test_guest(),
        "boot_args": format!("test=blk-serial bench=blk-seq128k:4:{secs}"),
    });
    vm.expect(204, "PUT", "/boot-source", Some(&boot.to_string()));
    let drive = serde_json::json!({
        "drive_id": "data", "path_on_host": img.path(), "is_root_device": false,
        "rate_limiter": {"bandwidth": {"size": 131072, "refill_time": 125}},
    });
    vm.expect(204, "PUT", "/drives/data", Some(&drive.to_string()));
    before_start(&vm);
    vm.action("InstanceStart");
    vm.wait_serial("test blk-serial: ok", Duration::from_secs(30));
    (dir, vm, img)
}

fn vm_serial(dir: &common::api::Dir) -> String {
    std::fs::read_to_string(dir.file("serial")).unwrap_or_default()
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn patching_a_running_card_s_transmit_limit_lifts_it() {
    let ns = vmkit_netns::NetNs::create("rl-patch", 1).expect("network namespace with a TAP");
    let dir = common::api::Dir::new("rl-net-patch");
    let sock = dir.file("api.sock");
    // 100 frames a second, for 5 s of sending; lifted through the API after about 2 s.
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(),
                        "boot_args": format!("bench=net-tx:5 net_ip={} net_peer={} net_port=5557",
                                             ns.guest_ip, ns.host_ip)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": ns.tap,
                                "guest_mac": "52:54:00:12:34:56",
                                "tx_rate_limiter": {"ops": {"size": 10, "refill_time": 100}}}],
    });
    let path = dir.file("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmkit"));
    cmd.arg("--config-file")
        .arg(&path)
        .arg("--api-sock")
        .arg(&sock);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit in the namespace");
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(2));
    let patch = |id: &str, body: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "%{http_code}", "-X", "PATCH", "--unix-socket"])
            .arg(&sock)
            .arg(format!("http://localhost/network-interfaces/{id}"))
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let answer = patch("eth1", r#"{"iface_id": "eth1"}"#);
    assert!(
        answer.ends_with("400") && answer.contains("no such interface"),
        "{answer}"
    );
    // A bucket of size 0 is no limit (Firecracker's rule).
    let lift = r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}"#;
    assert_eq!(patch("eth0", lift), "204");
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let got = figure(&stdout, "bench net-tx: ", "frames/s");
    eprintln!("rate limit net tx_ops=100 lifted after ~2 s of 5: {got:.0} frames/s on average");
    // Held to 100 a second throughout it would be about 150 (the 256 buffers queued).
    assert!(got > 1000.0, "{got} frames/s\n{stdout}");
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn net_receive_frames_limit() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let ns = vmkit_netns::NetNs::create("rl-rx", 1).expect("network namespace with a TAP");
    // The host floods the guest with UDP frames from inside the namespace until told to
    // stop; the guest counts what reaches it for 3 s, held to 1000 frames a second.
    let stop = Arc::new(AtomicBool::new(false));
    let (guest_ip, done) = (ns.guest_ip, stop.clone());
    let sender = ns.spawn_in(move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        let mut sent = 0u64;
        while !done.load(Ordering::Relaxed) {
            // ARP may not be resolved yet, and the TAP drops what the guest leaves: errors
            // are expected while flooding.
            if socket.send_to(&[0x76; 22], (guest_ip, 5558)).is_ok() {
                sent += 1;
            }
            if sent.is_multiple_of(64) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        sent
    });
    let net = format!("tap={},mac=52:54:00:12:34:56,rx_ops=1000", ns.tap);
    let cmdline = format!("bench=net-rx:3 net_ip={guest_ip} net_port=5558");
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmkit"));
    cmd.arg("--kernel").arg(test_guest());
    cmd.args(["--net", &net, "--cmdline", &cmdline]);
    let m = measure_command(cmd);
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("the sender");
    let got = net_frames_s(&m, "net-rx");
    report("net rx_ops=1000", 1000.0, got, "frames/s", &m);
    eprintln!("{sent} frames sent by the host");
    assert!(
        in_band(got, 800.0..=1100.0),
        "{got:?} frames/s\n{}",
        m.stdout
    );
}
