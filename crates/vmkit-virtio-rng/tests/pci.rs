//! virtio-rng on virtio-pci, driven by virtio-drivers' `VirtIORng` through vmkit-virtio's
//! PCI harness (enumerated with virtio-drivers' `PciRoot` over our ECAM and port handlers).

use std::sync::{Arc, Mutex};

use virtio_drivers::device::rng::VirtIORng;
use vmkit_virtio::test_utils::{CamKind, GuestHal, PciHarness};
use vmkit_virtio_rng::{Rng, RngConfig};

fn rng(limit: u32) -> Arc<Mutex<Rng>> {
    Arc::new(Mutex::new(
        Rng::new(RngConfig {
            max_bytes_per_chain: limit,
        })
        .unwrap(),
    ))
}

#[test]
fn one_mib_over_pci() {
    let dev = rng(64 * 1024);
    let h = PciHarness::new(dev.clone());
    let mut driver = VirtIORng::<GuestHal, _>::new(h.transport(CamKind::Ecam)).unwrap();
    assert_eq!(h.device().status(), 0xF);

    let mut data = vec![0u8; 1 << 20];
    let mut requests = 0u64;
    let mut at = 0;
    for size in [4096usize, 1, 333, 65536, 8191].iter().cycle() {
        if at == data.len() {
            break;
        }
        let end = (at + size).min(data.len());
        let n = driver.request_entropy(&mut data[at..end]).unwrap();
        assert_eq!(n, end - at, "used length of a {}-byte request", end - at);
        at = end;
        requests += 1;
    }
    let mut seen = [0u32; 256];
    for b in &data {
        seen[usize::from(*b)] += 1;
    }
    let mean = (1u32 << 20) / 256;
    assert!(
        seen.iter().all(|c| *c > mean / 2 && *c < mean * 2),
        "distribution"
    );
    let pages: std::collections::HashSet<&[u8]> = data.chunks(4096).collect();
    assert_eq!(pages.len(), 256, "no two pages equal");
    let stats = dev.lock().unwrap().stats();
    assert_eq!(stats.requests, requests);
    assert_eq!(stats.bytes, 1 << 20);
    // MSI-X is not enabled by virtio-drivers: each request raised INTx (and the ISR).
    assert_eq!(h.intx_interrupts(), requests);
}

#[test]
fn reset_and_use_again_over_pci() {
    let dev = rng(64 * 1024);
    let h = PciHarness::new(dev.clone());
    for kind in [CamKind::Ports, CamKind::Ecam, CamKind::Ports] {
        let mut driver = VirtIORng::<GuestHal, _>::new(h.transport(kind)).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(driver.request_entropy(&mut buf).unwrap(), 64);
        assert!(dev.lock().unwrap().is_active());
        drop(driver);
        assert!(!dev.lock().unwrap().is_active());
    }
}
