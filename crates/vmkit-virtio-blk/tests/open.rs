//! Opening and validating the image, the configuration, features and config space.

mod common;

use std::fs::File;

use common::TempImage;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vmkit_virtio::VirtioDevice;
use vmkit_virtio_blk::{Block, BlockConfig, DiskSource, EngineKind, Error};

fn open(f: impl FnOnce(&mut BlockConfig), source: impl Into<DiskSource>) -> Result<Block, Error> {
    let mut c = BlockConfig::new(source);
    f(&mut c);
    Block::new(c)
}

#[test]
fn unusable_disks_are_clear_errors() {
    let missing = TempImage::path();
    assert!(matches!(open(|_| {}, &missing.0), Err(Error::NotFound(_))));
    assert!(matches!(
        open(|_| {}, std::env::temp_dir()),
        Err(Error::IsDirectory(_))
    ));
    assert!(matches!(
        open(|c| c.read_only = true, std::env::temp_dir()),
        Err(Error::IsDirectory(_))
    ));
    assert!(matches!(open(|_| {}, "/dev/null"), Err(Error::NotAFile(_))));
    let empty = TempImage::new(0);
    assert!(matches!(open(|_| {}, &empty.0), Err(Error::Empty(_))));
    // Not a multiple of 512: refused, not rounded down.
    let odd = TempImage::new(4096 + 100);
    let e = open(|_| {}, &odd.0).err().unwrap();
    assert!(
        matches!(
            e,
            Error::SizeNotMultiple {
                size: 4196,
                block_size: 512,
                ..
            }
        ),
        "{e}"
    );
    // A multiple of 512 but not of a 4 KiB block size.
    let img = TempImage::new(4096 + 512);
    assert!(open(|_| {}, &img.0).is_ok());
    assert!(matches!(
        open(|c| c.block_size = 4096, &img.0),
        Err(Error::SizeNotMultiple {
            block_size: 4096,
            ..
        })
    ));
    // A file handed in read-only while read_only is off (root ignores file modes, so
    // this is how "not writable" is tested here).
    let img = TempImage::new(1 << 20);
    let ro = File::open(&img.0).unwrap();
    let e = open(|_| {}, ro).err().unwrap();
    assert!(matches!(e, Error::NotWritable { .. }), "{e}");
    let ro = File::open(&img.0).unwrap();
    let dev = open(|c| c.read_only = true, ro).unwrap();
    assert!(dev.read_only());
    // Messages say what is wrong.
    assert!(e.to_string().contains("not writable"));
    assert!(open(|_| {}, &missing.0)
        .err()
        .unwrap()
        .to_string()
        .contains("no such file"));
}

#[test]
fn bad_configurations() {
    let img = TempImage::new(1 << 20);
    assert!(matches!(
        open(|c| c.queues = 0, &img.0),
        Err(Error::InvalidQueues(0))
    ));
    assert!(matches!(
        open(|c| c.queues = 257, &img.0),
        Err(Error::InvalidQueues(257))
    ));
    assert!(matches!(
        open(|c| c.queue_size = 100, &img.0),
        Err(Error::InvalidQueueSize(100))
    ));
    assert!(matches!(
        open(|c| c.queue_size = 2, &img.0),
        Err(Error::InvalidQueueSize(2))
    ));
    assert!(matches!(
        open(|c| c.block_size = 1000, &img.0),
        Err(Error::InvalidBlockSize(1000))
    ));
    assert!(matches!(
        open(|c| c.block_size = 8192, &img.0),
        Err(Error::InvalidBlockSize(8192))
    ));
    assert!(matches!(
        open(|c| c.serial = "x".repeat(21), &img.0),
        Err(Error::SerialTooLong(21))
    ));
    assert!(open(|c| c.serial = "x".repeat(20), &img.0).is_ok());
}

fn bit(b: u32) -> u64 {
    1 << b
}

fn config_u32(dev: &Block, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn features_and_config_space() {
    let img = TempImage::new(3 << 20);
    for engine in [EngineKind::Sync, EngineKind::IoUring] {
        let dev = open(
            |c| {
                c.engine = engine;
                c.queues = 4;
                c.queue_size = 128;
                c.block_size = 4096;
            },
            &img.0,
        )
        .unwrap();
        assert_eq!(dev.device_type(), 2);
        assert_eq!(dev.queue_max_sizes(), &[128; 4]);
        let f = dev.device_features();
        for b in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_MQ,
        ] {
            assert_ne!(f & bit(b), 0, "feature {b}");
        }
        assert_eq!(f & bit(VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            u64::from(config_u32(&dev, 0)) | u64::from(config_u32(&dev, 4)) << 32,
            (3 << 20) / 512
        );
        assert_eq!(config_u32(&dev, 12), 126, "seg_max");
        assert_eq!(config_u32(&dev, 20), 4096, "blk_size");
        let mut nq = [0u8; 2];
        dev.read_config(34, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), 4);
        assert_eq!(config_u32(&dev, 36), vmkit_virtio_blk::MAX_DISCARD_SECTORS);
        assert_eq!(config_u32(&dev, 40), vmkit_virtio_blk::MAX_DISCARD_SEGMENTS);
        assert_eq!(config_u32(&dev, 44), 8, "discard_sector_alignment");
        let mut b = [0u8; 1];
        dev.read_config(56, &mut b);
        assert_eq!(b[0], 1, "write_zeroes_may_unmap");
        // Outside the config space: zeros left alone.
        let mut past = [0u8; 4];
        dev.read_config(60, &mut past);
        assert_eq!(past, [0; 4]);
        dev.read_config(u64::MAX, &mut past);
        assert_eq!(
            dev.device_events().unwrap().len(),
            usize::from(engine == EngineKind::IoUring)
        );
    }
    // Read-only, one queue: RO, no MQ/DISCARD/WRITE_ZEROES.
    let dev = open(|c| c.read_only = true, &img.0).unwrap();
    let f = dev.device_features();
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        f & (bit(VIRTIO_BLK_F_MQ) | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)),
        0
    );
}

#[test]
fn direct_io_opens_and_reports_its_alignment() {
    let img = TempImage::new(1 << 20);
    match open(|c| c.direct = true, &img.0) {
        Ok(dev) => {
            let a = dev.direct().unwrap();
            assert!(a.is_power_of_two() && a >= 512);
        }
        // A file system without O_DIRECT: a clear error.
        Err(e) => assert!(matches!(e, Error::DirectUnsupported { .. }), "{e}"),
    }
    assert_eq!(open(|_| {}, &img.0).unwrap().direct(), None);
}
