//! `vmkit_virtio::MmioTransport` — the virtio-mmio register file and the shared status,
//! feature and queue state machine — over real devices (rng, console, blk on a memfd disk
//! with the sync engine or io_uring, net on a recording backend), with notifications
//! reaching the device as they do in the VMM: a QueueNotify write signals the queue's
//! eventfd and an event-manager loop runs `QueueEventHandler` (`process_queue`, io_uring
//! completions).
//!
//! The driver ([`crate::driver`]): a correct initialisation with any feature choice, or any
//! of its steps alone and in any order; status writes of any value; register reads and
//! writes of any width at the registers or any offset; config-space accesses; chains on the
//! rings (built, or damaged); raw ring contents; notifications.
//!
//! Oracles, besides "never panics":
//! - MagicValue, Version and DeviceID read back their values at any time, and a 2-byte
//!   read of a register reads all `0xFF`;
//! - FEATURES_OK reads back set only when the driver's features are a subset of those
//!   offered;
//! - guest memory changes only in the used rings and device-writable buffers (not checked
//!   in runs that move a queue with raw register writes);
//! - after any sequence, a reset and a correct initialisation, the device serves a
//!   legitimate request (rng: bytes; console: the line reaches the output; blk: a read with
//!   the disk's data; net: the frame reaches the backend as sent);
//! - every frame net hands its backend is a header plus at most `MAX_FRAME_LEN` bytes.

use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use event_manager::{EventManager, SubscriberOps};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vmkit_irq::CountingLine;
use vmkit_virtio::{
    regs, MmioTransport, QueueEventHandler, CONFIG_SPACE_OFFSET, MMIO_MAGIC_VALUE, MMIO_VERSION,
};

use crate::devices::{Dut, DutKind};
use crate::driver::{DriverOp, Regs, Session};
use crate::guest::Guest;
use crate::ring::Ring;

const BASE: u64 = 0xd000_0000;

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// The device.
    pub device: DutKind,
    /// Byte guest memory starts as.
    pub fill: u8,
    /// Let the driver misbehave; without it only its initialisation, built chains,
    /// notifications and config reads run.
    pub hostile: bool,
    /// The driver's operations.
    #[arbitrary(with = crate::seeds::many::<DriverOp, 64>)]
    pub ops: Vec<DriverOp>,
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

struct Mmio {
    t: Arc<Mutex<MmioTransport>>,
    events: EventManager<QueueEventHandler>,
}

const KNOWN: &[u64] = &[
    0x000, 0x004, 0x008, 0x00c, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
    0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0a0, 0x0a4, 0x0ac, 0x0b0, 0x0fc, 0x100,
    0x104, 0x108,
];

impl Mmio {
    fn lock(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.t.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Regs for Mmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.lock().mmio_read(MmioAddress(BASE), offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.lock().mmio_write(MmioAddress(BASE), offset, data);
    }

    fn known_offsets(&self) -> &'static [u64] {
        KNOWN
    }

    fn span(&self) -> u64 {
        0x200
    }

    fn moves_queues(&self, offset: u64, len: usize) -> bool {
        let end = offset + len as u64;
        let hits = |a: u64, b: u64| offset < b && a < end;
        hits(regs::QUEUE_NUM, regs::QUEUE_NUM + 4)
            || hits(regs::QUEUE_DESC_LOW, regs::QUEUE_DEVICE_HIGH + 4)
    }

    fn run_events(&mut self, timeout_ms: i32) {
        let _ = self.events.run_with_timeout(timeout_ms);
    }

    fn set_status(&mut self, status: u8) {
        self.write32(regs::STATUS, u32::from(status));
    }

    fn status(&mut self) -> u8 {
        self.read32(regs::STATUS) as u8
    }

    fn device_features(&mut self) -> u64 {
        self.write32(regs::DEVICE_FEATURES_SEL, 0);
        let low = u64::from(self.read32(regs::DEVICE_FEATURES));
        self.write32(regs::DEVICE_FEATURES_SEL, 1);
        low | u64::from(self.read32(regs::DEVICE_FEATURES)) << 32
    }

