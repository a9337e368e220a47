//! Thin wrappers over the x86 instructions the guest uses from CPL3.
//!
//! The guest runs with IOPL=3, so `in`/`out`/`cli`/`sti` are legal at CPL3,
//! and all of 0-4 GiB is identity-mapped user-accessible, so MMIO registers
//! are plain volatile loads and stores.

use core::arch::asm;

/// Reads a byte from an I/O port.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: IOPL=3 makes `in` legal at CPL3; reading a port has no memory effects.
    unsafe {
        asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Writes a byte to an I/O port.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: IOPL=3 makes `out` legal at CPL3; the devices we touch (UART, PIT,
    // PIC, ACPI, debug port, PCI configuration ports) do not write memory that
    // Rust owns (virtio DMA goes to buffers handed over through raw pointers).
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 16-bit word to an I/O port.
#[inline(always)]
pub fn outw(port: u16, value: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 32-bit word to an I/O port.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit word from an I/O port.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `inb`.
    unsafe {
        asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    value
}

/// Reads the time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: CR4.TSD is clear, so `rdtsc` is legal at CPL3; no memory effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Result of `cpuid`.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
}

/// Executes `cpuid` for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    #[allow(unused_unsafe)]
    // SAFETY: every x86_64 CPU has `cpuid`; it only writes the four registers.
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    Cpuid {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
    }
}

/// Enables interrupts (legal at CPL3 with IOPL=3).
#[inline(always)]
pub fn sti() {
    // SAFETY: IOPL=3; the IDT has handlers for every vector we unmask.
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// Disables interrupts (legal at CPL3 with IOPL=3).
#[inline(always)]
pub fn cli() {
    // SAFETY: IOPL=3; masking interrupts has no memory effects.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Spin-loop hint.
#[inline(always)]
pub fn pause() {
    core::hint::spin_loop();
}

/// Halts this CPU forever (`cli; hlt` at CPL0).
pub fn halt_forever() -> ! {
    crate::platform::boot::halt_forever()
}

/// Reads a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a device register (or memory) below 4 GiB that is safe to read.
#[inline(always)]
pub unsafe fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the caller guarantees a readable, mapped (identity, user) address.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
///
/// # Safety
/// `addr` must be a device register below 4 GiB whose write has no effect on
/// memory that Rust code owns.
#[inline(always)]
pub unsafe fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: the caller guarantees the address is a mapped device register.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Writes a 32-bit MMIO register with one `mov dword ptr [reg], eax`
/// (`bench=mmio`: the same instruction for every write, never unrolled into
/// other registers).
///
/// # Safety
/// `addr` must be a mapped device register whose write has no effect on
/// memory that Rust code owns.
#[inline(always)]
pub unsafe fn mmio_store32_eax(addr: u64, value: u32) {
    // SAFETY: the caller guarantees the address is a mapped device register.
    unsafe {
        asm!("mov dword ptr [{addr}], eax", addr = in(reg) addr, in("eax") value,
            options(nostack, preserves_flags))
    }
}
