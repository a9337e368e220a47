//! Boot code: the PVH entry, static page tables, GDT/TSS/IDT storage, the
//! interrupt and exception stubs, and the AP start-up trampoline.
//!
//! Everything here runs at CPL0, which the host emulates instruction by
//! instruction, so it is kept to straight-line code: the page tables are
//! assembled statically, the IDT is filled later from CPL3 (all memory is
//! mapped user-accessible), and the BSP leaves for CPL3 (IOPL=3) with `iretq`
//! as soon as long mode is on. Interrupt handlers bump a counter, EOI and
//! return; an exception switches back to CPL3 to report itself.
//!
//! Segment selectors:
//! `0x08` kernel code 64, `0x10` kernel data, `0x18` kernel code 32 (AP
//! start-up only), `0x23` user data, `0x2b` user code 64, `0x30` TSS.

use core::sync::atomic::{AtomicU32, AtomicU64};

/// Maximum number of CPUs the guest brings up (APs beyond it are not started).
pub const MAX_CPUS: usize = 64;
/// Physical address the AP trampoline is copied to (SIPI vector 0x08).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;

/// Vectors with a handler (see `idt.rs`).
pub const VECTOR_TIMER: u8 = 0x20;
/// IOAPIC-routed COM1 interrupt.
pub const VECTOR_SERIAL: u8 = 0x24;
/// IOAPIC-routed virtio-mmio device interrupt (`test=virtio-irq`).
pub const VECTOR_VIRTIO: u8 = 0x25;
/// First MSI-X vector of `test=virtio-irq` on virtio-pci (table entry n
/// gets `VECTOR_MSIX + n`).
pub const VECTOR_MSIX: u8 = 0x26;
/// Number of MSI-X vectors with a handler (`VECTOR_MSIX..VECTOR_MSIX + 4`).
pub const MSIX_VECTORS: usize = 4;
/// Per-CPU LAPIC timer (`test=soak`): counts per APIC ID, EOIs.
pub const VECTOR_CPU_TIMER: u8 = 0x2a;
/// IPI that makes the CPU taking it program its own LAPIC timer from
/// `cpu_timer_lvt` and `cpu_timer_initial` (`test=soak`; an AP parked at
/// CPL0 cannot be reached otherwise).
pub const VECTOR_TIMER_SETUP: u8 = 0x2b;
/// LAPIC spurious-interrupt vector.
pub const VECTOR_SPURIOUS: u8 = 0xff;

mod raw {
    use super::MAX_CPUS;
    use core::sync::atomic::{AtomicU32, AtomicU64};

    // Symbols defined by the assembly below.
    extern "C" {
        pub static exc_stub_table: [u64; 32];
        pub fn irq_timer();
        pub fn irq_serial();
        pub fn irq_virtio();
        pub static irq_msix_table: [u64; super::MSIX_VECTORS];
        pub static msix_irqs: [AtomicU64; super::MSIX_VECTORS];
        pub static msix_cpu_irqs: [AtomicU64; MAX_CPUS];
        pub fn irq_spurious();
        pub fn irq_cpu_timer();
        pub fn irq_timer_setup();
        pub static cpu_timer_ticks: [AtomicU64; MAX_CPUS];
        pub static cpu_timer_lvt: AtomicU32;
        pub static cpu_timer_initial: AtomicU32;
        pub fn cpl3_halt() -> !;
        pub static mut idt: [[u64; 2]; 256];
        pub static timer_ticks: AtomicU64;
        pub static serial_irqs: AtomicU64;
        pub static virtio_irqs: AtomicU64;
        pub static mut boot_pml4: [u64; 512];
        pub static mut boot_pdpt: [u64; 512];
        pub static lapic_eoi_addr: AtomicU64;
        pub static ap_online: AtomicU32;
        pub static ap_apic_ids: [AtomicU32; MAX_CPUS];
        pub static ap_trampoline_start: u8;
        pub static ap_trampoline_end: u8;
    }
}

