//! Bus-level tests: both configuration mechanisms, BAR relocation, hostile accesses.

use std::sync::{Arc, Mutex};

use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vmkit_bus::{mmio_range, IoBus};
use vmkit_irq::RecordingSink;

use crate::*;

const WINDOW: std::ops::RangeInclusive<u64> = 0xC000_0000..=0xDFFF_FFFF;
const ECAM: u64 = 0xE000_0000;

struct Dev {
    config: ConfigSpace,
    mem: Vec<u8>,
    moves: Vec<(usize, Option<u64>, Option<u64>)>,
}

impl PciDevice for Dev {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data)
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data)
    }
    fn bar(&self, index: usize) -> Option<PciBar> {
        self.config.bar(index)
    }
    fn bar_moved(&mut self, index: usize, old: Option<u64>, new: Option<u64>) {
        self.moves.push((index, old, new));
    }
    fn read_bar(&mut self, index: usize, offset: u64, data: &mut [u8]) {
        let o = offset as usize + index * 0x1000;
        data.copy_from_slice(&self.mem[o..o + data.len()]);
    }
    fn write_bar(&mut self, index: usize, offset: u64, data: &[u8]) {
        let o = offset as usize + index * 0x1000;
        self.mem[o..o + data.len()].copy_from_slice(data);
    }
}

fn dev(device_id: u16, bar0: u64, bar1: u64) -> Arc<Mutex<Dev>> {
    let mut config = ConfigSpace::new(PciIds {
        vendor_id: 0x1AF4,
        device_id,
        revision: 1,
        class: (0xFF, 0, 0),
        subsystem_vendor_id: 0x1AF4,
        subsystem_id: 0x40,
    });
    config
        .add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
            bar0,
        )
        .unwrap();
    config
        .add_bar(1, BarKind::Memory64 { prefetchable: true }, 0x1000, bar1)
        .unwrap();
    config.add_capability(CAP_ID_VENDOR, &[6, 0, 0, 0]).unwrap();
    let t = MsixTable::new(4, RecordingSink::new()).unwrap();
    t.add_capability(&mut config, 1, 0, 1, 0x800).unwrap();
    Arc::new(Mutex::new(Dev {
        config,
        mem: vec![0; 0x3000],
        moves: Vec::new(),
    }))
}

#[derive(Default)]
struct Events(Mutex<Vec<BarEvent>>);
impl BarObserver for Events {
    fn bar_event(&self, event: &BarEvent) {
        self.0.lock().unwrap().push(event.clone());
    }
}

struct Rig {
    bus: Arc<PciBus>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    vm_bus: Arc<IoBus>,
    events: Arc<Events>,
}

fn rig() -> Rig {
    let validator = ForbiddenRanges(vec![0xD800_0000..=0xDFFF_FFFF]); // "RAM" for the test
    let vm_bus = Arc::new(IoBus::new());
    let bus = Arc::new(PciBus::new(&vm_bus, WINDOW, Arc::new(validator)).unwrap());
    bus.register_config_access(ECAM).unwrap();
    let events = Arc::new(Events::default());
    bus.set_observer(events.clone());
    Rig {
        io: PciConfigIo::new(bus.clone()),
        ecam: PciConfigMmio::new(bus.clone()),
        vm_bus,
        bus,
        events,
    }
}

