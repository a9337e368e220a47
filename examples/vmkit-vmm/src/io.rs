//! The host's side of the guest's streams, as event-loop subscribers: stdin to the serial
//! port, stdin or a pty to the virtio-console, and the guest's output drained to its
//! destinations.

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmkit_legacy::OutputSink;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::devices::GuestSerial;
use crate::terminal::Escape;

/// Keys from a terminal kept while the UART's FIFO is full.
pub const TERMINAL_BACKLOG: usize = 4096;

/// Feeds host stdin to the guest's serial port.
///
/// From a pipe or file, stdin is not read while bytes wait for room in the UART's FIFO; the
/// UART's "input drained" eventfd says when to try again. From a terminal (where the console
/// escape is looked for) stdin is always read, so that Ctrl-A x works when the guest does not
/// read its serial port; what waits for the FIFO is bounded by [`TERMINAL_BACKLOG`], and keys
/// beyond it are dropped, as a UART drops an overrun.
pub struct StdinToSerial {
    serial: Arc<Mutex<GuestSerial>>,
    drained: EventFd,
    /// Bytes read from stdin that the UART's FIFO had no room for yet.
    pending: Vec<u8>,
    /// stdin is out of the epoll set until the FIFO drains.
    paused: bool,
    /// The console escape, when stdin is a terminal.
    escape: Option<Escape>,
}

impl StdinToSerial {
    pub fn new(serial: Arc<Mutex<GuestSerial>>, drained: EventFd, escape: Option<Escape>) -> Self {
        Self {
            serial,
            drained,
            pending: Vec::new(),
            paused: false,
            escape,
        }
    }

    /// Moves pending bytes into the UART; returns whether all of them fit.
    fn flush(&mut self) -> bool {
        if !self.pending.is_empty() {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let taken = serial.enqueue_input(&self.pending);
            self.pending.drain(..taken);
        }
        self.pending.is_empty()
    }
}

impl MutEventSubscriber for StdinToSerial {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let stdin = std::io::stdin();
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
            if self.flush() && self.paused {
                // Room again: read stdin again.
                self.paused = ops.add(Events::new(&stdin, EventSet::IN)).is_err();
            }
            return;
        }
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            stdin.lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // End of input, or the terminal hung up: nothing more to forward.
            let _ = ops.remove(Events::empty(&stdin));
            return;
        }
        let Some(escape) = &mut self.escape else {
            self.pending.extend_from_slice(&buf[..n]);
            if !self.flush() {
                // The FIFO is full: stop reading (epoll is level-triggered) until it drains.
                self.paused = ops.remove(Events::empty(&stdin)).is_ok();
            }
            return;
        };
        let keys = escape.pass(&buf[..n]);
        let room = TERMINAL_BACKLOG.saturating_sub(self.pending.len());
        self.pending.extend(keys.iter().take(room));
        self.flush();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // stdin may be /dev/null or a regular file, which epoll refuses: then there is no
        // input to forward, and that is fine.
        let _ = ops.add(Events::new(&std::io::stdin(), EventSet::IN));
        let _ = ops.add(Events::new(&self.drained, EventSet::IN));
    }
}

/// Feeds a host file descriptor (stdin or a pty master) to the virtio-console.
///
/// Input the console's buffer cannot take is dropped, as a UART drops an overrun: the host side
/// of a console has no flow control here.
pub struct InputToConsole<F: AsFd + Read> {
    source: F,
    input: vmkit_virtio_console::ConsoleInput,
    /// The console escape, when the source is stdin on a terminal.
    escape: Option<Escape>,
}

impl<F: AsFd + Read> InputToConsole<F> {
    pub fn new(
        source: F,
        input: vmkit_virtio_console::ConsoleInput,
        escape: Option<Escape>,
    ) -> Self {
        Self {
            source,
            input,
            escape,
        }
    }
}

impl<F: AsFd + Read> MutEventSubscriber for InputToConsole<F> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 4096];
        let n = if events.event_set().contains(EventSet::IN) {
            match self.source.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(_) => 0,
            }
        } else {
            0
        };
        if n == 0 {
            let fd = self.source.as_fd().as_raw_fd();
            let _ = ops.remove(Events::empty_raw(fd));
            return;
        }
        match &mut self.escape {
            Some(escape) => self.input.push(&escape.pass(&buf[..n])),
            None => self.input.push(&buf[..n]),
        };
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.source.as_fd().as_raw_fd();
        // A source epoll refuses (a regular file, /dev/null) simply gives no input.
        let _ = ops.add(Events::new_raw(fd, EventSet::IN));
    }
}

/// Writes what waits in an [`OutputSink`] once its descriptor takes it: woken by the sink
/// when bytes start waiting, it watches the descriptor for `EPOLLOUT` until the sink is empty
/// (so `EAGAIN` is retried only when the descriptor is writable, never in a loop).
pub struct OutputDrain {
    sink: OutputSink,
    /// The descriptor is in the epoll set for `EPOLLOUT`.
    watching: bool,
}

impl OutputDrain {
    pub fn new(sink: OutputSink) -> Self {
        Self {
            sink,
            watching: false,
        }
    }
}

impl MutEventSubscriber for OutputDrain {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let Some(fd) = self.sink.fd() else {
            return;
        };
        if events.fd() == self.sink.wakeup().as_raw_fd() {
            let _ = self.sink.wakeup().read();
            if !self.watching && !self.sink.drain() {
                // A descriptor epoll refuses (a regular file) never waits for a reader.
                self.watching = ops.add(Events::new_raw(fd, EventSet::OUT)).is_ok();
            }
            return;
        }
        // Writable, or failed (then the sink drops what waits): either way, drain.
        if self.sink.drain() && self.watching {
            let _ = ops.remove(Events::empty_raw(fd));
            self.watching = false;
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.sink.wakeup(), EventSet::IN));
    }
}
