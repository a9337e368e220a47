//! Real Linux drivers against vmkit's devices: the minimal kernel that
//! `examples/linux-guest/build.sh` builds from Debian's linux-source-6.1 boots to its busybox
//! `/init`, which tests virtio-blk, virtio-rng and virtio-console and prints one result line per
//! device, then ends the VM with a keyboard-controller reset.
//!
//! Three boots: the plain kernel with virtio-mmio devices from `virtio_mmio.device=`; the
//! ACPI+PCI kernel finding the same virtio-mmio devices through the DSDT alone; and the ACPI+PCI
//! kernel with the devices as virtio-pci functions (host bridge from the DSDT, ECAM from the
//! MCFG, MSI-X). Each boot takes 20-40 s on hosts whose KVM emulates guest kernel mode.
//!
//! Two more boots test virtio-net (the mmio kernel on virtio-mmio, the ACPI+PCI kernel on
//! virtio-pci), each inside a network namespace with a TAP: Linux's `virtio_net` binds, `eth0`
//! has the configured MAC, the guest pings the host and moves 2 MiB each way over TCP with
//! busybox `nc`, checked at both ends, with TSO negotiated and used.
//!
//! Two more test virtio-vsock (the mmio kernel on virtio-mmio, the ACPI+PCI kernel on
//! virtio-pci), Firecracker's "hybrid vsock" over Unix sockets: Linux's
//! `vmw_vsock_virtio_transport` binds, the guest has the configured CID, its connection to a
//! port no host program listens on is reset, 512 KiB go to a host echo (`PATH_<port>`) and back,
//! and the host connects to the guest's listener through `PATH` with `CONNECT <port>`, 512
//! KiB each way, checked at both ends.
//!
//! Behind the `linux-guest-tests` feature (`scripts/test-all.sh` turns it on): the first run on
//! a machine builds the kernels, about 5 minutes on 2 cores.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{repo_root, vmkit};
use vmkit_netns::{accept_until, NetNs};

/// vmkit's exit status when the guest resets the machine: /init ends with `reboot -f`
/// (`reboot=k`: the i8042 reset line).
const GUEST_RESET: i32 = 3;
/// Paths printed by the build script.
struct Artifacts {
    kernel_mmio: String,
    kernel_acpi_pci: String,
    initramfs: String,
}

fn artifacts() -> &'static Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let script = repo_root().join("examples/linux-guest/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run examples/linux-guest/build.sh");
        assert!(
            out.status.success(),
            "building the Linux guest failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("build.sh printed no {key}:\n{text}"))
                .to_string()
        };
        Artifacts {
            kernel_mmio: get("VMKIT_LINUX_KERNEL_MMIO"),
            kernel_acpi_pci: get("VMKIT_LINUX_KERNEL_ACPI_PCI"),
            initramfs: get("VMKIT_LINUX_INITRAMFS"),
        }
    })
}

/// One guest at a time: each is CPU-bound (emulated kernel), and the timings are reported.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// What the host gives the guest's test and checks afterwards.
struct Scratch {
    dir: PathBuf,
    disk: PathBuf,
    pattern: Vec<u8>,
}

const DISK_SIZE: usize = 1 << 20;
const PATTERN_LEN: usize = 64 << 10;
/// Where the guest copies the disk's first 8 KiB to (block 32 of 4 KiB).
const WRITE_OFFSET: usize = 32 * 4096;

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmkit-linux-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let pattern = lcg_bytes(name.len() as u64, PATTERN_LEN);
        let mut image = pattern.clone();
        image.resize(DISK_SIZE, 0);
        let disk = dir.join("disk.img");
        fs::write(&disk, &image).unwrap();
        Scratch { dir, disk, pattern }
    }

    fn pattern_sha256(&self) -> String {
        sha256_hex(&self.pattern)
    }
}

/// A pattern no zero-filled or shifted read can match: a 64-bit LCG's high bytes.
fn lcg_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ seed;
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect()
}

/// The sha256 of `data` in hex, from the host's `sha256sum`.
fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The kernel command line without device hints: the CPU template hides what the host's
/// emulator rejects, so no clearcpuid=/noxsave/nopcid is needed.
const CMDLINE: &str = "console=ttyS0 panic=-1 tsc=reliable \
                       no_timer_check lpj=5000000 rodata=off quiet";

