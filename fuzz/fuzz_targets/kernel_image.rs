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
#![no_main]

use std::cell::RefCell;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmkit_boot::{load, BootConfig, EntryPoint, Error, ProtocolChoice};
use vmkit_memory::layout;

const MIB: usize = 1 << 20;

/// How to shape the image before it is loaded.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Shape {
    /// The bytes as they are.
    Raw,
    /// A little-endian x86_64 ELF64 header patched in (magic, class, data, machine,
    /// phentsize); program header offset and count, segments and notes stay fuzzed, or,
    /// with `segment`, a PT_LOAD program header somewhere in guest RAM (and, with `pvh`, a
    /// PT_NOTE with a Xen PVH entry note) is patched in as the first (and second) of
    /// `2 + extra_phdrs % 4` program headers, the others fuzzed.
    Elf {
        phoff_64: bool,
        segment: Option<Segment>,
        pvh: Option<u32>,
        extra_phdrs: u8,
    },
    /// A bzImage setup header patched in ("HdrS", boot protocol `version`, LOADED_HIGH,
    /// XLF_KERNEL_64); everything else, `setup_sects`, `init_size`, `pref_address`,
    /// `kernel_alignment`, `cmdline_size`, `initrd_addr_max`, stays fuzzed.
    BzImage { version: u16 },
}

/// A PT_LOAD segment at `1 MiB + paddr` (modulo 32 MiB) of the given sizes.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Segment {
    paddr: u32,
    offset: u16,
    filesz: u16,
    memsz: u16,
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    shape: Shape,
    split_memory: bool,
    linux64: bool,
    rsdp: Option<u64>,
    cmdline: &'a str,
    initrd: Option<&'a [u8]>,
    /// The rest of the input.
    kernel: &'a [u8],
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
    f.set_len(0).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(bytes).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
}

fn put(image: &mut Vec<u8>, offset: usize, bytes: &[u8]) {
    if image.len() < offset + bytes.len() {
        image.resize(offset + bytes.len(), 0);
    }
    image[offset..offset + bytes.len()].copy_from_slice(bytes);
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
                let paddr = (1 << 20) + u64::from(seg.paddr) % (32 << 20);
                put(&mut image, 24, &paddr.to_le_bytes()); // e_entry
                let phnum = 2 + u16::from(extra_phdrs % 4);
                put(&mut image, 56, &phnum.to_le_bytes()); // e_phnum
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
                put(&mut image, 64, &phdr);
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
                    put(&mut image, 120, &note);
                    put(&mut image, 0x200, &[4, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0]);
                    put(&mut image, 0x20C, b"Xen\0");
                    put(&mut image, 0x210, &entry.to_le_bytes());
                }
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
    let host = mem.get_host_address(GuestAddress(0)).unwrap();
    // SAFETY: both memories start with a region of at least 16 MiB at guest address 0,
    // mapped for the life of the (static) memory; this target is single-threaded and
    // nothing writes the memory while the slice is alive.
    unsafe { std::slice::from_raw_parts(host, layout::HIGH_MEMORY_START as usize) }
}

fn check_untouched(mem: &GuestMemoryMmap) {
    static CANARIES: OnceLock<Vec<u8>> = OnceLock::new();
    let canaries = CANARIES.get_or_init(|| vec![CANARY; layout::HIGH_MEMORY_START as usize]);
    let low = low_memory(mem);
    for (start, end) in UNTOUCHABLE {
        let area = &low[start as usize..end as usize];
        // One memcmp: a byte loop under ASan would cost a millisecond per run.
        if area == &canaries[..area.len()] {
            continue;
        }
        let i = area.iter().position(|&b| b != CANARY).unwrap();
        panic!(
            "load wrote guest memory at {:#x}, below 1 MiB and outside the PVH page, \
             zero page and command line",
            start + i as u64
        );
    }
}

/// Guest memory is reused across runs (`load` only writes to it): mapping and faulting in
/// 32 MiB per execution would dominate the run time.
fn memory(split: bool) -> &'static GuestMemoryMmap {
    static ONE: OnceLock<GuestMemoryMmap> = OnceLock::new();
    static TWO: OnceLock<GuestMemoryMmap> = OnceLock::new();
    let init = |ranges: &[(GuestAddress, usize)]| {
        let mem = GuestMemoryMmap::from_ranges(ranges).unwrap();
        let canaries = vec![CANARY; layout::HIGH_MEMORY_START as usize];
        mem.write_slice(&canaries, GuestAddress(0)).unwrap();
        mem
    };
    if split {
        TWO.get_or_init(|| {
            init(&[
                (GuestAddress(0), 16 * MIB),
                (GuestAddress(16 * MIB as u64), 16 * MIB),
            ])
        })
    } else {
        ONE.get_or_init(|| init(&[(GuestAddress(0), 32 * MIB)]))
    }
}

fuzz_target!(|input: Input<'_>| {
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
        let res = load(mem, &mut files.kernel, cfg);
        // These are all refused before anything is written.
        if !matches!(
            res,
            Err(Error::NotAKernel
                | Error::UnsupportedKernel(_)
                | Error::KernelDoesNotFit { .. }
                | Error::Io { .. })
        ) {
            check_untouched(mem);
        }
        let Ok(loaded) = res else {
            return;
        };

        // What a successful load promises.
        let top = 32 * MIB as u64;
        let (start, end) = (loaded.kernel_load.0, loaded.kernel_end.0);
        assert!(start >= layout::HIGH_MEMORY_START, "{loaded:?}");
        assert!(start < end && end <= top, "{loaded:?}");
        let (cmdline_at, cmdline_len) = loaded.cmdline;
        assert_eq!(cmdline_at.0, layout::CMDLINE_START);
        assert!((1..=layout::CMDLINE_MAX_SIZE).contains(&cmdline_len));
        if let Some((addr, size)) = loaded.initrd {
            assert!(input.initrd.is_some());
            assert_eq!(size, input.initrd.unwrap().len() as u64);
            assert_eq!(addr.0 % layout::PAGE_SIZE, 0);
            assert!(addr.0 >= end && addr.0 + size <= top, "{loaded:?}");
        } else {
            assert!(input.initrd.is_none());
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
    });
});
