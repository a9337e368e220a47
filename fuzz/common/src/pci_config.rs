//! `vmkit_pci::PciBus` configuration space, BAR sizing and relocation, driven through the
//! real port mechanism (`PciConfigIo`, 0xCF8/0xCFC) and ECAM (`PciConfigMmio`).
//!
//! The bus is built as vmkit-kvm's `PciPlatform` builds it: the host bridge at 00.0, BARs
//! allowed in the layout's PCI window, a `ForbiddenRanges` validator (RAM below the window,
//! the ECAM, and here also a fixed device's range inside the window so the validator has
//! something to refuse), the configuration mechanisms on the VM's `IoBus` and an observer
//! recording `BarEvent`s. A second fixed device, unknown to the validator, sits in the window
//! on the VM's bus. Functions: 01.0 and 02.0 are virtio-pci transports over rng (64-bit BAR
//! 0, vendor capabilities, MSI-X), decoding as the VMM leaves them; 05.0 is a test function
//! with an I/O BAR, a 32-bit BAR and a 64-bit prefetchable BAR, decoding off. The guest
//! reads and writes registers (mostly the header, BARs and capabilities, at any width and
//! alignment, through either mechanism, sometimes to absent devices, functions or buses),
//! makes raw accesses to the ports and ECAM, sizes BARs, moves them (to free places, onto
//! other BARs, the forbidden ranges, outside the window, half a 64-bit BAR at a time),
//! toggles the command register and walks capability lists.
//!
//! Oracles, besides "never panics":
//! - every read equals a model of configuration space that applies only the accesses the
//!   bus accepts (1, 2 or 4 bytes, naturally aligned, bus 0, function 0, a present device,
//!   CONFIG_ADDRESS enabled) through the bits the spec makes writable (command I/O, memory,
//!   bus master and INTx disable, interrupt line, BAR address bits at or above the BAR's
//!   size, MSI-X enable and function mask): IDs, class, status, capability pointers and
//!   bodies, BAR flag and size bits never change; other accesses read all ones and change
//!   nothing; CONFIG_ADDRESS reads back as written, bits 30:24 and 1:0 clear;
//! - all ones written to a BAR register reads back its size mask and flag bits;
//! - `bar_mapping` agrees with the observer's events (each event's `old` is the mapping
//!   before), with the BAR's registers and with the ranges on the VM's bus;
//! - a BAR is mapped only while its function decodes memory, at a non-zero address, inside
//!   the window, clear of the forbidden ranges, the fixed device and every other mapped BAR;
//! - after a write that turns memory decoding on or moves a BAR, the BAR is mapped if its
//!   place is allowed as above;
//! - a capability walk from 0x34 ends within 48 steps, every pointer dword-aligned in
//!   0x40..=0xFC.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{MutDeviceMmio, MutDevicePio};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_bus::{mmio_range, IoBus};
use vmkit_irq::RecordingSink;
use vmkit_pci::{
    BarEvent, BarKind, BarObserver, ConfigSpace, ForbiddenRanges, MsixTable, PciBar, PciBus,
    PciConfigIo, PciConfigMmio, PciDevice, PciIds, CAP_ID_VENDOR, COMMAND_BUS_MASTER,
    COMMAND_MEMORY_SPACE,
};
use vmkit_virtio::pci::PciTransport;
use vmkit_virtio_rng::{Rng, RngConfig};

use model::{overlaps, size_mask, walk, Func, Mech, Model, Target};

mod model;

const WINDOW: RangeInclusive<u64> = 0xC000_0000..=0xCFFF_FFFF;
const ECAM: u64 = 0xE000_0000;
/// Inside the window, refused by the validator.
const FIXED: RangeInclusive<u64> = 0xC080_0000..=0xC08F_FFFF;
/// Inside the window, on the VM's bus, unknown to the validator.
const SCRATCH: RangeInclusive<u64> = 0xC0A0_0000..=0xC0A0_0FFF;
/// Slots an operation can name: mostly present devices, sometimes absent ones.
const SLOTS: [u8; 9] = [1, 2, 5, 1, 5, 0, 2, 9, 31];
const MAX_OPS: usize = 256;

