//! ACPI tables (RSDP, XSDT, FADT, MADT, DSDT, and MCFG with a PCI host bridge) for a
//! hardware-reduced x86_64 guest, built with `acpi_tables` and written into guest memory at
//! [`ACPI_START`].

use acpi_tables::aml::{
    AddressSpace as AmlAddressSpace, AddressSpaceCacheable, And, Device, EISAName, Equal, Field,
    FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt, Local,
    Memory32Fixed, Method, Name, Notify, OpRegion, OpRegionSpace, Package, Path, ResourceTemplate,
    Scope, Store, IO, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::error::{Error, Result};
use crate::layout::{ACPI_END, ACPI_START, GED_ADDR, GED_GSI};
use crate::{IOAPIC_ADDR32 as IOAPIC_ADDR, LAPIC_ADDR32 as LAPIC_ADDR};

/// OEM ID of every table.
pub const OEM_ID: [u8; 6] = *b"VMKIT ";
/// OEM table ID of every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"VMKIT   ";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;

/// FADT `IAPC_BOOT_ARCH`: legacy devices (ISA) present.
pub const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// FADT `IAPC_BOOT_ARCH`: an 8042 keyboard controller is present.
pub const IAPC_8042: u16 = 1 << 1;
/// FADT `IAPC_BOOT_ARCH`: VGA is not present.
pub const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT `IAPC_BOOT_ARCH`: MSI is not supported.
pub const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// FADT `IAPC_BOOT_ARCH`: there is no CMOS RTC.
pub const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// MADT flag: the system also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// Offset of the MADT flags field.
const MADT_FLAGS_OFFSET: usize = 40;
/// Offset of the checksum byte in a table header.
const CHECKSUM_OFFSET: usize = 9;
/// Tables are 16-byte aligned.
const TABLE_ALIGN: u64 = 16;

/// Size in bytes of the GED's event register; vmkit-legacy's `GED_REGISTER_SIZE` (a test
/// checks they agree).
pub const GED_REGISTER_LEN: u32 = 1;
/// The GED event register's power button bit; vmkit-legacy's `GED_EVENT_POWER_BUTTON`.
pub const GED_EVENT_POWER_BUTTON: u8 = 1 << 0;
/// `Notify` value for a power button: "the button was pressed" (ACPI 6.5 §5.6.6, device
/// object notifications).
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// The ACPI Generic Event Device, the power button of this hardware-reduced platform, as
/// the DSDT describes it: `\_SB.GED_` (`_HID "ACPI0013"`, `_CRS` with only the interrupt,
/// edge and active high, an operation region over the
/// register, and `_EVT`, which reads it and on bit 0 does `Notify (\_SB.PWRB, 0x80)`), and
/// `\_SB.PWRB`, a control-method power button (`_HID EISAID("PNP0C0C")`).
///
/// The device model is vmkit-legacy's `Ged`, registered at [`addr`](Self::addr) with the
/// line of [`gsi`](Self::gsi).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GedConfig {
    /// Guest physical address of the event register ([`GED_REGISTER_LEN`] bytes, below
    /// 4 GiB).
    pub addr: u32,
    /// Global system interrupt the GED raises (edge-triggered, active high).
    pub gsi: u32,
}

impl Default for GedConfig {
    /// The layout's fixed place: `layout::GED_ADDR` (0xFEA0_0000) and `layout::GED_GSI` (3).
    fn default() -> Self {
        GedConfig {
            addr: GED_ADDR32,
            gsi: GED_GSI,
        }
    }
}

// The layout keeps the GED's page below 4 GiB (checked when vmkit-memory is built).
const GED_ADDR32: u32 = GED_ADDR as u32;
const _: () = assert!(GED_ADDR + GED_REGISTER_LEN as u64 <= u32::MAX as u64 + 1);

/// Interrupt trigger mode of a device interrupt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IrqTrigger {
    /// Edge-triggered, active high.
    #[default]
    Edge,
    /// Level-triggered, active high.
    Level,
}

