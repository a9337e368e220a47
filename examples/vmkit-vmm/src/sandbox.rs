//! The sandbox: what vmkit gives up before the guest runs. `PR_SET_NO_NEW_PRIVS` at once;
//! a seccomp filter per thread (`--seccomp`, the lists of the vmkit-seccomp crate) — the
//! API thread's when it starts, each vCPU thread's first thing in the thread, the main
//! thread's last, once every other thread exists (a filter is inherited by threads spawned
//! after it, and stacked filters must all allow a call), and only then does any vCPU enter
//! the guest (the vCPU threads wait, parked, for the main thread's filter: no guest
//! instruction runs before every filter is installed); and `--user`, once everything is
//! open and built, before the vCPU threads start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmkit_kvm::VcpuPrologue;
use vmkit_seccomp::{BpfProgram, Options, SeccompLevel, ThreadKind, UserIds};

use crate::config::{Args, SeccompMode};
use crate::error::{Error, Result};

/// The filters, built once at the start (a list seccompiler refuses fails the start, not
/// a thread), and the user to drop to.
pub struct Sandbox {
    vcpu: Option<BpfProgram>,
    vmm: Option<BpfProgram>,
    api: Option<BpfProgram>,
    user: Option<UserIds>,
    /// `--seccomp-test-violate`: the thread kind that breaks its list.
    violate: Option<ThreadKind>,
    /// With `--landlock`: the API socket, whose directory is all the API thread may touch.
    api_landlock: Option<PathBuf>,
    /// `--landlock-test-api-open`: what the API thread tries to open once restricted.
    api_probe: Option<PathBuf>,
}

fn build(kind: ThreadKind, options: &Options) -> Result<Option<BpfProgram>> {
    vmkit_seccomp::filter(kind, options).map_err(|e| Error::Sandbox(format!("{kind}: {e}")))
}

impl Sandbox {
    /// Sets `PR_SET_NO_NEW_PRIVS` (also with `--seccomp off`) and builds the filters.
    pub fn new(args: &Args) -> Result<Self> {
        vmkit_seccomp::set_no_new_privs().map_err(|e| Error::Sandbox(e.to_string()))?;
        let options = Options {
            level: match args.seccomp {
                SeccompMode::Kill => SeccompLevel::Kill,
                SeccompMode::Log => SeccompLevel::Log,
                SeccompMode::Off => SeccompLevel::Off,
            },
            user: args.user,
            kick_signal: vmkit_vcpu::kick_signal(),
        };
        Ok(Self {
            vcpu: build(ThreadKind::Vcpu, &options)?,
            vmm: build(ThreadKind::Vmm, &options)?,
            api: build(ThreadKind::Api, &options)?,
            user: args.user,
            violate: test_hook::violation(args),
            api_landlock: args.api_sock.clone().filter(|_| args.landlock),
            api_probe: test_hook::api_probe(args),
        })
    }

    /// What the API thread runs first: with `--landlock` its own Landlock ruleset (the
    /// main thread's, applied later, does not reach a thread that exists already), then its
    /// filter.
    pub fn api_prologue(&self) -> impl FnOnce() -> std::result::Result<(), String> + Send {
        let (program, violate) = (self.api.clone(), self.violate);
        let (landlock, probe) = (self.api_landlock.clone(), self.api_probe.clone());
        move || {
            if let Some(socket) = &landlock {
                crate::landlock::restrict_api_thread(socket)?;
            }
            test_hook::probe_open(probe.as_deref());
            install(program.as_ref())?;
            test_hook::maybe_violate(violate, ThreadKind::Api);
            Ok(())
        }
    }

    /// What each vCPU thread runs before its first `KVM_RUN`: its filter.
    pub fn vcpu_prologue(&self) -> Arc<VcpuPrologue> {
        let (program, violate) = (self.vcpu.clone(), self.violate);
        Arc::new(move |index| {
            install(program.as_ref())?;
            if index == 0 {
                test_hook::maybe_violate(violate, ThreadKind::Vcpu);
            }
            Ok(())
        })
    }

    /// The main thread's filter: the last, once every other thread exists (the vCPUs
    /// parked before the guest).
    pub fn enter_vmm(&self) -> Result<()> {
        install(self.vmm.as_ref()).map_err(Error::Sandbox)?;
        test_hook::maybe_violate(self.violate, ThreadKind::Vmm);
        Ok(())
    }

    /// `--user`: drops to that user and group (the only supplementary group), and checks
    /// that root cannot be regained.
    pub fn drop_user(&self) -> Result<()> {
        match self.user {
            Some(user) => drop_to(user).map_err(|e| Error::Sandbox(format!("--user: {e}"))),
            None => Ok(()),
        }
    }
}

