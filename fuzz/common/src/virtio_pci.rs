//! `vmkit_virtio::pci::PciTransport` — the virtio-pci modern transport: the common,
//! notify, ISR and device-config windows of BAR 0, the MSI-X table and PBA, configuration
//! space (command register, capabilities, BAR 0) and the same status/feature/queue state
//! machine — over real devices (rng, console, blk on a memfd disk with either engine, net on a
//! recording backend), with
//! notifications reaching the device through its queue eventfds and an event-manager loop
//! running `QueueEventHandler`, as in the VMM.
//!
//! The driver is [`crate::driver`]'s (any step alone or out of order, raw accesses of any
//! width and offset inside BAR 0, config-space accesses, chains, raw rings, notifications)
//! plus PCI operations: configuration-space reads and writes (1, 2 or 4 bytes, aligned, as
//! the bus passes them), bus mastering and memory decoding switched on and off, MSI-X
//! enabled and vectors assigned. Every access reaches the transport as `vmkit_pci::PciBus`
//! would pass it (its `PciDevice` contract), so `pci_config` covers the bus itself.
//!
//! Oracles, besides "never panics":
//! - vendor and device ID read back `0x1AF4` and `0x1040 + type` at any time;
//! - FEATURES_OK reads back set only when the driver's features are a subset of those
//!   offered;
//! - MSI-X: the sink is only ever told of vectors the table has (config + one per queue);
//! - guest memory changes only in the used rings and device-writable buffers (not checked
//!   in runs that move a queue with raw register writes);
//! - after any sequence, a reset, bus mastering on and a correct initialisation, the device
//!   serves a legitimate request.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use event_manager::{EventManager, SubscriberOps};
use vmkit_irq::{RecordingSink, SinkEvent};
use vmkit_pci::PciDevice;
use vmkit_virtio::pci::{bar_offsets, common_cfg, PciTransport, NOTIFY_OFF_MULTIPLIER};
use vmkit_virtio::QueueEventHandler;

use crate::devices::{Dut, DutKind};
use crate::driver::{DriverOp, Regs, Session};
use crate::guest::Guest;
use crate::ring::Ring;

const COMMAND: u16 = 0x04;
const MEMORY: u16 = 1 << 1;
const BUS_MASTER: u16 = 1 << 2;

/// A PCI-level operation, or a driver operation.
#[derive(Arbitrary, Debug, Clone)]
pub enum PciOp {
    /// A virtio driver operation.
    Driver(DriverOp),
    /// A configuration-space access (width 1, 2 or 4, aligned down).
    ConfigSpace {
        /// Offset (0–0xFFF).
        offset: u16,
        /// Width selector.
        width: u8,
        /// Written value, or a read.
        write: Option<u32>,
    },
    /// The command register's memory-decode and bus-master bits.
    Command {
        /// Memory decoding.
        memory: bool,
        /// Bus mastering.
        bus_master: bool,
    },
    /// MSI-X enable (and function mask) in the capability's control word.
    Msix {
        /// Enable.
        enable: bool,
        /// Function mask.
        mask: bool,
    },
}

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// The device.
    pub device: DutKind,
    /// Byte guest memory starts as.
    pub fill: u8,
    /// Let the driver misbehave; without it only its initialisation, built chains,
    /// notifications, config reads and MSI-X switches run.
    pub hostile: bool,
    /// The operations.
    #[arbitrary(with = crate::seeds::many::<PciOp, 64>)]
    pub ops: Vec<PciOp>,
}

/// Runs `data` as an [`Input`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Whether `data` gets a request served before the final check (the seeds' goal).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|i| run(&i) > 0)
}

struct Pci {
    t: PciTransport,
    events: EventManager<QueueEventHandler>,
    bar_size: u64,
}

const KNOWN: &[u64] = &[
    0x00, 0x04, 0x08, 0x0c, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1a, 0x1c, 0x1e, 0x20, 0x24, 0x28,
    0x2c, 0x30, 0x34, 0x1000, 0x2000, 0x2004, 0x2008, 0x3000, 0x3004, 0x3008, 0x4000, 0x400c,
    0x4010, 0x401c, 0x5000,
];

