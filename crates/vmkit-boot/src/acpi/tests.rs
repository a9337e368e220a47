use std::path::PathBuf;
use std::process::Command;

use acpi_tables::aml::{Device, Name};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap()
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
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

/// Reads a table (with a standard header) from guest memory.
fn read_table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let mut hdr = [0u8; 8];
    mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
    let len = u32_at(&hdr, 4) as usize;
    let mut t = vec![0u8; len];
    mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
    t
}

fn check_header(t: &[u8], sig: &[u8; 4], revision: u8) {
    assert_eq!(&t[0..4], sig);
    assert_eq!(u32_at(t, 4) as usize, t.len());
    assert_eq!(t[8], revision, "{} revision", String::from_utf8_lossy(sig));
    assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&t[10..16], &OEM_ID);
    assert_eq!(&t[16..24], &OEM_TABLE_ID);
}

struct Tables {
    rsdp: Vec<u8>,
    xsdt: Vec<u8>,
    fadt: Vec<u8>,
    madt: Vec<u8>,
    dsdt: Vec<u8>,
    addrs: [u64; 5],
}

/// Writes the tables and follows the pointers from the RSDP, as a guest would.
fn create_and_walk(cfg: &AcpiConfig) -> Tables {
    let mem = mem();
    let rsdp_addr = create_acpi_tables(&mem, cfg).unwrap();
    assert_eq!(rsdp_addr, GuestAddress(0xE_0000));
    let mut rsdp = vec![0u8; 36];
    mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = read_table(&mem, xsdt_addr);
    let fadt_addr = u64_at(&xsdt, 36);
    let madt_addr = u64_at(&xsdt, 44);
    let fadt = read_table(&mem, fadt_addr);
    let dsdt_addr = u64_at(&fadt, 140);
    let madt = read_table(&mem, madt_addr);
    let dsdt = read_table(&mem, dsdt_addr);
    Tables {
        rsdp,
        xsdt,
        fadt,
        madt,
        dsdt,
        addrs: [rsdp_addr.0, xsdt_addr, fadt_addr, madt_addr, dsdt_addr],
    }
}

fn test_config() -> AcpiConfig {
    AcpiConfig {
        num_cpus: 4,
        devices: vec![
            DsdtDevice::virtio_mmio(0, 0xD000_0000, 0x1000, 5, IrqTrigger::Edge),
            DsdtDevice::virtio_mmio(1, 0xD000_1000, 0x1000, 6, IrqTrigger::Level),
        ],
        ..AcpiConfig::default()
    }
}

#[test]
fn rsdp_and_xsdt() {
    let t = create_and_walk(&test_config());
    assert_eq!(&t.rsdp[0..8], b"RSD PTR ");
    assert_eq!(sum(&t.rsdp[0..20]), 0, "RSDP checksum (first 20 bytes)");
    assert_eq!(sum(&t.rsdp), 0, "RSDP extended checksum");
    assert_eq!(t.rsdp[15], 2, "RSDP revision");
    assert_eq!(u32_at(&t.rsdp, 16), 0, "no RSDT");
    assert_eq!(u32_at(&t.rsdp, 20), 36, "RSDP length");

    check_header(&t.xsdt, b"XSDT", 1);
    assert_eq!(t.xsdt.len(), 36 + 2 * 8);

    // All tables inside [0xE0000, 0x100000), in order, not overlapping.
    let lens = [36, t.xsdt.len(), t.fadt.len(), t.madt.len(), t.dsdt.len()];
    for i in 0..5 {
        assert!(t.addrs[i] >= 0xE_0000 && t.addrs[i] + lens[i] as u64 <= 0x10_0000);
        assert_eq!(t.addrs[i] % 16, 0);
        if i > 0 {
            assert!(t.addrs[i - 1] + lens[i - 1] as u64 <= t.addrs[i]);
        }
    }
}

