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
//! Behind the `linux-guest-tests` feature (`scripts/test-all.sh` turns it on): the first run on
//! a machine builds the kernels, about 5 minutes on 2 cores.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{repo_root, vmkit};

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
        // A pattern no zero-filled or shifted read can match: a 64-bit LCG's high bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ name.len() as u64;
        let pattern: Vec<u8> = (0..PATTERN_LEN)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 56) as u8
            })
            .collect();
        let mut image = pattern.clone();
        image.resize(DISK_SIZE, 0);
        let disk = dir.join("disk.img");
        fs::write(&disk, &image).unwrap();
        Scratch { dir, disk, pattern }
    }

    fn pattern_sha256(&self) -> String {
        let p = self.dir.join("pattern");
        fs::write(&p, &self.pattern).unwrap();
        let out = Command::new("sha256sum").arg(&p).output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
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
        Some(0),
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
