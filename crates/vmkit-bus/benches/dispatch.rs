//! Cost of one PIO write dispatched through `IoBus` to a lock-free device among a PC's worth
//! of ranges. Reports, asserts only that every write arrived.
//!
//! `cargo bench -p vmkit-bus`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::DevicePio;
use vmkit_bus::{pio_range, IoBus};

struct Counter(AtomicU64);

impl DevicePio for Counter {
    fn pio_read(&self, _: PioAddress, _: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, _: PioAddress, _: PioAddressOffset, _: &[u8]) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    let bus = IoBus::new();
    for (base, len) in [
        (0x60, 5),
        (0x3F8, 8),
        (0x600, 3),
        (0x2F8, 8),
        (0x40, 4),
        (0x70, 2),
    ] {
        let other = Arc::new(Counter(AtomicU64::new(0)));
        bus.register_pio(pio_range(base, len).expect("range"), other)
            .expect("register");
    }
    let dev = Arc::new(Counter(AtomicU64::new(0)));
    bus.register_pio(pio_range(0x80, 1).expect("range"), dev.clone())
        .expect("register");
    const N: u64 = 10_000_000;
    let t = Instant::now();
    for i in 0..N {
        let _ = black_box(&bus).pio_write(0x80, &[i as u8]);
    }
    let per = t.elapsed().as_nanos() as f64 / N as f64;
    assert_eq!(
        dev.0.load(Ordering::Relaxed),
        N,
        "every write reached the device"
    );
    println!("IoBus PIO write dispatch among 7 ranges: {per:.1} ns");
}
