//! `test=serial-irq`: COM1 THRE interrupts routed through the IOAPIC (GSI 4
//! unless overridden) to vector 0x24 on the BSP, edge, active high.

use crate::cases::support::{report, Ctx, Want};
use crate::platform::apic::{mask_pic, IoApic};
use crate::platform::arch::{cli, outb, sti};
use crate::platform::boot::{self, VECTOR_SERIAL};
use crate::platform::serial;
use crate::platform::time::{delay_us, wait_until};
use crate::println;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::Ordering;

pub fn run(ctx: &Ctx, _: Want) {
    report("serial-irq", "", thre_interrupts(ctx));
}

fn thre_interrupts(ctx: &Ctx) -> Result<String, String> {
    let Some((base, gsi_base)) = ctx.acpi.and_then(|a| a.ioapic) else {
        println!("serial: 0 thre interrupts");
        return Err(String::from("no ioapic"));
    };
    let gsi = ctx.acpi.map_or(4, |a| a.com1_gsi);
    let ioapic = IoApic::new(base, gsi_base);
    mask_pic();
    if !ioapic.route(gsi, VECTOR_SERIAL, ctx.bsp_apic_id, false) {
        println!("serial: 0 thre interrupts");
        return Err(format!("gsi {} not on the ioapic", gsi));
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
    ioapic.route(gsi, VECTOR_SERIAL, ctx.bsp_apic_id, true);

    let n = boot::serial_irqs().load(Ordering::Relaxed) - start;
    println!("serial: {} thre interrupts", n);
    if n >= 1 {
        Ok(String::new())
    } else {
        Err(String::from("no interrupt"))
    }
}