impl Pci {
    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        self.read(bar_offsets::COMMON_CFG_OFFSET + offset, data);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        self.write(bar_offsets::COMMON_CFG_OFFSET + offset, data);
    }

    fn write16(&mut self, offset: u64, v: u16) {
        self.common_write(offset, &v.to_le_bytes());
    }

    fn write32(&mut self, offset: u64, v: u32) {
        self.common_write(offset, &v.to_le_bytes());
    }

    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.common_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn command(&mut self, set: u16, clear: u16) {
        let mut b = [0u8; 2];
        self.t.read_config(COMMAND, &mut b);
        let v = (u16::from_le_bytes(b) | set) & !clear;
        self.t.write_config(COMMAND, &v.to_le_bytes());
    }

    fn config_access(&mut self, offset: u16, width: u8, write: Option<u32>) {
        let len: u16 = match width % 3 {
            0 => 4,
            1 => 2,
            _ => 1,
        };
        let offset = (offset % 0x1000) & !(len - 1);
        let mut b = vec![0u8; usize::from(len)];
        match write {
            Some(v) => {
                b.copy_from_slice(&v.to_le_bytes()[..usize::from(len)]);
                self.t.write_config(offset, &b);
            }
            None => self.t.read_config(offset, &mut b),
        }
    }

    fn msix(&mut self, enable: bool, mask: bool) {
        let cap = self.t.msix_capability();
        let mut b = [0u8; 2];
        self.t.read_config(cap + 2, &mut b);
        let mut v = u16::from_le_bytes(b) & !(0xC000);
        v |= u16::from(enable) << 15 | u16::from(mask) << 14;
        self.t.write_config(cap + 2, &v.to_le_bytes());
    }
}

impl Regs for Pci {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The bus passes only accesses inside the BAR.
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= self.bar_size)
        {
            self.t.read_bar(0, offset, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= self.bar_size)
        {
            self.t.write_bar(0, offset, data);
        }
    }

    fn known_offsets(&self) -> &'static [u64] {
        KNOWN
    }

    fn span(&self) -> u64 {
        self.bar_size
    }

    fn moves_queues(&self, offset: u64, len: usize) -> bool {
        let end = offset + len as u64;
        let hits = |a: u64, b: u64| offset < b && a < end;
        hits(common_cfg::QUEUE_SIZE, common_cfg::QUEUE_SIZE + 2)
            || hits(common_cfg::QUEUE_DESC, common_cfg::QUEUE_DEVICE + 8)
    }

    fn run_events(&mut self, timeout_ms: i32) {
        let _ = self.events.run_with_timeout(timeout_ms);
    }

    fn prepare(&mut self) {
        self.command(MEMORY | BUS_MASTER, 0);
    }

    fn set_status(&mut self, status: u8) {
        self.common_write(common_cfg::DEVICE_STATUS, &[status]);
    }

    fn status(&mut self) -> u8 {
        let mut b = [0u8];
        self.common_read(common_cfg::DEVICE_STATUS, &mut b);
        b[0]
    }

    fn device_features(&mut self) -> u64 {
        self.write32(common_cfg::DEVICE_FEATURE_SELECT, 0);
        let low = u64::from(self.read32(common_cfg::DEVICE_FEATURE));
        self.write32(common_cfg::DEVICE_FEATURE_SELECT, 1);
        low | u64::from(self.read32(common_cfg::DEVICE_FEATURE)) << 32
    }

    fn set_driver_features(&mut self, features: u64) {
        self.write32(common_cfg::DRIVER_FEATURE_SELECT, 0);
        self.write32(common_cfg::DRIVER_FEATURE, features as u32);
        self.write32(common_cfg::DRIVER_FEATURE_SELECT, 1);
        self.write32(common_cfg::DRIVER_FEATURE, (features >> 32) as u32);
    }

    fn accepted_features(&self) -> u64 {
        self.t.driver_features()
    }

    fn queue_max(&mut self, q: u16) -> u16 {
        self.write16(common_cfg::QUEUE_SELECT, q);
        let mut b = [0u8; 2];
        self.common_read(common_cfg::QUEUE_SIZE, &mut b);
        u16::from_le_bytes(b)
    }

    fn setup_queue(&mut self, q: u16, ring: &Ring, ready: bool) {
        self.write16(common_cfg::QUEUE_SELECT, q);
        self.write16(common_cfg::QUEUE_SIZE, ring.size);
        self.write16(common_cfg::QUEUE_MSIX_VECTOR, q + 1);
        for (at, addr) in [
            (common_cfg::QUEUE_DESC, ring.desc),
            (common_cfg::QUEUE_DRIVER, ring.avail),
            (common_cfg::QUEUE_DEVICE, ring.used),
        ] {
            self.write32(at, addr as u32);
            self.write32(at + 4, (addr >> 32) as u32);
        }
        self.write16(common_cfg::QUEUE_ENABLE, u16::from(ready));
    }

    fn notify(&mut self, q: u16) {
        let at = bar_offsets::NOTIFY_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER);
        self.write(at, &q.to_le_bytes());
    }

    fn config_offset(&self) -> u64 {
        bar_offsets::DEVICE_CFG_OFFSET
    }
}

