//! vmkit-test-guest: a `no_std` PVH kernel that reports what it finds and
//! exercises the VMM (SMP start-up, LAPIC timer, IOAPIC-routed COM1
//! interrupts, port-I/O and MMIO exit cost, PCI bus 0 through port CAM and ECAM,
//! virtio-mmio and virtio-pci devices through the `virtio-drivers` crate),
//! then powers off.
//!
//! Only the boot stub, interrupt stubs and AP start-up run at CPL0 (which the
//! host emulates); everything in Rust runs at CPL3 with IOPL=3 on a
//! user-accessible identity mapping of 0-4 GiB. See README.md.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod bench;
mod cases;
mod cmdline;
mod drivers;
mod platform;

use cmdline::{Config, Want};
use core::sync::atomic::Ordering;
use drivers::{blk, pci, virtio};
use platform::acpi::{Acpi, RsdpSource};
use platform::apic::Lapic;
use platform::pvh::StartInfo;
use platform::time::TscSource;
use platform::{arch, boot, idt, power, serial, smp, time};

/// Rust entry, at CPL3 (IOPL=3, IF=0), from `long_mode_entry` in boot.rs.
#[no_mangle]
pub extern "C" fn rust_main(start_info_paddr: u64) -> ! {
    // The IDT first: where IOPL is not honoured, port I/O goes through #GP.
    idt::init();
    serial::init();
    println!("vmkit-test-guest: ready");

    let info = StartInfo::read(start_info_paddr);
    println!("cmdline: {}", info.cmdline());
    let cfg = Config::parse(info.cmdline());
    print_memmap(&info);

    let acpi = Acpi::discover(info.rsdp_paddr);
    match &acpi {
        Some(a) => println!(
            "acpi: rsdp 0x{:x} ({}), s5 {}{}",
            a.rsdp,
            if a.rsdp_source == RsdpSource::StartInfo {
                "start_info"
            } else {
                "scan"
            },
            a.s5_type,
            if a.s5_found { "" } else { " (default)" }
        ),
        None => println!("acpi: none"),
    }
    let cpus = match &acpi {
        Some(a) if a.madt_found && a.cpus_total > 0 => {
            println!("cpus: {} (madt)", a.cpus_total);
            a.cpus_total
        }
        _ => {
            println!("cpus: 1 (cpuid)");
            1
        }
    };
    match acpi.as_ref().and_then(|a| a.ioapic) {
        Some((addr, gsi)) => println!("ioapic: 0x{:x} gsi {}", addr, gsi),
        None => println!("ioapic: none"),
    }

    let lapic = Lapic::new(acpi.as_ref().map_or(0xfee0_0000, |a| a.lapic_addr));
    boot::lapic_eoi_addr().store(lapic.eoi_addr(), Ordering::Relaxed);
    lapic.enable();
    let bsp_apic_id = lapic.id();
    let (tsc_khz, tsc_source) = time::init();

    let (online, ap) = smp_report(acpi.as_ref(), &lapic, bsp_apic_id, cpus);

    println!(
        "tsc: {} MHz ({})",
        tsc_khz / 1000,
        if tsc_source == TscSource::Cpuid {
            "cpuid"
        } else {
            "pit"
        }
    );

    let mut devices = virtio::discover(cfg.virtio_mmio());
    let mcfg = acpi.as_ref().and_then(|a| a.mcfg);
    if let Some(cam) = pci::choose(cfg.pci, mcfg) {
        virtio::discover_pci(&mut devices, cam, mcfg.map(|m| m.base));
    }
    let blks = blk::identify(&devices);
    let ram = blk::free_ram(info.memmap());

    if cfg.test_timer {
        cases::timer::timer(&lapic);
    }
    if cfg.test_serial_irq {
        cases::timer::serial_irq(acpi.as_ref(), bsp_apic_id);
    }
    if cfg.test_smp {
        if online == cpus {
            println!("test smp: ok");
        } else {
            println!("test smp: FAIL {}/{}", online, cpus);
        }
    }
    if cfg.test_pci {
        pci::test_cam_ecam(mcfg);
    }
    let has_rng = devices.has(virtio_drivers::transport::DeviceType::EntropySource);
    let has_console = devices.has(virtio_drivers::transport::DeviceType::Console);
    if wanted(cfg.test_virtio_rng, has_rng) {
        virtio::rng(&devices);
    }
    if wanted(cfg.test_virtio_console, has_console) {
        virtio::console(&devices);
    }
    if wanted(cfg.test_virtio_irq, has_rng) {
        virtio::irq(&devices, acpi.as_ref(), bsp_apic_id, ap);
    }
    blk::tests(&devices, &blks, &cfg.blk, ram);
    bench::exits::exits(cfg.exit_benches(), info.memmap());
    blk::benches(&devices, &blks, &cfg.blk, ram);
    if let Some(wf) = cfg.blk.write_flush {
        blk::write_flush(&devices, &blks, wf, ram);
    }
    power::exit(cfg.exit, acpi.as_ref())
}