/// A device, by index into the slots operations name.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Dev(pub u8);

impl Dev {
    fn slot(self) -> u8 {
        SLOTS[usize::from(self.0) % SLOTS.len()]
    }
}

/// Which configuration mechanism.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// CONFIG_ADDRESS at 0xCF8, then CONFIG_DATA at 0xCFC–0xCFF.
    Port,
    /// The ECAM window.
    Ecam,
}

/// An access width: the legal ones, and odd ones (0, 3, 8 or 6 bytes).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Width {
    /// 1 byte.
    One,
    /// 2 bytes.
    Two,
    /// 4 bytes.
    Four,
    /// An illegal width.
    Odd(u8),
}

impl Width {
    fn len(self) -> usize {
        match self {
            Width::One => 1,
            Width::Two => 2,
            Width::Four => 4,
            Width::Odd(n) => [0, 3, 8, 6][usize::from(n % 4)],
        }
    }
}

/// A register offset, mostly one that matters.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Reg {
    /// The command register (0x04) plus 0–3.
    Command(u8),
    /// A BAR register (0x10 + 4n) plus 0–3.
    Bar(u8, u8),
    /// Inside the header (0x00–0x3F).
    Header(u8),
    /// From the start of the capabilities (0x40 + n).
    Cap(u8),
    /// Anywhere in the 4 KiB (and beyond: the ECAM wraps into the next function).
    Any(u16),
}

impl Reg {
    fn offset(self) -> u16 {
        match self {
            Reg::Command(b) => 4 + u16::from(b % 4),
            Reg::Bar(n, b) => 0x10 + 4 * u16::from(n % 6) + u16::from(b % 4),
            Reg::Header(b) => u16::from(b % 0x40),
            Reg::Cap(b) => 0x40 + u16::from(b),
            Reg::Any(o) => o,
        }
    }
}

/// Something odd about an access's target, mostly nothing.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Oddity {
    /// Bus 0, function 0.
    None,
    /// Function `1 + n % 7`.
    Function(u8),
    /// Bus `1 + n % 255`.
    Bus(u8),
    /// Port mechanism with the enable bit clear.
    Disabled,
}

/// Where a BAR is moved to.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Place {
    /// A 64 KiB-aligned place in the first 16 MiB of the window.
    Window(u8),
    /// Where another BAR's register points.
    OtherBar(Dev, u8),
    /// Into (or straddling the start of) the validator's fixed range.
    Fixed(u8),
    /// Onto the fixed device on the VM's bus.
    Scratch,
    /// Outside the window.
    Outside(u32),
    /// Address 0 (unassigned).
    Zero,
    /// Any 64-bit value.
    Raw(u64),
}

/// How a register is written: one dword, two words or four bytes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Pieces {
    /// One 4-byte write.
    Dword,
    /// Two 2-byte writes.
    Words,
    /// Four 1-byte writes.
    Bytes,
}

/// Which halves of a 64-bit BAR a move writes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Halves {
    /// Low, then high.
    Both,
    /// High, then low.
    HighFirst,
    /// Only the low dword.
    Low,
    /// Only the high dword.
    High,
}

/// A change to the command register (read, modify, write back as 2 bytes).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Command {
    /// Memory decoding on.
    MemoryOn,
    /// Memory decoding off.
    MemoryOff,
    /// Bus mastering toggled.
    BusMaster,
    /// Any value.
    Raw(u16),
}

