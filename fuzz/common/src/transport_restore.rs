//! `MmioTransport::restore` and `pci::PciTransport::restore` with hostile saved states: a
//! state a transport of a real device (rng, console, blk on a memfd disk, net on a recording
//! backend) produced, or one made up for it with every queue running in guest memory, then
//! edited field by field (status, features, selectors, queue count, every queue field and
//! ring address, interrupt registers; for PCI configuration registers, the configuration
//! space length, MSI-X entries, pending bits, enable and mask, vectors, ISR), restored into
//! a freshly built transport of the same device over two-region guest memory.
//!
//! Oracles, besides "never panics" (and no allocation beyond what the state holds):
//! - a state the transport accepted reads back with the same common part (status, features,
//!   queues and their ring positions, activation), and a fresh transport of a new device
//!   accepts that read-back state as well;
//! - a restored transport survives a driver reset (status 0) and reads back status 0.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vm_device::bus::MmioAddress;
use vm_device::MutDeviceMmio;
use vmkit_irq::{CountingLine, RecordingSink};
use vmkit_pci::PciDevice;
use vmkit_virtio::pci::PciTransport;
use vmkit_virtio::{
    regs, MmioTransport, MmioTransportState, PciTransportState, VirtioTransportState,
};

use crate::devices::{Dut, DutKind};
use crate::guest::Guest;

/// Bytes per guest memory region (two adjacent regions).
const REGION: u64 = 0x2_0000;
/// Where the PCI transport's BAR 0 starts.
const BAR: u64 = 0xC000_0000;

/// A change to one field of a queue slot.
#[derive(Arbitrary, Debug, Clone)]
pub enum QueueEdit {
    /// `ready`.
    Ready(bool),
    /// The refused-fields bits.
    Invalid(u8),
    /// `active`.
    Active(bool),
    /// The registers as written.
    Addrs([u64; 3]),
    /// The maximum size.
    MaxSize(u16),
    /// `next_avail`.
    NextAvail(u16),
    /// `next_used`.
    NextUsed(u16),
    /// `EVENT_IDX`.
    EventIdx(bool),
    /// The size.
    Size(u16),
    /// virtio-queue's ready flag.
    QueueReady(bool),
    /// Descriptor table, avail and used ring addresses (a small offset or any value).
    Rings([u64; 3]),
}

/// A change to the saved state.
#[derive(Arbitrary, Debug, Clone)]
pub enum Edit {
    /// Status.
    Status(u32),
    /// The driver's features.
    DriverFeatures(u64),
    /// The offered features.
    Offered(u64),
    /// The device type.
    DeviceType(u32),
    /// QueueSel and the feature selectors.
    Selectors(u32, u32, u32),
    /// Activated, needs reset, DMA allowed, activation pending.
    Flags(bool, bool, bool, bool),
    /// A queue slot field.
    Queue(u8, QueueEdit),
    /// One queue slot fewer.
    DropQueue,
    /// A copy of the first queue slot appended.
    DupQueue,
    /// virtio-mmio InterruptStatus and ConfigGeneration.
    MmioInterrupt(u32, u32),
    /// virtio-pci ISR, configuration generation.
    PciIsr(u8, u32),
    /// virtio-pci configuration vector.
    ConfigVector(u16),
    /// virtio-pci queue vector (index, vector), or a vector appended when out of range.
    QueueVector(u8, u16),
    /// A configuration register (index modulo the count, value).
    ConfigReg(u16, u32),
    /// The configuration space cut to this many registers.
    ConfigLen(u16),
    /// An MSI-X entry (index, words).
    MsixEntry(u8, [u32; 4]),
    /// An MSI-X entry dropped.
    MsixDrop,
    /// A pending bit (index, value).
    MsixPending(u8, bool),
    /// MSI-X enable and function mask.
    MsixControl(bool, bool),
}

/// A run.
#[derive(Arbitrary, Debug, Clone)]
pub struct Input {
    /// The device.
    pub device: DutKind,
    /// virtio-pci instead of virtio-mmio.
    pub pci: bool,
    /// Start from a made-up running state (every queue ready in guest memory) rather than
    /// the fresh transport's own.
    pub running: bool,
    /// The edits.
    #[arbitrary(with = crate::seeds::many::<Edit, 48>)]
    pub edits: Vec<Edit>,
}

/// What a restore must give back exactly: everything but what the restored device may
/// change as it starts (it serves its queues once: the ring positions move, and a hostile
/// ring puts it in `DEVICE_NEEDS_RESET`).
fn comparable(state: &VirtioTransportState) -> VirtioTransportState {
    let mut s = state.clone();
    s.needs_reset = false;
    for q in &mut s.queues {
        q.queue.next_avail = 0;
        q.queue.next_used = 0;
    }
    s
}

/// Runs `data` as an [`Input`].
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Whether `data` restores a running device (the seeds' goal).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data)).is_ok_and(|i| run(&i))
}

