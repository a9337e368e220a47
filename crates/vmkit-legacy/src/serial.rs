//! The 16550A UART, vm-superio's model on the PIO bus.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::{Error as SerialError, SerialEvents};

use crate::error::{Error, Result};
use vm_superio::Trigger;
use vmkit_irq::InterruptLine;
use vmm_sys_util::eventfd::EventFd;

/// Number of ports of a 16550A (`base..base + 8`).
pub const SERIAL_PORT_COUNT: u16 = 8;

/// Bytes the receive FIFO holds (vm-superio's FIFO size).
pub const SERIAL_FIFO_SIZE: usize = 64;

/// vm-superio's [`Trigger`] over an [`InterruptLine`]: how a vm-superio device raises its
/// interrupt without knowing about KVM.
#[derive(Clone)]
pub struct InterruptTrigger(Arc<dyn InterruptLine>);

impl InterruptTrigger {
    /// A trigger that raises `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self(line)
    }
}

impl fmt::Debug for InterruptTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InterruptTrigger")
    }
}

impl Trigger for InterruptTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Counters of a [`Serial`], for the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes the guest wrote that reached the output.
    pub tx_bytes: u64,
    /// Bytes the guest wrote that the output refused (the guest is not blocked: the byte
    /// is dropped).
    pub tx_lost: u64,
    /// Failures to raise the interrupt line.
    pub interrupt_errors: u64,
}

// vm-superio's event hooks: counters, and the "input drained" wakeup.
struct Events {
    input_drained: Option<EventFd>,
    tx_bytes: AtomicU64,
    tx_lost: AtomicU64,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.tx_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        if let Some(fd) = &self.input_drained {
            // Fails only if a wakeup is already pending.
            let _ = fd.write(1);
        }
    }
}

/// A serde mirror of vm-superio's [`SerialState`](vm_superio::SerialState) (which has no
/// serde support), for [`SerialState`]'s `uart` field.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(remote = "vm_superio::SerialState")]
struct UartStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The state of a [`Serial`] for a snapshot: vm-superio's [`SerialState`](vm_superio::SerialState)
/// (registers and the receive FIFO). The wrapper's own fields are counters, not saved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// The UART's registers and the input the guest has not read yet (at most
    /// [`SERIAL_FIFO_SIZE`] bytes).
    #[serde(with = "UartStateDef")]
    pub uart: vm_superio::SerialState,
}

/// Configuration of a [`Serial`].
pub struct SerialConfig<W> {
    /// The UART's interrupt (GSI 4 for COM1).
    pub interrupt: Arc<dyn InterruptLine>,
    /// Where the guest's output goes (an [`OutputSink`](crate::OutputSink), a file, a
    /// `Vec<u8>` in tests). Written and flushed one byte at a time, on the vCPU thread, in
    /// the device's lock: a writer that blocks stalls the vCPU, which an `OutputSink` never
    /// does.
    pub out: W,
    /// Written (incremented) whenever the guest has read the receive FIFO empty: the VMM
    /// can stop polling its input while the FIFO is full and poll this instead.
    pub input_drained: Option<EventFd>,
}

/// A 16550A UART on the PIO bus: vm-superio's [`Serial`](vm_superio::Serial) behind
/// vm-device's [`MutDevicePio`].
///
/// Register it as `Arc<Mutex<Serial<W>>>` for [`SERIAL_PORT_COUNT`] ports from its base
/// (0x3F8 for COM1, see [`COM1_PORT`](crate::COM1_PORT)). Only one-byte accesses at
/// offsets `0..8` reach the UART; others are ignored, and such reads return `0xFF`.
pub struct Serial<W: Write + Send> {
    inner: vm_superio::Serial<InterruptTrigger, Events, W>,
    interrupt_errors: u64,
}

impl<W: Write + Send> Serial<W> {
    /// A UART raising `interrupt` and writing the guest's output to `out`.
    pub fn new(interrupt: Arc<dyn InterruptLine>, out: W) -> Self {
        Self::with_config(SerialConfig {
            interrupt,
            out,
            input_drained: None,
        })
    }

    /// A UART as `config` says.
    pub fn with_config(config: SerialConfig<W>) -> Self {
        let events = Events {
            input_drained: config.input_drained,
            tx_bytes: AtomicU64::new(0),
            tx_lost: AtomicU64::new(0),
        };
        Self {
            inner: vm_superio::Serial::with_events(
                InterruptTrigger(config.interrupt),
                events,
                config.out,
            ),
            interrupt_errors: 0,
        }
    }

