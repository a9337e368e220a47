//! Test data for the blk tests: every 512-byte sector written holds 64
//! little-endian words: its sector number, a per-run tag, 61 xorshift64
//! words seeded from both, and an FNV-1a-style checksum (word-wise) of the
//! first 63. A read-back tells a bad transfer (checksum), a misplaced one
//! (sector number) and a stale one (another run's tag) apart.

use crate::platform::arch::rdtsc;
use alloc::format;
use alloc::string::String;
use core::ops::Range;
use virtio_drivers::device::blk::SECTOR_SIZE;

/// Sectors per MiB.
pub const MIB_SECTORS: u64 = (1 << 20) / SECTOR_SIZE as u64;

fn words(sector: &mut [u8]) -> &mut [u64] {
    assert!(sector.len().is_multiple_of(8) && (sector.as_ptr() as usize).is_multiple_of(8));
    // SAFETY: the bytes are 8-aligned and a multiple of 8 long (asserted);
    // u64 has no invalid bit patterns; the byte slice is borrowed mutably
    // for as long as the word slice lives, so nothing else reads or writes it.
    unsafe { core::slice::from_raw_parts_mut(sector.as_mut_ptr().cast::<u64>(), sector.len() / 8) }
}

fn checksum(w: &[u64]) -> u64 {
    w.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ x).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// xorshift64.
pub fn next_random(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Fills `buf` (whole sectors) with the pattern of sectors `first..`.
pub fn fill(buf: &mut [u8], first: u64, tag: u64) {
    for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let w = words(s);
        let lba = first + i as u64;
        w[0] = lba;
        w[1] = tag;
        let mut x = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag;
        if x == 0 {
            x = 1;
        }
        for v in &mut w[2..63] {
            *v = next_random(&mut x);
        }
        w[63] = checksum(&w[..63]);
    }
}

/// Checks `buf` holds the pattern of sectors `first..`.
pub fn check(buf: &mut [u8], first: u64, tag: u64) -> Result<(), String> {
    for (i, s) in buf.chunks_exact_mut(SECTOR_SIZE).enumerate() {
        let w = words(s);
        let lba = first + i as u64;
        if checksum(&w[..63]) != w[63] {
            return Err(format!("sector {}: bad checksum", lba));
        }
        if w[0] != lba {
            return Err(format!("sector {}: holds sector {}", lba, w[0]));
        }
        if w[1] != tag {
            return Err(format!("sector {}: stale data (another run's tag)", lba));
        }
    }
    Ok(())
}

/// The first non-zero sector of `buf` (sectors `first..`), if any.
pub fn first_nonzero(buf: &mut [u8], first: u64) -> Option<u64> {
    buf.chunks_exact_mut(SECTOR_SIZE)
        .position(|s| words(s).iter().any(|&w| w != 0))
        .map(|i| first + i as u64)
}

/// A per-run tag (never 0).
pub fn new_tag() -> u64 {
    rdtsc().wrapping_mul(0x2545_f491_4f6c_dd1d) | 1
}

/// Sectors worked on in requests of `chunk` sectors, with a pattern tag.
pub struct Span {
    pub sectors: Range<u64>,
    pub chunk: u64,
    pub tag: u64,
}

impl Span {
    /// The requests: (first sector, bytes).
    pub fn requests(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.sectors
            .clone()
            .step_by(self.chunk as usize)
            .map(|lba| {
                let n = self.chunk.min(self.sectors.end - lba) as usize * SECTOR_SIZE;
                (lba, n)
            })
    }
}
