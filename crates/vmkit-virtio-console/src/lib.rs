//! virtio-console (virtio 1.2 §5.3) for [vmkit-virtio] transports: one port (port 0),
//! guest output to any [`Write`] sink, host input through a bounded buffer.
//!
//! - device ID 3; queues receiveq (0, host → guest) and transmitq (1, guest → host), 256
//!   entries each; no `MULTIPORT`, no `SIZE` (cols/rows read 0);
//! - `VIRTIO_CONSOLE_F_EMERG_WRITE` offered: a write to `emerg_wr` (config offset 8) puts its
//!   low byte on the output, with or without the feature acknowledged, as the spec allows;
//! - **output**: the device-readable buffers of each transmitq chain are copied, in order,
//!   to the sink given in [`ConsoleConfig`] (stdout, a file, a pty master: the VMM opens it);
//!   at most [`ConsoleConfig::max_tx_bytes_per_chain`] per chain, the rest dropped and
//!   counted; device-writable descriptors are skipped; the used length is 0;
//! - **input**: the VMM pushes host bytes with [`Console::enqueue_input`] or, from any thread,
//!   [`ConsoleInput::push`]; they wait in a buffer of [`ConsoleConfig::input_capacity`] bytes
//!   (push returns how much was taken) until the guest posts receive buffers, and are then
//!   written into their device-writable descriptors (read-only ones are never written);
//! - a malformed chain (loop, longer than the queue, bad indirect table) or one with a
//!   buffer outside guest memory is returned with used length 0 and nothing read or
//!   written; a corrupt ring (available index running ahead, head index out of range, rings
//!   unreadable) puts the device in `DEVICE_NEEDS_RESET`;
//! - **snapshot/restore**: [`Console::state`] saves the input not yet given to the guest
//!   ([`ConsoleState`]); [`Console::restore`] puts it back into a freshly built console,
//!   which delivers it once its transport re-activates it.
//!
//! [`Pty`] is a small helper for VMMs offering a pseudo-terminal console (raw mode,
//! non-blocking master, slave kept open); the device itself never touches a terminal.
//!
//! # How input reaches a device driven by queue events
//!
//! At activation the device keeps a clone of the receiveq's notifier eventfd (the one the
//! transport's [`QueueEventHandler`](vmkit_virtio::QueueEventHandler) already watches).
//! [`ConsoleInput::push`] buffers the bytes and signals that eventfd, so the VMM's event
//! loop calls [`process_queue(0)`](VirtioDevice::process_queue) as for a guest
//! notification, and the device fills the posted receive buffers. A VMM that holds the
//! device's lock anyway can call [`Console::enqueue_input`], which delivers at once.
//! Before activation input is only buffered, and delivered when the driver posts buffers.
//!
//! # Example
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_virtio::{MmioTransport, VirtioDevice};
//! use vmkit_virtio_console::{Console, ConsoleConfig};
//! # use vm_memory::{GuestAddress, GuestMemoryMmap};
//! # let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)])?;
//! # let line = Arc::new(vmkit_irq::CountingLine::new());
//!
//! // Output to stdout (or a `File`, or `Pty::output()`).
//! let console = Console::new(ConsoleConfig::new(Box::new(std::io::stdout())))?;
//! let input = console.input();
//! let console = Arc::new(Mutex::new(console));
//! let transport = MmioTransport::new(console.clone(), memory, line)?;
//! assert_eq!(console.lock().unwrap().device_type(), 3);
//! // The VMM registers the transport on its MMIO bus, the QueueNotify ioeventfds, and the
//! // queue event handler on its event manager, as for any vmkit-virtio device:
//! let _handler = transport.queue_event_handler()?;
//!
//! // Its stdin (or pty master) handler pushes what it read:
//! assert_eq!(input.push(b"ls\r"), 3);
//! assert_eq!(input.pending(), 3); // waits for the guest's receive buffers
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! [vmkit-virtio]: https://crates.io/crates/vmkit-virtio
#![deny(missing_docs)]

mod input;
mod pty;

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::{
    ActivateContext, ActivateError, Counter, Descriptor, DeviceMetrics, NoMetrics, VirtioDevice,
    VirtioMemory,
};

