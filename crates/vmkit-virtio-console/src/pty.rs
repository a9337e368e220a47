//! A pseudo-terminal for the console, for VMMs offering `--console pty`. Not used by the
//! device itself, which only sees a `Write` sink and pushed input.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A pseudo-terminal pair in raw mode: the VMM keeps the master, a user attaches to the
/// slave path (`screen /dev/pts/N`, `minicom -p /dev/pts/N`).
///
/// - The master is non-blocking and close-on-exec: the console's output sink is a clone
///   of it ([`output`](Self::output)); when nobody reads the slave and the pty's buffer
///   fills, writes fail with `WouldBlock` and the device drops that output instead of
///   stalling the event loop. Input is read from the master ([`master`](Self::master)) when
///   epoll says it is readable, and pushed into the console.
/// - Raw mode (`cfmakeraw`): no echo of guest output back into the master as input, no
///   newline translation, no line buffering.
/// - The slave stays open inside `Pty` so the master never reports hang-up (`EIO`,
///   `EPOLLHUP`) while no user is attached, which would make a level-triggered event loop
///   spin.
#[derive(Debug)]
pub struct Pty {
    master: File,
    _slave: File,
    path: PathBuf,
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Pty {
    /// Opens a new pseudo-terminal (`posix_openpt`, `grantpt`, `unlockpt`, `ptsname_r`) and
    /// puts it in raw mode.
    pub fn open() -> io::Result<Self> {
        // SAFETY: posix_openpt takes flags and returns a new descriptor or -1.
        let fd =
            cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
        // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
        let master = unsafe { File::from_raw_fd(fd) };
        let raw = master.as_raw_fd();
        // SAFETY: `raw` is a valid pty master descriptor for both calls.
        cvt(unsafe { libc::grantpt(raw) })?;
        // SAFETY: as above.
        cvt(unsafe { libc::unlockpt(raw) })?;
        let path = slave_path(raw)?;
        set_raw(raw)?;
        set_nonblocking(raw)?;
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)?;
        Ok(Self {
            master,
            _slave: slave,
            path,
        })
    }

    /// The slave's path, to print for the user (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The master: read it for console input.
    pub fn master(&self) -> &File {
        &self.master
    }

    /// A clone of the master, to give the console as its output sink.
    pub fn output(&self) -> io::Result<File> {
        self.master.try_clone()
    }
}

fn slave_path(master: RawFd) -> io::Result<PathBuf> {
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: `buf` is writable for `buf.len()` bytes; ptsname_r NUL-terminates what it
    // writes or fails.
    let ret = unsafe { libc::ptsname_r(master, buf.as_mut_ptr(), buf.len()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    // SAFETY: ptsname_r succeeded, so `buf` holds a NUL-terminated string.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Ok(PathBuf::from(name.to_string_lossy().into_owned()))
}

fn set_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: termios is plain data; tcgetattr fills it.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a terminal descriptor and `t` a valid termios.
    cvt(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: `t` is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: as for tcgetattr.
    cvt(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a valid descriptor.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: F_SETFL on a valid descriptor with the flags it had plus O_NONBLOCK.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn raw_pty_both_ways() {
        let pty = Pty::open().unwrap();
        assert!(pty.path().starts_with("/dev/pts"));
        let mut user = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(pty.path())
            .unwrap();

        // Guest output written to the master reaches the user unchanged ("\n" not "\r\n").
        let mut out = pty.output().unwrap();
        out.write_all(b"hello\nworld").unwrap();
        let mut buf = [0u8; 64];
        let n = user.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello\nworld");

        // Raw mode: nothing echoed back into the master, which does not block.
        let mut master = pty.master();
        let err = master.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

        // What the user types reaches the master byte for byte (no line buffering).
        user.write_all(b"a\x03b\r").unwrap();
        let mut got = Vec::new();
        for _ in 0..100 {
            match master.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            if got.len() >= 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, b"a\x03b\r");
    }

    #[test]
    fn full_pty_does_not_block_the_writer() {
        let pty = Pty::open().unwrap();
        let mut out = pty.output().unwrap();
        let chunk = [b'x'; 4096];
        let mut total = 0usize;
        let err = loop {
            match out.write(&chunk) {
                Ok(n) => total += n,
                Err(e) => break e,
            }
            assert!(total < 64 << 20, "the pty never filled");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(total > 0);
    }
}
