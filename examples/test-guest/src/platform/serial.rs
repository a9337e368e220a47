//! COM1 (16550A at 0x3F8) from CPL3: output, the `println!` macro, and
//! polling the receiver.
//!
//! Each burst waits for LSR.THRE (bit 5). With the FIFO enabled (detected
//! from IIR bits 7:6) THRE means the whole 16-byte FIFO is empty, so one LSR
//! read covers up to 16 bytes: about one VM exit per byte.

use crate::platform::arch::{inb, outb, pause};
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// Interrupt enable register.
pub const IER: u16 = COM1 + 1;
/// Interrupt identification (read) / FIFO control (write).
pub const IIR_FCR: u16 = COM1 + 2;
/// Modem control register.
pub const MCR: u16 = COM1 + 4;
/// Line status register.
pub const LSR: u16 = COM1 + 5;

const LSR_THRE: u8 = 1 << 5;
/// Line status: a received byte is waiting in RBR (or the FIFO).
const LSR_DATA_READY: u8 = 1 << 0;

/// Bytes that may be written after one THRE: 16 with a FIFO, else 1.
static BURST: AtomicUsize = AtomicUsize::new(1);

/// Enables and clears the FIFOs, and detects whether they exist.
pub fn init() {
    outb(IIR_FCR, 0x07);
    if inb(IIR_FCR) & 0xc0 == 0xc0 {
        BURST.store(16, Ordering::Relaxed);
    }
}

/// Writes raw bytes to COM1.
pub fn write_bytes(bytes: &[u8]) {
    let burst = BURST.load(Ordering::Relaxed);
    for chunk in bytes.chunks(burst) {
        // Bounded: a UART that never drains must not hang the guest.
        let mut spins = 0u32;
        while inb(LSR) & LSR_THRE == 0 && spins < 1_000_000 {
            pause();
            spins += 1;
        }
        for &b in chunk {
            outb(COM1, b);
        }
    }
}

/// A byte from the COM1 receiver (RBR, the base port), if one is waiting.
pub fn read_byte() -> Option<u8> {
    (inb(LSR) & LSR_DATA_READY != 0).then(|| inb(COM1))
}

/// A line being formatted: flushed when full and at the end of the line.
struct LineWriter {
    buf: [u8; 128],
    len: usize,
}

impl LineWriter {
    fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for LineWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Formats `args` and writes it with a trailing newline.
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut w = LineWriter {
        buf: [0; 128],
        len: 0,
    };
    // Writing to the buffer cannot fail; a Display impl erroring just truncates.
    let _ = w.write_fmt(args);
    let _ = w.write_str("\n");
    w.flush();
}

/// Prints one line on COM1.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::platform::serial::print_line(format_args!($($arg)*)) };
}