pub use input::ConsoleInput;
use input::{lock, InputState, SharedInput};
pub use pty::Pty;

/// The virtio device ID of a console.
pub const CONSOLE_DEVICE_TYPE: u32 = 3;
/// The receive queue of port 0 (host → guest).
pub const RECEIVEQ: u16 = 0;
/// The transmit queue of port 0 (guest → host).
pub const TRANSMITQ: u16 = 1;
/// The maximum size of each queue.
pub const CONSOLE_QUEUE_SIZE: u16 = 256;
/// `VIRTIO_CONSOLE_F_SIZE` (bit 0): cols/rows valid. Not offered.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// `VIRTIO_CONSOLE_F_MULTIPORT` (bit 1). Not offered.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// `VIRTIO_CONSOLE_F_EMERG_WRITE` (bit 2): `emerg_wr` works. Offered.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// The offset of `emerg_wr` (le32) in the configuration space.
pub const CONFIG_EMERG_WR_OFFSET: u64 = 8;
/// The size of the configuration space (cols, rows, max_nr_ports, emerg_wr).
pub const CONFIG_SPACE_SIZE: u64 = 12;
/// The default size of the host-input buffer.
pub const DEFAULT_INPUT_CAPACITY: usize = 64 * 1024;
/// The default bound of the bytes taken from one transmit chain.
pub const DEFAULT_MAX_TX_BYTES_PER_CHAIN: u32 = 1 << 20;

/// Bytes copied from guest memory to the sink at once.
const CHUNK: usize = 4096;

/// Errors of [`Console::new`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input buffer capacity is 0: no input could ever reach the guest.
    #[error("input_capacity must be at least 1")]
    ZeroInputCapacity,
    /// The per-chain transmit bound is 0: no output could ever leave the guest.
    #[error("max_tx_bytes_per_chain must be at least 1")]
    ZeroTxLimit,
    /// [`Console::restore`]: the saved input does not fit in this console's buffer.
    #[error("{saved} bytes of saved console input; the input buffer holds at most {capacity}")]
    StateInput {
        /// The bytes of input in the state.
        saved: usize,
        /// This console's input capacity.
        capacity: usize,
    },
}

/// The device-specific state of a [`Console`] for a snapshot ([`Console::state`],
/// [`Console::restore`]): the host input buffered and not yet given to the guest.
///
/// The configuration space holds nothing the guest can change (`VIRTIO_CONSOLE_F_SIZE`
/// and `MULTIPORT` are not offered: cols, rows and `max_nr_ports` read 0), so it is not
/// saved. Counters are not saved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    /// Input bytes buffered, oldest first.
    pub pending_input: Vec<u8>,
}

/// Configuration of a [`Console`].
pub struct ConsoleConfig {
    /// Where guest output goes: stdout, a file, a pty master… The device writes from the
    /// thread that runs its queue events; a sink that may block (a full pipe) blocks that
    /// thread, so make it non-blocking if that matters (vmkit-legacy's `OutputSink` is a
    /// bounded, non-blocking sink that also buffers what the descriptor cannot take yet):
    /// on `WouldBlock` or any other error the device drops the rest of the chain's output
    /// and counts it.
    pub output: Box<dyn Write + Send>,
    /// How many bytes of host input may wait for guest receive buffers.
    pub input_capacity: usize,
    /// At most this many bytes are taken from one transmit chain; the rest is dropped.
    pub max_tx_bytes_per_chain: u32,
    /// Where the device counts (default [`NoMetrics`]); the crate's README says what each
    /// [`Counter`] means here.
    pub metrics: Arc<dyn DeviceMetrics>,
}

impl ConsoleConfig {
    /// A configuration writing to `output`, with the default bounds.
    pub fn new(output: Box<dyn Write + Send>) -> Self {
        Self {
            output,
            input_capacity: DEFAULT_INPUT_CAPACITY,
            max_tx_bytes_per_chain: DEFAULT_MAX_TX_BYTES_PER_CHAIN,
            metrics: Arc::new(NoMetrics),
        }
    }

    /// Counts into `metrics` (an [`AtomicMetrics`](vmkit_virtio::AtomicMetrics) the VMM
    /// keeps a clone of, say).
    pub fn with_metrics(mut self, metrics: Arc<dyn DeviceMetrics>) -> Self {
        self.metrics = metrics;
        self
    }
}