    /// A UART as `config` says, in the state `state` (a snapshot's): the guest finds its
    /// registers and unread input as they were, and the interrupt is raised if one was
    /// pending (a spurious one is harmless, a lost one is not). Built afresh rather than
    /// restored in place because vm-superio rebuilds a UART from its state only with the
    /// output writer moved in.
    ///
    /// # Errors
    ///
    /// [`Error::State`] for more input than the FIFO holds; [`Error::Interrupt`] if the
    /// pending interrupt cannot be raised.
    pub fn from_state(config: SerialConfig<W>, state: &SerialState) -> Result<Self> {
        let len = state.uart.in_buffer.len();
        if len > SERIAL_FIFO_SIZE {
            return Err(Error::State(format!(
                "serial: {len} bytes of input; the FIFO holds {SERIAL_FIFO_SIZE}"
            )));
        }
        let events = Events {
            input_drained: config.input_drained,
            tx_bytes: AtomicU64::new(0),
            tx_lost: AtomicU64::new(0),
        };
        let inner = vm_superio::Serial::from_state(
            &state.uart,
            InterruptTrigger(config.interrupt),
            events,
            config.out,
        )
        .map_err(|e| match e {
            SerialError::Trigger(e) | SerialError::IOError(e) => Error::Interrupt(e),
            SerialError::FullFifo => Error::State(format!(
                "serial: {len} bytes of input; the FIFO holds {SERIAL_FIFO_SIZE}"
            )),
        })?;
        Ok(Self {
            inner,
            interrupt_errors: 0,
        })
    }

    /// The UART's state for a snapshot (registers, unread input).
    pub fn state(&self) -> SerialState {
        SerialState {
            uart: self.inner.state(),
        }
    }

    /// Queues host input (stdin) for the guest to read through RBR, raising the receive
    /// interrupt if the guest enabled it.
    ///
    /// Returns how many bytes from the start of `input` were taken: at most the free room
    /// in the FIFO ([`fifo_capacity`](Self::fifo_capacity)), 0 when it is full or when the
    /// guest has the UART in loopback mode (which ignores outside input). Keep the rest
    /// and offer it again once the guest has read (see
    /// [`SerialConfig::input_drained`]).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        if input.is_empty() || room == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(input) {
            Ok(n) => n,
            // The bytes are in the FIFO; only the interrupt failed. Report them taken so
            // the VMM does not queue them twice.
            Err(SerialError::Trigger(_)) => {
                self.interrupt_errors += 1;
                room.min(input.len())
            }
            Err(SerialError::FullFifo | SerialError::IOError(_)) => 0,
        }
    }

    /// Free room in the receive FIFO, in bytes.
    pub fn fifo_capacity(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// The output writer.
    pub fn writer(&self) -> &W {
        self.inner.writer()
    }

    /// The output writer, mutably (to flush or rotate it).
    pub fn writer_mut(&mut self) -> &mut W {
        self.inner.writer_mut()
    }

    /// Consumes the UART, returning its output writer.
    pub fn into_writer(self) -> W {
        self.inner.into_writer()
    }

    /// The counters.
    pub fn stats(&self) -> SerialStats {
        let ev = self.inner.events();
        SerialStats {
            tx_bytes: ev.tx_bytes.load(Ordering::Relaxed),
            tx_lost: ev.tx_lost.load(Ordering::Relaxed),
            interrupt_errors: self.interrupt_errors,
        }
    }
}

impl<W: Write + Send> fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("fifo_capacity", &self.fifo_capacity())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The register offset of a one-byte access inside the UART's 8 ports.
fn register(offset: PioAddressOffset, len: usize) -> Option<u8> {
    if len == 1 && offset < SERIAL_PORT_COUNT {
        // `offset < 8` fits in u8.
        Some(offset as u8)
    } else {
        None
    }
}