/// One guest operation.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// A read (`None`) or write of a register.
    Access {
        /// Through which mechanism.
        path: Path,
        /// Which device.
        dev: Dev,
        /// Which register.
        reg: Reg,
        /// How wide.
        width: Width,
        /// What to write, or a read.
        value: Option<u32>,
        /// An odd target.
        oddity: Oddity,
    },
    /// A raw access to the ports at 0xCF8 + offset.
    PortRaw {
        /// Offset from 0xCF8 (any).
        offset: u16,
        /// How wide.
        width: Width,
        /// What to write, or a read.
        value: Option<u32>,
    },
    /// A raw ECAM access.
    EcamRaw {
        /// Offset in the ECAM (any, up to 512 MiB).
        offset: u32,
        /// How wide.
        width: Width,
        /// What to write, or a read.
        value: Option<u32>,
    },
    /// BAR sizing: all ones written, read back, the old value restored or not.
    SizeBar {
        /// Through which mechanism.
        path: Path,
        /// Which device.
        dev: Dev,
        /// Which BAR register (0–5).
        bar: u8,
        /// How the all-ones is written.
        pieces: Pieces,
        /// Whether the old value is written back.
        restore: bool,
    },
    /// A BAR moved.
    MoveBar {
        /// Through which mechanism.
        path: Path,
        /// Which device.
        dev: Dev,
        /// Which BAR (0–5).
        bar: u8,
        /// Where.
        to: Place,
        /// Which halves of a 64-bit BAR are written.
        halves: Halves,
        /// How each dword is written.
        pieces: Pieces,
    },
    /// The command register changed.
    Command {
        /// Through which mechanism.
        path: Path,
        /// Which device.
        dev: Dev,
        /// What changes.
        change: Command,
    },
    /// The capability list walked from 0x34, every capability read.
    WalkCaps {
        /// Through which mechanism.
        path: Path,
        /// Which device.
        dev: Dev,
    },
}

/// A sequence of operations.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// The operations (at most 256, as many as the bytes hold).
    #[arbitrary(with = crate::seeds::many::<Op, MAX_OPS>)]
    pub ops: Vec<Op>,
}

/// What a run reached, for the tests that check the seeds reach the code.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Size masks read back after all ones.
    pub sized: usize,
    /// BARs moved from one mapped place to another.
    pub moved: usize,
    /// BARs left unmapped at a non-zero address while decoding (refused places).
    pub refused: usize,
    /// BARs mapped when decoding was turned on.
    pub mapped: usize,
    /// Capability walks that found at least one capability.
    pub walks: usize,
    /// Accepted configuration writes.
    pub writes: usize,
}

/// Runs one input from the fuzzer's bytes.
pub fn fuzz(data: &[u8]) {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    run(&input);
}

/// Runs one input, panicking when an oracle fails.
pub fn run(input: &Input) {
    run_with_stats(input);
}

/// Runs one input; returns what it reached.
pub fn run_with_stats(input: &Input) -> Stats {
    let mut h = Harness::new();
    for op in &input.ops {
        h.op(op);
        h.check_mappings();
    }
    h.model.check_all(&h.bus);
    h.stats
}

/// Records every BAR event.
#[derive(Default)]
struct Events(Mutex<Vec<BarEvent>>);

impl BarObserver for Events {
    fn bar_event(&self, event: &BarEvent) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event.clone());
    }
}

/// A function with an I/O BAR, a 32-bit BAR and a 64-bit prefetchable BAR.
struct Probe(ConfigSpace);

impl PciDevice for Probe {
    fn read_config(&mut self, offset: u16, data: &mut [u8]) {
        self.0.read(offset, data)
    }
    fn write_config(&mut self, offset: u16, data: &[u8]) {
        self.0.write(offset, data)
    }
    fn bar(&self, index: usize) -> Option<PciBar> {
        self.0.bar(index)
    }
    fn read_bar(&mut self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xFF)
    }
    fn write_bar(&mut self, _: usize, _: u64, _: &[u8]) {}
}

fn probe() -> Probe {
    let ids = PciIds {
        vendor_id: 0x1234,
        device_id: 0x5678,
        revision: 2,
        class: (0xFF, 0, 0),
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    };
    let mut c = ConfigSpace::new(ids);
    let bars = [
        (0, BarKind::Io, 0x20, 0xC000),
        (
            1,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
            0xC002_0000,
        ),
        (
            2,
            BarKind::Memory64 { prefetchable: true },
            0x4000,
            0xC003_0000,
        ),
    ];
    for (i, kind, size, at) in bars {
        c.add_bar(i, kind, size, at).expect("probe BAR");
    }
    c.add_capability(CAP_ID_VENDOR, &[6, 0, 0, 0])
        .expect("vendor capability");
    let msix = MsixTable::new(4, RecordingSink::new()).expect("MSI-X table");
    msix.add_capability(&mut c, 1, 0, 1, 0x800)
        .expect("MSI-X capability");
    Probe(c)
}

