//! Loads Debian's cloud kernel (bzImage and the ELF vmlinux decompressed from it) and checks
//! the result field by field.
//!
//! The kernel is fetched by `tests/fetch-debian-kernel.sh` (apt-get download + dpkg-deb -x,
//! cached under `$VMKIT_CACHE_DIR/debian-kernel` or `~/.cache/vmkit/debian-kernel`). If it
//! cannot be fetched the tests fail with the script's reason.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_boot::linux_loader::bootparam::boot_params;
use vmkit_boot::linux_loader::loader::elf::start_info::hvm_start_info;
use vmkit_boot::{load, BootConfig, EntryPoint, KernelFormat, ProtocolChoice};

const MEM_SIZE: u64 = 256 << 20;
const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw";

fn kernel_paths() -> &'static (PathBuf, PathBuf) {
    static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fetch-debian-kernel.sh");
        let out = Command::new("sh")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "fetching the Debian cloud kernel failed ({}):\n{stderr}",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert!(
            lines.len() >= 2,
            "unexpected script output:\n{stdout}\n{stderr}"
        );
        let bz = PathBuf::from(lines[lines.len() - 2]);
        let elf = PathBuf::from(lines[lines.len() - 1]);
        assert!(bz.is_file() && elf.is_file(), "{stdout}");
        (bz, elf)
    })
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn guest_bytes(m: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A scratch initrd file, deleted on drop.
struct Initrd(PathBuf, Vec<u8>);

impl Initrd {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmkit-boot-{}-{name}", std::process::id()));
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 241) as u8).collect();
        File::create(&p).unwrap().write_all(&bytes).unwrap();
        Initrd(p, bytes)
    }
    fn open(&self) -> File {
        File::open(&self.0).unwrap()
    }
}

impl Drop for Initrd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn e820(p: &boot_params) -> Vec<(u64, u64, u32)> {
    let t = p.e820_table;
    t[..usize::from(p.e820_entries)]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect()
}

