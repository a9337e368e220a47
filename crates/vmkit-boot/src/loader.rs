//! Kernel loading: format detection, kernel, command line, initrd and boot parameters.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::e820::{memory_map, MemoryMapEntry};
use crate::error::{Error, Result};
use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_MEMORY_START, MMIO_GAP_START, PAGE_SIZE, PVH_INFO_END,
    PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// Offset of the setup header in a bzImage (and in `boot_params`).
const SETUP_HEADER_OFFSET: u64 = 0x1F1;
/// "HdrS", the setup header magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `boot_flag` value of a valid setup header.
const BOOT_FLAG_MAGIC: u16 = 0xAA55;
/// `type_of_loader`: "undefined" boot loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xFF;
/// Alignment put in the default setup header of an ELF kernel.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Offset of the 64-bit entry point (`startup_64`) from the protected-mode kernel start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Oldest supported boot protocol: 2.06 (has `cmdline_size`).
const MIN_BOOT_PROTOCOL: u16 = 0x0206;
/// Boot protocol 2.10 added `pref_address` and `init_size`.
const BOOT_PROTOCOL_2_10: u16 = 0x020A;
/// Boot protocol 2.12 added `xloadflags`.
const BOOT_PROTOCOL_2_12: u16 = 0x020C;
/// `loadflags`: protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 1 << 0;
/// `xloadflags`: the kernel has the legacy 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Maximum number of E820 entries in the zero page.
const E820_MAX_ENTRIES: usize = 128;

/// How to enter the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProtocolChoice {
    /// bzImage: 64-bit Linux boot protocol. ELF: PVH if the image has a PVH note
    /// (`XEN_ELFNOTE_PHYS32_ENTRY`), otherwise the 64-bit Linux entry (`startup_64`).
    #[default]
    Auto,
    /// Always use the 64-bit Linux boot protocol, even for an ELF with a PVH note.
    Linux64,
}

/// What to load besides the kernel.
#[derive(Debug, Default)]
pub struct BootConfig<'a> {
    /// Kernel command line: at most 4095 bytes (fewer if a bzImage's `cmdline_size` says
    /// so), no NUL byte. Leading and trailing whitespace is trimmed
    /// (`linux_loader::cmdline::Cmdline`).
    pub cmdline: &'a str,
    /// Initial ramdisk, read straight into guest memory.
    pub initrd: Option<&'a mut File>,
    /// Boot protocol selection.
    pub protocol: ProtocolChoice,
    /// Guest address of the ACPI RSDP, passed as `acpi_rsdp_addr` / `rsdp_paddr`.
    pub rsdp: Option<GuestAddress>,
}

/// The format of the kernel image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage (setup header with "HdrS").
    BzImage,
    /// A 64-bit ELF without a PVH note.
    Elf,
    /// A 64-bit ELF with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`).
    ElfPvh,
}

/// Where and how the vCPU must enter the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 64-bit Linux boot protocol: long mode with identity-mapped page tables,
    /// `RIP = entry`, `RSI = boot_params`.
    Linux64 {
        /// Entry address (`startup_64`).
        entry: GuestAddress,
        /// Address of the zero page.
        boot_params: GuestAddress,
    },
    /// PVH: 32-bit protected mode, paging off, `EIP = entry`, `EBX = start_info`.
    Pvh {
        /// PVH entry address from the ELF note.
        entry: GuestAddress,
        /// Address of `hvm_start_info`.
        start_info: GuestAddress,
    },
}