impl Rig {
    fn port(&mut self, dev: u8, reg: u16, len: usize) -> u32 {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | u32::from(reg & 0xFC);
        self.io.pio_write(PioAddress(0xCF8), 0, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        self.io
            .pio_read(PioAddress(0xCF8), 4 + (reg & 3), &mut b[..len]);
        u32::from_le_bytes(b)
    }
    fn port_write(&mut self, dev: u8, reg: u16, data: &[u8]) {
        let addr = 0x8000_0000 | (u32::from(dev) << 11) | u32::from(reg & 0xFC);
        self.io.pio_write(PioAddress(0xCF8), 0, &addr.to_le_bytes());
        self.io.pio_write(PioAddress(0xCF8), 4 + (reg & 3), data);
    }
    fn ecam(&mut self, dev: u8, reg: u16, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.ecam.mmio_read(
            MmioAddress(0xE000_0000),
            (u64::from(dev) << 15) | u64::from(reg),
            &mut b[..len],
        );
        u32::from_le_bytes(b)
    }
    fn ecam_write(&mut self, dev: u8, reg: u16, v: u32) {
        self.ecam.mmio_write(
            MmioAddress(0xE000_0000),
            (u64::from(dev) << 15) | u64::from(reg),
            &v.to_le_bytes(),
        );
    }
    fn mem_read(&mut self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        let _ = self.vm_bus.mmio_read(addr, &mut b);
        u32::from_le_bytes(b)
    }
    fn mem_write(&mut self, addr: u64, v: u32) {
        let _ = self.vm_bus.mmio_write(addr, &v.to_le_bytes());
    }
    fn events(&self) -> Vec<BarEvent> {
        std::mem::take(&mut *self.events.0.lock().unwrap())
    }
}

#[test]
fn host_bridge_and_absent_devices() {
    let mut r = rig();
    assert_eq!(r.port(0, 0, 4), 0x0D57_8086);
    assert_eq!(r.port(0, 0x08, 4) >> 16, 0x0600, "host bridge class");
    assert_eq!(r.ecam(0, 0, 4), 0x0D57_8086);
    for dev in [1u8, 5, 31] {
        assert_eq!(r.port(dev, 0, 2), 0xFFFF, "no device: vendor 0xFFFF");
        assert_eq!(r.ecam(dev, 0, 4), 0xFFFF_FFFF);
    }
}

#[test]
fn port_and_ecam_give_the_same_view() {
    let mut r = rig();
    r.bus
        .add_device(dev(0x1044, 0xC000_0000, 0xC001_0000))
        .unwrap();
    r.bus.add_device_at(7, dev(0x1041, 0xC002_0000, 0)).unwrap();
    for d in [0u8, 1, 2, 7, 31] {
        for reg in (0..256).step_by(4) {
            assert_eq!(r.port(d, reg, 4), r.ecam(d, reg, 4), "{d:02x} reg {reg:#x}");
            for sub in 0..4 {
                assert_eq!(
                    r.port(d, reg + sub, 1),
                    r.ecam(d, reg + sub, 1),
                    "{d:02x} byte {:#x}",
                    reg + sub
                );
            }
            assert_eq!(r.port(d, reg + 2, 2), r.ecam(d, reg + 2, 2));
        }
    }
    // A write through one is seen through the other.
    r.port_write(1, 0x3C, &[0x0A]);
    assert_eq!(r.ecam(1, 0x3C, 1), 0x0A);
    r.ecam_write(1, 0x04, 0x0000_0004);
    assert_eq!(r.port(1, 0x04, 2), 4);
    // Beyond 256 bytes only ECAM reaches: the extended space of these devices is zero.
    assert_eq!(r.ecam(1, 0x100, 4), 0);
}

#[test]
fn capability_walk() {
    let mut r = rig();
    r.bus.add_device(dev(0x1044, 0xC000_0000, 0)).unwrap();
    assert_ne!(r.port(1, 0x06, 2) & u32::from(STATUS_CAPABILITIES_LIST), 0);
    let mut at = r.port(1, 0x34, 1) as u16;
    let mut ids = Vec::new();
    while at != 0 {
        assert!(at >= 0x40 && at.is_multiple_of(4), "{at:#x}");
        let header = r.ecam(1, at, 4);
        ids.push(header as u8);
        at = (header >> 8) as u8 as u16;
    }
    assert_eq!(ids, vec![CAP_ID_VENDOR, CAP_ID_MSIX]);
}

#[test]
fn bar_sizing_through_the_bus() {
    let mut r = rig();
    r.bus
        .add_device(dev(0x1044, 0xC000_0000, 0xC001_0000))
        .unwrap();
    let orig = r.ecam(1, 0x10, 4);
    r.ecam_write(1, 0x10, u32::MAX);
    assert_eq!(r.ecam(1, 0x10, 4), 0xFFFF_F000);
    r.ecam_write(1, 0x10, orig);
    r.ecam_write(1, 0x14, u32::MAX);
    r.ecam_write(1, 0x18, u32::MAX);
    assert_eq!(r.ecam(1, 0x14, 4), 0xFFFF_F00C);
    assert_eq!(r.ecam(1, 0x18, 4), 0xFFFF_FFFF);
    assert!(r.events().is_empty(), "decoding off: nothing mapped");
}

#[test]
fn decoding_maps_and_relocation_moves() {
    let mut r = rig();
    let d = dev(0x1044, 0xC000_0000, 0xC001_0000);
    r.bus.add_device(d.clone()).unwrap();
    assert_eq!(r.mem_read(0xC000_0000), u32::MAX, "not decoding yet");
    r.ecam_write(1, 0x04, u32::from(COMMAND_MEMORY_SPACE));
    let ev = r.events();
    assert_eq!(ev.len(), 2);
    assert_eq!((ev[0].old, ev[0].new), (None, Some(0xC000_0000)));
    // Both BARs are ranges of their own on the VM's bus, beside the ECAM.
    assert_eq!(
        r.vm_bus.mmio_ranges(),
        vec![
            0xC000_0000..=0xC000_0FFF,
            0xC001_0000..=0xC001_0FFF,
            ECAM..=ECAM + 0xF_FFFF
        ]
    );
    r.mem_write(0xC000_0008, 0x1234_5678);
    r.mem_write(0xC001_0000, 0xAA);
    assert_eq!(r.mem_read(0xC000_0008), 0x1234_5678);
    assert_eq!(r.mem_read(0xC001_0000), 0xAA);

    // Move BAR 0 while decoding: routed at the new place, gone from the old.
    r.ecam_write(1, 0x10, 0xC100_0000);
    let ev = r.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].old, ev[0].new),
        (Some(0xC000_0000), Some(0xC100_0000))
    );
    assert_eq!(r.mem_read(0xC100_0008), 0x1234_5678);
    assert_eq!(r.mem_read(0xC000_0008), u32::MAX);
    assert_eq!(
        d.lock().unwrap().moves.last(),
        Some(&(0, Some(0xC000_0000), Some(0xC100_0000)))
    );

    // The 64-bit BAR moves with decoding off (as Linux does), mapped when it comes back on.
    r.ecam_write(1, 0x04, 0);
    assert_eq!(r.events().len(), 2, "both unmapped");
    r.ecam_write(1, 0x14, 0xC200_0000);
    r.ecam_write(1, 0x18, 0);
    assert!(r.events().is_empty());
    r.ecam_write(1, 0x04, u32::from(COMMAND_MEMORY_SPACE));
    assert_eq!(r.bus.bar_mapping(1, 1).unwrap().address, 0xC200_0000);
    assert_eq!(r.mem_read(0xC200_0000), 0xAA);

    // Sizing with decoding on: while the register holds the size mask the BAR is not
    // mapped (it decodes where its register says, and the bus refuses that place); the
    // mask reads back as written, and restoring the address maps it again.
    r.events();
    r.ecam_write(1, 0x10, u32::MAX);
    assert_eq!(r.ecam(1, 0x10, 4), 0xFFFF_F000);
    assert_eq!(r.mem_read(0xC100_0008), u32::MAX);
    let ev = r.events();
    assert_eq!(
        (ev.len(), ev[0].old, ev[0].new),
        (1, Some(0xC100_0000), None)
    );
    r.ecam_write(1, 0x10, 0xC100_0000);
    assert_eq!(r.mem_read(0xC100_0008), 0x1234_5678);
    assert_eq!(r.events().len(), 1);
}

