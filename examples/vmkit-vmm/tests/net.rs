//! virtio-net through the test guest's smoltcp stack (`test=virtio-net`), on both transports,
//! with a TAP in a network namespace the test creates: the guest answers ARP and the host's
//! ping and pings the host; 64 MiB go each way over one TCP connection, checked at both
//! ends (the streams and their FNV-1a 64, see `examples/test-guest/src/cases/virtio_net/
//! data.rs`); the guest sees the configured MAC and MTU.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::test_guest;
use vmkit_netns::{accept_until, NetNs};

/// Bytes each way.
const BYTES: usize = 64 << 20;
const PORT: u16 = 5555;
const MAC: &str = "52:54:00:12:34:56";
const MTU: u16 = 1500;
/// The guest's streams (`GUEST_SEED`, `HOST_SEED` in the test guest).
const GUEST_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
const HOST_SEED: u64 = 0xd1b5_4a32_d192_ed03;
/// How long the VM may run, and the host wait for the guest's connection.
const VM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one read or write on the connection may block.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// xorshift64 (13, 7, 17) from `seed`: the state after step k+1, little-endian, is bytes
/// 8k..8k+8.
fn stream(seed: u64, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 8);
    let mut x = seed;
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// FNV-1a, 64-bit.
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What the host's end of the connection saw.
#[derive(Debug)]
struct Peer {
    /// FNV-1a 64 of the bytes received from the guest.
    received_fnv: u64,
    /// Offset of the first received byte that is not the guest's stream.
    mismatch: Option<usize>,
    /// `ping -c 3 10.77.0.2`, run after the guest's bytes arrived, before the host's went.
    ping: Output,
}

/// Accepts the guest's connection (until `vm_done`), reads `BYTES` and checks them, pings the
/// guest, then sends `BYTES` of the host's stream. Runs inside the namespace.
fn serve(
    listener: TcpListener,
    mut ping: Command,
    vm_done: Arc<AtomicBool>,
) -> Result<Peer, String> {
    let mut conn = accept_until(&listener, Some(IO_TIMEOUT), || {
        vm_done
            .load(Ordering::Relaxed)
            .then(|| "the guest never connected".to_string())
    })?;
    let mut got = vec![0u8; BYTES];
    conn.read_exact(&mut got)
        .map_err(|e| format!("reading the guest's {BYTES} bytes: {e}"))?;
    let guest = stream(GUEST_SEED, BYTES);
    let mismatch = got.iter().zip(&guest).position(|(a, b)| a != b);
    let ping = ping.output().map_err(|e| format!("ping: {e}"))?;
    conn.write_all(&stream(HOST_SEED, BYTES))
        .map_err(|e| format!("sending {BYTES} bytes to the guest: {e}"))?;
    // The guest closes once it has everything; its FIN is not part of what is tested.
    let _ = conn.read(&mut [0u8; 1]);
    Ok(Peer {
        received_fnv: fnv1a64(&got),
        mismatch,
        ping,
    })
}

/// Runs `cmd` to its end (killed after `VM_TIMEOUT`).
fn run_vm(cmd: Command) -> Output {
    run_vm_with(cmd, None)
}

/// [`run_vm`], closing this process's copy of `inherited` once the child has its own.
fn run_vm_with(mut cmd: Command, inherited: Option<std::os::fd::OwnedFd>) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmkit in the namespace");
    drop(inherited);
    let start = Instant::now();
    while child.try_wait().expect("wait for vmkit").is_none() && start.elapsed() < VM_TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("vmkit's output")
}

