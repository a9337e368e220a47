//! Each engine against a temporary image file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::disk::{Disk, DiskOptions};
use crate::request::Segment;
use crate::DiskSource;

const SIZE: u64 = 1 << 20;

/// A file in the temporary directory, removed on drop.
struct TempImage(PathBuf);

impl TempImage {
    fn new(size: u64) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "vmkit-blk-engine-{}-{}.img",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let mut f = File::create(&path).unwrap();
        // Allocated, non-zero data, so holes show.
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8 | 1).collect();
        for _ in 0..size / chunk.len() as u64 {
            f.write_all(&chunk).unwrap();
        }
        f.sync_all().unwrap();
        Self(path)
    }

    fn read_at(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut f = File::open(&self.0).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        buf
    }

    fn blocks(&self) -> u64 {
        std::fs::metadata(&self.0).unwrap().blocks()
    }

    /// Whether `offset` lies in a hole (SEEK_HOLE from it finds it at once).
    fn is_hole(&self, offset: u64) -> bool {
        let f = File::open(&self.0).unwrap();
        // SAFETY: lseek on a descriptor we own; no memory is involved.
        let at = unsafe { libc::lseek(f.as_raw_fd(), offset as libc::off_t, libc::SEEK_HOLE) };
        at == offset as libc::off_t
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn disk(img: &TempImage, direct: bool) -> Arc<Disk> {
    Arc::new(
        Disk::open(
            DiskSource::Path(img.0.clone()),
            DiskOptions {
                read_only: false,
                direct,
                block_size: 512,
                lock: true,
            },
        )
        .unwrap(),
    )
}

/// Guest memory of two adjacent regions (so a buffer can cross from one into the other).
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x8_0000),
        (GuestAddress(0x8_0000), 0x8_0000),
    ])
    .unwrap()
}

fn engines(img: &TempImage, direct: bool) -> Vec<Box<dyn BlockEngine>> {
    // One disk for both: it holds the image's (exclusive) lock.
    let d = disk(img, direct);
    vec![
        Box::new(SyncEngine::new(d.clone())),
        Box::new(IoUringEngine::new(d, 64).unwrap()),
    ]
}

/// Submits `op` and waits for its completion, whatever the engine.
fn run(engine: &mut dyn BlockEngine, op: BlockOp) -> io::Result<()> {
    if let Some(r) = engine.submit(op, 7) {
        return r;
    }
    engine.commit().unwrap();
    let mut out = Vec::new();
    wait_for(engine, &mut out, 1);
    assert_eq!(out[0].token, 7);
    out.pop().unwrap().result
}

fn wait_for(engine: &mut dyn BlockEngine, out: &mut Vec<Completion>, n: usize) {
    loop {
        engine.reap(out);
        if out.len() >= n {
            return;
        }
        let fd = engine
            .completion_fd()
            .expect("in flight without a completion fd");
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, 5000) };
        assert!(r > 0, "no completion within 5 s");
        let _ = fd.read();
    }
}

fn seg(addr: u64, len: u32) -> Segment {
    Segment {
        addr: GuestAddress(addr),
        len,
    }
}

#[test]
fn write_read_flush_both_engines() {
    for direct in [false, true] {
        let img = TempImage::new(SIZE);
        for (i, mut e) in engines(&img, direct).into_iter().enumerate() {
            let mem = memory();
            e.attach(mem.clone());
            // 8 KiB from three buffers, one of them crossing the region boundary and one
            // not 512-aligned in guest memory (O_DIRECT falls back to the page cache).
            let pattern: Vec<u8> = (0..8192u32)
                .map(|x| (x * 7 + i as u32 * 13) as u8)
                .collect();
            let data = vec![
                seg(0x7_F000, 0x2000),
                seg(0x1_0000, 0x1000),
                seg(0x2_0003, 0x1000),
            ];
            mem.write_slice(&pattern[..0x2000], GuestAddress(0x7_F000))
                .unwrap();
            mem.write_slice(&pattern[..0x1000], GuestAddress(0x1_0000))
                .unwrap();
            mem.write_slice(&pattern[..0x1000], GuestAddress(0x2_0003))
                .unwrap();
            let offset = 0x4_0000 + i as u64 * 0x1_0000;
            run(
                e.as_mut(),
                BlockOp::Write {
                    offset,
                    data,
                    sync: i == 1,
                },
            )
            .unwrap();
            let mut expect = pattern[..0x2000].to_vec();
            expect.extend_from_slice(&pattern[..0x1000]);
            expect.extend_from_slice(&pattern[..0x1000]);
            assert_eq!(
                img.read_at(offset, 0x4000),
                expect,
                "engine {i} direct {direct}"
            );
            run(e.as_mut(), BlockOp::Flush).unwrap();
            // Read back elsewhere, page-aligned (O_DIRECT path when direct).
            let data = vec![seg(0x3_0000, 0x3000), seg(0x7_E000, 0x1000)];
            run(e.as_mut(), BlockOp::Read { offset, data }).unwrap();
            let mut got = vec![0u8; 0x3000];
            mem.read_slice(&mut got, GuestAddress(0x3_0000)).unwrap();
            assert_eq!(got, expect[..0x3000]);
            let mut got = vec![0u8; 0x1000];
            mem.read_slice(&mut got, GuestAddress(0x7_E000)).unwrap();
            assert_eq!(got, expect[0x3000..]);
            e.detach();
        }
    }
}

