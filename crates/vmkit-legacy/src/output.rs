//! A bounded, non-blocking sink for guest output (a serial port's, a console's).
//!
//! A UART writes each byte the guest sends on the vCPU thread, inside the device's lock; a
//! console writes on the thread that serves its queue. Written straight to a blocking stdout
//! that nobody reads, either stalls that thread for as long as the reader sleeps.
//! [`OutputSink`] never blocks there: what the descriptor does not take at once waits in a
//! bounded buffer, drained when the VMM's event loop sees the descriptor writable
//! (`EPOLLOUT`); what does not fit in the buffer is dropped and counted. While the reader
//! keeps up nothing is lost and the order is kept.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// The default size of an [`OutputSink`]'s buffer.
pub const DEFAULT_OUTPUT_BUFFER: usize = 1 << 20;

/// Configuration of an [`OutputSink`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSinkConfig {
    /// What the log lines call the sink (`"serial file"`, `"stdout"`).
    pub name: String,
    /// Bytes that may wait for the descriptor to become writable; beyond, output is dropped.
    pub capacity: usize,
    /// After this many bytes of output (written, waiting, or dropped for a full buffer),
    /// further output is dropped: a cap on an output file's size.
    pub max_bytes: Option<u64>,
}

impl OutputSinkConfig {
    /// A sink called `name` with a [`DEFAULT_OUTPUT_BUFFER`] buffer and no size cap.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            capacity: DEFAULT_OUTPUT_BUFFER,
            max_bytes: None,
        }
    }
}

/// Counters of an [`OutputSink`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OutputStats {
    /// Bytes the descriptor took.
    pub written: u64,
    /// Bytes dropped: the buffer was full, the cap was reached, or the descriptor failed
    /// (a reader that closed its end, a full disk).
    pub dropped: u64,
    /// Bytes waiting in the buffer now.
    pub buffered: u64,
    /// Writes the descriptor refused with `EAGAIN` (each retried only once it is writable).
    pub would_block: u64,
}

/// How bytes go to the descriptor without blocking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// `write(2)`: the descriptor is non-blocking, or a regular file (which never blocks
    /// for a reader).
    Write,
    /// `send(2)` with `MSG_DONTWAIT`: a socket, whatever its file status flags.
    Send,
    /// A blocking pipe or terminal shared with others: `poll(2)` with no timeout first, then
    /// at most `PIPE_BUF` bytes, which a pipe reported writable takes without blocking.
    Gated,
}

/// What became of a write.
enum Flow {
    /// Everything was taken.
    Done,
    /// The descriptor is full (`EAGAIN`).
    Blocked,
    /// The descriptor failed: the rest is dropped.
    Failed,
}

struct Inner {
    config: OutputSinkConfig,
    fd: Option<OwnedFd>,
    mode: Mode,
    buf: VecDeque<u8>,
    /// Bytes accepted so far (for `max_bytes`).
    accepted: u64,
    stats: OutputStats,
    /// Each kind of loss is logged once.
    said_full: bool,
    said_cap: bool,
    said_error: bool,
}