#[test]
fn fadt_fields() {
    let t = create_and_walk(&test_config());
    let f = &t.fadt;
    check_header(f, b"FACP", 6);
    assert_eq!(f.len(), 276);
    assert_eq!(f[131], 5, "FADT minor version");
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(u64_at(f, 140), t.addrs[4], "X_DSDT");
    // No legacy PM blocks.
    for off in (56..88).step_by(4) {
        assert_eq!(u32_at(f, off), 0, "legacy block at {off}");
    }
    for off in (148..244).step_by(12) {
        assert_eq!(u64_at(f, off + 4), 0, "X_ block at {off}");
    }
    // GAS: space 1 (System I/O), width 8, offset 0, access 1 (byte), address.
    let gas = |off: usize| {
        (
            f[off],
            f[off + 1],
            f[off + 2],
            f[off + 3],
            u64_at(f, off + 4),
        )
    };
    assert_eq!(gas(116), (1, 8, 0, 1, 0x602), "RESET_REG");
    assert_eq!(f[128], 1, "RESET_VALUE");
    assert_eq!(gas(244), (1, 8, 0, 1, 0x600), "SLEEP_CONTROL_REG");
    assert_eq!(gas(256), (1, 8, 0, 1, 0x601), "SLEEP_STATUS_REG");
    assert_eq!(
        u16_at(f, 109),
        IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT
    );
}

#[test]
fn fadt_custom_ports() {
    let cfg = AcpiConfig {
        sleep_control_port: 0x700,
        sleep_status_port: 0x701,
        reset_port: 0xCF9,
        reset_value: 0x6,
        ..AcpiConfig::default()
    };
    let t = create_and_walk(&cfg);
    assert_eq!(u64_at(&t.fadt, 120), 0xCF9);
    assert_eq!(t.fadt[128], 6);
    assert_eq!(u64_at(&t.fadt, 248), 0x700);
    assert_eq!(u64_at(&t.fadt, 260), 0x701);
    assert_eq!(sum(&t.fadt), 0);
}

#[test]
fn madt_fields() {
    let t = create_and_walk(&test_config());
    let m = &t.madt;
    check_header(m, b"APIC", 1);
    assert_eq!(u32_at(m, 36), 0xFEE0_0000, "local APIC address");
    assert_eq!(u32_at(m, 40), 1, "PCAT_COMPAT");

    let mut lapics = Vec::new();
    let mut ioapics = Vec::new();
    let mut isos = Vec::new();
    let mut nmis = Vec::new();
    let mut off = 44;
    while off < m.len() {
        let (ty, len) = (m[off], m[off + 1] as usize);
        let e = &m[off..off + len];
        match ty {
            0 => {
                assert_eq!(len, 8);
                lapics.push((e[2], e[3], u32_at(e, 4)));
            }
            1 => {
                assert_eq!(len, 12);
                ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8)));
            }
            2 => {
                assert_eq!(len, 10);
                isos.push((e[2], e[3], u32_at(e, 4), u16_at(e, 8)));
            }
            4 => {
                assert_eq!(len, 6);
                nmis.push((e[2], u16_at(e, 3), e[5]));
            }
            _ => panic!("unexpected MADT entry type {ty}"),
        }
        off += len;
    }
    assert_eq!(off, m.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
    assert_eq!(ioapics, vec![(0, 0xFEC0_0000, 0)]);
    assert_eq!(isos, vec![(0, 0, 2, 0)]);
    assert_eq!(nmis, vec![(0xFF, 5, 1)]);

    let t = create_and_walk(&AcpiConfig {
        pcat_compat: false,
        num_cpus: 255,
        ..AcpiConfig::default()
    });
    assert_eq!(u32_at(&t.madt, 40), 0);
    assert_eq!(sum(&t.madt), 0);
    assert_eq!(t.madt.len(), 44 + 255 * 8 + 12 + 10 + 6);
}

#[test]
fn dsdt_fields() {
    let t = create_and_walk(&test_config());
    let d = &t.dsdt;
    check_header(d, b"DSDT", 6);
    let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
    // Name (_S5_, Package (4) { 5, Zero, Zero, Zero })
    assert!(has(&[
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0A, 0x05, 0, 0, 0
    ]));
    assert!(has(b"COM1"));
    // EISAID("PNP0501") = 0x0105D041
    assert!(has(&[0x0C, 0x41, 0xD0, 0x05, 0x01]));
    assert!(has(b"PS2K"));
    // EISAID("PNP0303") = 0x0303D041
    assert!(has(&[0x0C, 0x41, 0xD0, 0x03, 0x03]));
    // Extended interrupt: consumer, edge, GSI 1.
    assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 1, 0, 0, 0]));
    assert!(has(b"LNRO0005\0"));
    assert!(has(b"M000") && has(b"M001"));
    // Memory32Fixed(ReadWrite, 0xD0001000, 0x1000)
    assert!(has(&[
        0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xD0, 0x00, 0x10, 0, 0
    ]));
    // Extended interrupt: consumer, edge, GSI 5; consumer, level, GSI 6.
    assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0]));
    assert!(has(&[0x89, 0x06, 0x00, 0x01, 0x01, 6, 0, 0, 0]));
}

