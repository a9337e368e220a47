//! The test guest's `test=soak` (the workload the snapshot tests take a snapshot in the middle
//! of): run unbroken, two vCPUs' LAPIC timers, rng reads and blk writes in flight, round after
//! round, every line in order, and the last round's pattern in the host's image; and paused for
//! longer than any of the guest's timeouts in the middle, which it must not mistake for a dead
//! device or timer.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::api::{Dir, Vmkit};
use common::{test_guest, Run};

/// A sparse image in the temp dir, removed on drop.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The guest's pattern: round R writes sector `(R % 64) * 128 + 8` first, its word 0 the
/// sector number and word 1 the tag `"soak" << 32 | R` (see the guest's `cases/soak.rs`).
fn first_sector_of_round(round: u64) -> u64 {
    (round % 64) * 128 + 8
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn soak_runs_every_round_on_both_vcpus() {
    let img = Image(std::env::temp_dir().join(format!("vmkit-soak-{}.img", std::process::id())));
    std::fs::File::create(&img.0)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = format!("path={}", img.0.display());
    let run = Run::guest(&[
        "--cpus",
        "2",
        "--rng",
        "--disk",
        &disk,
        "--cmdline",
        "test=soak soak_rounds=5",
    ])
    .ok();
    run.says(&["soak: 5 rounds on 2 cpus"]);
    // Every round, in order, then the summary and the pass line.
    let mut wanted: Vec<String> = (1..=5).map(|i| format!("soak: round {i} ok")).collect();
    wanted.push("soak: 5 rounds ok".into());
    wanted.push("test soak: ok".into());
    let mut lines = run.stdout.lines().map(str::trim_end);
    for w in &wanted {
        assert!(
            lines.any(|l| l == w),
            "no {w:?} in order\n{}",
            run.context()
        );
    }
    assert!(!run.stdout.contains("FAIL"), "{}", run.context());
    // Both CPUs ticked in every round (the guest checks it too; this reads its lines).
    let ticks: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("soak: ticks ["))
        .collect();
    assert_eq!(ticks.len(), 5, "{}", run.context());
    for l in ticks {
        let counts = l["soak: ticks [".len()..].split(']').next().unwrap();
        let counts: Vec<u64> = counts.split(", ").map(|n| n.parse().unwrap()).collect();
        assert_eq!(counts.len(), 2, "{l}");
        assert!(counts.iter().all(|&n| n > 0), "{l}");
    }
    // The last round's pattern reached the host's image.
    let data = std::fs::read(&img.0).unwrap();
    let at = usize::try_from(first_sector_of_round(5) * 512).unwrap();
    let word = |i: usize| u64::from_le_bytes(data[at + 8 * i..at + 8 * i + 8].try_into().unwrap());
    assert_eq!(word(0), first_sector_of_round(5));
    assert_eq!(word(1), 0x736f_616b_0000_0005);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn soak_survives_a_pause_longer_than_its_timeouts() {
    let dir = Dir::new("soak-pause");
    let img = dir.file("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let guest = test_guest();
    let disk = format!("path={}", img.display());
    let vm = Vmkit::start(
        &dir,
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cpus",
            "2",
            "--rng",
            "--disk",
            &disk,
            "--cmdline",
            "test=soak soak_rounds=8",
        ],
    );
    vm.wait_serial("soak: round 2 ok", Duration::from_secs(60));
    vm.set_state("Paused");
    // Longer than a round's 2 s bound on its timer ticks: the guest's TSC runs on while
    // paused, and the guest must count only the time it ran.
    std::thread::sleep(Duration::from_secs(3));
    vm.set_state("Resumed");
    vm.wait_serial("test soak: ", Duration::from_secs(60));
    let serial = vm.serial();
    let (code, stderr) = vm.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}\n{serial}");
    assert!(serial.contains("soak: 8 rounds ok"), "{serial}");
    assert!(serial.contains("test soak: ok"), "{serial}");
}