impl fmt::Debug for ConsoleConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleConfig")
            .field("input_capacity", &self.input_capacity)
            .field("max_tx_bytes_per_chain", &self.max_tx_bytes_per_chain)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// Counters of a [`Console`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleStats {
    /// Transmit chains served.
    pub tx_chains: u64,
    /// Bytes written to the output sink from transmit chains.
    pub tx_bytes: u64,
    /// Transmit bytes not written: over the per-chain bound, or the sink failed.
    pub tx_dropped: u64,
    /// Device-writable descriptors met in transmit chains (skipped).
    pub tx_writable_descriptors: u64,
    /// Receive chains filled (or returned empty).
    pub rx_chains: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Device-readable descriptors met in receive chains (never written).
    pub rx_readable_descriptors: u64,
    /// Chains refused on either queue (malformed, or a buffer outside guest memory).
    pub bad_chains: u64,
    /// Input bytes refused because the buffer was full.
    pub input_refused: u64,
    /// Bytes written through `emerg_wr`.
    pub emergency_bytes: u64,
}

/// The virtio-console device. Put it on a transport as `Arc<Mutex<Console>>`; it works on
/// any [`VirtioMemory`] (`GuestMemoryMmap` by default).
pub struct Console<M: VirtioMemory = GuestMemoryMmap> {
    output: Box<dyn Write + Send>,
    max_tx: u32,
    input: SharedInput,
    active: Option<ActivateContext<M>>,
    scratch: Vec<u8>,
    stats: ConsoleStats,
    metrics: Arc<dyn DeviceMetrics>,
    /// Restored and not activated since: the next activation serves the transmit queue
    /// once (output made available while the VM was paused lost its notification).
    restored: bool,
}

impl<M: VirtioMemory> fmt::Debug for Console<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Console")
            .field("active", &self.active.is_some())
            .field("pending_input", &self.pending_input())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Console {
    /// A console as `config` says, on `GuestMemoryMmap`.
    pub fn new(config: ConsoleConfig) -> Result<Self, Error> {
        Self::for_memory(config)
    }
}

impl<M: VirtioMemory> Console<M> {
    /// A console as `config` says, on guest memory of type `M`.
    pub fn for_memory(config: ConsoleConfig) -> Result<Self, Error> {
        if config.input_capacity == 0 {
            return Err(Error::ZeroInputCapacity);
        }
        if config.max_tx_bytes_per_chain == 0 {
            return Err(Error::ZeroTxLimit);
        }
        Ok(Self {
            output: config.output,
            max_tx: config.max_tx_bytes_per_chain,
            input: Arc::new(Mutex::new(InputState {
                data: VecDeque::new(),
                capacity: config.input_capacity,
                refused: 0,
                kick: None,
                metrics: config.metrics.clone(),
            })),
            active: None,
            scratch: Vec::new(),
            stats: ConsoleStats::default(),
            metrics: config.metrics,
            restored: false,
        })
    }

    /// A handle to push host input from any thread (see [`ConsoleInput::push`]).
    pub fn input(&self) -> ConsoleInput {
        ConsoleInput::new(self.input.clone())
    }

