use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use vm_memory::GuestMemoryMmap;

use super::*;

const MEM_SIZE: u64 = 128 << 20;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// A file with the given contents, deleted on drop.
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn new(bytes: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmkit-boot-loader-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        drop(f);
        let file = File::open(&path).unwrap();
        TempFile { path, file }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

const ELF_ENTRY: u64 = 0x20_0000;
const ELF_SEG_OFFSET: usize = 0x1000;
const ELF_SEG_FILESZ: u64 = 0x100;
const ELF_SEG_MEMSZ: u64 = 0x3000;
const PVH_ENTRY: u32 = 0x20_0040;

fn put(v: &mut [u8], off: usize, bytes: &[u8]) {
    v[off..off + bytes.len()].copy_from_slice(bytes);
}

/// A minimal x86_64 ELF executable: one PT_LOAD of 0x100 bytes (0x3000 in memory) at
/// physical 0x200000 and, if `pvh_entry` is given, a PT_NOTE with a Xen note that is not the
/// PVH one followed by XEN_ELFNOTE_PHYS32_ENTRY.
fn build_elf(class: u8, paddr: u64, pvh_entry: Option<u32>) -> Vec<u8> {
    let mut v = vec![0u8; ELF_SEG_OFFSET + ELF_SEG_FILESZ as usize];
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    put(&mut v, 0, b"\x7fELF");
    v[4] = class;
    v[5] = 1; // little endian
    v[6] = 1; // EV_CURRENT
    put(&mut v, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut v, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut v, 20, &1u32.to_le_bytes());
    put(&mut v, 24, &paddr.to_le_bytes()); // e_entry
    put(&mut v, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut v, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut v, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut v, 56, &phnum.to_le_bytes());

    // PT_LOAD
    let ph = 64;
    put(&mut v, ph, &1u32.to_le_bytes());
    put(&mut v, ph + 4, &5u32.to_le_bytes());
    put(&mut v, ph + 8, &(ELF_SEG_OFFSET as u64).to_le_bytes());
    put(
        &mut v,
        ph + 16,
        &(0xFFFF_FFFF_8000_0000 + paddr).to_le_bytes(),
    );
    put(&mut v, ph + 24, &paddr.to_le_bytes());
    put(&mut v, ph + 32, &ELF_SEG_FILESZ.to_le_bytes());
    put(&mut v, ph + 40, &ELF_SEG_MEMSZ.to_le_bytes());
    put(&mut v, ph + 48, &0x1000u64.to_le_bytes());
    for (i, b) in v[ELF_SEG_OFFSET..].iter_mut().enumerate() {
        *b = i as u8 ^ 0x5A;
    }

    if let Some(entry) = pvh_entry {
        let note_off = 0x200;
        let mut notes = Vec::new();
        // XEN_ELFNOTE_GUEST_OS (6) = "linux"
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&6u32.to_le_bytes());
        notes.extend_from_slice(&6u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0linux\0\0\0");
        // XEN_ELFNOTE_PHYS32_ENTRY (18)
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&18u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&entry.to_le_bytes());
        put(&mut v, note_off, &notes);
        let ph = 64 + 56;
        put(&mut v, ph, &4u32.to_le_bytes()); // PT_NOTE
        put(&mut v, ph + 4, &4u32.to_le_bytes());
        put(&mut v, ph + 8, &(note_off as u64).to_le_bytes());
        put(&mut v, ph + 32, &(notes.len() as u64).to_le_bytes());
        put(&mut v, ph + 40, &(notes.len() as u64).to_le_bytes());
        put(&mut v, ph + 48, &4u64.to_le_bytes());
    }
    v
}

struct FakeBzImage {
    version: u16,
    xloadflags: u16,
    cmdline_size: u32,
    init_size: u32,
    initrd_addr_max: u32,
}

impl Default for FakeBzImage {
    fn default() -> Self {
        FakeBzImage {
            version: 0x020F,
            xloadflags: 1,
            cmdline_size: 0xFF,
            init_size: 0x10_0000,
            initrd_addr_max: 0x37FF_FFFF,
        }
    }
}

const BZ_PAYLOAD: usize = 0x2000;

