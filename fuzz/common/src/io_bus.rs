//! `vmkit_bus::IoBus`: registration, deregistration and guest accesses, checked against a
//! model.
//!
//! The bus starts with a few PIO and MMIO ranges, some adjacent and some at the very ends
//! of the address spaces; the fuzzer then registers and deregisters more ranges and makes
//! reads and writes of 0 to 16 bytes, at absolute addresses or near a registered range's
//! start or end (where the off-by-ones live).
//!
//! Oracles, besides "never panics":
//! - an access is handled iff one registered range holds all of it (a non-empty access
//!   that does not wrap), and then exactly that device is called once, with its own base
//!   and an offset + length inside its range; otherwise no device is called and a read
//!   returns all 0xFF;
//! - a registration succeeds iff the range is valid and overlaps none registered, and an
//!   overlap error names a registered range that overlaps; deregistration removes the
//!   range holding the address, if any; `pio_ranges()`/`mmio_ranges()` match the model.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vmkit_bus::vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vmkit_bus::{mmio_range, pio_range, Access, DeviceMmio, DevicePio, Error, IoBus};

/// A device of the bus: checks every call it gets against its own range.
struct Dev {
    base: u64,
    size: u64,
    /// What reads return; never 0xFF.
    byte: u8,
    calls: AtomicU64,
    /// Calls made to any device of the run, to check that unmapped accesses reach none.
    all_calls: Arc<AtomicU64>,
}

impl Dev {
    fn access(&self, base: u64, offset: u64, len: usize) {
        assert_eq!(base, self.base, "device called with another range's base");
        assert!(len > 0, "empty access reached a device");
        assert!(
            offset < self.size && len as u64 <= self.size - offset,
            "access {offset:#x}+{len} outside the device's {:#x} bytes",
            self.size
        );
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.all_calls.fetch_add(1, Ordering::Relaxed);
    }
}

impl DevicePio for Dev {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.access(base.0.into(), offset.into(), data.len());
        data.fill(self.byte);
    }
    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.access(base.0.into(), offset.into(), data.len());
    }
}

impl DeviceMmio for Dev {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.access(base.0, offset, data.len());
        data.fill(self.byte);
    }
    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.access(base.0, offset, data.len());
    }
}

/// Where an operation goes.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// An absolute address (taken modulo 64 Ki for PIO).
    Abs(u64),
    /// Relative to the start (or, `from_end`, to the last byte) of the `idx`th registered
    /// range of the bus.
    Near {
        /// Which range (modulo the number registered).
        idx: u8,
        /// From its last byte rather than its first.
        from_end: bool,
        /// Added to that address.
        delta: i8,
    },
}

/// One operation on the bus.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Registers a device on `base`..`base + len` (`len % 32` when `small`).
    Register {
        /// On the MMIO bus (else PIO).
        mmio: bool,
        /// Its first address.
        base: Addr,
        /// Its length.
        len: u64,
        /// Keep the length under 32.
        small: bool,
    },
    /// Deregisters the range holding `addr`.
    Deregister {
        /// On the MMIO bus (else PIO).
        mmio: bool,
        /// An address in the range.
        addr: Addr,
    },
    /// A guest access of `len % 17` bytes.
    Access {
        /// On the MMIO bus (else PIO).
        mmio: bool,
        /// Its first byte.
        addr: Addr,
        /// Its length (modulo 17: 0 to 16 bytes).
        len: u8,
        /// A write (else a read).
        write: bool,
        /// The bytes written, or what the buffer holds before a read.
        fill: u8,
    },
}

/// The fuzzer's input: the operations, in order.
#[derive(Arbitrary, Debug)]
pub struct Input {
    /// Registrations, deregistrations and accesses.
    pub ops: Vec<Op>,
}

/// One bus of the model: disjoint inclusive ranges and their devices.
struct Model {
    mmio: bool,
    ranges: Vec<(u64, u64, Arc<Dev>)>,
    /// Calls made to any device of the run (shared by both models).
    all_calls: Arc<AtomicU64>,
}

impl Model {
    fn max(&self) -> u64 {
        if self.mmio {
            u64::MAX
        } else {
            u64::from(u16::MAX)
        }
    }

    fn resolve(&self, addr: Addr) -> u64 {
        let a = match addr {
            Addr::Abs(a) => a,
            Addr::Near { .. } if self.ranges.is_empty() => 0,
            Addr::Near {
                idx,
                from_end,
                delta,
            } => {
                let (b, l, _) = &self.ranges[usize::from(idx) % self.ranges.len()];
                let at = if from_end { *l } else { *b };
                at.wrapping_add_signed(i64::from(delta))
            }
        };
        if self.mmio {
            a
        } else {
            a & 0xFFFF
        }
    }