#[test]
fn custom_dsdt_device() {
    let cfg = AcpiConfig {
        com1: false,
        devices: vec![DsdtDevice::Custom(Box::new(
            Device::new(
                "ABCD".into(),
                vec![&Name::new("_HID".into(), &"VMKT0001".to_string())],
            )
            .to_bytes_boxed(),
        ))],
        ..AcpiConfig::default()
    };
    let t = create_and_walk(&cfg);
    let has = |needle: &[u8]| t.dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"ABCD"));
    assert!(has(b"VMKT0001"));
    assert!(!has(b"COM1"));
}

trait ToBytesBoxed {
    fn to_bytes_boxed(&self) -> RawAml;
}

impl<T: Aml> ToBytesBoxed for T {
    fn to_bytes_boxed(&self) -> RawAml {
        RawAml(to_bytes(self))
    }
}

#[test]
fn errors() {
    let m = mem();
    for n in [0, 256] {
        let cfg = AcpiConfig {
            num_cpus: n,
            ..AcpiConfig::default()
        };
        assert!(matches!(
            create_acpi_tables(&m, &cfg),
            Err(Error::InvalidCpuCount(x)) if x == n
        ));
    }
    let bad_hid = AcpiConfig {
        devices: vec![DsdtDevice::Mmio(MmioDevice {
            hid: "virtio".into(),
            ..MmioDevice::virtio_mmio(0, 0xD000_0000, 0x1000, 5, IrqTrigger::Edge)
        })],
        ..AcpiConfig::default()
    };
    let e = create_acpi_tables(&m, &bad_hid).unwrap_err();
    assert!(matches!(e, Error::InvalidAcpiDevice(_)), "{e}");
    let bad_range = AcpiConfig {
        devices: vec![DsdtDevice::virtio_mmio(
            0,
            0xFFFF_F000,
            0x2000,
            5,
            IrqTrigger::Edge,
        )],
        ..AcpiConfig::default()
    };
    assert!(matches!(
        create_acpi_tables(&m, &bad_range),
        Err(Error::InvalidAcpiDevice(_))
    ));

    // Too many devices for the 128 KiB area.
    let huge = AcpiConfig {
        devices: (0..3000)
            .map(|i| {
                DsdtDevice::virtio_mmio(i, 0xD000_0000 + i * 0x1000, 0x1000, 5, IrqTrigger::Edge)
            })
            .collect(),
        ..AcpiConfig::default()
    };
    let e = create_acpi_tables(&m, &huge).unwrap_err();
    assert!(matches!(e, Error::AcpiTablesDoNotFit { .. }), "{e}");

    // Guest memory too small to hold the ACPI area.
    let small: GuestMemoryMmap =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
    let e = create_acpi_tables(&small, &AcpiConfig::default()).unwrap_err();
    assert!(matches!(e, Error::AcpiTablesDoNotFit { .. }), "{e}");
}

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vmkit-boot-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        ScratchDir(p)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Disassembles `bytes` with `iasl -d` and returns the text.
fn iasl_disassemble(dir: &ScratchDir, name: &str, bytes: &[u8]) -> String {
    let dat = dir.0.join(format!("{name}.dat"));
    std::fs::write(&dat, bytes).unwrap();
    let out = match Command::new("iasl")
        .arg("-d")
        .arg(&dat)
        .current_dir(&dir.0)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`iasl` not found: install acpica-tools (`apt-get install acpica-tools`) to run \
             the ACPI disassembly test"
        ),
        Err(e) => panic!("running iasl failed: {e}"),
    };
    assert!(
        out.status.success(),
        "iasl -d {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(dir.0.join(format!("{name}.dsl"))).unwrap()
}

/// Collapses runs of whitespace so that assertions don't depend on iasl's column layout.
/// Also drops comments and the `[0F4h 0244 12]` offset prefixes of data table lines.
fn squash(s: &str) -> String {
    let mut words = Vec::new();
    for line in s.lines() {
        // Drop `// ...` comments and one-line `/* ... */` comments.
        let mut l = line.split("//").next().unwrap_or_default().to_string();
        if let (Some(a), Some(b)) = (l.find("/*"), l.find("*/")) {
            if a < b {
                l.replace_range(a..b + 2, "");
            }
        }
        let l = l.trim_start();
        let l = match (l.starts_with('['), l.find(']')) {
            (true, Some(end)) if l[..end].ends_with(|c: char| c.is_ascii_digit()) => &l[end + 1..],
            _ => l,
        };
        words.extend(l.split_whitespace().map(str::to_string));
    }
    words.join(" ")
}

