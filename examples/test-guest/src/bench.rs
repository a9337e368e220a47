//! `bench=pio:N`: the cost of a port-I/O VM exit, timed at CPL3.

use crate::arch::{outb, rdtsc};
use crate::println;
use crate::time::cycles_to_ns;

/// The debug port: every VMM records or ignores writes to it.
const DEBUG_PORT: u16 = 0x80;

/// Writes `n` bytes to port 0x80 and prints the average cost.
pub fn pio(n: u64) {
    let start = rdtsc();
    for i in 0..n {
        outb(DEBUG_PORT, i as u8);
    }
    let cycles = rdtsc() - start;
    let per_exit = cycles_to_ns(cycles).checked_div(n).unwrap_or(0);
    println!("bench pio: {} exits, {} ns/exit", n, per_exit);
}
