//! The Firecracker-compatible API (`--api-sock`), driven with curl as an operator would:
//! every endpoint, a VM booted and paused through it, malformed requests and awkward
//! clients, the config file, and the shutdown signals.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::api::{state, Dir, Vmkit};
use common::test_guest;

fn disk(dir: &Dir, mib: u64) -> PathBuf {
    let p = dir.file("disk.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    p
}

/// Puts machine, boot source (the test guest with `cmdline`), a drive and entropy.
fn configure(vm: &Vmkit, dir: &Dir, cmdline: &str) {
    vm.expect(
        204,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 128}"#),
    );
    let guest = test_guest();
    let boot = serde_json::json!({
        "kernel_image_path": guest, "boot_args": cmdline,
    });
    vm.expect(204, "PUT", "/boot-source", Some(&boot.to_string()));
    let drive = serde_json::json!({
        "drive_id": "rootfs", "path_on_host": disk(dir, 8), "is_root_device": false,
        "is_read_only": false, "cache_type": "Unsafe", "io_engine": "Sync",
    });
    vm.expect(204, "PUT", "/drives/rootfs", Some(&drive.to_string()));
    vm.expect(204, "PUT", "/entropy", Some("{}"));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn every_endpoint_boots_pauses_and_resumes_the_test_guest() {
    let dir = Dir::new("boot");
    let vm = Vmkit::start(&dir, &[]);
    assert_eq!(state(&vm), "Not started");
    let version = vm.expect(200, "GET", "/version", None);
    assert!(version.contains("firecracker_version"), "{version}");
    let log = dir.file("log");
    let metrics = dir.file("metrics");
    let logger = serde_json::json!({"log_path": log, "level": "Info", "show_level": true});
    vm.expect(204, "PUT", "/logger", Some(&logger.to_string()));
    let m = serde_json::json!({ "metrics_path": metrics });
    vm.expect(204, "PUT", "/metrics", Some(&m.to_string()));
    configure(
        &vm,
        &dir,
        "test=virtio-rng,blk-serial hold=ticks:30 exit=poweroff",
    );
    let mc = vm.expect(200, "GET", "/machine-config", None);
    assert!(
        mc.contains(r#""vcpu_count":2"#) && mc.contains(r#""mem_size_mib":128"#),
        "{mc}"
    );
    let started = Instant::now();
    vm.action("InstanceStart");
    eprintln!("InstanceStart answered in {:?}", started.elapsed());
    assert_eq!(state(&vm), "Running");
    // As it runs: the CPU template is the command line's, as none was put.
    let mc = vm.expect(200, "GET", "/machine-config", None);
    assert!(mc.contains(r#""cpu_template":"host""#), "{mc}");
    // After the start, the configuration is closed.
    let refused = vm.expect(
        400,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
    );
    assert!(refused.contains("fault_message"), "{refused}");
    vm.wait_serial("tick 3\n", Duration::from_secs(60));
    // A new image for the running drive; a missing one or an unknown drive is refused.
    let other = dir.file("other.img");
    std::fs::File::create(&other)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let patch = serde_json::json!({"drive_id": "rootfs", "path_on_host": other});
    vm.expect(204, "PATCH", "/drives/rootfs", Some(&patch.to_string()));
    let missing = r#"{"drive_id": "rootfs", "path_on_host": "/nonexistent.img"}"#;
    let refused = vm.expect(400, "PATCH", "/drives/rootfs", Some(missing));
    assert!(refused.contains("/nonexistent.img"), "{refused}");
    let unknown = r#"{"drive_id": "data", "path_on_host": "/nonexistent.img"}"#;
    let refused = vm.expect(400, "PATCH", "/drives/data", Some(unknown));
    assert!(refused.contains("no such drive"), "{refused}");

    vm.set_state("Paused");
    assert_eq!(state(&vm), "Paused");
    let before = vm.serial();
    std::thread::sleep(Duration::from_millis(1000));
    let after = vm.serial();
    assert_eq!(before, after, "the guest printed while paused");
    vm.action("FlushMetrics");
    vm.set_state("Resumed");
    assert_eq!(state(&vm), "Running");
    vm.wait_serial("tick 5\n", Duration::from_secs(10));

    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = std::fs::read_to_string(dir.file("serial")).unwrap();
    assert_eq!(
        code,
        Some(0),
        "power-off; stderr:\n{stderr}\nserial:\n{serial}"
    );
    for needle in [
        "test virtio-rng: ok",
        "serial rootfs",
        "tick 30\n",
        "exit: poweroff",
    ] {
        assert!(serial.contains(needle), "no {needle:?} in:\n{serial}");
    }
    assert!(
        !dir.file("api.sock").exists(),
        "the socket is removed at the end"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("INFO") && log.contains("paused"),
        "log:\n{log}"
    );
    assert!(log.contains("drive rootfs now serves"), "log:\n{log}");
    // One line on FlushMetrics, one at the end, each a JSON object with the devices.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let last = &lines[1];
    assert!(
        last["entropy"]["read_bytes"].as_u64().unwrap() > 0,
        "{last}"
    );
    assert!(
        last["block_rootfs"]["requests"].as_u64().unwrap() > 0,
        "{last}"
    );
    // Exits by kind: the test guest prints on COM1 (port I/O) and reads the virtio-mmio
    // registers (MMIO).
    assert!(last["vcpu0"]["pio_exits"].as_u64().unwrap() > 0, "{last}");
    assert!(last["vcpu0"]["mmio_exits"].as_u64().unwrap() > 0, "{last}");
    assert!(last["api"]["requests"].as_u64().unwrap() >= 14, "{last}");
    assert!(last["api"]["errors"].as_u64().unwrap() >= 1, "{last}");
}

/// Sends `raw` on a new connection, closes its sending side (a half-closed client) and reads
/// the answer until the server closes.
fn raw(sock: &Path, raw: &[u8]) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(raw).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_requests_get_400_and_awkward_clients_do_not_stop_the_api() {
    // Nothing here needs KVM: the VM is only configured.
    let dir = Dir::new("malformed");
    let vm = Vmkit::start(&dir, &[]);
    #[rustfmt::skip]
    let cases: &[(&str, &str, Option<&str>, &str)] = &[
        ("PUT", "/machine-config", Some("{"), "deserializing"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpus": 2}"#), "unknown field"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": "two", "mem_size_mib": 64}"#), "invalid type"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#), "vcpu_count 0"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 300, "mem_size_mib": 64}"#), "300"),
        ("PUT", "/machine-config", Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "smt": true}"#), "smt"),
        ("PUT", "/boot-source", Some(r#"{"kernel_image_path": "/nonexistent"}"#), "/nonexistent"),
        ("PUT", "/drives/a", Some(r#"{"drive_id": "b", "path_on_host": "/x", "is_root_device": false}"#), "drive_id"),
        ("PUT", "/actions", Some(r#"{"action_type": "Reboot"}"#), "unknown variant"),
        ("PUT", "/actions", Some(r#"{"action_type": "InstanceStart"}"#), "boot source"),
        ("PUT", "/actions", Some(r#"{"action_type": "SendCtrlAltDel"}"#), "not running"),
        ("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), "not running"),
        ("PUT", "/balloon", Some("{}"), "not supported"),
        ("GET", "/nowhere", None, "Invalid request method and/or path"),
        ("DELETE", "/", None, "Invalid request method and/or path"),
        ("PUT", "/entropy", None, "no body"),
    ];
    for (method, path, body, says) in cases {
        let answer = vm.expect(400, method, path, *body);
        assert!(
            answer.contains("fault_message") && answer.contains(says),
            "{method} {path}: {answer}"
        );
    }
    // A body over Firecracker's 51,200-byte limit.
    let huge = format!(r#"{{"log_path": "{}"}}"#, "a".repeat(60_000));
    let answer = vm.expect(400, "PUT", "/logger", Some(&huge));
    assert!(answer.contains("larger than the limit"), "{answer}");

    // A slow client, a silent one and a half-closed one hold nothing up.
    let mut slow = UnixStream::connect(&vm.sock).unwrap();
    slow.write_all(b"GET /vers").unwrap();
    let _silent = UnixStream::connect(&vm.sock).unwrap();
    assert_eq!(state(&vm), "Not started");
    slow.write_all(b"ion HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    slow.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let half = raw(&vm.sock, b"GET / HTTP/1.1\r\n\r\n");
    assert!(half.contains("Not started"), "{half}");
    let garbage = raw(&vm.sock, b"\x00\x01\x02 nonsense\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");

    // Many clients at once.
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let sock = vm.sock.clone();
            std::thread::spawn(move || {
                raw(&sock, b"GET /version HTTP/1.1\r\nConnection: close\r\n\r\n")
            })
        })
        .collect();
    for c in clients {
        let answer = c.join().unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert_eq!(state(&vm), "Not started");
    // SIGTERM before the start ends vmkit, socket removed.
    vm.signal(libc::SIGTERM);
    let (code, stderr) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(5), "{stderr}");
    assert!(stderr.contains("stopped before the VM started"), "{stderr}");
    assert!(!dir.file("api.sock").exists());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_guest_that_ignores_sigterm_is_stopped_after_the_grace_period() {
    let dir = Dir::new("sigterm");
    let vm = Vmkit::start(&dir, &["--shutdown-timeout", "1"]);
    configure(&vm, &dir, "hold=ticks:600");
    vm.action("InstanceStart");
    vm.wait_serial("tick 2\n", Duration::from_secs(60));
    // The test guest has no keyboard driver: Ctrl-Alt-Del is delivered and ignored.
    vm.action("SendCtrlAltDel");
    // A pause does not keep a signal from ending the VM.
    vm.set_state("Paused");
    let sent = Instant::now();
    vm.signal(libc::SIGTERM);
    let (code, stderr) = vm.wait(Duration::from_secs(20));
    let took = sent.elapsed();
    assert_eq!(code, Some(5), "{stderr}");
    assert!(
        stderr.contains("SIGTERM: the guest did not shut down within 1 s"),
        "{stderr}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_second_signal_stops_at_once() {
    let dir = Dir::new("twice");
    let vm = Vmkit::start(&dir, &["--shutdown-timeout", "60"]);
    configure(&vm, &dir, "hold=ticks:600");
    vm.action("InstanceStart");
    vm.wait_serial("tick 1\n", Duration::from_secs(60));
    vm.signal(libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    vm.signal(libc::SIGTERM);
    let (code, stderr) = vm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(5), "{stderr}");
    assert!(stderr.contains("a second shutdown signal"), "{stderr}");
}

fn write_config(dir: &Dir, cmdline: &str) -> PathBuf {
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_args": cmdline},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "rootfs", "path_on_host": disk(dir, 4), "is_root_device": false}],
        "entropy": {},
        "metrics": {"metrics_path": dir.file("metrics")},
    });
    let path = dir.file("vm.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_config_file_boots_the_test_guest_without_the_api() {
    let dir = Dir::new("config");
    let config = write_config(&dir, "test=virtio-rng,blk-serial exit=poweroff");
    let out = common::vmkit(
        &["--config-file", config.to_str().unwrap(), "--no-api"],
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("test virtio-rng: ok") && stdout.contains("serial rootfs"),
        "{stdout}"
    );
    let metrics = std::fs::read_to_string(dir.file("metrics")).unwrap();
    assert!(metrics.contains("\"entropy\""), "{metrics}");
}

#[test]
fn a_bad_config_file_is_one_line() {
    let dir = Dir::new("badconfig");
    let path = dir.file("vm.json");
    for (text, says) in [
        ("{", "EOF while parsing"),
        (r#"{"machine-config": {"vcpu_count": 1}}"#, "mem_size_mib"),
        (r#"{"boot_source": {}}"#, "unknown field `boot_source`"),
        (
            r#"{"boot-source": {"kernel_image_path": "/nonexistent"}}"#,
            "/nonexistent",
        ),
        (
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#,
            "no boot source",
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let out = common::vmkit(
            &["--config-file", path.to_str().unwrap()],
            Duration::from_secs(10),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {err}");
        assert_eq!(err.lines().count(), 1, "{text}: {err}");
        assert!(
            err.starts_with("vmkit: --config-file") && err.contains(says),
            "{text}: {err}"
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_firecracker_python_client_from_pypi_drives_vmkit() {
    let dir = Dir::new("python");
    let vm = Vmkit::start(&dir, &[]);
    let guest = test_guest();
    let image = disk(&dir, 4);
    let mut client = common::api::firecracker_python_client();
    client
        .arg("--sock")
        .arg(&vm.sock)
        .arg("--kernel")
        .arg(&guest)
        .args(["--boot-args", "test=virtio-rng hold=ticks:30 exit=poweroff"])
        .arg("--disk")
        .arg(&image)
        .arg("--expect-serial")
        .arg(&vm.serial)
        .args(["--expect", "tick 2"]);
    common::api::expect_client_passes(client);
    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = std::fs::read_to_string(dir.file("serial")).unwrap();
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    assert!(
        serial.contains("test virtio-rng: ok") && serial.contains("tick 30\n"),
        "{serial}"
    );
}