impl<W: Write + Send> MutDevicePio for Serial<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match register(offset, data.len()) {
            Some(reg) => data[0] = self.inner.read(reg),
            None => data.fill(0xFF),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let Some(reg) = register(offset, data.len()) else {
            return;
        };
        match self.inner.write(reg, data[0]) {
            Ok(()) => {}
            Err(SerialError::Trigger(_)) => self.interrupt_errors += 1,
            // Counted as `tx_lost` by the event hooks; the guest is not blocked.
            Err(SerialError::IOError(_) | SerialError::FullFifo) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmkit_irq::CountingLine;

    const THR: u16 = 0; // write
    const RBR: u16 = 0; // read
    const IER: u16 = 1;
    const IIR: u16 = 2;
    const LCR: u16 = 3;
    const MCR: u16 = 4;
    const LSR: u16 = 5;
    const SCR: u16 = 7;
    const BASE: PioAddress = PioAddress(0x3F8);

    fn serial() -> (Serial<Vec<u8>>, Arc<CountingLine>) {
        let line = Arc::new(CountingLine::new());
        (Serial::new(line.clone(), Vec::new()), line)
    }

    fn rd(s: &mut Serial<Vec<u8>>, offset: u16) -> u8 {
        let mut b = [0u8];
        s.pio_read(BASE, offset, &mut b);
        b[0]
    }

    fn wr(s: &mut Serial<Vec<u8>>, offset: u16, v: u8) {
        s.pio_write(BASE, offset, &[v]);
    }

    #[test]
    fn output_reaches_the_writer() {
        let (mut s, line) = serial();
        for b in b"hello\n" {
            wr(&mut s, THR, *b);
        }
        assert_eq!(s.writer().as_slice(), b"hello\n");
        assert_eq!(s.stats().tx_bytes, 6);
        // No interrupt unless the guest enables one.
        assert_eq!(line.count(), 0);
        assert_eq!(s.into_writer(), b"hello\n");
    }

    #[test]
    fn thre_interrupt_fires_when_enabled_and_a_byte_is_written() {
        let (mut s, line) = serial();
        // Enabling THRE with the holding register empty raises it at once (level semantics).
        wr(&mut s, IER, 0x02);
        assert_eq!(line.count(), 1);
        // IIR says "THR empty" (with the 16550A FIFO bits); reading it acknowledges.
        assert_eq!(rd(&mut s, IIR), 0xC2);
        assert_eq!(rd(&mut s, IIR), 0xC1);
        wr(&mut s, THR, b'x');
        assert_eq!(line.count(), 2);
        assert_eq!(s.writer().as_slice(), b"x");
        // LSR: THR empty and transmitter idle, always.
        assert_eq!(rd(&mut s, LSR) & 0x60, 0x60);
    }

    #[test]
    fn input_is_readable_through_rbr_and_lsr() {
        let (mut s, line) = serial();
        assert_eq!(rd(&mut s, LSR) & 0x01, 0);
        wr(&mut s, IER, 0x01); // receive-data-available interrupt
        assert_eq!(s.enqueue_input(b"hi"), 2);
        assert_eq!(line.count(), 1);
        assert_eq!(rd(&mut s, IIR), 0xC4);
        assert_eq!(rd(&mut s, LSR) & 0x01, 0x01);
        assert_eq!(rd(&mut s, RBR), b'h');
        assert_eq!(rd(&mut s, LSR) & 0x01, 0x01);
        assert_eq!(rd(&mut s, RBR), b'i');
        assert_eq!(rd(&mut s, LSR) & 0x01, 0);
    }

    #[test]
    fn enqueue_respects_fifo_capacity() {
        let drained = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut s = Serial::with_config(SerialConfig {
            interrupt: Arc::new(CountingLine::new()),
            out: Vec::new(),
            input_drained: Some(drained.try_clone().unwrap()),
        });
        let input: Vec<u8> = (0..100).collect();
        assert_eq!(s.enqueue_input(&input), SERIAL_FIFO_SIZE);
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue_input(&input[SERIAL_FIFO_SIZE..]), 0);
        assert_eq!(s.enqueue_input(&[]), 0);
        assert_eq!(rd(&mut s, RBR), 0);
        assert_eq!(s.enqueue_input(&input[SERIAL_FIFO_SIZE..]), 1);
        assert!(drained.read().is_err(), "not drained yet");
        for expected in (1..SERIAL_FIFO_SIZE as u8).chain([SERIAL_FIFO_SIZE as u8]) {
            assert_eq!(rd(&mut s, RBR), expected);
        }
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(s.fifo_capacity(), SERIAL_FIFO_SIZE);
    }

