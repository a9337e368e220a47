//! The byte streams of `test=virtio-net` and their checksum.
//!
//! Each stream is xorshift64 (shifts 13, 7, 17) from a fixed seed: the
//! state after step k+1, little-endian, gives bytes 8k..8k+8. The guest
//! sends `GUEST_SEED`'s stream and expects `HOST_SEED`'s back; a host peer
//! generates the same (the integration test in `examples/vmkit-vmm/tests/
//! net.rs` and the Python listener in the README do). Both ends also print
//! or compare FNV-1a 64 of the bytes that went over the wire.

/// Seed of the stream the guest sends.
pub const GUEST_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Seed of the stream the host sends back.
pub const HOST_SEED: u64 = 0xd1b5_4a32_d192_ed03;

/// A position in one stream.
pub struct Pattern {
    state: u64,
    /// The current word and how many of its bytes were used (8: none left).
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state = x;
        x.to_le_bytes()
    }

    /// The next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let head = (8 - self.used).min(out.len());
        out[..head].copy_from_slice(&self.word[self.used..self.used + head]);
        self.used += head;
        let mut words = out[head..].chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            tail.copy_from_slice(&self.word[..tail.len()]);
            self.used = tail.len();
        }
    }

    /// Whether `data` is the next `data.len()` bytes of the stream; if not,
    /// the offset in `data` of the first byte that differs.
    pub fn check(&mut self, data: &[u8]) -> Result<(), usize> {
        let mut expected = [0u8; 512];
        for (i, chunk) in data.chunks(expected.len()).enumerate() {
            let want = &mut expected[..chunk.len()];
            self.fill(want);
            if want != chunk {
                let at = chunk.iter().zip(want.iter()).position(|(a, b)| a != b);
                return Err(i * 512 + at.unwrap_or(0));
            }
        }
        Ok(())
    }
}

/// FNV-1a, 64-bit.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(pub u64);

impl Fnv {
    pub const fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn add(&mut self, data: &[u8]) {
        let mut h = self.0;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}
