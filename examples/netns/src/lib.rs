//! A network namespace with a TAP in it, for tests that give a guest a network: the host's
//! end (`10.77.0.1/24` on `vmtap0`) and everything the test runs against the guest stay inside
//! the namespace, which is deleted on drop.
//!
//! Used by vmkit-vmm's integration tests and vmkit-bench's virtio-net section.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::thread::JoinHandle;
use std::time::Duration;

/// A namespace `vmkit-<tag>-<pid>` holding the TAP `vmtap0` at `host_ip`/24.
pub struct NetNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    /// The TAP interface in it.
    pub tap: String,
    /// The host's address on the TAP.
    pub host_ip: &'static str,
    /// The address the guest is meant to take.
    pub guest_ip: &'static str,
}

/// Runs `ip ARGS…`; `Err` with its stderr when it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why this process cannot create a namespace with a TAP, if it cannot.
fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces and TAPs need CAP_NET_ADMIN)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    None
}

impl NetNs {
    /// Creates namespace `vmkit-<tag>-<pid>` with lo up and a TAP `vmtap0` (vnet_hdr,
    /// multi_queue when `queues` > 1) at 10.77.0.1/24, up. `Err` (also said on stderr) when
    /// not root, without /dev/net/tun, or when a step fails.
    pub fn create(tag: &str, queues: u16) -> Result<NetNs, String> {
        if let Some(why) = missing_privilege() {
            eprintln!("netns: {why}");
            return Err(why);
        }
        let ns = NetNs {
            name: format!("vmkit-{tag}-{}", std::process::id()),
            tap: "vmtap0".into(),
            host_ip: "10.77.0.1",
            guest_ip: "10.77.0.2",
        };
        // A namespace left by an earlier process with this pid goes first.
        let _ = ip(&["netns", "delete", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        // From here on, `ns` deletes the namespace when a step fails.
        ns.setup(queues).inspect_err(|e| eprintln!("netns: {e}"))?;
        Ok(ns)
    }

    fn setup(&self, queues: u16) -> Result<(), String> {
        let n = self.name.as_str();
        let tap = self.tap.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        let mut add = vec![
            "-n", n, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr",
        ];
        if queues > 1 {
            add.push("multi_queue");
        }
        ip(&add)?;
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", tap])?;
        ip(&["-n", n, "link", "set", tap, "up"])
    }

    /// Adds another TAP `name` (vnet_hdr, one queue, no address), up.
    pub fn add_tap(&self, name: &str) -> Result<(), String> {
        let n = self.name.as_str();
        ip(&[
            "-n", n, "tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr",
        ])?;
        ip(&["-n", n, "link", "set", name, "up"])
    }

    /// Opens a queue of the TAP `name` in the namespace (as a privileged parent would for an
    /// unprivileged VMM) without close-on-exec, so the next child this process spawns
    /// inherits it (`--net fd=N`).
    pub fn open_inheritable_tap(&self, name: &str) -> Result<OwnedFd, String> {
        let name = name.to_string();
        let file = self
            .spawn_in(move || -> std::io::Result<File> {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")?;
                // SAFETY: all zeros is a valid ifreq.
                let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
                for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                    *d = s as libc::c_char;
                }
                req.ifr_ifru.ifru_flags =
                    (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
                // SAFETY: TUNSETIFF with a pointer to a live ifreq.
                if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(file)
            })
            .join()
            .map_err(|_| "the thread opening the TAP panicked".to_string())?
            .map_err(|e| format!("open the TAP: {e}"))?;
        // SAFETY: F_SETFD on an fd this process owns, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
            return Err(format!(
                "clear FD_CLOEXEC: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(OwnedFd::from(file))
    }

    /// A Command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a new thread that has entered the namespace (setns(CLONE_NEWNET)), e.g.
    /// to bind a listener at `host_ip`. The thread panics if it cannot enter it.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `file` is an open namespace file for the duration of the call; setns
            // changes only this thread's network namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for NetNs {
    /// Deletes the namespace (and with it the TAP).
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "delete", &self.name]) {
            eprintln!("netns: {e}");
        }
    }
}

/// The first connection to `listener`, in blocking mode with `timeout` on its reads and
/// writes. Polls every 5 ms; before each wait `give_up` may end it with a reason (the VM
/// ended, a deadline passed).
pub fn accept_until(
    listener: &TcpListener,
    timeout: Option<Duration>,
    mut give_up: impl FnMut() -> Option<String>,
) -> Result<TcpStream, String> {
    let text = |e: std::io::Error| e.to_string();
    listener.set_nonblocking(true).map_err(text)?;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).map_err(text)?;
                conn.set_read_timeout(timeout).map_err(text)?;
                conn.set_write_timeout(timeout).map_err(text)?;
                return Ok(conn);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                if let Some(why) = give_up() {
                    return Err(why);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
}