    #[test]
    fn loopback_mode_takes_no_host_input() {
        let (mut s, _line) = serial();
        wr(&mut s, MCR, 0x10);
        assert_eq!(s.enqueue_input(b"abc"), 0);
        // Loopback: what the guest transmits, it receives.
        wr(&mut s, THR, b'z');
        assert_eq!(rd(&mut s, RBR), b'z');
        assert!(s.writer().is_empty());
    }

    #[test]
    fn bad_offsets_and_sizes_are_ignored() {
        let (mut s, line) = serial();
        wr(&mut s, SCR, 0x5A);
        let mut two = [0u8; 2];
        s.pio_read(BASE, SCR, &mut two);
        assert_eq!(two, [0xFF, 0xFF]);
        s.pio_read(BASE, 8, &mut two[..1]);
        assert_eq!(two[0], 0xFF);
        s.pio_read(BASE, u16::MAX, &mut []);
        s.pio_write(BASE, THR, b"ab");
        s.pio_write(BASE, THR, &[]);
        s.pio_write(BASE, 8, b"c");
        s.pio_write(BASE, u16::MAX, b"d");
        assert!(s.writer().is_empty());
        assert_eq!(rd(&mut s, SCR), 0x5A);
        assert_eq!(line.count(), 0);
        // DLAB still works through the same path.
        wr(&mut s, LCR, 0x83);
        wr(&mut s, 0, 0x01);
        assert_eq!(rd(&mut s, 0), 0x01);
    }

    struct FailingWriter;
    impl Write for FailingWriter {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct FailingLine;
    impl InterruptLine for FailingLine {
        fn trigger(&self) -> io::Result<()> {
            Err(io::Error::other("no irqfd"))
        }
    }

    #[test]
    fn state_moves_registers_and_unread_input_to_a_new_uart() {
        let (mut s, _line) = serial();
        wr(&mut s, LCR, 0x83); // DLAB on, 8N1
        wr(&mut s, 0, 0x0C); // divisor 12: 9600 baud
        wr(&mut s, LCR, 0x03);
        wr(&mut s, SCR, 0x5A);
        wr(&mut s, IER, 0x01);
        assert_eq!(s.enqueue_input(b"abc"), 3);
        let state = s.state();
        assert_eq!(state.uart.in_buffer, b"abc");

        let line = Arc::new(CountingLine::new());
        let config = SerialConfig {
            interrupt: line.clone(),
            out: Vec::new(),
            input_drained: None,
        };
        let mut r = Serial::from_state(config, &state).unwrap();
        assert_eq!(r.state(), state);
        assert_eq!(
            line.count(),
            1,
            "the pending receive interrupt is raised again"
        );
        assert_eq!(rd(&mut r, SCR), 0x5A);
        assert_eq!(rd(&mut r, IIR), 0xC4);
        assert_eq!(rd(&mut r, RBR), b'a');
        assert_eq!(rd(&mut r, RBR), b'b');
        assert_eq!(rd(&mut r, RBR), b'c');
        assert_eq!(rd(&mut r, LSR) & 0x01, 0);
        wr(&mut r, LCR, 0x83);
        assert_eq!(rd(&mut r, 0), 0x0C, "the divisor survived");
        wr(&mut r, LCR, 0x03);
        wr(&mut r, THR, b'z');
        assert_eq!(r.writer().as_slice(), b"z");
    }

    #[test]
    fn a_state_with_more_input_than_the_fifo_is_refused() {
        let state = SerialState {
            uart: vm_superio::SerialState {
                in_buffer: vec![0; SERIAL_FIFO_SIZE + 1],
                ..Default::default()
            },
        };
        let config = SerialConfig {
            interrupt: Arc::new(CountingLine::new()),
            out: Vec::new(),
            input_drained: None,
        };
        let err = Serial::from_state(config, &state).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid device state: serial: 65 bytes of input; the FIFO holds 64"
        );
    }

    #[test]
    fn failures_are_counted_not_fatal() {
        let mut s = Serial::new(Arc::new(FailingLine), FailingWriter);
        s.pio_write(BASE, IER, &[0x03]);
        s.pio_write(BASE, THR, b"a");
        assert_eq!(s.enqueue_input(b"xy"), 2);
        let st = s.stats();
        assert_eq!(st.tx_lost, 1);
        assert_eq!(st.tx_bytes, 0);
        assert!(st.interrupt_errors >= 2, "{st:?}");
    }
}
