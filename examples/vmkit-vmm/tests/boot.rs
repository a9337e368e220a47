//! Boot the PVH test guest in `vmkit` and check what it reports about the machine.

mod common;

use common::{boot_guest, have_kvm};

fn lines_with<'a>(out: &'a str, prefix: &str) -> Vec<&'a str> {
    out.lines().filter(|l| l.starts_with(prefix)).collect()
}

fn check_smp_boot(cpus: u32) {
    if !have_kvm() {
        return;
    }
    let (code, out, err) = boot_guest(cpus, "128M", "test=smp exit=poweroff");
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, Some(0), "exit status\n{ctx}");
    assert_eq!(out.lines().next(), Some("vmkit-test-guest: ready"), "{ctx}");
    assert!(out.contains("cmdline: test=smp exit=poweroff"), "{ctx}");
    assert!(out.contains(&format!("cpus: {cpus} (madt)")), "{ctx}");
    assert!(out.contains("ioapic: 0xfec00000 gsi 0"), "{ctx}");
    for i in 0..cpus {
        assert!(
            out.contains(&format!("cpu {i}: apic {i} online")),
            "cpu {i} did not report\n{ctx}"
        );
    }
    assert!(out.contains(&format!("smp: {cpus}/{cpus} online")), "{ctx}");
    assert!(out.contains("test smp: ok"), "{ctx}");
    assert!(out.contains("exit: poweroff"), "{ctx}");
}

#[test]
fn boots_with_1_vcpu() {
    check_smp_boot(1);
}

#[test]
fn boots_with_2_vcpus() {
    check_smp_boot(2);
}

#[test]
fn boots_with_4_vcpus() {
    check_smp_boot(4);
}

#[test]
fn memory_map_matches_the_configured_ram() {
    if !have_kvm() {
        return;
    }
    let (code, out, err) = boot_guest(1, "256M", "exit=poweroff");
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, Some(0), "{ctx}");
    let map = lines_with(&out, "memmap: ");
    assert!(
        map.contains(&"memmap: 0x0000000000000000-0x000000000009fbff ram"),
        "low RAM entry\n{ctx}"
    );
    assert!(
        map.contains(&"memmap: 0x0000000000100000-0x000000000fffffff ram"),
        "RAM from 1 MiB to 256 MiB\n{ctx}"
    );
    // All RAM but the legacy hole [0x9fc00, 0x100000): 256 MiB - 385 KiB, rounded down.
    assert!(out.contains("memory: 255 MiB ram"), "{ctx}");
}

#[test]
fn memory_above_4g_is_reported_above_the_gap() {
    if !have_kvm() {
        return;
    }
    let (code, out, err) = boot_guest(1, "3200M", "exit=poweroff");
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, Some(0), "{ctx}");
    assert!(
        out.contains("memmap: 0x0000000100000000-0x0000000107ffffff ram"),
        "RAM above 4 GiB: 3200M - 3072M = 128 MiB\n{ctx}"
    );
}

#[test]
fn timer_and_serial_interrupts_arrive() {
    if !have_kvm() {
        return;
    }
    let (code, out, err) = boot_guest(2, "128M", "test=timer,serial-irq");
    let ctx = format!("stdout:\n{out}\nstderr:\n{err}");
    assert_eq!(code, Some(0), "{ctx}");
    assert!(out.contains("test timer: ok"), "{ctx}");
    assert!(out.contains("test serial-irq: ok"), "{ctx}");
}

#[test]
fn reset_ends_the_vmm_with_status_0() {
    if !have_kvm() {
        return;
    }
    let (code, out, err) = boot_guest(1, "128M", "exit=reset");
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("exit: reset"), "{out}");
}

