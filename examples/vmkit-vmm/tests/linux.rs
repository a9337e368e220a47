//! Debian's stock cloud kernel (the one the vmkit-boot loader tests fetch) through vmkit's two
//! ELF entry paths, as far as early boot: on hosts whose KVM emulates guest kernel mode a stock
//! kernel goes no further in reasonable time, but early boot already shows what it took from
//! us — the E820 map, our ACPI tables, the MADT's IOAPIC, override and CPUs.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::repo_root;

/// The cached Debian vmlinux, fetched by the boot crate's script if needed.
fn debian_vmlinux() -> String {
    let script = repo_root().join("crates/vmkit-boot/tests/fetch-debian-kernel.sh");
    let out = Command::new("sh")
        .arg(&script)
        .output()
        .expect("run the fetch script");
    assert!(
        out.status.success(),
        "fetching Debian's kernel failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paths = String::from_utf8_lossy(&out.stdout);
    paths.lines().last().expect("vmlinux path").to_string()
}

/// Runs vmkit until every `wanted` text has appeared on the serial console (or `limit`
/// passes), then kills it; returns the console text.
fn boot_until(args: &[&str], wanted: &[String], limit: Duration) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vmkit");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut text = String::new();
    while start.elapsed() < limit && !wanted.iter().all(|w| text.contains(w.as_str())) {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            text.push_str(&line);
            text.push('\n');
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    text
}

fn check(text: &str, wanted: &[String]) {
    for w in wanted {
        assert!(
            text.contains(w.as_str()),
            "the kernel did not print {w:?}; console:\n{text}"
        );
    }
}

const CMDLINE: &str = "earlyprintk=ttyS0 console=ttyS0 reboot=k panic=-1 noxsave";

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn debian_kernel_through_pvh_reads_our_tables() {
    let vmlinux = debian_vmlinux();
    let wanted: Vec<String> = [
        "Linux version 6.",
        "Command line: earlyprintk=ttyS0",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 VMKIT )",
        "ACPI: FACP 0x",
        "ACPI: DSDT 0x",
        "IOAPIC[0]: apic_id 0, version 17, address 0xfec00000, GSI 0-23",
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
        "ACPI: LAPIC_NMI (acpi_id[0xff] high edge lint[0x1])",
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs",
    ]
    .map(String::from)
    .to_vec();
    let text = boot_until(
        &[
            "--kernel",
            &vmlinux,
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--cmdline",
            CMDLINE,
        ],
        &wanted,
        Duration::from_secs(90),
    );
    check(&text, &wanted);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn debian_kernel_through_the_64_bit_linux_entry() {
    let vmlinux = debian_vmlinux();
    let wanted: Vec<String> = [
        "Linux version 6.",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "ACPI: RSDP 0x00000000000E0000 000024 (v02 VMKIT )",
    ]
    .map(String::from)
    .to_vec();
    let text = boot_until(
        &[
            "--kernel",
            &vmlinux,
            "--no-pvh",
            "--memory",
            "256M",
            "--cmdline",
            CMDLINE,
        ],
        &wanted,
        Duration::from_secs(90),
    );
    check(&text, &wanted);
}