fn transport(bar: u64) -> Arc<Mutex<dyn PciDevice>> {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).expect("guest memory");
    let rng = Arc::new(Mutex::new(Rng::new(RngConfig::default()).expect("rng")));
    let t = PciTransport::new(rng, mem, RecordingSink::new(), bar).expect("transport");
    Arc::new(Mutex::new(t))
}

struct Harness {
    bus: Arc<PciBus>,
    vm_bus: Arc<IoBus>,
    io: PciConfigIo,
    ecam: PciConfigMmio,
    events: Arc<Events>,
    model: Model,
    stats: Stats,
}

impl Harness {
    fn new() -> Self {
        let vm_bus = Arc::new(IoBus::new());
        let forbidden = ForbiddenRanges(vec![0..=0xBFFF_FFFF, FIXED, ECAM..=ECAM + 0xF_FFFF]);
        let bus = Arc::new(PciBus::new(&vm_bus, WINDOW, Arc::new(forbidden)).expect("bus"));
        bus.register_config_access(ECAM).expect("config access");
        let scratch = mmio_range(*SCRATCH.start(), 0x1000).expect("scratch range");
        vm_bus
            .register_mmio(scratch, Arc::new(Mutex::new(Scratch)))
            .expect("scratch device");
        let events = Arc::new(Events::default());
        bus.set_observer(events.clone());
        let size = PciTransport::bar_size_for(1);
        for (slot, dev) in [
            (1, transport(0xC000_0000)),
            (2, transport(0xC000_0000 + 2 * size)),
        ] {
            bus.add_device_at(slot, dev).expect("transport slot");
            bus.enable_decoding(slot);
        }
        bus.add_device_at(5, Arc::new(Mutex::new(probe())))
            .expect("probe slot");
        let model = Model::new(&bus);
        let mut h = Self {
            io: PciConfigIo::new(bus.clone()),
            ecam: PciConfigMmio::new(bus.clone()),
            bus,
            vm_bus,
            events,
            model,
            stats: Stats::default(),
        };
        h.check_mappings();
        h
    }
}

/// A device on the VM's bus inside the window, unknown to the validator.
struct Scratch;

impl MutDeviceMmio for Scratch {
    fn mmio_read(&mut self, _: MmioAddress, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn mmio_write(&mut self, _: MmioAddress, _: u64, _: &[u8]) {}
}

impl Harness {
    /// A read through `mech`, checked against the model.
    fn read(&mut self, mech: Mech, len: usize) -> u32 {
        let mut data = vec![0u8; len];
        match mech {
            Mech::Port(o) => self.io.pio_read(PioAddress(0xCF8), o, &mut data),
            Mech::Ecam(o) => self.ecam.mmio_read(MmioAddress(ECAM), o, &mut data),
        }
        assert_eq!(
            data,
            self.model.expect_read(mech, len),
            "{len}-byte read {mech:x?}"
        );
        let mut b = [0u8; 4];
        let n = len.min(4);
        b[..n].copy_from_slice(&data[..n]);
        u32::from_le_bytes(b)
    }

    /// A write through `mech`, applied to the model when the bus should accept it.
    fn write(&mut self, mech: Mech, data: &[u8]) {
        let target = self.model.decode(mech, data.len());
        let slot = target.and_then(|t| self.model.accepts(t, data.len()).map(|s| (s, t.reg)));
        let before = slot
            .and_then(|(s, _)| self.model.funcs[s].as_ref())
            .map(Func::bar_state);
        match mech {
            Mech::Port(o) => {
                self.io.pio_write(PioAddress(0xCF8), o, data);
                if let (0, Ok(b)) = (o, <[u8; 4]>::try_from(data)) {
                    self.model.cf8 = u32::from_le_bytes(b) & 0x80FF_FFFC;
                }
            }
            Mech::Ecam(o) => self.ecam.mmio_write(MmioAddress(ECAM), o, data),
        }
        let (Some((slot, reg)), Some(before)) = (slot, before) else {
            return;
        };
        if let Some(f) = self.model.funcs[slot].as_mut() {
            f.write(reg, data);
        }
        self.stats.writes += 1;
        self.sync_events();
        self.check_liveness(slot, before);
    }

