//! virtio-net against virtio-drivers' `VirtIONet` (through vmkit-virtio's harnesses), on
//! virtio-mmio and virtio-pci, with a socket standing in for the TAP.

mod common;

use std::sync::{Arc, Mutex};

use common::{frame, socket_backend, with_header};
use virtio_drivers::device::net::VirtIONet;
use virtio_drivers::transport::Transport;
use vmkit_virtio::test_utils::{CamKind, GuestHal, Harness, PciHarness};
use vmkit_virtio::QueueEventHandler;
use vmkit_virtio_net::{Net, NetConfig, Offloads, NET_HDR_LEN};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BUF_LEN: usize = 2048;

fn net() -> (Arc<Mutex<Net>>, std::os::unix::net::UnixDatagram) {
    let (backend, host) = socket_backend(Offloads::default());
    let mut config = NetConfig::new(vec![Box::new(backend)]);
    config.mac = Some(MAC);
    config.mtu = Some(1500);
    (Arc::new(Mutex::new(Net::new(config).unwrap())), host)
}

/// Sends frames both ways through `driver`: what the guest sends arrives at the host with
/// a header of zeros, what the host sends arrives at the guest intact, more frames than the
/// queues hold, of many sizes.
fn both_ways<T: Transport>(
    driver: &mut VirtIONet<GuestHal, T, 16>,
    handler: &mut QueueEventHandler,
    host: &std::os::unix::net::UnixDatagram,
) {
    assert_eq!(driver.mac_address(), MAC);
    let mut got = vec![0u8; 70000];
    for i in 0..100 {
        let f = frame([0xff; 6], 60 + (i * 37) % 1454, i);
        let mut tx = driver.new_tx_buffer(f.len());
        tx.packet_mut().copy_from_slice(&f);
        driver.send(tx).unwrap();
        let n = host.recv(&mut got).unwrap();
        assert_eq!(
            &got[..NET_HDR_LEN],
            &[0u8; NET_HDR_LEN],
            "header of frame {i}"
        );
        assert!(got[NET_HDR_LEN..n] == f[..], "frame {i} differs");
    }
    for i in 0..100 {
        let f = frame(MAC, 60 + (i * 53) % 1454, i);
        host.send(&with_header(&f)).unwrap();
        let mut rx = None;
        for _ in 0..3 {
            handler.poll();
            if let Ok(b) = driver.receive() {
                rx = Some(b);
                break;
            }
        }
        let rx = rx.unwrap_or_else(|| panic!("frame {i} not received"));
        assert!(rx.packet() == &f[..], "frame {i} differs");
        driver.recycle_rx_buffer(rx).unwrap();
    }
}

#[test]
fn frames_both_ways_over_mmio() {
    let (dev, host) = net();
    let h = Harness::new(dev.clone());
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut driver = VirtIONet::<GuestHal, _, 16>::new(h.transport(), BUF_LEN).unwrap();
    both_ways(&mut driver, &mut handler, &host);
    let s = dev.lock().unwrap().stats();
    assert_eq!((s.tx_frames, s.rx_frames), (100, 100));
    assert_eq!(s.rx_buffers, 100, "one chain per frame without MRG_RXBUF");
    assert_eq!(s.tx_malformed + s.tx_bad_header + s.rx_bad_chains, 0);
}

#[test]
fn frames_both_ways_over_pci() {
    let (dev, host) = net();
    let h = PciHarness::new(dev.clone());
    let mut handler = h.device().queue_event_handler().unwrap();
    let mut driver =
        VirtIONet::<GuestHal, _, 16>::new(h.transport(CamKind::Ecam), BUF_LEN).unwrap();
    both_ways(&mut driver, &mut handler, &host);
    assert_eq!(dev.lock().unwrap().stats().rx_frames, 100);
}

#[test]
fn frames_wait_in_the_backend_until_the_driver_is_ready() {
    let (dev, host) = net();
    let f = frame(MAC, 100, 1);
    host.send(&with_header(&f)).unwrap();
    let h = Harness::new(dev.clone());
    let mut driver = VirtIONet::<GuestHal, _, 16>::new(h.transport(), BUF_LEN).unwrap();
    // Delivered at activation or at the first buffers' notification, without an event.
    let rx = driver.receive().expect("the early frame");
    assert!(rx.packet() == &f[..]);
}

#[test]
fn the_config_space_says_mac_link_pairs_and_mtu() {
    let (dev, _host) = net();
    let h = Harness::new(dev);
    // 0x100: the config space: mac, status (LINK_UP), max_virtqueue_pairs, mtu.
    let w0 = h.read32(0x100).to_le_bytes();
    let w1 = h.read32(0x104).to_le_bytes();
    let w2 = h.read32(0x108).to_le_bytes();
    assert_eq!([w0[0], w0[1], w0[2], w0[3], w1[0], w1[1]], MAC);
    assert_eq!(u16::from_le_bytes([w1[2], w1[3]]), 1);
    assert_eq!(u16::from_le_bytes([w2[0], w2[1]]), 1);
    assert_eq!(u16::from_le_bytes([w2[2], w2[3]]), 1500);
}