/// Result of [`load`].
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// How to enter the kernel.
    pub entry: EntryPoint,
    /// The detected image format.
    pub format: KernelFormat,
    /// Lowest guest address the kernel image was loaded to.
    pub kernel_load: GuestAddress,
    /// End (exclusive) of the memory the kernel needs: for an ELF, the end of its highest
    /// segment (`p_memsz` included); for a bzImage, the end of its decompression buffer
    /// (`max(pref_address, load address) + init_size`), or of the loaded image if larger.
    pub kernel_end: GuestAddress,
    /// Guest address and size of the initrd.
    pub initrd: Option<(GuestAddress, u64)>,
    /// Guest address of the command line and its length including the NUL terminator.
    pub cmdline: (GuestAddress, usize),
    /// The bzImage setup header as read from the image (with `code32_start` set to the load
    /// address); `None` for an ELF.
    pub setup_header: Option<setup_header>,
}

/// Loads a kernel (bzImage, ELF vmlinux or PVH ELF, detected from the image) into guest
/// memory, with its command line, initrd and boot parameters (zero page with E820 map, or
/// PVH `hvm_start_info` with module list and memory map).
///
/// Addresses used: see [`vmkit_memory::layout`]. The initrd goes page-aligned at the top of the RAM
/// region holding 1 MiB, below 0xC000_0000 (and `initrd_addr_max` for a bzImage).
///
/// `GuestMemoryBackend` is vm-memory 0.18's name for the physical guest memory trait
/// (formerly `GuestMemory`); `GuestMemoryMmap` implements it.
pub fn load<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    cfg: BootConfig<'_>,
) -> Result<LoadedKernel> {
    match detect(kernel)? {
        Detected::BzImage(hdr) => load_bzimage(mem, kernel, hdr, cfg),
        Detected::Elf(ehdr) => load_elf(mem, kernel, &ehdr, cfg),
    }
}

enum Detected {
    BzImage(setup_header),
    Elf(linux_loader::elf::Elf64_Ehdr),
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { context, source }
}

/// Reads exactly `buf.len()` bytes at `offset`; `Ok(false)` if the file is too short.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8], context: &'static str) -> Result<bool> {
    file.seek(SeekFrom::Start(offset)).map_err(io(context))?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(Error::Io { context, source: e }),
    }
}