/// A device with one 32-bit MMIO range and one interrupt, described in the DSDT as
/// `Device (Mxxx) { _HID, _UID, _CRS { Memory32Fixed, Interrupt } }` inside `\_SB`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// `_HID`: an EISA ID (`"PNP0501"`, 3 letters + 4 hex digits) or an ACPI ID
    /// (`"LNRO0005"`, 4 letters or digits + 4 hex digits).
    pub hid: String,
    /// `_UID`.
    pub uid: u32,
    /// Base of the MMIO range.
    pub base: u32,
    /// Length of the MMIO range (non-zero; the range must end below 4 GiB).
    pub len: u32,
    /// Global system interrupt.
    pub gsi: u32,
    /// Trigger mode of the interrupt.
    pub trigger: IrqTrigger,
}

impl MmioDevice {
    /// A virtio-mmio device (`_HID "LNRO0005"`, as Linux's virtio_mmio driver matches).
    pub fn virtio_mmio(uid: u32, base: u32, len: u32, gsi: u32, trigger: IrqTrigger) -> Self {
        MmioDevice {
            hid: "LNRO0005".into(),
            uid,
            base,
            len,
            gsi,
            trigger,
        }
    }
}

/// A PCI host bridge with ECAM: described in the DSDT as `Device (PCIn)` (`_HID
/// EISAID("PNP0A08")`, `_CID EISAID("PNP0A03")`, `_SEG`, `_BBN`, `_UID`, `_CRS` with the bus
/// range, the 0xCF8–0xCFF configuration ports and the memory window(s) for BARs), with a
/// `PNP0C02` motherboard-resources device reserving the ECAM window (Linux uses ECAM only
/// when it is reserved there or in E820), and in an MCFG table in the XSDT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciHostBridge {
    /// `_UID` (and the `n` of `PCIn`, 0–9).
    pub uid: u8,
    /// PCI segment (`_SEG`, MCFG segment group).
    pub segment: u16,
    /// First bus number (`_BBN`, MCFG start bus).
    pub bus_start: u8,
    /// Last bus number (MCFG end bus).
    pub bus_end: u8,
    /// Guest physical address of the ECAM window for `bus_start` (1 MiB per bus, 1 MiB
    /// aligned; below 4 GiB for the `PNP0C02` reservation).
    pub ecam_base: u64,
    /// The 32-bit memory window BARs are placed in: `(base, length)`.
    pub mmio32: (u32, u32),
    /// An optional 64-bit memory window: `(base, length)`.
    pub mmio64: Option<(u64, u64)>,
}

impl PciHostBridge {
    /// Segment 0, bus 0 only, `_UID` 0.
    pub fn bus0(ecam_base: u64, mmio32: (u32, u32)) -> Self {
        Self {
            uid: 0,
            segment: 0,
            bus_start: 0,
            bus_end: 0,
            ecam_base,
            mmio32,
            mmio64: None,
        }
    }

    /// The ECAM window's size: 1 MiB per bus.
    pub fn ecam_size(&self) -> u64 {
        (u64::from(self.bus_end.saturating_sub(self.bus_start)) + 1) << 20
    }
}

/// A device added to the DSDT.
pub enum DsdtDevice {
    /// An MMIO device; named `M000`, `M001`, … in order of appearance in
    /// [`AcpiConfig::devices`].
    Mmio(MmioDevice),
    /// A PCI host bridge (and its MCFG entry).
    PciHostBridge(PciHostBridge),
    /// Arbitrary AML, emitted inside `Scope (\_SB)`.
    Custom(Box<dyn Aml>),
}

impl DsdtDevice {
    /// A virtio-mmio device; see [`MmioDevice::virtio_mmio`].
    pub fn virtio_mmio(uid: u32, base: u32, len: u32, gsi: u32, trigger: IrqTrigger) -> Self {
        DsdtDevice::Mmio(MmioDevice::virtio_mmio(uid, base, len, gsi, trigger))
    }
}

impl std::fmt::Debug for DsdtDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DsdtDevice::Mmio(d) => f.debug_tuple("Mmio").field(d).finish(),
            DsdtDevice::PciHostBridge(d) => f.debug_tuple("PciHostBridge").field(d).finish(),
            DsdtDevice::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// What the ACPI tables describe.
