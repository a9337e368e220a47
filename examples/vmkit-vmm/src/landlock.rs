//! `--landlock`: the file system vmkit may reach once the guest runs, restricted with Landlock
//! (the `landlock` crate) to the paths the VM was given.
//!
//! Applied on the main thread just before the vCPU threads are spawned, so it binds the main
//! thread (the event loop, the devices, the API's requests as the VM serves them) and every
//! vCPU thread. The API's server thread, spawned earlier, restricts itself first thing
//! ([`restrict_api_thread`]) to removing its own socket at the end: it only accepts
//! connections and parses requests, and opens no file. (Landlock ABI 8's `TSYNC`, the crate's
//! `RestrictSelfAttr::all_threads`, would restrict every thread in one call, but needs a newer
//! kernel than many run, 6.18 has ABI 7, and would stack the main thread's rules on the API
//! thread: its own ruleset works on every kernel with Landlock.)
//! What the main thread is allowed (a file, or a directory and all beneath it):
//!
//! | path | access |
//! |---|---|
//! | each disk image (`--disk`, the config file's and the API's drives) | read, and write unless read-only |
//! | `--serial file=`, `--console file=`, `--log-file`, `--metrics-file` | read and write |
//! | the directory of the `--vsock` socket | connect to the sockets in it (`PATH_P`; kernels with Landlock ABI 9), remove files (`PATH` at the end) |
//! | each `--landlock-allow PATH[:ro]` | read, and write unless `:ro` |
//!
//! Nothing else: the kernel and initramfs are loaded, `/dev/kvm`, the TAPs, the pty and the
//! sockets are open, entropy comes from `getrandom(2)`. A `PATCH /drives` to an image outside
//! these, a `PUT /logger` or `PUT /metrics` to a new file, is refused by the kernel (`EACCES`).
//! The ruleset handles every file system right the kernel knows (best effort above ABI 1), and
//! `--landlock` on a kernel without Landlock is an error at start, never a silent run without.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, ABI,
};
use vmkit_virtio_blk::DiskSource;

use crate::config::{Args, ConsoleOutput, SerialOutput};

/// What a rule allows on its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Read files (and list directories).
    Read,
    /// Read and write files (and list directories); nothing is created or removed.
    ReadWrite,
    /// A directory of Unix sockets: connect to them, remove files in it.
    Sockets,
    /// A directory: remove files in it (the API socket's, for the API thread).
    RemoveFiles,
}

/// The paths `--landlock` allows, from the VM's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules(Vec<(PathBuf, Grant)>);

/// The directory `path` is in (`.` for a bare name).
fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Rules {
    /// The rules for the VM `args` describes; `None` without `--landlock`.
    pub fn of(args: &Args) -> Option<Self> {
        if !args.landlock {
            return None;
        }
        let mut rules = Vec::new();
        for disk in &args.disk {
            if let DiskSource::Path(p) = &disk.config.source {
                let grant = match disk.config.read_only {
                    true => Grant::Read,
                    false => Grant::ReadWrite,
                };
                rules.push((p.clone(), grant));
            }
        }
        let outputs = [
            match &args.serial {
                SerialOutput::File(f) => Some(&f.path),
                _ => None,
            },
            match &args.console {
                ConsoleOutput::File(f) => Some(&f.path),
                _ => None,
            },
            args.log_file.as_ref(),
            args.metrics_file.as_ref(),
        ];
        rules.extend(
            outputs
                .into_iter()
                .flatten()
                .map(|p| (p.clone(), Grant::ReadWrite)),
        );
        if let Some(v) = &args.vsock {
            rules.push((parent(&v.socket), Grant::Sockets));
        }
        for extra in &args.landlock_allow {
            let grant = match extra.read_only {
                true => Grant::Read,
                false => Grant::ReadWrite,
            };
            rules.push((extra.path.clone(), grant));
        }
        Some(Self(rules))
    }

    /// The paths and what each may do.
    pub fn paths(&self) -> &[(PathBuf, Grant)] {
        &self.0
    }
}

/// The rights of `grant` (the crate keeps those of a directory off a file's rule).
fn access(grant: Grant) -> BitFlags<AccessFs> {
    match grant {
        Grant::Read => AccessFs::ReadFile | AccessFs::ReadDir,
        Grant::ReadWrite => AccessFs::ReadFile | AccessFs::ReadDir | AccessFs::WriteFile,
        Grant::Sockets => AccessFs::ResolveUnix | AccessFs::RemoveFile,
        Grant::RemoveFiles => AccessFs::RemoveFile.into(),
    }
}

