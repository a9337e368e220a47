//! Per-thread seccomp allow-lists for KVM VMMs, built on the rust-vmm
//! [`seccompiler`] crate.
//!
//! A VMM runs three kinds of thread, and each needs far less of the kernel than the
//! process as a whole: [`ThreadKind::Vcpu`] (`KVM_RUN` and the exits it dispatches,
//! including the MMIO/PIO writes that activate and reset virtio devices),
//! [`ThreadKind::Vmm`] (the event loop: device queues, io_uring, timers, the API's calls'
//! effects) and [`ThreadKind::Api`] (the HTTP server on a Unix socket). [`filter`] builds
//! the BPF program of one kind for a [`SeccompLevel`]; [`apply`] installs it in the calling
//! thread. `ioctl` is filtered by request number: each thread gets exactly the KVM, TUN
//! and tty requests it issues once the guest runs.
//!
//! # The allow-lists
//!
//! Every kind allows the [`common`] calls — what Rust's standard library, the allocator,
//! signal return and thread exit need: `read write close futex rt_sigreturn rt_sigprocmask
//! sigaltstack mmap munmap mprotect madvise mremap brk exit exit_group sched_yield
//! clock_gettime clock_nanosleep nanosleep getrandom gettid getpid restart_syscall`, `fcntl`
//! limited to `F_GETFD F_SETFD F_GETFL F_SETFL F_DUPFD_CLOEXEC`, and `tgkill` and
//! `rt_sigaction` limited to `SIGABRT` (an abort stays an abort; `tgkill` only to this
//! process, whose id the filter is built with) — and then:
//!
//! | thread | its own syscalls | `ioctl` requests |
//! |--------|------------------|------------------|
//! | vCPU | `eventfd2 io_uring_enter epoll_wait epoll_ctl timerfd_settime poll sendto readv accept4 recvfrom` (an MSI-X vector the guest programs gets an irqfd; guest output from a UART goes through a non-blocking sink; device activation reads what waited for the driver: net the TAP's frames, vsock early host clients; device reset: vsock drops its connections) | `KVM_RUN`, the snapshot's state reads `KVM_GET_CPUID2 KVM_GET_REGS KVM_GET_SREGS KVM_GET_FPU KVM_GET_XSAVE2 KVM_GET_XCRS KVM_GET_MSRS KVM_GET_LAPIC KVM_GET_VCPU_EVENTS KVM_GET_MP_STATE KVM_GET_DEBUGREGS KVM_GET_TSC_KHZ`, `KVM_IRQ_LINE KVM_SIGNAL_MSI KVM_IRQFD KVM_IOEVENTFD KVM_SET_GSI_ROUTING TUNSETOFFLOAD TUNSETQUEUE FIONBIO` |
//! | VMM | `epoll_wait epoll_pwait epoll_ctl eventfd2 timerfd_create timerfd_settime readv writev preadv pwritev pwrite64 lseek fsync fdatasync fallocate flock openat statx newfstatat fstat access unlink poll io_uring_enter connect accept4 shutdown sendto recvfrom getsockopt getrusage`, `socket` for `AF_UNIX` only, `fcntl` also with `F_OFD_SETLK F_OFD_GETLK` (disk image locks), `tgkill` also with the vCPU kick signal | `KVM_IRQ_LINE KVM_SIGNAL_MSI KVM_IRQFD KVM_IOEVENTFD KVM_SET_GSI_ROUTING TUNSETOFFLOAD TUNSETQUEUE TCGETS TCSETS FIONBIO` |
//! | API | `epoll_wait epoll_pwait epoll_ctl accept4 recvfrom sendto unlink`, and with [`Options::user`] `setgroups(1, …)`, `setresgid` and `setresuid` with exactly those ids | `FIONBIO` |
//!
//! That is 37 syscalls for a vCPU thread, 62 for the VMM thread and 34 (37 with a user)
//! for the API thread, `ioctl` counted once.
//!
//! [`allowed`] lists them by name, [`ioctls`] the requests with their numbers (computed
//! with vmm-sys-util's `ioctl_*_nr!` macros and kvm-bindings' structures).
//!
//! # Example
//!
//! ```
//! use vmkit_seccomp::{filter, Options, SeccompLevel, ThreadKind};
//!
//! let options = Options { level: SeccompLevel::Kill, ..Options::default() };
//! let program = filter(ThreadKind::Vcpu, &options).unwrap().expect("a filter");
//! assert!(!program.is_empty());
//! // In the vCPU thread, before its first KVM_RUN: vmkit_seccomp::apply(&program)
//! let off = Options { level: SeccompLevel::Off, ..Options::default() };
//! assert!(filter(ThreadKind::Vcpu, &off).unwrap().is_none());
//! ```