/// A bounded, non-blocking [`Write`] sink for guest output, shared between the device that
/// writes (a clone per device: [`Serial`](crate::Serial), a virtio-console) and the VMM's
/// event loop that drains it.
///
/// - [`write`](Write::write) never blocks and never fails: bytes go to the descriptor while
///   it takes them; the rest waits in a buffer of [`OutputSinkConfig::capacity`] bytes, and
///   what does not fit is dropped, counted in [`OutputStats::dropped`] and logged once.
///   Once bytes wait, later writes queue behind them (the order is kept) and the
///   descriptor is not tried again until the event loop calls [`drain`](Self::drain).
/// - [`wakeup`](Self::wakeup) becomes readable when bytes start waiting: the event loop
///   then watches [`fd`](Self::fd) for `EPOLLOUT` and calls [`drain`](Self::drain) when it is
///   writable, until that returns `true` (nothing left), and stops watching. No retry
///   happens in between: no busy loop on `EAGAIN`.
/// - Before [`connect`](Self::connect), output is buffered; connecting delivers it. A VMM
///   builds its devices with unconnected sinks and opens the output files last, when
///   nothing else can fail.
/// - The descriptor should be non-blocking and the VMM's own open file description:
///   [`reopen_nonblocking`] makes one from a shared stdout without touching the parent's
///   (setting `O_NONBLOCK` on an inherited stdout would change it for the shell too).
///   Sockets are written with `MSG_DONTWAIT` whatever their flags; a blocking pipe is
///   polled before each write of at most `PIPE_BUF` bytes (which `POLLOUT` guarantees room
///   for). A terminal in blocking mode is refused: `POLLOUT` there promises no room for any
///   given write (a reader's XOFF stops it), so no write to it could be sure not to block.
///
/// ```
/// use std::io::{Read, Write};
/// use std::os::unix::net::UnixStream;
/// use vmkit_legacy::{OutputSink, OutputSinkConfig};
///
/// let (ours, mut reader) = UnixStream::pair()?;
/// let sink = OutputSink::new(OutputSinkConfig::new("stdout"))?;
/// let mut for_the_serial = sink.clone(); // e.g. Serial::new(line, Box::new(sink.clone()))
/// for_the_serial.write_all(b"early ")?; // buffered: not connected yet
/// sink.connect(ours.into())?;
/// for_the_serial.write_all(b"boot\n")?;
/// let mut got = [0u8; 11];
/// reader.read_exact(&mut got)?;
/// assert_eq!(&got, b"early boot\n");
/// assert_eq!(sink.stats().written, 11);
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone)]
pub struct OutputSink {
    inner: Arc<Mutex<Inner>>,
    wakeup: Arc<EventFd>,
}

impl fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("OutputSink")
            .field("name", &inner.config.name)
            .field("mode", &inner.mode)
            .field("stats", &inner.current_stats())
            .finish_non_exhaustive()
    }
}

fn cvt(ret: isize) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// The file type bits of `fd`'s `st_mode`.
fn file_type(fd: RawFd) -> io::Result<libc::mode_t> {
    // SAFETY: an all-zero `stat` is a valid value; fstat fills it or fails.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT)
}

fn is_nonblocking(fd: RawFd) -> io::Result<bool> {
    // SAFETY: F_GETFL only reads the descriptor's status flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags & libc::O_NONBLOCK != 0)
}

/// Why [`OutputSink::connect`] refuses a terminal in blocking mode.
const BLOCKING_TERMINAL: &str = "a terminal in blocking mode can block any write, even after \
     poll says it is writable (a reader that sent XOFF, a line discipline out of room): give \
     a non-blocking descriptor (reopen_nonblocking opens one through /proc/self/fd)";

fn is_terminal(fd: RawFd) -> bool {
    // SAFETY: isatty only queries the descriptor (TCGETS).
    unsafe { libc::isatty(fd) == 1 }
}

/// Waits at most `timeout_ms` (0: not at all) for `fd` to be writable.
fn writable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n > 0 && p.revents & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0
}

/// A descriptor writing where `fd` writes, which the caller may make non-blocking alone.
///
/// A pipe, FIFO or terminal (stdout, typically) is opened again through `/proc/self/fd`,
/// non-blocking and close-on-exec: a new open file description, so its `O_NONBLOCK` does not
/// reach the shell or the other processes sharing `fd`. A regular file, a block device or a
/// socket is duplicated (close-on-exec): a file never blocks for a reader, a duplicate keeps
/// the shared offset (`vmkit > log` appends where the shell left off), and a socket is
/// written with `MSG_DONTWAIT`. When opening again fails (no `/proc`, a FIFO without a
/// reader), `fd` is duplicated and the sink polls before each write (a pipe), or refuses it
/// (a terminal: see [`OutputSink`]).
pub fn reopen_nonblocking(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let kind = file_type(fd.as_raw_fd())?;
    if kind == libc::S_IFIFO || kind == libc::S_IFCHR {
        let path = format!("/proc/self/fd/{}\0", fd.as_raw_fd());
        let flags = libc::O_WRONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;
        // SAFETY: `path` is NUL-terminated; open returns a new descriptor or -1.
        let new = unsafe { libc::open(path.as_ptr().cast(), flags) };
        if new >= 0 {
            // SAFETY: `new` was just opened and nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(new) });
        }
        log::debug!(
            "cannot open fd {} again ({}): polling it before each write",
            fd.as_raw_fd(),
            io::Error::last_os_error()
        );
    }
    fd.try_clone_to_owned()
}

impl Inner {
    fn current_stats(&self) -> OutputStats {
        OutputStats {
            buffered: self.buf.len() as u64,
            ..self.stats
        }
    }