    /// Writes the dword `value` at `reg` of `t` in pieces.
    fn write_dword(&mut self, path: Path, t: Target, value: u32, pieces: Pieces) {
        let step = match pieces {
            Pieces::Dword => 4,
            Pieces::Words => 2,
            Pieces::Bytes => 1,
        };
        for at in (0..4).step_by(step) {
            let mech = self.select(
                path,
                Target {
                    reg: t.reg + at as u16,
                    ..t
                },
                false,
            );
            self.write(mech, &value.to_le_bytes()[at..at + step]);
        }
    }

    /// Points the mechanism at `t`: for the port, writes CONFIG_ADDRESS.
    fn select(&mut self, path: Path, t: Target, disabled: bool) -> Mech {
        match path {
            Path::Port => {
                let enable = if disabled { 0 } else { 0x8000_0000 };
                let a = enable
                    | u32::from(t.bus) << 16
                    | u32::from(t.dev & 0x1F) << 11
                    | u32::from(t.func & 7) << 8
                    | u32::from(t.reg & 0xFC);
                self.write(Mech::Port(0), &a.to_le_bytes());
                Mech::Port(4 + (t.reg & 3))
            }
            Path::Ecam => Mech::Ecam(
                (u64::from(t.bus) << 20
                    | u64::from(t.dev & 0x1F) << 15
                    | u64::from(t.func & 7) << 12)
                    + u64::from(t.reg),
            ),
        }
    }

    /// Takes the observer's events into the model's mappings; each must start where the
    /// last left the BAR.
    fn sync_events(&mut self) {
        let events = std::mem::take(&mut *self.events.0.lock().unwrap_or_else(|e| e.into_inner()));
        for e in events {
            let slot = usize::from(e.bdf.device);
            let tracked = &mut self.model.mapped[slot][e.bar.index];
            assert_eq!(
                *tracked, e.old,
                "event {e:x?} does not start where the BAR was"
            );
            *tracked = e.new;
            match (e.old, e.new) {
                (Some(a), Some(b)) if a != b => self.stats.moved += 1,
                (None, Some(_)) => self.stats.mapped += 1,
                (_, None)
                    if e.bar.address != 0
                        && self.model.funcs[slot].as_ref().is_some_and(Func::decoding) =>
                {
                    self.stats.refused += 1
                }
                _ => {}
            }
        }
    }

    /// Whether a BAR of `slot` may be at `range`: inside the window, clear of the forbidden
    /// ranges, the fixed device and every other mapped BAR.
    fn allowed(&self, slot: usize, index: usize, range: &RangeInclusive<u64>) -> bool {
        if range.start() < WINDOW.start() || range.end() > WINDOW.end() {
            return false;
        }
        if overlaps(range, &FIXED) || overlaps(range, &SCRATCH) {
            return false;
        }
        self.mapped_ranges()
            .iter()
            .all(|(s, i, r)| (*s, *i) == (slot, index) || !overlaps(range, r))
    }

    fn mapped_ranges(&self) -> Vec<(usize, usize, RangeInclusive<u64>)> {
        let mut out = Vec::new();
        for (slot, f) in self.model.funcs.iter().enumerate() {
            for b in f.iter().flat_map(|f| &f.bars) {
                if let Some(a) = self.model.mapped[slot][b.index] {
                    out.push((slot, b.index, a..=a.saturating_add(b.size - 1)));
                }
            }
        }
        out
    }

