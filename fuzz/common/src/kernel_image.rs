//! `vmkit_boot::load` on an arbitrary kernel image, command line and initrd.
//!
//! The image is whatever the fuzzer made of it, optionally with the few header fields that
//! gate the parsers (ELF magic/class/machine/phentsize, bzImage "HdrS"/version/flags)
//! patched in, so that most executions get past format detection into the program header,
//! PVH note and setup header parsing of vmkit-boot and linux-loader. Files are memfds (no
//! disk); guest memory is 32 MiB, as one region or as two adjacent 16 MiB regions.
//!
//! Oracles: `load` never panics; it never writes guest memory below 1 MiB outside the
//! PVH page, zero page and command line of `vmkit_memory::layout` (a canary fill checked
//! after each load that got past validation); an `Ok` result is consistent with the
//! documented guest layout.

use std::cell::RefCell;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmkit_boot::{load, BootConfig, EntryPoint, Error, ProtocolChoice};
use vmkit_memory::layout;

const MIB: usize = 1 << 20;

/// How to shape the image before it is loaded.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Shape {
    /// The bytes as they are.
    Raw,
    /// A little-endian x86_64 ELF64 header patched in (magic, class, data, machine,
    /// phentsize); program header offset and count, segments and notes stay fuzzed, or,
    /// with `segment`, a PT_LOAD program header somewhere in guest RAM (and, with `pvh`, a
    /// PT_NOTE with a Xen PVH entry note) is patched in as the first (and second) of
    /// `2 + extra_phdrs % 4` program headers, the others fuzzed.
    Elf {
        /// Point `e_phoff` right after the ELF header.
        phoff_64: bool,
        /// A PT_LOAD program header patched in.
        segment: Option<Segment>,
        /// A PVH entry note patched in, with this entry point.
        pvh: Option<u32>,
        /// More program headers (modulo 4), fuzzed.
        extra_phdrs: u8,
    },
    /// A bzImage setup header patched in ("HdrS", boot protocol `version`, LOADED_HIGH,
    /// XLF_KERNEL_64); everything else, `setup_sects`, `init_size`, `pref_address`,
    /// `kernel_alignment`, `cmdline_size`, `initrd_addr_max`, stays fuzzed.
    BzImage {
        /// The boot protocol version (`0x0200` or-ed in).
        version: u16,
    },
}

/// A PT_LOAD segment at `1 MiB + paddr` (modulo 32 MiB) of the given sizes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Segment {
    /// Its guest address, less 1 MiB (modulo 32 MiB).
    pub paddr: u32,
    /// Its offset in the file.
    pub offset: u16,
    /// Its size in the file.
    pub filesz: u16,
    /// Its size in memory.
    pub memsz: u16,
}

/// The fuzzer's input.
#[derive(Arbitrary, Debug)]
pub struct Input<'a> {
    /// What to patch into the image.
    pub shape: Shape,
    /// Guest memory as two 16 MiB regions (else one of 32 MiB).
    pub split_memory: bool,
    /// Ask for the 64-bit Linux boot protocol (else the loader chooses).
    pub linux64: bool,
    /// An RSDP address for the boot information.
    pub rsdp: Option<u64>,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// The initrd's contents.
    pub initrd: Option<&'a [u8]>,
    /// The rest of the input: the kernel image before shaping.
    pub kernel: &'a [u8],
}

fn memfd(name: &std::ffi::CStr) -> File {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no other inputs.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh file descriptor that nothing else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// Replaces the contents of `f` with `bytes`, leaving the offset at 0.
fn refill(f: &mut File, bytes: &[u8]) {
    f.set_len(0).expect("truncate a memfd");
    f.seek(SeekFrom::Start(0)).expect("seek a memfd");
    f.write_all(bytes).expect("write a memfd");
    f.seek(SeekFrom::Start(0)).expect("seek a memfd");
}

fn put(image: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if image.len() < offset + bytes.len() {
        image.resize(offset + bytes.len(), 0);
    }
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
}

/// Patches a PT_LOAD program header for `seg` (and, with `pvh`, a PT_NOTE with a Xen PVH
/// entry note) in as the first (and second) of `2 + extra_phdrs % 4` program headers.
fn put_segment(image: &mut Vec<u8>, seg: Segment, pvh: Option<u32>, extra_phdrs: u8) {
    let paddr = (1 << 20) + u64::from(seg.paddr) % (32 << 20);
    put(image, 24, &paddr.to_le_bytes()); // e_entry
    let phnum = 2 + u16::from(extra_phdrs % 4);
    put(image, 56, &phnum.to_le_bytes()); // e_phnum
                                          // Elf64_Phdr: type, flags, offset, vaddr, paddr, filesz, memsz, align.
    let mut phdr = Vec::with_capacity(56);
    phdr.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    phdr.extend_from_slice(&7u32.to_le_bytes());
    phdr.extend_from_slice(&u64::from(seg.offset).to_le_bytes());
    phdr.extend_from_slice(&paddr.to_le_bytes());
    phdr.extend_from_slice(&paddr.to_le_bytes());
    phdr.extend_from_slice(&u64::from(seg.filesz).to_le_bytes());
    phdr.extend_from_slice(&u64::from(seg.memsz).to_le_bytes());
    phdr.extend_from_slice(&0x1000u64.to_le_bytes());
    put(image, 64, &phdr);
    if let Some(entry) = pvh {
        // A PT_NOTE over a 20-byte note at 0x200 (after the program headers):
        // namesz 4, descsz 4, XEN_ELFNOTE_PHYS32_ENTRY (18), "Xen\0", entry.
        let mut note = Vec::with_capacity(56);
        note.extend_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&0x200u64.to_le_bytes());
        note.extend_from_slice(&0u64.to_le_bytes());
        note.extend_from_slice(&0u64.to_le_bytes());
        note.extend_from_slice(&20u64.to_le_bytes());
        note.extend_from_slice(&20u64.to_le_bytes());
        note.extend_from_slice(&4u64.to_le_bytes());
        put(image, 120, &note);
        put(image, 0x200, &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0]);
        put(image, 0x20C, b"Xen\0");
        put(image, 0x210, &entry.to_le_bytes());
    }
}