    /// Writes as much of `data` as the descriptor takes now; returns how much and why it
    /// stopped.
    fn write_out(&mut self, data: &[u8]) -> (usize, Flow) {
        let Some(fd) = self.fd.as_ref().map(AsRawFd::as_raw_fd) else {
            return (0, Flow::Blocked);
        };
        let mut done = 0;
        while done < data.len() {
            match write_once(fd, self.mode, &data[done..]) {
                Ok(0) => return (done, Flow::Failed),
                Ok(n) => {
                    done += n;
                    self.stats.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.would_block += 1;
                    return (done, Flow::Blocked);
                }
                Err(e) => {
                    if !std::mem::replace(&mut self.said_error, true) {
                        log::warn!("{}: {e}: its output is dropped", self.config.name);
                    }
                    return (done, Flow::Failed);
                }
            }
        }
        (done, Flow::Done)
    }

    /// `data` cut to what `max_bytes` still allows, the rest counted as dropped.
    fn within_cap<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        let Some(max) = self.config.max_bytes else {
            return data;
        };
        let room = usize::try_from(max.saturating_sub(self.accepted)).unwrap_or(usize::MAX);
        if data.len() <= room {
            return data;
        }
        self.stats.dropped += (data.len() - room) as u64;
        if !std::mem::replace(&mut self.said_cap, true) {
            log::warn!(
                "{}: {max} bytes written (max_size): further output is dropped",
                self.config.name
            );
        }
        &data[..room]
    }

    /// Buffers what fits of `data`, dropping and counting the rest.
    fn enqueue(&mut self, data: &[u8]) {
        let room = self.config.capacity.saturating_sub(self.buf.len());
        let n = data.len().min(room);
        self.buf.extend(&data[..n]);
        if n < data.len() {
            self.stats.dropped += (data.len() - n) as u64;
            if !std::mem::replace(&mut self.said_full, true) {
                log::warn!(
                    "{}: nobody reads it and its {}-byte buffer is full: output is dropped \
                     (counted in the metrics) until the reader catches up",
                    self.config.name,
                    self.config.capacity
                );
            }
        }
    }

    /// Takes `data`; returns whether bytes started waiting (the event loop must be told).
    fn push(&mut self, data: &[u8]) -> bool {
        let data = self.within_cap(data);
        self.accepted += data.len() as u64;
        if data.is_empty() {
            return false;
        }
        let was_empty = self.buf.is_empty();
        let mut rest = data;
        if was_empty && self.fd.is_some() {
            let (n, flow) = self.write_out(data);
            rest = &data[n..];
            if let Flow::Failed = flow {
                self.stats.dropped += rest.len() as u64;
                return false;
            }
        }
        self.enqueue(rest);
        was_empty && !self.buf.is_empty() && self.fd.is_some()
    }

    /// Writes buffered bytes until the descriptor is full; `true` when none are left.
    fn drain(&mut self) -> bool {
        // Out of `self` while written from, so `write_out` can borrow `self`.
        let mut buf = std::mem::take(&mut self.buf);
        let left = loop {
            let (n, flow) = self.write_out(buf.as_slices().0);
            buf.drain(..n);
            match flow {
                Flow::Done if buf.is_empty() => break true,
                Flow::Done => {}
                Flow::Blocked => break false,
                Flow::Failed => {
                    self.stats.dropped += buf.len() as u64;
                    buf.clear();
                    break true;
                }
            }
        };
        self.buf = buf;
        left
    }
}

fn write_once(fd: RawFd, mode: Mode, data: &[u8]) -> io::Result<usize> {
    let ret = match mode {
        // SAFETY: `data` is valid for reads of `data.len()` bytes during the call.
        Mode::Write => unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) },
        // SAFETY: as above; MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
        Mode::Send => unsafe {
            libc::send(
                fd,
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        },
        Mode::Gated => {
            if !writable(fd, 0) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let len = data.len().min(libc::PIPE_BUF);
            // SAFETY: `data` is valid for reads of at least `len` bytes during the call.
            unsafe { libc::write(fd, data.as_ptr().cast(), len) }
        }
    };
    cvt(ret)
}