#[test]
fn sizing_writes_of_any_width() {
    let mut r = rig();
    r.bus
        .add_device(dev(0x1044, 0xC000_0000, 0xC001_0000))
        .unwrap();
    // Two-byte and one-byte writes of all ones size the BAR as a four-byte one does.
    for pieces in [
        vec![(0u16, 2usize), (2, 2)],
        vec![(0, 1), (1, 1), (2, 1), (3, 1)],
    ] {
        for (at, len) in &pieces {
            r.port_write(1, 0x10 + at, &[0xFF; 4][..*len]);
        }
        assert_eq!(r.ecam(1, 0x10, 4), 0xFFFF_F000, "{pieces:?}");
        assert_eq!(r.port(1, 0x12, 2), 0xFFFF, "{pieces:?}");
        r.ecam_write(1, 0x10, 0xC000_0000);
    }
    // The 64-bit BAR, high half sized with 2-byte writes.
    r.port_write(1, 0x14, &[0xFF; 4]);
    r.port_write(1, 0x18, &[0xFF; 2]);
    r.port_write(1, 0x1A, &[0xFF; 2]);
    assert_eq!(
        (r.ecam(1, 0x14, 4), r.ecam(1, 0x18, 4)),
        (0xFFFF_F00C, 0xFFFF_FFFF)
    );
    // With decoding on, the same dance leaves the BAR where the guest finally put it.
    r.ecam_write(1, 0x14, 0xC001_0000);
    r.ecam_write(1, 0x18, 0);
    r.bus.enable_decoding(1);
    r.mem_write(0xC000_0000, 0x55);
    for (at, len) in [(0u16, 2usize), (2, 2)] {
        r.port_write(1, 0x10 + at, &[0xFF; 4][..len]);
    }
    assert_eq!(r.ecam(1, 0x10, 4), 0xFFFF_F000);
    r.port_write(1, 0x10, &0xC000u16.to_le_bytes()[..]);
    r.port_write(1, 0x12, &0xC000u16.to_le_bytes()[..]);
    assert_eq!(r.ecam(1, 0x10, 4), 0xC000_C000 & 0xFFFF_F000);
    assert_eq!(
        r.bus.bar_mapping(1, 0).map(|b| b.address),
        Some(0xC000_C000)
    );
    r.ecam_write(1, 0x10, 0xC000_0000);
    assert_eq!(r.mem_read(0xC000_0000), 0x55);
}

