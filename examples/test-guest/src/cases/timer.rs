//! The interrupt tests: LAPIC timer and COM1 THRE through the IOAPIC.

use crate::platform::acpi::Acpi;
use crate::platform::apic::{mask_pic, reg, IoApic, Lapic, LVT_MASKED, LVT_PERIODIC};
use crate::platform::arch::{cli, outb, sti};
use crate::platform::boot::{self, VECTOR_SERIAL, VECTOR_TIMER};
use crate::println;
use crate::platform::serial;
use crate::platform::time::{delay_us, wait_until};
use core::sync::atomic::Ordering;

/// LAPIC timer, periodic, divide by 16, 2 ms period: wait for 10 ticks.
pub fn timer(lapic: &Lapic) {
    const WANTED: u64 = 10;
    // Calibrate: LAPIC timer ticks in 1 ms (one-shot, masked).
    lapic.write(reg::TIMER_DIVIDE, 0x3); // divide by 16
    lapic.write(reg::LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
    lapic.write(reg::TIMER_INITIAL, u32::MAX);
    delay_us(1000);
    let per_ms = u32::MAX - lapic.read(reg::TIMER_CURRENT);
    lapic.write(reg::TIMER_INITIAL, 0);
    if per_ms == 0 {
        println!("timer: 0 lapic interrupts");
        println!("test timer: FAIL lapic timer does not count");
        return;
    }

    let start = boot::timer_ticks().load(Ordering::Relaxed);
    lapic.write(reg::LVT_TIMER, LVT_PERIODIC | u32::from(VECTOR_TIMER));
    lapic.write(reg::TIMER_INITIAL, per_ms.saturating_mul(2).max(1));
    sti();
    wait_until(2_000_000, || {
        boot::timer_ticks().load(Ordering::Relaxed) - start >= WANTED
    });
    cli();
    lapic.write(reg::LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
    lapic.write(reg::TIMER_INITIAL, 0);

    let n = boot::timer_ticks().load(Ordering::Relaxed) - start;
    println!("timer: {} lapic interrupts", n);
    if n >= WANTED {
        println!("test timer: ok");
    } else {
        println!("test timer: FAIL {} of {} ticks in 2 s", n, WANTED);
    }
}

/// COM1 THRE interrupts routed IOAPIC GSI 4 -> vector 0x24 on the BSP.
pub fn serial_irq(acpi: Option<&Acpi>, bsp_apic_id: u32) {
    let Some((base, gsi_base)) = acpi.and_then(|a| a.ioapic) else {
        println!("serial: 0 thre interrupts");
        println!("test serial-irq: FAIL no ioapic");
        return;
    };
    let gsi = acpi.map_or(4, |a| a.com1_gsi);
    let ioapic = IoApic::new(base, gsi_base);
    mask_pic();
    if !ioapic.route(gsi, VECTOR_SERIAL, bsp_apic_id, false) {
        println!("serial: 0 thre interrupts");
        println!("test serial-irq: FAIL gsi {} not on the ioapic", gsi);
        return;
    }

    let start = boot::serial_irqs().load(Ordering::Relaxed);
    outb(serial::MCR, 0x0b); // DTR | RTS | OUT2 (OUT2 gates the IRQ line)
    sti();
    outb(serial::IER, 0x02); // THRE interrupt
    println!(
        "serial: writing with thre interrupts on gsi {} vector {:#04x}",
        gsi, VECTOR_SERIAL
    );
    wait_until(100_000, || {
        boot::serial_irqs().load(Ordering::Relaxed) > start
    });
    delay_us(1000);
    outb(serial::IER, 0x00);
    cli();
    ioapic.route(gsi, VECTOR_SERIAL, bsp_apic_id, true);

    let n = boot::serial_irqs().load(Ordering::Relaxed) - start;
    println!("serial: {} thre interrupts", n);
    if n >= 1 {
        println!("test serial-irq: ok");
    } else {
        println!("test serial-irq: FAIL no interrupt");
    }
}
