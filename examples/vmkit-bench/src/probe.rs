//! What a running VMM process has done so far, sampled from outside at named moments
//! (marks), and the difference between two marks (a window):
//!
//! - CPU time of its threads from `/proc/PID/task/TID/schedstat` (ns on a CPU): the vCPU
//!   threads (named `vcpuN` in vmkit, `CPU N/KVM` in QEMU with `-name ...,debug-threads=on`),
//!   which also run the guest, apart from the others — the VMM's own work (event loop, device
//!   emulation, the host kernel's TAP and network stack work done in its system calls);
//!   the vCPU threads' time is kept apart (the guest's own work, on this host's kvm_pvm
//!   also its emulated kernel mode, and the exits handled on them);
//! - vCPU exits by KVM's tracepoints ([`KvmCounters`]), on the vCPU threads;
//! - frames through the TAP both ways, from `/proc/PID/net/dev` (the VMM runs in the TAP's
//!   namespace).

use std::sync::Mutex;

use crate::kvmtrace::{Exits, KvmCounters};

/// One sample.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// CPU time of the threads other than the vCPUs, ns.
    pub vmm_ns: u64,
    /// CPU time of the vCPU threads (the guest, and the exits handled on them), ns.
    pub vcpu_ns: u64,
    /// vCPU exits so far (`None` without the counters).
    pub exits: Option<Exits>,
    /// Frames through the TAP, received plus sent.
    pub frames: u64,
}

/// A VMM process being sampled.
#[derive(Debug)]
pub struct Probe {
    pid: u32,
    vcpus: Vec<i32>,
    tap: String,
    counters: Result<KvmCounters, String>,
    marks: Mutex<Vec<(&'static str, Sample)>>,
}

/// A thread's name and CPU time (ns) from `/proc/PID/task/TID`.
fn thread(pid: u32, tid: &str) -> Option<(String, u64)> {
    let dir = format!("/proc/{pid}/task/{tid}");
    let comm = std::fs::read_to_string(format!("{dir}/comm")).ok()?;
    let sched = std::fs::read_to_string(format!("{dir}/schedstat")).ok()?;
    let ns = sched.split_whitespace().next()?.parse().ok()?;
    Some((comm.trim_end().to_string(), ns))
}

/// The thread ids of `pid` with their names and CPU times.
fn threads(pid: u32) -> Result<Vec<(i32, String, u64)>, String> {
    let dir = format!("/proc/{pid}/task");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))?;
    let mut all = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let (Ok(tid), Some((comm, ns))) = (name.parse(), thread(pid, &name)) {
            all.push((tid, comm, ns));
        }
    }
    Ok(all)
}

/// Whether a thread of this name runs a vCPU.
fn is_vcpu(comm: &str) -> bool {
    comm.starts_with("vcpu") || comm.ends_with("/KVM")
}

/// Received plus sent packets of `tap` in a `/proc/net/dev` text.
fn tap_frames(dev: &str, tap: &str) -> Option<u64> {
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{tap}:")))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    Some(f.get(1)? + f.get(9)?)
}

impl Probe {
    /// Starts sampling `pid` (whose vCPU threads must exist) with frames counted on `tap`.
    /// Without exit counters (no tracefs, no permission) the exits are left out.
    pub fn attach(pid: u32, tap: &str) -> Result<Self, String> {
        let vcpus: Vec<i32> = threads(pid)?
            .into_iter()
            .filter(|t| is_vcpu(&t.1))
            .map(|t| t.0)
            .collect();
        if vcpus.is_empty() {
            return Err(format!("no vCPU thread in /proc/{pid}/task"));
        }
        Ok(Self {
            pid,
            counters: KvmCounters::attach(&vcpus),
            vcpus,
            tap: tap.to_string(),
            marks: Mutex::new(Vec::new()),
        })
    }

    /// Why vCPU exits are not counted, if they are not.
    pub fn counters_missing(&self) -> Option<&str> {
        self.counters.as_ref().err().map(String::as_str)
    }

    /// A sample now.
    pub fn sample(&self) -> Result<Sample, String> {
        let all = threads(self.pid)?;
        let (vcpu, vmm): (Vec<_>, Vec<_>) = all.iter().partition(|t| self.vcpus.contains(&t.0));
        let sum = |ts: Vec<&(i32, String, u64)>| ts.iter().map(|t| t.2).sum();
        let (vmm_ns, vcpu_ns) = (sum(vmm), sum(vcpu));
        let path = format!("/proc/{}/net/dev", self.pid);
        let dev = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let frames = tap_frames(&dev, &self.tap).ok_or(format!("no {} in {path}", self.tap))?;
        let exits = self.counters.as_ref().ok().map(KvmCounters::read);
        Ok(Sample {
            vmm_ns,
            vcpu_ns,
            exits,
            frames,
        })
    }

    /// Samples now and keeps it as `name` (a failed sample is not kept).
    pub fn mark(&self, name: &'static str) {
        if let (Ok(s), Ok(mut marks)) = (self.sample(), self.marks.lock()) {
            marks.push((name, s));
        }
    }

    /// The difference from mark `from` to mark `to`.
    pub fn window(&self, from: &str, to: &str) -> Option<Window> {
        let marks = self.marks.lock().ok()?;
        let find = |n: &str| marks.iter().find(|m| m.0 == n).map(|m| m.1);
        let (a, b) = (find(from)?, find(to)?);
        let exits = a.exits.zip(b.exits).map(|(a, b)| Exits {
            to_vmm: b.to_vmm - a.to_vmm,
            mmio_pio: b.mmio_pio - a.mmio_pio,
        });
        Some(Window {
            vmm_ns: b.vmm_ns.saturating_sub(a.vmm_ns),
            vcpu_ns: b.vcpu_ns.saturating_sub(a.vcpu_ns),
            exits,
            frames: b.frames - a.frames,
        })
    }
}

/// What happened between two marks.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// CPU time of the VMM's threads other than the vCPUs, ns.
    pub vmm_ns: u64,
    /// CPU time of the vCPU threads, ns.
    pub vcpu_ns: u64,
    /// vCPU exits.
    pub exits: Option<Exits>,
    /// Frames through the TAP, both ways.
    pub frames: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing() {
        let dev = "Inter-|   Receive  |  Transmit\n face |bytes packets errs drop fifo frame \
                   compressed multicast|bytes packets errs drop fifo colls carrier compressed\n\
                   lo: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n\
                   vmtap0: 6400 100 0 0 0 0 0 0 1280 20 0 5 0 0 0 0\n";
        assert_eq!(tap_frames(dev, "vmtap0"), Some(120));
        assert_eq!(tap_frames(dev, "eth0"), None);
        assert!(is_vcpu("vcpu0") && is_vcpu("CPU 0/KVM"));
        assert!(!is_vcpu("qemu-system-x86") && !is_vcpu("vmkit"));
    }
}
