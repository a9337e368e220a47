//! The vCPU run loop and how other threads stop it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_run, KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::{Error, Result};

/// What a vCPU's port and MMIO accesses go to. The VMM implements it over its buses.
///
/// Called on the vCPU's thread, concurrently from several vCPUs: implementations are `Sync`.
pub trait VcpuExitHandler: Sync {
    /// The guest reads `data.len()` bytes from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// The guest writes `data` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// The guest reads `data.len()` bytes at `addr`; fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// The guest writes `data` at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuStop {
    /// Another thread asked it to stop ([`VcpuControl::stop`]).
    Stopped,
    /// The guest reset the machine (a KVM reset event).
    Reset,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`): on a PC that resets the machine,
    /// and it is how a guest that lost control of its exception handlers ends.
    TripleFault,
    /// The guest asked for power-off through KVM (a system event).
    PowerOff,
    /// KVM reported a guest crash event.
    Crash,
    /// The vCPU halted with no in-kernel irqchip to wake it.
    Halted,
}

/// A vCPU's exit counters as it keeps them: relaxed atomics, readable from other threads
/// while it runs (for a VMM's metrics), one per vCPU (no global state).
#[derive(Debug, Default)]
pub struct VcpuCounters {
    pio_exits: AtomicU64,
    mmio_exits: AtomicU64,
    interrupted: AtomicU64,
}

impl VcpuCounters {
    /// The counters now.
    pub fn snapshot(&self) -> VcpuStats {
        VcpuStats {
            pio_exits: self.pio_exits.load(Ordering::Relaxed),
            mmio_exits: self.mmio_exits.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-vCPU exit counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Port I/O exits (a string instruction counts once).
    pub pio_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// `KVM_RUN` calls that returned because of a signal (kicks included).
    pub interrupted: u64,
}

/// `VcpuControl::flags` bits: what the run loop checks, with one atomic load, before each
/// `KVM_RUN`.
const STOP: u8 = 1;
const PAUSE: u8 = 2;

/// The pause state, under `VcpuControl::state`.
#[derive(Debug, Default)]
struct PauseState {
    /// A pause is requested (mirrored by the `PAUSE` flag).
    paused: bool,
    /// Loops inside [`VcpuControl::enter`] (between entry and exit of `Vcpu::run`).
    live: usize,
    /// Live loops parked at a checkpoint.
    parked: usize,
    /// The task parked loops serve now ([`VcpuControl::serve_parked`]), with its number.
    task: Option<(u64, PostedTask)>,
    /// Number of the last task posted.
    generation: u64,
    /// How many loops have served the current task.
    served: usize,
}

/// A posted [`ParkedTask`] (a newtype for `Debug`).
#[derive(Clone)]
struct PostedTask(Arc<ParkedTask>);

impl std::fmt::Debug for PostedTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostedTask")
    }
}

/// Work for parked vCPUs, run on each vCPU's own thread ([`VcpuControl::serve_parked`]):
/// reading its state, say, which KVM wants from the thread that runs the vCPU.
pub type ParkedTask = dyn Fn(&mut Vcpu) + Send + Sync;

/// Shared stop and pause state of a set of vCPUs.
///
/// * Stop: [`stop`](Self::stop), then [`kick`] every vCPU thread; each [`Vcpu::run`] returns
///   [`VcpuStop::Stopped`], parked ones included.
/// * Pause: [`request_pause`](Self::request_pause), [`kick`] every vCPU thread, then
///   [`wait_parked`](Self::wait_parked): each vCPU finishes the exit it is handling and parks
///   before its next `KVM_RUN` (on a condition variable, no busy waiting). When
///   `wait_parked` returns `true`, no vCPU runs guest code until [`resume`](Self::resume);
///   a vCPU that returns from `run` (reset, power-off, error) stops counting, so it never
///   holds a pause up.
///
/// The run loop pays one atomic load per `KVM_RUN`; the mutex is taken only to pause, stop,
/// and enter or leave [`Vcpu::run`].
#[derive(Debug, Default)]
pub struct VcpuControl {
    flags: AtomicU8,
    state: Mutex<PauseState>,
    /// Signalled on resume and stop: parked loops wait on it.
    resumed: Condvar,
    /// Signalled when a loop parks or leaves, and on resume and stop: controllers wait on it.
    changed: Condvar,
}

impl VcpuControl {
    /// A new control, not stopped, not paused.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, PauseState> {
        // The state is a few counters, each update complete under the lock: a panic elsewhere
        // while holding it leaves nothing half-done.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks every vCPU using this control to stop, and wakes the parked ones. Combine with
    /// [`kick`] to interrupt one that is inside `KVM_RUN`.
    pub fn stop(&self) {
        self.flags.fetch_or(STOP, Ordering::SeqCst);
        // Taking the lock orders this with a parker's check of the flag: either it sees STOP
        // before waiting, or it is waiting and gets this notification.
        let _state = self.lock();
        self.resumed.notify_all();
        self.changed.notify_all();
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & STOP != 0
    }

    /// Asks every vCPU using this control to park before its next `KVM_RUN`. Combine with
    /// [`kick`] to interrupt the ones inside `KVM_RUN`, then [`wait_parked`](Self::wait_parked).
    pub fn request_pause(&self) {
        let mut state = self.lock();
        state.paused = true;
        self.flags.fetch_or(PAUSE, Ordering::SeqCst);
    }

    /// Withdraws a pause: parked vCPUs go back into the guest.
    pub fn resume(&self) {
        let mut state = self.lock();
        state.paused = false;
        self.flags.fetch_and(!PAUSE, Ordering::SeqCst);
        self.resumed.notify_all();
        // A controller still in `wait_parked` gives up.
        self.changed.notify_all();
    }

    /// Whether a pause is requested (and not resumed).
    pub fn is_pause_requested(&self) -> bool {
        self.flags.load(Ordering::SeqCst) & PAUSE != 0
    }

    /// How many vCPUs are parked now.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// How many vCPU loops are inside [`Vcpu::run`] (or [`enter`](Self::enter)) now.
    pub fn live(&self) -> usize {
        self.lock().live
    }

    /// Waits until every live vCPU loop is parked, for at most `timeout`. `true` when they
    /// are (vacuously when none is live); `false` on timeout, or if no pause is requested
    /// any more (a concurrent [`resume`](Self::resume)).
    pub fn wait_parked(&self, timeout: Duration) -> bool {
        // A timeout past what an Instant holds waits as long as it takes.
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        loop {
            if !state.paused {
                return false;
            }
            if state.parked == state.live {
                return true;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Has every parked vCPU (and each one that parks while this waits) run `task` once on
    /// its own thread, while the pause holds. Returns `true` once `count` loops have run it,
    /// `false` if no pause is requested (or it is withdrawn, or a stop comes) or `timeout`
    /// passes first. Loops parked through [`ControlledLoop::checkpoint`] (no vCPU to give)
    /// do not serve.
    pub fn serve_parked(&self, task: Arc<ParkedTask>, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        if !state.paused {
            return false;
        }
        state.generation += 1;
        state.task = Some((state.generation, PostedTask(task)));
        state.served = 0;
        self.resumed.notify_all();
        let done = loop {
            if state.served >= count {
                break true;
            }
            if !state.paused || self.is_stopped() {
                break false;
            }
            let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
            if left.is_zero() {
                break false;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        state.task = None;
        done
    }

    /// Registers a vCPU loop: it counts as live, for [`wait_parked`](Self::wait_parked),
    /// until the returned [`ControlledLoop`] is dropped. [`Vcpu::run`] does this itself; a
    /// VMM with a run loop of its own calls it, then
    /// [`ControlledLoop::checkpoint`] before each `KVM_RUN`.
    pub fn enter(&self) -> ControlledLoop<'_> {
        self.lock().live += 1;
        ControlledLoop {
            control: self,
            served: Cell::new(0),
        }
    }

    /// The slow path of [`ControlledLoop::checkpoint`]: parks while a pause is requested,
    /// serving each posted task once through `serve` (if given); `served` is the number of
    /// the last task this loop served.
    #[cold]
    fn park(&self, served: &Cell<u64>, mut serve: Option<&mut dyn FnMut(&ParkedTask)>) -> bool {
        let mut state = self.lock();
        if state.paused && !self.is_stopped() {
            state.parked += 1;
            self.changed.notify_all();
            while state.paused && !self.is_stopped() {
                let posted = state.task.as_ref().map(|(n, t)| (*n, t.0.clone()));
                if let (Some(serve), Some((n, task))) = (serve.as_deref_mut(), posted) {
                    if n != served.get() {
                        served.set(n);
                        drop(state);
                        serve(&*task);
                        state = self.lock();
                        if state.task.as_ref().is_some_and(|(now, _)| *now == n) {
                            state.served += 1;
                            self.changed.notify_all();
                        }
                        continue;
                    }
                }
                state = self.resumed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.parked -= 1;
        }
        !self.is_stopped()
    }
}

/// A vCPU loop registered with a [`VcpuControl`] ([`VcpuControl::enter`]); it stops counting
/// as live when dropped.
#[derive(Debug)]
pub struct ControlledLoop<'a> {
    control: &'a VcpuControl,
    /// Number of the last parked task this loop served.
    served: Cell<u64>,
}

impl ControlledLoop<'_> {
    /// Call before each `KVM_RUN`: parks the thread while a pause is requested, and returns
    /// whether the loop may enter the guest (`false`: stop was asked for, return).
    #[inline]
    #[must_use = "false means the loop must stop"]
    pub fn checkpoint(&self) -> bool {
        if self.control.flags.load(Ordering::SeqCst) == 0 {
            return true;
        }
        self.control.park(&self.served, None)
    }

    /// [`checkpoint`](Self::checkpoint) for a loop that can serve parked tasks
    /// ([`VcpuControl::serve_parked`]): while parked, `serve` gets each posted task once.
    #[inline]
    #[must_use = "false means the loop must stop"]
    pub fn checkpoint_serving(&self, mut serve: impl FnMut(&ParkedTask)) -> bool {
        if self.control.flags.load(Ordering::SeqCst) == 0 {
            return true;
        }
        self.control.park(&self.served, Some(&mut serve))
    }
}

impl Drop for ControlledLoop<'_> {
    fn drop(&mut self) {
        let mut state = self.control.lock();
        state.live -= 1;
        self.control.changed.notify_all();
    }
}

thread_local! {
    // The `immediate_exit` byte of the `kvm_run` of the vCPU running on this thread, or null.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a const-initialised thread-local read and a byte store.
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is set by `Vcpu::run` on this very thread to the `immediate_exit`
        // byte of its `kvm_run` mapping, and reset to null before that borrow ends, so it is
        // valid whenever this handler can observe it.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the kick signal handler. Call once per process before starting vCPU threads
/// (idempotent).
pub fn install_kick_handler() -> Result<()> {
    register_signal_handler(kick_signal(), handle_kick).map_err(Error::Signal)
}

/// Interrupts the vCPU running on `thread`: if it is inside `KVM_RUN` the ioctl returns, and
/// if it is about to enter, `immediate_exit` makes it return at once. Set the stop flag first.
pub fn kick<T>(thread: &JoinHandle<T>) -> Result<()> {
    thread.kill(kick_signal()).map_err(Error::Signal)
}

/// A vCPU and its counters.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    counters: Arc<VcpuCounters>,
}

struct ImmediateExitGuard;

impl Drop for ImmediateExitGuard {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

impl Vcpu {
    /// Wraps a vCPU file descriptor.
    pub fn new(fd: VcpuFd, index: u32) -> Self {
        Self {
            fd,
            index,
            counters: Arc::default(),
        }
    }

    /// The KVM vCPU, for setup.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The index (= APIC ID) of this vCPU.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Exit counters so far.
    pub fn stats(&self) -> VcpuStats {
        self.counters.snapshot()
    }

    /// Reads this vCPU's state ([`save_state`](crate::save_state)) after completing a
    /// handled port or MMIO exit ([`complete_pending_io`](crate::complete_pending_io)). Call
    /// on the vCPU's thread while it is not in `KVM_RUN` (a [`ParkedTask`] does).
    pub fn save_state(&mut self, msrs: &[u32]) -> Result<crate::VcpuState> {
        crate::complete_pending_io(&mut self.fd)?;
        crate::save_state(&self.fd, msrs)
    }

    /// The live counters, to read from another thread while the vCPU runs.
    pub fn counters(&self) -> Arc<VcpuCounters> {
        self.counters.clone()
    }

    /// Runs the guest until it stops, dispatching port and MMIO exits to `handler`.
    ///
    /// Returns when `control` is stopped (checked before each entry; a [`kick`] makes an
    /// entry return at once), or on a reset, power-off, crash or unhandled halt. KVM errors
    /// and internal errors are errors. While `control` asks for a pause, the thread parks
    /// before its next entry (after handling the exit that brought it out), until resumed or
    /// stopped.
    pub fn run<H: VcpuExitHandler + ?Sized>(
        &mut self,
        handler: &H,
        control: &VcpuControl,
    ) -> Result<VcpuStop> {
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let _guard = ImmediateExitGuard;
        let control = control.enter();
        loop {
            // Between two `KVM_RUN`s, the exit before fully handled: a pause parks here, and
            // parked tasks get this vCPU.
            if !control.checkpoint_serving(|task| task(self)) {
                return Ok(VcpuStop::Stopped);
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => {
                    VcpuCounters::bump(&self.counters.pio_exits);
                    self.dispatch_io(handler);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    VcpuCounters::bump(&self.counters.mmio_exits);
                    handler.mmio_read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    VcpuCounters::bump(&self.counters.mmio_exits);
                    handler.mmio_write(addr, data);
                }
                Ok(VcpuExit::Hlt) => return Ok(VcpuStop::Halted),
                Ok(VcpuExit::Shutdown) => return Ok(VcpuStop::TripleFault),
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => Ok(VcpuStop::PowerOff),
                        KVM_SYSTEM_EVENT_RESET => Ok(VcpuStop::Reset),
                        KVM_SYSTEM_EVENT_CRASH => Ok(VcpuStop::Crash),
                        other => Err(Error::UnexpectedExit(format!("system event {other}"))),
                    }
                }
                Ok(VcpuExit::InternalError) => {
                    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the kernel filled
                    // the `internal` member of the union.
                    let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    return Err(Error::InternalError {
                        vcpu: self.index,
                        suberror: internal.suberror,
                        data: internal.data[..n].to_vec(),
                    });
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Err(Error::FailEntry {
                        vcpu: self.index,
                        reason,
                        cpu,
                    })
                }
                Ok(VcpuExit::IrqWindowOpen) | Ok(VcpuExit::Intr) => {}
                Ok(other) => return Err(Error::UnexpectedExit(format!("{other:?}"))),
                Err(e) if e.errno() == libc::EINTR => {
                    VcpuCounters::bump(&self.counters.interrupted);
                    self.fd.set_kvm_immediate_exit(0);
                }
                // A vCPU waiting for INIT/SIPI returns EAGAIN after each wake-up.
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(Error::Run(e)),
            }
        }
    }

    /// Dispatches a KVM_EXIT_IO, one element at a time for string instructions.
    fn dispatch_io<H: VcpuExitHandler + ?Sized>(&mut self, handler: &H) {
        let run: &mut kvm_run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_IO {
            return;
        }
        // SAFETY: the exit reason is KVM_EXIT_IO, so the kernel filled the `io` member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size);
        let len = size * io.count as usize;
        let base = (run as *mut kvm_run).cast::<u8>();
        // SAFETY: the kernel places `count * size` bytes of port data at `data_offset` inside
        // the kvm_run mapping (it is part of the mmap'd area, as kvm-ioctls also relies on),
        // and nothing else aliases that area while this exit is handled.
        let data =
            unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
        if size == 0 {
            return;
        }
        if u32::from(io.direction) == KVM_EXIT_IO_IN {
            for chunk in data.chunks_exact_mut(size) {
                handler.pio_read(io.port, chunk);
            }
        } else {
            for chunk in data.chunks_exact(size) {
                handler.pio_write(io.port, chunk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::thread;

    use super::*;

    const LONG: Duration = Duration::from_secs(10);

    /// A stand-in for `Vcpu::run` on a plain thread: counts "guest entries" in `work` until
    /// stopped, then returns how it ended.
    fn spawn_loop(control: &Arc<VcpuControl>, work: &Arc<AtomicU64>) -> JoinHandle<VcpuStop> {
        let (control, work) = (control.clone(), work.clone());
        thread::spawn(move || {
            let l = control.enter();
            while l.checkpoint() {
                work.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_micros(100));
            }
            VcpuStop::Stopped
        })
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + LONG;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn an_endless_timeout_does_not_overflow() {
        let control = VcpuControl::new();
        control.request_pause();
        // No live loop: parked at once, whatever the timeout.
        assert!(control.wait_parked(Duration::MAX));
    }

    #[test]
    fn pause_waits_for_every_live_loop_and_resume_releases_them() {
        let control = VcpuControl::new();
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4).map(|_| spawn_loop(&control, &work)).collect();
        wait_until("4 live loops", || control.live() == 4);
        control.request_pause();
        assert!(control.is_pause_requested());
        assert!(control.wait_parked(LONG));
        assert_eq!(control.parked(), 4);
        // Parked means no work until resumed.
        let before = work.load(Ordering::SeqCst);
        thread::sleep(Duration::from_millis(50));
        assert_eq!(work.load(Ordering::SeqCst), before);
        control.resume();
        assert!(!control.is_pause_requested());
        wait_until("every loop unparked", || control.parked() == 0);
        wait_until("work again", || work.load(Ordering::SeqCst) > before + 8);
        control.stop();
        for t in threads {
            assert_eq!(t.join().unwrap(), VcpuStop::Stopped);
        }
        assert_eq!(control.live(), 0);
    }

    #[test]
    fn wait_parked_times_out_while_a_loop_is_away() {
        let control = VcpuControl::new();
        // A loop registered but not at a checkpoint (as a vCPU inside a long exit handler).
        let away = control.enter();
        control.request_pause();
        let t0 = Instant::now();
        assert!(!control.wait_parked(Duration::from_millis(50)));
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // It leaves: the pause completes at once, with nothing live.
        drop(away);
        assert!(control.wait_parked(Duration::ZERO));
        assert!(control.wait_parked(LONG));
    }

    #[test]
    fn a_loop_that_exits_while_others_are_paused_does_not_hold_the_pause() {
        let control = VcpuControl::new();
        let work = Arc::new(AtomicU64::new(0));
        let parkers: Vec<_> = (0..2).map(|_| spawn_loop(&control, &work)).collect();
        // A third loop that is busy (not checking in) and then returns, as a vCPU whose guest
        // powers off.
        let (c, go) = (control.clone(), Arc::new(Mutex::new(())));
        let hold = go.lock().unwrap();
        let g = go.clone();
        let exiting = thread::spawn(move || {
            let _l = c.enter();
            drop(g.lock().unwrap());
            VcpuStop::PowerOff
        });
        wait_until("3 live loops", || control.live() == 3);
        control.request_pause();
        let c = control.clone();
        let waiter = thread::spawn(move || c.wait_parked(LONG));
        wait_until("2 parked", || control.parked() == 2);
        thread::sleep(Duration::from_millis(20));
        assert!(
            !waiter.is_finished(),
            "the busy loop is neither parked nor gone"
        );
        drop(hold);
        assert_eq!(exiting.join().unwrap(), VcpuStop::PowerOff);
        assert!(waiter.join().unwrap(), "pause completes once it returned");
        assert_eq!((control.live(), control.parked()), (2, 2));
        control.stop();
        for t in parkers {
            assert_eq!(t.join().unwrap(), VcpuStop::Stopped);
        }
    }

    #[test]
    fn stop_wakes_parked_loops_and_they_stop() {
        let control = VcpuControl::new();
        let work = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3).map(|_| spawn_loop(&control, &work)).collect();
        wait_until("3 live loops", || control.live() == 3);
        control.request_pause();
        assert!(control.wait_parked(LONG));
        let before = work.load(Ordering::SeqCst);
        control.stop();
        for t in threads {
            assert_eq!(t.join().unwrap(), VcpuStop::Stopped);
        }
        assert_eq!(
            work.load(Ordering::SeqCst),
            before,
            "no work after the stop"
        );
        assert_eq!((control.live(), control.parked()), (0, 0));
    }

    #[test]
    fn a_loop_entering_during_a_pause_parks_before_its_first_entry() {
        let control = VcpuControl::new();
        control.request_pause();
        assert!(control.wait_parked(Duration::ZERO), "nothing live: paused");
        let work = Arc::new(AtomicU64::new(0));
        let t = spawn_loop(&control, &work);
        wait_until("the late loop parked", || control.parked() == 1);
        assert_eq!(work.load(Ordering::SeqCst), 0);
        control.resume();
        wait_until("work", || work.load(Ordering::SeqCst) > 0);
        control.stop();
        assert_eq!(t.join().unwrap(), VcpuStop::Stopped);
    }

    #[test]
    fn a_resume_makes_a_pending_wait_fail_and_checkpoints_are_free_when_idle() {
        let control = VcpuControl::new();
        let l = control.enter();
        assert!(l.checkpoint());
        control.request_pause();
        let c = control.clone();
        let waiter = thread::spawn(move || c.wait_parked(LONG));
        thread::sleep(Duration::from_millis(20));
        control.resume();
        assert!(!waiter.join().unwrap(), "resumed before every loop parked");
        assert!(l.checkpoint(), "not paused any more: no parking");
        control.stop();
        assert!(!l.checkpoint());
    }

    /// A loop that serves parked tasks by counting them in `served` (no vCPU to hand over).
    fn spawn_serving(control: &Arc<VcpuControl>, served: &Arc<AtomicU64>) -> JoinHandle<()> {
        let (control, served) = (control.clone(), served.clone());
        thread::spawn(move || {
            let l = control.enter();
            while l.checkpoint_serving(|_task| {
                served.fetch_add(1, Ordering::SeqCst);
            }) {
                thread::sleep(Duration::from_micros(100));
            }
        })
    }

    fn noop_task() -> Arc<ParkedTask> {
        Arc::new(|_: &mut Vcpu| {})
    }

    #[test]
    fn parked_loops_serve_each_task_once_and_only_while_paused() {
        let control = VcpuControl::new();
        let served = Arc::new(AtomicU64::new(0));
        assert!(
            !control.serve_parked(noop_task(), 0, LONG),
            "not paused: nothing is served"
        );
        let loops: Vec<_> = (0..3).map(|_| spawn_serving(&control, &served)).collect();
        control.request_pause();
        assert!(control.wait_parked(LONG));
        assert!(control.serve_parked(noop_task(), 3, LONG));
        assert_eq!(served.load(Ordering::SeqCst), 3);
        // A second task is served again, once per loop.
        assert!(control.serve_parked(noop_task(), 3, LONG));
        assert_eq!(served.load(Ordering::SeqCst), 6);
        // More servers than there are loops: times out, and the task is withdrawn.
        assert!(!control.serve_parked(noop_task(), 4, Duration::from_millis(50)));
        assert_eq!(served.load(Ordering::SeqCst), 9);
        control.stop();
        for l in loops {
            l.join().unwrap();
        }
    }

    #[test]
    fn a_loop_that_parks_late_serves_the_posted_task_and_plain_checkpoints_never_do() {
        let control = VcpuControl::new();
        let served = Arc::new(AtomicU64::new(0));
        let work = Arc::new(AtomicU64::new(0));
        control.request_pause();
        // Only a plain loop: it parks but cannot serve.
        let plain = spawn_loop(&control, &work);
        assert!(control.wait_parked(LONG));
        assert!(!control.serve_parked(noop_task(), 1, Duration::from_millis(50)));
        let c = control.clone();
        let serving = thread::spawn(move || c.serve_parked(noop_task(), 1, LONG));
        thread::sleep(Duration::from_millis(20));
        // A serving loop entering during the pause parks and serves the task waiting.
        let late = spawn_serving(&control, &served);
        assert!(serving.join().unwrap());
        assert_eq!(served.load(Ordering::SeqCst), 1);
        assert_eq!(work.load(Ordering::SeqCst), 0, "paused all along");
        control.stop();
        assert_eq!(plain.join().unwrap(), VcpuStop::Stopped);
        late.join().unwrap();
    }
}