#[derive(Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (1 to 255); the MADT gets one enabled local APIC per vCPU with
    /// APIC ID and processor UID = vCPU index.
    pub num_cpus: u32,
    /// IOAPIC ID (default 0).
    pub ioapic_id: u8,
    /// IOAPIC MMIO address (default 0xFEC0_0000); its GSI base is 0.
    pub ioapic_addr: u32,
    /// Set the MADT PCAT_COMPAT flag (the VM has dual 8259 PICs, as KVM's in-kernel
    /// irqchip does). Default true.
    pub pcat_compat: bool,
    /// I/O port of the hardware-reduced sleep control register (default 0x600).
    pub sleep_control_port: u16,
    /// I/O port of the hardware-reduced sleep status register (default 0x601).
    pub sleep_status_port: u16,
    /// I/O port of the reset register (default 0x602).
    pub reset_port: u16,
    /// Value to write to the reset register (default 0x01).
    pub reset_value: u8,
    /// FADT `IAPC_BOOT_ARCH` flags (default [`IAPC_VGA_NOT_PRESENT`] |
    /// [`IAPC_CMOS_RTC_NOT_PRESENT`]: no VGA, no RTC, no 8042 to probe).
    pub iapc_boot_arch: u16,
    /// Describe COM1 (`PNP0501`, I/O 0x3F8–0x3FF, IRQ 4) in the DSDT. Default true.
    pub com1: bool,
    /// Describe the i8042's keyboard port (`PNP0303`, I/O 0x60 and 0x64, IRQ 1) in the DSDT.
    /// Default true. On this hardware-reduced platform (no 8042 flag in `IAPC_BOOT_ARCH`,
    /// no legacy PIC) it is how Linux finds the keyboard controller and maps IRQ 1.
    pub i8042: bool,
    /// Describe an ACPI Generic Event Device and a control-method power button in the DSDT
    /// (see [`GedConfig`]), so that the VMM can ask the guest to shut down. Default `None`.
    pub ged: Option<GedConfig>,
    /// Further DSDT devices.
    pub devices: Vec<DsdtDevice>,
}

impl Default for AcpiConfig {
    fn default() -> Self {
        AcpiConfig {
            num_cpus: 1,
            ioapic_id: 0,
            ioapic_addr: IOAPIC_ADDR,
            pcat_compat: true,
            sleep_control_port: 0x600,
            sleep_status_port: 0x601,
            reset_port: 0x602,
            reset_value: 0x01,
            iapc_boot_arch: IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT,
            com1: true,
            i8042: true,
            ged: None,
            devices: Vec::new(),
        }
    }
}

/// MADT Interrupt Source Override (type 2).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32,
    flags: U16,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// MADT Local APIC NMI (type 4).
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16,
    lint: u8,
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

/// Already-encoded AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

fn fix_checksum(table: &mut [u8]) {
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = 0u8.wrapping_sub(sum);
}

fn align_up(v: u64) -> u64 {
    (v + TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1)
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn build_madt(cfg: &AcpiConfig) -> Result<Vec<u8>> {
    if cfg.num_cpus == 0 || cfg.num_cpus > 255 {
        return Err(Error::InvalidCpuCount(cfg.num_cpus));
    }
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for i in 0..cfg.num_cpus {
        // At most 255, checked above.
        let id = i as u8;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cfg.ioapic_id, cfg.ioapic_addr, 0));
    // ISA IRQ 0 (PIT) is wired to GSI 2, as on a PC; flags 0 = conforms to the ISA bus.
    madt.add_structure(InterruptSourceOverride {
        r#type: 2,
        length: 10,
        bus: 0,
        source: 0,
        gsi: 2.into(),
        flags: 0.into(),
    });
    // LINT1 of every processor (UID 0xFF) is the NMI, edge-triggered, active high.
    madt.add_structure(LocalApicNmi {
        r#type: 4,
        length: 6,
        processor_uid: 0xFF,
        flags: 0x0005.into(),
        lint: 1,
    });
    let mut bytes = to_bytes(&madt);
    if cfg.pcat_compat {
        bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4]
            .copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
        fix_checksum(&mut bytes);
    }
    Ok(bytes)
}