impl OutputSink {
    /// An unconnected sink as `config` says: output is buffered until
    /// [`connect`](Self::connect).
    pub fn new(config: OutputSinkConfig) -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                config,
                fd: None,
                mode: Mode::Write,
                buf: VecDeque::new(),
                accepted: 0,
                stats: OutputStats::default(),
                said_full: false,
                said_cap: false,
                said_error: false,
            })),
            wakeup: Arc::new(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends the output to `fd` from now on (see [`reopen_nonblocking`] for stdout),
    /// starting with what was buffered before.
    ///
    /// # Errors
    ///
    /// `fstat` or `fcntl` on `fd` failing; [`io::ErrorKind::InvalidInput`] for a terminal in
    /// blocking mode (see above).
    pub fn connect(&self, fd: OwnedFd) -> io::Result<()> {
        let raw = fd.as_raw_fd();
        let kind = file_type(raw)?;
        let mode = if kind == libc::S_IFSOCK {
            Mode::Send
        } else if is_nonblocking(raw)? || kind == libc::S_IFREG || kind == libc::S_IFBLK {
            Mode::Write
        } else if is_terminal(raw) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                BLOCKING_TERMINAL,
            ));
        } else {
            Mode::Gated
        };
        let mut inner = self.lock();
        inner.fd = Some(fd);
        inner.mode = mode;
        if !inner.drain() {
            self.wake();
        }
        Ok(())
    }

    fn wake(&self) {
        // Fails only when the counter is about to overflow: a wakeup is pending anyway.
        let _ = self.wakeup.write(1);
    }

    /// Readable when bytes start waiting for the descriptor: watch it, then watch
    /// [`fd`](Self::fd) for `EPOLLOUT`. Read it (to clear it) when it fires.
    pub fn wakeup(&self) -> &EventFd {
        &self.wakeup
    }

    /// The descriptor output goes to (`None` before [`connect`](Self::connect)).
    pub fn fd(&self) -> Option<RawFd> {
        self.lock().fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Writes waiting bytes until the descriptor is full; returns `true` when none are left
    /// (stop watching for `EPOLLOUT` then). A failed descriptor drops what waits.
    pub fn drain(&self) -> bool {
        self.lock().drain()
    }

    /// At the end: drains what waits, waiting for the descriptor as long as the reader makes
    /// progress, but no more than `stall` at a time. Returns the bytes left (and counted as
    /// dropped).
    pub fn finish(&self, stall: Duration) -> u64 {
        loop {
            if self.drain() {
                return 0;
            }
            let Some(fd) = self.fd() else {
                break;
            };
            let start = Instant::now();
            let ms = i32::try_from(stall.as_millis()).unwrap_or(i32::MAX);
            if !writable(fd, ms) && start.elapsed() >= stall {
                break;
            }
        }
        let mut inner = self.lock();
        let left = inner.buf.len() as u64;
        inner.buf.clear();
        inner.stats.dropped += left;
        if left > 0 {
            log::warn!("{}: {left} bytes of output never read", inner.config.name);
        }
        left
    }

    /// The counters.
    pub fn stats(&self) -> OutputStats {
        self.lock().current_stats()
    }
}

