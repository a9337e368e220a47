//! vCPUs: created and set up for a VM, then run one thread each on the VM's bus, and every
//! way a vCPU stops mapped, here and only here, to the reason the VM ends.

use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryBackend;
use vmkit_boot::EntryPoint;
use vmkit_bus::IoBus;
use vmkit_legacy::{ExitNotifier, ExitReason};
use vmkit_vcpu::{
    install_kick_handler, kick, restore_state, restrict_cr4, setup_entry, setup_fpu, setup_lint,
    setup_msrs, CpuIdentity, CpuTemplate, CpuidConfig, CpuidTemplate, ParkedTask, Vcpu,
    VcpuControl, VcpuCounters, VcpuExitHandler, VcpuState, VcpuStats, VcpuStop,
};

use crate::{Error, Result};

/// The highest vCPU count: APIC IDs are one byte in the xAPIC MADT and MP table entries.
pub const MAX_VCPUS: u32 = 254;

/// The vCPUs to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuConfig {
    /// How many (1 to [`MAX_VCPUS`], and no more than KVM allows).
    pub count: u32,
    /// The CPU model the guest sees.
    pub template: CpuTemplate,
}

/// The VM's bus as the vCPUs see it: port and MMIO exits dispatched on the [`IoBus`].
/// Accesses where nothing is mapped read all ones and are otherwise ignored.
#[derive(Debug, Clone)]
pub struct BusExits(pub Arc<IoBus>);

impl VcpuExitHandler for BusExits {
    #[inline]
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let _ = self.0.pio_read(port, data);
    }
    #[inline]
    fn pio_write(&self, port: u16, data: &[u8]) {
        let _ = self.0.pio_write(port, data);
    }
    #[inline]
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let _ = self.0.mmio_read(addr, data);
    }
    #[inline]
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        let _ = self.0.mmio_write(addr, data);
    }
}

/// The vCPUs of a VM, set up (CPUID with a coherent topology and the template's masks,
/// MSRs, FPU, LAPIC LINT pins) and not running yet.
#[derive(Debug)]
pub struct Vcpus {
    vcpus: Vec<Vcpu>,
    template: CpuTemplate,
    clearcpuid: Option<String>,
    /// KVM's MSR list: what a saved state holds.
    msrs: Arc<[u32]>,
    /// What KVM supports (`KVM_GET_SUPPORTED_CPUID`), for [`cpu_identity`](Self::cpu_identity).
    supported: Vec<kvm_bindings::kvm_cpuid_entry2>,
}

/// How long [`VcpuThreads::save_states`] waits for the parked vCPUs to read their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

fn check_count(kvm: &Kvm, count: u32) -> Result<()> {
    if count == 0 {
        return Err(Error::NoCpus);
    }
    let max = u32::try_from(kvm.get_max_vcpus())
        .unwrap_or(u32::MAX)
        .min(MAX_VCPUS);
    if count > max {
        return Err(Error::TooManyCpus { asked: count, max });
    }
    Ok(())
}

fn setup_one(
    vm: &VmFd,
    index: u32,
    cpuid: &CpuidTemplate,
    cfg: &CpuidConfig,
    msrs: &[u32],
) -> Result<Vcpu> {
    let fd = vm
        .create_vcpu(u64::from(index))
        .map_err(|source| Error::CreateVcpu { index, source })?;
    let setup = || -> std::result::Result<(), vmkit_vcpu::Error> {
        fd.set_cpuid2(&cpuid.for_vcpu(index, cfg)?)
            .map_err(vmkit_vcpu::Error::VcpuCpuid)?;
        setup_msrs(&fd, msrs)?;
        setup_fpu(&fd)?;
        setup_lint(&fd)
    };
    setup().map_err(|source| Error::SetupVcpu { index, source })?;
    Ok(Vcpu::new(fd, index))
}

