//! Our virtio-pci transport and PCI bus driven by virtio-drivers: enumeration through both
//! configuration mechanisms, its own capability parser, feature negotiation, queue setup,
//! notifications, ISR and MSI-X interrupts, reset and reuse, BAR relocation.

use std::sync::{Arc, Mutex};

mod common;
use common::PatternRng;

use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::pci::bus::{BarInfo, Command, DeviceFunction};
use virtio_drivers::transport::Transport;
use vmkit_irq::{MsiMessage, SinkEvent};
use vmkit_pci::{Bdf, MSIX_CONTROL_ENABLE};
use vmkit_virtio::pci::{common_cfg, VIRTIO_MSI_NO_VECTOR};
use vmkit_virtio::test_utils::{
    CamKind, GuestHal, PciHarness, HARNESS_PCI_SLOT, HARNESS_PCI_WINDOW,
};

fn harness() -> (PciHarness, Arc<Mutex<PatternRng>>) {
    let dev = Arc::new(Mutex::new(PatternRng::default()));
    (PciHarness::new(dev.clone()), dev)
}

const BAR: u64 = *HARNESS_PCI_WINDOW.start();
const DF: DeviceFunction = DeviceFunction {
    bus: 0,
    device: HARNESS_PCI_SLOT,
    function: 0,
};

#[test]
fn rng_through_port_cam_and_ecam() {
    for kind in [CamKind::Ports, CamKind::Ecam] {
        let (h, dev) = harness();
        let mut rng = VirtIORng::<GuestHal, _>::new(h.transport(kind)).unwrap();
        assert!(h.device().is_activated(), "{kind:?}");
        assert_eq!(h.device().status(), 0xF);
        let mut buf = [0u8; 40];
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 40);
        let expect: Vec<u8> = (1..=40).collect();
        assert_eq!(&buf[..], &expect[..]);
        // MSI-X is off: the used-buffer interrupt went to INTx and the ISR.
        assert!(h.intx_interrupts() >= 1);
        assert!(h.sink().triggers().is_empty());
        assert_eq!(dev.lock().unwrap().activations, 1);
    }
}

#[test]
fn capabilities_and_bar_as_virtio_drivers_sees_them() {
    let (h, _dev) = harness();
    let mut t = h.transport(CamKind::Ecam);
    let root = t.root();
    let caps: Vec<_> = root
        .capabilities(DF)
        .map(|c| (c.id, c.private_header >> 8))
        .collect();
    // Four virtio structures (common, notify, ISR, device), then MSI-X.
    assert_eq!(
        caps,
        vec![(9, 1), (9, 2), (9, 3), (9, 4), (0x11, 0)],
        "{caps:x?}"
    );
    match root.bar_info(DF, 0).unwrap().unwrap() {
        BarInfo::Memory {
            address,
            size,
            prefetchable,
            ..
        } => {
            assert_eq!(address, BAR);
            assert_eq!(size, 0x8000);
            assert!(!prefetchable);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t.common_cfg_address(), BAR);
    assert_eq!(
        t.device_type(),
        virtio_drivers::transport::DeviceType::EntropySource
    );
}

#[test]
fn reset_and_reuse() {
    let (h, dev) = harness();
    for round in 0..3 {
        let mut rng = VirtIORng::<GuestHal, _>::new(h.transport(CamKind::Ecam)).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 16);
        assert_eq!(buf[0], 1, "round {round}: the device starts afresh");
        drop(rng);
        assert!(!h.device().is_activated());
        assert_eq!(h.device().status(), 0);
    }
    assert_eq!(dev.lock().unwrap().activations, 3);
}

fn w16(h: &PciHarness, field: u64, v: u16) {
    assert!(h
        .vm_bus()
        .mmio_write(BAR + field, &v.to_le_bytes())
        .is_handled());
}
fn r16(h: &PciHarness, field: u64) -> u16 {
    let mut b = [0u8; 2];
    assert!(h.vm_bus().mmio_read(BAR + field, &mut b).is_handled());
    u16::from_le_bytes(b)
}