#![deny(missing_docs)]

mod ioctls;
mod lists;

use std::collections::BTreeMap;
use std::fmt;

pub use seccompiler::BpfProgram;
use seccompiler::{
    SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

pub use ioctls::{ioctls, Ioctl};
pub use lists::{allowed, common, Syscall};

/// The errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// seccompiler refused a rule or the filter (a bug in the lists).
    #[error("cannot build the seccomp filter: {0}")]
    Build(String),
    /// The kernel refused the filter (`PR_SET_NO_NEW_PRIVS` or `seccomp(2)` failed).
    #[error("cannot install the seccomp filter: {0}")]
    Apply(String),
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("cannot set no_new_privs: {0}")]
    NoNewPrivs(std::io::Error),
}

/// The kinds of thread of a VMM, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// A vCPU thread: `KVM_RUN` and the exits it dispatches (device activation and reset
    /// included).
    Vcpu,
    /// The VMM's event thread (the main thread): device queues, timers, the API's effects.
    Vmm,
    /// The API server's thread.
    Api,
}

impl ThreadKind {
    /// All kinds.
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::Vmm, ThreadKind::Api];

    /// A short name: `vcpu`, `vmm`, `api`.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
        }
    }
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happens to a call outside the allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompLevel {
    /// The process is killed (`SECCOMP_RET_KILL_PROCESS`, the status says `SIGSYS`).
    #[default]
    Kill,
    /// The call is allowed and logged by the kernel (the audit log or `dmesg`).
    Log,
    /// No filter.
    Off,
}

/// The user a VMM drops to (`--user UID:GID`): the API thread, which exists when the
/// VMM's main thread calls `setresuid`, takes part in glibc's broadcast of the change, so
/// its filter allows exactly these ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserIds {
    /// The user id.
    pub uid: u32,
    /// The group id (also the only supplementary group).
    pub gid: u32,
}

/// How to build a filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The action on a call outside the list.
    pub level: SeccompLevel,
    /// The user the process drops to while the API thread runs under its filter.
    pub user: Option<UserIds>,
    /// The signal the VMM thread sends to vCPU threads to bring them out of `KVM_RUN`
    /// (vmm-sys-util's `SIGRTMIN()` by default, as vmkit-vcpu's kick).
    pub kick_signal: i32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            level: SeccompLevel::Kill,
            user: None,
            kick_signal: vmm_sys_util::signal::SIGRTMIN(),
        }
    }
}

/// One argument condition: `arg[index] == value` (32-bit compare, as the kernel's `int`
/// and `unsigned int` arguments).
fn eq(index: u8, value: u64) -> std::result::Result<SeccompCondition, Error> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(|e| Error::Build(e.to_string()))
}

fn rules_of(call: &Syscall) -> std::result::Result<Vec<SeccompRule>, Error> {
    call.args
        .iter()
        .map(|conds| {
            let conditions = conds
                .iter()
                .map(|&(i, v)| eq(i, v))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            SeccompRule::new(conditions).map_err(|e| Error::Build(e.to_string()))
        })
        .collect()
}

/// The BPF program for `kind` at `options.level`; `None` with [`SeccompLevel::Off`].
///
/// # Errors
///
/// [`Error::Build`] if seccompiler refuses the rules (not expected: the lists are tested).
pub fn filter(kind: ThreadKind, options: &Options) -> Result<Option<BpfProgram>, Error> {
    let mismatch = match options.level {
        SeccompLevel::Off => return Ok(None),
        SeccompLevel::Kill => SeccompAction::KillProcess,
        SeccompLevel::Log => SeccompAction::Log,
    };
    // `None`: allowed whatever its arguments (another entry's conditions change nothing).
    let mut merged: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for call in allowed(kind, options) {
        let new = rules_of(&call)?;
        let entry = merged.entry(call.nr).or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), new.is_empty()) {
            (Some(_), true) => *entry = None,
            (Some(rules), false) => rules.extend(new),
            (None, _) => {}
        }
    }
    let rules = merged
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch()?)
        .map_err(|e| Error::Build(e.to_string()))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Build(e.to_string()))?;
    Ok(Some(program))
}

fn target_arch() -> Result<TargetArch, Error> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| Error::Build(e.to_string()))
}

/// Installs `program` in the calling thread (with `PR_SET_NO_NEW_PRIVS`, which seccomp
/// requires of an unprivileged caller). Threads this one spawns afterwards inherit it;
/// it cannot be removed.
///
/// # Errors
///
/// [`Error::Apply`] if the kernel refuses it.
pub fn apply(program: &BpfProgram) -> Result<(), Error> {
    seccompiler::apply_filter(program).map_err(|e| Error::Apply(e.to_string()))
}