/// Whether a virtio test runs: when named, or under `all` with its device.
fn wanted(want: Want, present: bool) -> bool {
    match want {
        Want::No => false,
        Want::Named => true,
        Want::IfPresent => present,
    }
}

fn print_memmap(info: &StartInfo) {
    // Zero-sized entries (QEMU's firmware appends one) carry nothing.
    let mut map = info.memmap().iter().filter(|e| e.size != 0).peekable();
    if map.peek().is_none() {
        println!("memmap: none");
        return;
    }
    let mut ram = 0u64;
    for e in map {
        let end = e.addr.saturating_add(e.size - 1);
        let kind = match e.kind {
            1 => "ram",
            2 => "reserved",
            3 => "acpi",
            4 => "nvs",
            5 => "unusable",
            _ => "",
        };
        if kind.is_empty() {
            println!("memmap: 0x{:016x}-0x{:016x} type {}", e.addr, end, e.kind);
        } else {
            println!("memmap: 0x{:016x}-0x{:016x} {}", e.addr, end, kind);
        }
        if e.is_ram() {
            ram = ram.saturating_add(e.size);
        }
    }
    println!("memory: {} MiB ram", ram >> 20);
}

/// Brings up the APs (when there are any) and prints one line per CPU;
/// returns how many CPUs are online and the APIC ID of the first online AP
/// (below 256, so an xAPIC MSI can name it).
fn smp_report(
    acpi: Option<&Acpi>,
    lapic: &Lapic,
    bsp_apic_id: u32,
    cpus: usize,
) -> (usize, Option<u32>) {
    let Some(acpi) = acpi.filter(|a| a.madt_found && a.cpu_count > 1) else {
        println!("cpu 0: apic {} online", bsp_apic_id);
        println!("smp: 1/{} online", cpus);
        return (1, None);
    };
    let smp = smp::start_aps(acpi, lapic, bsp_apic_id);
    let mut online = 0;
    let mut ap = None;
    for (index, &id) in acpi.cpu_ids[..acpi.cpu_count].iter().enumerate() {
        if smp.is_online(id) {
            online += 1;
            if id != bsp_apic_id && id < 0xff {
                ap.get_or_insert(id);
            }
            println!("cpu {}: apic {} online", index, id);
        } else {
            println!("cpu {}: apic {} offline", index, id);
        }
    }
    println!("smp: {}/{} online", online, cpus);
    (online, ap)
}

/// Reached at CPL3 (IF=0, own stack) from the CPL0 exception stubs.
#[no_mangle]
pub extern "C" fn guest_exception_report(vector: u64, rip: u64, err: u64, cr2: u64) -> ! {
    println!(
        "guest: exception {} at rip 0x{:x} err 0x{:x}",
        vector, rip, err
    );
    if vector == 14 {
        println!("guest: page fault address 0x{:x}", cr2);
    }
    arch::halt_forever()
}

/// liballoc (prebuilt with unwinding) refers to the personality routine; with
/// `panic = "abort"` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Likewise for the landing pads of prebuilt liballoc code (`format!`): no
/// unwinding ever starts, so this is unreachable; halt if it is not.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    arch::halt_forever()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("guest: panic: {}", info.message());
    arch::halt_forever()
}