    fn holding(&self, first: u64, last: u64) -> Option<&(u64, u64, Arc<Dev>)> {
        self.ranges
            .iter()
            .find(|(b, l, _)| *b <= first && last <= *l)
    }

    fn overlaps(&self, first: u64, last: u64) -> bool {
        self.ranges
            .iter()
            .any(|(b, l, _)| *b <= last && first <= *l)
    }

    fn sorted(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = self.ranges.iter().map(|(b, l, _)| (*b, *l)).collect();
        v.sort_unstable();
        v
    }
}

fn register(bus: &mut IoBus, model: &mut Model, base: u64, len: u64) {
    let byte = (model.ranges.len() as u8).wrapping_mul(37) % 0xFF;
    let dev = Arc::new(Dev {
        base,
        size: len,
        byte,
        calls: AtomicU64::new(0),
        all_calls: model.all_calls.clone(),
    });
    let valid = len > 0 && base.checked_add(len - 1).is_some_and(|l| l <= model.max());
    let res = if model.mmio {
        mmio_range(base, len).and_then(|r| bus.register_mmio(r, dev.clone()))
    } else {
        match (u16::try_from(base), u16::try_from(len)) {
            (Ok(b), Ok(l)) => pio_range(b, l).and_then(|r| bus.register_pio(r, dev.clone())),
            _ => return, // not expressible as a PIO range at all
        }
    };
    let last = base.wrapping_add(len.wrapping_sub(1));
    match res {
        Ok(()) => {
            assert!(valid, "invalid range {base:#x}+{len:#x} accepted");
            assert!(
                !model.overlaps(base, last),
                "overlapping {base:#x}..={last:#x} accepted"
            );
            model.ranges.push((base, last, dev));
        }
        Err(Error::InvalidRange { .. }) => {
            assert!(!valid, "valid range {base:#x}+{len:#x} refused")
        }
        Err(Error::Overlap { new, existing, .. }) => {
            assert!(valid);
            assert_eq!(new, base..=last);
            assert!(
                model
                    .ranges
                    .iter()
                    .any(|(b, l, _)| (*b..=*l) == existing && *b <= last && base <= *l),
                "overlap error names {existing:#x?}, not a registered range overlapping {new:#x?}"
            );
        }
        Err(e) => panic!("unexpected registration error {e}"),
    }
}

/// A bus with a few ranges already registered, some adjacent and some at the very ends of
/// the address spaces, and the models of its two halves.
fn setup() -> (IoBus, Model, Model) {
    let mut bus = IoBus::new();
    let all_calls = Arc::new(AtomicU64::new(0));
    let mut pio = Model {
        mmio: false,
        ranges: Vec::new(),
        all_calls: all_calls.clone(),
    };
    let mut mmio = Model {
        mmio: true,
        ranges: Vec::new(),
        all_calls,
    };
    for (base, len) in [
        (0x0, 1),
        (0x10, 4),
        (0x14, 4), // adjacent to the previous
        (0x60, 5),
        (0x80, 1),
        (0x3F8, 8),
        (0x600, 3),
        (0xFFF0, 0xF),
        (0xFFFF, 1), // adjacent, and the last port
    ] {
        register(&mut bus, &mut pio, base, len);
    }
    for (base, len) in [
        (0x0, 0x10),
        (0xD000_0000, 0x1000),
        (0xD000_1000, 0x200), // adjacent to the previous
        (0xFEC0_0000, 0x1000),
        (u64::MAX - 0xFFF, 0x1000), // ends at the last address
    ] {
        register(&mut bus, &mut mmio, base, len);
    }
    assert_eq!(pio.ranges.len(), 9);
    assert_eq!(mmio.ranges.len(), 5);
    (bus, pio, mmio)
}

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode).
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input) {
    let (mut bus, mut pio, mut mmio) = setup();
    for op in &input.ops {
        match *op {
            Op::Register {
                mmio: is_mmio,
                base,
                len,
                small,
            } => {
                let model = if is_mmio { &mut mmio } else { &mut pio };
                if model.ranges.len() >= 64 {
                    continue;
                }
                let base = model.resolve(base);
                let len = match (small, is_mmio) {
                    (true, _) => len % 0x20,
                    (false, false) => len & 0xFFFF,
                    (false, true) => len,
                };
                register(&mut bus, model, base, len);
            }
            Op::Deregister { mmio: true, addr } => deregister(&mut bus, &mut mmio, addr),
            Op::Deregister { mmio: false, addr } => deregister(&mut bus, &mut pio, addr),
            Op::Access {
                mmio: is_mmio,
                addr,
                len,
                write,
                fill,
            } => {
                let model = if is_mmio { &mmio } else { &pio };
                access(&bus, model, addr, len, write, fill);
            }
        }
    }
    let pio_ranges: Vec<_> = bus
        .pio_ranges()
        .into_iter()
        .map(|r| (u64::from(*r.start()), u64::from(*r.end())))
        .collect();
    assert_eq!(pio_ranges, pio.sorted());
    let mmio_ranges: Vec<_> = bus
        .mmio_ranges()
        .into_iter()
        .map(|r| (*r.start(), *r.end()))
        .collect();
    assert_eq!(mmio_ranges, mmio.sorted());
}