/// Handler address of exception stub `vector` (0..32).
pub fn exception_stub(vector: u8) -> u64 {
    // SAFETY: an immutable table of 32 addresses assembled below.
    unsafe { raw::exc_stub_table[usize::from(vector) % 32] }
}

/// Handler addresses of the interrupt stubs.
pub fn irq_timer() -> u64 {
    raw::irq_timer as *const () as u64
}
/// COM1 interrupt stub.
pub fn irq_serial() -> u64 {
    raw::irq_serial as *const () as u64
}
/// virtio-mmio interrupt stub (counts and EOIs; the device is acknowledged
/// from CPL3).
pub fn irq_virtio() -> u64 {
    raw::irq_virtio as *const () as u64
}
/// MSI-X stub `n` (vector `VECTOR_MSIX + n`): counts per vector and per
/// APIC ID of the CPU that took it, EOIs.
pub fn irq_msix(n: usize) -> u64 {
    // SAFETY: an immutable table of MSIX_VECTORS addresses assembled below.
    unsafe { raw::irq_msix_table[n % MSIX_VECTORS] }
}

/// MSI-X interrupts seen, per vector (index n = `VECTOR_MSIX + n`).
pub fn msix_irqs() -> &'static [AtomicU64; MSIX_VECTORS] {
    // SAFETY: an 8-aligned array in .data, only accessed atomically.
    unsafe { &raw::msix_irqs }
}

/// MSI-X interrupts seen, per APIC ID of the CPU that took them (ID & 63).
pub fn msix_cpu_irqs() -> &'static [AtomicU64; MAX_CPUS] {
    // SAFETY: an 8-aligned array in .data, only accessed atomically.
    unsafe { &raw::msix_cpu_irqs }
}

/// Spurious-interrupt stub (no EOI).
pub fn irq_spurious() -> u64 {
    raw::irq_spurious as *const () as u64
}
/// Per-CPU timer stub (`VECTOR_CPU_TIMER`).
pub fn irq_cpu_timer() -> u64 {
    raw::irq_cpu_timer as *const () as u64
}
/// Timer set-up stub (`VECTOR_TIMER_SETUP`).
pub fn irq_timer_setup() -> u64 {
    raw::irq_timer_setup as *const () as u64
}
/// `VECTOR_CPU_TIMER` interrupts seen, per APIC ID of the CPU that took
/// them (ID & 63).
pub fn cpu_timer_ticks() -> &'static [AtomicU64; MAX_CPUS] {
    // SAFETY: an 8-aligned array in .data, only accessed atomically.
    unsafe { &raw::cpu_timer_ticks }
}
/// What `VECTOR_TIMER_SETUP` writes to the LVT timer register and the
/// initial count of the CPU that takes it.
pub fn cpu_timer_setup() -> (&'static AtomicU32, &'static AtomicU32) {
    // SAFETY: two 4-aligned longs in .data, only accessed atomically (the
    // stub's plain aligned loads are atomic on x86).
    unsafe { (&raw::cpu_timer_lvt, &raw::cpu_timer_initial) }
}
/// Halts this CPU for good, from CPL3: `ud2` at a known address, which the
/// #UD handler turns into a `cli; hlt` loop at CPL0.
pub fn halt_forever() -> ! {
    // SAFETY: `cpl3_halt` is a lone `ud2`; the #UD stub recognises its
    // address and never returns.
    unsafe { raw::cpl3_halt() }
}

/// The 256 gates of the IDT (loaded at boot, filled from CPL3).
pub fn idt() -> *mut [u64; 2] {
    core::ptr::addr_of_mut!(raw::idt).cast()
}

/// LAPIC timer interrupts seen.
pub fn timer_ticks() -> &'static AtomicU64 {
    // SAFETY: an 8-aligned quad in .data, only accessed atomically.
    unsafe { &raw::timer_ticks }
}

/// COM1 interrupts seen.
pub fn serial_irqs() -> &'static AtomicU64 {
    // SAFETY: an 8-aligned quad in .data, only accessed atomically.
    unsafe { &raw::serial_irqs }
}