#[test]
fn discard_and_write_zeroes_both_engines() {
    for (i, kind) in ["sync", "io_uring"].iter().enumerate() {
        let img = TempImage::new(SIZE);
        let mut e = engines(&img, false).remove(i);
        e.attach(memory());
        let before = img.blocks();
        // DISCARD punches a hole the host sees.
        run(
            e.as_mut(),
            BlockOp::Discard {
                ranges: vec![(0x4_0000, 0x4_0000)],
            },
        )
        .unwrap();
        assert!(img.is_hole(0x4_0000), "{kind}: no hole after discard");
        assert!(img.blocks() < before, "{kind}: st_blocks did not shrink");
        assert_eq!(img.read_at(0x4_0000, 0x4_0000), vec![0u8; 0x4_0000]);
        assert_ne!(
            img.read_at(0x8_0000, 16),
            vec![0u8; 16],
            "{kind}: discarded too much"
        );
        // WRITE_ZEROES without unmap: zeros, still allocated.
        run(
            e.as_mut(),
            BlockOp::WriteZeroes {
                ranges: vec![(0x1_0000, 0x1_0000, false)],
                sync: true,
            },
        )
        .unwrap();
        assert_eq!(img.read_at(0x1_0000, 0x1_0000), vec![0u8; 0x1_0000]);
        assert_ne!(img.read_at(0x2_0000, 16), vec![0u8; 16]);
        // With unmap: a hole.
        run(
            e.as_mut(),
            BlockOp::WriteZeroes {
                ranges: vec![(0xC_0000, 0x2_0000, true)],
                sync: false,
            },
        )
        .unwrap();
        assert!(
            img.is_hole(0xC_0000),
            "{kind}: no hole after write zeroes with unmap"
        );
        assert_eq!(img.read_at(0xC_0000, 0x2_0000), vec![0u8; 0x2_0000]);
    }
}

#[test]
fn many_in_flight_on_io_uring() {
    let img = TempImage::new(SIZE);
    let mut e = IoUringEngine::new(disk(&img, false), 64).unwrap();
    let mem = memory();
    e.attach(mem.clone());
    // 64 reads of 4 KiB, one commit.
    for t in 0..64u64 {
        let data = vec![seg(0x1000 * t, 0x1000)];
        assert!(e.can_submit());
        assert!(e
            .submit(
                BlockOp::Read {
                    offset: 0x1000 * t,
                    data
                },
                t
            )
            .is_none());
    }
    assert_eq!(e.in_flight(), 64);
    assert!(!e.can_submit(), "64 in flight fill a 64-entry engine");
    e.commit().unwrap();
    let mut out = Vec::new();
    wait_for(&mut e, &mut out, 64);
    assert_eq!(e.in_flight(), 0);
    let mut tokens: Vec<u64> = out.iter().map(|c| c.token).collect();
    tokens.sort_unstable();
    assert_eq!(tokens, (0..64).collect::<Vec<_>>());
    assert!(out.iter().all(|c| c.result.is_ok()));
    let mut got = vec![0u8; 0x4_0000];
    mem.read_slice(&mut got, GuestAddress(0)).unwrap();
    assert_eq!(got, img.read_at(0, 0x4_0000));
}