/// Runs one input; returns how many used elements with data the driver saw before the
/// final check.
pub fn run(input: &Input) -> usize {
    let g = Guest::new(0x2_0000, input.fill);
    let Some(dut) = Dut::build(input.device) else {
        return 0; // io_uring unavailable
    };
    let sink = Arc::new(RecordingSink::default());
    let t = PciTransport::new(dut.device.clone(), g.mem.clone(), sink.clone(), 0)
        .expect("pci transport");
    let handler = t.queue_event_handler().expect("queue event handler");
    let mut events = EventManager::new().expect("event manager");
    events.add_subscriber(handler);
    let bar_size = t.bar_size();
    let mut pci = Pci {
        t,
        events,
        bar_size,
    };
    let device_type = dut.device_type();
    let mut s = Session::new(&g, &dut);
    let vectors = pci.t.interrupt().msix().vectors();
    for op in &input.ops {
        apply(&mut pci, &mut s, op, input.hostile);
        check_ids(&mut pci, device_type);
        for e in sink.take() {
            let v = match e {
                SinkEvent::Trigger(v) | SinkEvent::Update(v, ..) => v,
            };
            assert!(
                usize::from(v) < vectors,
                "MSI-X vector {v} of a {vectors}-vector table"
            );
        }
    }
    let served = s.served();
    s.finish(&mut pci);
    served
}

fn apply(pci: &mut Pci, s: &mut Session<'_>, op: &PciOp, hostile: bool) {
    match op {
        PciOp::Driver(d) if hostile => s.apply(pci, d),
        PciOp::Driver(d) => s.apply_behaving(pci, d),
        PciOp::ConfigSpace {
            offset,
            width,
            write,
        } => {
            let write = if hostile { *write } else { None };
            pci.config_access(*offset, *width, write);
        }
        PciOp::Command { memory, bus_master } if hostile => {
            let bits = |m: bool, b: bool| (u16::from(m) * MEMORY) | (u16::from(b) * BUS_MASTER);
            pci.command(bits(*memory, *bus_master), bits(!*memory, !*bus_master));
        }
        PciOp::Command { .. } => {}
        PciOp::Msix { enable, mask } => pci.msix(*enable, *mask && hostile),
    }
}

fn check_ids(pci: &mut Pci, device_type: u32) {
    let mut b = [0u8; 4];
    pci.t.read_config(0, &mut b);
    let want = 0x1AF4 | (0x1040 + device_type) << 16;
    assert_eq!(u32::from_le_bytes(b), want, "vendor/device ID");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Engine;
    use crate::ring::{Damage, Form, Len};

    #[test]
    fn every_device_initialises_serves_and_recovers() {
        for device in [
            DutKind::Rng,
            DutKind::Console,
            DutKind::Blk(Engine::Sync),
            DutKind::Blk(Engine::IoUring),
            DutKind::Net,
        ] {
            let q = if device == DutKind::Console { 1 } else { 0 };
            let ops = vec![
                PciOp::Msix {
                    enable: true,
                    mask: false,
                },
                PciOp::Driver(DriverOp::Init { mask: u64::MAX }),
                PciOp::Driver(DriverOp::Chain {
                    queue: q,
                    bufs: vec![(Len::Small(16), false), (Len::Small(64), true)],
                    form: Form::Direct,
                    damage: Damage::None,
                }),
                PciOp::Driver(DriverOp::Notify(q)),
                PciOp::Command {
                    memory: true,
                    bus_master: false,
                },
                PciOp::Driver(DriverOp::Reset),
            ];
            let input = Input {
                device,
                fill: 0,
                hostile: true,
                ops,
            };
            // The final check (inside run) serves a legitimate request after the reset.
            run(&input);
        }
    }

    #[test]
    fn the_generated_seeds_get_requests_served() {
        let reached = crate::seeds::for_target("virtio_pci")
            .iter()
            .filter(|s| reaches_goal(s))
            .count();
        assert!(reached >= 16, "only {reached} seeds get a request served");
    }
}