/// Sets `PR_SET_NO_NEW_PRIVS` on the calling thread (inherited by the threads it spawns
/// and by anything it executes): no `execve` can gain privileges (setuid bits, file
/// capabilities) from then on.
///
/// # Errors
///
/// [`Error::NoNewPrivs`] if `prctl` fails.
pub fn set_no_new_privs() -> Result<(), Error> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(Error::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Output};

    use super::*;

    fn names(kind: ThreadKind, options: &Options) -> Vec<&'static str> {
        allowed(kind, options).iter().map(|s| s.name).collect()
    }

    #[test]
    fn every_filter_compiles_and_off_is_none() {
        let user = Some(UserIds {
            uid: 65534,
            gid: 65534,
        });
        for kind in ThreadKind::ALL {
            for level in [SeccompLevel::Kill, SeccompLevel::Log] {
                for user in [None, user] {
                    let options = Options {
                        level,
                        user,
                        ..Options::default()
                    };
                    let program = filter(kind, &options).unwrap().unwrap();
                    assert!(program.len() > 10, "{kind} {level:?}");
                }
            }
            let off = Options {
                level: SeccompLevel::Off,
                ..Options::default()
            };
            assert!(filter(kind, &off).unwrap().is_none());
        }
    }

    #[test]
    fn no_list_can_run_programs_spawn_threads_or_change_the_user_unasked() {
        let forbidden = [
            "execve",
            "execveat",
            "fork",
            "vfork",
            "clone",
            "clone3",
            "ptrace",
            "mount",
            "setuid",
            "setresuid",
            "setgid",
            "setgroups",
            "prctl",
            "seccomp",
            "kill",
            "bpf",
            "process_vm_writev",
            "init_module",
            "kexec_load",
            "getppid",
        ];
        for kind in ThreadKind::ALL {
            let list = names(kind, &Options::default());
            for name in forbidden {
                assert!(!list.contains(&name), "{kind} allows {name}");
            }
        }
    }

    #[test]
    fn each_list_holds_what_its_thread_needs() {
        let o = Options::default();
        let has = |k, n: &str| names(k, &o).contains(&n);
        for kind in ThreadKind::ALL {
            for n in [
                "read",
                "write",
                "close",
                "futex",
                "rt_sigreturn",
                "ioctl",
                "exit",
            ] {
                assert!(has(kind, n), "{kind} lacks {n}");
            }
        }
        for n in ["io_uring_enter", "epoll_wait", "epoll_ctl"] {
            assert!(has(ThreadKind::Vcpu, n), "vcpu lacks {n}");
        }
        for n in [
            "epoll_wait",
            "preadv",
            "pwritev",
            "fdatasync",
            "openat",
            "io_uring_enter",
        ] {
            assert!(has(ThreadKind::Vmm, n), "vmm lacks {n}");
        }
        for n in ["epoll_wait", "accept4", "recvfrom", "sendto"] {
            assert!(has(ThreadKind::Api, n), "api lacks {n}");
        }
        assert!(!has(ThreadKind::Api, "openat"));
        assert!(!has(ThreadKind::Vcpu, "openat"));
        assert!(!has(ThreadKind::Vcpu, "socket"));
    }

    #[test]
    fn only_the_api_list_with_a_user_holds_the_id_calls_pinned_to_it() {
        let user = UserIds {
            uid: 1000,
            gid: 100,
        };
        let o = Options {
            user: Some(user),
            ..Options::default()
        };
        let api = allowed(ThreadKind::Api, &o);
        let setresuid = api.iter().find(|s| s.name == "setresuid").unwrap();
        assert_eq!(setresuid.args, [vec![(0, 1000), (1, 1000), (2, 1000)]]);
        let setresgid = api.iter().find(|s| s.name == "setresgid").unwrap();
        assert_eq!(setresgid.args, [vec![(0, 100), (1, 100), (2, 100)]]);
        for kind in [ThreadKind::Vcpu, ThreadKind::Vmm] {
            assert!(!names(kind, &o).contains(&"setresuid"), "{kind}");
        }
    }

    #[test]
    fn the_documented_sizes_are_the_lists() {
        let distinct = |kind, o: &Options| {
            let mut n = names(kind, o);
            n.sort_unstable();
            n.dedup();
            n.len()
        };
        let o = Options::default();
        assert_eq!(distinct(ThreadKind::Vcpu, &o), 37);
        assert_eq!(distinct(ThreadKind::Vmm, &o), 62);
        assert_eq!(distinct(ThreadKind::Api, &o), 34);
        let user = Options {
            user: Some(UserIds { uid: 1, gid: 1 }),
            ..o
        };
        assert_eq!(distinct(ThreadKind::Api, &user), 37);
        let ioctls = |k| ioctls(k).len();
        assert_eq!(
            (
                ioctls(ThreadKind::Vcpu),
                ioctls(ThreadKind::Vmm),
                ioctls(ThreadKind::Api)
            ),
            (21, 14, 1)
        );
    }

    /// The variable that makes [`child`] run a case in a re-executed test binary (seccomp
    /// filters are per thread and cannot be removed: never in the test process itself).
    const CHILD: &str = "VMKIT_SECCOMP_TEST_CHILD";

    fn in_child(case: &str) -> Output {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "tests::child", "--nocapture", "--test-threads=1"])
            .env(CHILD, case)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("child: filter installed"),
            "{case}: {stdout}"
        );
        out
    }

    /// In a child: installs `KIND`'s filter at `LEVEL`, prints, makes the call `CALL`
    /// (`getppid`, or `ioctl-tcgets` on stdin), prints again.
    #[test]
    fn child() {
        let Ok(case) = std::env::var(CHILD) else {
            return;
        };
        let mut words = case.split(' ');
        let kind = match words.next() {
            Some("vcpu") => ThreadKind::Vcpu,
            Some("vmm") => ThreadKind::Vmm,
            _ => ThreadKind::Api,
        };
        let level = match words.next() {
            Some("log") => SeccompLevel::Log,
            _ => SeccompLevel::Kill,
        };
        let options = Options {
            level,
            ..Options::default()
        };
        apply(&filter(kind, &options).unwrap().unwrap()).unwrap();
        // An allowed call works.
        // SAFETY: getpid takes no arguments.
        let pid = unsafe { libc::syscall(libc::SYS_getpid) };
        assert_eq!(pid, i64::from(std::process::id()));
        println!("child: filter installed");
        let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
        let target = words.clone().nth(1).and_then(|p| p.parse::<i64>().ok());
        match words.next() {
            // SAFETY: tgkill takes plain numbers; the target is a process of the test's.
            Some("abort-other") => unsafe {
                let pid = target.unwrap_or(0);
                libc::syscall(libc::SYS_tgkill, pid, pid, libc::SIGABRT);
            },
            // SAFETY: as above, this process's own thread.
            Some("abort-self") => unsafe {
                let pid = i64::from(std::process::id());
                libc::syscall(
                    libc::SYS_tgkill,
                    pid,
                    libc::syscall(libc::SYS_gettid),
                    libc::SIGABRT,
                );
            },
            // SAFETY: TCGETS writes a termios into `termios`, which is large enough.
            Some("ioctl-tcgets") => unsafe {
                libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr());
            },
            // SAFETY: getppid takes no arguments.
            _ => unsafe {
                libc::syscall(libc::SYS_getppid);
            },
        }
        println!("child: survived");
    }

    fn killed_by_sigsys(out: &Output) -> bool {
        out.status.signal() == Some(libc::SIGSYS)
    }

    #[test]
    fn a_forbidden_call_kills_with_sigsys_and_an_allowed_one_works() {
        for kind in ["vcpu", "vmm", "api"] {
            let out = in_child(&format!("{kind} kill getppid"));
            assert!(killed_by_sigsys(&out), "{kind}: {:?}", out.status);
            assert!(!String::from_utf8_lossy(&out.stdout).contains("survived"));
        }
    }

    #[test]
    fn with_log_the_forbidden_call_goes_through() {
        let out = in_child("vcpu log getppid");
        assert!(out.status.success(), "{:?}", out.status);
        assert!(String::from_utf8_lossy(&out.stdout).contains("child: survived"));
    }

    /// `tgkill` with `SIGABRT` reaches this process only: another process (a `sleep` of the
    /// test's) is out of reach (SIGSYS, and it lives on), while this process's own abort
    /// goes through.
    #[test]
    fn sigabrt_reaches_only_this_process() {
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        let out = in_child(&format!("vcpu kill abort-other {}", other.id()));
        let alive = other.try_wait().unwrap().is_none();
        let _ = other.kill();
        let _ = other.wait();
        assert!(killed_by_sigsys(&out), "{:?}", out.status);
        assert!(alive, "another process got the SIGABRT");
        let own = in_child("vcpu kill abort-self");
        assert_eq!(own.status.signal(), Some(libc::SIGABRT), "{:?}", own.status);
    }

    #[test]
    fn ioctl_is_filtered_by_request() {
        // TCGETS is on the VMM thread's list (the terminal), not on a vCPU's.
        let vmm = in_child("vmm kill ioctl-tcgets");
        assert!(vmm.status.success(), "{:?}", vmm.status);
        let vcpu = in_child("vcpu kill ioctl-tcgets");
        assert!(killed_by_sigsys(&vcpu), "{:?}", vcpu.status);
    }
}
