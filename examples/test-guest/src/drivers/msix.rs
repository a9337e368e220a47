//! MSI-X for a virtio-pci function: the capability and its table (in a
//! memory BAR), and the common configuration's `msix_config` /
//! `queue_msix_vector` fields, which virtio-drivers 0.13 does not program.

use crate::drivers::spec::{msix, pci_common};
use crate::platform::pci::Cam;
use alloc::format;
use alloc::string::String;
use virtio_drivers::transport::pci::bus::PCI_CAP_ID_VNDR;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::VIRTIO_PCI_CAP_COMMON_CFG;

/// The MSI-X capability of a function.
pub struct Msix {
    /// Offset of the capability in configuration space.
    pub cap: u8,
    /// Address of the table (BAR + offset).
    pub table: u64,
    /// Table size.
    pub entries: u16,
}

/// The address of memory BAR `bar` of `df`, when it is one and in use.
fn memory_bar(root: &mut PciRoot<Cam>, df: DeviceFunction, bar: u8) -> Result<u64, String> {
    match root.bar_info(df, bar) {
        Ok(Some(info)) => match info.memory_address_size() {
            Some((addr, _)) if addr != 0 => Ok(addr),
            _ => Err(format!("bar {} not a memory bar in use", bar)),
        },
        _ => Err(format!("bar {} not usable", bar)),
    }
}

impl Msix {
    /// Finds the MSI-X capability of `df` and where its table is.
    pub fn find(root: &mut PciRoot<Cam>, cam: &Cam, df: DeviceFunction) -> Result<Msix, String> {
        let cap = root
            .capabilities(df)
            .find(|c| c.id == msix::CAP_ID)
            .ok_or_else(|| String::from("no msi-x capability"))?;
        let table_word = cam.read_word(df, cap.offset + 4);
        let bar = memory_bar(root, df, (table_word & 7) as u8)?;
        Ok(Msix {
            cap: cap.offset,
            table: bar + u64::from(table_word & !7),
            entries: (cap.private_header & 0x7ff) + 1,
        })
    }

    /// Programs table entry `n`: message address
    /// `0xFEE00000 | apic_id << 12` (physical destination, no redirection
    /// hint), data = `vector` (fixed, edge); masked while being written.
    pub fn set_entry(&self, n: u16, apic_id: u32, vector: u8, masked: bool) {
        let entry = self.table + 16 * u64::from(n);
        write32(entry + 12, 1);
        write32(entry, 0xfee0_0000 | (apic_id & 0xff) << 12);
        write32(entry + 4, 0);
        write32(entry + 8, u32::from(vector));
        write32(entry + 12, u32::from(masked));
    }

    /// Message control with MSI-X enabled and the function unmasked, from
    /// the capability's first dword `control`.
    pub fn enabled(control: u32) -> u32 {
        (control | msix::ENABLE) & !msix::FUNCTION_MASK
    }
}

/// Address of the virtio common configuration structure of `df` (its first
/// `VIRTIO_PCI_CAP_COMMON_CFG` capability, as virtio-drivers picks it).
pub fn common_cfg(root: &mut PciRoot<Cam>, cam: &Cam, df: DeviceFunction) -> Result<u64, String> {
    let cap = root
        .capabilities(df)
        .find(|c| {
            c.id == PCI_CAP_ID_VNDR && (c.private_header >> 8) as u8 == VIRTIO_PCI_CAP_COMMON_CFG
        })
        .ok_or_else(|| String::from("no common config capability"))?;
    let bar = cam.read_word(df, cap.offset + 4) as u8;
    let offset = cam.read_word(df, cap.offset + 8);
    Ok(memory_bar(root, df, bar)? + u64::from(offset))
}

/// Writes `msix_config` ← `config` and, for queue 0, `queue_msix_vector` ←
/// `queue` in the common configuration at `common`, and reads both back
/// (`NO_VECTOR` means the device refused). Done after FEATURES_OK, before
/// the queue is enabled.
pub fn set_vectors(common: u64, config: u16, queue: u16) -> Result<(), String> {
    write16(common + pci_common::MSIX_CONFIG, config);
    write16(common + pci_common::QUEUE_SELECT, 0);
    write16(common + pci_common::QUEUE_MSIX_VECTOR, queue);
    match (
        read16(common + pci_common::MSIX_CONFIG),
        read16(common + pci_common::QUEUE_MSIX_VECTOR),
    ) {
        (c, q) if (c, q) == (config, queue) => Ok(()),
        (pci_common::NO_VECTOR, _) => Err(format!("device refused config vector {}", config)),
        (_, pci_common::NO_VECTOR) => Err(format!("device refused queue vector {}", queue)),
        (c, q) => Err(format!("vectors read back as {} and {}", c, q)),
    }
}

fn write16(addr: u64, value: u16) {
    // SAFETY: a register of the common configuration, in a BAR that
    // discovery mapped (identity, user, uncached); device memory that no
    // Rust object aliases (the transport holds raw MMIO pointers to it,
    // never references, and runs on this same thread only).
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

fn read16(addr: u64) -> u16 {
    // SAFETY: as for `write16`; these registers read without side effects.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

fn write32(addr: u64, value: u32) {
    // SAFETY: as for `write16`: an entry of the MSI-X table, inside the
    // mapped memory BAR the capability names.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}