/// Boots `kernel` with blk, rng and console on `transport`, checks every result line, the exit
/// status, the disk image and the console file; returns the serial text. `reboot` is how the
/// kernel ends the VM: `k` (keyboard controller) or `a` (the FADT's reset register).
fn boot_and_check(
    name: &str,
    kernel: &str,
    transport: &str,
    reboot: &str,
    extra: &[&str],
) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let s = Scratch::new(name);
    let token = format!("hvc-{name}-{}", std::process::id());
    let cmdline = format!(
        "{CMDLINE} reboot={reboot} vmkit_test=blk,rng,console vmkit_blk_sha={} vmkit_token={token}",
        s.pattern_sha256()
    );
    let serial = s.dir.join("serial.txt");
    let console = s.dir.join("hvc0.txt");
    let disk = format!("path={}", s.disk.display());
    let serial_arg = format!("file={}", serial.display());
    let console_arg = format!("file={}", console.display());
    let mut args = vec![
        "--kernel",
        kernel,
        "--initramfs",
        &a.initramfs,
        "--cpu-template",
        "pvm",
        "--memory",
        "128M",
        "--transport",
        transport,
        "--rng",
        "--console",
        &console_arg,
        "--disk",
        &disk,
        "--serial",
        &serial_arg,
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let out = vmkit(&args, Duration::from_secs(600));
    let wall = start.elapsed();
    let text = fs::read_to_string(&serial).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(GUEST_RESET),
        "vmkit exit status; stderr:\n{stderr}\nserial:\n{text}"
    );
    let ready = text.lines().position(|l| l == "VMKIT-LINUX-READY");
    assert!(ready.is_some(), "no ready line; serial:\n{text}");
    for dev in ["blk", "rng", "console"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("VMKIT-RESULT {dev} ")))
            .unwrap_or_else(|| panic!("no result line for {dev}; serial:\n{text}"));
        assert!(
            line.starts_with(&format!("VMKIT-RESULT {dev} ok")),
            "{line}\nserial:\n{text}"
        );
    }
    for driver in ["virtio_blk", "virtio_rng", "virtio_console"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("VMKIT-BOUND ") && l.ends_with(&format!("driver={driver}"))),
            "no device bound to {driver}; serial:\n{text}"
        );
    }
    assert!(text.contains("VMKIT-LINUX-DONE"), "serial:\n{text}");
    assert!(
        !text.contains("Segmentation fault") && !text.contains("Illegal instruction"),
        "a guest process crashed; serial:\n{text}"
    );
    // The 8 KiB the guest wrote (and flushed) are in the image, at the right place only.
    let image = fs::read(&s.disk).unwrap();
    assert_eq!(image.len(), DISK_SIZE);
    assert_eq!(
        &image[..PATTERN_LEN],
        &s.pattern[..],
        "the pattern is intact"
    );
    assert_eq!(
        &image[WRITE_OFFSET..WRITE_OFFSET + 8192],
        &s.pattern[..8192],
        "the guest's write reached the image"
    );
    assert!(
        image[WRITE_OFFSET + 8192..].iter().all(|&b| b == 0)
            && image[PATTERN_LEN..WRITE_OFFSET].iter().all(|&b| b == 0),
        "nothing else was written"
    );
    let hvc = fs::read_to_string(&console).unwrap_or_default();
    assert!(
        hvc.contains(&format!("VMKIT-HVC0 token={token}")),
        "hvc0 text did not reach the host: {hvc:?}"
    );
    eprintln!(
        "{name}: vmkit ran {:.1} s (boot, tests, reset)",
        wall.as_secs_f64()
    );
    for l in text.lines() {
        if l.starts_with("VMKIT-") {
            eprintln!("{name}: {l}");
        }
    }
    text
}

/// The interrupt counts of the guest's `/proc/interrupts` lines that name a virtio device and
/// `chip` (e.g. "IO-APIC", "PCI-MSI"): one entry per line (the guest has one CPU).
fn irq_counts(text: &str, chip: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("VMKIT-IRQ "))
        .filter(|l| l.contains(chip))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

/// How many virtio devices sit under a sysfs parent whose path contains `parent`: where the
/// guest found them (command line, DSDT, PCI bus).
fn bound_under(text: &str, parent: &str) -> usize {
    text.lines()
        .filter(|l| l.starts_with("VMKIT-BOUND ") && l.contains(parent))
        .count()
}

fn exists(p: &str) -> bool {
    Path::new(p).exists()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn mmio_kernel_drives_virtio_mmio_devices_from_the_command_line() {
    let k = &artifacts().kernel_mmio;
    assert!(exists(k));
    let text = boot_and_check("mmio", k, "mmio", "k", &[]);
    assert_eq!(bound_under(&text, "/virtio-mmio."), 3, "{text}");
    // Without ACPI the kernel takes the IOAPIC and the ISA wiring from vmkit's MP table: one
    // IOAPIC pin per device; blk and rng requests completed through interrupts.
    let irqs = irq_counts(&text, "IO-APIC");
    assert_eq!(irqs.len(), 3, "{text}");
    assert!(irqs.iter().filter(|&&n| n > 0).count() >= 2, "{text}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn acpi_kernel_finds_virtio_mmio_devices_through_the_dsdt() {
    let k = &artifacts().kernel_acpi_pci;
    let text = boot_and_check("acpi-mmio", k, "mmio", "a", &["--no-mmio-cmdline"]);
    // The platform devices come from ACPI (LNRO0005), not from virtio_mmio.device=.
    assert!(
        text.lines()
            .any(|l| l.starts_with("VMKIT-CMDLINE ") && !l.contains("virtio_mmio")),
        "command-line hints were given: {text}"
    );
    assert_eq!(bound_under(&text, "/LNRO0005:"), 3, "{text}");
    let irqs = irq_counts(&text, "IO-APIC");
    assert_eq!(irqs.len(), 3, "{text}");
    assert!(irqs.iter().filter(|&&n| n > 0).count() >= 2, "{text}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn acpi_kernel_drives_virtio_pci_devices() {
    let k = &artifacts().kernel_acpi_pci;
    let text = boot_and_check("acpi-pci", k, "pci", "a", &[]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("VMKIT-CMDLINE ") && !l.contains("virtio_mmio")),
        "{text}"
    );
    assert_eq!(bound_under(&text, "/pci0000:00/0000:00:"), 3, "{text}");
    // MSI-X: a config vector and queue vectors per device, no IOAPIC pin.
    let msi = irq_counts(&text, "PCI-MSI");
    assert!(msi.len() >= 6, "{text}");
    assert!(msi.iter().filter(|&&n| n > 0).count() >= 2, "{text}");
    let pins = irq_counts(&text, "IO-APIC");
    assert!(pins.is_empty(), "virtio on IOAPIC pins: {pins:?}\n{text}");
}

// --- virtio-net: Linux's virtio_net on vmkit's device, a TAP in a network namespace ------------

/// KiB the guest moves each way over TCP. 2 MiB took 3.2-4.9 s guest to host and 2.4-3.1 s host
/// to guest (host's clock) on a host whose KVM emulates guest kernel mode; a whole boot 25-30 s.
const NET_KIB: usize = 2048;
const NET_MAC: &str = "52:54:00:12:34:56";
/// The guest sends its stream to this port and reads the host's from the next one.
const NET_PORT: u16 = 5556;
/// The most the guest's boot and net test may take, and the host's sockets wait.
const NET_LIMIT: Duration = Duration::from_secs(300);

/// What the guest sends: `NET_KIB` KiB of "%015d\n" lines counting from 10^14 (init.sh's seq).
fn guest_stream() -> Vec<u8> {
    let first = 100_000_000_000_000u64;
    (0..NET_KIB as u64 * 64)
        .flat_map(|i| format!("{:015}\n", first + i).into_bytes())
        .collect()
}

/// The bytes of one connection and how long it took from accept to its end.
struct Transfer {
    bytes: Vec<u8>,
    took: Duration,
}

/// Why a host socket gives up: the VM ended first, or the limit passed.
fn keep_waiting(stop: &AtomicBool, deadline: Instant) -> Result<(), String> {
    if stop.load(Ordering::SeqCst) {
        return Err("the VM ended before the guest finished".into());
    }
    if Instant::now() > deadline {
        return Err(format!("not done within {NET_LIMIT:?}"));
    }
    std::thread::sleep(Duration::from_millis(10));
    Ok(())
}

fn interrupted(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), WouldBlock | TimedOut | Interrupted)
}

