//! Every command-line failure is one clear line on stderr and a non-zero status.

mod common;

use std::time::Duration;

use common::vmkit;

fn fails_with(args: &[&str], needle: &str) {
    let out = vmkit(args, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{args:?} succeeded");
    assert!(
        out.status.code().is_some(),
        "{args:?} died of a signal: {err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("vmkit: "), "{err}");
    assert!(
        lines[0].contains(needle),
        "{args:?}: {err:?} does not say {needle:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

#[test]
fn missing_kernel_file() {
    fails_with(
        &["--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel /nonexistent/vmlinux",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kernel_that_is_not_a_kernel() {
    let f = std::env::temp_dir().join(format!("vmkit-not-a-kernel-{}", std::process::id()));
    std::fs::write(&f, vec![0x5au8; 8192]).unwrap();
    fails_with(&["--kernel", f.to_str().unwrap()], "not a kernel");
    let _ = std::fs::remove_file(&f);
}

#[test]
fn unreadable_initramfs() {
    let guest = common::test_guest();
    fails_with(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--initramfs",
            "/nonexistent/initrd",
        ],
        "cannot open initramfs /nonexistent/initrd",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memory_too_small_for_the_image() {
    let guest = common::test_guest();
    // 1 MiB holds no kernel loaded at 1 MiB.
    fails_with(
        &["--kernel", guest.to_str().unwrap(), "--memory", "1M"],
        "memory",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memory_larger_than_the_host() {
    let guest = common::test_guest();
    fails_with(
        &["--kernel", guest.to_str().unwrap(), "--memory", "900G"],
        "more than this host's",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn zero_cpus() {
    let guest = common::test_guest();
    fails_with(
        &["--kernel", guest.to_str().unwrap(), "--cpus", "0"],
        "at least 1 vCPU",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn too_many_cpus() {
    let guest = common::test_guest();
    fails_with(
        &["--kernel", guest.to_str().unwrap(), "--cpus", "100000"],
        "allows at most",
    );
}

#[test]
fn malformed_sizes() {
    for bad in ["lots", "12Q", "1.5G", ""] {
        fails_with(&["--kernel", "k", "--memory", bad], "--memory");
    }
}

#[test]
fn malformed_serial() {
    fails_with(&["--kernel", "k", "--serial", "tty"], "--serial");
}

#[test]
fn missing_kernel_flag() {
    fails_with(&[], "--kernel");
}

#[test]
#[cfg_attr(
    any(no_kvm, not_root, open_kvm),
    ignore = "needs root and a /dev/kvm others cannot open"
)]
fn no_permission_on_dev_kvm() {
    use std::os::unix::fs::PermissionsExt;
    let guest = common::test_guest();
    let kernel = std::env::temp_dir().join(format!("vmkit-perm-guest-{}", std::process::id()));
    std::fs::copy(&guest, &kernel).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vmkit"))
        .args(["--kernel", kernel.to_str().unwrap()])
        .output()
        .expect("setpriv (util-linux)");
    let _ = std::fs::remove_file(&kernel);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot open /dev/kvm") && err.contains("ermission"),
        "{err}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn hugepages_boot_or_say_why_not() {
    let guest = common::test_guest();
    let pool: u64 = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let args = [
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "64M",
        "--hugepages",
        "--cmdline",
        "exit=poweroff",
    ];
    if pool >= 32 {
        let out = vmkit(&args, Duration::from_secs(60));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        fails_with(&args, "nr_hugepages");
    }
}

#[test]
fn unknown_cpu_template() {
    fails_with(
        &["--kernel", "k", "--cpu-template", "t2"],
        "unknown CPU template 't2' (known: host, pvm)",
    );
}

#[test]
fn malformed_net_options() {
    fails_with(
        &["--kernel", "k", "--net", "tap=t0,mac=52:54:00:12:34"],
        "not a MAC address",
    );
    fails_with(
        &["--kernel", "k", "--net", "tap=t0,mtu=1500,mtu=9000"],
        "mtu= is given twice",
    );
    fails_with(&["--kernel", "k", "--net", "fd=2"], "not 0, 1 or 2");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn missing_tap() {
    let guest = common::test_guest();
    fails_with(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--net",
            "tap=vmkit-none0",
        ],
        "TAP interface vmkit-none0 does not exist",
    );
}

#[test]
fn net_fd_that_is_not_open() {
    // Far above anything the test process has open.
    fails_with(
        &["--kernel", "k", "--net", "fd=900"],
        "--net fd=900: not an open file descriptor",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn net_fd_that_is_not_a_tap() {
    use std::os::fd::AsRawFd;
    let guest = common::test_guest();
    let null = std::fs::File::open("/dev/null").unwrap();
    let fd = null.as_raw_fd();
    // Inherited by vmkit: clear close-on-exec (the test process execs nothing else meanwhile
    // that matters; the fd is closed when the test ends).
    // SAFETY: F_SETFD on an fd this test owns, with an integer argument.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, 0);
    fails_with(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--net",
            &format!("fd={fd}"),
        ],
        &format!("--net fd={fd}: TAP fd {fd}: TUNGETIFF failed"),
    );
}

#[test]
fn malformed_vsock_options() {
    for cid in ["0", "1", "2", "4294967295"] {
        fails_with(
            &[
                "--kernel",
                "k",
                "--vsock",
                &format!("cid={cid},socket=/tmp/v"),
            ],
            "reserved",
        );
    }
    fails_with(
        &["--kernel", "k", "--vsock", "cid=3"],
        "socket=PATH is required",
    );
    fails_with(
        &["--kernel", "k", "--vsock", "cid=3,socket=a,cid=4"],
        "cid= is given twice",
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn unusable_vsock_socket_paths() {
    let guest = common::test_guest();
    let dir = std::env::temp_dir().join(format!("vmkit-cli-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"an operator's file").unwrap();
    fails_with(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--vsock",
            &format!("cid=3,socket={}", taken.display()),
        ],
        "already exists",
    );
    // What was there is left alone.
    assert_eq!(std::fs::read(&taken).unwrap(), b"an operator's file");
    fails_with(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--vsock",
            &format!("cid=3,socket={}/no/such/dir/v.sock", dir.display()),
        ],
        "--vsock: cannot listen on",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