fn is_hex(c: u8) -> bool {
    c.is_ascii_digit() || (b'A'..=b'F').contains(&c)
}

/// `_HID` object for an EISA ID (encoded as an integer) or an ACPI ID (a string).
fn hid_aml(hid: &str) -> Result<Box<dyn Aml>> {
    let b = hid.as_bytes();
    let eisa = b.len() == 7
        && b[..3].iter().all(u8::is_ascii_uppercase)
        && b[3..].iter().all(|&c| is_hex(c));
    let acpi = b.len() == 8
        && b[..4]
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
        && b[4..].iter().all(|&c| is_hex(c));
    if eisa {
        Ok(Box::new(EISAName::new(hid)))
    } else if acpi {
        Ok(Box::new(hid.to_string()))
    } else {
        Err(Error::InvalidAcpiDevice(format!(
            "_HID {hid:?} is neither an EISA ID (like \"PNP0501\") nor an ACPI ID (like \
             \"LNRO0005\")"
        )))
    }
}

fn mmio_device_aml(index: usize, dev: &MmioDevice) -> Result<Vec<u8>> {
    if index >= 0x1000 {
        return Err(Error::InvalidAcpiDevice(
            "more than 4096 MMIO devices".into(),
        ));
    }
    if dev.len == 0 || dev.base.checked_add(dev.len - 1).is_none() {
        return Err(Error::InvalidAcpiDevice(format!(
            "MMIO range at {:#x} of {:#x} bytes is empty or crosses 4 GiB",
            dev.base, dev.len
        )));
    }
    let name = format!("M{index:03X}");
    let hid = hid_aml(&dev.hid)?;
    let mem = Memory32Fixed::new(true, dev.base, dev.len);
    let irq = Interrupt::new(true, dev.trigger == IrqTrigger::Edge, false, false, dev.gsi);
    let crs = ResourceTemplate::new(vec![&mem, &irq]);
    let hid_name = Name::new("_HID".into(), hid.as_ref());
    let uid_name = Name::new("_UID".into(), &dev.uid);
    let crs_name = Name::new("_CRS".into(), &crs);
    let device = Device::new(Path::new(&name), vec![&hid_name, &uid_name, &crs_name]);
    Ok(to_bytes(&device))
}

/// `\_SB.PWRB` and `\_SB.GED_` (children of `Scope (\_SB)`); see [`GedConfig`].
fn ged_aml(ged: &GedConfig) -> Result<Vec<u8>> {
    if ged.addr.checked_add(GED_REGISTER_LEN - 1).is_none() {
        return Err(Error::InvalidAcpiDevice(format!(
            "GED event register at {:#x} crosses 4 GiB",
            ged.addr
        )));
    }
    // The power button, a control-method one (the FADT's PWR_BUTTON flag says there is no
    // fixed one): Linux's ACPI button driver turns `Notify (PWRB, 0x80)` into KEY_POWER.
    let pwrb_hid = EISAName::new("PNP0C0C");
    let pwrb_hid_name = Name::new("_HID".into(), &pwrb_hid);
    let pwrb_uid_name = Name::new("_UID".into(), &ZERO);
    let pwrb = Device::new("PWRB".into(), vec![&pwrb_hid_name, &pwrb_uid_name]);

    // The _CRS holds the interrupt and nothing else: Linux's GED driver (drivers/acpi/evged.c)
    // requests an interrupt for every _CRS entry and fails the probe on any other kind, after
    // the interrupt before it was already requested with a handler whose data the failed
    // probe frees (a guest kernel crash when the button is pressed). The register is the
    // operation region's alone, as in QEMU's and Cloud Hypervisor's GED.
    let irq = Interrupt::new(true, true, false, false, ged.gsi);
    let crs = ResourceTemplate::new(vec![&irq]);
    let region = OpRegion::new(
        "GREG".into(),
        OpRegionSpace::SystemMemory,
        &ged.addr,
        &GED_REGISTER_LEN,
    );
    // One byte read as a byte: the device clears the events on that read.
    let field = Field::new(
        "GREG".into(),
        FieldAccessType::Byte,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GEVT", 8 * GED_REGISTER_LEN as usize)],
    );
    // Method (_EVT, 1, Serialized) {
    //     Local0 = GEVT                     // read (and clear) the pending events
    //     Local1 = Local0 & 1
    //     If (Local1 == 1) { Notify (\_SB.PWRB, 0x80) }
    // }
    // Arg0, the interrupt number, is not needed: the GED has one.
    let gevt = Path::new("GEVT");
    let read = Store::new(&Local(0), &gevt);
    let mask = And::new(&Local(1), &Local(0), &GED_EVENT_POWER_BUTTON);
    let pwrb_path = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&pwrb_path, &NOTIFY_BUTTON_PRESSED);
    let pressed = Equal::new(&Local(1), &GED_EVENT_POWER_BUTTON);
    let on_press = If::new(&pressed, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &mask, &on_press]);
    let hid_name = Name::new("_HID".into(), &"ACPI0013");
    let uid_name = Name::new("_UID".into(), &ZERO);
    let crs_name = Name::new("_CRS".into(), &crs);
    let ged_dev = Device::new(
        "GED_".into(),
        vec![&hid_name, &uid_name, &crs_name, &region, &field, &evt],
    );
    let mut out = to_bytes(&pwrb);
    out.extend(to_bytes(&ged_dev));
    Ok(out)
}