    /// Buffers as much of `bytes` as fits and, if the device is active, delivers what it can
    /// to the receive buffers the guest posted, right away. Returns how many bytes were
    /// taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let n = lock(&self.input).push(bytes);
        self.process_input();
        n
    }

    /// Moves buffered input into the guest's posted receive buffers (what
    /// `process_queue(RECEIVEQ)` does). For VMMs that poll instead of using the notifier.
    pub fn process_input(&mut self) {
        self.fill_rx();
    }

    /// Input bytes buffered and not yet delivered.
    pub fn pending_input(&self) -> usize {
        lock(&self.input).data.len()
    }

    /// The counters.
    pub fn stats(&self) -> ConsoleStats {
        ConsoleStats {
            input_refused: lock(&self.input).refused,
            ..self.stats
        }
    }

    /// Whether the driver has activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The device's state for a snapshot. Nothing is ever in flight (chains are served
    /// synchronously), so `quiesce` has nothing to wait for; input pushed after this is not
    /// in the state.
    pub fn state(&self) -> ConsoleState {
        ConsoleState {
            pending_input: lock(&self.input).data.iter().copied().collect(),
        }
    }

    /// Restores `state` into a freshly built console, before its transport re-activates
    /// it: the buffered input becomes the saved input (delivered to the guest's receive
    /// buffers on activation), and that activation also serves the transmit queue once
    /// (output made available while the VM was paused lost its notification).
    ///
    /// # Errors
    ///
    /// [`Error::StateInput`] if the saved input is larger than this console's buffer.
    pub fn restore(&mut self, state: &ConsoleState) -> Result<(), Error> {
        let mut input = lock(&self.input);
        if state.pending_input.len() > input.capacity {
            return Err(Error::StateInput {
                saved: state.pending_input.len(),
                capacity: input.capacity,
            });
        }
        input.data.clear();
        input.data.extend(&state.pending_input);
        drop(input);
        self.restored = true;
        Ok(())
    }

    /// Copies every transmitq chain to the output.
    fn transmit(&mut self) {
        let limit = self.max_tx;
        let (output, scratch, stats) = (&mut self.output, &mut self.scratch, &mut self.stats);
        let metrics = &*self.metrics;
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(TRANSMITQ)) else {
            return;
        };
        // A ring error ends the loop with the device in DEVICE_NEEDS_RESET.
        while let Ok(Some(chain)) = q.pop() {
            stats.tx_chains += 1;
            metrics.inc(Counter::Requests);
            match chain.descriptors() {
                Ok(descs) => {
                    let (bytes, dropped) = (stats.tx_bytes, stats.tx_dropped);
                    let sink_ok = send_chain(
                        chain.memory(),
                        descs,
                        limit,
                        output.as_mut(),
                        scratch,
                        stats,
                    );
                    metrics.inc(Counter::WriteOps);
                    metrics.add(Counter::WriteBytes, stats.tx_bytes - bytes);
                    if stats.tx_dropped > dropped {
                        metrics.add(Counter::Dropped, stats.tx_dropped - dropped);
                    }
                    if !sink_ok {
                        metrics.inc(Counter::Errors);
                    }
                }
                Err(_) => stats.bad_chains += 1,
            }
            let head = chain.head();
            // The device writes nothing into transmit buffers.
            let _ = q.complete(head, 0);
        }
        let _ = q.signal_used();
        if let Err(e) = output.flush() {
            log::debug!("virtio-console: flushing the output failed: {e}");
        }
    }

    /// Moves buffered input into the receiveq's buffers while there are both. With input
    /// left and no buffers, the queue's pop leaves driver notifications on, so the guest's
    /// next buffers bring the device back here.
    fn fill_rx(&mut self) {
        let (stats, metrics) = (&mut self.stats, &*self.metrics);
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(RECEIVEQ)) else {
            return;
        };
        let mut input = lock(&self.input);
        while !input.data.is_empty() {
            let Ok(Some(chain)) = q.pop() else {
                break;
            };
            stats.rx_chains += 1;
            metrics.inc(Counter::Requests);
            let len = match chain.descriptors() {
                Ok(descs) => fill_chain(chain.memory(), descs, &mut input.data, stats),
                Err(_) => {
                    stats.bad_chains += 1;
                    0
                }
            };
            stats.rx_bytes += u64::from(len);
            if len > 0 {
                metrics.inc(Counter::ReadOps);
                metrics.add(Counter::ReadBytes, u64::from(len));
            }
            let head = chain.head();
            let _ = q.complete(head, len);
        }
        drop(input);
        let _ = q.signal_used();
    }

    fn emergency_write(&mut self, byte: u8) {
        self.stats.emergency_bytes += 1;
        if write_sink(self.output.as_mut(), &[byte]).is_err() {
            self.stats.tx_dropped += 1;
            self.metrics.inc(Counter::Dropped);
            self.metrics.inc(Counter::Errors);
        }
        if let Err(e) = self.output.flush() {
            log::debug!("virtio-console: flushing the output failed: {e}");
        }
    }
}