#[test]
fn bzimage_header_and_boot_params() {
    let (bz_path, _) = kernel_paths();
    let raw = std::fs::read(bz_path).unwrap();
    // Independent parse of the setup header from the file bytes.
    assert_eq!(&raw[0x202..0x206], b"HdrS");
    let version = u16_at(&raw, 0x206);
    let setup_sects = u64::from(raw[0x1F1]);
    let initrd_addr_max = u32_at(&raw, 0x22C);
    let kernel_alignment = u32_at(&raw, 0x230);
    let relocatable = raw[0x234];
    let xloadflags = u16_at(&raw, 0x236);
    let cmdline_size = u32_at(&raw, 0x238);
    let pref_address = u64_at(&raw, 0x258);
    let init_size = u32_at(&raw, 0x260);
    let setup_size = (setup_sects + 1) * 512;
    let payload = raw.len() as u64 - setup_size;

    // What a current x86_64 distribution kernel must look like.
    assert!(version >= 0x020C, "boot protocol {version:#x}");
    assert_eq!(relocatable, 1, "relocatable_kernel");
    assert_ne!(xloadflags & 1, 0, "XLF_KERNEL_64");
    assert_ne!(xloadflags & 2, 0, "XLF_CAN_BE_LOADED_ABOVE_4G");
    assert!(kernel_alignment.is_power_of_two() && kernel_alignment >= 0x20_0000);
    assert_eq!(pref_address, 0x100_0000, "LOAD_PHYSICAL_ADDR");
    assert!(
        u64::from(init_size) > payload,
        "init_size {init_size:#x} vs payload {payload:#x}"
    );
    assert!(cmdline_size >= 255);

    let m = mem();
    let initrd = Initrd::new("bz-initrd");
    let mut initrd_file = initrd.open();
    let mut kernel = File::open(bz_path).unwrap();
    let k = load(
        &m,
        &mut kernel,
        BootConfig {
            cmdline: CMDLINE,
            initrd: Some(&mut initrd_file),
            protocol: ProtocolChoice::Auto,
            rsdp: Some(GuestAddress(0xE_0000)),
        },
    )
    .unwrap();

    // Parsed header = file header (linux-loader sets code32_start to the load address).
    let hdr = k.setup_header.expect("bzImage has a setup header");
    assert_eq!({ hdr.version }, version);
    assert_eq!({ hdr.relocatable_kernel }, relocatable);
    assert_eq!({ hdr.xloadflags }, xloadflags);
    assert_eq!({ hdr.init_size }, init_size);
    assert_eq!({ hdr.kernel_alignment }, kernel_alignment);
    assert_eq!({ hdr.pref_address }, pref_address);
    assert_eq!({ hdr.cmdline_size }, cmdline_size);
    assert_eq!({ hdr.code32_start }, 0x10_0000);

    // Placement: protected-mode kernel at 1 MiB, 64-bit entry at +0x200.
    assert_eq!(k.format, KernelFormat::BzImage);
    assert_eq!(
        k.entry,
        EntryPoint::Linux64 {
            entry: GuestAddress(0x10_0200),
            boot_params: GuestAddress(0x7000)
        }
    );
    assert_eq!(k.kernel_load, GuestAddress(0x10_0000));
    let s = setup_size as usize;
    assert_eq!(guest_bytes(&m, 0x10_0000, 4096), raw[s..s + 4096].to_vec());
    let tail = raw.len() - 4096;
    assert_eq!(
        guest_bytes(&m, 0x10_0000 + (tail - s) as u64, 4096),
        raw[tail..].to_vec()
    );
    // The decompression buffer at LOAD_PHYSICAL_ADDR is within memory.
    assert_eq!(k.kernel_end.0, pref_address + u64::from(init_size));
    assert!(k.kernel_end.0 <= MEM_SIZE);

    // Initrd: page-aligned, above the kernel, below initrd_addr_max, at the top of RAM.
    let (initrd_addr, initrd_size) = k.initrd.unwrap();
    assert_eq!(initrd_size, initrd.1.len() as u64);
    assert_eq!(initrd_addr.0 % 4096, 0);
    assert!(initrd_addr.0 >= k.kernel_end.0);
    assert!(initrd_addr.0 + initrd_size - 1 <= u64::from(initrd_addr_max));
    assert!(MEM_SIZE - (initrd_addr.0 + initrd_size) < 4096);
    assert_eq!(guest_bytes(&m, initrd_addr.0, initrd.1.len()), initrd.1);

    // Zero page.
    let p: boot_params = m.read_obj(GuestAddress(0x7000)).unwrap();
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!({ p.hdr.boot_flag }, 0xAA55);
    assert_eq!({ p.hdr.version }, version);
    assert_eq!({ p.hdr.type_of_loader }, 0xFF);
    assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!({ p.hdr.ramdisk_image } as u64, initrd_addr.0);
    assert_eq!({ p.hdr.ramdisk_size } as u64, initrd_size);
    assert_eq!({ p.hdr.xloadflags }, xloadflags);
    assert_eq!({ p.acpi_rsdp_addr }, 0xE_0000);
    let cl = guest_bytes(&m, 0x2_0000, CMDLINE.len() + 1);
    assert_eq!(&cl[..CMDLINE.len()], CMDLINE.as_bytes());
    assert_eq!(cl[CMDLINE.len()], 0);
    assert_eq!(k.cmdline, (GuestAddress(0x2_0000), CMDLINE.len() + 1));
    assert_eq!(
        e820(&p),
        vec![
            (0, 0x9_FC00, 1),
            (0x9_FC00, 0x10_0000 - 0x9_FC00, 2),
            (0x10_0000, MEM_SIZE - 0x10_0000, 1),
        ]
    );
    // Other fields of the header are copied unchanged from the image.
    let zp = guest_bytes(&m, 0x7000 + 0x1F1, 0x268 - 0x1F1);
    let fh = &raw[0x1F1..0x268];
    for (off, len) in [(0x1F1, 0x10), (0x202, 0x0E), (0x230, 0x10), (0x248, 0x20)] {
        let r = off - 0x1F1..off - 0x1F1 + len;
        assert_eq!(zp[r.clone()], fh[r], "setup header bytes at {off:#x}");
    }

    // A command line longer than the kernel's cmdline_size is rejected.
    let long = "x".repeat(cmdline_size as usize + 1);
    let mut kernel = File::open(bz_path).unwrap();
    let e = load(
        &m,
        &mut kernel,
        BootConfig {
            cmdline: &long,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, vmkit_boot::Error::CmdlineTooLong { .. }), "{e}");
}

struct Segment {
    offset: u64,
    paddr: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
}

/// Independent ELF parse: entry, PT_LOAD segments, PVH note.
fn parse_elf(raw: &[u8]) -> (u64, Vec<Segment>, Option<u64>) {
    assert_eq!(&raw[0..4], b"\x7fELF");
    assert_eq!(raw[4], 2, "ELFCLASS64");
    let entry = u64_at(raw, 24);
    let phoff = u64_at(raw, 32) as usize;
    let phnum = usize::from(u16_at(raw, 56));
    let mut segs = Vec::new();
    let mut pvh = None;
    for i in 0..phnum {
        let ph = &raw[phoff + i * 56..phoff + (i + 1) * 56];
        let (ty, off, filesz) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 32));
        if ty == 1 {
            segs.push(Segment {
                offset: off,
                vaddr: u64_at(ph, 16),
                paddr: u64_at(ph, 24),
                filesz,
                memsz: u64_at(ph, 40),
            });
        } else if ty == 4 {
            let mut n = off as usize;
            let end = (off + filesz) as usize;
            while n + 12 <= end {
                let namesz = u32_at(raw, n) as usize;
                let descsz = u32_at(raw, n + 4) as usize;
                let ntype = u32_at(raw, n + 8);
                let name = &raw[n + 12..n + 12 + namesz];
                let desc = n + 12 + namesz.div_ceil(4) * 4;
                if ntype == 18 && name == b"Xen\0" {
                    pvh = Some(u64::from(u32_at(raw, desc)));
                }
                n = desc + descsz.div_ceil(4) * 4;
            }
        }
    }
    (entry, segs, pvh)
}