impl Vcpus {
    /// Creates `config.count` vCPUs in `vm` (after its irqchip). Where this host's KVM does
    /// not hide what the template masks (kvm_pvm passes host bits outside its supported set
    /// through), vCPU 0's CPUID is read back and [`linux_clearcpuid`](Self::linux_clearcpuid)
    /// gives Linux's `clearcpuid=` for it.
    pub fn create(kvm: &Kvm, vm: &VmFd, config: &VcpuConfig) -> Result<Self> {
        check_count(kvm, config.count)?;
        let template =
            CpuidTemplate::from_kvm(kvm).map_err(|source| Error::SetupVcpu { index: 0, source })?;
        let cfg = CpuidConfig {
            num_cpus: config.count,
            masks: config.template.masks(),
        };
        let msrs = kvm.get_msr_index_list().map_err(Error::MsrList)?;
        let vcpus = (0..config.count)
            .map(|index| setup_one(vm, index, &template, &cfg, msrs.as_slice()))
            .collect::<Result<Vec<_>>>()?;
        let mut this = Self {
            vcpus,
            template: config.template,
            clearcpuid: None,
            msrs: msrs.as_slice().into(),
            supported: template.supported().to_vec(),
        };
        this.read_back_cpuid()?;
        Ok(this)
    }