    /// After a write to `slot`: each memory BAR that moved, or all of them when decoding
    /// came on, is mapped if its place is allowed.
    fn check_liveness(&self, slot: usize, before: (bool, Vec<u64>)) {
        let Some(f) = self.model.funcs[slot].as_ref() else {
            return;
        };
        let (on, addrs) = f.bar_state();
        for (i, b) in f.bars.iter().enumerate() {
            let changed = addrs[i] != before.1[i] || (on && !before.0);
            if !changed || !on || !b.kind.is_memory() || addrs[i] == 0 {
                continue;
            }
            let Some(last) = addrs[i].checked_add(b.size - 1) else {
                continue;
            };
            if self.allowed(slot, b.index, &(addrs[i]..=last)) {
                assert_eq!(
                    self.model.mapped[slot][b.index],
                    Some(addrs[i]),
                    "{slot:02x}.0 BAR {} at {:#x} allowed but not mapped",
                    b.index,
                    addrs[i]
                );
            }
        }
    }

    /// The bus's mappings agree with the events, the registers and the VM's bus, and lie
    /// only where allowed.
    fn check_mappings(&mut self) {
        self.sync_events();
        let mut expected = vec![ECAM..=ECAM + 0xF_FFFF, SCRATCH];
        for (slot, f) in self.model.funcs.iter().enumerate() {
            let Some(f) = f else { continue };
            let dev = f.dev.lock().unwrap_or_else(|e| e.into_inner());
            for b in &f.bars {
                let bar = dev.bar(b.index).expect("a defined BAR");
                assert_eq!(
                    bar.address,
                    f.bar_address(b),
                    "{slot:02x}.0 BAR {} register",
                    b.index
                );
                let mapping = self.bus.bar_mapping(slot as u8, b.index);
                assert_eq!(
                    mapping.map(|m| m.address),
                    self.model.mapped[slot][b.index],
                    "events"
                );
                let Some(m) = mapping else { continue };
                assert_eq!(
                    m, bar,
                    "{slot:02x}.0 BAR {} mapped where its registers are not",
                    b.index
                );
                assert!(
                    f.decoding() && m.address != 0,
                    "{slot:02x}.0 BAR {} mapped, not decoding",
                    b.index
                );
                let range = m.range().expect("a mapped BAR does not wrap");
                assert!(
                    self.allowed(slot, b.index, &range),
                    "{slot:02x}.0 BAR {} at {range:x?}",
                    b.index
                );
                expected.push(range);
            }
        }
        expected.sort_by_key(|r| *r.start());
        let mut ranges = self.vm_bus.mmio_ranges();
        ranges.sort_by_key(|r| *r.start());
        assert_eq!(ranges, expected, "the VM's bus against the mapped BARs");
    }
}

impl Harness {
    fn op(&mut self, op: &Op) {
        match *op {
            Op::Access {
                path,
                dev,
                reg,
                width,
                value,
                oddity,
            } => {
                let mut t = Target {
                    bus: 0,
                    dev: dev.slot(),
                    func: 0,
                    reg: reg.offset(),
                };
                match oddity {
                    Oddity::Function(n) => t.func = 1 + n % 7,
                    Oddity::Bus(n) => t.bus = 1 + n % 255,
                    Oddity::None | Oddity::Disabled => {}
                }
                let mech = self.select(path, t, matches!(oddity, Oddity::Disabled));
                match value {
                    Some(v) => self.write(mech, &v.to_le_bytes().repeat(2)[..width.len()]),
                    None => _ = self.read(mech, width.len()),
                }
            }
            Op::PortRaw {
                offset,
                width,
                value,
            } => self.raw(Mech::Port(offset % 12), width, value),
            Op::EcamRaw {
                offset,
                width,
                value,
            } => self.raw(Mech::Ecam(u64::from(offset) << 1), width, value),
            Op::SizeBar {
                path,
                dev,
                bar,
                pieces,
                restore,
            } => self.size_bar(path, dev.slot(), usize::from(bar % 6), pieces, restore),
            Op::MoveBar {
                path,
                dev,
                bar,
                to,
                halves,
                pieces,
            } => {
                let slot = dev.slot();
                let address = self.place(to);
                self.move_bar(path, slot, usize::from(bar % 6), address, halves, pieces)
            }
            Op::Command { path, dev, change } => {
                let t = Target {
                    bus: 0,
                    dev: dev.slot(),
                    func: 0,
                    reg: 4,
                };
                let mech = self.select(path, t, false);
                let old = self.read(mech, 2) as u16;
                let new = match change {
                    Command::MemoryOn => old | COMMAND_MEMORY_SPACE,
                    Command::MemoryOff => old & !COMMAND_MEMORY_SPACE,
                    Command::BusMaster => old ^ COMMAND_BUS_MASTER,
                    Command::Raw(v) => v,
                };
                self.write(mech, &new.to_le_bytes());
            }
            Op::WalkCaps { path, dev } => {
                let t = Target {
                    bus: 0,
                    dev: dev.slot(),
                    func: 0,
                    reg: 0,
                };
                let found = walk(|reg, len| {
                    let mech = self.select(path, Target { reg, ..t }, false);
                    self.read(mech, len)
                });
                self.stats.walks += usize::from(!found.is_empty());
            }
        }
    }