fn detect(kernel: &mut File) -> Result<Detected> {
    let mut ehdr = linux_loader::elf::Elf64_Ehdr::default();
    let mut magic = [0u8; 4];
    if read_at(kernel, 0, &mut magic, "reading the kernel image")? && magic == *b"\x7fELF" {
        if !read_at(kernel, 0, ehdr.as_mut_slice(), "reading the ELF header")? {
            return Err(Error::UnsupportedKernel("truncated ELF header".into()));
        }
        return Ok(Detected::Elf(ehdr));
    }
    let mut hdr = setup_header::default();
    if read_at(
        kernel,
        SETUP_HEADER_OFFSET,
        hdr.as_mut_slice(),
        "reading the bzImage setup header",
    )? && { hdr.header } == HDRS_MAGIC
    {
        return Ok(Detected::BzImage(hdr));
    }
    Err(Error::NotAKernel)
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    v.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// Checks that `[start, end)` is above 1 MiB and inside one guest memory region.
fn check_kernel_fits<M: GuestMemoryBackend>(mem: &M, start: u64, end: u64) -> Result<()> {
    let fits = start >= HIGH_MEMORY_START
        && end > start
        && mem
            .find_region(GuestAddress(start))
            .is_some_and(|r| end <= r.start_addr().raw_value().saturating_add(r.len()));
    if fits {
        Ok(())
    } else {
        Err(Error::KernelDoesNotFit {
            start,
            end,
            min: HIGH_MEMORY_START,
        })
    }
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    hdr: setup_header,
    cfg: BootConfig<'_>,
) -> Result<LoadedKernel> {
    let version = hdr.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(Error::UnsupportedKernel(format!(
            "bzImage boot protocol {}.{:02} is older than 2.06",
            version >> 8,
            version & 0xFF
        )));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(Error::UnsupportedKernel(
            "zImage (kernel loaded below 1 MiB) is not supported; LOADED_HIGH is not set".into(),
        ));
    }
    if version < BOOT_PROTOCOL_2_12 || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::UnsupportedKernel(
            "bzImage has no 64-bit entry point (XLF_KERNEL_64 not set in xloadflags)".into(),
        ));
    }

    let setup_sects = match hdr.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let setup_size = (setup_sects + 1) * 512;
    let file_len = kernel
        .seek(SeekFrom::End(0))
        .map_err(io("reading the kernel image size"))?;
    let payload = file_len
        .checked_sub(setup_size)
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::UnsupportedKernel("truncated bzImage".into()))?;

    let load = HIGH_MEMORY_START;
    let loaded_end = load.saturating_add(payload);
    let mut end = loaded_end;
    if version >= BOOT_PROTOCOL_2_10 {
        let kernel_alignment = hdr.kernel_alignment;
        let align = match kernel_alignment {
            a if a.is_power_of_two() => u64::from(a),
            _ => PAGE_SIZE,
        };
        // The decompressor runs at max(aligned load address, LOAD_PHYSICAL_ADDR =
        // pref_address) and needs init_size bytes there.
        let run_at = align_up(load, align).unwrap_or(load).max(hdr.pref_address);
        let buffer_end =
            run_at
                .checked_add(u64::from(hdr.init_size))
                .ok_or(Error::KernelDoesNotFit {
                    start: load,
                    end: u64::MAX,
                    min: HIGH_MEMORY_START,
                })?;
        end = end.max(buffer_end);
    }
    check_kernel_fits(mem, load, end)?;

    let res = BzImage::load(mem, Some(GuestAddress(load)), kernel, None).map_err(Error::Loader)?;
    let mut hdr = res.setup_header.unwrap_or(hdr);

    let cmdline_max = (hdr.cmdline_size as usize)
        .saturating_add(1)
        .min(CMDLINE_MAX_SIZE);
    let cmdline_len = write_cmdline(mem, cfg.cmdline, cmdline_max)?;

    let initrd_limit = (u64::from(hdr.initrd_addr_max) + 1).min(MMIO_GAP_START);
    let initrd = match cfg.initrd {
        Some(f) => Some(load_initrd(mem, f, end, initrd_limit)?),
        None => None,
    };

    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    let params = zero_page(mem, hdr, initrd, cfg.rsdp)?;
    write_zero_page(mem, &params)?;

    Ok(LoadedKernel {
        entry: EntryPoint::Linux64 {
            entry: GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET),
            boot_params: GuestAddress(ZERO_PAGE_START),
        },
        format: KernelFormat::BzImage,
        kernel_load: GuestAddress(load),
        kernel_end: GuestAddress(end),
        initrd,
        cmdline: (GuestAddress(CMDLINE_START), cmdline_len),
        setup_header: Some(hdr),
    })
}