#[test]
fn iasl_disassembly() {
    let dir = ScratchDir::new("iasl");
    let t = create_and_walk(&test_config());

    // iasl -d cannot disassemble a lone RSDP (it has no standard table header); the RSDP is
    // checked field by field in `rsdp_and_xsdt`.
    let xsdt = squash(&iasl_disassemble(&dir, "xsdt", &t.xsdt));
    assert!(
        xsdt.contains("ACPI Table Address 0 : 00000000000E0070"),
        "{xsdt}"
    );
    assert!(
        xsdt.contains("ACPI Table Address 1 : 00000000000E0190"),
        "{xsdt}"
    );

    let fadt = squash(&iasl_disassemble(&dir, "facp", &t.fadt));
    for want in [
        "Signature : \"FACP\" [Fixed ACPI Description Table (FADT)]",
        "Hardware Reduced (V5) : 1",
        "Reset Register Supported (V2) : 1",
        "Value to cause reset : 01",
        "Reset Register : [Generic Address Structure] Space ID : 01 [SystemIO] Bit Width : 08 Bit Offset : 00 Encoded Access Width : 01 [Byte Access:8] Address : 0000000000000602",
        "Sleep Control Register : [Generic Address Structure] Space ID : 01 [SystemIO] Bit Width : 08 Bit Offset : 00 Encoded Access Width : 01 [Byte Access:8] Address : 0000000000000600",
        "Sleep Status Register : [Generic Address Structure] Space ID : 01 [SystemIO] Bit Width : 08 Bit Offset : 00 Encoded Access Width : 01 [Byte Access:8] Address : 0000000000000601",
        "VGA Not Present (V4) : 1",
        "CMOS RTC Not Present (V5) : 1",
        "PM1A Event Block Address : 00000000",
        "Control Method Power Button (V1) : 1",
        "Control Method Sleep Button (V1) : 1",
    ] {
        assert!(fadt.contains(want), "FADT disassembly lacks {want:?}:\n{fadt}");
    }
    assert!(
        fadt.contains(&format!("DSDT Address : {:016X}", t.addrs[4])),
        "X_DSDT:\n{fadt}"
    );

    let madt_text = iasl_disassemble(&dir, "apic", &t.madt);
    let madt = squash(&madt_text);
    assert_eq!(
        madt.matches("Subtable Type : 00 [Processor Local APIC]")
            .count(),
        4,
        "{madt}"
    );
    for want in [
        "Local Apic Address : FEE00000",
        "PC-AT Compatibility : 1",
        "Subtable Type : 01 [I/O APIC]",
        "I/O Apic ID : 00",
        "Address : FEC00000",
        "Interrupt : 00000000",
        "Subtable Type : 02 [Interrupt Source Override]",
        "Source : 00",
        "Interrupt : 00000002",
        "Subtable Type : 04 [Local APIC NMI]",
        "Processor ID : FF",
        "Interrupt Input LINT : 01",
    ] {
        assert!(
            madt.contains(want),
            "MADT disassembly lacks {want:?}:\n{madt}"
        );
    }
    for id in 0..4 {
        assert!(
            madt.contains(&format!(
                "Local Apic ID : {id:02X} Flags (decoded below) : 00000001 Processor Enabled : 1"
            )),
            "{madt}"
        );
    }

    let dsdt = squash(&iasl_disassemble(&dir, "dsdt", &t.dsdt));
    for text in [&xsdt, &fadt, &madt, &dsdt] {
        assert!(!text.contains("Incorrect checksum"), "{text}");
        assert!(!text.contains("Invalid"), "{text}");
    }
    for want in [
        "Name (_S5, Package (0x04) { 0x05, Zero, Zero, Zero })",
        "Scope (\\_SB) { Device (COM1)",
        "Device (COM1)",
        "Name (_HID, EisaId (\"PNP0501\") )",
        "IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08, )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000004, }",
        "Device (PS2K)",
        "Name (_HID, EisaId (\"PNP0303\") )",
        "IO (Decode16, 0x0060, 0x0060, 0x00, 0x01, )",
        "IO (Decode16, 0x0064, 0x0064, 0x00, 0x01, )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000001, }",
        "Device (M000)",
        "Name (_HID, \"LNRO0005\")",
        "Memory32Fixed (ReadWrite, 0xD0000000, 0x00001000, )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000005, }",
        "Device (M001)",
        "Name (_UID, One)",
        "Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) { 0x00000006, }",
    ] {
        assert!(
            dsdt.contains(want),
            "DSDT disassembly lacks {want:?}:\n{dsdt}"
        );
    }
}

