//! The allow-lists, by thread kind.

use crate::{ioctls, Options, ThreadKind};

/// One allowed system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syscall {
    /// Its name (as in `man 2`).
    pub name: &'static str,
    /// Its number on this architecture.
    pub nr: i64,
    /// The argument values it is allowed with: any one of these lists of
    /// `(argument index, value)` conditions, all of which must hold. Empty: any arguments.
    pub args: Vec<Vec<(u8, u64)>>,
}

macro_rules! any {
    ($($name:ident),* $(,)?) => {
        vec![$(Syscall { name: stringify!($name), nr: paste_nr!($name), args: Vec::new() }),*]
    };
}

macro_rules! paste_nr {
    ($name:ident) => {
        sys::$name
    };
}

/// The syscall numbers by name (`libc::SYS_*`), so the lists read as names.
#[allow(non_upper_case_globals)]
mod sys {
    macro_rules! nrs {
        ($($name:ident = $sys:ident),* $(,)?) => { $(pub const $name: i64 = libc::$sys;)* };
    }
    nrs!(
        read = SYS_read,
        write = SYS_write,
        close = SYS_close,
        futex = SYS_futex,
        rt_sigreturn = SYS_rt_sigreturn,
        rt_sigprocmask = SYS_rt_sigprocmask,
        sigaltstack = SYS_sigaltstack,
        mmap = SYS_mmap,
        munmap = SYS_munmap,
        mprotect = SYS_mprotect,
        madvise = SYS_madvise,
        mremap = SYS_mremap,
        brk = SYS_brk,
        exit = SYS_exit,
        exit_group = SYS_exit_group,
        sched_yield = SYS_sched_yield,
        clock_gettime = SYS_clock_gettime,
        clock_nanosleep = SYS_clock_nanosleep,
        nanosleep = SYS_nanosleep,
        getrandom = SYS_getrandom,
        gettid = SYS_gettid,
        getpid = SYS_getpid,
        restart_syscall = SYS_restart_syscall,
        fcntl = SYS_fcntl,
        tgkill = SYS_tgkill,
        rt_sigaction = SYS_rt_sigaction,
        ioctl = SYS_ioctl,
        eventfd2 = SYS_eventfd2,
        io_uring_enter = SYS_io_uring_enter,
        epoll_ctl = SYS_epoll_ctl,
        epoll_wait = SYS_epoll_wait,
        epoll_pwait = SYS_epoll_pwait,
        timerfd_create = SYS_timerfd_create,
        timerfd_settime = SYS_timerfd_settime,
        readv = SYS_readv,
        pread64 = SYS_pread64,
        ftruncate = SYS_ftruncate,
        rename = SYS_rename,
        writev = SYS_writev,
        preadv = SYS_preadv,
        pwritev = SYS_pwritev,
        lseek = SYS_lseek,
        fsync = SYS_fsync,
        fdatasync = SYS_fdatasync,
        fallocate = SYS_fallocate,
        pwrite64 = SYS_pwrite64,
        access = SYS_access,
        poll = SYS_poll,
        flock = SYS_flock,
        openat = SYS_openat,
        statx = SYS_statx,
        newfstatat = SYS_newfstatat,
        fstat = SYS_fstat,
        unlink = SYS_unlink,
        socket = SYS_socket,
        connect = SYS_connect,
        accept4 = SYS_accept4,
        shutdown = SYS_shutdown,
        sendto = SYS_sendto,
        recvfrom = SYS_recvfrom,
        getsockopt = SYS_getsockopt,
        getrusage = SYS_getrusage,
        setresuid = SYS_setresuid,
        setresgid = SYS_setresgid,
        setgroups = SYS_setgroups,
    );
}

fn with(name: &'static str, nr: i64, args: Vec<Vec<(u8, u64)>>) -> Syscall {
    Syscall { name, nr, args }
}

/// `arg[index]` is one of `values`.
fn one_of(index: u8, values: &[u64]) -> Vec<Vec<(u8, u64)>> {
    values.iter().map(|&v| vec![(index, v)]).collect()
}

/// What every thread needs: reading and writing its descriptors (and the log), locks,
/// memory for the allocator, signals' return, time, randomness for hash maps, and its
/// exit. `fcntl` is limited to the descriptor-flag commands, `tgkill` to `SIGABRT` (an
/// abort reports itself as such, not as a seccomp kill).
pub fn common() -> Vec<Syscall> {
    #[rustfmt::skip]
    let mut v = any!(
        read, write, close, futex, rt_sigreturn, rt_sigprocmask, sigaltstack,
        mmap, munmap, mprotect, madvise, mremap, brk, exit, exit_group, sched_yield,
        clock_gettime, clock_nanosleep, nanosleep, getrandom, gettid, getpid, restart_syscall,
    );
    let fcntl_cmds = [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ]
    .map(|c| c as u64);
    v.push(with("fcntl", sys::fcntl, one_of(1, &fcntl_cmds)));
    // To this process only: the thread group is this process's id (the filters are built in
    // the process that installs them, and vmkit never forks).
    let pid = u64::from(std::process::id());
    v.push(with(
        "tgkill",
        sys::tgkill,
        vec![vec![(0, pid), (2, libc::SIGABRT as u64)]],
    ));
    // abort() puts SIGABRT's default action back before raising it again.
    let abort = one_of(0, &[libc::SIGABRT as u64]);
    v.push(with("rt_sigaction", sys::rt_sigaction, abort));
    v
}