fn install(program: Option<&BpfProgram>) -> std::result::Result<(), String> {
    match program {
        Some(p) => vmkit_seccomp::apply(p).map_err(|e| e.to_string()),
        None => Ok(()),
    }
}

fn last_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// `setgroups`, `setresgid`, `setresuid` (glibc applies each to every thread of the
/// process), then `getresuid`/`getresgid` to check, and a raw `setuid(0)` (this thread only)
/// that must fail.
fn drop_to(user: UserIds) -> std::result::Result<(), String> {
    let UserIds { uid, gid } = user;
    let groups = [gid];
    // SAFETY: `groups` is a valid array of one gid_t for the call.
    if unsafe { libc::setgroups(1, groups.as_ptr()) } != 0 {
        return Err(last_error("setgroups"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
        return Err(last_error("setresgid"));
    }
    // SAFETY: integer arguments only.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        return Err(last_error("setresuid"));
    }
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are to live u32s for the call.
    if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 || [r, e, s] != [uid; 3] {
        return Err(format!("the user ids are {r}/{e}/{s}, not {uid}"));
    }
    // SAFETY: as above.
    if unsafe { libc::getresgid(&mut r, &mut e, &mut s) } != 0 || [r, e, s] != [gid; 3] {
        return Err(format!("the group ids are {r}/{e}/{s}, not {gid}"));
    }
    // The raw call, not glibc's setuid (which every thread would repeat, and the API
    // thread's filter allows only the ids above).
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_setuid, 0) } == 0 {
        return Err("setuid(0) succeeded after the drop".into());
    }
    no_capabilities_left()
}

/// Leaving uid 0 clears the capability sets, unless securebits (`SECBIT_KEEP_CAPS`,
/// `SECBIT_NO_SETUID_FIXUP`, e.g. from systemd's `SecureBits=`) or file capabilities kept
/// them: checked with `capget` (not /proc, which Landlock may hide by now). The ambient
/// set is a subset of the permitted one, so an empty permitted set empties it too.
fn no_capabilities_left() -> std::result::Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads the header and writes two `Data` (version 3's layout, 64-bit
    // sets in two halves) into `data`, which holds two.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(last_error("capget"));
    }
    let left = data.iter().any(|d| d.effective != 0 || d.permitted != 0);
    if left {
        return Err(
            "capabilities survived the drop (securebits or file capabilities keep them); \
                    start vmkit without them"
                .into(),
        );
    }
    Ok(())
}

/// `--seccomp-test-violate KIND` (the `seccomp-test-hook` feature): the named thread kind
/// calls `getppid`, which no list allows, right after installing its filter; and
/// `--landlock-test-api-open PATH`: the API thread tries to open `PATH` once restricted.
#[cfg(feature = "seccomp-test-hook")]
mod test_hook {
    use super::*;

    #[cfg(not(debug_assertions))]
    compile_error!("the seccomp-test-hook feature is for tests, never for release builds");

    pub fn violation(args: &Args) -> Option<ThreadKind> {
        let asked = args.seccomp_test_violate.as_deref()?;
        ThreadKind::ALL.into_iter().find(|k| k.name() == asked)
    }

    pub fn api_probe(args: &Args) -> Option<PathBuf> {
        args.landlock_test_api_open.clone()
    }

    /// `--landlock-test-api-open PATH`: opens `path` for reading and says how that went.
    pub fn probe_open(path: Option<&Path>) {
        if let Some(path) = path {
            let result = match std::fs::File::open(path) {
                Ok(_) => "opened".to_string(),
                Err(e) => e.to_string(),
            };
            eprintln!(
                "vmkit: landlock test hook: the API thread opens {}: {result}",
                path.display()
            );
        }
    }

    pub fn maybe_violate(violate: Option<ThreadKind>, me: ThreadKind) {
        if violate == Some(me) {
            if me == ThreadKind::Vmm {
                // Time for a guest let in before this thread's filter to show on its serial
                // port (tests/seccomp.rs checks none did).
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
            eprintln!("vmkit: seccomp test hook: getppid on the {me} thread");
            // SAFETY: getppid takes no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
    }
}

#[cfg(not(feature = "seccomp-test-hook"))]
mod test_hook {
    use super::*;

    pub fn violation(_: &Args) -> Option<ThreadKind> {
        None
    }

    pub fn maybe_violate(_: Option<ThreadKind>, _: ThreadKind) {}

    pub fn api_probe(_: &Args) -> Option<PathBuf> {
        None
    }

    pub fn probe_open(_: Option<&Path>) {}
}