fn check_pci(b: &PciHostBridge) -> Result<()> {
    let bad = |why: &str| Err(Error::InvalidAcpiDevice(format!("PCI host bridge: {why}")));
    if b.uid > 9 {
        return bad("_UID above 9");
    }
    if b.bus_end < b.bus_start {
        return bad("bus range is empty");
    }
    if !b.ecam_base.is_multiple_of(1 << 20)
        || b.ecam_base
            .checked_add(b.ecam_size())
            .is_none_or(|e| e > 1 << 32)
    {
        return bad("ECAM window not 1 MiB aligned or not below 4 GiB");
    }
    if b.mmio32.1 == 0 || b.mmio32.0.checked_add(b.mmio32.1 - 1).is_none() {
        return bad("32-bit window empty or crossing 4 GiB");
    }
    if let Some((base, len)) = b.mmio64 {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return bad("64-bit window empty or wrapping");
        }
    }
    Ok(())
}

fn pci_host_bridge_aml(b: &PciHostBridge) -> Result<Vec<u8>> {
    check_pci(b)?;
    let bus = AmlAddressSpace::<u16>::new_bus_number(b.bus_start.into(), b.bus_end.into());
    let cf8 = IO::new(0xCF8, 0xCF8, 1, 8);
    let (base32, len32) = b.mmio32;
    let mem32 = AmlAddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        base32,
        base32 + (len32 - 1),
        None,
    );
    let mem64 = b.mmio64.map(|(base, len)| {
        AmlAddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::NotCacheable,
            true,
            base,
            base + (len - 1),
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![&bus, &cf8, &mem32];
    if let Some(m) = &mem64 {
        resources.push(m);
    }
    let crs = ResourceTemplate::new(resources);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let uid = u32::from(b.uid);
    let seg = u32::from(b.segment);
    let bbn = u32::from(b.bus_start);
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_UID".into(), &uid),
        Name::new("_SEG".into(), &seg),
        Name::new("_BBN".into(), &bbn),
        Name::new("_CRS".into(), &crs),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    let name = format!("PCI{}", b.uid);
    let mut out = to_bytes(&Device::new(Path::new(&name), children));

    // The ECAM window as motherboard resources.
    let ecam = Memory32Fixed::new(false, b.ecam_base as u32, b.ecam_size() as u32);
    let res_crs = ResourceTemplate::new(vec![&ecam]);
    let res_hid = EISAName::new("PNP0C02");
    let res_uid = uid;
    let res_name = format!("PRS{}", b.uid);
    let res_names = [
        Name::new("_HID".into(), &res_hid),
        Name::new("_UID".into(), &res_uid),
        Name::new("_CRS".into(), &res_crs),
    ];
    let res = Device::new(
        Path::new(&res_name),
        res_names.iter().map(|n| n as &dyn Aml).collect(),
    );
    out.extend(to_bytes(&res));
    Ok(out)
}

fn build_mcfg(cfg: &AcpiConfig) -> Option<Vec<u8>> {
    let bridges: Vec<&PciHostBridge> = cfg
        .devices
        .iter()
        .filter_map(|d| match d {
            DsdtDevice::PciHostBridge(b) => Some(b),
            _ => None,
        })
        .collect();
    if bridges.is_empty() {
        return None;
    }
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for b in bridges {
        mcfg.add_ecam(b.ecam_base, b.segment, b.bus_start, b.bus_end);
    }
    Some(to_bytes(&mcfg))
}

fn build_dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>> {
    let mut sb_children: Vec<Box<dyn Aml>> = Vec::new();
    if cfg.com1 {
        let io = IO::new(0x3F8, 0x3F8, 0, 8);
        let irq = Interrupt::new(true, true, false, false, 4);
        let crs = ResourceTemplate::new(vec![&io, &irq]);
        let hid = EISAName::new("PNP0501");
        let hid_name = Name::new("_HID".into(), &hid);
        let uid_name = Name::new("_UID".into(), &ZERO);
        let crs_name = Name::new("_CRS".into(), &crs);
        let com1 = Device::new("COM1".into(), vec![&hid_name, &uid_name, &crs_name]);
        sb_children.push(Box::new(RawAml(to_bytes(&com1))));
    }
    if cfg.i8042 {
        let data = IO::new(0x60, 0x60, 0, 1);
        let command = IO::new(0x64, 0x64, 0, 1);
        let irq = Interrupt::new(true, true, false, false, 1);
        let crs = ResourceTemplate::new(vec![&data, &command, &irq]);
        let hid = EISAName::new("PNP0303");
        let hid_name = Name::new("_HID".into(), &hid);
        let uid_name = Name::new("_UID".into(), &ZERO);
        let crs_name = Name::new("_CRS".into(), &crs);
        let kbd = Device::new("PS2K".into(), vec![&hid_name, &uid_name, &crs_name]);
        sb_children.push(Box::new(RawAml(to_bytes(&kbd))));
    }
    if let Some(ged) = &cfg.ged {
        sb_children.push(Box::new(RawAml(ged_aml(ged)?)));
    }
    let mut mmio_index = 0;
    for dev in &cfg.devices {
        match dev {
            DsdtDevice::Mmio(d) => {
                sb_children.push(Box::new(RawAml(mmio_device_aml(mmio_index, d)?)));
                mmio_index += 1;
            }
            DsdtDevice::PciHostBridge(b) => {
                sb_children.push(Box::new(RawAml(pci_host_bridge_aml(b)?)))
            }
            DsdtDevice::Custom(aml) => sb_children.push(Box::new(RawAml(to_bytes(aml.as_ref())))),
        }
    }
    let sb = Scope::new(
        "\\_SB_".into(),
        sb_children.iter().map(|c| c.as_ref()).collect(),
    );
    // \_S5_: SLP_TYPa = 5, SLP_TYPb = 0, reserved, reserved.
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&5u8, &0u8, &0u8, &0u8]));

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&to_bytes(&s5));
    dsdt.append_slice(&to_bytes(&sb));
    Ok(dsdt.as_slice().to_vec())
}