fn shape(kernel: &[u8], shape: Shape) -> Vec<u8> {
    let mut image = kernel.to_vec();
    match shape {
        Shape::Raw => {}
        Shape::Elf {
            phoff_64,
            segment,
            pvh,
            extra_phdrs,
        } => {
            put(&mut image, 0, b"\x7fELF\x02\x01\x01");
            put(&mut image, 18, &62u16.to_le_bytes()); // EM_X86_64
            if phoff_64 || segment.is_some() {
                put(&mut image, 32, &64u64.to_le_bytes()); // program headers right after
            }
            put(&mut image, 54, &56u16.to_le_bytes()); // sizeof(Elf64_Phdr)
            if let Some(seg) = segment {
                put_segment(&mut image, seg, pvh, extra_phdrs);
            }
        }
        Shape::BzImage { version } => {
            put(&mut image, 0x202, b"HdrS");
            put(&mut image, 0x206, &(version | 0x0200).to_le_bytes());
            let loadflags = image.get(0x211).copied().unwrap_or(0) | 0x01;
            put(&mut image, 0x211, &[loadflags]);
            let xlf = image.get(0x236).copied().unwrap_or(0) | 0x01;
            put(&mut image, 0x236, &[xlf]);
        }
    }
    image
}

struct Files {
    kernel: File,
    initrd: File,
}

thread_local! {
    static FILES: RefCell<Files> = RefCell::new(Files {
        kernel: memfd(c"fuzz-kernel"),
        initrd: memfd(c"fuzz-initrd"),
    });
}

/// Guest memory below 1 MiB that `load` must never write: all of it but the PVH page,
/// the zero page and the command line (`vmkit_memory::layout`). It starts filled with
/// [`CANARY`] and is checked after every load that got past validation.
const UNTOUCHABLE: [(u64, u64); 3] = [
    (0, layout::PVH_INFO_START),
    (layout::ZERO_PAGE_START + 0x1000, layout::CMDLINE_START),
    (
        layout::CMDLINE_START + layout::CMDLINE_MAX_SIZE as u64,
        layout::HIGH_MEMORY_START,
    ),
];
const CANARY: u8 = 0xA5;

fn low_memory(mem: &GuestMemoryMmap) -> &[u8] {
    let host = mem
        .get_host_address(GuestAddress(0))
        .expect("guest memory starts at 0");
    // SAFETY: both memories start with a region of at least 16 MiB at guest address 0,
    // mapped for as long as `mem` lives; each memory belongs to one thread, and nothing
    // writes it while the slice is alive.
    unsafe { std::slice::from_raw_parts(host, layout::HIGH_MEMORY_START as usize) }
}

fn check_untouched(mem: &GuestMemoryMmap) {
    let low = low_memory(mem);
    for (start, end) in UNTOUCHABLE {
        let area = &low[start as usize..end as usize];
        // One comparison with a canary buffer: a byte loop under ASan would cost a
        // millisecond per run.
        let canaries = CANARIES.with(|c| area == &c[..area.len()]);
        if canaries {
            continue;
        }
        let i = area.iter().position(|&b| b != CANARY).unwrap_or(0);
        panic!(
            "load wrote guest memory at {:#x}, below 1 MiB and outside the PVH page, \
             zero page and command line",
            start + i as u64
        );
    }
}

thread_local! {
    static CANARIES: Vec<u8> = vec![CANARY; layout::HIGH_MEMORY_START as usize];
    static ONE: GuestMemoryMmap = memory_of(&[(GuestAddress(0), 32 * MIB)]);
    static TWO: GuestMemoryMmap = memory_of(&[
        (GuestAddress(0), 16 * MIB),
        (GuestAddress(16 * MIB as u64), 16 * MIB),
    ]);
}

