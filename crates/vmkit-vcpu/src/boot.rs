//! Entry state: registers, segments, page tables, MSRs, FPU and LAPIC LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::{Error, Result};

use vmkit_boot::EntryPoint;
use vmkit_memory::layout::{BOOT_STACK, GDT_ADDR, GDT_SIZE, IDT_ADDR, PAGE_SIZE, PML4_ADDR};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// A GDT entry from its parts.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The segment register KVM expects for a GDT entry at `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64; 4]) -> Result<()> {
    const _: () = assert!(std::mem::size_of::<[u64; 4]>() as u64 <= GDT_SIZE);
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|_| Error::GuestMemory("GDT"))?;
    }
    Ok(())
}

/// Identity-maps the first GiB with 2 MiB pages at [`PML4_ADDR`].
fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    let pdpt = PML4_ADDR + PAGE_SIZE;
    let pd = PML4_ADDR + 2 * PAGE_SIZE;
    let err = |_| Error::GuestMemory("page tables");
    // Present | writable.
    mem.write_obj(pdpt | 0x3, GuestAddress(PML4_ADDR))
        .map_err(err)?;
    mem.write_obj(pd | 0x3, GuestAddress(pdpt)).map_err(err)?;
    for i in 0..512u64 {
        // Present | writable | page size (2 MiB).
        mem.write_obj((i << 21) | 0x83, GuestAddress(pd + i * 8))
            .map_err(err)?;
    }
    Ok(())
}

/// Sets registers, segments and (for 64-bit entry) page tables for the boot vCPU.
pub fn setup_entry<M: GuestMemoryBackend>(vcpu: &VcpuFd, mem: &M, entry: EntryPoint) -> Result<()> {
    let mut sregs = vcpu.get_sregs().map_err(Error::Sregs)?;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Linux64 { entry, boot_params } => {
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x808b, 0, 0xfffff), // TSS
            ];
            write_gdt(mem, &gdt)?;
            mem.write_obj(0u64, GuestAddress(IDT_ADDR))
                .map_err(|_| Error::GuestMemory("IDT"))?;
            write_page_tables(mem)?;
            load_segments(&mut sregs, &gdt);
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = entry.0;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = boot_params.0;
        }
        EntryPoint::Pvh { entry, start_info } => {
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
                gdt_entry(0xc093, 0, 0xfffff), // data
                gdt_entry(0x008b, 0, 0x67),    // TSS
            ];
            write_gdt(mem, &gdt)?;
            load_segments(&mut sregs, &gdt);
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry.0;
            regs.rbx = start_info.0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(Error::Sregs)?;
    vcpu.set_regs(&regs).map_err(Error::Regs)?;
    Ok(())
}

fn load_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// MSRs given a defined value at boot (if KVM can save them on this host).
const BOOT_MSRS: &[(u32, u64)] = &[
    (0x174, 0),             // IA32_SYSENTER_CS
    (0x175, 0),             // IA32_SYSENTER_ESP
    (0x176, 0),             // IA32_SYSENTER_EIP
    (0xc000_0081, 0),       // STAR
    (0xc000_0082, 0),       // LSTAR
    (0xc000_0083, 0),       // CSTAR
    (0xc000_0084, 0),       // SYSCALL_MASK
    (0xc000_0102, 0),       // KERNEL_GS_BASE
    (0x10, 0),              // IA32_TSC
    (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
    (0x2ff, (1 << 11) | 6), // MTRRdefType: MTRRs on, write-back default
];

/// Sets the boot MSRs that KVM lists as supported in `supported` (from
/// `Kvm::get_msr_index_list`); returns how many were set.
pub fn setup_msrs(vcpu: &VcpuFd, supported: &[u32]) -> Result<usize> {
    let entries: Vec<kvm_msr_entry> = BOOT_MSRS
        .iter()
        .filter(|(i, _)| supported.contains(i))
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Msrs(None))?;
    let set = vcpu.set_msrs(&msrs).map_err(|e| Error::Msrs(Some(e)))?;
    if set != entries.len() {
        return Err(Error::MsrRefused(entries[set].index));
    }
    Ok(set)
}

/// x87 control word and MXCSR as after a processor reset.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::Fpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as firmware leaves them.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().map_err(Error::Lapic)?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: &mut [i8] = &mut lapic.regs[off..off + 4];
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(bytes.iter()) {
            *d = *s as u8;
        }
        let nv = set_delivery_mode(u32::from_le_bytes(v), mode).to_le_bytes();
        for (d, s) in bytes.iter_mut().zip(nv) {
            *d = s as i8;
        }
    }
    vcpu.set_lapic(&lapic).map_err(Error::Lapic)
}

/// Clears the CR4 bits that enable features `template` hides (after [`setup_entry`]), so that
/// control registers and CPUID agree. Does nothing (no ioctl) when no such bit is set.
pub fn restrict_cr4(vcpu: &VcpuFd, template: crate::CpuTemplate) -> Result<()> {
    let clear = template.cr4_clear();
    if clear == 0 {
        return Ok(());
    }
    let mut sregs = vcpu.get_sregs().map_err(Error::Sregs)?;
    if sregs.cr4 & clear != 0 {
        sregs.cr4 &= !clear;
        vcpu.set_sregs(&sregs).map_err(Error::Sregs)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_kvm_segments() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.selector, code64.type_, code64.l, code64.db),
            (8, 0xb, 1, 0)
        );
        assert_eq!(
            (code64.present, code64.s, code64.g, code64.limit),
            (1, 1, 1, 0xffff_ffff)
        );
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.selector, data.type_, data.base), (16, 3, 0));
        let tss = segment(gdt_entry(0x008b, 0x1234_5678, 0x67), 3);
        assert_eq!(
            (tss.base, tss.limit, tss.s, tss.g),
            (0x1234_5678, 0x67, 0, 0)
        );
    }

    #[test]
    fn delivery_mode_only_touches_its_bits() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpt: u64 = mem.read_obj(GuestAddress(0xa000)).unwrap();
        assert_eq!(pdpt, 0xb003);
        let last: u64 = mem.read_obj(GuestAddress(0xb000 + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
    }

    #[test]
    fn too_small_memory_is_an_error() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(matches!(
            write_page_tables(&mem),
            Err(Error::GuestMemory(_))
        ));
    }
}