/// Restricts this thread, and the threads it spawns from now on, to `rules` (nothing without
/// `--landlock`); `true` if it did. An error, one line, when the kernel has no Landlock or a
/// path cannot be opened.
pub fn enforce(rules: Option<&Rules>) -> crate::error::Result<bool> {
    restrict(rules).map_err(crate::error::Error::Landlock)
}

/// The API thread's own restriction (`--landlock`): no file system access at all but removing
/// files in the directory of its socket `socket` (which it does at the end). Called on the
/// API thread, first thing.
pub fn restrict_api_thread(socket: &Path) -> Result<(), String> {
    let rules = Rules(vec![(parent(socket), Grant::RemoveFiles)]);
    restrict(Some(&rules)).map(|_| ())
}

/// A ruleset that handles every file system right the kernel knows (Landlock itself
/// required).
fn ruleset() -> Result<landlock::RulesetCreated, String> {
    // The crate's error lists every right it asked for: the cause is the kernel's.
    let unsupported = |_: landlock::RulesetError| {
        "--landlock: this kernel does not provide Landlock (it needs CONFIG_SECURITY_LANDLOCK \
         and landlock in the lsm= list)"
            .to_string()
    };
    // Landlock itself is required; the rights of later ABIs are taken where the kernel has them.
    let ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .map_err(unsupported)?
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(ABI::V10))
        .map_err(|e| format!("--landlock: {e}"))?;
    ruleset.create().map_err(|e| format!("--landlock: {e}"))
}

fn restrict(rules: Option<&Rules>) -> Result<bool, String> {
    let Some(rules) = rules else {
        return Ok(false);
    };
    let mut created = ruleset()?;
    for (path, grant) in rules.paths() {
        let fd = PathFd::new(path)
            .map_err(|e| format!("--landlock: cannot open {}: {e}", path.display()))?;
        created = created
            .add_rule(PathBeneath::new(fd, access(*grant)))
            .map_err(|e| format!("--landlock: {}: {e}", path.display()))?;
    }
    let status = created
        .restrict_self()
        .map_err(|e| format!("--landlock: {e}"))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err("--landlock: this kernel does not enforce Landlock".into());
    }
    log::info!(
        "landlock: {} paths allowed, {:?} ({:?})",
        rules.paths().len(),
        status.ruleset,
        status.landlock
    );
    Ok(true)
}

/// The answer to a `PATCH /drives/{id}` whose image `path` could not be opened: under
/// `--landlock`, Landlock's refusal is said as such (the disk crate would call it an image that
/// is not writable).
pub fn drive_error(landlocked: bool, id: &str, path: &str, e: &vmkit_virtio_blk::Error) -> String {
    if landlocked && refused(Path::new(path), e) {
        return format!(
            "drive {id}: {path} is outside the paths --landlock allows (add it with \
             --landlock-allow PATH)"
        );
    }
    format!("drive {id}: {path}: {e}")
}