impl FakeBzImage {
    /// A bzImage with one setup sector (+ boot sector) and a 8 KiB "protected-mode kernel".
    fn build(&self) -> Vec<u8> {
        let mut v = vec![0u8; 2 * 512 + BZ_PAYLOAD];
        v[0x1F1] = 1; // setup_sects
        put(&mut v, 0x1FE, &0xAA55u16.to_le_bytes());
        put(&mut v, 0x202, b"HdrS");
        put(&mut v, 0x206, &self.version.to_le_bytes());
        v[0x211] = 1; // loadflags: LOADED_HIGH
        put(&mut v, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut v, 0x22C, &self.initrd_addr_max.to_le_bytes());
        put(&mut v, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
        v[0x234] = 1; // relocatable
        put(&mut v, 0x236, &self.xloadflags.to_le_bytes());
        put(&mut v, 0x238, &self.cmdline_size.to_le_bytes());
        put(&mut v, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
        put(&mut v, 0x260, &self.init_size.to_le_bytes());
        for (i, b) in v[1024..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        v
    }
}

fn read_zero_page(m: &GuestMemoryMmap) -> boot_params {
    m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap()
}

fn read_cstr(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    m.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

/// The E820 entries expected for the 128 MiB test memory.
fn expected_e820() -> Vec<(u64, u64, u32)> {
    vec![
        (0, 0x9_FC00, 1),
        (0x9_FC00, 0x10_0000 - 0x9_FC00, 2),
        (0x10_0000, MEM_SIZE - 0x10_0000, 1),
    ]
}

fn e820_of(p: &boot_params) -> Vec<(u64, u64, u32)> {
    let table = p.e820_table;
    table[..usize::from(p.e820_entries)]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect()
}

#[test]
fn garbage_is_not_a_kernel() {
    let m = mem();
    for bytes in [&b""[..], &b"hello"[..], &[0xAB; 4096][..]] {
        let mut f = TempFile::new(bytes);
        let e = load(&m, &mut f.file, BootConfig::default()).unwrap_err();
        assert!(matches!(e, Error::NotAKernel), "{e}");
    }
}

#[test]
fn elf_without_pvh_note_boots_linux64() {
    let m = mem();
    let mut f = TempFile::new(&build_elf(2, ELF_ENTRY, None));
    let rsdp = GuestAddress(0xE_0000);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: "console=ttyS0 reboot=k",
            rsdp: Some(rsdp),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::Elf);
    assert_eq!(
        k.entry,
        EntryPoint::Linux64 {
            entry: GuestAddress(ELF_ENTRY),
            boot_params: GuestAddress(0x7000)
        }
    );
    assert_eq!(k.kernel_load, GuestAddress(ELF_ENTRY));
    assert_eq!(k.kernel_end, GuestAddress(ELF_ENTRY + ELF_SEG_MEMSZ));
    assert_eq!(k.initrd, None);
    assert!(k.setup_header.is_none());

    // The segment is in memory.
    let seg = read_cstr(&m, ELF_ENTRY, ELF_SEG_FILESZ as usize);
    let want: Vec<u8> = (0..ELF_SEG_FILESZ as usize)
        .map(|i| i as u8 ^ 0x5A)
        .collect();
    assert_eq!(seg, want);

    // Zero page with a default setup header.
    let p = read_zero_page(&m);
    assert_eq!({ p.hdr.boot_flag }, 0xAA55);
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!({ p.hdr.type_of_loader }, 0xFF);
    assert_eq!({ p.hdr.kernel_alignment }, 0x100_0000);
    assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!({ p.hdr.cmdline_size }, 22);
    assert_eq!({ p.hdr.ramdisk_image }, 0);
    assert_eq!({ p.hdr.ramdisk_size }, 0);
    assert_eq!({ p.acpi_rsdp_addr }, 0xE_0000);
    assert_eq!(e820_of(&p), expected_e820());
    assert_eq!(k.cmdline, (GuestAddress(0x2_0000), 23));
    assert_eq!(read_cstr(&m, 0x2_0000, 23), b"console=ttyS0 reboot=k\0");
}

#[test]
fn elf_with_pvh_note_boots_pvh() {
    let m = mem();
    let mut f = TempFile::new(&build_elf(2, ELF_ENTRY, Some(PVH_ENTRY)));
    let initrd_bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    let mut initrd = TempFile::new(&initrd_bytes);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: "console=hvc0",
            initrd: Some(&mut initrd.file),
            rsdp: Some(GuestAddress(0xE_0000)),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::ElfPvh);
    assert_eq!(
        k.entry,
        EntryPoint::Pvh {
            entry: GuestAddress(u64::from(PVH_ENTRY)),
            start_info: GuestAddress(0x6000)
        }
    );
    let initrd_addr = (MEM_SIZE - 5000) & !0xFFF;
    assert_eq!(k.initrd, Some((GuestAddress(initrd_addr), 5000)));

    let si: hvm_start_info = m.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(si.magic, 0x336E_C578);
    assert_eq!(si.version, 1);
    assert_eq!(si.cmdline_paddr, 0x2_0000);
    assert_eq!(si.rsdp_paddr, 0xE_0000);
    assert_eq!(si.nr_modules, 1);
    assert_eq!(si.modlist_paddr, PVH_MODLIST_START);
    assert_eq!(si.memmap_paddr, PVH_MEMMAP_START);
    assert_eq!(si.memmap_entries, 3);
    // start_info, module list and memory map do not overlap and stay in their page.
    assert!(PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64 <= PVH_MODLIST_START);
    assert!(
        PVH_MODLIST_START + std::mem::size_of::<hvm_modlist_entry>() as u64 <= PVH_MEMMAP_START
    );

    let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
    assert_eq!(module.paddr, initrd_addr);
    assert_eq!(module.size, 5000);
    assert_eq!(module.cmdline_paddr, 0);

    let map: Vec<(u64, u64, u32)> = (0..3)
        .map(|i| {
            let e: hvm_memmap_table_entry =
                m.read_obj(GuestAddress(PVH_MEMMAP_START + i * 24)).unwrap();
            (e.addr, e.size, e.type_)
        })
        .collect();
    assert_eq!(map, expected_e820());

    assert_eq!(read_cstr(&m, 0x2_0000, 13), b"console=hvc0\0");
    assert_eq!(read_cstr(&m, initrd_addr, 5000), initrd_bytes);

    // The zero page is not written for PVH.
    let p = read_zero_page(&m);
    assert_eq!({ p.hdr.header }, 0);
}

#[test]
fn elf_with_pvh_note_forced_linux64() {
    let m = mem();
    let mut f = TempFile::new(&build_elf(2, ELF_ENTRY, Some(PVH_ENTRY)));
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            protocol: ProtocolChoice::Linux64,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::ElfPvh);
    assert_eq!(
        k.entry,
        EntryPoint::Linux64 {
            entry: GuestAddress(ELF_ENTRY),
            boot_params: GuestAddress(0x7000)
        }
    );
    let p = read_zero_page(&m);
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!({ p.acpi_rsdp_addr }, 0);
    let si: hvm_start_info = m.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(si.magic, 0);
}

#[test]
fn elf32_is_unsupported() {
    let m = mem();
    let mut f = TempFile::new(&build_elf(1, ELF_ENTRY, None));
    let e = load(&m, &mut f.file, BootConfig::default()).unwrap_err();
    assert!(
        matches!(&e, Error::UnsupportedKernel(s) if s.contains("32-bit")),
        "{e}"
    );
}

#[test]
fn elf_outside_memory_does_not_fit() {
    let m = mem();
    for paddr in [200 << 20, MEM_SIZE - 0x1000, 0x8000] {
        let mut f = TempFile::new(&build_elf(2, paddr, None));
        let e = load(&m, &mut f.file, BootConfig::default()).unwrap_err();
        assert!(
            matches!(e, Error::KernelDoesNotFit { .. }),
            "{paddr:#x}: {e}"
        );
    }
}

#[test]
fn cmdline_errors() {
    let m = mem();
    let elf = build_elf(2, ELF_ENTRY, None);

    let ok = "a".repeat(4095);
    let mut f = TempFile::new(&elf);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: &ok,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.cmdline.1, 4096);