/// Writes all of `buf` unless the sink fails; `Err` carries how much was written.
fn write_sink(sink: &mut dyn Write, buf: &[u8]) -> Result<(), usize> {
    let mut done = 0;
    while done < buf.len() {
        match sink.write(&buf[done..]) {
            Ok(0) => return Err(done),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("virtio-console: output failed: {e}");
                return Err(done);
            }
        }
    }
    Ok(())
}

/// Copies the device-readable buffers of one transmit chain to the sink, up to `limit`.
/// Returns whether the sink took everything offered to it (`false`: it failed).
fn send_chain<M: VirtioMemory>(
    mem: &M,
    descs: &[Descriptor],
    limit: u32,
    sink: &mut dyn Write,
    scratch: &mut Vec<u8>,
    stats: &mut ConsoleStats,
) -> bool {
    let mut taken: u32 = 0;
    let mut sink_ok = true;
    for d in descs {
        if d.is_write_only() {
            stats.tx_writable_descriptors += 1;
            continue;
        }
        let n = d.len().min(limit - taken);
        stats.tx_dropped += u64::from(d.len() - n);
        taken += n;
        let mut off: u32 = 0;
        while off < n {
            // At most CHUNK, so the casts are lossless.
            let len = (n - off).min(CHUNK as u32);
            if !sink_ok {
                stats.tx_dropped += u64::from(n - off);
                break;
            }
            scratch.resize(len as usize, 0);
            // The buffer was checked to lie inside guest memory when the chain was popped;
            // `off < n <= d.len()` keeps the address inside it.
            let addr = GuestAddress(d.addr().0 + u64::from(off));
            if mem.read_slice(scratch, addr).is_err() {
                stats.tx_dropped += u64::from(n - off);
                break;
            }
            match write_sink(sink, scratch) {
                Ok(()) => stats.tx_bytes += u64::from(len),
                Err(done) => {
                    // `done <= len`.
                    stats.tx_bytes += done as u64;
                    stats.tx_dropped += u64::from(n - off) - done as u64;
                    sink_ok = false;
                    break;
                }
            }
            off += len;
        }
    }
    sink_ok
}

/// Moves input into the device-writable buffers of one receive chain; returns the used
/// length.
fn fill_chain<M: VirtioMemory>(
    mem: &M,
    descs: &[Descriptor],
    input: &mut VecDeque<u8>,
    stats: &mut ConsoleStats,
) -> u32 {
    let mut written: u32 = 0;
    for d in descs {
        if !d.is_write_only() {
            // The driver's data: never written.
            stats.rx_readable_descriptors += 1;
            continue;
        }
        let room = d.len().min(u32::MAX - written) as usize;
        let n = room.min(input.len());
        if n == 0 {
            continue;
        }
        let mut done = 0usize;
        let (a, b) = input.as_slices();
        for piece in [a, b] {
            let take = piece.len().min(n - done);
            if take == 0 {
                continue;
            }
            // Inside the descriptor's buffer, which was checked when the chain was popped.
            let addr = GuestAddress(d.addr().0 + done as u64);
            if mem.write_slice(&piece[..take], addr).is_err() {
                break;
            }
            done += take;
        }
        input.drain(..done);
        // `done <= room <= u32::MAX - written`.
        written += done as u32;
        if done < n {
            break;
        }
    }
    written
}

impl<M: VirtioMemory> VirtioDevice<M> for Console<M> {
    fn device_type(&self) -> u32 {
        CONSOLE_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[CONSOLE_QUEUE_SIZE, CONSOLE_QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_CONSOLE_F_EMERG_WRITE
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, _data: &mut [u8]) {
        // cols, rows and max_nr_ports are 0 (no SIZE, no MULTIPORT); emerg_wr is
        // write-only and reads 0.
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // emerg_wr takes the low byte of a 1-, 2- or 4-byte write at its start; everything
        // else is read-only.
        if offset == CONFIG_EMERG_WR_OFFSET {
            if let Some(byte) = data.first() {
                self.emergency_write(*byte);
            }
        }
    }

    fn activate(&mut self, context: ActivateContext<M>) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        for q in [RECEIVEQ, TRANSMITQ] {
            if context.queue(q).is_none() {
                return Err(ActivateError::MissingQueue(q));
            }
        }
        let kick = context
            .queue(RECEIVEQ)
            .map(|q| q.notifier().try_clone())
            .transpose()
            .map_err(ActivateError::Io)?;
        lock(&self.input).kick = kick;
        let mut context = context;
        for q in context.queues_mut() {
            q.set_metrics(self.metrics.clone());
        }
        self.active = Some(context);
        // Input typed before the driver was ready goes to buffers posted before DRIVER_OK.
        self.fill_rx();
        if std::mem::take(&mut self.restored) {
            self.transmit();
        }
        Ok(())
    }