fn pci_config() -> AcpiConfig {
    AcpiConfig {
        num_cpus: 2,
        devices: vec![DsdtDevice::PciHostBridge(PciHostBridge {
            mmio64: Some((0x80_0000_0000, 0x40_0000_0000)),
            ..PciHostBridge::bus0(0xE000_0000, (0xC000_0000, 0x2000_0000))
        })],
        ..AcpiConfig::default()
    }
}

#[test]
fn mcfg_in_the_xsdt_only_with_a_host_bridge() {
    let plain = build_acpi_tables(&test_config()).unwrap();
    assert!(plain.iter().all(|t| &t.signature != b"MCFG"));
    let tables = build_acpi_tables(&pci_config()).unwrap();
    let get = |sig: &[u8; 4]| tables.iter().find(|t| &t.signature == sig).unwrap();
    let xsdt = &get(b"XSDT").bytes;
    assert_eq!(xsdt.len(), 36 + 3 * 8);
    assert_eq!(u64_at(xsdt, 36 + 16), get(b"MCFG").addr.0);
    let mcfg = &get(b"MCFG").bytes;
    check_header(mcfg, b"MCFG", 1);
    assert_eq!(mcfg.len(), 44 + 16);
    assert_eq!(u64_at(mcfg, 44), 0xE000_0000);
    assert_eq!(u16_at(mcfg, 52), 0, "segment");
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "buses 0-0");
    // Tables do not overlap and stay 16-byte aligned.
    let mut spans: Vec<(u64, u64)> = tables
        .iter()
        .map(|t| (t.addr.0, t.addr.0 + t.bytes.len() as u64))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0);
        assert_eq!(w[1].0 % 16, 0);
    }
}

#[test]
fn bad_host_bridges_are_refused() {
    for b in [
        PciHostBridge::bus0(0xE008_0000, (0xC000_0000, 0x1000)),
        PciHostBridge::bus0(0xFFF0_0000 + (1 << 20), (0xC000_0000, 0x1000)),
        PciHostBridge::bus0(0xE000_0000, (0xC000_0000, 0)),
        PciHostBridge::bus0(0xE000_0000, (0xF000_0000, 0x2000_0000)),
        PciHostBridge {
            bus_start: 1,
            ..PciHostBridge::bus0(0xE000_0000, (0xC000_0000, 0x1000))
        },
        PciHostBridge {
            uid: 10,
            ..PciHostBridge::bus0(0xE000_0000, (0xC000_0000, 0x1000))
        },
    ] {
        let cfg = AcpiConfig {
            devices: vec![DsdtDevice::PciHostBridge(b.clone())],
            ..AcpiConfig::default()
        };
        assert!(
            matches!(build_acpi_tables(&cfg), Err(Error::InvalidAcpiDevice(_))),
            "{b:?}"
        );
    }
}