/// One connection accepted on `l`, with short timeouts so its loops can check `stop`.
fn accept_one(l: &TcpListener, stop: &AtomicBool, deadline: Instant) -> Result<TcpStream, String> {
    let tick = Some(Duration::from_millis(100));
    accept_until(l, tick, || keep_waiting(stop, deadline).err())
}

/// Reads the guest's stream on `l` to its end.
fn receive(l: TcpListener, stop: &AtomicBool, deadline: Instant) -> Result<Transfer, String> {
    let mut s = accept_one(&l, stop, deadline)?;
    let start = Instant::now();
    let (mut bytes, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return Ok(Transfer {
                    bytes,
                    took: start.elapsed(),
                })
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if interrupted(&e) => keep_waiting(stop, deadline)?,
            Err(e) => return Err(format!("read after {} bytes: {e}", bytes.len())),
        }
    }
}

/// Writes `data` to the guest's connection on `l`, then closes it.
fn send(
    l: TcpListener,
    data: &[u8],
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<Transfer, String> {
    let mut s = accept_one(&l, stop, deadline)?;
    let start = Instant::now();
    let mut off = 0;
    while off < data.len() {
        match s.write(&data[off..data.len().min(off + (1 << 16))]) {
            Ok(n) => off += n,
            Err(e) if interrupted(&e) => keep_waiting(stop, deadline)?,
            Err(e) => return Err(format!("write after {off} bytes: {e}")),
        }
    }
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    Ok(Transfer {
        bytes: data.to_vec(),
        took: start.elapsed(),
    })
}

/// The host's end of the guest's two TCP streams, listening inside the namespace before the VM
/// starts and served from threads.
struct NetPeer {
    stop: Arc<AtomicBool>,
    from_guest: JoinHandle<Result<Transfer, String>>,
    to_guest: JoinHandle<Result<Transfer, String>>,
}

impl NetPeer {
    fn start(ns: &NetNs, to_send: Vec<u8>) -> Self {
        let ip = ns.host_ip;
        let bound = ns
            .spawn_in(move || -> std::io::Result<_> {
                Ok((
                    TcpListener::bind((ip, NET_PORT))?,
                    TcpListener::bind((ip, NET_PORT + 1))?,
                ))
            })
            .join()
            .expect("the namespace thread");
        let (rx, tx) = bound.unwrap_or_else(|e| panic!("listen on {ip}:{NET_PORT}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + NET_LIMIT;
        let s = stop.clone();
        let from_guest = std::thread::spawn(move || receive(rx, &s, deadline));
        let s = stop.clone();
        let to_guest = std::thread::spawn(move || send(tx, &to_send, &s, deadline));
        NetPeer {
            stop,
            from_guest,
            to_guest,
        }
    }

    /// After the VM has ended: what each connection moved (or why it did not).
    fn finish(self) -> (Result<Transfer, String>, Result<Transfer, String>) {
        self.stop.store(true, Ordering::SeqCst);
        let from = self.from_guest.join().expect("receiving thread");
        let to = self.to_guest.join().expect("sending thread");
        (from, to)
    }
}

/// Runs `cmd` with its outputs collected, killed after `limit`: (exit status, stdout, stderr).
fn run_bounded(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit");
    let collect = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            String::from_utf8_lossy(&v).into_owned()
        })
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let status = child.wait().expect("wait");
    (status.code(), out.join().unwrap(), err.join().unwrap())
}

/// The value of `key=` in a line of space-separated words.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// The guest's "VMKIT-RESULT net ok ..." line against what the host got and sent.
fn check_net_result(line: &str, got: &Transfer, sent: &Transfer, text: &str) {
    assert!(
        line.starts_with("VMKIT-RESULT net ok "),
        "{line}\nserial:\n{text}"
    );
    assert_eq!(field(line, "mac"), Some(NET_MAC), "{line}");
    assert_eq!(field(line, "ping"), Some("3/3"), "{line}");
    assert!(
        got.bytes == guest_stream(),
        "the guest's {} bytes are not its pattern",
        got.bytes.len()
    );
    assert_eq!(
        field(line, "tx_sha256"),
        Some(sha256_hex(&got.bytes).as_str()),
        "{line}"
    );
    assert_eq!(
        field(line, "rx_bytes"),
        Some(sent.bytes.len().to_string().as_str()),
        "{line}"
    );
    assert_eq!(
        field(line, "rx_sha256"),
        Some(sha256_hex(&sent.bytes).as_str()),
        "{line}"
    );
    // Offloads the driver took: character i of the virtio features string is bit i.
    let features = field(line, "features").unwrap_or_default().as_bytes();
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
    ] {
        assert_eq!(
            features.get(bit),
            Some(&b'1'),
            "{name} (bit {bit}) not negotiated: {line}"
        );
    }
    // TSO was used, not just agreed: the device carried frames above 1514 bytes on average
    // (without it every TCP segment fits the 1500-byte MTU).
    let stats = text
        .lines()
        .find(|l| l.starts_with("VMKIT-NET stats "))
        .unwrap_or_default();
    let tx_avg: u64 = field(stats, "tx_avg")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        tx_avg > 1514,
        "no TCP super-frames went through the device: {stats}"
    );
}

