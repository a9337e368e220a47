//! The vCPU run loop and how other threads stop it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

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
    /// The guest reset the machine (triple fault, or a KVM reset event).
    Reset,
    /// The guest asked for power-off through KVM (a system event).
    PowerOff,
    /// KVM reported a guest crash event.
    Crash,
    /// The vCPU halted with no in-kernel irqchip to wake it.
    Halted,
}

/// Per-vCPU exit counters, kept by the vCPU itself (no global state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// Port I/O exits (a string instruction counts once).
    pub pio_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// `KVM_RUN` calls that returned because of a signal (kicks included).
    pub interrupted: u64,
}

/// Shared stop flag of a set of vCPUs.
#[derive(Debug, Default)]
pub struct VcpuControl {
    stop: AtomicBool,
}

impl VcpuControl {
    /// A new control, not stopped.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Asks every vCPU using this control to stop. Combine with [`kick`] to interrupt one
    /// that is inside `KVM_RUN`.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
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
    stats: VcpuStats,
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
            stats: VcpuStats::default(),
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
        self.stats
    }

    /// Runs the guest until it stops, dispatching port and MMIO exits to `handler`.
    ///
    /// Returns when `control` is stopped (checked before each entry; a [`kick`] makes an
    /// entry return at once), or on a reset, power-off, crash or unhandled halt. KVM errors
    /// and internal errors are errors.
    pub fn run<H: VcpuExitHandler + ?Sized>(
        &mut self,
        handler: &H,
        control: &VcpuControl,
    ) -> Result<VcpuStop> {
        let immediate_exit = std::ptr::addr_of_mut!(self.fd.get_kvm_run().immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        let _guard = ImmediateExitGuard;
        loop {
            if control.is_stopped() {
                return Ok(VcpuStop::Stopped);
            }
            match self.fd.run() {
                Ok(VcpuExit::IoIn(..)) | Ok(VcpuExit::IoOut(..)) => {
                    self.stats.pio_exits += 1;
                    self.dispatch_io(handler);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.stats.mmio_exits += 1;
                    handler.mmio_read(addr, data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.stats.mmio_exits += 1;
                    handler.mmio_write(addr, data);
                }
                Ok(VcpuExit::Hlt) => return Ok(VcpuStop::Halted),
                Ok(VcpuExit::Shutdown) => return Ok(VcpuStop::Reset),
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
                    self.stats.interrupted += 1;
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
