//! `Block::replace_disk`: swapping the image under a running device (Firecracker's
//! `PATCH /drives/{id}` with a new `path_on_host`), against virtio-drivers' `VirtIOBlk`.

mod common;

use std::fs::File;
use std::sync::{Arc, Mutex};

use common::{block, sectors, Pump, ReadsInFlight, TempImage, ENGINES};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::transport::{InterruptStatus, Transport};
use virtio_drivers::Error as DriverError;
use vmkit_virtio::test_utils::{CamKind, GuestHal, Harness, PciHarness};
use vmkit_virtio::{regs, VirtioDevice, CONFIG_SPACE_OFFSET};
use vmkit_virtio_blk::{Block, BlockConfig, DiskSource, EngineKind, Error};

/// Image A: 4 MiB of pattern `A`.
const A_SIZE: u64 = 4 << 20;
const A: u8 = 0xA0;
/// Image B: 1 MiB + 512 bytes of pattern `B` (a size that is no power of two).
const B_SIZE: u64 = (1 << 20) + 512;
const B: u8 = 0xB0;

/// The capacity in the device's configuration space, as the driver would read it.
fn config_capacity(dev: &Arc<Mutex<Block>>) -> u64 {
    let mut c = [0u8; 8];
    dev.lock().unwrap().read_config(0, &mut c);
    u64::from_le_bytes(c)
}

/// Whether a configuration change interrupt is pending (and acknowledges what is).
fn config_changed<T: Transport>(drv: &mut VirtIOBlk<GuestHal, T>) -> bool {
    drv.ack_interrupt()
        .contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT)
}

/// What a failed swap must answer.
type Expected = fn(&Error) -> bool;

/// A driver reads A, the device swaps to B, the driver is told and sees B only; its writes
/// land in B. `transport` makes a new transport for the same device each call.
fn swap_while_running<T: Transport>(transport: impl Fn() -> T, dev: &Arc<Mutex<Block>>) {
    let a = TempImage::patterned(A_SIZE, A);
    let b = TempImage::patterned(B_SIZE, B);
    dev.lock().unwrap().replace_disk(&a.0).unwrap(); // before activation: no driver yet
    let mut drv = VirtIOBlk::<GuestHal, _>::new(transport()).unwrap();
    assert_eq!(drv.capacity(), A_SIZE / 512);
    let mut buf = vec![0u8; 4096];
    drv.read_blocks(8, &mut buf).unwrap();
    assert_eq!(buf, sectors(A, 8, 4096));
    let last_b = B_SIZE / 512 - 1;
    drv.read_blocks(B_SIZE as usize / 512, &mut buf).unwrap(); // inside A
    assert!(!config_changed(&mut drv));

    dev.lock().unwrap().replace_disk(&b.0).unwrap();

    assert!(
        config_changed(&mut drv),
        "no configuration change interrupt"
    );
    assert_eq!(config_capacity(dev), B_SIZE / 512);
    assert_eq!(dev.lock().unwrap().capacity(), B_SIZE / 512);
    drv.read_blocks(8, &mut buf).unwrap();
    assert_eq!(buf, sectors(B, 8, 4096));
    let mut one = vec![0u8; 512];
    drv.read_blocks(last_b as usize, &mut one).unwrap();
    assert_eq!(one, sectors(B, last_b, 512));
    // Past B's end (though inside A): the out-of-range status, the device keeps going.
    assert_eq!(
        drv.read_blocks(B_SIZE as usize / 512, &mut one),
        Err(DriverError::IoError)
    );
    assert_eq!(
        drv.read_blocks(last_b as usize, &mut buf),
        Err(DriverError::IoError)
    );
    // Writes land in B, not in A.
    let data = sectors(0xC0, 16, 8192);
    drv.write_blocks(16, &data).unwrap();
    drv.flush().unwrap();
    assert_eq!(b.read_at(16 * 512, 8192), data);
    assert_eq!(a.read_at(16 * 512, 8192), sectors(A, 16, 8192));
    assert_eq!(
        a.read_at(0, A_SIZE as usize),
        sectors(A, 0, A_SIZE as usize)
    );
    // The serial stayed.
    let mut id = [0u8; 20];
    let n = drv.device_id(&mut id).unwrap();
    assert_eq!(&id[..n], b"swap-serial");
    // A driver probing afresh sees B.
    drop(drv);
    let mut drv = VirtIOBlk::<GuestHal, _>::new(transport()).unwrap();
    assert_eq!(drv.capacity(), B_SIZE / 512);
    drv.read_blocks(16, &mut buf).unwrap();
    assert_eq!(&buf[..], &data[..4096]);
}

