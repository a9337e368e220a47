//! Seed inputs, generated (never committed as blobs): deterministic pseudo-random byte
//! strings of several lengths. The input types are built so that most byte strings decode
//! to well-formed driver sequences and requests, so these reach the devices' data paths;
//! each target's tests check that its seeds do.
//!
//! `cargo run -p vmkit-fuzz-common --example write-seeds` writes them to
//! `fuzz/corpus/<target>/`.

/// A small xorshift generator: the same seeds on every machine.
#[derive(Debug, Clone)]
pub struct Prng(u64);

impl Prng {
    /// Seeded with `seed` (any value; 0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// The seeds for `target`: 32 byte strings from 16 bytes to 8 KiB.
pub fn for_target(target: &str) -> Vec<Vec<u8>> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    let mut p = Prng::new(h);
    (0..32).map(|i| p.bytes(16usize << (i % 10))).collect()
}
