//! virtio-blk against virtio-drivers' `VirtIOBlk`, in-process, on both transports (the
//! vmkit-virtio MMIO harness and PCI harness) and both engines.

mod common;

use std::sync::{Arc, Mutex};

use common::{block, sectors, Pump, ReadsInFlight, TempImage, ENGINES};
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::Transport;
use virtio_drivers::Error as DriverError;
use vmkit_virtio::test_utils::{CamKind, GuestHal, Harness, PciHarness};
use vmkit_virtio_blk::{Block, EngineKind};

const DISK: u64 = 4 << 20;
const CHUNK: usize = 64 * 1024;

/// Writes a pattern over the whole disk, reads it back, checks the host file too.
fn whole_disk<T: Transport>(transport: T, dev: &Arc<Mutex<Block>>, img: &TempImage, seed: u8) {
    let mut drv = VirtIOBlk::<GuestHal, _>::new(transport).unwrap();
    assert_eq!(drv.capacity(), DISK / 512);
    assert!(!drv.readonly());
    let per = (CHUNK / SECTOR_SIZE) as u64;
    for first in (0..DISK / 512).step_by(per as usize) {
        drv.write_blocks(first as usize, &sectors(seed, first, CHUNK))
            .unwrap();
    }
    drv.flush().unwrap();
    // Read back in other sizes: 4 KiB, 128 KiB and one sector at the very end.
    let mut buf = vec![0u8; 4096];
    for first in (0..DISK / 512).step_by(8) {
        drv.read_blocks(first as usize, &mut buf).unwrap();
        assert_eq!(buf, sectors(seed, first, 4096), "sector {first}");
    }
    let mut big = vec![0u8; 128 * 1024];
    drv.read_blocks(256, &mut big).unwrap();
    assert_eq!(big, sectors(seed, 256, big.len()));
    let last = DISK / 512 - 1;
    let mut one = vec![0u8; 512];
    drv.read_blocks(last as usize, &mut one).unwrap();
    assert_eq!(one, sectors(seed, last, 512));
    // Past the end: an I/O error, the device keeps going.
    assert_eq!(
        drv.read_blocks(DISK as usize / 512, &mut one),
        Err(DriverError::IoError)
    );
    drv.read_blocks(0, &mut one).unwrap();
    // What the host sees.
    assert_eq!(
        img.read_at(0, DISK as usize),
        sectors(seed, 0, DISK as usize)
    );
    let stats = dev.lock().unwrap().stats();
    assert_eq!(stats.writes, DISK / CHUNK as u64);
    assert_eq!(stats.flushes, 1);
    assert_eq!(stats.bad_requests, 1);
    assert_eq!(stats.io_errors, 0);
}

#[test]
fn whole_disk_over_mmio() {
    for (i, engine) in ENGINES.into_iter().enumerate() {
        let img = TempImage::new(DISK);
        let dev = block(&img, engine, |_| {});
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        whole_disk(h.transport(), &dev, &img, 0x10 + i as u8);
        assert!(h.interrupts() > 0);
    }
}

/// With ring polling on, the device also suppresses and re-enables notifications around
/// each poll; the driver must still see every completion and never hang.
#[test]
fn whole_disk_with_ring_polling() {
    for (i, engine) in ENGINES.into_iter().enumerate() {
        let img = TempImage::new(DISK);
        let dev = block(&img, engine, |c| c.poll_us = 20);
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        whole_disk(h.transport(), &dev, &img, 0x30 + i as u8);
        drop(h);
        let img = TempImage::new(DISK);
        let dev = block(&img, engine, |c| c.poll_us = 20);
        let _pump = Pump::start(&dev);
        let p = PciHarness::new(dev.clone());
        whole_disk(p.transport(CamKind::Ecam), &dev, &img, 0x38 + i as u8);
    }
}

#[test]
fn whole_disk_over_pci() {
    for (i, engine) in ENGINES.into_iter().enumerate() {
        let img = TempImage::new(DISK);
        let dev = block(&img, engine, |_| {});
        let _pump = Pump::start(&dev);
        let h = PciHarness::new(dev.clone());
        whole_disk(h.transport(CamKind::Ecam), &dev, &img, 0x20 + i as u8);
    }
}

#[test]
fn whole_disk_with_o_direct() {
    for (i, engine) in ENGINES.into_iter().enumerate() {
        let img = TempImage::new(DISK);
        let mut config = vmkit_virtio_blk::BlockConfig::new(&img.0);
        config.engine = engine;
        config.direct = true;
        let dev = match Block::new(config) {
            Ok(d) => Arc::new(Mutex::new(d)),
            Err(vmkit_virtio_blk::Error::DirectUnsupported { .. }) => return,
            Err(e) => panic!("{e}"),
        };
        assert!(dev.lock().unwrap().direct().is_some());
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        whole_disk(h.transport(), &dev, &img, 0x40 + i as u8);
    }
}