/// Runs one input; returns whether a state with a running device was accepted.
pub fn run(input: &Input) -> bool {
    let g = Guest::new(REGION, 0);
    if input.pci {
        run_pci(input, &g)
    } else {
        run_mmio(input, &g)
    }
}

fn mmio(g: &Guest, kind: DutKind) -> Option<(MmioTransport, Dut)> {
    let dut = Dut::build(kind)?;
    let line = Arc::new(CountingLine::default());
    let t = MmioTransport::new(dut.device.clone(), g.mem.clone(), line).ok()?;
    Some((t, dut))
}

fn pci(g: &Guest, kind: DutKind) -> Option<(PciTransport, Dut)> {
    let dut = Dut::build(kind)?;
    let t = PciTransport::new(dut.device.clone(), g.mem.clone(), RecordingSink::new(), BAR).ok()?;
    Some((t, dut))
}

fn run_mmio(input: &Input, g: &Guest) -> bool {
    let Some((t, _dut)) = mmio(g, input.device) else {
        return false; // io_uring unavailable
    };
    let mut state = t.state();
    if input.running {
        make_running(&mut state.common, t.offered_features());
    }
    for e in &input.edits {
        edit_common(&mut state.common, e);
        if let Edit::MmioInterrupt(s, n) = e {
            (state.interrupt_status, state.config_generation) = (*s, *n);
        }
    }
    let Some((mut fresh, _d)) = mmio(g, input.device) else {
        return false;
    };
    if fresh.restore(&state).is_err() {
        return false;
    }
    let back: MmioTransportState = fresh.state();
    assert_eq!(
        comparable(&back.common),
        comparable(&state.common),
        "restored state reads back otherwise"
    );
    let Some((mut again, _d2)) = mmio(g, input.device) else {
        return false;
    };
    again
        .restore(&back)
        .expect("a state the transport produced is refused");
    fresh.mmio_write(MmioAddress(0), regs::STATUS, &0u32.to_le_bytes());
    assert_eq!(fresh.status(), 0, "reset after restore");
    state.common.activated
}

fn run_pci(input: &Input, g: &Guest) -> bool {
    let Some((t, _dut)) = pci(g, input.device) else {
        return false;
    };
    let mut state = t.state();
    if input.running {
        make_running(&mut state.common, offered(&t));
        // Bus mastering on, as the running state needs it.
        if let Some(r) = state.config.regs.get_mut(1) {
            *r |= u32::from(vmkit_pci::COMMAND_BUS_MASTER | vmkit_pci::COMMAND_MEMORY_SPACE);
        }
    }
    for e in &input.edits {
        edit_common(&mut state.common, e);
        edit_pci(&mut state, e);
    }
    let Some((mut fresh, _d)) = pci(g, input.device) else {
        return false;
    };
    if fresh.restore(&state).is_err() {
        return false;
    }
    let back: PciTransportState = fresh.state();
    assert_eq!(
        comparable(&back.common),
        comparable(&state.common),
        "restored state reads back otherwise"
    );
    assert_eq!(
        back.config, state.config,
        "configuration space reads back otherwise"
    );
    let Some((mut again, _d2)) = pci(g, input.device) else {
        return false;
    };
    again
        .restore(&back)
        .expect("a state the transport produced is refused");
    // A driver reset: device_status (offset 0x14 of BAR 0) = 0.
    fresh.write_bar(0, 0x14, &[0]);
    assert_eq!(fresh.status(), 0, "reset after restore");
    state.common.activated
}

/// The features a PCI transport offers (read as the fresh state has them).
fn offered(t: &PciTransport) -> u64 {
    t.state().common.offered_features
}

/// A running device: negotiated, every queue ready and active with its rings laid out one
/// after another in guest memory.
fn make_running(s: &mut vmkit_virtio::VirtioTransportState, offered: u64) {
    s.status = 0xF;
    s.driver_features = offered;
    s.activated = true;
    s.dma_allowed = true;
    let mut at = 0x1000u64;
    for q in &mut s.queues {
        let size = u64::from(q.queue.max_size);
        let desc = at;
        let avail = desc + 16 * size;
        let used = (avail + 6 + 2 * size).next_multiple_of(4);
        at = (used + 6 + 8 * size).next_multiple_of(0x1000);
        q.ready = true;
        q.active = true;
        q.addrs = [desc, avail, used];
        q.queue.size = q.queue.max_size;
        q.queue.ready = true;
        q.queue.event_idx_enabled = offered & vmkit_virtio::FEATURE_RING_EVENT_IDX != 0;
        (q.queue.desc_table, q.queue.avail_ring, q.queue.used_ring) = (desc, avail, used);
    }
}

