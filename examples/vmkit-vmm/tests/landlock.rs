//! `--landlock`: the VM runs with its devices while vmkit's file system is restricted to the
//! paths it was given, and a `PATCH /drives` to any other image is refused, by name, while one
//! to a `--landlock-allow` path is served.

mod common;

use std::time::Duration;

use common::api::{Dir, Vmkit};
use common::{test_guest, Run};

fn image(dir: &Dir, name: &str) -> String {
    let p = dir.file(name);
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    p.display().to_string()
}

/// The config file: a writable and a read-only drive, entropy, vsock.
fn config(dir: &Dir) -> std::path::PathBuf {
    let guest = test_guest();
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest,
            "boot_args": "test=virtio-rng,virtio-console,blk-serial,blk-verify,blk-ro \
                          hold=ticks:50 exit=poweroff",
        },
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
        "drives": [
            {"drive_id": "rootfs", "path_on_host": image(dir, "rootfs.img"),
             "is_root_device": false, "is_read_only": false, "io_engine": "Async"},
            {"drive_id": "data", "path_on_host": image(dir, "data.img"),
             "is_root_device": false, "is_read_only": true},
        ],
        "entropy": {},
        "vsock": {"guest_cid": 3, "uds_path": dir.file("v.sock")},
    });
    let path = dir.file("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

#[test]
#[cfg_attr(
    any(no_kvm, no_landlock),
    ignore = "needs /dev/kvm and a kernel with Landlock"
)]
fn devices_work_and_patch_drives_is_limited_to_the_allowed_paths() {
    let dir = Dir::new("landlock");
    let config = config(&dir);
    let (outside, allowed, allowed_ro) = (
        image(&dir, "outside.img"),
        image(&dir, "allowed.img"),
        image(&dir, "allowed-ro.img"),
    );
    let console = dir.file("console");
    let vm = Vmkit::start(
        &dir,
        &[
            "--config-file",
            config.to_str().unwrap(),
            "--console",
            &format!("file={}", console.display()),
            "--landlock",
            "--landlock-allow",
            &allowed,
            "--landlock-allow",
            &format!("{allowed_ro}:ro"),
        ],
    );
    vm.wait_serial("tick 1\n", Duration::from_secs(60));
    let patch = |id: &str, path: &str| {
        let body = serde_json::json!({"drive_id": id, "path_on_host": path});
        vm.curl("PATCH", &format!("/drives/{id}"), Some(&body.to_string()))
    };
    // An image vmkit was not given: the kernel refuses the open, vmkit says why.
    let (status, answer) = patch("rootfs", &outside);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains(&format!(
            "drive rootfs: {outside} is outside the paths --landlock allows"
        )),
        "{answer}"
    );
    // Allowed ones are served, read-write and read-only.
    let (status, answer) = patch("rootfs", &allowed);
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = patch("data", &allowed_ro);
    assert_eq!(status, 204, "{answer}");
    // A read-only allowance does not make a writable drive.
    let (status, answer) = patch("rootfs", &allowed_ro);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("outside the paths --landlock allows"),
        "{answer}"
    );

    let (code, stderr) = vm.wait(Duration::from_secs(60));
    let serial = std::fs::read_to_string(dir.file("serial")).unwrap_or_default();
    let context = format!("stderr:\n{stderr}\nserial:\n{serial}");
    assert_eq!(code, Some(0), "{context}");
    for ok in [
        "test virtio-rng: ok",
        "test virtio-console: ok",
        "test blk-serial: ok",
        "test blk-verify: ok",
        "test blk-ro: ok",
        "tick 50",
    ] {
        assert!(serial.contains(ok), "no {ok:?}\n{context}");
    }
    assert_eq!(
        std::fs::read_to_string(&console).unwrap_or_default(),
        "hello from the virtio console\n"
    );
    // The vsock socket (in an allowed directory) and the API's (removed by its thread, whose
    // own ruleset allows just that) are gone.
    assert!(!dir.file("v.sock").exists(), "v.sock left behind");
    assert!(!dir.file("api.sock").exists(), "api.sock left behind");
}

#[test]
#[cfg_attr(
    any(no_kvm, no_landlock),
    ignore = "needs /dev/kvm and a kernel with Landlock"
)]
fn an_allowed_path_that_is_not_there_is_one_line_at_start() {
    let run = Run::guest(&[
        "--landlock",
        "--landlock-allow",
        "/nonexistent/vmkit-images",
    ]);
    assert_eq!(run.code, Some(1), "{}", run.context());
    let line = run.stderr.trim();
    assert!(
        !line.contains('\n')
            && line.starts_with("vmkit: --landlock: cannot open /nonexistent/vmkit-images"),
        "{}",
        run.context()
    );
}

/// The API's server thread exists before the main thread restricts itself (and Landlock binds
/// only the thread that asks and those it spawns later): it restricts itself, to removing its
/// socket at the end. The test hook makes it open a file nobody allowed.
#[test]
#[cfg_attr(
    any(no_kvm, no_landlock),
    ignore = "needs /dev/kvm and a kernel with Landlock"
)]
#[cfg(feature = "seccomp-test-hook")]
fn the_api_thread_is_restricted_too_and_still_removes_its_socket() {
    let dir = Dir::new("landlock-api");
    let secret = dir.file("secret");
    std::fs::write(&secret, b"x").unwrap();
    let api = dir.file("api.sock");
    let guest = test_guest();
    for (landlock, expected) in [(true, "Permission denied"), (false, "opened")] {
        let mut args = vec![
            "--kernel",
            guest.to_str().unwrap(),
            "--api-sock",
            api.to_str().unwrap(),
            "--landlock-test-api-open",
            secret.to_str().unwrap(),
        ];
        if landlock {
            args.push("--landlock");
        }
        let out = common::vmkit(&args, Duration::from_secs(120));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let said = format!(
            "landlock test hook: the API thread opens {}: {expected}",
            secret.display()
        );
        assert!(stderr.contains(&said), "--landlock {landlock}: {stderr}");
        assert!(
            !api.exists(),
            "api.sock left behind (--landlock {landlock})"
        );
    }
}