/// Boots `kernel` in a new network namespace with one `--net` card of `queues` queue pairs on
/// its TAP (multi-queue when more than one), the guest's net test only; checks the result
/// line, both streams and the driver binding; returns the serial text. `parent` is part of
/// the card's sysfs path (where the guest found it).
fn net_boot_and_check(
    name: &str,
    kernel: &str,
    (transport, queues): (&str, u16),
    reboot: &str,
    parent: &str,
) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let ns = NetNs::create(name, queues).unwrap_or_else(|e| panic!("network namespace: {e}"));
    let peer = NetPeer::start(&ns, lcg_bytes(0x6e6574, NET_KIB << 10));
    let cmdline = format!(
        "{CMDLINE} reboot={reboot} vmkit_test=net vmkit_net_ip={} vmkit_net_peer={} \
         vmkit_net_mac={NET_MAC} vmkit_net_port={NET_PORT} vmkit_net_kib={NET_KIB}",
        ns.guest_ip, ns.host_ip
    );
    let net = format!("tap={},mac={NET_MAC},queues={queues}", ns.tap);
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmkit"));
    cmd.args([
        "--kernel",
        kernel,
        "--initramfs",
        &a.initramfs,
        "--cpu-template",
        "pvm",
    ])
    .args(["--memory", "128M", "--transport", transport, "--net", &net])
    .args(["--serial", "stdio", "--cmdline", &cmdline]);
    let start = Instant::now();
    let (code, text, stderr) = run_bounded(cmd, NET_LIMIT);
    let wall = start.elapsed();
    let (got, sent) = peer.finish();
    assert_eq!(
        code,
        Some(GUEST_RESET),
        "vmkit exit status; stderr:\n{stderr}\nserial:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("VMKIT-RESULT net "))
        .unwrap_or_else(|| panic!("no net result line; stderr:\n{stderr}\nserial:\n{text}"));
    let got = got.unwrap_or_else(|e| panic!("guest to host: {e}\n{line}\nserial:\n{text}"));
    let sent = sent.unwrap_or_else(|e| panic!("host to guest: {e}\n{line}\nserial:\n{text}"));
    check_net_result(line, &got, &sent, &text);
    assert!(
        text.lines().any(|l| l.starts_with("VMKIT-BOUND ")
            && l.contains(parent)
            && l.ends_with("driver=virtio_net")),
        "no device under {parent} bound to virtio_net; serial:\n{text}"
    );
    assert!(
        !text.contains("Segmentation fault") && !text.contains("Illegal instruction"),
        "a guest process crashed; serial:\n{text}"
    );
    report_net(name, wall, &got, &sent, &text);
    text
}