fn check_segments(m: &GuestMemoryMmap, raw: &[u8], segs: &[Segment], kernel_end: u64) {
    let mut end = 0;
    for s in segs {
        assert!(s.paddr >= 0x10_0000 && s.paddr + s.memsz <= MEM_SIZE);
        end = end.max(s.paddr + s.memsz);
        let n = s.filesz.min(4096) as usize;
        let o = s.offset as usize;
        assert_eq!(
            guest_bytes(m, s.paddr, n),
            raw[o..o + n].to_vec(),
            "segment start"
        );
        let last = (s.filesz as usize).saturating_sub(4096);
        assert_eq!(
            guest_bytes(m, s.paddr + last as u64, n),
            raw[o + last..o + last + n].to_vec(),
            "segment end"
        );
    }
    assert_eq!(kernel_end, end);
}

#[test]
fn vmlinux_linux64_and_pvh() {
    let (_, elf_path) = kernel_paths();
    let raw = std::fs::read(elf_path).unwrap();
    let (entry, segs, pvh) = parse_elf(&raw);
    assert!(!segs.is_empty());
    let text = &segs[0];
    // The ELF entry is the physical address of startup_64: the start of the text segment
    // (linked at __START_KERNEL_map + LOAD_PHYSICAL_ADDR).
    assert_eq!(entry, 0x100_0000);
    assert_eq!(text.paddr, entry);
    assert_eq!(text.vaddr, 0xFFFF_FFFF_8000_0000 + entry);
    let pvh_entry = pvh.expect("Debian's kernel has CONFIG_PVH and a PVH note");
    assert!(pvh_entry >= text.paddr && pvh_entry < text.paddr + text.memsz);

    // Forced 64-bit Linux entry.
    let m = mem();
    let mut kernel = File::open(elf_path).unwrap();
    let k = load(
        &m,
        &mut kernel,
        BootConfig {
            cmdline: CMDLINE,
            protocol: ProtocolChoice::Linux64,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(k.format, KernelFormat::ElfPvh);
    assert_eq!(
        k.entry,
        EntryPoint::Linux64 {
            entry: GuestAddress(entry),
            boot_params: GuestAddress(0x7000)
        }
    );
    assert_eq!(k.kernel_load, GuestAddress(text.paddr));
    check_segments(&m, &raw, &segs, k.kernel_end.0);
    let off = (entry - text.paddr + text.offset) as usize;
    assert_eq!(
        guest_bytes(&m, entry, 64),
        raw[off..off + 64].to_vec(),
        "startup_64 code"
    );
    let p: boot_params = m.read_obj(GuestAddress(0x7000)).unwrap();
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!({ p.hdr.boot_flag }, 0xAA55);
    assert_eq!({ p.hdr.type_of_loader }, 0xFF);
    assert_eq!({ p.hdr.cmd_line_ptr }, 0x2_0000);
    assert_eq!(e820(&p).len(), 3);

    // Auto: PVH.
    let m = mem();
    let initrd = Initrd::new("pvh-initrd");
    let mut initrd_file = initrd.open();
    let mut kernel = File::open(elf_path).unwrap();
    let k = load(
        &m,
        &mut kernel,
        BootConfig {
            cmdline: CMDLINE,
            initrd: Some(&mut initrd_file),
            rsdp: Some(GuestAddress(0xE_0000)),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        k.entry,
        EntryPoint::Pvh {
            entry: GuestAddress(pvh_entry),
            start_info: GuestAddress(0x6000)
        }
    );
    check_segments(&m, &raw, &segs, k.kernel_end.0);
    let si: hvm_start_info = m.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(si.magic, 0x336E_C578);
    assert_eq!(si.version, 1);
    assert_eq!(si.cmdline_paddr, 0x2_0000);
    assert_eq!(si.rsdp_paddr, 0xE_0000);
    assert_eq!(si.nr_modules, 1);
    assert_eq!(si.memmap_entries, 3);
    let (initrd_addr, _) = k.initrd.unwrap();
    assert!(initrd_addr.0 >= k.kernel_end.0);
    assert_eq!(guest_bytes(&m, initrd_addr.0, initrd.1.len()), initrd.1);
}