    let long = "a".repeat(4096);
    let mut f = TempFile::new(&elf);
    let e = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: &long,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::CmdlineTooLong {
                len: 4097,
                max: 4096
            }
        ),
        "{e}"
    );

    let mut f = TempFile::new(&elf);
    let e = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: "a\0b",
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::CmdlineContainsNul(1)), "{e}");

    // Bytes are passed through as they are (Linux takes any non-NUL byte).
    let mut f = TempFile::new(&elf);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: "caf\u{e9}",
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.cmdline.1, 6);
    assert_eq!(read_cstr(&m, 0x2_0000, 6), "caf\u{e9}\0".as_bytes());

    // A bzImage's cmdline_size (here 0xFF) bounds the command line.
    let bz = FakeBzImage::default().build();
    let mut f = TempFile::new(&bz);
    let e = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: &"b".repeat(256),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::CmdlineTooLong { len: 257, max: 256 }),
        "{e}"
    );
    let mut f = TempFile::new(&bz);
    load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: &"b".repeat(255),
            ..Default::default()
        },
    )
    .unwrap();
}

#[test]
fn initrd_placement_and_errors() {
    let m = mem();
    let elf = build_elf(2, ELF_ENTRY, None);

    // Page-aligned at the top of RAM, recorded in the zero page.
    let size = 3 * 4096 + 17;
    let bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
    let mut initrd = TempFile::new(&bytes);
    let mut f = TempFile::new(&elf);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            initrd: Some(&mut initrd.file),
            ..Default::default()
        },
    )
    .unwrap();
    let addr = (MEM_SIZE - size as u64) & !0xFFF;
    assert_eq!(addr % 4096, 0);
    assert_eq!(addr, MEM_SIZE - 4 * 4096);
    assert_eq!(k.initrd, Some((GuestAddress(addr), size as u64)));
    let p = read_zero_page(&m);
    assert_eq!({ p.hdr.ramdisk_image } as u64, addr);
    assert_eq!({ p.hdr.ramdisk_size } as usize, size);
    assert_eq!(read_cstr(&m, addr, size), bytes);

    // Below the 32-bit MMIO gap when RAM reaches it.
    let big: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0xC000_0000),
        (GuestAddress(0x1_0000_0000), 0x10_0000),
    ])
    .unwrap();
    let mut initrd = TempFile::new(&bytes);
    let mut f = TempFile::new(&elf);
    let k = load(
        &big,
        &mut f.file,
        BootConfig {
            initrd: Some(&mut initrd.file),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.initrd.unwrap().0, GuestAddress(0xC000_0000 - 4 * 4096));
    let p: boot_params = big.read_obj(GuestAddress(0x7000)).unwrap();
    assert_eq!(
        e820_of(&p),
        vec![
            (0, 0x9_FC00, 1),
            (0x9_FC00, 0x10_0000 - 0x9_FC00, 2),
            (0x10_0000, 0xC000_0000 - 0x10_0000, 1),
            (0x1_0000_0000, 0x10_0000, 1),
        ]
    );

    // Too large to fit above the kernel.
    let small: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x30_0000)]).unwrap();
    let mut initrd = TempFile::new(&vec![1u8; 0x10_0000]);
    let mut f = TempFile::new(&elf);
    let e = load(
        &small,
        &mut f.file,
        BootConfig {
            initrd: Some(&mut initrd.file),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InitrdDoesNotFit {
                size: 0x10_0000,
                kernel_end: 0x20_3000,
                limit: 0x30_0000
            }
        ),
        "{e}"
    );

    // Empty.
    let mut initrd = TempFile::new(b"");
    let mut f = TempFile::new(&elf);
    let e = load(
        &m,
        &mut f.file,
        BootConfig {
            initrd: Some(&mut initrd.file),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::InitrdEmpty), "{e}");
}