fn report_net(name: &str, wall: Duration, got: &Transfer, sent: &Transfer, text: &str) {
    let rate = |t: &Transfer| t.bytes.len() as f64 / t.took.as_secs_f64() / 1024.0;
    eprintln!(
        "{name}: vmkit ran {:.1} s; guest to host {} bytes in {:.2} s ({:.0} KiB/s), host to guest \
         {} bytes in {:.2} s ({:.0} KiB/s) (host's clock, accept to close)",
        wall.as_secs_f64(),
        got.bytes.len(),
        got.took.as_secs_f64(),
        rate(got),
        sent.bytes.len(),
        sent.took.as_secs_f64(),
        rate(sent)
    );
    for l in text
        .lines()
        .filter(|l| l.starts_with("VMKIT-") && !l.starts_with("VMKIT-DMESG"))
    {
        eprintln!("{name}: {l}");
    }
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn mmio_kernel_moves_tcp_through_virtio_net_mmio() {
    let k = &artifacts().kernel_mmio;
    let text = net_boot_and_check("net-mmio", k, ("mmio", 1), "k", "/virtio-mmio.");
    // The card's interrupt comes through an IOAPIC pin (MP table wiring), and it fired.
    let irqs = irq_counts(&text, "IO-APIC");
    assert!(irqs.len() == 1 && irqs[0] > 0, "{text}");
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn acpi_kernel_moves_tcp_through_virtio_net_pci() {
    let k = &artifacts().kernel_acpi_pci;
    // Two queue pairs on a multi-queue TAP: the driver negotiates MQ and the control queue
    // (and, with one CPU, tells the device through it to use one pair).
    let text = net_boot_and_check("net-pci", k, ("pci", 2), "a", "/pci0000:00/0000:00:");
    let line = text
        .lines()
        .find(|l| l.starts_with("VMKIT-RESULT net "))
        .unwrap_or_default();
    let features = field(line, "features").unwrap_or_default().as_bytes();
    for (bit, name) in [(17, "CTRL_VQ"), (18, "CTRL_RX"), (22, "MQ")] {
        assert_eq!(
            features.get(bit),
            Some(&b'1'),
            "{name} not negotiated: {line}"
        );
    }
    // MSI-X: config, input and output vectors; both queues interrupted the guest.
    let msi = irq_counts(&text, "PCI-MSI");
    assert!(
        msi.len() >= 3 && msi.iter().filter(|&&n| n > 0).count() >= 2,
        "{text}"
    );
    assert!(irq_counts(&text, "IO-APIC").is_empty(), "{text}");
}

// --- virtio-vsock: Linux's vmw_vsock_virtio_transport on vmkit's device, "hybrid vsock" over
// Unix sockets (Firecracker's convention) --------------------------------------------------------

/// The host echoes on this vsock port (its Unix socket `<socket>_5000`); the guest listens on
/// the next one (the host reaches it through `<socket>` with `CONNECT 5001\n`); nothing
/// listens on the one after (the guest's connection there must be refused).
const VSOCK_PORT: u32 = 5000;
/// Bytes each way on each connection: twice the 256 KiB of credit a Linux socket gives its
/// peer, so both ends must wait for and send credit updates.
const VSOCK_BYTES: usize = 512 << 10;

/// The bytes `vsock-test` sends from a guest socket on `port`.
fn vsock_guest_pattern(port: u32) -> Vec<u8> {
    lcg_bytes(port.into(), VSOCK_BYTES)
}

/// The bytes `vsock-test listen` expects from the host on `port`.
fn vsock_host_pattern(port: u32) -> Vec<u8> {
    lcg_bytes(u64::from(port) + 0x10000, VSOCK_BYTES)
}

/// What the host's echo listener got from the guest's connection, and when the guest's close
/// reached it.
struct Echoed {
    bytes: Vec<u8>,
    closed_at: Instant,
}

/// Serves one connection on the host's listener `l` (the VMM connects to it for the guest):
/// echoes every byte until the guest closes.
fn vsock_echo(l: UnixListener, stop: &AtomicBool, deadline: Instant) -> Result<Echoed, String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let mut s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(e) if interrupted(&e) => keep_waiting(stop, deadline)
                .map_err(|e| format!("no connection from the VMM: {e}"))?,
            Err(e) => return Err(format!("accept: {e}")),
        }
    };
    s.set_nonblocking(false).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let (mut bytes, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                return Ok(Echoed {
                    bytes,
                    closed_at: Instant::now(),
                })
            }
            Ok(n) => {
                bytes.extend_from_slice(&buf[..n]);
                s.write_all(&buf[..n])
                    .map_err(|e| format!("echo after {} bytes: {e}", bytes.len()))?;
            }
            Err(e) if interrupted(&e) => keep_waiting(stop, deadline)
                .map_err(|e| format!("{e} ({} bytes echoed, no close)", bytes.len()))?,
            Err(e) => return Err(format!("read after {} bytes: {e}", bytes.len())),
        }
    }
}

/// The host's connection to the guest's listener.
struct Connected {
    /// The port in the VMM's `OK <port>` answer.
    host_port: u32,
    /// `CONNECT`s it took (the first ones may come before the guest listens).
    attempts: u32,
    /// When `OK` came.
    connected_at: Instant,
    /// What the guest sent before it closed.
    bytes: Vec<u8>,
}

/// One `CONNECT port` through the VMM's socket: the stream after the VMM's `OK <port>` line
/// (read a byte at a time, so the guest's bytes behind it stay in the socket).
fn vsock_connect_once(socket: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        match s.read(&mut byte) {
            Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) => {
                return Err(format!(
                    "read after {:?}: {e}",
                    String::from_utf8_lossy(&line)
                ))
            }
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("the VMM answered {line:?}, not \"OK <port>\""))?;
    Ok((s, host_port))
}