#[test]
fn bar_moves_onto_ram_or_another_device_are_not_mapped() {
    let mut r = rig();
    r.bus
        .add_device(dev(0x1044, 0xC000_0000, 0xC001_0000))
        .unwrap();
    r.bus
        .add_device(dev(0x1041, 0xC002_0000, 0xC003_0000))
        .unwrap();
    // A device that is not on PCI, inside the window: the VM's bus refuses the overlap.
    r.vm_bus
        .register_mmio(
            mmio_range(0xC800_0000, 0x1000).unwrap(),
            Arc::new(Mutex::new(Scratch)),
        )
        .unwrap();
    r.bus.enable_decoding(1);
    r.bus.enable_decoding(2);
    r.events();
    for (target, why) in [
        (0xD800_0000u32, "validator"), // "RAM"
        (0xC002_0000, "other device"), // 02.0's BAR 0
        (0xC001_0000, "own other BAR"),
        (0xC800_0000, "a device on the VM's bus"),
        (0x1000_0000, "outside window"),
        (0xFFFF_E000, "outside window, high"),
    ] {
        r.ecam_write(1, 0x10, target);
        let ev = r.events();
        assert_eq!(ev.len(), 1, "{why}: {ev:?}");
        assert_eq!((ev[0].old, ev[0].new), (Some(0xC000_0000), None), "{why}");
        // The register keeps what the guest wrote; nothing answers there or at the old place.
        assert_eq!(r.ecam(1, 0x10, 4), target, "{why}: register as written");
        assert!(r.bus.bar_mapping(1, 0).is_none(), "{why}");
        assert_eq!(r.mem_read(0xC000_0000), u32::MAX, "{why}");
        // Back to a good place: mapped again.
        r.ecam_write(1, 0x10, 0xC000_0000);
        assert_eq!(r.events()[0].new, Some(0xC000_0000), "{why}");
        assert_eq!(r.bus.bar_mapping(1, 0).unwrap().address, 0xC000_0000);
    }
    assert_eq!(r.mem_read(0xC003_0000), 0, "02.0's BAR 1 still mapped");
}