#[test]
fn image_shrinking_under_us_is_an_error_not_a_hang() {
    for i in 0..2 {
        let img = TempImage::new(SIZE);
        let mut e = engines(&img, false).remove(i);
        e.attach(memory());
        OpenOptions::new()
            .write(true)
            .open(&img.0)
            .unwrap()
            .set_len(SIZE / 2)
            .unwrap();
        let data = vec![seg(0x1000, 0x1000)];
        let r = run(
            e.as_mut(),
            BlockOp::Read {
                offset: SIZE - 0x1000,
                data,
            },
        );
        assert_eq!(
            r.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof,
            "engine {i}"
        );
    }
}

#[test]
fn detached_engines_refuse() {
    let img = TempImage::new(SIZE);
    for mut e in engines(&img, false) {
        let r = e.submit(
            BlockOp::Read {
                offset: 0,
                data: vec![seg(0, 512)],
            },
            1,
        );
        assert!(matches!(r, Some(Err(_))));
    }
}

#[test]
fn replace_disk_moves_later_operations_to_the_new_image() {
    for i in 0..2 {
        let old = TempImage::new(SIZE);
        let new = TempImage::new(SIZE / 2);
        let mut e = engines(&old, false).remove(i);
        let mem = memory();
        e.attach(mem.clone());
        e.replace_disk(disk(&new, false)).unwrap();
        let pattern = vec![0xC3u8; 0x1000];
        mem.write_slice(&pattern, GuestAddress(0x2000)).unwrap();
        let data = vec![seg(0x2000, 0x1000)];
        let write = BlockOp::Write {
            offset: 0x3000,
            data,
            sync: true,
        };
        run(e.as_mut(), write).unwrap();
        assert_eq!(new.read_at(0x3000, 0x1000), pattern, "engine {i}");
        assert_ne!(old.read_at(0x3000, 0x1000), pattern, "engine {i}");
        // The new image is half the size: its end is the end of file now.
        let data = vec![seg(0x2000, 0x1000)];
        let r = run(
            e.as_mut(),
            BlockOp::Read {
                offset: SIZE - 0x1000,
                data,
            },
        );
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}

#[test]
fn io_uring_refuses_to_replace_the_disk_under_operations_in_flight() {
    let old = TempImage::new(SIZE);
    let new = TempImage::new(SIZE);
    let mut e = IoUringEngine::new(disk(&old, false), 64).unwrap();
    e.attach(memory());
    let data = vec![seg(0x1000, 0x1000)];
    assert!(e.submit(BlockOp::Read { offset: 0, data }, 5).is_none());
    let err = e.replace_disk(disk(&new, false)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
    e.commit().unwrap();
    let mut out = Vec::new();
    wait_for(&mut e, &mut out, 1);
    assert!(out[0].result.is_ok());
    e.replace_disk(disk(&new, false)).unwrap();
}

#[test]
fn io_uring_detach_returns_at_once_and_drops_the_orphans() {
    let img = TempImage::new(SIZE);
    let mut e = IoUringEngine::new(disk(&img, false), 64).unwrap();
    let mem = memory();
    e.attach(mem.clone());
    for t in 0..16u64 {
        let data = vec![seg(0x1000 * t, 0x1000)];
        assert!(e.submit(BlockOp::Read { offset: 0, data }, t).is_none());
    }
    e.commit().unwrap();
    // Whatever the kernel did with them meanwhile, none was reaped: all 16 are orphaned,
    // each with a cancellation after it, and detach did not wait for them.
    e.detach();
    assert_eq!(e.in_flight(), 16);
    assert!(e.cancelling() >= 16);
    assert!(
        !e.can_submit(),
        "no new operation while cancellations are out"
    );
    // Reaping drops them: no completion is reported.
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while e.cancelling() > 0 {
        assert!(std::time::Instant::now() < deadline, "orphans never reaped");
        e.reap(&mut out);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(out.is_empty(), "orphans reported: {out:?}");
    assert_eq!(e.in_flight(), 0);
    // Attached again, it serves new operations (token 7 is the new one's).
    e.attach(mem);
    assert!(e.can_submit());
    run(
        &mut e,
        BlockOp::Read {
            offset: 0,
            data: vec![seg(0, 512)],
        },
    )
    .unwrap();
}
