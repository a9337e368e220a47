//! Fills the interrupt descriptor table.
//!
//! The IDT is loaded (`lidt`) at boot but its gates are written here, from
//! CPL3, because a 256-entry loop at CPL0 would be emulated. Until this runs
//! an exception would triple-fault, so `main` calls it right after the ready
//! line.

use crate::platform::boot::{
    self, MSIX_VECTORS, VECTOR_CPU_TIMER, VECTOR_MSIX, VECTOR_SERIAL, VECTOR_SPURIOUS,
    VECTOR_TIMER, VECTOR_TIMER_SETUP, VECTOR_VIRTIO,
};

const KERNEL_CS: u64 = 0x08;
/// Present, DPL0, 64-bit interrupt gate (clears IF).
const GATE_KERNEL: u64 = 0x8e;

fn gate(handler: u64, attr: u64) -> [u64; 2] {
    let low =
        (handler & 0xffff) | (KERNEL_CS << 16) | (attr << 40) | ((handler >> 16) & 0xffff) << 48;
    [low, handler >> 32]
}

fn set(vector: u8, handler: u64, attr: u64) {
    // SAFETY: the IDT is a 256-entry table in .bss that only this function
    // writes (`vector` < 256); volatile because the CPU reads it behind our back.
    unsafe { core::ptr::write_volatile(boot::idt().add(usize::from(vector)), gate(handler, attr)) };
}

/// Installs the exception stubs and the interrupt handlers.
pub fn init() {
    for vector in 0..32u8 {
        set(vector, boot::exception_stub(vector), GATE_KERNEL);
    }
    set(VECTOR_TIMER, boot::irq_timer(), GATE_KERNEL);
    set(VECTOR_SERIAL, boot::irq_serial(), GATE_KERNEL);
    set(VECTOR_VIRTIO, boot::irq_virtio(), GATE_KERNEL);
    for n in 0..MSIX_VECTORS {
        set(VECTOR_MSIX + n as u8, boot::irq_msix(n), GATE_KERNEL);
    }
    set(VECTOR_CPU_TIMER, boot::irq_cpu_timer(), GATE_KERNEL);
    set(VECTOR_TIMER_SETUP, boot::irq_timer_setup(), GATE_KERNEL);
    set(VECTOR_SPURIOUS, boot::irq_spurious(), GATE_KERNEL);
}