fn build_fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // No fixed power or sleep button: a hardware-reduced platform has no PM1 event block
        // for their status bits (ACPI 6.5 §4.1). PWR_BUTTON and SLP_BUTTON set say so ("the
        // button, if any, is a control-method device"); left clear, Linux registers fixed
        // buttons (LNXPWRBN, LNXSLPBN) whose events can never arrive. The power button, when
        // `AcpiConfig::ged` is set, is the DSDT's `\_SB.PWRB` (PNP0C0C), notified by the GED.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.reset_reg = io_gas(cfg.reset_port);
    fadt.reset_value = cfg.reset_value;
    fadt.sleep_control_reg = io_gas(cfg.sleep_control_port);
    fadt.sleep_status_reg = io_gas(cfg.sleep_status_port);
    fadt.iapc_boot_arch = cfg.iapc_boot_arch.into();
    to_bytes(&fadt.finalize())
}

/// One ACPI table with its guest address, as [`build_acpi_tables`] lays them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTable {
    /// Signature (`"RSD PTR "` is shortened to `"RSDP"`).
    pub signature: [u8; 4],
    /// Guest address.
    pub addr: GuestAddress,
    /// The table bytes.
    pub bytes: Vec<u8>,
}

/// Builds RSDP, XSDT, FADT, MADT and DSDT, and an MCFG when [`AcpiConfig::devices`] has a
/// [`DsdtDevice::PciHostBridge`], laid out from [`ACPI_START`] (RSDP first, every table
/// 16-byte aligned, MCFG last) without writing them; [`create_acpi_tables`] writes them.
pub fn build_acpi_tables(cfg: &AcpiConfig) -> Result<Vec<AcpiTable>> {
    let madt = build_madt(cfg)?;
    let dsdt = build_dsdt(cfg)?;
    let mcfg = build_mcfg(cfg);

    let rsdp_addr = ACPI_START;
    let xsdt_addr = align_up(rsdp_addr + Rsdp::len() as u64);
    let xsdt_len = 36 + if mcfg.is_some() { 3 } else { 2 } * 8;
    let fadt_addr = align_up(xsdt_addr + xsdt_len);
    let madt_addr = align_up(fadt_addr + acpi_tables::fadt::FADT::len() as u64);
    let dsdt_addr = align_up(madt_addr + madt.len() as u64);

    let mcfg_addr = align_up(dsdt_addr + dsdt.len() as u64);

    let fadt = build_fadt(cfg, dsdt_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if mcfg.is_some() {
        xsdt.add_entry(mcfg_addr);
    }
    let rsdp = Rsdp::new(OEM_ID, xsdt_addr);

    let mut tables = vec![
        AcpiTable {
            signature: *b"RSDP",
            addr: GuestAddress(rsdp_addr),
            bytes: to_bytes(&rsdp),
        },
        AcpiTable {
            signature: *b"XSDT",
            addr: GuestAddress(xsdt_addr),
            bytes: to_bytes(&xsdt),
        },
        AcpiTable {
            signature: *b"FACP",
            addr: GuestAddress(fadt_addr),
            bytes: fadt,
        },
        AcpiTable {
            signature: *b"APIC",
            addr: GuestAddress(madt_addr),
            bytes: madt,
        },
        AcpiTable {
            signature: *b"DSDT",
            addr: GuestAddress(dsdt_addr),
            bytes: dsdt,
        },
    ];
    if let Some(bytes) = mcfg {
        tables.push(AcpiTable {
            signature: *b"MCFG",
            addr: GuestAddress(mcfg_addr),
            bytes,
        });
    }
    Ok(tables)
}

/// Builds the ACPI tables and writes them into guest memory in [0xE_0000, 0x10_0000);
/// returns the address of the RSDP (0xE_0000), to pass as [`crate::BootConfig::rsdp`].
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    cfg: &AcpiConfig,
) -> Result<GuestAddress> {
    let tables = build_acpi_tables(cfg)?;
    let end = tables
        .iter()
        .map(|t| t.addr.0 + t.bytes.len() as u64)
        .max()
        .unwrap_or(ACPI_START);
    // `end - ACPI_START` is below 4 GiB here: it is checked against ACPI_END first.
    if end > ACPI_END
        || !GuestMemoryBackend::check_range(
            mem,
            GuestAddress(ACPI_START),
            (end - ACPI_START) as usize,
        )
    {
        return Err(Error::AcpiTablesDoNotFit {
            start: ACPI_START,
            end,
            limit: ACPI_END,
        });
    }
    for t in &tables {
        mem.write_slice(&t.bytes, t.addr)
            .map_err(|source| Error::GuestMemory {
                context: "writing ACPI tables",
                source,
            })?;
    }
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests;
