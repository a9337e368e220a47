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

/// Every malformed `key=value` option: one line on stderr naming the fault, exit status 2
/// (a usage error), before anything is opened or created.
#[test]
fn malformed_key_value_options_are_usage_errors() {
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str)] = &[
        // (flag, value, what the line must say)
        ("--disk", "path=a,readonly=on,readonly=off", "readonly= is given twice"),
        ("--disk", "path=a,path=b", "path= is given twice"),
        ("--disk", "path=a,direct=on,direct=on", "direct= is given twice"),
        ("--disk", "path=a,engine=sync,engine=io_uring", "engine= is given twice"),
        ("--disk", "path=a,serial=x,serial=y", "serial= is given twice"),
        ("--disk", "path=a,queues=1,queues=2", "queues= is given twice"),
        ("--disk", "path=a,poll_us=1,poll_us=2", "poll_us= is given twice"),
        ("--disk", "path=a,colour=red", "unknown or empty disk option 'colour=red'"),
        ("--disk", "path=", "path= needs a value"),
        ("--disk", "path=a,readonly=", "readonly= needs a value"),
        ("--disk", "path=a,", "'' is not key=value"),
        ("--disk", ",path=a", "'' is not key=value"),
        ("--disk", "path=a,,,", "'' is not key=value"),
        ("--disk", "path=a,=on", "'' is not an option name"),
        ("--disk", ",,path=a", "',path' is not an option name"),
        ("--disk", "path=a,readonly", "'readonly' is not key=value"),
        ("--net", "tap=t0,tap=t1", "tap= is given twice"),
        ("--net", "tap=t0,mac=52:54:00:12:34:56,mac=52:54:00:12:34:57", "mac= is given twice"),
        ("--net", "tap=t0,mtu=1500,mtu=9000", "mtu= is given twice"),
        ("--net", "tap=t0,queues=1,queues=1", "queues= is given twice"),
        ("--net", "tap=t0,poll_us=0,poll_us=0", "poll_us= is given twice"),
        ("--net", "fd=3,fd=4", "fd= is given twice"),
        ("--net", "tap=t0,speed=10G", "unknown or empty net option 'speed=10G'"),
        ("--net", "tap=", "tap= needs a value"),
        ("--vsock", "cid=3,socket=a,cid=4", "cid= is given twice"),
        ("--vsock", "cid=3,socket=a,socket=b", "socket= is given twice"),
        ("--vsock", "cid=3,socket=a,poll_us=1,poll_us=1", "poll_us= is given twice"),
        ("--vsock", "cid=3,socket=a,mtu=5", "unknown or empty vsock option 'mtu=5'"),
        ("--vsock", "cid=3,socket=", "socket= needs a value"),
        ("--serial", "file=a,file=b", "file= is given twice"),
        ("--serial", "file=a,max_size=1M,max_size=2M", "max_size= is given twice"),
        ("--serial", "file=a,append=on", "unknown output option 'append=on'"),
        ("--serial", "file=", "file= needs a value"),
        ("--serial", "file=a,", "'' is not key=value"),
        ("--serial", "file=a,max_size=lots", "not a size"),
        ("--serial", "tty", "is not one of stdio, file=PATH, off"),
        ("--console", "file=a,file=b", "file= is given twice"),
        ("--console", "file=a,max_size=1K,max_size=1K", "max_size= is given twice"),
        ("--console", "file=a,mode=0600", "unknown output option 'mode=0600'"),
        ("--console", "file=", "file= needs a value"),
        ("--console", "tty", "is not one of stdio, file=PATH, pty, off"),
    ];
    let dir = std::env::temp_dir().join(format!("vmkit-cli-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (flag, value, says) in cases {
        // Run where a relative path would be created, to see that nothing is.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmkit"))
            .args(["--kernel", "k", flag, value])
            .current_dir(&dir)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        let what = format!("{flag} {value}: {err:?}");
        assert_eq!(out.status.code(), Some(2), "{what}");
        assert_eq!(err.lines().count(), 1, "{what}");
        assert!(err.starts_with("vmkit: ") && err.contains(flag), "{what}");
        assert!(err.contains(says), "{what} does not say {says:?}");
    }
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "a file was created"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A key given twice in a config file is refused (serde_json alone keeps the last one in a
/// free-form object such as a rate limiter).
#[test]
fn config_file_with_a_key_given_twice() {
    let f = std::env::temp_dir().join(format!("vmkit-cli-twice-{}.json", std::process::id()));
    for (json, key) in [
        (
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": false,
                            "is_read_only": true, "is_read_only": false}]}"#,
            "is_read_only",
        ),
        (
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "d", "path_on_host": "/d", "is_root_device": false,
                            "rate_limiter": {"ops": {"size": 1}, "ops": {"size": 2}}}]}"#,
            "ops",
        ),
    ] {
        std::fs::write(&f, json).unwrap();
        fails_with(
            &["--config-file", f.to_str().unwrap(), "--no-api"],
            &format!("duplicate field `{key}`"),
        );
    }
    let _ = std::fs::remove_file(&f);
}

#[test]
fn restore_flags_that_do_not_fit_are_usage_errors() {
    for (args, says) in [
        (
            &["--restore", "/s", "--kernel", "k"][..],
            "cannot be used with",
        ),
        (
            &["--restore", "/s", "--disk", "path=d"],
            "cannot be used with",
        ),
        (&["--restore", "/s", "--cpus", "2"], "cannot be used with"),
        (&["--restore-drive", "root=/d"], "--restore <DIR>"),
        (&["--restore", "/s", "--restore-paused"], "--api-sock"),
        (
            &[
                "--restore",
                "/s",
                "--restore-net",
                "e=t1",
                "--restore-net",
                "e=t2",
            ],
            "--restore-net e= is given twice",
        ),
        (
            &["--restore", "/s", "--restore-net", "e=t/1"],
            "not an interface name",
        ),
        (
            &["--restore", "/s", "--restore-drive", "root"],
            "is not ID=PATH",
        ),
    ] {
        fails_with(args, says);
        let out = vmkit(args, Duration::from_secs(30));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
