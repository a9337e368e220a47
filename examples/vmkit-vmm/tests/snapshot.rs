//! Snapshots of the PVH test guest: taken mid-test (entropy read, disk requests in
//! flight, both vCPUs' timers running), restored in a new process through the API and
//! with `--restore`, diff snapshots on top of a full one, and damaged state files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::api::{Dir, Vmkit};
use common::test_guest;
use vmkit_snapshot::vm::{TransportStates, VmState};

/// Rounds of the guest's `soak` test: long enough to snapshot between round 2 and the end.
const ROUNDS: u32 = 8;

const TIMEOUT: Duration = Duration::from_secs(60);

/// One test at a time: each runs two 2-vCPU guests whose rounds wait on timer ticks, and a
/// host short of CPU stretches them.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn disk(dir: &Dir, name: &str) -> PathBuf {
    let p = dir.file(name);
    std::fs::File::create(&p).unwrap().set_len(8 << 20).unwrap();
    p
}

/// The test guest running `test=soak` on 2 vCPUs with a disk and entropy, under the API.
fn soak(dir: &Dir, extra: &[&str]) -> Vmkit {
    soak_with(dir, "", extra)
}

/// As [`soak`], with `disk_options` (`,engine=io_uring`…) after the disk's path.
fn soak_with(dir: &Dir, disk_options: &str, extra: &[&str]) -> Vmkit {
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
        format!("path={}{disk_options}", disk.display()),
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

/// The soak results from round `from` on: what a run prints after that point, but the
/// timer tick counts (which vary from run to run).
fn soak_lines(serial: &str, from: u32) -> Vec<String> {
    let marker = format!("soak: round {from} ok");
    let start = serial.find(&marker).map_or(0, |i| i + marker.len());
    serial[start..]
        .lines()
        .filter(|l| l.starts_with("soak:") || l.starts_with("test "))
        .filter(|l| !l.starts_with("soak: ticks"))
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

/// The soak guest on `transport`, run whole, then snapshotted after round 2 and restored in
/// a new process: the restored run prints what the whole one printed after round 2.
fn mid_test(transport: &str) {
    let extra = ["--transport", transport];
    // The unbroken run, for what the restored one must print.
    let whole = Dir::new(&format!("snap-whole-{transport}"));
    let vm = soak(&whole, &extra);
    let (code, stderr) = vm.wait(TIMEOUT);
    let unbroken = std::fs::read_to_string(whole.file("serial")).unwrap();
    assert_eq!(code, Some(0), "{stderr}\n{unbroken}");
    assert!(
        unbroken.contains(&format!("soak: {ROUNDS} rounds ok")),
        "{unbroken}"
    );

    let dir = Dir::new(&format!("snap-mid-{transport}"));
    let vm = soak(&dir, &extra);
    vm.wait_serial("soak: round 2 ok", TIMEOUT);
    vm.set_state("Paused");
    let (state, memory) = (dir.file("vmstate"), dir.file("memory"));
    create(&vm, &state, &memory, "Full");
    // The clone gets the disk as it was at the snapshot; the original is stopped there.
    let image = dir.file("clone.img");
    std::fs::copy(dir.file("disk.img"), &image).unwrap();
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(TIMEOUT);

    let again = Dir::new(&format!("snap-restored-{transport}"));
    let restored = load(&again, &state, &memory, &image);
    let (code, stderr) = restored.wait(TIMEOUT);
    let serial = restored_serial(&again);
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    assert!(
        !serial.contains("soak: round 1 ok"),
        "the restored VM booted again:\n{serial}"
    );
    let after = soak_lines(&serial, 2);
    assert_eq!(
        after,
        soak_lines(&unbroken, 2),
        "restored:\n{serial}\nunbroken:\n{unbroken}"
    );
    assert!(
        serial.contains(&format!("soak: {ROUNDS} rounds ok")),
        "{serial}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_test_guest_snapshotted_mid_test_passes_in_a_new_process() {
    let _one = one_at_a_time();
    mid_test("mmio");
}

/// The same on virtio-pci: configuration space, BARs and MSI-X vectors come back.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_test_guest_on_virtio_pci_snapshotted_mid_test_passes_in_a_new_process() {
    let _one = one_at_a_time();
    mid_test("pci");
}

fn restored_serial(dir: &Dir) -> String {
    std::fs::read_to_string(dir.file("serial")).unwrap_or_default()
}

/// `vmkit --restore DIR` with the disk `image`, the serial port to `DIR`'s `serial`.
fn restore_cli(dir: &Dir, snapshot: &Dir, image: &Path, extra: &[&str]) -> Vmkit {
    let snapshot_dir = snapshot.file("");
    let drive = format!("block0={}", image.display());
    let mut args = vec![
        "--restore",
        snapshot_dir.to_str().unwrap(),
        "--restore-drive",
        &drive,
    ];
    args.extend_from_slice(extra);
    Vmkit::start(dir, &args)
}

/// `vmkit --restore DIR` expected to fail before the guest runs: its status and stderr.
fn restore_fails(snapshot: &Dir, image: &Path) -> (Option<i32>, String) {
    let snapshot_dir = snapshot.file("");
    let drive = format!("block0={}", image.display());
    let out = common::vmkit(
        &[
            "--restore",
            snapshot_dir.to_str().unwrap(),
            "--restore-drive",
            &drive,
            "--serial",
            "off",
        ],
        TIMEOUT,
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Allocated bytes of `path` (a sparse file's data).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_diff_snapshot_holds_the_dirtied_pages_and_restores_on_the_full_one() {
    let _one = one_at_a_time();
    let dir = Dir::new("snap-diff");
    // io_uring: the disk's reads land in guest memory from the kernel, marked dirty by the
    // device (KVM's dirty log does not see them).
    let vm = soak_with(&dir, ",engine=io_uring", &["--track-dirty-pages"]);
    vm.wait_serial("soak: round 1 ok", TIMEOUT);
    vm.set_state("Paused");
    let full = Dir::new("snap-diff-full");
    create(&vm, &full.file("vmstate"), &full.file("memory"), "Full");
    vm.set_state("Resumed");
    vm.wait_serial("soak: round 3 ok", TIMEOUT);
    vm.set_state("Paused");
    let diff = Dir::new("snap-diff-diff");
    create(&vm, &diff.file("vmstate"), &diff.file("memory"), "Diff");
    let image = dir.file("clone.img");
    std::fs::copy(dir.file("disk.img"), &image).unwrap();
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(TIMEOUT);

    // Two rounds dirty the guest's stack, heap and rings: a few pages, far fewer than the
    // full snapshot's, and within the RAM.
    let (full_bytes, diff_bytes) = (
        allocated(&full.file("memory")),
        allocated(&diff.file("memory")),
    );
    eprintln!("full snapshot: {full_bytes} bytes of memory, diff: {diff_bytes}");
    assert!(
        diff_bytes > 0 && diff_bytes < full_bytes / 2,
        "{diff_bytes} vs {full_bytes}"
    );

    // The diff names the full one's memory as its base: restored on it, the guest goes on
    // from round 3.
    let again = Dir::new("snap-diff-restored");
    let restored = restore_cli(&again, &diff, &image, &[]);
    let (code, stderr) = restored.wait(TIMEOUT);
    let serial = restored_serial(&again);
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    assert!(!serial.contains("soak: round 3 ok"), "{serial}");
    assert!(serial.contains("soak: round 4 ok"), "{serial}");
    assert!(
        serial.contains(&format!("soak: {ROUNDS} rounds ok")),
        "{serial}"
    );

    // Without the base layer, the diff alone is refused.
    std::fs::remove_file(full.file("memory")).unwrap();
    let (code, stderr) = restore_fails(&diff, &image);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("memory") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// A snapshot of the soak guest after round 1, its disk image, and the state decoded.
struct Taken {
    dir: Dir,
    image: PathBuf,
    bytes: Vec<u8>,
}

fn take(name: &str) -> Taken {
    let dir = Dir::new(name);
    let vm = soak(&dir, &[]);
    vm.wait_serial("soak: round 1 ok", TIMEOUT);
    vm.set_state("Paused");
    create(&vm, &dir.file("vmstate"), &dir.file("memory"), "Full");
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(TIMEOUT);
    let bytes = std::fs::read(dir.file("vmstate")).unwrap();
    let image = dir.file("disk.img");
    Taken { dir, image, bytes }
}

/// `vmkit --restore` of a copy of `taken` whose state file is `state`: it must fail with
/// status 1 and one line on stderr naming `what`.
fn refused(taken: &Taken, case: &str, state: &[u8], what: &str) {
    let snap = Dir::new(&format!("snap-bad-{case}"));
    std::fs::write(snap.file("vmstate"), state).unwrap();
    std::os::unix::fs::symlink(taken.dir.file("memory"), snap.file("memory")).unwrap();
    let (code, stderr) = restore_fails(&snap, &taken.image);
    eprintln!("{case}: {}", stderr.trim_end());
    assert_eq!(code, Some(1), "{case}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{case}: not one line:\n{stderr}");
    assert!(
        stderr.starts_with("vmkit: cannot restore the snapshot:") && stderr.contains(what),
        "{case}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
}

/// The state with `change` made to it, re-encoded (a valid checksum over a hostile value).
fn changed(taken: &Taken, change: impl FnOnce(&mut VmState)) -> Vec<u8> {
    let (header, mut state): (_, VmState) = vmkit_snapshot::decode_state(&taken.bytes).unwrap();
    change(&mut state);
    vmkit_snapshot::encode_state(header.kind, &state).unwrap()
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn damaged_and_hostile_state_files_are_one_line_errors() {
    let _one = one_at_a_time();
    let t = take("snap-bad");
    let b = &t.bytes;
    refused(&t, "empty", &[], "truncated");
    refused(&t, "truncated", &b[..b.len() / 2], "");
    let mut flipped = b.clone();
    flipped[b.len() / 2] ^= 0x10;
    refused(&t, "flipped", &flipped, "checksum");
    let mut magic = b.clone();
    magic[0] = b'X';
    refused(&t, "magic", &magic, "magic");
    let mut version = b.clone();
    version[8] = 99;
    refused(&t, "version", &version, "version 99");
    refused(&t, "no-vcpus", &changed(&t, |s| s.vcpus.clear()), "vCPUs");
    refused(
        &t,
        "memory-size",
        &changed(&t, |s| s.memory.size = 4097),
        "memory size",
    );
    let far = |s: &mut VmState| {
        s.memory.layers.push(vmkit_snapshot::vm::MemoryLayer {
            path: "/nonexistent".into(),
            ranges: Some(vec![vmkit_memory_range(u64::MAX - 4095, 4096)]),
        })
    };
    refused(&t, "diff-range", &changed(&t, far), "range");
    let queue = |s: &mut VmState| {
        if let TransportStates::Mmio(t) = &mut s.transports {
            t[0].common.queues[0].queue.size = 3;
        }
    };
    refused(&t, "queue-size", &changed(&t, queue), "queue 0");
    let vendor = |s: &mut VmState| {
        for v in &mut s.vcpus {
            if let Some(leaf0) = v.cpuid.iter_mut().find(|e| e.function == 0) {
                leaf0.ebx = u32::from_le_bytes(*b"Othe");
            }
        }
    };
    refused(&t, "vendor", &changed(&t, vendor), "CPU");
    let too_many = |s: &mut VmState| s.vcpus = vec![s.vcpus[0].clone(); 300];
    refused(&t, "vcpu-count", &changed(&t, too_many), "vCPUs");
    // A FIFO where the state file should be: refused at once, not waited on.
    let fifo = Dir::new("snap-bad-fifo");
    let c = std::ffi::CString::new(fifo.file("vmstate").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let (code, stderr) = restore_fails(&fifo, &t.image);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not a regular file"), "{stderr}");
    // The memory file gone: named.
    let snap = Dir::new("snap-bad-nomem");
    std::fs::write(snap.file("vmstate"), b).unwrap();
    let (code, stderr) = restore_fails(&snap, &t.image);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("memory") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

fn vmkit_memory_range(offset: u64, len: u64) -> vmkit_snapshot::vm::FileRange {
    vmkit_snapshot::vm::FileRange { offset, len }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_api_refuses_snapshots_out_of_order_and_a_load_can_wait_paused() {
    let _one = one_at_a_time();
    let dir = Dir::new("snap-order");
    let vm = soak(&dir, &[]);
    vm.wait_serial("soak: round 1 ok", TIMEOUT);
    let (state, memory) = (dir.file("vmstate"), dir.file("memory"));
    let body = serde_json::json!({"snapshot_path": state, "mem_file_path": memory});
    // Running: refused, nothing written.
    let e = vm.expect(400, "PUT", "/snapshot/create", Some(&body.to_string()));
    assert!(e.contains("pause"), "{e}");
    assert!(!state.exists() && !memory.exists());
    vm.set_state("Paused");
    // A diff without dirty page tracking: refused.
    let diff = serde_json::json!({
        "snapshot_path": state, "mem_file_path": memory, "snapshot_type": "Diff",
    });
    let e = vm.expect(400, "PUT", "/snapshot/create", Some(&diff.to_string()));
    assert!(e.contains("track_dirty_pages"), "{e}");
    vm.expect(204, "PUT", "/snapshot/create", Some(&body.to_string()));
    // A load into a running VM: refused.
    let load = serde_json::json!({"snapshot_path": state, "mem_file_path": memory});
    vm.expect(400, "PUT", "/snapshot/load", Some(&load.to_string()));
    let image = dir.file("clone.img");
    std::fs::copy(dir.file("disk.img"), &image).unwrap();
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(TIMEOUT);

    // A load after configuring: refused.
    let other = Dir::new("snap-order-configured");
    let configured = Vmkit::start(&other, &[]);
    configured.expect(204, "PUT", "/entropy", Some("{}"));
    let e = configured.expect(400, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert!(e.contains("after configuring"), "{e}");
    configured.signal(libc::SIGKILL);
    let _ = configured.wait(TIMEOUT);

    // resume_vm false: the VM waits, paused, and goes on when resumed.
    let again = Dir::new("snap-order-paused");
    let vm = Vmkit::start(&again, &[]);
    let load = serde_json::json!({
        "snapshot_path": state, "mem_file_path": memory, "resume_vm": false,
        "drive_overrides": [{"drive_id": "block0", "path_on_host": image}],
    });
    vm.expect(204, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(common::api::state(&vm), "Paused");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !restored_serial(&again).contains("soak: round"),
        "ran while paused"
    );
    vm.set_state("Resumed");
    let (code, stderr) = vm.wait(TIMEOUT);
    let serial = restored_serial(&again);
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    assert!(
        serial.contains(&format!("soak: {ROUNDS} rounds ok")),
        "{serial}"
    );
}

/// `path` relative to this process's current directory.
fn relative(path: &Path) -> PathBuf {
    let cwd = std::env::current_dir().unwrap();
    let up = cwd.components().count() - 1;
    let mut rel = PathBuf::new();
    for _ in 0..up {
        rel.push("..");
    }
    rel.join(path.strip_prefix("/").unwrap())
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn snapshot_paths_are_checked_and_recorded_absolute() {
    let _one = one_at_a_time();
    let dir = Dir::new("snap-paths");
    let vm = soak(&dir, &["--track-dirty-pages"]);
    vm.wait_serial("soak: round 1 ok", TIMEOUT);
    vm.set_state("Paused");
    // Relative paths (the test's directory is vmkit's): taken against vmkit's directory,
    // recorded absolute; under the default seccomp filter (no getcwd at run time).
    let (state, memory) = (dir.file("vmstate"), dir.file("memory"));
    let body = serde_json::json!({
        "snapshot_path": relative(&state), "mem_file_path": relative(&memory),
    });
    vm.expect(204, "PUT", "/snapshot/create", Some(&body.to_string()));
    let (_, saved): (_, VmState) =
        vmkit_snapshot::decode_state(&std::fs::read(&state).unwrap()).unwrap();
    let recorded = &saved.memory.layers[0].path;
    assert!(recorded.is_absolute(), "{recorded:?}");
    assert_eq!(std::fs::canonicalize(recorded).unwrap(), memory);
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.file(""))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")),
        "{names:?}"
    );
    // A diff over the memory file it builds on, or into the state file: refused, and the
    // full snapshot is intact.
    use std::os::unix::fs::MetadataExt;
    let inode = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let (before, before_inode) = (std::fs::read(&memory).unwrap(), inode(&memory));
    for (s, m, says) in [
        (dir.file("diff"), memory.clone(), "builds on"),
        (dir.file("same"), dir.file("same"), "same file"),
    ] {
        let diff = serde_json::json!({
            "snapshot_path": s, "mem_file_path": m, "snapshot_type": "Diff",
        });
        let e = vm.expect(400, "PUT", "/snapshot/create", Some(&diff.to_string()));
        assert!(e.contains(says), "{e}");
    }
    assert_eq!(std::fs::read(&memory).unwrap(), before);
    assert_eq!(inode(&memory), before_inode);
    // A state file that cannot be written: nothing replaces the earlier snapshot's memory.
    let nowhere = serde_json::json!({
        "snapshot_path": dir.file("missing/vmstate"), "mem_file_path": memory,
    });
    vm.expect(400, "PUT", "/snapshot/create", Some(&nowhere.to_string()));
    assert_eq!(inode(&memory), before_inode, "the memory file was replaced");
    vm.signal(libc::SIGKILL);
    let _ = vm.wait(TIMEOUT);
}
