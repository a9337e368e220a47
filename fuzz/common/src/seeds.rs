//! Seed inputs, generated (never committed as blobs): deterministic pseudo-random byte
//! strings of several lengths. The input types are built so that most byte strings decode
//! to well-formed driver sequences and requests, so these reach the devices' data paths;
//! each target's tests check that its seeds do.
//!
//! `cargo run -p vmkit-fuzz-common --example write-seeds` writes them to
//! `fuzz/corpus/<target>/`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use arbitrary::{Arbitrary, Unstructured};

/// A vector of at most `N` elements whose length is one byte of the input (modulo `N + 1`)
/// — for `#[arbitrary(with = up_to::<T, N>)]` on a field. arbitrary's own `Vec` takes its
/// length from the end of the input and, fed random bytes, lets one inner list swallow the
/// whole input; with this, random bytes decode to many small operations.
pub fn up_to<'a, T: Arbitrary<'a>, const N: usize>(
    u: &mut Unstructured<'a>,
) -> arbitrary::Result<Vec<T>> {
    let n = usize::from(u8::arbitrary(u)?) % (N + 1);
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        if u.is_empty() {
            break;
        }
        v.push(T::arbitrary(u)?);
    }
    Ok(v)
}

/// Up to `N` elements, as many as the input holds — for `#[arbitrary(with = many::<T, N>)]`
/// on the last field of an input (its list of operations). arbitrary's own `Vec` at the end
/// of an input reads a "go on" bit before each element, so random bytes give about one.
pub fn many<'a, T: Arbitrary<'a>, const N: usize>(
    u: &mut Unstructured<'a>,
) -> arbitrary::Result<Vec<T>> {
    let mut v = Vec::new();
    while v.len() < N && !u.is_empty() {
        match T::arbitrary(u) {
            Ok(t) => v.push(t),
            Err(_) => break,
        }
    }
    Ok(v)
}

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

fn prng_for(target: &str) -> Prng {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    Prng::new(h)
}

/// The seeds for `target`: 32 byte strings from 16 bytes to 8 KiB, for the targets
/// that define a goal (see [`select`]) 32 more that reach it, and for `api` well-formed
/// requests of every endpoint and a config file ([`crate::api::seeds`]). Computed once a
/// process.
pub fn for_target(target: &str) -> Vec<Vec<u8>> {
    type Cache = Mutex<HashMap<String, Vec<Vec<u8>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Cache::default);
    if let Some(s) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(target) {
        return s.clone();
    }
    let seeds = generate(target);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(target.to_string(), seeds.clone());
    seeds
}

fn generate(target: &str) -> Vec<Vec<u8>> {
    let mut p = prng_for(target);
    let mut seeds: Vec<Vec<u8>> = (0..32).map(|i| p.bytes(16usize << (i % 10))).collect();
    let goal: Option<fn(&[u8]) -> bool> = match target {
        "virtqueue" => Some(crate::virtqueue::reaches_goal),
        "blk_device" => Some(crate::blk_device::reaches_goal),
        "virtio_mmio" => Some(crate::virtio_mmio::reaches_goal),
        "virtio_pci" => Some(crate::virtio_pci::reaches_goal),
        "console" => Some(crate::console::reaches_goal),
        "rng" => Some(crate::rng::reaches_goal),
        "transport_restore" => Some(crate::transport_restore::reaches_goal),
        _ => None,
    };
    if let Some(goal) = goal {
        seeds.extend(select(target, 32, goal));
    }
    if target == "api" {
        // Random bytes rarely make an HTTP request: well-formed traffic instead.
        seeds.extend(crate::api::seeds());
    }
    if target == "snapshot_state" {
        // Random bytes never pass the checksum: valid state files and sealed payloads.
        seeds.extend(crate::snapshot_state::seeds());
    }
    seeds
}

/// Up to `count` pseudo-random inputs (64 bytes to 4 KiB) for which `goal` holds (the run
/// got where the target is meant to go: a request served, a chain checked), from at most
/// 4000 candidates — rejection sampling, deterministic per target.
pub fn select(target: &str, count: usize, goal: fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
    let mut p = prng_for(target);
    p.next_u64();
    let mut out = Vec::new();
    for i in 0..4000 {
        if out.len() == count {
            log::debug!("{target}: {count} goal seeds from {i} candidates");
            break;
        }
        let data = p.bytes(64usize << (i % 7));
        if goal(&data) {
            out.push(data);
        }
    }
    out
}