/// Whether `error`, from opening `path` under `--landlock`, is Landlock's refusal: the open was
/// denied (`EACCES`) though the file's permissions allow it (`access(2)` is not subject to
/// Landlock).
fn refused(path: &Path, error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    let mut denied = false;
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            denied |= io.raw_os_error() == Some(libc::EACCES);
        }
        source = e.source();
    }
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path that lives for the call; access only reads it.
    denied && unsafe { libc::access(c.as_ptr(), libc::R_OK) } == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(line: &[&str]) -> Args {
        let mut all = vec!["vmkit", "--kernel", "k"];
        all.extend_from_slice(line);
        Args::try_parse_from(all).unwrap()
    }

    #[test]
    fn the_rules_are_the_paths_the_vm_was_given() {
        assert_eq!(Rules::of(&args(&["--disk", "path=a.img"])), None);
        let a = args(&[
            "--landlock",
            "--disk",
            "path=/d/rw.img",
            "--disk",
            "path=/d/ro.img,readonly=on",
            "--serial",
            "file=/o/serial",
            "--console",
            "file=/o/console",
            "--log-file",
            "/o/log",
            "--metrics-file",
            "/o/metrics",
            "--vsock",
            "cid=3,socket=/s/v.sock",
            "--landlock-allow",
            "/images:ro",
            "--landlock-allow",
            "/spare.img",
            "--initramfs",
            "/boot/initrd",
        ]);
        let rules = Rules::of(&a).unwrap();
        let expected = [
            ("/d/rw.img", Grant::ReadWrite),
            ("/d/ro.img", Grant::Read),
            ("/o/serial", Grant::ReadWrite),
            ("/o/console", Grant::ReadWrite),
            ("/o/log", Grant::ReadWrite),
            ("/o/metrics", Grant::ReadWrite),
            ("/s", Grant::Sockets),
            ("/images", Grant::Read),
            ("/spare.img", Grant::ReadWrite),
        ];
        let got: Vec<(&str, Grant)> = rules
            .paths()
            .iter()
            .map(|(p, g)| (p.to_str().unwrap(), *g))
            .collect();
        // The kernel and the initramfs are loaded before: not there.
        assert_eq!(got, expected);
        // A socket named without a directory is in the current one.
        let bare = Rules::of(&args(&["--landlock", "--vsock", "cid=3,socket=v.sock"])).unwrap();
        assert_eq!(bare.paths(), &[(PathBuf::from("."), Grant::Sockets)]);
        // Nothing given, nothing allowed (and still enforced).
        assert_eq!(Rules::of(&args(&["--landlock"])).unwrap().paths(), &[]);
        // Sockets are no files: neither read nor written through the directory's rule.
        assert!(!access(Grant::Sockets).contains(AccessFs::ReadFile));
        assert!(!access(Grant::Read).contains(AccessFs::WriteFile));
    }

    /// A scratch directory with files `allowed`, `read-only` and `other`.
    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmkit-landlock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["allowed", "read-only", "other"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        dir
    }

    #[test]
    #[cfg_attr(no_landlock, ignore = "the kernel has no Landlock")]
    fn a_restricted_thread_opens_what_is_allowed_and_nothing_else() {
        let dir = scratch("enforce");
        let a = args(&[
            "--landlock",
            "--landlock-allow",
            dir.join("allowed").to_str().unwrap(),
            "--landlock-allow",
            &format!("{}:ro", dir.join("read-only").display()),
        ]);
        let rules = Rules::of(&a).unwrap();
        let d = dir.clone();
        // Landlock binds the thread that restricts itself (and those it spawns): its own.
        let seen = std::thread::spawn(move || {
            assert!(enforce(Some(&rules)).unwrap());
            let rw = |p: &str| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(d.join(p))
                    .map(|_| ())
            };
            let inner = std::thread::spawn({
                let d = d.clone();
                move || std::fs::read(d.join("other")).is_err()
            });
            (
                rw("allowed").is_ok(),
                std::fs::read(d.join("read-only")).is_ok(),
                rw("read-only").map_err(|e| e.raw_os_error()),
                std::fs::read(d.join("other")).map_err(|e| e.raw_os_error()),
                std::fs::read_dir(&d).is_err(),
                inner.join().unwrap(),
            )
        })
        .join()
        .unwrap();
        let (allowed, ro_read, ro_write, other, list, inner_denied) = seen.clone();
        assert!(allowed && ro_read, "{seen:?}");
        assert_eq!(ro_write, Err(Some(libc::EACCES)));
        assert_eq!(other, Err(Some(libc::EACCES)));
        assert!(list && inner_denied, "{seen:?}");
        // This thread was not restricted.
        assert!(std::fs::read(dir.join("other")).is_ok());
        // A path that is not there is an error, not a rule dropped.
        let missing = args(&["--landlock", "--landlock-allow", "/nonexistent/vmkit"]);
        let e = std::thread::spawn(move || restrict(Rules::of(&missing).as_ref()).unwrap_err())
            .join()
            .unwrap();
        assert!(e.contains("cannot open /nonexistent/vmkit"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_landlock_in_the_kernel_is_an_error_not_a_run_without() {
        // A thread whose landlock_create_ruleset fails with ENOSYS, as on a kernel without
        // Landlock (a seccomp filter binds only the thread that installs it).
        let e = std::thread::spawn(|| {
            let filter = seccompiler::SeccompFilter::new(
                [(libc::SYS_landlock_create_ruleset, vec![])].into(),
                seccompiler::SeccompAction::Allow,
                seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
                seccompiler::TargetArch::x86_64,
            )
            .unwrap();
            let program: seccompiler::BpfProgram = filter.try_into().unwrap();
            seccompiler::apply_filter(&program).unwrap();
            restrict(Rules::of(&args(&["--landlock"])).as_ref())
        })
        .join()
        .unwrap();
        let e = e.unwrap_err();
        assert!(
            e.starts_with("--landlock: this kernel does not provide Landlock") && !e.contains('\n'),
            "{e}"
        );
    }
}
