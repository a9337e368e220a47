//! The operator's terminal while the VM runs: raw mode (so Ctrl-C and friends reach the
//! guest), restored on every way out, and the escape sequence that ends the VM.

use std::os::fd::RawFd;
use std::sync::Mutex;

/// The terminal's settings before raw mode, for the restore paths that cannot reach the
/// [`RawMode`] guard (the panic hook).
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

fn restore_saved() {
    let saved = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((fd, termios)) = saved {
        // SAFETY: `termios` was filled by tcgetattr on this fd; tcsetattr only reads it.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

/// Raw mode on a terminal, undone when dropped.
#[derive(Debug)]
pub struct RawMode {
    _private: (),
}

impl RawMode {
    /// Puts `fd` in raw mode if it is a terminal (`None` if it is not): no line editing, no
    /// echo, no signals from Ctrl-C/Ctrl-Z/Ctrl-\, no flow control, no CR translation on
    /// input. Output processing stays, so the guest's lines look as they do on a serial
    /// console. The settings are restored on drop, and by a panic hook.
    pub fn enter(fd: RawFd) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data that tcgetattr fills on success.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `termios` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut termios) } != 0 {
            return None;
        }
        let saved = termios;
        termios.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        termios.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::BRKINT);
        termios.c_cc[libc::VMIN] = 1;
        termios.c_cc[libc::VTIME] = 0;
        // SAFETY: `termios` is a valid termios derived from the terminal's own.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some((fd, saved));
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_saved();
            previous(info);
        }));
        Some(Self { _private: () })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore_saved();
    }
}

/// The console escape: Ctrl-A then `x` ends the VM; Ctrl-A twice sends one Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// Finds the escape sequence in the operator's input, passing everything else on.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    armed: bool,
}

/// What the filter made of some input.
#[derive(Debug, PartialEq, Eq)]
pub enum Filtered {
    /// Bytes for the guest.
    Input(Vec<u8>),
    /// The escape: end the VM (bytes before it are for the guest).
    Quit(Vec<u8>),
}

impl EscapeFilter {
    /// Filters `input`.
    pub fn filter(&mut self, input: &[u8]) -> Filtered {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.armed {
                self.armed = false;
                match b {
                    b'x' | b'X' => return Filtered::Quit(out),
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.armed = true;
            } else {
                out.push(b);
            }
        }
        Filtered::Input(out)
    }
}

/// The escape on the operator's stdin: ends the VM through its exit notifier.
pub struct Escape {
    filter: EscapeFilter,
    exit: std::sync::Arc<dyn vmkit_legacy::ExitNotifier>,
}

impl Escape {
    /// An escape for input from stdin when stdin is a terminal (`None` otherwise: input
    /// from a file or pipe is passed on whole).
    pub fn for_stdin(exit: std::sync::Arc<dyn vmkit_legacy::ExitNotifier>) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        (unsafe { libc::isatty(0) } == 1).then(|| Self {
            filter: EscapeFilter::default(),
            exit,
        })
    }

    /// The bytes of `input` for the guest; ends the VM on the escape.
    pub fn pass(&mut self, input: &[u8]) -> Vec<u8> {
        match self.filter.filter(input) {
            Filtered::Input(bytes) => bytes,
            Filtered::Quit(bytes) => {
                self.exit.notify_exit(vmkit_legacy::ExitReason::Stopped(
                    "the console escape (Ctrl-A x)".into(),
                ));
                bytes
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_escape_ends_and_everything_else_passes() {
        let mut f = EscapeFilter::default();
        assert_eq!(f.filter(b"ls\x03\r"), Filtered::Input(b"ls\x03\r".to_vec()));
        assert_eq!(f.filter(b"a\x01x b"), Filtered::Quit(b"a".to_vec()));
        let mut f = EscapeFilter::default();
        // Split across reads, doubled, and followed by another key.
        assert_eq!(f.filter(b"\x01"), Filtered::Input(vec![]));
        assert_eq!(f.filter(b"\x01"), Filtered::Input(vec![0x01]));
        assert_eq!(f.filter(b"\x01c"), Filtered::Input(vec![0x01, b'c']));
        assert_eq!(f.filter(b"\x01"), Filtered::Input(vec![]));
        assert_eq!(f.filter(b"x"), Filtered::Quit(vec![]));
    }

    #[test]
    fn a_non_terminal_is_left_alone() {
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        assert!(RawMode::enter(r.as_raw_fd()).is_none());
    }
}
