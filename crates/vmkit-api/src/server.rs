//! The API server: HTTP/1.1 on a Unix socket, one thread, one epoll set, every connection
//! non-blocking, so a slow or silent client holds a connection slot and nothing else.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::http::{self, Parsed, DEFAULT_MAX_BODY_BYTES};
use crate::request::{ApiRequest, ApiResponse};
use crate::{Error, Result};

/// What serves the parsed requests: the VMM, or a forwarder to its thread
/// ([`ApiSender`](crate::ApiSender)). Called on the server's thread, one request at a time.
pub trait Handler: Send {
    /// Answers `request`.
    fn handle(&mut self, request: ApiRequest) -> ApiResponse;
}

impl<F: FnMut(ApiRequest) -> ApiResponse + Send> Handler for F {
    fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        self(request)
    }
}

/// Limits of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest request body (Firecracker's default: 51,200 bytes).
    pub max_body: usize,
    /// Connections open at once; a new one beyond this is closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: DEFAULT_MAX_BODY_BYTES,
            max_connections: 64,
        }
    }
}

/// A bound API socket, not serving yet.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    limits: Limits,
}

impl Drop for ApiServer {
    /// Removes the socket file: when the server thread ends, or when it could not start.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The server running on its thread; dropping it does not stop it, [`stop`](Self::stop) does.
#[derive(Debug)]
pub struct ServerThread {
    stop: EventFd,
    thread: JoinHandle<()>,
    path: PathBuf,
}

impl ServerThread {
    /// Stops the server, waits for its thread and removes the socket file.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers a connection may have waiting for its client to read them: beyond this, the
/// server stops reading its requests until the client catches up.
pub const MAX_PENDING_OUTPUT: usize = 64 * 1024;

const LISTENER: u64 = u64::MAX;
const STOP: u64 = u64::MAX - 1;

/// One client connection.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// `100 Continue` was sent for the request being read.
    continued: bool,
    /// Close once `output` is written.
    closing: bool,
    /// The events the epoll registration asks for.
    interest: EventSet,
}

impl ApiServer {
    /// Binds `path` (which must not exist: a stale socket is the operator's to remove, as
    /// with Firecracker).
    ///
    /// # Errors
    ///
    /// [`Error::Bind`] if the socket cannot be created.
    pub fn bind(path: &Path, limits: Limits) -> Result<Self> {
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.display().to_string(),
            source,
        })?;
        listener.set_nonblocking(true).map_err(Error::Io)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            limits,
        })
    }

    /// Serves on a new thread named `vmkit-api` until [`ServerThread::stop`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the thread or its epoll set cannot be created.
    pub fn spawn<H: Handler + 'static>(self, handler: H) -> Result<ServerThread> {
        self.spawn_with(handler, || Ok(()))
    }

    /// [`spawn`](Self::spawn), with `prologue` run first on the server's thread, before it
    /// serves anything (to install a seccomp filter, say). Returns once it has run.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] as [`spawn`](Self::spawn); [`Error::Prologue`] if `prologue` fails
    /// (the thread ends, nothing is served).
    pub fn spawn_with<H, P>(self, handler: H, prologue: P) -> Result<ServerThread>
    where
        H: Handler + 'static,
        P: FnOnce() -> std::result::Result<(), String> + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::Io)?;
        let stop_copy = stop.try_clone().map_err(Error::Io)?;
        let path = self.path.clone();
        let mut server = Serving::new(self, handler, stop_copy)?;
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("vmkit-api".into())
            .spawn(move || {
                let started = prologue();
                let ok = started.is_ok();
                let _ = ready_tx.send(started);
                if ok {
                    server.run();
                }
            })
            .map_err(Error::Io)?;
        let started = ready
            .recv()
            .unwrap_or_else(|_| Err("the API thread ended before its prologue".into()));
        if let Err(message) = started {
            let _ = thread.join();
            let _ = std::fs::remove_file(&path);
            return Err(Error::Prologue(message));
        }
        Ok(ServerThread { stop, thread, path })
    }
}

