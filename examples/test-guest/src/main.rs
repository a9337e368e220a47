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

use cases::support::Ctx;
use cmdline::Config;
use core::sync::atomic::Ordering;
use drivers::{blk, pci, virtio};
use platform::acpi::{self, Acpi};
use platform::apic::Lapic;
use platform::pvh::{self, StartInfo};
use platform::time::{self, TscSource};
use platform::{arch, boot, idt, power, ram, serial, smp};

/// Rust entry, at CPL3 (IOPL=3, IF=0), from `long_mode_entry` in
/// `platform/boot.rs`: reports the machine, discovers devices, runs the
/// selected tests and benchmarks, then leaves as `exit=` asks.
#[no_mangle]
pub extern "C" fn rust_main(start_info_paddr: u64) -> ! {
    // The IDT first: where IOPL is not honoured, port I/O goes through #GP.
    idt::init();
    serial::init();
    println!("vmkit-test-guest: ready");

    let info = StartInfo::read(start_info_paddr);
    println!("cmdline: {}", info.cmdline());
    let cfg = Config::parse(info.cmdline());
    pvh::print_memmap(&info);

    let acpi = Acpi::discover(info.rsdp_paddr);
    let cpus = acpi::report(acpi.as_ref());
    let lapic = Lapic::new(acpi.as_ref().map_or(0xfee0_0000, |a| a.lapic_addr));
    boot::lapic_eoi_addr().store(lapic.eoi_addr(), Ordering::Relaxed);
    lapic.enable();
    let bsp_apic_id = lapic.id();
    let (tsc_khz, tsc_source) = time::init();
    let online = smp::bring_up(acpi.as_ref(), &lapic, bsp_apic_id, cpus);
    let source = match tsc_source {
        TscSource::Cpuid => "cpuid",
        TscSource::Pit => "pit",
    };
    println!("tsc: {} MHz ({})", tsc_khz / 1000, source);

    let mut devices = virtio::discover(cfg.virtio_mmio());
    let mcfg = acpi.as_ref().and_then(|a| a.mcfg);
    if let Some(cam) = pci::choose(cfg.pci, mcfg) {
        virtio::discover_pci(&mut devices, cam, mcfg.map(|m| m.base));
    }
    let disks = blk::identify(&devices);
    let ram = ram::free_ram(info.memmap());

    let ctx = Ctx {
        acpi: acpi.as_ref(),
        lapic: &lapic,
        bsp_apic_id,
        cpus,
        online,
        devices: &devices,
        disks: &disks,
        ram,
        net: cfg.net,
        vsock: cfg.vsock,
        soak_rounds: cfg.soak_rounds,
    };
    cases::run(&ctx, &cfg.tests);
    bench::exits::run(cfg.exit_benches(), info.memmap());
    let blk_benches: alloc::vec::Vec<_> = cfg.blk_benches().collect();
    bench::blk::run(&devices, &disks, &blk_benches, ram);
    let net_benches: alloc::vec::Vec<_> = cfg.net_benches().collect();
    bench::net::run(&devices, &net_benches, ram, cfg.net);
    let vsock_benches: alloc::vec::Vec<_> = cfg.vsock_benches().collect();
    bench::vsock::run(&devices, &vsock_benches, cfg.vsock);
    if let Some(wf) = cfg.write_flush {
        cases::blk_write_flush::run(&devices, &disks, wf, ram);
    }
    if let Some(hold) = cfg.hold {
        bench::hold::run(hold);
    }
    power::exit(cfg.exit, acpi.as_ref())
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