fn load_elf<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    ehdr: &linux_loader::elf::Elf64_Ehdr,
    cfg: BootConfig<'_>,
) -> Result<LoadedKernel> {
    use linux_loader::elf::{
        Elf64_Phdr, EI_CLASS, EI_DATA, ELFCLASS32, ELFCLASS64, ELFDATA2LSB, EM_X86_64, PT_LOAD,
    };

    match ehdr.e_ident[EI_CLASS] {
        ELFCLASS64 => {}
        ELFCLASS32 => {
            return Err(Error::UnsupportedKernel(
                "32-bit ELF kernels are not supported; use a 64-bit vmlinux or a bzImage".into(),
            ))
        }
        c => return Err(Error::UnsupportedKernel(format!("unknown ELF class {c}"))),
    }
    if ehdr.e_ident[EI_DATA] != ELFDATA2LSB {
        return Err(Error::UnsupportedKernel("big-endian ELF".into()));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(Error::UnsupportedKernel(format!(
            "ELF machine {} is not x86_64 ({EM_X86_64})",
            ehdr.e_machine
        )));
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return Err(Error::UnsupportedKernel(format!(
            "ELF program header size {} is not {}",
            ehdr.e_phentsize,
            std::mem::size_of::<Elf64_Phdr>()
        )));
    }

    // Check every loadable segment against guest memory before linux-loader writes it.
    let mut start = u64::MAX;
    let mut end = 0u64;
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = Elf64_Phdr::default();
        let off = ehdr
            .e_phoff
            .checked_add(i * std::mem::size_of::<Elf64_Phdr>() as u64)
            .ok_or_else(|| {
                Error::UnsupportedKernel("ELF program header offset overflows".into())
            })?;
        if !read_at(
            kernel,
            off,
            phdr.as_mut_slice(),
            "reading an ELF program header",
        )? {
            return Err(Error::UnsupportedKernel(
                "truncated ELF program headers".into(),
            ));
        }
        if phdr.p_type != PT_LOAD {
            continue;
        }
        // Checked before skipping empty segments: linux-loader copies `p_filesz` bytes of
        // every PT_LOAD segment, whatever its `p_memsz`, so a segment with file bytes and
        // `p_memsz == 0` must be refused, not skipped unchecked.
        if phdr.p_filesz > phdr.p_memsz {
            return Err(Error::UnsupportedKernel(
                "ELF segment with p_filesz larger than p_memsz".into(),
            ));
        }
        if phdr.p_memsz == 0 {
            continue;
        }
        let seg_end = phdr
            .p_paddr
            .checked_add(phdr.p_memsz)
            .ok_or(Error::KernelDoesNotFit {
                start: phdr.p_paddr,
                end: u64::MAX,
                min: HIGH_MEMORY_START,
            })?;
        check_kernel_fits(mem, phdr.p_paddr, seg_end)?;
        start = start.min(phdr.p_paddr);
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(Error::UnsupportedKernel(
            "ELF has no loadable segment".into(),
        ));
    }

    let res = Elf::load(mem, None, kernel, Some(GuestAddress(HIGH_MEMORY_START)))
        .map_err(Error::Loader)?;
    let (format, pvh_entry) = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (KernelFormat::ElfPvh, Some(addr)),
        _ => (KernelFormat::Elf, None),
    };
    let use_pvh = match (cfg.protocol, pvh_entry) {
        (ProtocolChoice::Auto, Some(addr)) => Some(addr),
        _ => None,
    };

    let cmdline_len = write_cmdline(mem, cfg.cmdline, CMDLINE_MAX_SIZE)?;
    let initrd = match cfg.initrd {
        Some(f) => Some(load_initrd(mem, f, end, MMIO_GAP_START)?),
        None => None,
    };

    let entry = match use_pvh {
        Some(pvh_entry) => {
            write_pvh_start_info(mem, initrd, cfg.rsdp)?;
            EntryPoint::Pvh {
                entry: pvh_entry,
                start_info: GuestAddress(PVH_INFO_START),
            }
        }
        None => {
            let hdr = setup_header {
                boot_flag: BOOT_FLAG_MAGIC,
                header: HDRS_MAGIC,
                type_of_loader: LOADER_TYPE_UNDEFINED,
                kernel_alignment: DEFAULT_KERNEL_ALIGNMENT,
                // Fits: the command line is at most CMDLINE_MAX_SIZE bytes.
                cmdline_size: (cmdline_len - 1) as u32,
                ..Default::default()
            };
            let params = zero_page(mem, hdr, initrd, cfg.rsdp)?;
            write_zero_page(mem, &params)?;
            EntryPoint::Linux64 {
                entry: res.kernel_load,
                boot_params: GuestAddress(ZERO_PAGE_START),
            }
        }
    };

    Ok(LoadedKernel {
        entry,
        format,
        kernel_load: GuestAddress(start),
        kernel_end: GuestAddress(end),
        initrd,
        cmdline: (GuestAddress(CMDLINE_START), cmdline_len),
        setup_header: None,
    })
}