#[test]
fn bzimage_load() {
    let m = mem();
    let bz = FakeBzImage::default().build();
    let mut f = TempFile::new(&bz);
    let initrd_bytes = vec![0xEEu8; 10_000];
    let mut initrd = TempFile::new(&initrd_bytes);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            cmdline: "console=ttyS0",
            initrd: Some(&mut initrd.file),
            rsdp: Some(GuestAddress(0xE_0000)),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::BzImage);
    assert_eq!(
        k.entry,
        EntryPoint::Linux64 {
            entry: GuestAddress(0x10_0200),
            boot_params: GuestAddress(0x7000)
        }
    );
    assert_eq!(k.kernel_load, GuestAddress(0x10_0000));
    // max(align_up(1 MiB, 2 MiB), pref_address 16 MiB) + init_size 1 MiB
    assert_eq!(k.kernel_end, GuestAddress(0x110_0000));
    assert_eq!(read_cstr(&m, 0x10_0000, BZ_PAYLOAD), bz[1024..].to_vec());

    let p = read_zero_page(&m);
    assert_eq!({ p.hdr.version }, 0x020F);
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!({ p.hdr.boot_flag }, 0xAA55);
    assert_eq!({ p.hdr.type_of_loader }, 0xFF);
    assert_eq!({ p.hdr.code32_start }, 0x10_0000);
    assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!(
        { p.hdr.cmdline_size },
        0xFF,
        "the kernel's cmdline_size is kept"
    );
    let initrd_addr = (MEM_SIZE - 10_000) & !0xFFF;
    assert_eq!({ p.hdr.ramdisk_image } as u64, initrd_addr);
    assert_eq!({ p.hdr.ramdisk_size }, 10_000);
    assert_eq!({ p.acpi_rsdp_addr }, 0xE_0000);
    assert_eq!(e820_of(&p), expected_e820());
    assert_eq!(read_cstr(&m, 0x2_0000, 14), b"console=ttyS0\0");
    assert_eq!(read_cstr(&m, initrd_addr, 10_000), initrd_bytes);
}