fn read_only_and_serial<T: Transport>(transport: T, dev: &Arc<Mutex<Block>>) {
    let before = dev.lock().unwrap().stats().read_only_refusals;
    let mut drv = VirtIOBlk::<GuestHal, _>::new(transport).unwrap();
    assert!(drv.readonly());
    let data = vec![0xEEu8; 4096];
    assert_eq!(drv.write_blocks(0, &data), Err(DriverError::IoError));
    // Still running: reads work, the file is untouched.
    let mut buf = vec![0u8; 4096];
    drv.read_blocks(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x5Au8; 4096]);
    let mut id = [0u8; 20];
    let n = drv.device_id(&mut id).unwrap();
    assert_eq!(&id[..n], b"vmkit-serial-0001");
    assert_eq!(&id[n..], &[0u8; 3]);
    assert_eq!(dev.lock().unwrap().stats().read_only_refusals, before + 1);
}

#[test]
fn read_only_disk_and_serial_both_transports() {
    for engine in ENGINES {
        let img = TempImage::filled(1 << 20, 0x5A);
        let dev = block(&img, engine, |c| {
            c.read_only = true;
            c.serial = "vmkit-serial-0001".into();
        });
        let _pump = Pump::start(&dev);
        {
            let h = Harness::new(dev.clone());
            read_only_and_serial(h.transport(), &dev);
        }
        {
            let h = PciHarness::new(dev.clone());
            read_only_and_serial(h.transport(CamKind::Ports), &dev);
        }
        assert_eq!(img.read_at(0, 4096), vec![0x5Au8; 4096]);
    }
}

#[test]
fn many_requests_in_flight_with_the_non_blocking_api() {
    for engine in ENGINES {
        let img = TempImage::new(DISK);
        let dev = block(&img, engine, |_| {});
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
        let seed = 0x33;
        for first in (0..1024u64).step_by(128) {
            drv.write_blocks(first as usize, &sectors(seed, first, 64 * 1024))
                .unwrap();
        }
        const N: usize = 12;
        let mut reqs: Vec<BlkReq> = (0..N).map(|_| BlkReq::default()).collect();
        let mut resps: Vec<BlkResp> = (0..N).map(|_| BlkResp::default()).collect();
        let mut bufs: Vec<Vec<u8>> = (0..N).map(|_| vec![0u8; 8192]).collect();
        let mut tokens = Vec::new();
        for i in 0..N {
            // SAFETY: the request, buffer and response live until completion below and
            // are not touched before.
            let t =
                unsafe { drv.read_blocks_nb(i * 16, &mut reqs[i], &mut bufs[i], &mut resps[i]) }
                    .unwrap();
            tokens.push(t);
        }
        let mut done = [false; N];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.iter().any(|d| !d) {
            assert!(
                std::time::Instant::now() < deadline,
                "{engine:?}: requests never completed"
            );
            let Some(t) = drv.peek_used() else {
                std::thread::yield_now();
                continue;
            };
            let i = tokens.iter().position(|x| *x == t).unwrap();
            // SAFETY: the same buffers as given to read_blocks_nb.
            unsafe { drv.complete_read_blocks(t, &reqs[i], &mut bufs[i], &mut resps[i]) }.unwrap();
            assert_eq!(resps[i].status(), RespStatus::OK);
            assert_eq!(bufs[i], sectors(seed, i as u64 * 16, 8192));
            done[i] = true;
        }
        let stats = dev.lock().unwrap().stats();
        assert_eq!(stats.reads, N as u64);
        if engine == EngineKind::IoUring {
            assert!(stats.max_in_flight >= 1);
        }
    }
}

#[test]
fn reset_and_reuse_with_io_in_flight_state() {
    for engine in ENGINES {
        let img = TempImage::new(DISK);
        let dev = block(&img, engine, |c| c.queues = 2);
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        for round in 0..3u8 {
            let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
            drv.write_blocks(8, &sectors(round, 8, 4096)).unwrap();
            let mut buf = vec![0u8; 4096];
            drv.read_blocks(8, &mut buf).unwrap();
            assert_eq!(buf, sectors(round, 8, 4096));
            assert!(dev.lock().unwrap().is_active());
            drop(drv);
            assert!(!dev.lock().unwrap().is_active());
            assert_eq!(dev.lock().unwrap().in_flight(), 0);
        }
    }
}

#[test]
fn quiesce_completes_what_is_in_flight_into_the_used_ring() {
    // No pump: completions reach the used ring only if quiesce waits for them.
    let img = TempImage::filled(DISK, 0x6B);
    let dev = block(&img, EngineKind::IoUring, |c| {
        c.poll_us = 0;
        c.direct = true;
    });
    let h = Harness::new(dev.clone());
    let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
    let reads = ReadsInFlight::submit(&mut drv, 8);
    // O_DIRECT reads go to the disk: they are still in flight here (inline completions
    // from the page cache would leave nothing to quiesce).
    assert!(dev.lock().unwrap().in_flight() > 0);
    vmkit_virtio::VirtioDevice::quiesce(&mut *dev.lock().unwrap());
    assert_eq!(dev.lock().unwrap().in_flight(), 0);
    reads.complete_all(&mut drv, 0x6B);
}