    fn raw(&mut self, mech: Mech, width: Width, value: Option<u32>) {
        match value {
            Some(v) => self.write(mech, &v.to_le_bytes().repeat(2)[..width.len()]),
            None => _ = self.read(mech, width.len()),
        }
    }

    fn size_bar(&mut self, path: Path, slot: u8, reg: usize, pieces: Pieces, restore: bool) {
        let t = Target {
            bus: 0,
            dev: slot,
            func: 0,
            reg: 0x10 + 4 * reg as u16,
        };
        let mech = self.select(path, t, false);
        let old = self.read(mech, 4);
        self.write_dword(path, t, u32::MAX, pieces);
        let mech = self.select(path, t, false);
        let sized = self.read(mech, 4);
        if let Some(f) = self.model.funcs[usize::from(slot)].as_ref() {
            assert_eq!(
                sized,
                size_mask(&f.bars, reg),
                "{slot:02x}.0 BAR register {reg} size mask"
            );
            self.stats.sized += usize::from(sized != 0);
        }
        if restore {
            self.write_dword(path, t, old, pieces);
        }
    }

    fn place(&self, to: Place) -> u64 {
        match to {
            Place::Window(k) => WINDOW.start() + u64::from(k) * 0x1_0000,
            Place::OtherBar(dev, n) => {
                let f = self.model.funcs[usize::from(dev.slot())].as_ref();
                let b = f.and_then(|f| {
                    f.bars
                        .get(usize::from(n) % f.bars.len().max(1))
                        .map(|b| f.bar_address(b))
                });
                b.unwrap_or_else(|| self.place(Place::Window(n)))
            }
            Place::Fixed(k) => FIXED.start() - 0x2000 + u64::from(k % 32) * 0x1000,
            Place::Scratch => *SCRATCH.start(),
            Place::Outside(a) => u64::from(a),
            Place::Zero => 0,
            Place::Raw(a) => a,
        }
    }

    fn move_bar(
        &mut self,
        path: Path,
        slot: u8,
        reg: usize,
        address: u64,
        halves: Halves,
        pieces: Pieces,
    ) {
        let wide = self.model.funcs[usize::from(slot)]
            .as_ref()
            .is_some_and(|f| {
                f.bars
                    .iter()
                    .any(|b| b.index == reg && matches!(b.kind, BarKind::Memory64 { .. }))
            });
        let low = Target {
            bus: 0,
            dev: slot,
            func: 0,
            reg: 0x10 + 4 * reg as u16,
        };
        let high = Target {
            reg: low.reg + 4,
            ..low
        };
        let (lo, hi) = (address as u32, (address >> 32) as u32);
        match (wide, halves) {
            (false, _) | (true, Halves::Low) => self.write_dword(path, low, lo, pieces),
            (true, Halves::High) => self.write_dword(path, high, hi, pieces),
            (true, Halves::Both) => {
                self.write_dword(path, low, lo, pieces);
                self.write_dword(path, high, hi, pieces);
            }
            (true, Halves::HighFirst) => {
                self.write_dword(path, high, hi, pieces);
                self.write_dword(path, low, lo, pieces);
            }
        }
    }
}

#[cfg(test)]
mod tests;