fn memory_of(ranges: &[(GuestAddress, usize)]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(ranges).expect("guest memory");
    let canaries = vec![CANARY; layout::HIGH_MEMORY_START as usize];
    mem.write_slice(&canaries, GuestAddress(0))
        .expect("fill low memory");
    mem
}

/// Guest memory is reused across runs (`load` only writes to it): mapping and faulting in
/// 32 MiB per execution would dominate the run time. One per thread, so that tests running
/// in parallel do not share it (a clone shares the mapping).
fn memory(split: bool) -> GuestMemoryMmap {
    if split {
        TWO.with(|m| m.clone())
    } else {
        ONE.with(|m| m.clone())
    }
}

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode).
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input<'_>) {
    let _ = load_and_check(input);
}

/// Runs `input`; returns whether the kernel loaded.
fn load_and_check(input: &Input<'_>) -> bool {
    let image = shape(input.kernel, input.shape);
    let mem = memory(input.split_memory);
    FILES.with_borrow_mut(|files| {
        refill(&mut files.kernel, &image);
        let initrd = input.initrd.map(|bytes| {
            refill(&mut files.initrd, bytes);
            &mut files.initrd
        });
        let cfg = BootConfig {
            cmdline: input.cmdline,
            initrd,
            protocol: if input.linux64 {
                ProtocolChoice::Linux64
            } else {
                ProtocolChoice::Auto
            },
            rsdp: input.rsdp.map(GuestAddress),
        };
        let res = load(&mem, &mut files.kernel, cfg);
        // These are all refused before anything is written.
        if !matches!(
            res,
            Err(Error::NotAKernel
                | Error::UnsupportedKernel(_)
                | Error::KernelDoesNotFit { .. }
                | Error::Io { .. })
        ) {
            check_untouched(&mem);
        }
        let Ok(loaded) = res else {
            return false;
        };
        check_loaded(input, &loaded);
        true
    })
}

/// What a successful load promises.
fn check_loaded(input: &Input<'_>, loaded: &vmkit_boot::LoadedKernel) {
    let top = 32 * MIB as u64;
    let (start, end) = (loaded.kernel_load.0, loaded.kernel_end.0);
    assert!(start >= layout::HIGH_MEMORY_START, "{loaded:?}");
    assert!(start < end && end <= top, "{loaded:?}");
    let (cmdline_at, cmdline_len) = loaded.cmdline;
    assert_eq!(cmdline_at.0, layout::CMDLINE_START);
    assert!((1..=layout::CMDLINE_MAX_SIZE).contains(&cmdline_len));
    match (loaded.initrd, input.initrd) {
        (Some((addr, size)), Some(initrd)) => {
            assert_eq!(size, initrd.len() as u64);
            assert_eq!(addr.0 % layout::PAGE_SIZE, 0);
            assert!(addr.0 >= end && addr.0 + size <= top, "{loaded:?}");
        }
        (None, None) => {}
        (got, _) => panic!(
            "initrd {got:?} loaded for {:?} bytes",
            input.initrd.map(<[u8]>::len)
        ),
    }
    match loaded.entry {
        EntryPoint::Linux64 { boot_params, .. } => {
            assert_eq!(boot_params.0, layout::ZERO_PAGE_START)
        }
        EntryPoint::Pvh { start_info, .. } => {
            assert!(!input.linux64);
            assert_eq!(start_info.0, layout::PVH_INFO_START)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    /// Random bytes decode and reach `load` (format detection and, with a header patched
    /// in, the ELF and bzImage parsers). None of them loads: the fuzzer's corpus does.
    #[test]
    fn seeds_decode_and_reach_the_loader() {
        let seeds = seeds::for_target("kernel_image");
        let mut decoded = 0;
        let mut loaded = 0;
        for s in &seeds {
            let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(s)) else {
                continue;
            };
            decoded += 1;
            loaded += usize::from(load_and_check(&input));
        }
        eprintln!(
            "kernel_image seeds: {decoded} of {} decode, {loaded} load",
            seeds.len()
        );
        assert!(decoded > seeds.len() / 2);
    }

    /// The reproducer of the memsz-0 segment bug (an ELF file with a zero-size PT_LOAD
    /// segment), replayed as it was found and, as the raw ELF file, through the loader.
    #[test]
    fn elf_memsz0_segment_regression() {
        fuzz(include_bytes!(
            "../../regressions/kernel_image/elf-memsz0-segment-unchecked"
        ));
        let input = Input {
            shape: Shape::Raw,
            split_memory: false,
            linux64: false,
            rsdp: None,
            cmdline: "console=ttyS0",
            initrd: None,
            kernel: include_bytes!(
                "../../regressions/kernel_image/raw/elf-memsz0-segment-unchecked.elf"
            ),
        };
        load_and_check(&input);
    }
}