    fn process_queue(&mut self, index: u16) {
        self.metrics.inc(Counter::Notifications);
        match index {
            RECEIVEQ => self.fill_rx(),
            TRANSMITQ => self.transmit(),
            _ => {}
        }
    }

    fn reset(&mut self) -> Option<ActivateContext<M>> {
        // Buffered input stays for the next activation.
        lock(&self.input).kick = None;
        self.restored = false;
        self.active.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_bounds_refused() {
        let mut c = ConsoleConfig::new(Box::new(io::sink()));
        c.input_capacity = 0;
        assert!(matches!(Console::new(c), Err(Error::ZeroInputCapacity)));
        let mut c = ConsoleConfig::new(Box::new(io::sink()));
        c.max_tx_bytes_per_chain = 0;
        assert!(matches!(Console::new(c), Err(Error::ZeroTxLimit)));
    }

    #[test]
    fn identity_and_config_space() {
        let mut c = Console::new(ConsoleConfig::new(Box::new(io::sink()))).unwrap();
        assert_eq!(c.device_type(), 3);
        assert_eq!(c.queue_max_sizes(), &[256, 256]);
        assert_eq!(c.device_features(), 1 << 2);
        for off in 0..CONFIG_SPACE_SIZE + 4 {
            let mut b = [0u8; 1];
            c.read_config(off, &mut b);
            assert_eq!(b, [0]);
        }
        // Writes to cols/rows/max_nr_ports are ignored.
        c.write_config(0, &[1, 2, 3, 4]);
        c.write_config(4, &[1, 2, 3, 4]);
        c.write_config(9, b"x");
        assert_eq!(c.stats().emergency_bytes, 0);
        assert!(!c.is_active());
        assert!(c.reset().is_none());
    }

    #[test]
    fn state_round_trip_and_oversized_input() {
        let mut c = Console::new(ConsoleConfig::new(Box::new(io::sink()))).unwrap();
        assert_eq!(c.state().pending_input, b"");
        c.enqueue_input(b"abc");
        let state = c.state();
        assert_eq!(state.pending_input, b"abc");
        let mut cfg = ConsoleConfig::new(Box::new(io::sink()));
        cfg.input_capacity = 3;
        let mut fresh = Console::new(cfg).unwrap();
        fresh.enqueue_input(b"x");
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), state, "the saved input replaces the buffer");
        let big = ConsoleState {
            pending_input: vec![0; 4],
        };
        assert_eq!(
            fresh.restore(&big).unwrap_err().to_string(),
            "4 bytes of saved console input; the input buffer holds at most 3"
        );
        assert_eq!(fresh.pending_input(), 3);
    }

    #[test]
    fn input_is_bounded() {
        let mut cfg = ConsoleConfig::new(Box::new(io::sink()));
        cfg.input_capacity = 10;
        let mut c = Console::new(cfg).unwrap();
        let input = c.input();
        assert_eq!(input.push(b"0123456"), 7);
        assert_eq!(c.enqueue_input(b"789abc"), 3);
        assert_eq!(input.push(b"z"), 0);
        assert_eq!(input.free(), 0);
        assert_eq!(c.pending_input(), 10);
        assert_eq!(c.stats().input_refused, 4);
    }

    struct Failing(usize);
    impl Write for Failing {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.0);
            self.0 -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn sink_errors_are_reported_with_progress() {
        assert_eq!(write_sink(&mut Failing(3), b"hello"), Err(3));
        assert_eq!(write_sink(&mut Failing(5), b"hello"), Ok(()));
        assert_eq!(write_sink(&mut Vec::new(), b""), Ok(()));
    }
}
