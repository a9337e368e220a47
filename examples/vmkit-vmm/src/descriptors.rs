//! No descriptor of vmkit is inherited by a program it, or anything in it, would start.
//!
//! Every descriptor vmkit and its crates create is close-on-exec when it is made
//! (`O_CLOEXEC` for files, the TAP and the pty, `EFD_CLOEXEC`, `SFD_CLOEXEC`, `TFD_CLOEXEC`,
//! `EPOLL_CLOEXEC`, `SOCK_CLOEXEC` and `accept4` for sockets, `F_DUPFD_CLOEXEC` for copies;
//! `/dev/kvm` is opened so by kvm-ioctls, the VM, vCPU and io_uring descriptors are so from the
//! kernel). What vmkit inherits beyond 0, 1 and 2 — a `--net fd=N` TAP, a build tool's
//! jobserver pipe, whatever its parent left open — is made close-on-exec here, before anything
//! else runs, so it is not passed on either. `tests/fds.rs` checks a running VM's descriptors.

use std::io;

/// Marks every descriptor from 3 up close-on-exec (`close_range(CLOSE_RANGE_CLOEXEC)`, or one
/// `F_SETFD` per entry of /proc/self/fd on kernels before 5.11). Nothing is closed: a
/// `--net fd=N` TAP stays open for the VM.
pub fn inherited_close_on_exec() -> io::Result<()> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets FD_CLOEXEC on the descriptors in
    // the range; it closes none, so no owner of one is affected.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(e);
    }
    let dir = std::fs::read_dir("/proc/self/fd")?;
    for entry in dir {
        let name = entry?.file_name();
        let Some(fd) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if fd > 2 {
            set_close_on_exec(fd)?;
        }
    }
    Ok(())
}

/// Sets FD_CLOEXEC on `fd`; a descriptor closed meanwhile (the directory's own) is no error.
fn set_close_on_exec(fd: i32) -> io::Result<()> {
    // SAFETY: F_GETFD and F_SETFD only read and set the descriptor's flags; a closed fd gives
    // EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EBADF) => Ok(()),
            _ => Err(e),
        };
    }
    Ok(())
}

/// Whether `fd` is close-on-exec.
#[cfg(test)]
fn is_close_on_exec(fd: &impl std::os::fd::AsRawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// An open descriptor without FD_CLOEXEC, as a parent leaves one.
    fn inheritable() -> OwnedFd {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, 0) };
        assert!(fd > 2, "{}", io::Error::last_os_error());
        // SAFETY: `fd` is new and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn inherited_descriptors_become_close_on_exec_and_stay_open() {
        let fd = inheritable();
        assert!(!is_close_on_exec(&fd));
        inherited_close_on_exec().unwrap();
        assert!(is_close_on_exec(&fd));
        // Still open: a handed-over TAP goes on working.
        // SAFETY: F_GETFL only reads the open file's flags.
        assert!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } >= 0);
        let other = inheritable();
        set_close_on_exec(other.as_raw_fd()).unwrap();
        assert!(is_close_on_exec(&other));
        // A descriptor that is not open is no error (one may close during the walk).
        assert!(set_close_on_exec(1 << 20).is_ok());
    }
}