fn ioctl_rule(kind: ThreadKind) -> Syscall {
    let requests: Vec<u64> = ioctls(kind).iter().map(|i| i.request).collect();
    with("ioctl", sys::ioctl, one_of(1, &requests))
}

/// A vCPU thread's own calls: what the guest's register writes do on it — an MSI-X vector
/// programmed gets an irqfd (`eventfd2`, then `KVM_IRQFD` and a new routing table), and
/// device reset: a disk cancels its io_uring requests in flight, vsock drains its
/// host-side epoll set, drops its connections' registrations and re-arms its timer.
///
/// Guest output written on the vCPU (a UART's bytes) goes through a non-blocking sink that
/// checks its descriptor with a zero-timeout `poll` and `send`s to a socket.
///
/// Device activation (the guest's `DRIVER_OK` write) serves what waited for the driver:
/// virtio-net reads the frames the TAP already holds into buffers the driver may have
/// posted before `DRIVER_OK` (`readv`), vsock accepts host clients that connected before
/// the driver was ready and reads their `CONNECT` lines (`accept4`, `recvfrom`).
#[rustfmt::skip]
fn vcpu() -> Vec<Syscall> {
    any!(
        eventfd2, io_uring_enter, epoll_wait, epoll_ctl, timerfd_settime, poll, sendto,
        readv, accept4, recvfrom,
    )
}

/// The VMM thread's own calls: the event loop, the devices' backends (files, io_uring,
/// TAP, Unix sockets for vsock), timers, and the API's effects (`PATCH /drives` opens,
/// checks and locks a file, `PUT /logger` and `PUT /metrics` open theirs; `PUT
/// /snapshot/create` writes a sparse memory file (`ftruncate`, `pread64` of
/// `/proc/self/pagemap` to skip pages never touched) and a state file it renames into
/// place), the run's resource usage for `--stats`.
#[rustfmt::skip]
fn vmm(options: &Options) -> Vec<Syscall> {
    let mut v = any!(
        epoll_wait, epoll_pwait, epoll_ctl, eventfd2, timerfd_create, timerfd_settime,
        readv, writev, preadv, pwritev, pread64, pwrite64, lseek, fsync, fdatasync, fallocate,
        ftruncate, flock, openat, statx, newfstatat, fstat, access, unlink, rename, poll,
        io_uring_enter,
        connect, accept4, shutdown, sendto, recvfrom, getsockopt, getrusage,
    );
    // A disk image's lock (a `PATCH /drives` image): open file description locks.
    let locks = [libc::F_OFD_SETLK, libc::F_OFD_GETLK].map(|c| c as u64);
    v.push(with("fcntl", sys::fcntl, one_of(1, &locks)));
    v.push(with(
        "socket",
        sys::socket,
        one_of(0, &[libc::AF_UNIX as u64]),
    ));
    let kick = options.kick_signal as u64;
    let pid = u64::from(std::process::id());
    v.push(with("tgkill", sys::tgkill, vec![vec![(0, pid), (2, kick)]]));
    v
}

/// The API thread's own calls: its epoll loop, accepting on the socket (non-blocking
/// streams), removing the socket file when it ends; with a user to drop to, glibc's
/// broadcast of `setresuid`/`setresgid`/`setgroups` with exactly those ids.
fn api(options: &Options) -> Vec<Syscall> {
    let mut v = any!(
        epoll_wait,
        epoll_pwait,
        epoll_ctl,
        accept4,
        recvfrom,
        sendto,
        unlink
    );
    if let Some(user) = options.user {
        let (uid, gid) = (u64::from(user.uid), u64::from(user.gid));
        v.push(with("setgroups", sys::setgroups, vec![vec![(0, 1)]]));
        v.push(with(
            "setresgid",
            sys::setresgid,
            vec![vec![(0, gid), (1, gid), (2, gid)]],
        ));
        v.push(with(
            "setresuid",
            sys::setresuid,
            vec![vec![(0, uid), (1, uid), (2, uid)]],
        ));
    }
    v
}

/// Every call `kind` may make with `options` (the [`common`] ones, `ioctl` with the
/// kind's [`ioctls`], and its own), in no particular order; a name may appear twice with
/// different arguments (`tgkill` on the VMM thread).
pub fn allowed(kind: ThreadKind, options: &Options) -> Vec<Syscall> {
    let mut v = common();
    v.push(ioctl_rule(kind));
    v.extend(match kind {
        ThreadKind::Vcpu => vcpu(),
        ThreadKind::Vmm => vmm(options),
        ThreadKind::Api => api(options),
    });
    v
}
