//! `hold=serial`: after the tests and benchmarks, before the exit, the
//! guest stays alive until a byte arrives on the COM1 receiver (at most
//! 10 s), so that a benchmark can sample the VMM from outside while the
//! guest runs and then release it by writing a byte to the VMM's stdin
//! (which vmkit and QEMU's `-serial stdio` both feed to COM1). A byte that
//! arrived before the hold was reached releases it too.
//!
//! `hold=ticks:N`: the guest prints `tick I` every 100 ms of TSC time, N times, so
//! that a test can pause and resume it and see its progress stop and go on.

use crate::platform::serial;
use crate::platform::time::{delay_us, wait_until};
use crate::println;

/// What the guest waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// A byte on the COM1 receiver.
    Serial,
    /// N ticks, 100 ms apart.
    Ticks(u32),
}

/// The most `hold=ticks:N` takes (10 minutes).
pub const MAX_TICKS: u32 = 6000;

/// How long it waits at most.
const TIMEOUT_US: u64 = 10_000_000;
/// Pause between two looks at the line status (each is a VM exit).
const POLL_US: u64 = 1000;

/// Prints `hold: waiting for a byte on COM1`, then waits; prints
/// `hold: released` or, after 10 s, `hold: FAIL no byte on COM1 in 10 s`.
pub fn run(hold: Hold) {
    match hold {
        Hold::Serial => {
            println!("hold: waiting for a byte on COM1");
            let released = wait_until(TIMEOUT_US, || {
                let got = serial::read_byte().is_some();
                if !got {
                    delay_us(POLL_US);
                }
                got
            });
            if released {
                println!("hold: released");
            } else {
                println!("hold: FAIL no byte on COM1 in 10 s");
            }
        }
        Hold::Ticks(n) => {
            for i in 1..=n {
                delay_us(100_000);
                println!("tick {}", i);
            }
        }
    }
}
