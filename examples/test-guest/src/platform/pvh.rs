//! The PVH `hvm_start_info` structure (Xen `arch-x86/hvm/start_info.h`).

use crate::platform::phys::{self, Le};
use crate::println;

const MAGIC: u32 = 0x336e_c578;
/// Largest command line kept.
pub const CMDLINE_MAX: usize = 4096;
/// Largest number of memory-map entries kept.
pub const MEMMAP_MAX: usize = 64;

/// One `hvm_memmap_table_entry`.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl MemEntry {
    /// E820 type 1.
    pub fn is_ram(&self) -> bool {
        self.kind == 1
    }
}

/// What the guest keeps from the start info. It is copied out because the
/// AP trampoline and later work may overwrite low memory.
pub struct StartInfo {
    /// Whether `%ebx` pointed at a valid start info.
    pub valid: bool,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    memmap: [MemEntry; MEMMAP_MAX],
    memmap_len: usize,
    /// Physical address of the RSDP (0 when not given).
    pub rsdp_paddr: u64,
}

impl StartInfo {
    /// Reads the start info at physical address `paddr`.
    pub fn read(paddr: u64) -> StartInfo {
        let mut info = StartInfo {
            valid: false,
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            memmap: [MemEntry::default(); MEMMAP_MAX],
            memmap_len: 0,
            rsdp_paddr: 0,
        };
        let Some(si) = phys::bytes(paddr, 56) else {
            return info;
        };
        if si.u32_at(0) != Some(MAGIC) {
            return info;
        }
        info.valid = true;
        let version = si.u32_at(4).unwrap_or(0);
        info.rsdp_paddr = si.u64_at(32).unwrap_or(0);

        let cmdline_paddr = si.u64_at(24).unwrap_or(0);
        if cmdline_paddr != 0 {
            // Read up to the NUL, page by page, never past the mapping.
            let mut len = 0;
            while len < CMDLINE_MAX {
                match phys::bytes(cmdline_paddr + len as u64, 1) {
                    Some(&[0]) | None => break,
                    Some(&[b]) => info.cmdline[len] = b,
                    Some(_) => break,
                }
                len += 1;
            }
            info.cmdline_len = len;
        }

        if version >= 1 {
            let map = si.u64_at(40).unwrap_or(0);
            let entries = si.u32_at(48).unwrap_or(0) as usize;
            let n = entries.min(MEMMAP_MAX);
            if let Some(table) = phys::bytes(map, n * 24) {
                for (i, e) in table.chunks_exact(24).enumerate() {
                    info.memmap[i] = MemEntry {
                        addr: e.u64_at(0).unwrap_or(0),
                        size: e.u64_at(8).unwrap_or(0),
                        kind: e.u32_at(16).unwrap_or(0),
                    };
                }
                info.memmap_len = n;
            }
        }
        info
    }

    /// The command line (non-UTF-8 bytes make it empty).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The memory map.
    pub fn memmap(&self) -> &[MemEntry] {
        &self.memmap[..self.memmap_len]
    }
}

/// The name of an E820 type in the `memmap:` lines ("" for other types).
fn kind_name(kind: u32) -> &'static str {
    match kind {
        1 => "ram",
        2 => "reserved",
        3 => "acpi",
        4 => "nvs",
        5 => "unusable",
        _ => "",
    }
}

/// Prints `memmap: <start>-<end> <kind>` per entry and `memory: <N> MiB
/// ram`, or `memmap: none`.
pub fn print_memmap(info: &StartInfo) {
    // Zero-sized entries (QEMU's firmware appends one) carry nothing.
    let mut map = info.memmap().iter().filter(|e| e.size != 0).peekable();
    if map.peek().is_none() {
        println!("memmap: none");
        return;
    }
    let mut ram = 0u64;
    for e in map {
        let end = e.addr.saturating_add(e.size - 1);
        match kind_name(e.kind) {
            "" => println!("memmap: 0x{:016x}-0x{:016x} type {}", e.addr, end, e.kind),
            kind => println!("memmap: 0x{:016x}-0x{:016x} {}", e.addr, end, kind),
        }
        if e.is_ram() {
            ram = ram.saturating_add(e.size);
        }
    }
    println!("memory: {} MiB ram", ram >> 20);
}