/// virtio-mmio interrupts seen.
pub fn virtio_irqs() -> &'static AtomicU64 {
    // SAFETY: an 8-aligned quad in .data, only accessed atomically.
    unsafe { &raw::virtio_irqs }
}

/// The page-directory-pointer table of the identity mapping (entries 0-3
/// cover 0-4 GiB; the rest are free for MMIO above 4 GiB, see `drivers/mmio.rs`).
pub fn boot_pdpt() -> *mut u64 {
    core::ptr::addr_of_mut!(raw::boot_pdpt).cast()
}

/// The PML4 (entry 0 is the identity mapping's PDPT; entry 1 is free for
/// `bench=mmio`'s alias window, see `bench/exits.rs`).
pub fn boot_pml4() -> *mut u64 {
    core::ptr::addr_of_mut!(raw::boot_pml4).cast()
}

/// Where the interrupt stubs write 0 for an EOI.
pub fn lapic_eoi_addr() -> &'static AtomicU64 {
    // SAFETY: an 8-aligned quad in .data, only accessed atomically.
    unsafe { &raw::lapic_eoi_addr }
}

/// Number of APs that reached long mode.
pub fn ap_online() -> &'static AtomicU32 {
    // SAFETY: a 4-aligned long in .data, only accessed atomically (lock inc).
    unsafe { &raw::ap_online }
}

/// Per CPU index: `0x8000_0000 | apic_id` once that CPU is up.
pub fn ap_apic_ids() -> &'static [AtomicU32; MAX_CPUS] {
    // SAFETY: a 4-aligned array in .data, written once per AP with a plain
    // aligned store (atomic on x86) and read atomically.
    unsafe { &raw::ap_apic_ids }
}