#[test]
fn msix_vectors_per_queue_and_config() {
    let (h, _dev) = harness();
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport(CamKind::Ecam)).unwrap();
    // virtio-drivers knows no MSI-X; the test plays the part of a driver that does (Linux
    // assigns vectors between FEATURES_OK and DRIVER_OK; any time works here). Enable MSI-X
    // with the function mask clear through configuration space.
    let cap = h.device().msix_capability();
    let bdf = Bdf {
        bus: 0,
        device: HARNESS_PCI_SLOT,
        function: 0,
    };
    h.bus()
        .config_write(bdf, cap + 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
    assert!(h.device().interrupt().msix().enabled());
    w16(&h, common_cfg::MSIX_CONFIG, 0);
    w16(&h, common_cfg::QUEUE_SELECT, 0);
    w16(&h, common_cfg::QUEUE_MSIX_VECTOR, 1);
    assert_eq!(r16(&h, common_cfg::QUEUE_MSIX_VECTOR), 1);
    // A vector beyond the table reads back NO_VECTOR.
    w16(&h, common_cfg::MSIX_CONFIG, 7);
    assert_eq!(r16(&h, common_cfg::MSIX_CONFIG), VIRTIO_MSI_NO_VECTOR);
    w16(&h, common_cfg::MSIX_CONFIG, 0);

    // Entry 1 is masked (reset state): the interrupt is pending.
    h.sink().take();
    let mut buf = [0u8; 8];
    assert_eq!(rng.request_entropy(&mut buf).unwrap(), 8);
    assert!(h.sink().triggers().is_empty());
    let intx_before = h.intx_interrupts();
    let mut pba = [0u8; 8];
    assert!(h.vm_bus().mmio_read(BAR + 0x5000, &mut pba).is_handled());
    assert_eq!(u64::from_le_bytes(pba), 0b10, "vector 1 pending");
    // Program and unmask it: delivered.
    assert!(h
        .vm_bus()
        .mmio_write(BAR + 0x4010, &0xFEE0_0000u32.to_le_bytes())
        .is_handled());
    assert!(h
        .vm_bus()
        .mmio_write(BAR + 0x4018, &0x31u32.to_le_bytes())
        .is_handled());
    assert!(h
        .vm_bus()
        .mmio_write(BAR + 0x401C, &0u32.to_le_bytes())
        .is_handled());
    assert_eq!(h.sink().triggers(), vec![1]);
    assert!(h.vm_bus().mmio_read(BAR + 0x5000, &mut pba).is_handled());
    assert_eq!(u64::from_le_bytes(pba), 0);
    assert!(h.sink().take().contains(&SinkEvent::Update(
        1,
        Some(MsiMessage {
            address: 0xFEE0_0000,
            data: 0x31
        }),
        false
    )));
    // Unmasked: each request interrupts through vector 1, never INTx.
    assert_eq!(rng.request_entropy(&mut buf).unwrap(), 8);
    assert_eq!(h.sink().triggers(), vec![1]);
    assert_eq!(h.intx_interrupts(), intx_before);
    // A queue vector of NO_VECTOR: no interrupt at all.
    w16(&h, common_cfg::QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    h.sink().take();
    assert_eq!(rng.request_entropy(&mut buf).unwrap(), 8);
    assert!(h.sink().triggers().is_empty());
    // Reset puts the vectors back to NO_VECTOR; the table (PCI state) stays.
    drop(rng);
    assert_eq!(h.device().interrupt().config_vector(), VIRTIO_MSI_NO_VECTOR);
    assert!(h.device().interrupt().msix().enabled());
}

#[test]
fn bar_relocation_keeps_the_device_working() {
    let (h, _dev) = harness();
    let mut t = h.transport(CamKind::Ecam);
    let new_base = BAR + 0x10_0000;
    // As Linux does: decoding off, both halves, decoding back on.
    t.root().set_command(DF, Command::BUS_MASTER);
    t.root().set_bar_64(DF, 0, new_base);
    t.root()
        .set_command(DF, Command::MEMORY_SPACE | Command::BUS_MASTER);
    assert_eq!(
        h.bus().bar_mapping(HARNESS_PCI_SLOT, 0).unwrap().address,
        new_base
    );
    t.rescan();
    assert_eq!(t.common_cfg_address(), new_base);
    let addrs: Vec<u64> = h
        .device()
        .queue_notifiers(new_base)
        .iter()
        .map(|n| n.addr)
        .collect();
    assert_eq!(addrs, vec![new_base + 0x3000]);
    // Nothing answers at the old place.
    let mut b = [0u8; 1];
    assert!(!h
        .vm_bus()
        .mmio_read(BAR + common_cfg::DEVICE_STATUS, &mut b)
        .is_handled());
    assert_eq!(b, [0xFF]);
    let mut rng = VirtIORng::<GuestHal, _>::new(t).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(rng.request_entropy(&mut buf).unwrap(), 8);
    assert_eq!(h.device().status(), 0xF);
}

/// Enables MSI-X with queue 0 on vector 1 and the configuration on vector 0, both
/// programmed and unmasked, as a driver that knows MSI-X would.
fn enable_msix(h: &PciHarness) {
    let cap = h.device().msix_capability();
    let bdf = Bdf {
        bus: 0,
        device: HARNESS_PCI_SLOT,
        function: 0,
    };
    h.bus()
        .config_write(bdf, cap + 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
    w16(h, common_cfg::MSIX_CONFIG, 0);
    w16(h, common_cfg::QUEUE_SELECT, 0);
    w16(h, common_cfg::QUEUE_MSIX_VECTOR, 1);
    for (entry, data) in [(0u64, 0x30u32), (1, 0x31)] {
        let at = BAR + 0x4000 + 16 * entry;
        for (off, v) in [(0, 0xFEE0_0000u32), (8, data), (12, 0)] {
            assert!(h
                .vm_bus()
                .mmio_write(at + off, &v.to_le_bytes())
                .is_handled());
        }
    }
}

/// A snapshot mid-use restored into a new transport and device on the same bus slot: MSI-X
/// routes given to the sink again, vectors kept, the driver carries on.
#[test]
fn rng_continues_after_restore_into_a_new_pci_transport() {
    let (h, dev) = harness();
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport(CamKind::Ecam)).unwrap();
    enable_msix(&h);
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 16);
    }
    let state = h.device().state();
    assert!(state.common.activated && state.common.dma_allowed);
    assert!(state.msix.enabled);
    assert_eq!(
        (state.config_vector, state.queue_vectors.clone()),
        (0, vec![1])
    );
    let q = &state.common.queues[0].queue;
    assert_eq!((q.next_avail, q.next_used), (3, 3));
    let json = serde_json::to_string(&state).unwrap();
    let state: vmkit_virtio::PciTransportState = serde_json::from_str(&json).unwrap();

    let next = dev.lock().unwrap().next;
    let dev2 = Arc::new(Mutex::new(PatternRng {
        next,
        ..PatternRng::default()
    }));
    h.sink().take();
    h.restore_transport(dev2.clone(), &state).unwrap();
    let events = h.sink().take();
    let m1 = MsiMessage {
        address: 0xFEE0_0000,
        data: 0x31,
    };
    assert!(
        events.contains(&SinkEvent::Update(1, Some(m1), false)),
        "{events:?}"
    );
    // The queue's vector once, after the routes (not the configuration's: nothing changed).
    let triggers: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            SinkEvent::Trigger(v) => Some(*v),
            _ => None,
        })
        .collect();
    assert_eq!(triggers, vec![1]);
    assert!(h.device().is_activated());
    assert_eq!(h.device().interrupt().queue_vector(0), 1);
    assert_eq!(
        h.bus().bar_mapping(HARNESS_PCI_SLOT, 0).unwrap().address,
        BAR
    );

    let mut expected = next;
    for _ in 0..10 {
        assert_eq!(rng.request_entropy(&mut buf).unwrap(), 16);
        for b in &buf {
            expected = expected.wrapping_add(1);
            assert_eq!(*b, expected);
        }
        assert_eq!(h.sink().triggers(), vec![1], "through vector 1");
        h.sink().take();
    }
    assert_eq!(h.device().state().common.queues[0].queue.next_used, 13);
}

