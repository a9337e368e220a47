//! The vsock target's host side: the sockets' directory (one per thread, so tests running in
//! parallel do not share socket paths), the listeners and peers, what they do, and the
//! logger that turns the device's warnings into failures.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

use super::input::{Line, Op};
use super::{GUEST_PORTS, LISTEN_PORTS, LOCAL, MAX_PEERS};

/// Panics on the device's warnings (the last oracle), on the threads running this target.
struct PanicOnWarn;

thread_local! {
    /// Whether this thread is running a vsock input (other targets' devices may warn).
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    /// This thread's socket directory.
    static DIR: PathBuf = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let d = process_dir().join(NEXT.fetch_add(1, Ordering::Relaxed).to_string());
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create the vsock target's socket directory");
        d
    };
}

impl log::Log for PanicOnWarn {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }

    fn log(&self, r: &log::Record<'_>) {
        if r.level() <= log::Level::Warn
            && r.target().starts_with("vmkit_virtio_vsock")
            && WATCHING.with(Cell::get)
        {
            panic!("the device logged a warning: {}", r.args());
        }
    }

    fn flush(&self) {}
}

/// Watches this thread's vsock warnings while it lives.
pub(super) struct Watch;

impl Watch {
    /// Sets the process up once (SIGPIPE ignored, stale directories removed, the logger),
    /// then watches this thread.
    pub(super) fn start() -> Self {
        static INIT: Once = Once::new();
        INIT.call_once(|| {
            // libFuzzer's main is not Rust's: SIGPIPE is not ignored yet, and the device
            // writes to host sockets whose peers may have gone (its documentation asks for
            // this).
            // SAFETY: setting a signal's disposition to SIG_IGN and registering an exit
            // hook are sound at any time.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                libc::atexit(remove_dir);
            }
            remove_stale_dirs();
            // Another logger (a test's) may be set already: the warning oracle is then off.
            if log::set_logger(&PanicOnWarn).is_ok() {
                log::set_max_level(log::LevelFilter::Warn);
            }
        });
        WATCHING.with(|w| w.set(true));
        Watch
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        WATCHING.with(|w| w.set(false));
    }
}

const DIR_PREFIX: &str = "vmkit-fuzz-vsock-";

/// The per-process directory of the sockets' directories.
fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id())))
}

/// This thread's directory of sockets.
pub(super) fn dir() -> PathBuf {
    DIR.with(PathBuf::clone)
}

/// Removes the directories of processes that are gone (a crash skips the exit hook).
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

extern "C" fn remove_dir() {
    let _ = std::fs::remove_dir_all(process_dir());
}

/// The host programs: listeners at `<dir>/v.sock_<port>` and the peers (accepted
/// connections and host clients).
pub(super) struct Host {
    paths: [PathBuf; 2],
    listeners: [Option<UnixListener>; 2],
    peers: Vec<UnixStream>,
}

impl Host {
    /// Listeners on both ports, no peer yet.
    pub(super) fn new() -> Self {
        let paths = LISTEN_PORTS.map(|p| dir().join(format!("v.sock_{p}")));
        let listeners = paths.clone().map(|p| Some(listen(&p)));
        Self {
            paths,
            listeners,
            peers: Vec::new(),
        }
    }

    /// The listeners accept every pending connection (up to the peer limit).
    pub(super) fn accept_all(&mut self) {
        for l in 0..2 {
            while self.peers.len() < MAX_PEERS && accept(&self.listeners[l], &mut self.peers) {}
        }
    }

    /// Closes every socket and removes the listeners' files.
    pub(super) fn close(self) {
        drop(self.peers);
        drop(self.listeners);
        for p in &self.paths {
            let _ = std::fs::remove_file(p);
        }
    }

    fn peer(&self, p: u8) -> Option<usize> {
        (!self.peers.is_empty()).then(|| usize::from(p) % self.peers.len())
    }
}

fn listen(path: &Path) -> UnixListener {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).expect("bind a listener");
    l.set_nonblocking(true).expect("non-blocking listener");
    l
}

/// Takes a pending connection of `listener`, if any, as a peer.
fn accept(listener: &Option<UnixListener>, peers: &mut Vec<UnixStream>) -> bool {
    let Some(Ok((s, _))) = listener.as_ref().map(|l| l.accept()) else {
        return false;
    };
    s.set_nonblocking(true).expect("non-blocking peer");
    peers.push(s);
    true
}

fn guest_port(sel: u8) -> u32 {
    if sel < 240 {
        GUEST_PORTS[usize::from(sel) % GUEST_PORTS.len()]
    } else {
        [0, u32::MAX, 52, LOCAL][usize::from(sel % 4)]
    }
}

/// What a host client writes when it connects.
fn line_bytes(line: &Line) -> Vec<u8> {
    match line {
        Line::Connect { port, data } => {
            let mut b = format!("CONNECT {}\n", guest_port(*port)).into_bytes();
            b.extend(data.iter().take(256));
            b
        }
        Line::Partial { port, cut } => {
            let b = format!("CONNECT {}\n", guest_port(*port)).into_bytes();
            b[..usize::from(*cut) % b.len()].to_vec()
        }
        Line::Raw(b) => b.iter().take(64).copied().collect(),
    }
}

/// A host-side operation (the caller sends the others to the device).
pub(super) fn host_action(op: &Op, host: &mut Host) {
    match op {
        Op::Accept(l) if host.peers.len() < MAX_PEERS => {
            accept(&host.listeners[usize::from(l % 2)], &mut host.peers);
        }
        Op::Connect(line) => {
            if host.peers.len() >= MAX_PEERS {
                return;
            }
            // A Unix connect does not block while the backlog has room; the device's
            // listener has room for far more than MAX_OPS clients.
            let mut s = UnixStream::connect(dir().join("v.sock")).expect("connect to the device");
            s.set_nonblocking(true).expect("non-blocking client");
            let _ = s.write(&line_bytes(line));
            host.peers.push(s);
        }
        Op::PeerWrite {
            peer,
            len,
            big,
            byte,
        } => {
            if let Some(i) = host.peer(*peer) {
                let n = usize::from(*len) * if *big { 256 } else { 1 };
                let _ = host.peers[i].write(&vec![*byte; n]);
            }
        }
        Op::PeerRead { peer, len } => {
            if let Some(i) = host.peer(*peer) {
                let mut buf = vec![0u8; usize::from(*len) * 16];
                let _ = host.peers[i].read(&mut buf);
            }
        }
        Op::PeerShutdown { peer, both } => {
            if let Some(i) = host.peer(*peer) {
                let how = match both {
                    true => std::net::Shutdown::Both,
                    false => std::net::Shutdown::Write,
                };
                let _ = host.peers[i].shutdown(how);
            }
        }
        Op::PeerClose(p) => {
            if let Some(i) = host.peer(*p) {
                host.peers.swap_remove(i);
            }
        }
        Op::CloseListener(l) => host.listeners[usize::from(l % 2)] = None,
        _ => {}
    }
}