/// The AP trampoline code, to be copied to `TRAMPOLINE_ADDR`.
pub fn ap_trampoline() -> &'static [u8] {
    // SAFETY: the two labels delimit the trampoline in the (immutable) text
    // of the image; end follows start in the same section.
    unsafe {
        let start = core::ptr::addr_of!(raw::ap_trampoline_start);
        let end = core::ptr::addr_of!(raw::ap_trampoline_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

core::arch::global_asm!(
    r#"
    .set KERNEL_CS,   0x08
    .set KERNEL_DS,   0x10
    .set KERNEL_CS32, 0x18
    .set USER_DS,     0x23
    .set USER_CS,     0x2b
    .set TSS_SEL,     0x30
    .set CR4_BITS,    0x620          /* PAE | OSFXSR | OSXMMEXCPT */
    .set CR0_BITS,    0x80000033     /* PG | NE | ET | MP | PE (EM clear) */
    .set USER_RFLAGS, 0x3002         /* IOPL=3, IF=0 */
    .set MAX_CPUS,    64

/* ---- PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18) ---- */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

/* ---- BSP entry: 32-bit protected mode, paging off, %ebx = hvm_start_info ---- */
    .section .text.boot, "ax", @progbits
    .code32
    .global pvh_start32
pvh_start32:
    cli
    mov %ebx, pvh_start_info_ptr
    lgdt gdt_ptr
    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx           /* EFER */
    rdmsr
    or $0x100, %eax                 /* LME */
    wrmsr
    mov $CR0_BITS, %eax
    mov %eax, %cr0
    ljmp $KERNEL_CS, $long_mode_entry

    .code64
long_mode_entry:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov $kernel_stack_top, %esp

    /* TSS descriptor: limit 0x2068 (with I/O bitmap), type 0x89, base split. */
    mov $tss, %eax
    mov %rax, %rdx
    shl $16, %rax
    movabs $0xFFFFFF0000, %rcx
    and %rcx, %rax
    shr $24, %rdx
    shl $56, %rdx
    or %rdx, %rax
    movabs $0x0000890000002068, %rcx
    or %rcx, %rax
    mov %rax, gdt_tss
    mov $TSS_SEL, %eax
    ltr %ax
    lidt idt_ptr

    /* Leave for CPL3 with IOPL=3: rust_main(start_info_paddr). */
    mov pvh_start_info_ptr, %edi
    push $USER_DS
    push $user_stack_top - 8
    push $USER_RFLAGS
    push $USER_CS
    push $rust_main
    iretq

/* ---- exceptions: report from CPL3 ---- */
    .section .text.interrupts, "ax", @progbits
    .macro EXC_NOERR n
exc_stub_\n:
    push $0
    push $\n
    jmp exc_common
    .endm
    .macro EXC_ERR n
exc_stub_\n:
    push $\n
    jmp exc_common
    .endm

    .irp n, 0,1,2,3,4,5,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    EXC_NOERR \n
    .endr
    .irp n, 8,10,11,12,14,17,21,29,30
    EXC_ERR \n
    .endr

/* #GP. Should port I/O or cli/sti fault at CPL3 after all (a hypervisor
 * that honours neither IOPL=3 nor the TSS I/O bitmap), complete it here at
 * CPL0, the fast path (out %al,%dx) first. Anything else is reported. */
exc_stub_13:
    testb $3, 16(%rsp)               /* CS of the frame: from CPL3? */
    jz 9f
    push %rcx                        /* err at 8, rip 16, cs 24, rflags 32 */
    mov 16(%rsp), %rcx
    movzbl (%rcx), %ecx
    cmp $0xee, %cl
    jne 1f
    out %al, %dx
    jmp 7f
1:  cmp $0xec, %cl
    jne 2f
    in %dx, %al
    jmp 7f
2:  cmp $0xef, %cl
    jne 3f
    out %eax, %dx
    jmp 7f
3:  cmp $0xed, %cl
    jne 4f
    in %dx, %eax
    jmp 7f
4:  cmp $0xfa, %cl
    jne 5f
    andq $~0x200, 32(%rsp)           /* cli: clear IF in the saved RFLAGS */
    jmp 7f
5:  cmp $0xfb, %cl
    jne 6f
    orq $0x200, 32(%rsp)             /* sti */
    jmp 7f
6:  cmp $0x66, %cl
    jne 8f
    mov 16(%rsp), %rcx
    movzbl 1(%rcx), %ecx
    incq 16(%rsp)                    /* skip the operand-size prefix */
    cmp $0xef, %cl
    jne 61f
    out %ax, %dx
    jmp 7f
61: cmp $0xed, %cl
    jne 62f
    in %dx, %ax
    jmp 7f
62: decq 16(%rsp)
    jmp 8f
7:  pop %rcx
    add $8, %rsp                     /* error code */
    incq (%rsp)                      /* past the one-byte instruction */
    iretq
8:  pop %rcx
9:  push $13
    jmp exc_common

/* #UD. `ud2` at `cpl3_halt` is how CPL3 code asks to halt for good: the
 * kvm_pvm host turns every `int n` at CPL3 into #UD, so no DPL3 gate is used. */
exc_stub_6:
    cmpq $cpl3_halt, (%rsp)
    je halt_forever_cpl0
    push $0
    push $6
    jmp exc_common

exc_common:
    lock incl exc_nesting
    cmpl $1, exc_nesting
    jne halt_forever_cpl0            /* an exception while reporting one */
    pop %rdi                         /* vector */
    pop %rdx                         /* error code */
    mov (%rsp), %rsi                 /* rip */
    mov %cr2, %rcx
    push $USER_DS
    push $exc_stack_top - 8
    push $USER_RFLAGS
    push $USER_CS
    push $guest_exception_report
    iretq

    .global cpl3_halt
cpl3_halt:
    ud2

    .global halt_forever_cpl0
halt_forever_cpl0:
    cli
1:  hlt
    jmp 1b

    .global irq_timer
irq_timer:
    push %rax
    lock incq timer_ticks
    mov lapic_eoi_addr, %rax
    movl $0, (%rax)
    pop %rax
    iretq

    .global irq_serial
irq_serial:
    push %rax
    push %rdx
    mov $0x3FA, %dx                  /* COM1 IIR: reading it acknowledges THRE */
    in %dx, %al
    lock incq serial_irqs
    mov lapic_eoi_addr, %rax
    movl $0, (%rax)
    pop %rdx
    pop %rax
    iretq

    .global irq_virtio
irq_virtio:
    push %rax
    lock incq virtio_irqs
    mov lapic_eoi_addr, %rax
    movl $0, (%rax)
    pop %rax
    iretq

/* MSI-X: count per vector and per APIC ID (LAPIC ID register, 0x90 below
 * EOI), EOI. Runs on whichever CPU the message names: the BSP (from CPL3,
 * on RSP0) or an AP (parked at CPL0 with IF=1, on its own stack). */
    .macro MSIX_STUB n
irq_msix_\n:
    push %rax
    push %rcx
    lock incq msix_irqs + 8 * \n
    mov lapic_eoi_addr, %rax
    mov -0x90(%rax), %ecx
    shr $24, %ecx
    and $(MAX_CPUS - 1), %ecx
    lock incq msix_cpu_irqs(,%rcx,8)
    movl $0, (%rax)
    pop %rcx
    pop %rax
    iretq
    .endm
    .irp n, 0,1,2,3
    MSIX_STUB \n
    .endr

    .global irq_spurious
irq_spurious:
    iretq
/* Per-CPU LAPIC timer (test=soak): count per APIC ID, EOI. */
    .global irq_cpu_timer
irq_cpu_timer:
    push %rax
    push %rcx
    mov lapic_eoi_addr, %rax
    mov -0x90(%rax), %ecx
    shr $24, %ecx
    and $(MAX_CPUS - 1), %ecx
    lock incq cpu_timer_ticks(,%rcx,8)
    movl $0, (%rax)
    pop %rcx
    pop %rax
    iretq
/* Timer set-up IPI (test=soak): this CPU's LAPIC timer divides by 16, its
 * LVT and initial count become cpu_timer_lvt and cpu_timer_initial
 * (offsets from EOI at 0xB0: divide 0x3E0, LVT 0x320, initial 0x380). */
    .global irq_timer_setup
irq_timer_setup:
    push %rax
    push %rcx
    mov lapic_eoi_addr, %rax
    movl $3, 0x330(%rax)
    mov cpu_timer_lvt, %ecx
    mov %ecx, 0x270(%rax)
    mov cpu_timer_initial, %ecx
    mov %ecx, 0x2d0(%rax)
    movl $0, (%rax)
    pop %rcx
    pop %rax
    iretq

/* ---- AP start-up: copied to 0x8000, entered in real mode at 0800:0000 ---- */
    .section .text.ap_trampoline, "ax", @progbits
    .code16
    .global ap_trampoline_start
ap_trampoline_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (ap_gdt_ptr - ap_trampoline_start + 0x8000)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $KERNEL_CS32, $(ap_prot32 - ap_trampoline_start + 0x8000)

    .code32
ap_prot32:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov $CR4_BITS, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $CR0_BITS, %eax
    mov %eax, %cr0
    ljmp $KERNEL_CS, $ap_long_entry

    .balign 8
ap_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
    .global ap_trampoline_end
ap_trampoline_end:

    .section .text.ap, "ax", @progbits
    .code64
ap_long_entry:
    mov $KERNEL_DS, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    lidt idt_ptr
    mov $1, %eax
    lock xadd %eax, ap_next_index    /* this CPU's index, from 1 */
    cmp $MAX_CPUS, %eax
    jae ap_park
    mov %eax, %esi
    shl $12, %esi
    lea ap_stacks(%rsi), %rsp        /* top of stack index-1 */
    push %rax
    mov $1, %eax
    cpuid
    shr $24, %ebx                    /* initial APIC ID */
    or $0x80000000, %ebx
    pop %rax
    mov %ebx, ap_apic_ids(,%rax,4)
    lock incl ap_online
    /* Park able to take interrupts (MSI-X aimed at this CPU): the LAPIC
     * software-enabled (SVR, 0x40 above EOI: spurious 0xFF), IF=1. Only
     * what names this APIC arrives: its LVTs are masked from reset and the
     * IOAPIC entries name the BSP. */
    mov lapic_eoi_addr, %rax
    movl $0x1ff, 0x40(%rax)
    sti
2:  hlt
    jmp 2b
ap_park:                             /* no stack: never takes interrupts */
    cli
3:  hlt
    jmp 3b

/* ---- data ---- */
    .section .data.pagetables, "aw", @progbits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7            /* P | RW | US */
    .fill 511, 8, 0
    .global boot_pdpt
boot_pdpt:
    .quad boot_pd + 0x0007
    .quad boot_pd + 0x1007
    .quad boot_pd + 0x2007
    .quad boot_pd + 0x3007
    .fill 508, 8, 0
boot_pd:                             /* 0-4 GiB identity, 2 MiB pages, user */
    pd_addr = 0
    .rept 1536
    .quad pd_addr + 0x87             /* P | RW | US | PS */
    pd_addr = pd_addr + 0x200000
    .endr
    .rept 512
    .quad pd_addr + 0x9f             /* ... | PWT | PCD: MMIO hole */
    pd_addr = pd_addr + 0x200000
    .endr

    .section .data.boot, "aw", @progbits
    .balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF         /* 0x08 kernel code 64 */
    .quad 0x00CF92000000FFFF         /* 0x10 kernel data */
    .quad 0x00CF9A000000FFFF         /* 0x18 kernel code 32 */
    .quad 0x00CFF2000000FFFF         /* 0x20 user data */
    .quad 0x00AFFA000000FFFF         /* 0x28 user code 64 */
gdt_tss:
    .quad 0                          /* 0x30 TSS, built at boot */
    .quad 0
gdt_end:
    .balign 8
    .word 0, 0, 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .word 0, 0, 0
idt_ptr:
    .word 256 * 16 - 1
    .quad idt

    .balign 16
tss:
    .long 0
    .quad kernel_stack_top           /* RSP0 */
    .quad 0, 0                       /* RSP1, RSP2 */
    .quad 0
    .fill 7, 8, 0                    /* IST */
    .quad 0
    .word 0
    .word 104                        /* I/O permission bitmap offset */
    /* Every port allowed at CPL3. IOPL=3 alone would do on hardware, but
     * kvm_pvm runs CPL3 natively and only honours the bitmap for in/out. */
    .fill 8192, 1, 0
    .byte 0xff

    .balign 8
pvh_start_info_ptr: .quad 0
    .global lapic_eoi_addr
lapic_eoi_addr:     .quad 0xFEE000B0
    .global timer_ticks
timer_ticks:        .quad 0
    .global serial_irqs
serial_irqs:        .quad 0
    .global virtio_irqs
virtio_irqs:        .quad 0
    .global msix_irqs
msix_irqs:          .fill 4, 8, 0
    .global msix_cpu_irqs
msix_cpu_irqs:      .fill MAX_CPUS, 8, 0
    .global cpu_timer_ticks
cpu_timer_ticks:    .fill MAX_CPUS, 8, 0
    .global cpu_timer_lvt
cpu_timer_lvt:      .long 0x10000
    .global cpu_timer_initial
cpu_timer_initial:  .long 0
exc_nesting:        .long 0
ap_next_index:      .long 1
    .global ap_online
ap_online:          .long 0
    .global ap_apic_ids
ap_apic_ids:        .fill MAX_CPUS, 4, 0

    .section .rodata.exc_table, "a", @progbits
    .balign 8
    .global exc_stub_table
exc_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc_stub_\n
    .endr
    .global irq_msix_table
irq_msix_table:
    .quad irq_msix_0, irq_msix_1, irq_msix_2, irq_msix_3

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global idt
idt:        .skip 256 * 16
kernel_stack:
            .skip 16384
kernel_stack_top:
/* The Rust code's stack (CPL3). test=virtio-net took 89 KB (smoltcp and
 * virtio-drivers' 256-entry queues built on the stack): 64 KiB was not
 * enough, and an overflow runs into kernel_stack and what lies below it
 * (no guard page under the 2 MiB boot mapping). */
user_stack: .skip 262144
user_stack_top:
exc_stack:  .skip 16384
exc_stack_top:
ap_stacks:  .skip MAX_CPUS * 4096

    .text
"#,
    options(att_syntax)
);