/// Connects to the guest's listener on `port` through the VMM's `socket` once the guest has
/// said on the console (`serial`) that it listens, again while the VMM closes the connection
/// (the guest's reset); then sends the host pattern while it reads the guest's
/// `VSOCK_BYTES`, shuts its side down and waits for the guest to close.
fn vsock_client(
    socket: &Path,
    serial: &Path,
    port: u32,
    stop: &AtomicBool,
    deadline: Instant,
) -> Result<Connected, String> {
    let ready = format!("VMKIT-VSOCK listening port={port}");
    while !fs::read_to_string(serial)
        .unwrap_or_default()
        .contains(&ready)
    {
        keep_waiting(stop, deadline).map_err(|e| format!("no {ready:?}: {e}"))?;
    }
    let mut attempts = 0;
    let (mut s, host_port) = loop {
        attempts += 1;
        match vsock_connect_once(socket, port) {
            Ok(c) => break c,
            Err(e) if attempts >= 20 => {
                return Err(format!("CONNECT {port}, {attempts} attempts, last: {e}"))
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(200));
                keep_waiting(stop, deadline)?;
            }
        }
    };
    let connected_at = Instant::now();
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut writer = Some(std::thread::spawn(move || {
        w.write_all(&vsock_host_pattern(port))
    }));
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| e.to_string())?;
    let (mut bytes, mut buf) = (Vec::new(), vec![0u8; 1 << 16]);
    loop {
        let shut = writer.is_none();
        match s.read(&mut buf) {
            Ok(0) if shut => break,
            Ok(0) => {
                return Err(format!(
                    "the guest closed after {} bytes, before the host did",
                    bytes.len()
                ))
            }
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if interrupted(&e) => keep_waiting(stop, deadline).map_err(|e| {
                format!(
                    "{e} ({} bytes from the guest, host shut down: {shut})",
                    bytes.len()
                )
            })?,
            Err(e) => return Err(format!("read after {} bytes: {e}", bytes.len())),
        }
        // All the guest's bytes are in: the host's must have gone, then the host closes its
        // side and the guest, which waits for that, closes the connection.
        if bytes.len() >= VSOCK_BYTES {
            if let Some(writer) = writer.take() {
                writer
                    .join()
                    .expect("writer thread")
                    .map_err(|e| format!("write to the guest: {e}"))?;
                s.shutdown(std::net::Shutdown::Write)
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(Connected {
        host_port,
        attempts,
        connected_at,
        bytes,
    })
}

/// Boots `kernel` with one `--vsock cid=CID,socket=PATH` device on `transport`, the guest's
/// vsock test only, the host's echo on `PATH_5000` and its client on `PATH`; checks the result
/// line, the bytes at both ends and the driver binding; returns the serial text.
fn vsock_boot_and_check(
    name: &str,
    kernel: &str,
    (transport, cid): (&str, u32),
    reboot: &str,
    parent: &str,
) -> String {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let s = Scratch::new(name);
    let socket = s.dir.join("vsock.sock");
    let port_path = |p: u32| PathBuf::from(format!("{}_{p}", socket.display()));
    let echo_l = UnixListener::bind(port_path(VSOCK_PORT)).expect("bind the host's echo");
    assert!(!port_path(VSOCK_PORT + 2).exists());
    let serial = s.dir.join("serial.txt");
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + NET_LIMIT;
    let st = stop.clone();
    let echo = std::thread::spawn(move || vsock_echo(echo_l, &st, deadline));
    let (st, sock, ser) = (stop.clone(), socket.clone(), serial.clone());
    let client =
        std::thread::spawn(move || vsock_client(&sock, &ser, VSOCK_PORT + 1, &st, deadline));
    let cmdline = format!(
        "{CMDLINE} reboot={reboot} vmkit_test=vsock vmkit_vsock_port={VSOCK_PORT} \
         vmkit_vsock_bytes={VSOCK_BYTES}"
    );
    let vsock = format!("cid={cid},socket={}", socket.display());
    let serial_arg = format!("file={}", serial.display());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmkit"));
    cmd.args([
        "--kernel",
        kernel,
        "--initramfs",
        &a.initramfs,
        "--cpu-template",
        "pvm",
    ])
    .args([
        "--memory",
        "128M",
        "--transport",
        transport,
        "--vsock",
        &vsock,
    ])
    .args(["--serial", &serial_arg, "--cmdline", &cmdline]);
    let start = Instant::now();
    let (code, _, stderr) = run_bounded(cmd, NET_LIMIT);
    let wall = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    let echoed = echo.join().expect("echo thread");
    let connected = client.join().expect("client thread");
    let text = fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(
        code,
        Some(GUEST_RESET),
        "vmkit exit status; stderr:\n{stderr}\nserial:\n{text}"
    );
    let line = text
        .lines()
        .find(|l| l.starts_with("VMKIT-RESULT vsock "))
        .unwrap_or_else(|| panic!("no vsock result line; stderr:\n{stderr}\nserial:\n{text}"));
    assert!(
        line.starts_with("VMKIT-RESULT vsock ok "),
        "{line}\nstderr:\n{stderr}\nserial:\n{text}"
    );
    let echoed = echoed.unwrap_or_else(|e| panic!("host echo: {e}\n{line}\nserial:\n{text}"));
    let connected =
        connected.unwrap_or_else(|e| panic!("host client: {e}\n{line}\nserial:\n{text}"));
    // The guest has the configured CID; its connection where no host program listens was
    // reset; its bytes came back through the echo.
    assert_eq!(field(line, "cid"), Some(cid.to_string().as_str()), "{line}");
    assert!(
        matches!(field(line, "refused"), Some("ECONNRESET" | "ECONNREFUSED")),
        "{line}"
    );
    assert_eq!(
        field(line, "echoed"),
        Some(VSOCK_BYTES.to_string().as_str()),
        "{line}"
    );
    // The host's echo got exactly the guest's pattern, and the guest's close reached it before
    // the guest's listener took the host's connection.
    assert!(
        echoed.bytes == vsock_guest_pattern(VSOCK_PORT),
        "the host's echo got {} bytes, not the guest's {VSOCK_BYTES}-byte pattern",
        echoed.bytes.len()
    );
    assert!(
        echoed.closed_at < connected.connected_at,
        "the guest's close of its connection reached the host only after the next connection"
    );
    // The guest's listener: the peer it accepted is the host (CID 2) on the port the VMM's OK
    // named, it got the host's pattern (checked in the guest), and the host got the guest's.
    assert_eq!(
        field(line, "peer"),
        Some(format!("2:{}", connected.host_port).as_str()),
        "{line}"
    );
    assert_eq!(
        field(line, "received"),
        Some(VSOCK_BYTES.to_string().as_str()),
        "{line}"
    );
    assert!(
        connected.bytes == vsock_guest_pattern(VSOCK_PORT + 1),
        "the host's client got {} bytes, not the guest's {VSOCK_BYTES}-byte pattern",
        connected.bytes.len()
    );
    // Linux's driver is bound to the device (virtio device ID 19), where the guest found it.
    let dev = field(line, "device").unwrap_or_default();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("VMKIT-BOUND {dev} "))
                && l.contains("device=0x0013")
                && l.contains(parent)
                && l.ends_with("driver=vmw_vsock_virtio_transport")),
        "{dev} under {parent} not bound to vmw_vsock_virtio_transport; serial:\n{text}"
    );
    assert!(
        !text.contains("Segmentation fault") && !text.contains("Illegal instruction"),
        "a guest process crashed; serial:\n{text}"
    );
    eprintln!(
        "{name}: vmkit ran {:.1} s; CONNECT took {} attempt(s), OK {}",
        wall.as_secs_f64(),
        connected.attempts,
        connected.host_port
    );
    for l in text
        .lines()
        .filter(|l| l.starts_with("VMKIT-") && !l.starts_with("VMKIT-DMESG"))
    {
        eprintln!("{name}: {l}");
    }
    text
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn mmio_kernel_moves_bytes_through_virtio_vsock_mmio() {
    let k = &artifacts().kernel_mmio;
    let text = vsock_boot_and_check("vsock-mmio", k, ("mmio", 3), "k", "/virtio-mmio.");
    // The device's interrupt comes through an IOAPIC pin (MP table wiring), and it fired.
    let irqs = irq_counts(&text, "IO-APIC");
    assert!(irqs.len() == 1 && irqs[0] > 0, "{text}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn acpi_kernel_moves_bytes_through_virtio_vsock_pci() {
    let k = &artifacts().kernel_acpi_pci;
    let text = vsock_boot_and_check("vsock-pci", k, ("pci", 1234), "a", "/pci0000:00/0000:00:");
    // MSI-X: config, rx, tx and event vectors; rx and tx interrupted the guest.
    let msi = irq_counts(&text, "PCI-MSI");
    assert!(
        msi.len() >= 3 && msi.iter().filter(|&&n| n > 0).count() >= 2,
        "{text}"
    );
    assert!(irq_counts(&text, "IO-APIC").is_empty(), "{text}");
}

/// The Linux guest through the API: configured, started, paused and resumed with curl, then
/// ended by `SendCtrlAltDel` (the i8042 keyboard, the VT's Ctrl-Alt-Del, /init's SIGINT trap).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_api_boots_pauses_and_ctrl_alt_del_ends_the_linux_guest() {
    use common::api::{state, Dir, Vmkit};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let dir = Dir::new("linux");
    let vm = Vmkit::start(&dir, &[]);
    vm.expect(
        204,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "pvm"}"#),
    );
    let boot = serde_json::json!({
        "kernel_image_path": a.kernel_mmio,
        "initrd_path": a.initramfs,
        "boot_args": format!("{CMDLINE} reboot=k vmkit_test=rng vmkit_wait=120"),
    });
    vm.expect(204, "PUT", "/boot-source", Some(&boot.to_string()));
    vm.expect(204, "PUT", "/entropy", Some("{}"));
    vm.action("InstanceStart");
    vm.wait_serial("VMKIT-WAITING", Duration::from_secs(300));
    vm.set_state("Paused");
    assert_eq!(state(&vm), "Paused");
    vm.set_state("Resumed");
    let sent = Instant::now();
    vm.action("SendCtrlAltDel");
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = vm_serial(&dir);
    eprintln!("SendCtrlAltDel to the VM's end: {:?}", sent.elapsed());
    assert_eq!(code, Some(GUEST_RESET), "{stderr}\n{serial}");
    assert!(serial.contains("VMKIT-RESULT rng ok"), "{serial}");
    assert!(serial.contains("VMKIT-CTRL-ALT-DEL"), "{serial}");
}