    fn read_back_cpuid(&mut self) -> Result<()> {
        if self.template == CpuTemplate::Host {
            return Ok(());
        }
        let effective = self.vcpus[0]
            .fd()
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::SetupVcpu {
                index: 0,
                source: vmkit_vcpu::Error::VcpuCpuid(e),
            })?;
        self.clearcpuid = self.template.linux_clearcpuid(effective.as_slice());
        if self.clearcpuid.is_some() {
            let visible = self.template.still_visible(effective.as_slice()).join(",");
            log::warn!("this host's KVM does not hide {visible} from CPUID; the kernel is told with clearcpuid=");
        }
        Ok(())
    }

    /// This host's CPU as these vCPUs see it (KVM's supported list and what vCPU 0 reads
    /// back), to check a snapshot's saved CPUID against before
    /// [`restore_states`](Self::restore_states) replaces it: no scratch VM.
    pub fn cpu_identity(&self) -> Result<CpuIdentity> {
        CpuIdentity::of_vcpu(&self.supported, self.vcpus[0].fd())
            .map_err(|source| Error::SetupVcpu { index: 0, source })
    }

    /// How many.
    pub fn count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Linux's `clearcpuid=…` for features the template hides but this host's KVM still
    /// shows, if any.
    pub fn linux_clearcpuid(&self) -> Option<&str> {
        self.clearcpuid.as_deref()
    }

    /// Puts the boot vCPU (0) at the kernel's entry point, with the template's CR4 bits
    /// clear. The others wait for INIT/SIPI.
    pub fn set_entry<M: GuestMemoryBackend>(&self, memory: &M, entry: EntryPoint) -> Result<()> {
        let boot = self.vcpus[0].fd();
        let err = |source| Error::SetupVcpu { index: 0, source };
        setup_entry(boot, memory, entry).map_err(err)?;
        restrict_cr4(boot, self.template).map_err(err)
    }

    /// Writes saved states into the vCPUs, one per vCPU in order, instead of
    /// [`set_entry`](Self::set_entry) (the vCPUs then continue where they were saved). The
    /// count must match.
    pub fn restore_states(&self, states: &[VcpuState]) -> Result<()> {
        if states.len() != self.vcpus.len() {
            return Err(Error::VcpuCount {
                saved: states.len(),
                here: self.vcpus.len(),
            });
        }
        for (vcpu, state) in self.vcpus.iter().zip(states) {
            restore_state(vcpu.fd(), state).map_err(|source| Error::RestoreVcpu {
                index: vcpu.index(),
                source,
            })?;
        }
        Ok(())
    }

    /// Starts one thread per vCPU (named `vcpuN`), dispatching exits on `bus`. A vCPU that
    /// stops by itself reports why to `exit` (see [`exit_reason`]); pause and resume them
    /// with [`VcpuThreads::pause`] and [`VcpuThreads::resume`], stop them all with
    /// [`VcpuThreads::stop`].
    pub fn start(self, bus: Arc<IoBus>, exit: Arc<dyn ExitNotifier>) -> Result<VcpuThreads> {
        self.start_with(bus, exit, Arc::new(|_| Ok(())))
    }

    /// [`start`](Self::start), with `prologue` run first in each vCPU thread, before its
    /// first `KVM_RUN` (to install a seccomp filter, say). Returns once every prologue has
    /// run; if one fails, no vCPU runs, the threads end, and the error names the vCPU.
    pub fn start_with(
        self,
        bus: Arc<IoBus>,
        exit: Arc<dyn ExitNotifier>,
        prologue: Arc<VcpuPrologue>,
    ) -> Result<VcpuThreads> {
        Ok(self.prepare_with(bus, exit, prologue)?.run())
    }

    /// The first half of [`start_with`](Self::start_with): spawns the threads and runs
    /// `prologue` in each, then parks them before their first `KVM_RUN` until
    /// [`ParkedVcpus::run`] (or [`ParkedVcpus::abort`], or a drop, which end them without
    /// running the guest). Between the two the caller can do what must come before any guest
    /// instruction, such as installing its own thread's seccomp filter.
    pub fn prepare_with(
        self,
        bus: Arc<IoBus>,
        exit: Arc<dyn ExitNotifier>,
        prologue: Arc<VcpuPrologue>,
    ) -> Result<ParkedVcpus> {
        install_kick_handler().map_err(|source| Error::SetupVcpu { index: 0, source })?;
        let control = VcpuControl::new();
        let exits = Arc::new(BusExits(bus));
        let counters = self.vcpus.iter().map(Vcpu::counters).collect();
        let mut parked = ParkedVcpus {
            control,
            threads: Vec::with_capacity(self.vcpus.len()),
            gates: Vec::with_capacity(self.vcpus.len()),
            counters,
            msrs: self.msrs.clone(),
        };
        let (ready_tx, ready) = mpsc::channel();
        for mut vcpu in self.vcpus {
            let (exits, control, exit) = (exits.clone(), parked.control.clone(), exit.clone());
            let (ready_tx, prologue) = (ready_tx.clone(), prologue.clone());
            let (gate, wait) = mpsc::channel::<bool>();
            let thread = thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index()))
                .spawn(move || {
                    let _ = ready_tx.send((vcpu.index(), prologue(vcpu.index())));
                    if wait.recv() != Ok(true) {
                        return VcpuStats::default();
                    }
                    let stopped = vcpu.run(&*exits, &control);
                    if let Some(reason) = exit_reason(vcpu.index(), stopped) {
                        exit.notify_exit(reason);
                    }
                    vcpu.stats()
                })
                .map_err(Error::Thread)?;
            parked.threads.push(thread);
            parked.gates.push(gate);
        }
        drop(ready_tx);
        let failed = (0..parked.threads.len())
            .filter_map(|_| match ready.recv() {
                Ok((_, Ok(()))) => None,
                Ok((index, Err(message))) => Some(Error::VcpuPrologue { index, message }),
                Err(_) => Some(Error::VcpuPrologue {
                    index: 0,
                    message: "a vCPU thread ended before its prologue".into(),
                }),
            })
            .next();
        match failed {
            // The drop ends the threads.
            Some(e) => Err(e),
            None => Ok(parked),
        }
    }
}

/// vCPU threads whose prologues have run, parked before their first `KVM_RUN`
/// ([`Vcpus::prepare_with`]): no guest instruction runs until [`run`](Self::run). Dropped
/// without `run`, the threads end without running the guest (as [`abort`](Self::abort)).
#[derive(Debug)]
pub struct ParkedVcpus {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<VcpuStats>>,
    gates: Vec<mpsc::Sender<bool>>,
    counters: Vec<Arc<VcpuCounters>>,
    msrs: Arc<[u32]>,
}