#[test]
fn pio_bench_goes_through_the_bus() {
    if !have_kvm() {
        return;
    }
    let guest = common::test_guest();
    let out = common::vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            "bench=pio:2000,mmio:1000:0xd0f00000",
            "--stats",
        ],
        std::time::Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("bench pio: 2000 exits"), "{stdout}");
    assert!(stdout.contains("bench mmio: 1000 exits"), "{stdout}");
    // The debug device saw every write, port and MMIO page (nothing else writes them here).
    assert!(stderr.contains("debug port: 3000 writes"), "{stderr}");
}

#[test]
fn the_guide_s_minimal_vmm_boots_the_guest() {
    if !have_kvm() {
        return;
    }
    let minimal = env!("CARGO_BIN_EXE_vmkit-minimal");
    let guest = common::test_guest();
    let out = std::process::Command::new(minimal)
        .args([guest.to_str().unwrap(), "test=smp"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("smp: 2/2 online"), "{stdout}");
    assert!(stderr.contains("guest ended: Some(PowerOff)"), "{stderr}");
}

#[test]
fn virtio_rng_over_mmio_serves_the_guest_driver() {
    if !have_kvm() {
        return;
    }
    let guest = common::test_guest();
    let out = common::vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cpus",
            "2",
            "--rng",
            "--stats",
            "--cmdline",
            "test=virtio-rng,virtio-irq,smp",
        ],
        std::time::Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    // The VMM described the device on the command line; the guest found it there.
    assert!(
        stdout.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{ctx}"
    );
    assert!(
        stdout.contains("virtio: mmio 0xd0000000 size 0x1000 irq 5: rng (version 2)"),
        "{ctx}"
    );
    // 1 MiB of non-constant entropy through virtio-drivers' VirtIORng, then reset and reuse.
    assert!(stdout.contains("virtio-rng: 1048576 bytes in"), "{ctx}");
    assert!(stdout.contains("virtio-rng: reset and reuse ok"), "{ctx}");
    assert!(stdout.contains("test virtio-rng: ok"), "{ctx}");
    // Completions arrive as interrupts through the irqfd and the IOAPIC, not only by polling.
    assert!(stdout.contains("test virtio-irq: ok"), "{ctx}");
    assert!(stdout.contains("test smp: ok"), "{ctx}");
    // Queue notifications go through the ioeventfd: 1 MiB in 4 KiB requests would be 256+
    // MMIO exits on their own if they came to the VMM.
    let mmio_exits: u64 = stderr
        .lines()
        .filter_map(|l| l.split(" pio exits, ").nth(1))
        .filter_map(|l| l.split(" mmio exits").next())
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert!(
        mmio_exits < 256,
        "{mmio_exits} MMIO exits: notifications reached the VMM\n{ctx}"
    );
}