/// The server's loop state.
struct Serving<H> {
    server: ApiServer,
    handler: H,
    /// Registered in `epoll`: kept open as long as the loop runs.
    _stop: EventFd,
    epoll: Epoll,
    connections: HashMap<u64, Connection>,
    next_id: u64,
}

impl<H: Handler> Serving<H> {
    fn new(server: ApiServer, handler: H, stop: EventFd) -> Result<Self> {
        let epoll = Epoll::new().map_err(Error::Io)?;
        let add = |fd: i32, token| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::Io)
        };
        add(server.listener.as_raw_fd(), LISTENER)?;
        add(stop.as_raw_fd(), STOP)?;
        Ok(Self {
            server,
            handler,
            _stop: stop,
            epoll,
            connections: HashMap::new(),
            next_id: 0,
        })
    }

    fn run(&mut self) {
        let mut events = vec![EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("API server: epoll: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                match event.data() {
                    STOP => return,
                    LISTENER => self.accept(),
                    id => self.serve(id, event.event_set()),
                }
            }
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.server.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors, say: the listener stays readable, so wait a little
                    // rather than spin.
                    log::warn!("API server: accept: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    return;
                }
            };
            if self.connections.len() >= self.server.limits.max_connections {
                log::warn!(
                    "API server: more than {} connections; one refused",
                    self.server.limits.max_connections
                );
                continue;
            }
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1) % STOP;
            let ok = stream.set_nonblocking(true).is_ok()
                && self
                    .epoll
                    .ctl(
                        ControlOperation::Add,
                        stream.as_raw_fd(),
                        EpollEvent::new(EventSet::IN, id),
                    )
                    .is_ok();
            if ok {
                self.connections.insert(id, Connection::new(stream));
            }
        }
    }

    fn serve(&mut self, id: u64, events: EventSet) {
        let Some(mut conn) = self.connections.remove(&id) else {
            return;
        };
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP) {
            conn.read_requests(&mut self.handler, self.server.limits.max_body);
        }
        conn.write_out();
        if conn.closing && conn.output.is_empty() || conn.stream_failed(events) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            return;
        }
        conn.update_interest(&self.epoll, id);
        self.connections.insert(id, conn);
    }
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            continued: false,
            closing: false,
            interest: EventSet::IN,
        }
    }

    /// Reads what the client sent and answers every complete request in it.
    fn read_requests<H: Handler>(&mut self, handler: &mut H, max_body: usize) {
        let mut buf = [0u8; 4096];
        let limit = http::MAX_HEAD_BYTES + max_body;
        while !self.closing && self.output.len() < MAX_PENDING_OUTPUT {
            match self.stream.read(&mut buf) {
                // The client closed its side: answer what it sent, then close.
                Ok(0) => self.closing = true,
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.closing = true;
                    self.input.clear();
                }
            }
            self.answer(handler, max_body);
            if self.input.len() > limit {
                // `answer` refuses an over-long head or body before this; a guard only.
                self.closing = true;
            }
        }
        self.answer(handler, max_body);
    }

    fn answer<H: Handler>(&mut self, handler: &mut H, max_body: usize) {
        loop {
            match http::parse(&self.input, max_body) {
                Ok(Parsed::Complete(request, used)) => {
                    self.input.drain(..used);
                    self.continued = false;
                    let response =
                        match ApiRequest::parse(&request.method, &request.path, &request.body) {
                            Ok(api) => handler.handle(api),
                            Err(e) => e.into(),
                        };
                    let keep = request.keep_alive && !self.closing;
                    let bytes = http::render(response.status, response.body.as_deref(), keep);
                    self.output.extend_from_slice(&bytes);
                    if !keep {
                        self.closing = true;
                        self.input.clear();
                        return;
                    }
                }
                Ok(Parsed::Partial { expect_continue }) => {
                    if expect_continue && !self.continued {
                        self.continued = true;
                        self.output.extend_from_slice(http::CONTINUE);
                    }
                    return;
                }
                Err(e) => {
                    let body = crate::ApiResponse::error(e.status, e.message);
                    let bytes = http::render(body.status, body.body.as_deref(), false);
                    self.output.extend_from_slice(&bytes);
                    self.closing = true;
                    self.input.clear();
                    return;
                }
            }
        }
    }

    fn write_out(&mut self) {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(0) => break,
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    // The client is gone: nothing more can reach it.
                    self.output.clear();
                    self.closing = true;
                }
            }
        }
    }

    fn stream_failed(&self, events: EventSet) -> bool {
        events.contains(EventSet::ERROR)
    }

    /// Watches for input while the client may send more, for room while output waits.
    fn update_interest(&mut self, epoll: &Epoll, id: u64) {
        let mut set = EventSet::empty();
        if !self.closing && self.output.len() < MAX_PENDING_OUTPUT {
            set |= EventSet::IN;
        }
        if !self.output.is_empty() {
            set |= EventSet::OUT;
        }
        if set == self.interest {
            return;
        }
        let _ = epoll.ctl(
            ControlOperation::Modify,
            self.stream.as_raw_fd(),
            EpollEvent::new(set, id),
        );
        self.interest = set;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn serve(name: &str, limits: Limits) -> (ServerThread, PathBuf) {
        let dir = std::env::temp_dir().join(format!("vmkit-api-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let server = ApiServer::bind(&path, limits).unwrap();
        let thread = server
            .spawn(|r: ApiRequest| match r {
                ApiRequest::GetVersion => ApiResponse::ok(&"v"),
                _ => ApiResponse::no_content(),
            })
            .unwrap();
        (thread, path)
    }

    #[test]
    fn the_prologue_runs_on_the_server_thread_and_a_failed_one_serves_nothing() {
        let dir = std::env::temp_dir().join(format!("vmkit-api-{}-prologue", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let handler = |_: ApiRequest| ApiResponse::no_content();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = ApiServer::bind(&path, Limits::default())
            .unwrap()
            .spawn_with(handler, move || {
                let name = std::thread::current().name().map(String::from);
                tx.send(name).unwrap();
                Ok(())
            })
            .unwrap();
        assert_eq!(rx.recv().unwrap().as_deref(), Some("vmkit-api"));
        thread.stop();
        let err = ApiServer::bind(&path, Limits::default())
            .unwrap()
            .spawn_with(handler, || Err("no filter".into()))
            .unwrap_err();
        assert_eq!(err.to_string(), "API server: no filter");
        assert!(
            !path.exists(),
            "the socket of a server that never served is removed"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn connect(path: &Path) -> UnixStream {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Reads one response (head and `Content-Length` body).
    fn response(s: &mut UnixStream) -> String {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if s.read(&mut b).unwrap() == 0 {
                break;
            }
            got.push(b[0]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |n| n.parse().unwrap());
                if body.len() == len && !head.starts_with("HTTP/1.1 100") {
                    return text;
                }
                if head.starts_with("HTTP/1.1 100") {
                    got.clear();
                }
            }
        }
        String::from_utf8_lossy(&got).to_string()
    }

    #[test]
    fn a_slow_client_does_not_hold_up_a_quick_one() {
        let (t, path) = serve("slow", Limits::default());
        let mut slow = connect(&path);
        slow.write_all(b"GET /vers").unwrap();
        let mut quick = connect(&path);
        quick.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        assert!(response(&mut quick).starts_with("HTTP/1.1 200 OK"));
        for b in b"ion HTTP/1.1\r\n\r\n" {
            slow.write_all(&[*b]).unwrap();
        }
        assert!(response(&mut slow).ends_with("\"v\""));
        // Keep-alive: the same connection serves a second request.
        quick
            .write_all(b"PUT /entropy HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        assert!(response(&mut quick).starts_with("HTTP/1.1 204"));
        t.stop();
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn a_half_closed_client_still_gets_its_answer() {
        let (t, path) = serve("half", Limits::default());
        let mut c = connect(&path);
        c.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = String::new();
        c.read_to_string(&mut all).unwrap();
        // The answer arrives, then the server closes (read_to_string returned).
        assert!(
            all.starts_with("HTTP/1.1 200 OK") && all.ends_with("\"v\""),
            "{all}"
        );
        t.stop();
    }

    #[test]
    fn huge_bodies_bad_requests_and_expect_continue() {
        let limits = Limits {
            max_body: 100,
            max_connections: 64,
        };
        let (t, path) = serve("huge", limits);
        let mut c = connect(&path);
        c.write_all(b"PUT /entropy HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n")
            .unwrap();
        let r = response(&mut c);
        assert!(
            r.starts_with("HTTP/1.1 400") && r.contains("larger than the limit"),
            "{r}"
        );
        let mut c = connect(&path);
        c.write_all(b"PUT /entropy HTTP/1.1\r\nContent-Length: 8\r\n\r\n{\"x\": 1}")
            .unwrap();
        let r = response(&mut c);
        assert!(
            r.starts_with("HTTP/1.1 400") && r.contains("unknown field"),
            "{r}"
        );
        let mut c = connect(&path);
        c.write_all(b"PUT /entropy HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 25];
        c.read_exact(&mut first).unwrap();
        assert_eq!(&first, http::CONTINUE);
        c.write_all(b"{}").unwrap();
        assert!(response(&mut c).starts_with("HTTP/1.1 204"));
        let mut c = connect(&path);
        c.write_all(b"\x16\x03\x01 garbage\r\n\r\n").unwrap();
        assert!(response(&mut c).starts_with("HTTP/1.1 400"));
        t.stop();
    }

    #[test]
    fn a_client_that_pipelines_and_does_not_read_holds_nobody_up() {
        let (t, path) = serve("pipeline", Limits::default());
        let mut greedy = connect(&path);
        let mut reader = greedy.try_clone().unwrap();
        let one = b"GET /version HTTP/1.1\r\n\r\n";
        // About 800 KB of requests, 3.5 MB of answers: far more than the socket buffers and
        // MAX_PENDING_OUTPUT hold.
        const N: usize = 30_000;
        let all: Vec<u8> = one.iter().copied().cycle().take(one.len() * N).collect();
        let writer = std::thread::spawn(move || greedy.write_all(&all).unwrap());
        std::thread::sleep(Duration::from_millis(300));
        // The server stopped reading this client (its answers wait): the writer is stuck.
        assert!(
            !writer.is_finished(),
            "the server read every request unanswered"
        );
        let mut other = connect(&path);
        other.write_all(one).unwrap();
        assert!(response(&mut other).starts_with("HTTP/1.1 200"));
        // The greedy client reads at last: every answer comes.
        let (mut got, mut buf) = (0, [0u8; 65536]);
        let mut tail = Vec::new();
        while got < N {
            let n = reader
                .read(&mut buf)
                .unwrap_or_else(|e| panic!("{e} after {got} answers"));
            assert!(n > 0, "closed after {got} answers");
            tail.extend_from_slice(&buf[..n]);
            got += tail.windows(12).filter(|w| w == b"HTTP/1.1 200").count();
            // Keep what could be the start of a split marker.
            let keep = tail.len().min(11);
            tail.drain(..tail.len() - keep);
        }
        writer.join().unwrap();
        t.stop();
    }

    #[test]
    fn connections_beyond_the_limit_are_closed_and_the_rest_served() {
        let limits = Limits {
            max_body: 100,
            max_connections: 4,
        };
        let (t, path) = serve("many", limits);
        let mut held: Vec<_> = (0..4).map(|_| connect(&path)).collect();
        // A round trip on each: the server has accepted all four.
        for c in &mut held {
            c.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
            assert!(response(c).starts_with("HTTP/1.1 200"));
        }
        let mut extra = connect(&path);
        let mut buf = [0u8; 1];
        assert_eq!(extra.read(&mut buf).unwrap(), 0, "closed at once");
        for mut c in held {
            c.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
            assert!(response(&mut c).starts_with("HTTP/1.1 200"));
        }
        t.stop();
    }
}
