//! `vmkit --api-sock` driven with curl, as an operator would: a scratch directory, the
//! process, requests, its serial output and its end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory, removed at the end.
pub struct Dir(PathBuf);

impl Dir {
    pub fn new(name: &str) -> Self {
        // Lower case: the Python client lowercases socket paths.
        let p = std::env::temp_dir().join(format!("vmkit-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `vmkit --api-sock` process.
pub struct Vmkit {
    child: Child,
    /// The API socket.
    pub sock: PathBuf,
    /// The serial output file.
    pub serial: PathBuf,
}

impl Vmkit {
    /// Starts `vmkit --api-sock DIR/api.sock --serial file=DIR/serial ARGS…` and waits for
    /// its socket.
    pub fn start(dir: &Dir, args: &[&str]) -> Self {
        let sock = dir.file("api.sock");
        let serial = dir.file("serial");
        let child = Command::new(env!("CARGO_BIN_EXE_vmkit"))
            .arg("--api-sock")
            .arg(&sock)
            .arg("--serial")
            .arg(format!("file={}", serial.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no API socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        Self {
            child,
            sock,
            serial,
        }
    }

    /// `curl --unix-socket` with `method`, `path` and a JSON `body`: the status and body.
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("--unix-socket")
        .arg(&self.sock)
        .arg(format!("http://localhost{path}"));
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = cmd.output().expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// As [`curl`](Self::curl), asserting the status.
    pub fn expect(&self, status: u16, method: &str, path: &str, body: Option<&str>) -> String {
        let (code, answer) = self.curl(method, path, body);
        assert_eq!(code, status, "{method} {path} {body:?}: {answer}");
        answer
    }

    /// `PUT /actions` with `action_type`, which must answer 204.
    pub fn action(&self, action_type: &str) {
        let body = format!(r#"{{"action_type": "{action_type}"}}"#);
        self.expect(204, "PUT", "/actions", Some(&body));
    }

    /// `PATCH /vm` to `state` (`Paused`, `Resumed`), which must answer 204.
    pub fn set_state(&self, state: &str) {
        let body = format!(r#"{{"state": "{state}"}}"#);
        self.expect(204, "PATCH", "/vm", Some(&body));
    }

    /// The serial output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    pub fn wait_serial(&self, needle: &str, timeout: Duration) {
        let start = Instant::now();
        while !self.serial().contains(needle) {
            assert!(
                start.elapsed() < timeout,
                "no {needle:?} in the serial output:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit: the status code and stderr.
    pub fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let out = self.child.wait_with_output().unwrap();
                panic!(
                    "vmkit did not exit in {timeout:?}; stderr:\n{}\nserial:\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    std::fs::read_to_string(&self.serial).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = self.child.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill only sends a signal to the child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

pub fn state(vm: &Vmkit) -> String {
    let info = vm.expect(200, "GET", "/", None);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    v["state"].as_str().unwrap().to_string()
}

/// Runs `client` (from [`firecracker_python_client`], its arguments added) and asserts that
/// every step passed.
pub fn expect_client_passes(mut client: Command) {
    let out = client.output().expect("run fc_client_test.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains(" 0 failed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `fc_client_test.py` (tests/api/), run with the venv holding the Firecracker client from
/// PyPI (created once by `setup-venv.sh`), as a command to add arguments to.
pub fn firecracker_python_client() -> Command {
    let scripts = crate::common::repo_root().join("examples/vmkit-vmm/tests/api");
    let venv = Command::new("bash")
        .arg(scripts.join("setup-venv.sh"))
        .output()
        .expect("run setup-venv.sh");
    assert!(
        venv.status.success(),
        "setup-venv.sh (pip install from PyPI) failed:\n{}",
        String::from_utf8_lossy(&venv.stderr)
    );
    let python = String::from_utf8_lossy(&venv.stdout).trim().to_string();
    let mut cmd = Command::new(python);
    cmd.arg(scripts.join("fc_client_test.py"));
    cmd
}