    fn set_driver_features(&mut self, features: u64) {
        self.write32(regs::DRIVER_FEATURES_SEL, 0);
        self.write32(regs::DRIVER_FEATURES, features as u32);
        self.write32(regs::DRIVER_FEATURES_SEL, 1);
        self.write32(regs::DRIVER_FEATURES, (features >> 32) as u32);
    }

    fn accepted_features(&self) -> u64 {
        self.lock().driver_features()
    }

    fn queue_max(&mut self, q: u16) -> u16 {
        self.write32(regs::QUEUE_SEL, u32::from(q));
        self.read32(regs::QUEUE_NUM_MAX) as u16
    }

    fn setup_queue(&mut self, q: u16, ring: &Ring, ready: bool) {
        self.write32(regs::QUEUE_SEL, u32::from(q));
        self.write32(regs::QUEUE_NUM, u32::from(ring.size));
        for (low, addr) in [
            (regs::QUEUE_DESC_LOW, ring.desc),
            (regs::QUEUE_DRIVER_LOW, ring.avail),
            (regs::QUEUE_DEVICE_LOW, ring.used),
        ] {
            self.write32(low, addr as u32);
            self.write32(low + 4, (addr >> 32) as u32);
        }
        self.write32(regs::QUEUE_READY, u32::from(ready));
    }

    fn notify(&mut self, q: u16) {
        self.write32(regs::QUEUE_NOTIFY, u32::from(q));
    }

    fn config_offset(&self) -> u64 {
        CONFIG_SPACE_OFFSET
    }
}

impl Mmio {
    fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write32(&mut self, offset: u64, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }
}

/// Runs one input; returns how many used elements with data the driver saw before the
/// final check.
pub fn run(input: &Input) -> usize {
    let g = Guest::new(0x2_0000, input.fill);
    let Some(dut) = Dut::build(input.device) else {
        return 0; // io_uring unavailable
    };
    let line = Arc::new(CountingLine::default());
    let t = MmioTransport::new(dut.device.clone(), g.mem.clone(), line).expect("mmio transport");
    let handler = t.queue_event_handler().expect("queue event handler");
    let mut events = EventManager::new().expect("event manager");
    events.add_subscriber(handler);
    let mut regs = Mmio {
        t: Arc::new(Mutex::new(t)),
        events,
    };
    let device_type = dut.device_type();
    let mut s = Session::new(&g, &dut);
    for op in &input.ops {
        if input.hostile {
            s.apply(&mut regs, op);
        } else {
            s.apply_behaving(&mut regs, op);
        }
        check_fixed_registers(&mut regs, device_type);
    }
    let served = s.served();
    s.finish(&mut regs);
    served
}

fn check_fixed_registers(r: &mut Mmio, device_type: u32) {
    for (offset, want) in [
        (regs::MAGIC_VALUE, MMIO_MAGIC_VALUE),
        (regs::VERSION, MMIO_VERSION),
        (regs::DEVICE_ID, device_type),
    ] {
        assert_eq!(r.read32(offset), want, "register {offset:#x}");
    }
    let mut b = [0u8; 2];
    r.read(regs::MAGIC_VALUE, &mut b);
    assert_eq!(b, [0xFF; 2], "a 2-byte register read is not all 0xFF");
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
                DriverOp::Init { mask: u64::MAX },
                DriverOp::Chain {
                    queue: q,
                    bufs: vec![(Len::Small(16), false), (Len::Small(64), true)],
                    form: Form::Direct,
                    damage: Damage::None,
                },
                DriverOp::Notify(q),
                DriverOp::Status(0xFF),
                DriverOp::Reset,
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
        let reached = crate::seeds::for_target("virtio_mmio")
            .iter()
            .filter(|s| reaches_goal(s))
            .count();
        assert!(reached >= 16, "only {reached} seeds get a request served");
    }
}