fn vm_serial(dir: &common::api::Dir) -> String {
    fs::read_to_string(dir.file("serial")).unwrap_or_default()
}

/// Sends SIGTERM to `kernel` waiting in /init; returns the exit status, how long it took and
/// the serial output.
fn sigterm(name: &str, kernel: &str) -> (Option<i32>, Duration, String, String) {
    use common::api::{Dir, Vmkit};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let dir = Dir::new(name);
    let cmdline = format!("{CMDLINE} reboot=k vmkit_wait=120");
    let vm = Vmkit::start(
        &dir,
        &[
            "--kernel",
            kernel,
            "--initramfs",
            &a.initramfs,
            "--cpu-template",
            "pvm",
            "--shutdown-timeout",
            "30",
            "--cmdline",
            &cmdline,
        ],
    );
    vm.wait_serial("VMKIT-WAITING", Duration::from_secs(300));
    let sent = Instant::now();
    vm.signal(libc::SIGTERM);
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let took = sent.elapsed();
    eprintln!("{name}: SIGTERM to the VM's end: {took:?}");
    (code, took, vm_serial(&dir), stderr)
}

/// SIGTERM asks the Linux guest without ACPI to shut down: the power button goes unheard,
/// Ctrl-Alt-Del follows; /init ends the VM within the grace period (a reset: status 3).
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigterm_shuts_the_linux_guest_down_within_the_grace_period() {
    let (code, took, serial, stderr) = sigterm("linux-sigterm", &artifacts().kernel_mmio);
    assert_eq!(code, Some(GUEST_RESET), "{stderr}\n{serial}");
    assert!(serial.contains("VMKIT-CTRL-ALT-DEL"), "{serial}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// SIGTERM presses the ACPI power button: the acpi-pci kernel's button driver reports it,
/// /init powers off (ACPI S5: status 0) before Ctrl-Alt-Del is due.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn sigterm_presses_the_acpi_power_button_and_the_linux_guest_powers_off() {
    let (code, took, serial, stderr) = sigterm("linux-button", &artifacts().kernel_acpi_pci);
    assert_eq!(code, Some(0), "power-off; {stderr}\n{serial}");
    assert!(serial.contains("VMKIT-POWER-BUTTON"), "{serial}");
    // The GED probed cleanly (a _CRS Linux cannot parse leaves a freed handler behind, and
    // the button press then crashes the guest kernel, or happens to work).
    assert!(!serial.contains("acpi-ged"), "{serial}");
    assert!(
        !serial.contains("Oops") && !serial.contains("BUG:"),
        "{serial}"
    );
    assert!(!serial.contains("VMKIT-CTRL-ALT-DEL"), "{serial}");
    assert!(took < Duration::from_secs(30), "{took:?}");
}

/// The Linux guest driven by a Firecracker client from PyPI (firecracker-python): machine,
/// boot source with initrd, entropy, InstanceStart, pause and resume, SendCtrlAltDel.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_firecracker_python_client_boots_and_ends_the_linux_guest() {
    use common::api::{Dir, Vmkit};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let dir = Dir::new("linux-python");
    // The client sends no cpu_template: the command line's stays.
    let vm = Vmkit::start(&dir, &["--cpu-template", "pvm"]);
    let boot_args = format!("{CMDLINE} reboot=k vmkit_test=rng vmkit_wait=120");
    let mut client = common::api::firecracker_python_client();
    client
        .arg("--sock")
        .arg(&vm.sock)
        .args(["--kernel", &a.kernel_mmio, "--initrd", &a.initramfs])
        .args(["--boot-args", &boot_args])
        .arg("--expect-serial")
        .arg(&vm.serial)
        .args(["--expect", "VMKIT-WAITING", "--expect-timeout", "300"])
        .arg("--ctrl-alt-del");
    common::api::expect_client_passes(client);
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = vm_serial(&dir);
    assert_eq!(code, Some(GUEST_RESET), "{stderr}\n{serial}");
    assert!(serial.contains("VMKIT-RESULT rng ok"), "{serial}");
    assert!(serial.contains("VMKIT-CTRL-ALT-DEL"), "{serial}");
}