#[test]
fn swap_while_running_over_mmio() {
    for engine in ENGINES {
        let first = TempImage::new(1 << 20);
        let dev = block(&first, engine, |c| c.serial = "swap-serial".into());
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        swap_while_running(|| h.transport(), &dev);
        // The driver's register reads B's capacity.
        let low = h.read32(CONFIG_SPACE_OFFSET);
        let high = h.read32(CONFIG_SPACE_OFFSET + 4);
        assert_eq!(u64::from(low) | (u64::from(high) << 32), B_SIZE / 512);
    }
}

#[test]
fn swap_while_running_over_pci() {
    for engine in ENGINES {
        let first = TempImage::new(1 << 20);
        let dev = block(&first, engine, |c| c.serial = "swap-serial".into());
        let _pump = Pump::start(&dev);
        let p = PciHarness::new(dev.clone());
        swap_while_running(|| p.transport(CamKind::Ecam), &dev);
    }
}

#[test]
fn swap_with_o_direct_keeps_o_direct() {
    for engine in ENGINES {
        let first = TempImage::new(1 << 20);
        let mut config = BlockConfig::new(&first.0);
        config.engine = engine;
        config.direct = true;
        config.serial = "swap-serial".into();
        let dev = match Block::new(config) {
            Ok(d) => Arc::new(Mutex::new(d)),
            Err(Error::DirectUnsupported { .. }) => return,
            Err(e) => panic!("{e}"),
        };
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        swap_while_running(|| h.transport(), &dev);
        assert!(dev.lock().unwrap().direct().is_some());
    }
}

#[test]
fn a_swap_before_activation_interrupts_nobody() {
    for engine in ENGINES {
        let a = TempImage::patterned(A_SIZE, A);
        let b = TempImage::patterned(B_SIZE, B);
        let dev = block(&a, engine, |_| {});
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        dev.lock().unwrap().replace_disk(&b.0).unwrap();
        assert_eq!(h.interrupts(), 0);
        assert_eq!(h.read32(regs::INTERRUPT_STATUS), 0);
        let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
        assert_eq!(drv.capacity(), B_SIZE / 512);
        let mut buf = vec![0u8; 4096];
        drv.read_blocks(0, &mut buf).unwrap();
        assert_eq!(buf, sectors(B, 0, 4096));
    }
}