impl ParkedVcpus {
    /// Lets the vCPUs into the guest.
    pub fn run(mut self) -> VcpuThreads {
        open_gates(&std::mem::take(&mut self.gates), true);
        VcpuThreads {
            control: self.control.clone(),
            threads: std::mem::take(&mut self.threads),
            counters: std::mem::take(&mut self.counters),
            msrs: self.msrs.clone(),
        }
    }

    /// Starts the vCPU threads paused (for a VM restored with `resume_vm: false`): each
    /// parks before its first `KVM_RUN`, [`VcpuThreads::is_paused`] holds, their state can
    /// be saved, and [`VcpuThreads::resume`] lets them into the guest.
    pub fn run_paused(self) -> VcpuThreads {
        self.control.request_pause();
        self.run()
    }

    /// Ends the threads without running the guest, and waits for them.
    pub fn abort(self) {
        drop(self);
    }

    /// Each vCPU's exit counters, in vCPU order (all zero while parked).
    pub fn counters(&self) -> &[Arc<VcpuCounters>] {
        &self.counters
    }
}

impl Drop for ParkedVcpus {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            // Let in (`run`): the threads are `VcpuThreads`' now.
            return;
        }
        open_gates(&self.gates, false);
        // Stopped as running vCPUs are (a no-op for threads that were parked): a drop never
        // waits on a guest.
        let threads = VcpuThreads {
            control: self.control.clone(),
            threads: std::mem::take(&mut self.threads),
            counters: Vec::new(),
            msrs: self.msrs.clone(),
        };
        threads.stop();
    }
}

/// What a vCPU thread runs first, given the vCPU's index: `Err` stops the start.
pub type VcpuPrologue = dyn Fn(u32) -> std::result::Result<(), String> + Send + Sync;

fn open_gates(gates: &[mpsc::Sender<bool>], run: bool) {
    for gate in gates {
        // A thread that already ended does not need to be told.
        let _ = gate.send(run);
    }
}

/// Why the VM ends when vCPU `index` stopped as `stopped` (`None`: it was told to stop).
pub fn exit_reason(
    index: u32,
    stopped: std::result::Result<VcpuStop, vmkit_vcpu::Error>,
) -> Option<ExitReason> {
    Some(match stopped {
        Ok(VcpuStop::Stopped) => return None,
        Ok(VcpuStop::Reset) => ExitReason::Reset,
        Ok(VcpuStop::PowerOff) => ExitReason::PowerOff,
        Ok(VcpuStop::Crash) => ExitReason::Crash(format!("vCPU {index} reported a crash event")),
        Ok(VcpuStop::TripleFault) => ExitReason::Crash(format!("vCPU {index} triple-faulted")),
        Ok(VcpuStop::Halted) => ExitReason::Failed(format!("vCPU {index} halted")),
        // KVM cannot run the guest from the state the guest put itself in.
        Err(
            e @ (vmkit_vcpu::Error::InternalError { .. } | vmkit_vcpu::Error::FailEntry { .. }),
        ) => ExitReason::Crash(format!("vCPU {index}: {e}")),
        Err(e) => ExitReason::Failed(format!("vCPU {index}: {e}")),
    })
}

/// Running vCPU threads.
#[derive(Debug)]
pub struct VcpuThreads {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<VcpuStats>>,
    counters: Vec<Arc<VcpuCounters>>,
    msrs: Arc<[u32]>,
}

/// Each vCPU's saved state or error, by vCPU index, filled by the vCPU threads.
type StateSlots = Mutex<Vec<Option<vmkit_vcpu::Result<VcpuState>>>>;