#[test]
fn iasl_disassembly_of_mcfg_and_pci_host_bridge() {
    let dir = ScratchDir::new("iasl-pci");
    let tables = build_acpi_tables(&pci_config()).unwrap();
    let get = |sig: &[u8; 4]| &tables.iter().find(|t| &t.signature == sig).unwrap().bytes;

    let mcfg = squash(&iasl_disassemble(&dir, "mcfg", get(b"MCFG")));
    for want in [
        "Signature : \"MCFG\" [Memory Mapped Configuration",
        "Base Address : 00000000E0000000",
        "Segment Group Number : 0000",
        "Start Bus Number : 00",
        "End Bus Number : 00",
    ] {
        assert!(
            mcfg.contains(want),
            "MCFG disassembly lacks {want:?}:\n{mcfg}"
        );
    }
    let xsdt = squash(&iasl_disassemble(&dir, "xsdt", get(b"XSDT")));
    assert!(xsdt.contains("ACPI Table Address 2 :"), "{xsdt}");

    let dsdt = squash(&iasl_disassemble(&dir, "dsdt", get(b"DSDT")));
    for text in [&mcfg, &xsdt, &dsdt] {
        assert!(!text.contains("Incorrect checksum"), "{text}");
        assert!(!text.contains("Invalid"), "{text}");
    }
    for want in [
        "Device (PCI0)",
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "Name (_UID, Zero)",
        "Name (_SEG, Zero)",
        "Name (_BBN, Zero)",
        "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0x0000, 0x0000, 0x0000, 0x0000, 0x0001,",
        "IO (Decode16, 0x0CF8, 0x0CF8, 0x01, 0x08, )",
        "DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000,",
        "QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, 0x0000000000000000, 0x0000008000000000, 0x000000BFFFFFFFFF, 0x0000000000000000, 0x0000004000000000,",
        "Device (PRS0)",
        "Name (_HID, EisaId (\"PNP0C02\")",
        "Memory32Fixed (ReadOnly, 0xE0000000, 0x00100000, )",
    ] {
        assert!(dsdt.contains(want), "DSDT disassembly lacks {want:?}:\n{dsdt}");
    }
}

