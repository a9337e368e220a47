//! Boot the PVH test guest in `vmkit` and check what it reports about the machine.

mod common;

use common::{boot_guest, Run};
use vmkit_memory::layout::UNASSIGNED_MMIO;

fn check_smp_boot(cpus: u32) {
    let run = boot_guest(cpus, "128M", "test=smp exit=poweroff").ok();
    assert_eq!(
        run.stdout.lines().next(),
        Some("vmkit-test-guest: ready"),
        "{}",
        run.context()
    );
    run.says(&[
        "cmdline: test=smp exit=poweroff",
        &format!("cpus: {cpus} (madt)"),
        "ioapic: 0xfec00000 gsi 0",
        &format!("smp: {cpus}/{cpus} online"),
        "test smp: ok",
        "exit: poweroff",
    ]);
    for i in 0..cpus {
        run.says(&[&format!("cpu {i}: apic {i} online")]);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn boots_with_1_vcpu() {
    check_smp_boot(1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn boots_with_2_vcpus() {
    check_smp_boot(2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn boots_with_4_vcpus() {
    check_smp_boot(4);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memory_map_matches_the_configured_ram() {
    boot_guest(1, "256M", "exit=poweroff").ok().says(&[
        "memmap: 0x0000000000000000-0x000000000009fbff ram",
        "memmap: 0x0000000000100000-0x000000000fffffff ram",
        // All RAM but the legacy hole [0x9fc00, 0x100000): 256 MiB - 385 KiB, rounded down.
        "memory: 255 MiB ram",
    ]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn memory_above_4g_is_reported_above_the_gap() {
    // RAM above 4 GiB: 3200M - 3072M = 128 MiB.
    boot_guest(1, "3200M", "exit=poweroff")
        .ok()
        .says(&["memmap: 0x0000000100000000-0x0000000107ffffff ram"]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn timer_and_serial_interrupts_arrive() {
    boot_guest(2, "128M", "test=timer,serial-irq")
        .ok()
        .says(&["test timer: ok", "test serial-irq: ok"]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_exit_status_tells_power_off_from_reset() {
    // The table in README.md: 0 power-off, 3 reset.
    let off = boot_guest(1, "128M", "exit=poweroff");
    assert_eq!(off.code, Some(0), "{}", off.context());
    off.says(&["exit: poweroff"]);
    let reset = boot_guest(1, "128M", "exit=reset");
    assert_eq!(reset.code, Some(3), "{}", reset.context());
    reset.says(&["exit: reset"]);
    assert!(
        reset.stderr.is_empty(),
        "a guest's own end is not reported: {}",
        reset.context()
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn exit_benchmark_writes_reach_the_vmm_as_exits() {
    // Port 0x80 is the debug port; the MMIO writes go to the address map's unassigned page,
    // where nothing is registered: still one exit each, as in QEMU.
    let cmdline = format!("bench=pio:2000,mmio:1000:{:#x}", UNASSIGNED_MMIO.start);
    let run = Run::guest(&["--cmdline", &cmdline, "--stats"]).ok();
    run.says(&["bench pio: 2000 exits", "bench mmio: 1000 exits"]);
    assert!(
        run.stderr.contains("debug port: 2000 writes"),
        "{}",
        run.context()
    );
    assert!(run.mmio_exits() >= 1000, "{}", run.context());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_guide_s_minimal_vmm_boots_the_guest_with_virtio_on_pci() {
    let minimal = env!("CARGO_BIN_EXE_vmkit-minimal");
    let guest = common::test_guest();
    let out = std::process::Command::new(minimal)
        .args([guest.to_str().unwrap(), "test=smp,virtio-rng"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ctx = format!("{stdout}\n{stderr}");
    assert!(out.status.success(), "{ctx}");
    assert!(stdout.contains("smp: 2/2 online"), "{ctx}");
    assert!(stdout.contains("pci: 00:01.0 1af4:1044"), "{ctx}");
    assert!(stdout.contains("test virtio-rng: ok (pci)"), "{ctx}");
    assert!(stderr.contains("guest ended: power-off"), "{ctx}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_rng_over_mmio_serves_the_guest_driver() {
    let run = Run::guest(&[
        "--cpus",
        "2",
        "--rng",
        "--stats",
        "--cmdline",
        "test=virtio-rng,virtio-irq,smp",
    ])
    .ok();
    run.says(&[
        // The VMM described the device on the command line; the guest found it there.
        "virtio_mmio.device=4K@0xd0000000:5",
        "virtio: mmio 0xd0000000 size 0x1000 irq 5: rng (version 2)",
        // 1 MiB of non-constant entropy through virtio-drivers' VirtIORng, reset and reuse.
        "virtio-rng: 1048576 bytes in",
        "virtio-rng: reset and reuse ok",
        "test virtio-rng: ok",
        // Completions arrive as interrupts through the irqfd and the IOAPIC.
        "test virtio-irq: ok",
        "test smp: ok",
    ]);
    // Queue notifications go through the ioeventfd: 1 MiB in 4 KiB requests would be 256+
    // MMIO exits on their own if they came to the VMM.
    assert!(run.mmio_exits() < 256, "{}", run.context());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_guest_drives_devices_in_the_spec_s_order_on_both_transports() {
    for transport in ["mmio", "pci"] {
        let run = Run::guest(&[
            "--rng",
            "--transport",
            transport,
            "--log-level",
            "debug",
            "--cmdline",
            "test=virtio-rng",
        ])
        .ok();
        run.says(&["test virtio-rng: ok"]);
        // The debug log reaches stderr (the device's activation is in it)…
        assert!(
            run.stderr.contains("activated with features"),
            "{}",
            run.context()
        );
        // …and never a merged status write: one step per write, as virtio 1.2 §3.1.1 says.
        assert!(
            !run.stderr.contains("merged status write"),
            "{}",
            run.context()
        );
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_console_output_to_a_file_and_stdin_to_the_guest() {
    let file = std::env::temp_dir().join(format!("vmkit-console-{}", std::process::id()));
    let console = format!("--console=file={}", file.display());
    let run = Run::guest(&[
        "--rng",
        &console,
        "--cmdline",
        "test=virtio-console,virtio-rng",
    ]);
    let written = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    run.ok().says(&[
        // Two devices, two windows, two GSIs, in the order they were added.
        "virtio: mmio 0xd0000000 size 0x1000 irq 5: rng",
        "virtio: mmio 0xd0001000 size 0x1000 irq 6: console",
        "test virtio-console: ok",
        "test virtio-rng: ok",
    ]);
    assert_eq!(written, "hello from the virtio console\n");

    // --console stdio: host stdin reaches the guest's console driver.
    let args = ["--console", "stdio", "--cmdline", "test=virtio-console"];
    Run::guest_with_input(&args, b"ping from host\n")
        .ok()
        .says(&[
            "hello from the virtio console",
            "virtio-console: received 15 bytes",
        ]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_pci_devices_with_msix_on_two_vcpus() {
    let file = std::env::temp_dir().join(format!("vmkit-pci-console-{}", std::process::id()));
    let console = format!("--console=file={}", file.display());
    let run = Run::guest(&[
        "--cpus",
        "2",
        "--rng",
        &console,
        "--transport",
        "pci",
        "--cmdline",
        "test=all,pci",
    ]);
    let written = std::fs::read_to_string(&file).unwrap_or_default();
    let _ = std::fs::remove_file(&file);
    run.ok().says(&[
        // Found through the MCFG; port CAM and ECAM show the guest the same functions.
        "pci: ecam 0xe0000000 buses 0-0 (mcfg)",
        "pci: 00:00.0 8086:0d57 class 0600",
        "pci: 00:01.0 1af4:1044", // virtio-rng (0x1040 + 4)
        "pci: 00:02.0 1af4:1043", // virtio-console (0x1040 + 3)
        "test pci-cam-ecam: ok",
        // BARs assigned by the VMM, kept by the guest.
        "pci: 00:01.0 bar 0 0xc0000000 size 0x8000 mem64 (vmm)",
        "virtio: 0 mmio devices",
        "test virtio-rng: ok (pci)",
        "virtio-rng: reset and reuse ok (pci 00:01.0)",
        "test virtio-console: ok (pci)",
        // Per-queue MSI-X, re-targeted to the second vCPU mid-test.
        "virtio-irq: 8 msi-x interrupts",
        "virtio-irq: apic 1 took",
        "test virtio-irq: ok (pci)",
    ]);
    assert_eq!(written, "hello from the virtio console\n");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_pci_console_reads_host_stdin() {
    let args = [
        "--console",
        "stdio",
        "--transport",
        "pci",
        "--cmdline",
        "test=virtio-console",
    ];
    Run::guest_with_input(&args, b"ping from host\n")
        .ok()
        .says(&[
            "virtio: pci 00:01.0 console (modern)",
            "hello from the virtio console",
            "virtio-console: received 15 bytes (pci",
            "test virtio-console: ok (pci)",
        ]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn no_mmio_cmdline_leaves_the_devices_to_the_dsdt_and_pvm_template_boots() {
    let run = Run::guest(&[
        "--rng",
        "--no-mmio-cmdline",
        "--cpu-template",
        "pvm",
        "--cmdline",
        "test=smp",
    ])
    .ok();
    let cmdline = run
        .stdout
        .lines()
        .find(|l| l.starts_with("cmdline: "))
        .expect("the guest prints its command line");
    assert!(
        cmdline.starts_with("cmdline: test=smp"),
        "{}",
        run.context()
    );
    assert!(
        !cmdline.contains("virtio_mmio.device="),
        "{}",
        run.context()
    );
    // What the template could not hide on this host is named for Linux, and only then.
    assert_eq!(
        cmdline.contains("clearcpuid="),
        run.stderr.contains("does not hide"),
        "{}",
        run.context()
    );
    run.says(&["test smp: ok"]);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn the_footprint_benchmark_can_hold_the_guest_and_release_it_through_stdin() {
    let run = Run::guest_with_input(&["--cmdline", "hold=serial"], b"x");
    run.ok()
        .says(&["hold: waiting for a byte on COM1", "exit: poweroff"]);
}
