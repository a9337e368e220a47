//! The VMMs compared — vmkit, an optional baseline vmkit, QEMU microvm — and the command line
//! each boots the test guest with.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Options;

/// One of the VMMs a table has a column for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// The vmkit binary measured.
    Vmkit,
    /// The `--baseline` vmkit binary.
    Baseline,
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
}

impl Vmm {
    /// The column heading.
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Vmkit => "vmkit",
            Vmm::Baseline => "vmkit (baseline)",
            Vmm::Qemu => "QEMU microvm",
        }
    }

    /// Whether it is a vmkit (it takes vmkit's flags and prints `--stats`).
    pub fn is_vmkit(self) -> bool {
        self != Vmm::Qemu
    }
}

/// What one benchmark run has: binaries, guest, and whether QEMU is there.
#[derive(Debug)]
pub struct Setup {
    /// The vmkit measured.
    pub vmkit: PathBuf,
    /// The vmkit it is compared against, if any.
    pub baseline: Option<PathBuf>,
    /// The PVH test guest every VMM boots.
    pub guest: PathBuf,
    /// Whether `qemu-system-x86_64` runs.
    pub qemu: bool,
}

/// Whether `program --version` runs and succeeds.
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Setup {
    /// The binaries `opts` names or the defaults (`vmkit` next to this program, the test
    /// guest's release build), checked to exist.
    pub fn find(opts: &Options) -> Result<Self, String> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let exe = std::env::current_exe().map_err(|e| format!("current exe: {e}"))?;
        let vmkit = opts
            .vmkit
            .clone()
            .unwrap_or_else(|| exe.with_file_name("vmkit"));
        let guest = opts.guest.clone().unwrap_or_else(|| {
            root.join(
                "examples/test-guest/target/x86_64-unknown-linux-gnu/release/vmkit-test-guest",
            )
        });
        if !guest.exists() || !vmkit.exists() {
            return Err(format!(
                "{} or {} missing; build first: cargo build --release -p vmkit-vmm; \
                 (cd examples/test-guest && cargo build --release)",
                vmkit.display(),
                guest.display()
            ));
        }
        if let Some(b) = opts.baseline.as_deref().filter(|b| !b.exists()) {
            return Err(format!("--baseline {}: no such file", b.display()));
        }
        let qemu = runs("qemu-system-x86_64");
        if !qemu {
            eprintln!("vmkit-bench: qemu-system-x86_64 not found: QEMU columns left out");
        }
        Ok(Self {
            vmkit,
            baseline: opts.baseline.clone(),
            guest,
            qemu,
        })
    }

    /// The VMMs in column order: vmkit, the baseline, QEMU (those present).
    pub fn vmms(&self) -> Vec<Vmm> {
        let mut v = vec![Vmm::Vmkit];
        if self.baseline.is_some() {
            v.push(Vmm::Baseline);
        }
        if self.qemu {
            v.push(Vmm::Qemu);
        }
        v
    }

    /// The vmkit binaries in column order: vmkit and the baseline (if any).
    pub fn vmkits(&self) -> Vec<Vmm> {
        self.vmms().into_iter().filter(|v| v.is_vmkit()).collect()
    }

    fn vmkit_path(&self, vmm: Vmm) -> &Path {
        match (vmm, &self.baseline) {
            (Vmm::Baseline, Some(b)) => b,
            _ => &self.vmkit,
        }
    }

    /// `vmm` booting the test guest with `memory` (e.g. `128M`) and `cmdline`, 1 vCPU, serial
    /// on stdio. vmkit gets `--stats`; a baseline gets only flags every vmkit has.
    pub fn command(&self, vmm: Vmm, memory: &str, cmdline: &str) -> Command {
        let guest = self.guest.to_str().unwrap_or_default();
        if vmm.is_vmkit() {
            let mut c = Command::new(self.vmkit_path(vmm));
            c.args(["--kernel", guest, "--memory", memory, "--cmdline", cmdline])
                .arg("--stats");
            return c;
        }
        let mut c = Command::new("qemu-system-x86_64");
        c.args(["-M", "microvm", "-enable-kvm"])
            .args(["-cpu", "host,-arch-capabilities"])
            .args(["-m", memory, "-smp", "1", "-nodefaults", "-no-user-config"])
            .args(["-nographic", "-serial", "stdio", "-no-reboot"])
            .args(["-kernel", guest, "-append", cmdline]);
        c
    }
}

/// The guest command-line entry that tells the test guest where QEMU microvm's first
/// virtio-mmio device is: with ACPI, microvm does not put `virtio_mmio.device=` on the command
/// line, and the first `-device` takes the top transport slot (0xfeb02e00, GSI 47).
pub const QEMU_FIRST_VIRTIO_MMIO: &str = "virtio_mmio.device=512@0xfeb02e00:47";