/// Deregisters the range holding `addr` on the bus and in the model.
fn deregister(bus: &mut IoBus, model: &mut Model, addr: Addr) {
    let a = model.resolve(addr);
    let got = if model.mmio {
        bus.deregister_mmio(a)
            .map(|(r, _)| (r.base().0, r.last().0))
    } else {
        bus.deregister_pio(a as u16)
            .map(|(r, _)| (u64::from(r.base().0), u64::from(r.last().0)))
    };
    let pos = model.ranges.iter().position(|(b, l, _)| *b <= a && a <= *l);
    match (got, pos) {
        (Some(range), Some(i)) => {
            let (b, l, _) = model.ranges.remove(i);
            assert_eq!(range, (b, l));
        }
        (None, None) => {}
        (got, _) => panic!("deregister at {a:#x} returned {got:x?}, model {pos:?}"),
    }
}

/// One guest access of `len % 17` bytes at `addr`, checked against the model.
fn access(bus: &IoBus, model: &Model, addr: Addr, len: u8, write: bool, fill: u8) {
    let a = model.resolve(addr);
    let len = usize::from(len % 17);
    let last = (len as u64)
        .checked_sub(1)
        .and_then(|n| a.checked_add(n))
        .filter(|&l| l <= model.max());
    let expected = last.and_then(|l| model.holding(a, l));
    let dev_before = expected.map_or(0, |(_, _, d)| d.calls.load(Ordering::Relaxed));
    let mut data = [fill; 16];
    let data = &mut data[..len];
    let before = model.all_calls.load(Ordering::Relaxed);
    let res = match (model.mmio, write) {
        (false, false) => bus.pio_read(a as u16, data),
        (false, true) => bus.pio_write(a as u16, data),
        (true, false) => bus.mmio_read(a, data),
        (true, true) => bus.mmio_write(a, data),
    };
    let calls = model.all_calls.load(Ordering::Relaxed);
    match expected {
        Some((_, _, dev)) => {
            assert_eq!(res, Access::Handled, "{a:#x}+{len} is inside a range");
            assert_eq!(calls, before + 1);
            if !write {
                assert!(data.iter().all(|&b| b == dev.byte), "read {data:02x?}");
            }
            assert_eq!(
                dev.calls.load(Ordering::Relaxed),
                dev_before + 1,
                "another device was called for {a:#x}+{len}"
            );
        }
        None => {
            assert_eq!(res, Access::Unmapped, "{a:#x}+{len} is in no one range");
            assert_eq!(calls, before, "a device was called");
            if !write {
                assert!(
                    data.iter().all(|&b| b == 0xFF),
                    "unmapped read of {a:#x}+{len} returned {data:02x?}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    /// Random bytes decode and run against the bus set up with its initial ranges. They
    /// make about one operation each (arbitrary's `Vec` at the end of an input reads a
    /// "go on" bit before each element; the encoding is kept so the fuzzer's corpus stays
    /// valid): the corpus, not these seeds, is what makes long sequences.
    #[test]
    fn seeds_decode_and_run() {
        let seeds = seeds::for_target("io_bus");
        let mut ops = 0;
        for s in &seeds {
            let input = Input::arbitrary_take_rest(Unstructured::new(s)).expect("decodes");
            ops += input.ops.len();
            run(&input);
        }
        eprintln!("io_bus seeds: {ops} operations");
        assert!(ops > 0);
    }

    /// An access inside a registered range reaches its device; one across two adjacent
    /// ranges reaches neither.
    #[test]
    fn accesses_at_the_edges_of_adjacent_ranges() {
        let near = |idx, from_end, delta| Addr::Near {
            idx,
            from_end,
            delta,
        };
        let access = |addr, len| Op::Access {
            mmio: false,
            addr,
            len,
            write: false,
            fill: 0,
        };
        // PIO ranges 1 and 2 are 0x10..=0x13 and 0x14..=0x17.
        run(&Input {
            ops: vec![
                access(near(1, true, 0), 1),
                access(near(1, true, 0), 2),
                access(near(2, false, 0), 4),
                access(Addr::Abs(0xFFFF), 2),
            ],
        });
    }
}