impl Write for OutputSink {
    /// Takes all of `buf`, always: written, buffered, or dropped and counted.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.lock().push(buf) {
            self.wake();
        }
        Ok(buf.len())
    }

    /// Does nothing: waiting bytes leave through [`drain`](Self::drain), never by blocking.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Read;
    use std::os::fd::AsFd;

    /// A pipe holding `size` bytes: (read end, write end), the write end non-blocking or not.
    fn pipe(size: i32, nonblocking: bool) -> (File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both were just opened and nothing else owns them.
        let (r, w) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: F_SETPIPE_SZ takes an int; the pipe is ours.
        let got = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        assert_eq!(got, size);
        // SAFETY: F_SETFL on our own descriptors; O_NONBLOCK on the read end so tests
        // can read what is there without waiting.
        unsafe {
            libc::fcntl(r.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            if nonblocking {
                libc::fcntl(w.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
            }
        }
        (r, w)
    }

    fn read_all(r: &mut File) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = r.read(&mut buf) {
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    fn sink(capacity: usize, max_bytes: Option<u64>) -> OutputSink {
        OutputSink::new(OutputSinkConfig {
            name: "test".into(),
            capacity,
            max_bytes,
        })
        .unwrap()
    }

    /// 0, 1, 2, ... 250, 0, 1, ...: a shifted or reordered byte shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_reader_that_keeps_up_gets_everything_at_once() {
        let (mut r, w) = pipe(4096, true);
        let s = sink(100, None);
        s.connect(w).unwrap();
        let mut dev = s.clone();
        for chunk in pattern(20_000).chunks(1000) {
            dev.write_all(chunk).unwrap();
            assert_eq!(read_all(&mut r).len(), chunk.len());
        }
        let st = s.stats();
        assert_eq!((st.written, st.dropped, st.buffered), (20_000, 0, 0));
        assert!(s.wakeup().read().is_err(), "no wakeup: nothing waited");
    }

    #[test]
    fn a_full_descriptor_buffers_then_drops_and_counts() {
        let (mut r, w) = pipe(4096, true);
        let s = sink(1000, None);
        s.connect(w).unwrap();
        let mut dev = s.clone();
        let data = pattern(4096 + 1000 + 500);
        dev.write_all(&data).unwrap();
        let st = s.stats();
        assert_eq!((st.written, st.buffered, st.dropped), (4096, 1000, 500));
        assert_eq!(st.would_block, 1);
        assert_eq!(s.wakeup().read().unwrap(), 1, "the event loop is told once");
        // More output while full is dropped without another write attempt.
        dev.write_all(b"x").unwrap();
        let st = s.stats();
        assert_eq!((st.dropped, st.would_block), (501, 1));
        assert!(s.wakeup().read().is_err());
        // What reached the pipe is the start of the data, in order.
        assert_eq!(read_all(&mut r), &data[..4096]);
    }

    #[test]
    fn eagain_is_retried_on_drain_and_the_order_is_kept() {
        let (mut r, w) = pipe(4096, true);
        let s = sink(10_000, None);
        s.connect(w).unwrap();
        let mut dev = s.clone();
        let data = pattern(12_000);
        dev.write_all(&data[..6000]).unwrap();
        assert_eq!(s.stats().buffered, 6000 - 4096);
        // The reader makes room, but the sink is not told yet (no EPOLLOUT handled): what
        // is written now queues behind what waits rather than jumping ahead of it.
        let mut got = read_all(&mut r);
        dev.write_all(&data[6000..]).unwrap();
        assert_eq!(s.stats().buffered, 12_000 - 4096);
        // The "EPOLLOUT" drains: one pipe-full per call, then false until the last.
        let mut drains = 0;
        while !s.drain() {
            drains += 1;
            got.extend(read_all(&mut r));
        }
        got.extend(read_all(&mut r));
        assert_eq!(got, data);
        assert!(drains >= 1);
        let st = s.stats();
        assert_eq!((st.written, st.dropped, st.buffered), (12_000, 0, 0));
    }

    #[test]
    fn output_before_connect_waits_and_is_delivered_first() {
        let (mut r, w) = pipe(4096, true);
        let s = sink(100, None);
        let mut dev = s.clone();
        dev.write_all(b"before ").unwrap();
        assert_eq!(s.stats().buffered, 7);
        assert!(
            s.wakeup().read().is_err(),
            "nothing to watch before connect"
        );
        s.connect(w).unwrap();
        dev.write_all(b"after").unwrap();
        assert_eq!(read_all(&mut r), b"before after");
    }

    #[test]
    fn max_bytes_caps_the_output() {
        let (mut r, w) = pipe(4096, true);
        let s = sink(100, Some(10));
        s.connect(w).unwrap();
        let mut dev = s.clone();
        dev.write_all(b"0123456").unwrap();
        dev.write_all(b"789abc").unwrap();
        dev.write_all(b"def").unwrap();
        assert_eq!(read_all(&mut r), b"0123456789");
        let st = s.stats();
        assert_eq!((st.written, st.dropped), (10, 6));
    }

    #[test]
    fn a_blocking_pipe_is_polled_not_blocked_on() {
        // A shared stdout that could not be opened again: writes must still never block
        // (if they did, this test would hang).
        let (mut r, w) = pipe(4096, false);
        let s = sink(1000, None);
        s.connect(w).unwrap();
        assert_eq!(s.lock().mode, Mode::Gated);
        let mut dev = s.clone();
        let data = pattern(10_000);
        dev.write_all(&data).unwrap();
        let st = s.stats();
        assert_eq!(st.written + st.buffered + st.dropped, 10_000);
        assert!(st.written <= 4096 && st.buffered == 1000, "{st:?}");
        let mut got = read_all(&mut r);
        while !s.drain() {
            got.extend(read_all(&mut r));
        }
        got.extend(read_all(&mut r));
        assert_eq!(got.len() as u64, st.written + st.buffered);
        assert_eq!(got, data[..got.len()]);
    }

    /// A pty pair: the master (never read here), the slave (blocking).
    fn pty() -> (OwnedFd, OwnedFd) {
        let (mut master, mut slave) = (-1, -1);
        // SAFETY: the two pointers are to live ints; the name, termios and winsize are NULL.
        let ret = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        // SAFETY: openpty opened both and nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
    }

    #[test]
    fn a_blocking_terminal_is_refused_and_a_reopened_one_never_blocks() {
        let (_master, slave) = pty();
        assert!(!is_nonblocking(slave.as_raw_fd()).unwrap());
        let s = sink(1000, None);
        let e = s.connect(slave.try_clone().unwrap()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            e.to_string().starts_with("a terminal in blocking mode"),
            "{e}"
        );
        // Its own non-blocking description: far more than the pty takes, its reader never
        // reads, and the writer must still return (guarded: a blocked write fails the test
        // instead of hanging it).
        let reopened = reopen_nonblocking(slave.as_fd()).unwrap();
        assert!(!is_nonblocking(slave.as_raw_fd()).unwrap());
        s.connect(reopened).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let mut dev = s.clone();
        std::thread::spawn(move || {
            dev.write_all(&pattern(1 << 20)).unwrap();
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(Duration::from_secs(20))
            .expect("a write to a terminal nobody reads blocked");
        let st = s.stats();
        assert!(st.dropped > 0 && st.buffered == 1000, "{st:?}");
        assert_eq!(st.written + st.buffered + st.dropped, 1 << 20);
    }

    #[test]
    fn a_socket_is_sent_to_without_waiting() {
        let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let s = sink(1 << 10, None);
        s.connect(ours.into()).unwrap();
        assert_eq!(s.lock().mode, Mode::Send);
        let mut dev = s.clone();
        // Far more than a socket buffer: it would block a plain write.
        dev.write_all(&pattern(4 << 20)).unwrap();
        let st = s.stats();
        assert!(st.dropped > 0 && st.buffered == 1 << 10, "{st:?}");
        peer.set_nonblocking(true).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let n = peer.read(&mut buf).unwrap();
        assert_eq!(buf[..n], pattern(n)[..]);
    }

    #[test]
    fn a_closed_reader_drops_output_and_nothing_waits() {
        let (r, w) = pipe(4096, true);
        drop(r);
        let s = sink(100, None);
        s.connect(w).unwrap();
        let mut dev = s.clone();
        dev.write_all(b"lost").unwrap();
        dev.write_all(b"also lost").unwrap();
        let st = s.stats();
        assert_eq!((st.written, st.dropped, st.buffered), (0, 13, 0));
        assert_eq!(s.finish(Duration::ZERO), 0);
    }

    #[test]
    fn finish_gives_up_on_a_reader_that_never_reads() {
        let (_r, w) = pipe(4096, true);
        let s = sink(100, None);
        s.connect(w).unwrap();
        s.clone().write_all(&pattern(4096 + 50)).unwrap();
        assert_eq!(s.finish(Duration::from_millis(10)), 50);
        assert_eq!(s.stats().dropped, 50);
    }

    #[test]
    fn its_descriptors_are_close_on_exec() {
        let (_r, w) = pipe(4096, false);
        let s = sink(100, None);
        let reopened = reopen_nonblocking(w.as_fd()).unwrap();
        for fd in [s.wakeup().as_raw_fd(), reopened.as_raw_fd()] {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "fd {fd}");
        }
    }

    #[test]
    fn reopened_stdout_is_a_new_description() {
        let (_r, w) = pipe(4096, false);
        let new = reopen_nonblocking(w.as_fd()).unwrap();
        assert!(is_nonblocking(new.as_raw_fd()).unwrap());
        assert!(
            !is_nonblocking(w.as_raw_fd()).unwrap(),
            "the original is untouched"
        );
        // A regular file is duplicated: the offset stays shared.
        let path = std::env::temp_dir().join(format!("vmkit-output-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(b"12").unwrap();
        let dup = reopen_nonblocking(f.as_fd()).unwrap();
        File::from(dup).write_all(b"abc").unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 5);
    }
}