#[test]
fn failed_swaps_leave_the_old_image_served() {
    for engine in ENGINES {
        let a = TempImage::patterned(A_SIZE, A);
        let dev = block(&a, engine, |_| {});
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
        let mut buf = vec![0u8; 4096];
        drv.read_blocks(0, &mut buf).unwrap();
        drv.ack_interrupt();
        let generation = h.read32(regs::CONFIG_GENERATION);

        let missing = TempImage::path();
        let odd = TempImage::new(1000);
        let empty = TempImage::new(0);
        let read_only_file = File::open(&a.0).unwrap(); // the device is writable
        let failures: Vec<(DiskSource, Expected)> = vec![
            ((&missing.0).into(), |e| matches!(e, Error::NotFound(_))),
            (std::env::temp_dir().into(), |e| {
                matches!(e, Error::IsDirectory(_))
            }),
            ((&odd.0).into(), |e| {
                matches!(
                    e,
                    Error::SizeNotMultiple {
                        size: 1000,
                        block_size: 512,
                        ..
                    }
                )
            }),
            ((&empty.0).into(), |e| matches!(e, Error::Empty(_))),
            ("/dev/null".into(), |e| matches!(e, Error::NotAFile(_))),
            (read_only_file.into(), |e| {
                matches!(e, Error::NotWritable { .. })
            }),
        ];
        for (i, (source, expected)) in failures.into_iter().enumerate() {
            let e = dev.lock().unwrap().replace_disk(source).unwrap_err();
            assert!(expected(&e), "{engine:?} failure {i}: {e}");
            // Nothing changed: no interrupt, A's capacity, A's data, writes into A.
            assert!(!config_changed(&mut drv));
            assert_eq!(h.read32(regs::CONFIG_GENERATION), generation);
            assert_eq!(dev.lock().unwrap().capacity(), A_SIZE / 512);
            assert_eq!(config_capacity(&dev), A_SIZE / 512);
            let sector = 64 * (i as u64 + 1);
            drv.read_blocks(sector as usize, &mut buf).unwrap();
            assert_eq!(buf, sectors(A, sector, 4096), "{engine:?} failure {i}");
            let data = sectors(0xD0 + i as u8, sector, 4096);
            drv.write_blocks(sector as usize, &data).unwrap();
            drv.flush().unwrap();
            assert_eq!(a.read_at(sector * 512, 4096), data);
        }
        // Still a working device that can swap.
        let b = TempImage::patterned(B_SIZE, B);
        dev.lock().unwrap().replace_disk(&b.0).unwrap();
        assert!(config_changed(&mut drv));
        drv.read_blocks(0, &mut buf).unwrap();
        assert_eq!(buf, sectors(B, 0, 4096));
    }
}

#[test]
fn a_read_only_device_swaps_to_a_read_only_image() {
    for engine in ENGINES {
        let a = TempImage::patterned(A_SIZE, A);
        let b = TempImage::patterned(B_SIZE, B);
        let dev = block(&a, engine, |c| c.read_only = true);
        let _pump = Pump::start(&dev);
        let h = Harness::new(dev.clone());
        let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
        // A read-only file is fine for a read-only device.
        let file = File::open(&b.0).unwrap();
        dev.lock().unwrap().replace_disk(file).unwrap();
        assert!(dev.lock().unwrap().read_only());
        let mut buf = vec![0u8; 4096];
        drv.read_blocks(0, &mut buf).unwrap();
        assert_eq!(buf, sectors(B, 0, 4096));
        assert_eq!(
            drv.write_blocks(0, &sectors(0xE0, 0, 4096)),
            Err(DriverError::IoError)
        );
        assert_eq!(b.read_at(0, 4096), sectors(B, 0, 4096));
    }
}

#[test]
fn a_swap_completes_reads_in_flight_from_the_old_image_first() {
    // No pump while the reads are in flight: they reach the used ring only if the swap
    // waits for them, and with the old image's data only if they were served from it.
    let a = TempImage::filled(A_SIZE, 0x6B);
    let b = TempImage::filled(B_SIZE, 0x7C);
    let dev = block(&a, EngineKind::IoUring, |c| c.direct = true);
    let h = Harness::new(dev.clone());
    let mut drv = VirtIOBlk::<GuestHal, _>::new(h.transport()).unwrap();
    let reads = ReadsInFlight::submit(&mut drv, 8);
    // O_DIRECT reads go to the disk: they are still in flight here.
    assert!(dev.lock().unwrap().in_flight() > 0);
    let generation = h.read32(regs::CONFIG_GENERATION);
    dev.lock().unwrap().replace_disk(&b.0).unwrap();
    assert_eq!(dev.lock().unwrap().in_flight(), 0);
    // One configuration change: the generation moved by one.
    assert_eq!(h.read32(regs::CONFIG_GENERATION), generation + 1);
    // Every read completed by the swap, served from A.
    reads.complete_all(&mut drv, 0x6B);
    assert!(config_changed(&mut drv));
    // Later reads come from B.
    let _pump = Pump::start(&dev);
    let mut buf = vec![0u8; 4096];
    drv.read_blocks(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x7Cu8; 4096]);
}