impl VcpuThreads {
    /// Each vCPU's live exit counters, in vCPU order (for metrics while they run).
    pub fn counters(&self) -> &[Arc<VcpuCounters>] {
        &self.counters
    }

    /// Pauses every vCPU: each finishes the exit it is handling and parks before its next
    /// `KVM_RUN` (a kick brings the ones inside `KVM_RUN` out, a vCPU waiting for INIT/SIPI
    /// included). Returns once every vCPU still running is parked; a vCPU that has returned
    /// (the guest reset or powered off, an error) does not count, whether it returned before
    /// or during the pause. Until [`resume`](Self::resume) no guest code runs; device
    /// emulation outside the vCPU threads (event loops, timers in KVM) goes on.
    ///
    /// Pausing a paused VM changes nothing. If some vCPU does not park within `timeout` (stuck
    /// in a device's exit handler), the pause is withdrawn, the vCPUs run on, and the error
    /// says how many had parked. Calls of `pause` and `resume` are meant to come from one
    /// thread (the VMM's API), not to race each other.
    pub fn pause(&self, timeout: Duration) -> Result<()> {
        self.control.request_pause();
        for t in &self.threads {
            // A thread that already returned cannot be signalled, and need not be.
            let _ = kick(t);
        }
        if self.control.wait_parked(timeout) {
            return Ok(());
        }
        let (parked, live) = (self.control.parked(), self.control.live());
        self.control.resume();
        Err(Error::PauseTimeout {
            parked,
            live,
            timeout,
        })
    }

    /// Lets paused vCPUs run again (nothing to do when not paused).
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Whether the vCPUs are paused ([`pause`](Self::pause) succeeded, no
    /// [`resume`](Self::resume) since).
    pub fn is_paused(&self) -> bool {
        self.control.is_pause_requested()
    }

    /// Reads every vCPU's state, in vCPU order, for a snapshot. Only while paused
    /// ([`pause`](Self::pause), or [`ParkedVcpus::run_paused`]); each vCPU reads its own on
    /// its thread, where it is parked, after completing a port or MMIO exit it was parked
    /// on (one `KVM_RUN` with `immediate_exit`, which runs no guest code). A vCPU that has
    /// returned (reset, power-off, error) has no state to give: an error.
    pub fn save_states(&self) -> Result<Vec<VcpuState>> {
        if !self.is_paused() {
            return Err(Error::NotPaused);
        }
        if let Some(index) = self.threads.iter().position(JoinHandle::is_finished) {
            return Err(Error::VcpuGone { index });
        }
        let count = self.threads.len();
        let slots: Arc<StateSlots> = Arc::new(Mutex::new((0..count).map(|_| None).collect()));
        let (into, msrs) = (slots.clone(), self.msrs.clone());
        let task: Arc<ParkedTask> = Arc::new(move |vcpu: &mut Vcpu| {
            let state = vcpu.save_state(&msrs);
            let mut slots = into.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = usize::try_from(vcpu.index())
                .ok()
                .and_then(|i| slots.get_mut(i))
            {
                *slot = Some(state);
            }
        });
        if !self.control.serve_parked(task, count, SAVE_TIMEOUT) {
            return Err(Error::SaveTimeout(SAVE_TIMEOUT));
        }
        let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *slots)
            .into_iter()
            .enumerate()
            .map(|(index, slot)| match slot {
                Some(Ok(state)) => Ok(state),
                Some(Err(source)) => Err(Error::SaveVcpu { index, source }),
                None => Err(Error::VcpuGone { index }),
            })
            .collect()
    }