fn ged_config() -> AcpiConfig {
    AcpiConfig {
        ged: Some(GedConfig::default()),
        ..test_config()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn ged_constants_match_the_device_model_and_the_layout() {
    assert_eq!(u64::from(GED_REGISTER_LEN), vmkit_legacy::GED_REGISTER_SIZE);
    assert_eq!(GED_EVENT_POWER_BUTTON, vmkit_legacy::GED_EVENT_POWER_BUTTON);
    assert_eq!(
        GedConfig::default(),
        GedConfig {
            addr: 0xFEA0_0000,
            gsi: 3
        }
    );
    assert_eq!(
        u64::from(GedConfig::default().addr),
        crate::layout::GED_ADDR
    );
}

#[test]
fn no_ged_by_default() {
    assert_eq!(AcpiConfig::default().ged, None);
    let t = create_and_walk(&test_config());
    for absent in [&b"ACPI0013"[..], b"GED_", b"PWRB", b"_EVT"] {
        assert!(!contains(&t.dsdt, absent), "{absent:?}");
    }
}

#[test]
fn ged_and_power_button_in_the_dsdt() {
    let t = create_and_walk(&ged_config());
    let d = &t.dsdt;
    check_header(d, b"DSDT", 6);
    // Device (PWRB) { Name (_HID, EISAID ("PNP0C0C")) }: EISAID("PNP0C0C") = 0x0C0CD041.
    assert!(contains(d, b"PWRB"));
    assert!(contains(
        d,
        &[0x08, b'_', b'H', b'I', b'D', 0x0C, 0x41, 0xD0, 0x0C, 0x0C]
    ));
    // Device (GED_) { Name (_HID, "ACPI0013") ... }
    assert!(contains(d, b"GED_"));
    assert!(contains(d, b"\x08_HID\x0DACPI0013\0"));
    // _CRS: extended interrupt, consumer, edge, active high, exclusive, GSI 3, and nothing
    // else (Linux's GED driver fails on any other resource): the end tag follows at once.
    assert!(contains(
        d,
        &[0x89, 0x06, 0x00, 0x03, 0x01, 3, 0, 0, 0, 0x79]
    ));
    // No Memory32Fixed of the register anywhere.
    assert!(!contains(
        d,
        &[0x86, 0x09, 0x00, 0x00, 0x00, 0x00, 0xA0, 0xFE, 1, 0, 0, 0]
    ));
    // OperationRegion (GREG, SystemMemory, 0xFEA00000, One)
    assert!(contains(
        d,
        &[0x5B, 0x80, b'G', b'R', b'E', b'G', 0x00, 0x0C, 0x00, 0x00, 0xA0, 0xFE, 0x01]
    ));
    // Method (_EVT, 1, Serialized): name, then flags (1 argument | serialized).
    assert!(contains(d, &[b'_', b'E', b'V', b'T', 0x09]));
    // Notify (\_SB.PWRB, 0x80)
    assert!(contains(
        d,
        &[0x86, b'\\', 0x2E, b'_', b'S', b'B', b'_', b'P', b'W', b'R', b'B', 0x0A, 0x80]
    ));

    // Elsewhere, and at another GSI.
    let t = create_and_walk(&AcpiConfig {
        ged: Some(GedConfig {
            addr: 0xFED0_1000,
            gsi: 7,
        }),
        ..AcpiConfig::default()
    });
    assert!(contains(
        &t.dsdt,
        &[0x89, 0x06, 0x00, 0x03, 0x01, 7, 0, 0, 0]
    ));
    assert!(contains(&t.dsdt, &[0x0C, 0x00, 0x10, 0xD0, 0xFE]));
}

#[test]
fn fadt_has_no_fixed_buttons() {
    for cfg in [AcpiConfig::default(), ged_config()] {
        let t = create_and_walk(&cfg);
        let flags = u32_at(&t.fadt, 112);
        assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON: no fixed power button");
        assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON: no fixed sleep button");
    }
}

#[test]
fn iasl_disassembly_of_the_ged() {
    let dir = ScratchDir::new("iasl-ged");
    let t = create_and_walk(&ged_config());
    let text = iasl_disassemble(&dir, "dsdt", &t.dsdt);
    let dsdt = squash(&text);
    assert!(!dsdt.contains("Invalid"), "{text}");
    assert!(!dsdt.to_lowercase().contains("error"), "{text}");
    for want in [
        "Device (PWRB) { Name (_HID, EisaId (\"PNP0C0C\") ) Name (_UID, Zero) }",
        "Device (GED) { Name (_HID, \"ACPI0013\" )",
        "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) { 0x00000003, }",
        "OperationRegion (GREG, SystemMemory, 0xFEA00000, One)",
        "Field (GREG, ByteAcc, NoLock, WriteAsZeros) { GEVT, 8 }",
        "Method (_EVT, 1, Serialized)",
        "Local0 = GEVT",
        "Local1 = (Local0 & One)",
        "If ((Local1 == One)) { Notify (\\_SB.PWRB, 0x80)",
    ] {
        assert!(
            dsdt.contains(want),
            "DSDT disassembly lacks {want:?}:\n{text}"
        );
    }
}

/// Runs one of acpica-tools' programs in `dir`; panics, saying what to install, if it is
/// missing.
fn acpica(dir: &ScratchDir, program: &str, args: &[&str]) -> String {
    let out = match Command::new(program)
        .args(args)
        .current_dir(&dir.0)
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{program}` not found: install acpica-tools (`apt-get install acpica-tools`) to \
             run the ACPI tests"
        ),
        Err(e) => panic!("running {program} failed: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// Runs the GED's `_EVT` in ACPICA's own interpreter (`acpiexec`, which simulates
/// SystemMemory regions with a buffer): with each value in the event register, the power
/// button is notified exactly when bit 0 is set.
#[test]
fn acpiexec_runs_evt_and_notifies_the_power_button_on_bit_0() {
    let dir = ScratchDir::new("acpiexec-ged");
    let t = create_and_walk(&ged_config());
    std::fs::write(dir.0.join("dsdt.aml"), &t.dsdt).unwrap();
    // A test SSDT: \TST1 (v) puts v in the register, then runs _EVT as Linux's evged does
    // on the GED's interrupt (Arg0 = the GSI).
    std::fs::write(
        dir.0.join("ssdt.asl"),
        r#"DefinitionBlock ("", "SSDT", 2, "VMKIT", "GEDTEST", 1)
{
    External (\_SB.GED.GEVT, FieldUnitObj)
    External (\_SB.GED._EVT, MethodObj)
    Method (\TST1, 1)
    {
        \_SB.GED.GEVT = Arg0
        \_SB.GED._EVT (3)
    }
}
"#,
    )
    .unwrap();
    acpica(&dir, "iasl", &["ssdt.asl"]);
    for (value, notified) in [
        (0u8, false),
        (1, true),
        (2, false),
        (3, true),
        (0xFE, false),
    ] {
        let cmd = format!("execute \\TST1 {value:#x}");
        let out = acpica(&dir, "acpiexec", &["-b", &cmd, "dsdt.aml", "ssdt.aml"]);
        assert!(out.contains("Evaluating \\TST1"), "{out}");
        for bad in ["failed with status", "Error", "Exception", "Warning"] {
            assert!(!out.contains(bad), "{value:#x}: {bad:?} in\n{out}");
        }
        let notify = "Received a Device Notify on [PWRB]";
        assert_eq!(
            out.matches(notify).count(),
            usize::from(notified),
            "register {value:#x}:\n{out}"
        );
        if notified {
            assert!(out.contains("Value 0x80"), "{out}");
        }
    }
}