/// Clones restored at once from the Linux guest's snapshot.
const CLONES: usize = 10;

/// Checks a clone's run: released, every device test passed, reset at the end; its own disk
/// holds the guest's write; its console file the token.
fn check_clone(i: usize, dir: &common::api::Dir, s: &Scratch, token: &str, code: Option<i32>) {
    let serial = vm_serial(dir);
    assert_eq!(code, Some(GUEST_RESET), "clone {i}:\n{serial}");
    assert!(serial.contains("VMKIT-RELEASED"), "clone {i}:\n{serial}");
    assert!(
        !serial.contains("VMKIT-LINUX-READY"),
        "clone {i} booted again:\n{serial}"
    );
    for dev in ["blk", "rng", "console"] {
        assert!(
            serial.contains(&format!("VMKIT-RESULT {dev} ok")),
            "clone {i}: {dev}\n{serial}"
        );
    }
    let image = fs::read(dir.file("disk.img")).unwrap();
    assert_eq!(
        &image[WRITE_OFFSET..WRITE_OFFSET + 8192],
        &s.pattern[..8192],
        "clone {i}: the guest's write reached its own image"
    );
    let hvc = fs::read_to_string(dir.file("hvc0")).unwrap_or_default();
    assert!(
        hvc.contains(&format!("VMKIT-HVC0 token={token}")),
        "clone {i}: {hvc:?}"
    );
}

/// The Linux guest snapshotted at /init (before its device tests), then restored in
/// [`CLONES`] new processes at once, each with its own copy of the disk: every clone runs
/// the blk, rng and console tests and passes, and the original image is untouched.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn clones_of_the_linux_guest_snapshotted_at_init_pass_the_device_tests() {
    use common::api::{Dir, Vmkit};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let a = artifacts();
    let s = Scratch::new("snapshot");
    let token = format!("snap-{}", std::process::id());
    let cmdline = format!(
        "{CMDLINE} reboot=k vmkit_test=blk,rng,console vmkit_blk_sha={} vmkit_token={token} vmkit_hold=1",
        s.pattern_sha256()
    );
    let dir = Dir::new("linux-snap");
    let disk = format!("path={}", s.disk.display());
    let console = format!("file={}", dir.file("hvc0").display());
    let booted = Instant::now();
    let vm = Vmkit::start(
        &dir,
        &[
            "--kernel",
            &a.kernel_mmio,
            "--initramfs",
            &a.initramfs,
            "--cpu-template",
            "pvm",
            "--memory",
            "128M",
            "--rng",
            "--console",
            &console,
            "--disk",
            &disk,
            "--cmdline",
            &cmdline,
        ],
    );
    vm.wait_serial("VMKIT-HOLD", Duration::from_secs(300));
    eprintln!(
        "linux-snapshot: boot to /init's hold: {:?}",
        booted.elapsed()
    );
    vm.set_state("Paused");
    let snap = Dir::new("linux-snap-files");
    let body = serde_json::json!({
        "snapshot_path": snap.file("vmstate"), "mem_file_path": snap.file("memory"),
    });
    let taken = Instant::now();
    vm.expect(204, "PUT", "/snapshot/create", Some(&body.to_string()));
    eprintln!("linux-snapshot: snapshot created in {:?}", taken.elapsed());
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(Duration::from_secs(30));
    let original = fs::read(&s.disk).unwrap();

    let dirs: Vec<Dir> = (0..CLONES)
        .map(|i| Dir::new(&format!("linux-clone{i}")))
        .collect();
    let started = Instant::now();
    let clones: Vec<Vmkit> = dirs
        .iter()
        .map(|d| {
            fs::copy(&s.disk, d.file("disk.img")).unwrap();
            let drive = format!("block0={}", d.file("disk.img").display());
            let console = format!("file={}", d.file("hvc0").display());
            let snap_dir = snap.file("");
            Vmkit::start(
                d,
                &[
                    "--restore",
                    snap_dir.to_str().unwrap(),
                    "--restore-drive",
                    &drive,
                    "--console",
                    &console,
                ],
            )
        })
        .collect();
    for c in &clones {
        c.action("SendCtrlAltDel");
    }
    let codes: Vec<_> = clones
        .into_iter()
        .map(|c| c.wait(Duration::from_secs(600)))
        .collect();
    eprintln!(
        "linux-snapshot: {CLONES} clones restored, released and through the device tests in {:?}",
        started.elapsed()
    );
    for (i, (d, (code, stderr))) in dirs.iter().zip(codes).enumerate() {
        assert!(
            stderr.is_empty() || code == Some(GUEST_RESET),
            "clone {i}: {stderr}"
        );
        check_clone(i, d, &s, &token, code);
    }
    assert_eq!(
        fs::read(&s.disk).unwrap(),
        original,
        "the snapshot's own image was not written"
    );
}