#[test]
fn hostile_pci_transport_states_are_refused() {
    let (h, _dev) = harness();
    let mut rng = VirtIORng::<GuestHal, _>::new(h.transport(CamKind::Ecam)).unwrap();
    enable_msix(&h);
    let mut buf = [0u8; 8];
    rng.request_entropy(&mut buf).unwrap();
    let good = h.device().state();
    type Edit = fn(&mut vmkit_virtio::PciTransportState);
    let cases: [(&str, Edit); 8] = [
        ("queue vectors", |s| s.queue_vectors.push(0)),
        ("vector 9", |s| s.config_vector = 9),
        ("ISR", |s| s.isr = 0x10),
        ("register 0x0", |s| s.config.regs[0] = 0x1234_5678),
        ("configuration registers", |s| s.config.regs.truncate(64)),
        ("MSI-X entries", |s| {
            s.msix.entries.pop().map(|_| ()).unwrap_or(())
        }),
        ("function mask", |s| s.msix.function_mask = true),
        ("bus master", |s| s.common.dma_allowed = false),
    ];
    for (expected, edit) in cases {
        let mut s = good.clone();
        edit(&mut s);
        let dev2 = Arc::new(Mutex::new(PatternRng::default()));
        h.sink().take();
        let err = h.restore_transport(dev2.clone(), &s).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, vmkit_virtio::Error::InvalidState(_)) && msg.contains(expected),
            "{expected}: {msg}"
        );
        assert!(dev2.lock().unwrap().active.is_none(), "{expected}");
        assert!(h.sink().take().is_empty(), "{expected}: nothing routed");
    }
    let dev2 = Arc::new(Mutex::new(PatternRng::default()));
    h.restore_transport(dev2, &good).unwrap();
}
