//! Snapshots of the PVH test guest: taken mid-test (entropy read, disk requests in
//! flight, both vCPUs' timers running), restored in a new process through the API and
//! with `--restore`, diff snapshots on top of a full one, and damaged state files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{Dir, Vmkit};
use common::test_guest;

/// Rounds of the guest's `soak` test: long enough to snapshot between round 2 and the end.
const ROUNDS: u32 = 8;

const TIMEOUT: Duration = Duration::from_secs(60);

fn disk(dir: &Dir, name: &str) -> PathBuf {
    let p = dir.file(name);
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

/// The test guest running `test=soak` on 2 vCPUs with a disk and entropy, under the API.
fn soak(dir: &Dir, extra: &[&str]) -> Vmkit {
    let guest = test_guest();
    let disk = disk(dir, "disk.img");
    let cmdline = format!("test=soak soak_rounds={ROUNDS} exit=poweroff");
    let mut args = vec![
        "--kernel".to_string(),
        guest.display().to_string(),
        "--cpus".into(),
        "2".into(),
        "--memory".into(),
        "128M".into(),
        "--rng".into(),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--cmdline".into(),
        cmdline,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Vmkit::start(dir, &args)
}

/// `PUT /snapshot/create` of `kind` into `state` and `memory`.
fn create(vm: &Vmkit, state: &Path, memory: &Path, kind: &str) {
    let body = serde_json::json!({
        "snapshot_path": state, "mem_file_path": memory, "snapshot_type": kind,
    });
    vm.expect(204, "PUT", "/snapshot/create", Some(&body.to_string()));
}

/// The soak lines from round `from` on: what a run prints after that point.
fn soak_lines(serial: &str, from: u32) -> Vec<String> {
    let marker = format!("soak: round {from} ok");
    let start = serial.find(&marker).map_or(0, |i| i + marker.len());
    serial[start..]
        .lines()
        .filter(|l| l.starts_with("soak:") || l.starts_with("test "))
        .map(str::to_string)
        .collect()
}

/// A new vmkit, under the API, loading `state` (and `memory`), with the disk `image`.
fn load(dir: &Dir, state: &Path, memory: &Path, image: &Path) -> Vmkit {
    let vm = Vmkit::start(dir, &[]);
    let body = serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": memory},
        "resume_vm": true,
        "drive_overrides": [{"drive_id": "block0", "path_on_host": image}],
    });
    vm.expect(204, "PUT", "/snapshot/load", Some(&body.to_string()));
    vm
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_test_guest_snapshotted_mid_test_passes_in_a_new_process() {
    // The unbroken run, for what the restored one must print.
    let whole = Dir::new("snap-whole");
    let vm = soak(&whole, &[]);
    let (code, stderr) = vm.wait(TIMEOUT);
    let unbroken = std::fs::read_to_string(whole.file("serial")).unwrap();
    assert_eq!(code, Some(0), "{stderr}\n{unbroken}");
    assert!(unbroken.contains(&format!("soak: {ROUNDS} rounds ok")), "{unbroken}");

    let dir = Dir::new("snap-mid");
    let vm = soak(&dir, &[]);
    vm.wait_serial("soak: round 2 ok", TIMEOUT);
    vm.set_state("Paused");
    let (state, memory) = (dir.file("vmstate"), dir.file("memory"));
    create(&vm, &state, &memory, "Full");
    // The clone gets the disk as it was at the snapshot; the original is stopped there.
    let image = dir.file("clone.img");
    std::fs::copy(dir.file("disk.img"), &image).unwrap();
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(TIMEOUT);

    let again = Dir::new("snap-restored");
    let restored = load(&again, &state, &memory, &image);
    let (code, stderr) = restored.wait(TIMEOUT);
    let serial = restored_serial(&again);
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    assert!(!serial.contains("soak: round 1 ok"), "the restored VM booted again:\n{serial}");
    let after = soak_lines(&serial, 2);
    assert_eq!(after, soak_lines(&unbroken, 2), "restored:\n{serial}\nunbroken:\n{unbroken}");
    assert!(serial.contains(&format!("soak: {ROUNDS} rounds ok")), "{serial}");
}

fn restored_serial(dir: &Dir) -> String {
    std::fs::read_to_string(dir.file("serial")).unwrap_or_default()
}