#[test]
fn bzimage_initrd_addr_max() {
    let m = mem();
    let bz = FakeBzImage {
        initrd_addr_max: 0x3FF_FFFF,
        ..Default::default()
    }
    .build();
    let mut f = TempFile::new(&bz);
    let mut initrd = TempFile::new(&[1u8; 100]);
    let k = load(
        &m,
        &mut f.file,
        BootConfig {
            initrd: Some(&mut initrd.file),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.initrd, Some((GuestAddress(0x400_0000 - 0x1000), 100)));
}

#[test]
fn bzimage_unsupported_and_too_big() {
    let m = mem();
    for (img, what) in [
        (
            FakeBzImage {
                version: 0x0205,
                ..Default::default()
            },
            "2.05",
        ),
        (
            FakeBzImage {
                xloadflags: 0,
                ..Default::default()
            },
            "64-bit",
        ),
        (
            FakeBzImage {
                version: 0x020B,
                ..Default::default()
            },
            "64-bit",
        ),
    ] {
        let mut f = TempFile::new(&img.build());
        let e = load(&m, &mut f.file, BootConfig::default()).unwrap_err();
        assert!(
            matches!(&e, Error::UnsupportedKernel(s) if s.contains(what)),
            "{e}"
        );
    }
    // init_size larger than memory.
    let mut f = TempFile::new(
        &FakeBzImage {
            init_size: 0x800_0000,
            ..Default::default()
        }
        .build(),
    );
    let e = load(&m, &mut f.file, BootConfig::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::KernelDoesNotFit {
                start: 0x10_0000,
                end: 0x900_0000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn error_messages_are_clear() {
    let e = Error::CmdlineTooLong {
        len: 5000,
        max: 4096,
    };
    assert_eq!(
        e.to_string(),
        "kernel command line is 5000 bytes with its NUL terminator; at most 4096 allowed"
    );
    assert!(Error::NotAKernel.to_string().contains("neither a bzImage"));
}

/// Found by the `kernel_image` fuzz target: a second PT_LOAD segment with `p_filesz = 16`
/// and `p_memsz = 0` at 0xE0000 was skipped by the checks but copied by linux-loader, over
/// the ACPI tables. It must be refused and leave memory below 1 MiB untouched.
#[test]
fn elf_segment_with_file_bytes_but_no_memsz_is_refused() {
    const ELF: &[u8] = &[
        0x7f, 0x45, 0x4c, 0x46, 0x02, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x02, 0x00, 0x3e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x00, 0x38, 0x00, 0x02, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x01, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0e, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let m = mem();
    let mut k = TempFile::new(ELF);
    let err = load(&m, &mut k.file, BootConfig::default()).unwrap_err();
    assert!(
        err.to_string().contains("p_filesz larger than p_memsz"),
        "{err}"
    );
    let mut low = [0u8; 16];
    m.read_slice(&mut low, GuestAddress(0xE0000)).unwrap();
    assert_eq!(low, [0u8; 16], "nothing was written at 0xE0000");
}