/// Validates and writes the command line at [`CMDLINE_START`]; returns its length with NUL.
fn write_cmdline<M: GuestMemoryBackend>(mem: &M, cmdline: &str, max: usize) -> Result<usize> {
    if let Some(pos) = cmdline.bytes().position(|b| b == 0) {
        return Err(Error::CmdlineContainsNul(pos));
    }
    let len = cmdline.len() + 1;
    if len > max {
        return Err(Error::CmdlineTooLong { len, max });
    }
    let cl = Cmdline::try_from(cmdline, max).map_err(Error::InvalidCmdline)?;
    let written = cl
        .as_cstring()
        .map_err(Error::InvalidCmdline)?
        .as_bytes_with_nul()
        .len();
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(Error::Loader)?;
    Ok(written)
}

/// Places the initrd page-aligned at the top of the RAM region holding 1 MiB, below
/// `limit` and above `kernel_end`, reading it straight from the file into guest memory.
fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    file: &mut File,
    kernel_end: u64,
    limit: u64,
) -> Result<(GuestAddress, u64)> {
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(io("reading the initrd size"))?;
    if size == 0 {
        return Err(Error::InitrdEmpty);
    }
    let top = mem
        .find_region(GuestAddress(HIGH_MEMORY_START))
        .map(|r| r.start_addr().raw_value().saturating_add(r.len()))
        .unwrap_or(0)
        .min(limit);
    let floor = align_up(kernel_end, PAGE_SIZE).unwrap_or(u64::MAX);
    let start = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= floor)
        .ok_or(Error::InitrdDoesNotFit {
            size,
            kernel_end,
            limit: top,
        })?;
    let count = usize::try_from(size).map_err(|_| Error::InitrdDoesNotFit {
        size,
        kernel_end,
        limit: top,
    })?;
    file.seek(SeekFrom::Start(0))
        .map_err(io("rewinding the initrd"))?;
    mem.read_exact_volatile_from(GuestAddress(start), file, count)
        .map_err(|source| Error::GuestMemory {
            context: "reading the initrd into guest memory",
            source,
        })?;
    Ok((GuestAddress(start), size))
}

/// Builds the zero page around `hdr`.
fn zero_page<M: GuestMemoryBackend>(
    mem: &M,
    mut hdr: setup_header,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    // CMDLINE_START is below 4 GiB.
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    if let Some((addr, size)) = initrd {
        // The initrd is placed below MMIO_GAP_START, so both fit in 32 bits.
        hdr.ramdisk_image = addr.raw_value() as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    let map = memory_map(mem);
    if map.len() > E820_MAX_ENTRIES {
        return Err(Error::TooManyMemoryRegions {
            count: map.len(),
            max: E820_MAX_ENTRIES,
        });
    }
    for (i, e) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    // At most E820_MAX_ENTRIES (128), checked above.
    params.e820_entries = map.len() as u8;
    Ok(params)
}

fn write_zero_page<M: GuestMemoryBackend>(mem: &M, params: &boot_params) -> Result<()> {
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::Configurator)
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: Option<GuestAddress>,
) -> Result<()> {
    let map: Vec<hvm_memmap_table_entry> = memory_map(mem)
        .iter()
        .map(|e: &MemoryMapEntry| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let max = ((PVH_INFO_END - PVH_MEMMAP_START) as usize)
        / std::mem::size_of::<hvm_memmap_table_entry>();
    if map.len() > max {
        return Err(Error::TooManyMemoryRegions {
            count: map.len(),
            max,
        });
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.map_or(0, |a| a.raw_value()),
        memmap_paddr: PVH_MEMMAP_START,
        // Bounded by `max` above.
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|&(addr, size)| hvm_modlist_entry {
            paddr: addr.raw_value(),
            size,
            ..Default::default()
        })
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::Configurator)
}

#[cfg(test)]
mod tests;