fn edit_common(s: &mut vmkit_virtio::VirtioTransportState, e: &Edit) {
    match e {
        Edit::Status(v) => s.status = *v,
        Edit::DriverFeatures(v) => s.driver_features = *v,
        Edit::Offered(v) => s.offered_features = *v,
        Edit::DeviceType(v) => s.device_type = *v,
        Edit::Selectors(q, d, r) => {
            (s.queue_sel, s.device_features_sel, s.driver_features_sel) = (*q, *d, *r)
        }
        Edit::Flags(a, n, d, p) => {
            (
                s.activated,
                s.needs_reset,
                s.dma_allowed,
                s.activation_pending,
            ) = (*a, *n, *d, *p)
        }
        Edit::Queue(i, qe) => {
            let n = s.queues.len();
            if n > 0 {
                edit_queue(&mut s.queues[usize::from(*i) % n], qe);
            }
        }
        Edit::DropQueue => {
            s.queues.pop();
        }
        Edit::DupQueue => {
            if let Some(q) = s.queues.first().cloned() {
                s.queues.push(q);
            }
        }
        _ => {}
    }
}

fn edit_queue(q: &mut vmkit_virtio::QueueSlotState, e: &QueueEdit) {
    let qs = &mut q.queue;
    match e {
        QueueEdit::Ready(v) => q.ready = *v,
        QueueEdit::Invalid(v) => q.invalid = *v,
        QueueEdit::Active(v) => q.active = *v,
        QueueEdit::Addrs(v) => q.addrs = *v,
        QueueEdit::MaxSize(v) => qs.max_size = *v,
        QueueEdit::NextAvail(v) => qs.next_avail = *v,
        QueueEdit::NextUsed(v) => qs.next_used = *v,
        QueueEdit::EventIdx(v) => qs.event_idx_enabled = *v,
        QueueEdit::Size(v) => qs.size = *v,
        QueueEdit::QueueReady(v) => qs.ready = *v,
        QueueEdit::Rings([d, a, u]) => {
            // Mostly near guest memory's end (rings crossing it or the region boundary),
            // sometimes anywhere.
            let near = |v: u64| {
                if v >> 63 == 0 {
                    (2 * REGION - 0x100).wrapping_add(v % 0x200) & !0xF
                } else {
                    v
                }
            };
            (qs.desc_table, qs.avail_ring, qs.used_ring) = (near(*d), near(*a), near(*u));
            // The registers as the driver wrote them (else the state is refused early).
            q.addrs = [qs.desc_table, qs.avail_ring, qs.used_ring];
        }
    }
}

fn edit_pci(s: &mut PciTransportState, e: &Edit) {
    match e {
        Edit::PciIsr(isr, generation) => (s.isr, s.config_generation) = (*isr, *generation),
        Edit::ConfigVector(v) => s.config_vector = *v,
        Edit::QueueVector(i, v) => match s.queue_vectors.get_mut(usize::from(*i)) {
            Some(slot) => *slot = *v,
            None => s.queue_vectors.push(*v),
        },
        Edit::ConfigReg(i, v) => {
            let n = s.config.regs.len();
            if n > 0 {
                s.config.regs[usize::from(*i) % n] = *v;
            }
        }
        Edit::ConfigLen(n) => s.config.regs.truncate(usize::from(*n)),
        Edit::MsixEntry(i, v) => {
            let n = s.msix.entries.len();
            if n > 0 {
                s.msix.entries[usize::from(*i) % n] = *v;
            }
        }
        Edit::MsixDrop => {
            s.msix.entries.pop();
        }
        Edit::MsixPending(i, v) => {
            let n = s.msix.pending.len();
            if n > 0 {
                s.msix.pending[usize::from(*i) % n] = *v;
            }
        }
        Edit::MsixControl(enabled, masked) => {
            (s.msix.enabled, s.msix.function_mask) = (*enabled, *masked)
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::Engine;

    #[test]
    fn every_device_restores_running_on_both_transports() {
        for device in [
            DutKind::Rng,
            DutKind::Console,
            DutKind::Blk(Engine::Sync),
            DutKind::Net,
        ] {
            for pci in [false, true] {
                let input = Input {
                    device,
                    pci,
                    running: true,
                    edits: Vec::new(),
                };
                assert!(run(&input), "{device:?} pci={pci}");
            }
        }
    }

    #[test]
    fn rings_outside_memory_and_odd_sizes_are_refused() {
        for edit in [
            Edit::Queue(0, QueueEdit::Rings([!0xF, 0, 0])),
            Edit::Queue(0, QueueEdit::Size(3)),
            Edit::Queue(0, QueueEdit::NextAvail(0x8000)),
            Edit::DropQueue,
        ] {
            let input = Input {
                device: DutKind::Rng,
                pci: false,
                running: true,
                edits: vec![edit.clone()],
            };
            assert!(!run(&input), "{edit:?}");
        }
    }

    #[test]
    fn the_generated_seeds_restore_running_devices() {
        let reached = crate::seeds::for_target("transport_restore")
            .iter()
            .filter(|s| reaches_goal(s))
            .count();
        assert!(
            reached >= 8,
            "only {reached} seeds restore a running device"
        );
    }
}