#[test]
fn virtio_console_output_to_a_file_and_stdin_to_the_guest() {
    if !have_kvm() {
        return;
    }
    use std::io::Write;
    let guest = common::test_guest();
    let file = std::env::temp_dir().join(format!("vmkit-console-{}", std::process::id()));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .args(["--kernel", guest.to_str().unwrap(), "--rng"])
        .arg(format!("--console=file={}", file.display()))
        .args(["--cmdline", "test=virtio-console,virtio-rng"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    // Two devices, two windows, two GSIs, in the order they were added.
    assert!(
        stdout.contains("virtio: mmio 0xd0000000 size 0x1000 irq 5: rng"),
        "{stdout}"
    );
    assert!(
        stdout.contains("virtio: mmio 0xd0001000 size 0x1000 irq 6: console"),
        "{stdout}"
    );
    assert!(stdout.contains("test virtio-console: ok"), "{stdout}");
    assert!(stdout.contains("test virtio-rng: ok"), "{stdout}");
    let written = std::fs::read_to_string(&file).unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(written, "hello from the virtio console\n");

    // --console stdio: host stdin reaches the guest's console driver.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .args(["--kernel", guest.to_str().unwrap(), "--console", "stdio"])
        .args(["--cmdline", "test=virtio-console"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ping from host\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("hello from the virtio console"), "{stdout}");
    assert!(
        stdout.contains("virtio-console: received 15 bytes"),
        "{stdout}"
    );
}

#[test]
fn virtio_pci_devices_with_msix_on_two_vcpus() {
    if !have_kvm() {
        return;
    }
    let guest = common::test_guest();
    let file = std::env::temp_dir().join(format!("vmkit-pci-console-{}", std::process::id()));
    let out = common::vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--cpus",
            "2",
            "--rng",
            &format!("--console=file={}", file.display()),
            "--transport",
            "pci",
            "--cmdline",
            "test=all,pci",
        ],
        std::time::Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    // Found through the MCFG, and port CAM and ECAM show the guest the same functions.
    assert!(
        stdout.contains("pci: ecam 0xe0000000 buses 0-0 (mcfg)"),
        "{ctx}"
    );
    assert!(
        stdout.contains("pci: 00:00.0 8086:0d57 class 0600"),
        "host bridge\n{ctx}"
    );
    assert!(
        stdout.contains("pci: 00:01.0 1af4:1044"),
        "virtio-rng (0x1040 + 4)\n{ctx}"
    );
    assert!(
        stdout.contains("pci: 00:02.0 1af4:1043"),
        "virtio-console (0x1040 + 3)\n{ctx}"
    );
    assert!(stdout.contains("test pci-cam-ecam: ok"), "{ctx}");
    // BARs assigned by the VMM, kept by the guest.
    assert!(
        stdout.contains("pci: 00:01.0 bar 0 0xc0000000 size 0x8000 mem64 (vmm)"),
        "{ctx}"
    );
    assert!(stdout.contains("virtio: 0 mmio devices"), "{ctx}");
    assert!(stdout.contains("test virtio-rng: ok (pci)"), "{ctx}");
    assert!(
        stdout.contains("virtio-rng: reset and reuse ok (pci 00:01.0)"),
        "{ctx}"
    );
    assert!(stdout.contains("test virtio-console: ok (pci)"), "{ctx}");
    // Per-queue MSI-X, re-targeted to the second vCPU mid-test.
    assert!(stdout.contains("virtio-irq: 8 msi-x interrupts"), "{ctx}");
    assert!(stdout.contains("virtio-irq: apic 1 took"), "{ctx}");
    assert!(stdout.contains("test virtio-irq: ok (pci)"), "{ctx}");
    let written = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    assert_eq!(written, "hello from the virtio console\n");
}

#[test]
fn virtio_pci_console_reads_host_stdin() {
    if !have_kvm() {
        return;
    }
    use std::io::Write;
    let guest = common::test_guest();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .args(["--kernel", guest.to_str().unwrap(), "--console", "stdio"])
        .args(["--transport", "pci", "--cmdline", "test=virtio-console"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ping from host\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("virtio: pci 00:01.0 console (modern)"),
        "{stdout}"
    );
    assert!(stdout.contains("hello from the virtio console"), "{stdout}");
    assert!(
        stdout.contains("virtio-console: received 15 bytes (pci"),
        "{stdout}"
    );
    assert!(stdout.contains("test virtio-console: ok (pci)"), "{stdout}");
}

#[test]
fn no_mmio_cmdline_leaves_the_devices_to_the_dsdt_and_pvm_template_boots() {
    if !have_kvm() {
        return;
    }
    let guest = common::test_guest();
    let out = common::vmkit(
        &[
            "--kernel",
            guest.to_str().unwrap(),
            "--rng",
            "--no-mmio-cmdline",
            "--cpu-template",
            "pvm",
            "--cmdline",
            "test=smp",
        ],
        std::time::Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let cmdline = stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .expect("the guest prints its command line");
    assert!(cmdline.starts_with("cmdline: test=smp"), "{ctx}");
    assert!(!cmdline.contains("virtio_mmio.device="), "{ctx}");
    // What the template could not hide on this host is named for Linux, and only then.
    assert_eq!(
        cmdline.contains("clearcpuid="),
        stderr.contains("does not hide"),
        "{ctx}"
    );
    assert!(stdout.contains("test smp: ok"), "{ctx}");
}