    /// Stops every vCPU (a kick interrupts one inside `KVM_RUN`, paused ones are woken) and
    /// returns their exit counters, in vCPU order (`None` for a thread that panicked).
    pub fn stop(self) -> Vec<Option<VcpuStats>> {
        self.control.stop();
        for t in &self.threads {
            // A thread that already returned cannot be signalled; that is fine.
            let _ = kick(t);
        }
        self.threads.into_iter().map(|t| t.join().ok()).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    use super::*;

    /// `VcpuThreads` over plain threads that loop on the control as `Vcpu::run` does.
    fn plain_threads(
        n: usize,
        work: &Arc<AtomicU64>,
    ) -> (VcpuThreads, mpsc::Sender<()>, JoinHandle<VcpuStats>) {
        install_kick_handler().unwrap();
        let control = VcpuControl::new();
        let threads = (0..n)
            .map(|_| {
                let (control, work) = (control.clone(), work.clone());
                thread::spawn(move || {
                    let l = control.enter();
                    while l.checkpoint() {
                        work.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_micros(100));
                    }
                    VcpuStats::default()
                })
            })
            .collect::<Vec<_>>();
        // One more, busy in an "exit handler" until told, then returning (a power-off).
        let (tx, rx) = mpsc::channel();
        let c = control.clone();
        let busy = thread::spawn(move || {
            let _l = c.enter();
            let _ = rx.recv();
            VcpuStats::default()
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while control.live() < n + 1 {
            assert!(Instant::now() < deadline);
            thread::sleep(Duration::from_millis(1));
        }
        let threads = VcpuThreads {
            control,
            threads,
            counters: Vec::new(),
            msrs: Arc::from([]),
        };
        (threads, tx, busy)
    }

    fn wait_for_work(work: &AtomicU64, before: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while work.load(Ordering::SeqCst) <= before {
            assert!(Instant::now() < deadline, "{what}: no work");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_pause_that_times_out_is_withdrawn_and_an_exited_vcpu_does_not_count() {
        let work = Arc::new(AtomicU64::new(0));
        let (threads, release, busy) = plain_threads(2, &work);
        let e = threads.pause(Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::PauseTimeout {
                    parked: 2,
                    live: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!threads.is_paused(), "withdrawn");
        let before = work.load(Ordering::SeqCst);
        wait_for_work(&work, before, "running again");
        // The busy one returns: it no longer holds a pause up.
        release.send(()).unwrap();
        busy.join().unwrap();
        threads.pause(Duration::from_secs(10)).unwrap();
        assert!(threads.is_paused());
        let before = work.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(work.load(Ordering::SeqCst), before, "paused");
        threads.resume();
        assert!(!threads.is_paused());
        wait_for_work(&work, before, "resumed");
        threads.pause(Duration::from_secs(10)).unwrap();
        // Stop wakes them.
        let stats = threads.stop();
        assert_eq!(stats.len(), 2);
        assert!(stats.iter().all(Option::is_some));
    }

    #[test]
    fn every_vcpu_stop_maps_to_one_exit_reason() {
        assert_eq!(exit_reason(0, Ok(VcpuStop::Stopped)), None);
        assert_eq!(exit_reason(0, Ok(VcpuStop::Reset)), Some(ExitReason::Reset));
        assert_eq!(
            exit_reason(1, Ok(VcpuStop::PowerOff)),
            Some(ExitReason::PowerOff)
        );
        let crash = |s| matches!(exit_reason(1, s), Some(ExitReason::Crash(_)));
        assert!(crash(Ok(VcpuStop::Crash)));
        assert!(crash(Ok(VcpuStop::TripleFault)));
        assert!(crash(Err(vmkit_vcpu::Error::InternalError {
            vcpu: 1,
            suberror: 1,
            data: vec![],
        })));
        assert_eq!(
            exit_reason(3, Ok(VcpuStop::Halted)),
            Some(ExitReason::Failed("vCPU 3 halted".into()))
        );
        let e = vmkit_vcpu::Error::UnexpectedExit("Debug".into());
        let Some(ExitReason::Failed(why)) = exit_reason(2, Err(e)) else {
            panic!("a vCPU error is a failure");
        };
        assert!(why.starts_with("vCPU 2: "), "{why}");
    }
}