/// The guest on `transport` with a TAP in a new namespace (opened by vmkit by name, or
/// `by_fd`: opened by the test and handed over as `--net fd=N`), the host's end served from
/// a thread inside it; every check in one place.
fn stream_on(transport: &str, by_fd: bool) {
    let ns = NetNs::create(&format!("net-{transport}"), 1).expect("network namespace with a TAP");
    let (tx, rx) = mpsc::channel();
    let vm_done = Arc::new(AtomicBool::new(false));
    let mut ping = ns.command("ping");
    ping.args(["-c", "3", "-i", "0.2", "-W", "2", ns.guest_ip]);
    let (host_ip, done) = (ns.host_ip, vm_done.clone());
    let peer = ns.spawn_in(move || {
        let listener = TcpListener::bind((host_ip, PORT));
        let _ = tx.send(listener.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        serve(listener.map_err(|e| e.to_string())?, ping, done)
    });
    rx.recv()
        .unwrap()
        .expect("listen at 10.77.0.1:5555 in the namespace");

    let guest = test_guest();
    let tap_fd = by_fd.then(|| ns.open_inheritable_tap(&ns.tap).expect("open the TAP"));
    let net = match &tap_fd {
        Some(fd) => {
            use std::os::fd::AsRawFd;
            format!("fd={},mac={MAC},mtu={MTU}", fd.as_raw_fd())
        }
        None => format!("tap={},mac={MAC},mtu={MTU}", ns.tap),
    };
    let cmdline = format!(
        "test=virtio-net net_ip={} net_peer={host_ip} net_port={PORT}",
        ns.guest_ip
    );
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmkit"));
    cmd.arg("--kernel").arg(&guest);
    cmd.args([
        "--memory",
        "256M",
        "--transport",
        transport,
        "--net",
        &net,
        "--cmdline",
        &cmdline,
    ]);
    let out = run_vm_with(cmd, tap_fd);
    vm_done.store(true, Ordering::Relaxed);
    let peer = peer.join().expect("the host's end panicked");
    check(transport, &out, peer);
}

/// The guest's lines, the exit status and the host's view, against each other.
fn check(transport: &str, out: &Output, peer: Result<Peer, String>) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!(
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let peer = peer.unwrap_or_else(|e| panic!("host end: {e}\n{context}"));
    let suffix = if transport == "pci" { " (pci)" } else { "" };
    let host_fnv = fnv1a64(&stream(HOST_SEED, BYTES));
    let lines: Vec<&str> = stdout.lines().map(str::trim_end).collect();
    let has = |prefix: &str, end: &str| {
        let found = lines
            .iter()
            .any(|l| l.starts_with(prefix) && l.ends_with(end));
        assert!(found, "no line {prefix:?}…{end:?}\n{context}");
    };
    // The MAC and MTU configured, the link up; pci lines end in " (pci <bdf>)".
    has(&format!("virtio-net: mac {MAC} mtu {MTU} status up"), "");
    has("virtio-net: ping 10.77.0.1 ok 3/3 ", "");
    // Each FNV the guest printed is the host's: of what it received, of what it sent.
    let sent = format!("fnv1a64 0x{:016x}", peer.received_fnv);
    has(&format!("virtio-net: tcp sent {BYTES} bytes in "), &sent);
    let received = format!("fnv1a64 0x{host_fnv:016x}");
    has(
        &format!("virtio-net: tcp received {BYTES} bytes in "),
        &received,
    );
    has(
        &format!("test virtio-net: ok{suffix}"),
        &format!("ok{suffix}"),
    );
    assert_eq!(
        peer.mismatch, None,
        "the guest's bytes differ from its stream\n{context}"
    );
    assert!(
        peer.ping.status.success(),
        "ping of the guest failed:\n{}\n{context}",
        String::from_utf8_lossy(&peer.ping.stdout)
    );
    assert_eq!(out.status.code(), Some(0), "{context}");
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn tcp_ping_arp_mmio() {
    stream_on("mmio", false);
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn tcp_ping_arp_pci() {
    stream_on("pci", false);
}

/// The same over a TAP the test opened and handed to vmkit as `--net fd=N` (how a privileged
/// parent gives an unprivileged VMM its network).
#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn tcp_ping_arp_on_a_handed_over_tap_fd() {
    stream_on("mmio", true);
}

/// A TAP owned by another user, and vmkit without CAP_NET_ADMIN: one line at start naming the
/// TAP and the kernel's refusal.
#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (network namespace, TAP)"
)]
fn a_tap_vmkit_may_not_use_is_one_line_at_start() {
    let ns = NetNs::create("net-perm", 1).expect("network namespace with a TAP");
    let added = ns
        .command("ip")
        .args([
            "tuntap", "add", "vmtapx", "mode", "tap", "vnet_hdr", "user", "1000",
        ])
        .status()
        .expect("ip tuntap add");
    assert!(added.success());
    let guest = test_guest();
    let mut cmd = ns.command("setpriv");
    cmd.args([
        "--bounding-set=-net_admin",
        "--",
        env!("CARGO_BIN_EXE_vmkit"),
    ])
    .args(["--kernel", guest.to_str().unwrap(), "--net", "tap=vmtapx"]);
    let out = run_vm(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--net tap=vmtapx: TAP vmtapx: TUNSETIFF failed: Operation not permitted"),
        "{err}"
    );
}

/// Firecracker's config file with a network interface (on the namespace's TAP, by name) and
/// a vsock: vmkit builds both, and the guest finds them.
#[test]
#[cfg_attr(
    any(no_kvm, not_root),
    ignore = "needs /dev/kvm and root (a network namespace with a TAP)"
)]
fn a_config_file_s_network_interface_and_vsock_reach_the_guest() {
    let ns = NetNs::create("net-config", 1).expect("network namespace with a TAP");
    let dir = std::env::temp_dir().join(format!("vmkit-net-config-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": "exit=poweroff"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": ns.tap, "guest_mac": MAC}],
        "vsock": {"guest_cid": 3, "uds_path": dir.join("v.sock")},
    });
    let path = dir.join("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let mut cmd = ns.command(env!("CARGO_BIN_EXE_vmkit"));
    cmd.arg("--config-file").arg(&path);
    let out = run_vm(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let context = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{context}");
    assert!(stdout.contains(": net (version 2)"), "{context}");
    assert!(stdout.contains(": vsock (version 2)"), "{context}");
    let _ = std::fs::remove_dir_all(&dir);
}