/// An MMIO device that answers zeros.
struct Scratch;
impl MutDeviceMmio for Scratch {
    fn mmio_read(&mut self, _: MmioAddress, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn mmio_write(&mut self, _: MmioAddress, _: u64, _: &[u8]) {}
}

#[test]
fn hostile_accesses_never_panic() {
    let mut r = rig();
    r.bus
        .add_device(dev(0x1044, 0xC000_0000, 0xC001_0000))
        .unwrap();
    r.bus.enable_decoding(1);
    // Port mechanism: enable bit clear, wrong widths, misaligned, other buses/functions.
    r.io.pio_write(PioAddress(0xCF8), 0, &0x0000_0800u32.to_le_bytes());
    let mut b4 = [0u8; 4];
    r.io.pio_read(PioAddress(0xCF8), 4, &mut b4);
    assert_eq!(b4, [0xFF; 4], "enable bit clear");
    r.io.pio_write(PioAddress(0xCF8), 0, &0xFFFF_FFFFu32.to_le_bytes());
    r.io.pio_read(PioAddress(0xCF8), 0, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 0x80FF_FFFC, "reserved bits read 0");
    r.io.pio_read(PioAddress(0xCF8), 4, &mut b4);
    assert_eq!(b4, [0xFF; 4], "bus 255");
    r.io.pio_write(PioAddress(0xCF8), 0, &0x8000_0900u32.to_le_bytes()); // 00:01.1
    r.io.pio_read(PioAddress(0xCF8), 4, &mut b4);
    assert_eq!(b4, [0xFF; 4], "function 1");
    r.io.pio_write(PioAddress(0xCF8), 0, &0x8000_0800u32.to_le_bytes());
    for (off, len) in [
        (5u16, 4usize),
        (6, 4),
        (7, 2),
        (5, 2),
        (4, 3),
        (4, 8),
        (8, 4),
        (0, 2),
        (1, 1),
    ] {
        let mut d = vec![0u8; len];
        r.io.pio_read(PioAddress(0xCF8), off, &mut d);
        r.io.pio_write(PioAddress(0xCF8), off, &d);
    }
    r.io.pio_write(PioAddress(0xCF8), 3, &[1]); // a byte to 0xCFB (Linux's conf1 probe)
    r.io.pio_read(PioAddress(0xCF8), 0, &mut b4);
    assert_eq!(u32::from_le_bytes(b4), 0x8000_0800);
    r.io.pio_read(PioAddress(0xCF8), u16::MAX, &mut b4);
    r.io.pio_read(PioAddress(0xCF8), 4, &mut []);
    // ECAM: past 4 KiB of a function lands in the next function; past bus 0; huge offsets.
    for off in [
        0x1000u64,
        0x8_1000,
        1 << 20,
        (1 << 28) - 4,
        1 << 28,
        u64::MAX - 3,
        0x8_0FFE,
        0x8_0001,
    ] {
        let mut d = [0u8; 4];
        r.ecam.mmio_read(MmioAddress(0xE000_0000), off, &mut d);
        assert_eq!(d, [0xFF; 4], "{off:#x}");
        r.ecam.mmio_write(MmioAddress(0xE000_0000), off, &d);
    }
    for len in [0usize, 3, 8, 16] {
        let mut d = vec![0u8; len];
        r.ecam.mmio_read(MmioAddress(0xE000_0000), 0x8_0000, &mut d);
        assert!(d.iter().all(|b| *b == 0xFF));
        r.ecam.mmio_write(MmioAddress(0xE000_0000), 0x8_0000, &d);
    }
    // The device is unharmed.
    assert_eq!(r.ecam(1, 0, 4), 0x1044_1AF4);
    // BARs on the VM's bus: crossing a BAR's end, unmapped holes, wrapping.
    let mut d = [0u8; 8];
    assert!(!r.vm_bus.mmio_read(0xC000_0FFC, &mut d).is_handled());
    assert_eq!(d, [0xFF; 8]);
    assert!(!r.vm_bus.mmio_write(0xC000_0FFC, &d).is_handled());
    assert!(!r.vm_bus.mmio_read(0xC010_0000, &mut d).is_handled());
    assert!(!r.vm_bus.mmio_read(u64::MAX, &mut d).is_handled());
    assert!(!r.vm_bus.mmio_write(u64::MAX, &d).is_handled());
    // Adding devices: full bus, taken slots.
    assert_eq!(
        r.bus.add_device_at(0, dev(1, 0, 0)).unwrap_err(),
        Error::SlotUnavailable(0)
    );
    assert_eq!(
        r.bus.add_device_at(1, dev(1, 0, 0)).unwrap_err(),
        Error::SlotUnavailable(1)
    );
    assert_eq!(
        r.bus.add_device_at(32, dev(1, 0, 0)).unwrap_err(),
        Error::SlotUnavailable(32)
    );
    for _ in 2..32 {
        r.bus.add_device(dev(1, 0, 0)).unwrap();
    }
    assert_eq!(r.bus.add_device(dev(1, 0, 0)).unwrap_err(), Error::BusFull);
}

#[test]
fn refresh_mappings_follows_a_configuration_restored_behind_the_bus() {
    let mut r = rig();
    let d = dev(0x1044, 0, 0);
    let bdf = r.bus.add_device(d.clone()).unwrap();
    // Configuration restored into the device directly: BAR 0 placed, decoding on.
    let mut saved = dev(0x1044, 0xC000_0000, 0).lock().unwrap().config.state();
    saved.regs[1] |= u32::from(COMMAND_MEMORY_SPACE);
    d.lock().unwrap().config.restore(&saved).unwrap();
    assert_eq!(
        r.bus.bar_mapping(bdf.device, 0),
        None,
        "the bus has not looked yet"
    );
    r.bus.refresh_mappings(bdf.device);
    assert_eq!(
        r.bus.bar_mapping(bdf.device, 0).map(|b| b.address),
        Some(0xC000_0000)
    );
    let events = r.events.0.lock().unwrap().clone();
    assert_eq!(events.len(), 1);
    assert_eq!((events[0].old, events[0].new), (None, Some(0xC000_0000)));
    d.lock().unwrap().mem[0] = 0x5A;
    assert_eq!(r.mem_read(0xC000_0000) & 0xFF, 0x5A);
    r.bus.refresh_mappings(30); // no device: nothing
}
