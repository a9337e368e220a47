//! One VM, built from the command line in named stages and run to its end:
//!
//! ```text
//! inputs → machine (memory, irqchip, bus) → vCPUs → legacy devices → virtio devices
//!        → kernel command line → firmware tables and kernel → output files → run
//! ```
//!
//! The devices write their output to sinks that the last stage connects: the output files
//! are created (or truncated) only once everything else has passed.
//!
//! (KVM wants the irqchip before the first vCPU, so the machine comes first.)

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use vmkit_boot::linux_loader::cmdline::Cmdline;
use vmkit_boot::{BootConfig, EntryPoint, ProtocolChoice};
use vmkit_kvm::{ExitWatcher, Machine, MachineConfig, VcpuConfig, VcpuThreads, Vcpus};
use vmkit_legacy::ExitReason;
use vmkit_memory::layout::CMDLINE_MAX_SIZE;
use vmkit_memory::{Backing, MemoryConfig};
use vmkit_virtio::AtomicMetrics;

use crate::config::{Args, ConsoleOutput};
use crate::devices::{LegacyDevices, Subscriber, VirtioDevices};
use crate::error::{Error, Result};
use crate::host::Host;
use crate::metrics::MetricsSource;
use crate::net::InheritedFds;
use crate::output::Outputs;
use crate::runtime::{Parts, Running};
use crate::snapshot::{Loaded, Snapshots, Sources};
use crate::stats;
use crate::terminal::RawMode;

/// A VM, built and ready to run.
pub struct Vm {
    machine: Machine,
    vcpus: Vcpus,
    legacy: LegacyDevices,
    virtio: VirtioDevices,
    /// Where the guest's output goes, drained by the event loop.
    outputs: Outputs,
    stdin: Option<Subscriber>,
    /// stdin goes to the guest (COM1 or the virtio-console): a terminal there is made raw.
    stdin_to_guest: bool,
    print_stats: bool,
    /// `--landlock`: the paths the running VM may reach.
    landlock: Option<crate::landlock::Rules>,
    /// What a snapshot of it needs beyond its parts: its shape, its memory's layers.
    snapshots: Snapshots,
}

/// The files the command line names, opened before anything else is created.
struct Inputs {
    kernel: File,
    initramfs: Option<File>,
}

fn open(what: &'static str, path: &Path) -> Result<File> {
    File::open(path).map_err(|source| Error::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

impl Inputs {
    fn open(args: &Args) -> Result<Self> {
        Ok(Self {
            kernel: open("kernel", args.kernel.as_deref().ok_or(Error::NoKernel)?)?,
            initramfs: args
                .initramfs
                .as_deref()
                .map(|p| open("initramfs", p))
                .transpose()?,
        })
    }
}

fn host_ram() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

/// The VM's memory (mapped from a snapshot's files when `loaded`), irqchip and bus.
fn create_machine(args: &Args, loaded: Option<&Loaded>) -> Result<Machine> {
    let host = host_ram();
    if args.memory > host {
        return Err(Error::MemoryAboveHost {
            asked: args.memory,
            host,
        });
    }
    let backing = match (args.hugepages, args.no_thp) {
        (true, _) => Backing::HugePages,
        (false, true) => Backing::Anonymous,
        (false, false) => Backing::TransparentHugePages,
    };
    let mut config = MachineConfig::new(args.memory);
    // Out of core dumps (MemoryConfig's default): a VMM core holds no guest RAM.
    config.memory = MemoryConfig {
        backing,
        // A snapshot's base memory file, mapped privately: pages load on first touch.
        file: loaded
            .and_then(|l| l.layers.first())
            .map(|l| l.path.clone()),
        ..MemoryConfig::new(args.memory)
    };
    config.track_dirty_pages = args.track_dirty_pages;
    let machine = Machine::new(&config)?;
    if let Some(loaded) = loaded {
        crate::snapshot::memory::overlay_diffs(&machine, &loaded.layers).map_err(Error::Restore)?;
        if args.track_dirty_pages {
            // The overlay's writes are the snapshot's pages, not the guest's: a diff starts
            // from here.
            machine.take_dirty_pages()?;
        }
    }
    Ok(machine)
}

/// The kernel command line: the user's, what the CPU template needs, the virtio-mmio
/// devices (unless the guest finds them in the DSDT alone).
fn kernel_cmdline(args: &Args, vcpus: &Vcpus, virtio: &VirtioDevices) -> Result<Cmdline> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE)?;
    cmdline.insert_str(&args.cmdline)?;
    if let Some(clearcpuid) = vcpus.linux_clearcpuid() {
        cmdline.insert_str(clearcpuid)?;
    }
    if !args.no_mmio_cmdline {
        virtio.add_to_cmdline(&mut cmdline)?;
    }
    Ok(cmdline)
}

/// ACPI tables, an MP table (for kernels without ACPI) and the kernel; returns where the
/// boot vCPU starts.
fn load_kernel(
    machine: &Machine,
    args: &Args,
    inputs: Inputs,
    cmdline: &Cmdline,
    devices: Vec<vmkit_boot::DsdtDevice>,
) -> Result<EntryPoint> {
    let mem = machine.memory();
    let acpi = vmkit_boot::AcpiConfig {
        num_cpus: args.cpus,
        devices,
        // The power button, which a SIGTERM presses (LegacyDevices puts the device there).
        ged: Some(vmkit_boot::GedConfig::default()),
        ..Default::default()
    };
    let rsdp = vmkit_boot::create_acpi_tables(mem, &acpi)?;
    let mptable = vmkit_boot::MpTableConfig {
        num_cpus: args.cpus,
        ..Default::default()
    };
    vmkit_boot::create_mptable(mem, &mptable)?;
    let text = cmdline.as_cstring()?;
    let Inputs {
        mut kernel,
        mut initramfs,
    } = inputs;
    let boot = BootConfig {
        cmdline: &text.to_string_lossy(),
        initrd: initramfs.as_mut(),
        protocol: if args.no_pvh {
            ProtocolChoice::Linux64
        } else {
            ProtocolChoice::Auto
        },
        rsdp: Some(rsdp),
    };
    Ok(vmkit_boot::load(mem, &mut kernel, boot)?.entry)
}

/// The devices of a VM being built, with their output sinks.
struct Devices {
    outputs: Outputs,
    legacy: LegacyDevices,
    virtio: VirtioDevices,
}

/// The legacy and virtio devices `args` ask for, on `machine` (the serial port in
/// `serial`'s state, a snapshot's, when given).
fn add_devices(
    machine: &Machine,
    args: &Args,
    net_fds: InheritedFds,
    serial: Option<&vmkit_legacy::SerialState>,
) -> Result<Devices> {
    let mut outputs = Outputs::new(args.output_buffer);
    let legacy = LegacyDevices::add(machine, args, &mut outputs, serial)?;
    let virtio = VirtioDevices::add(machine, args, net_fds, &mut outputs)?;
    Ok(Devices {
        outputs,
        legacy,
        virtio,
    })
}

/// The vCPUs `args` ask for (after the irqchip).
fn create_vcpus(machine: &Machine, args: &Args) -> Result<Vcpus> {
    let vcpu_config = VcpuConfig {
        count: args.cpus,
        template: args.cpu_template,
    };
    Ok(Vcpus::create(machine.kvm(), machine.vm(), &vcpu_config)?)
}

impl Vm {
    /// Builds the VM `args` describes, stage by stage; nothing runs yet.
    pub fn build(args: &Args) -> Result<Self> {
        // First, before this process opens anything: the TAP fds it inherited.
        let net_fds = InheritedFds::claim(&args.net)?;
        let inputs = Inputs::open(args)?;
        let machine = create_machine(args, None)?;
        let vcpus = create_vcpus(&machine, args)?;
        let mut devices = add_devices(&machine, args, net_fds, None)?;
        let cmdline = kernel_cmdline(args, &vcpus, &devices.virtio)?;
        let dsdt = std::mem::take(&mut devices.virtio.dsdt);
        let entry = load_kernel(&machine, args, inputs, &cmdline, dsdt)?;
        vcpus.set_entry(machine.memory(), entry)?;
        let snapshots = Snapshots::new(args, Vec::new());
        Self::finish(args, machine, vcpus, devices, snapshots)
    }

    /// Builds the VM a snapshot describes (`args` from its [`VmSpec`](crate::snapshot::spec::VmSpec)
    /// and the restoring command line): the same machine and devices, memory mapped from
    /// the snapshot's files, then every piece's saved state put back; nothing runs yet.
    pub fn restore(args: &Args, loaded: Loaded, resume: bool) -> Result<Self> {
        let net_fds = InheritedFds::claim(&args.net)?;
        let machine = create_machine(args, Some(&loaded))?;
        let vcpus = create_vcpus(&machine, args)?;
        let state = &loaded.state;
        crate::snapshot::check_cpu(&vcpus, &loaded).map_err(Error::Restore)?;
        vcpus
            .restore_states(&state.vcpus)
            .map_err(|e| Error::Restore(format!("vCPUs: {e}")))?;
        // The LAPICs, then the PICs, IOAPIC, PIT and clock, before any device: restoring
        // the devices raises their pending interrupts, which must reach restored chips
        // (KVM_SET_IRQCHIP would drop them).
        machine
            .lock_irqchip()
            .restore_state(machine.vm(), &state.irqchip)
            .map_err(|e| Error::Restore(format!("irqchip: {e}")))?;
        let devices = add_devices(&machine, args, net_fds, Some(&state.serial))?;
        crate::snapshot::restore_devices(&devices.legacy, &devices.virtio, state)
            .map_err(Error::Restore)?;
        let mut snapshots = Snapshots::new(args, loaded.layers.clone());
        snapshots.start_paused = !resume;
        Self::finish(args, machine, vcpus, devices, snapshots)
    }

    /// The stages both ways end with: stdin's subscriber and, last, the output files, once
    /// nothing else can fail (a failed start leaves an existing log as it was).
    fn finish(
        args: &Args,
        machine: Machine,
        vcpus: Vcpus,
        devices: Devices,
        snapshots: Snapshots,
    ) -> Result<Self> {
        let Devices {
            outputs,
            legacy,
            virtio,
        } = devices;
        let stdin = legacy.stdin_subscriber(args, machine.exit().clone());
        outputs.open()?;
        Ok(Self {
            stdin_to_guest: stdin.is_some() || args.console == ConsoleOutput::Stdio,
            stdin,
            machine,
            vcpus,
            legacy,
            virtio,
            outputs,
            print_stats: args.stats,
            landlock: crate::landlock::Rules::of(args),
            snapshots,
        })
    }

    /// Runs the vCPUs, one thread each, and the event loop on this thread, until the VM
    /// ends; returns why. The host's API calls and signals are served meanwhile; the
    /// device counters join its metrics.
    pub fn run(
        mut self,
        host: &mut Host,
        machine: vmkit_api::model::MachineConfig,
    ) -> Result<ExitReason> {
        let mut events = EventManager::<Subscriber>::new()?;
        let exit = self.machine.exit().clone();
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(exit.clone()))));
        for (name, counters) in &self.virtio.metrics {
            host.metrics
                .add(name.clone(), device_metrics(counters.clone()));
        }
        for (name, counters) in self.outputs.metrics() {
            host.metrics.add(name, counters);
        }
        // The operator's keys go to the guest while it runs; restored on every way out.
        let _raw = self.stdin_to_guest.then(|| RawMode::enter(0)).flatten();
        let landlocked = crate::landlock::enforce(self.landlock.as_ref())?;
        let paused = self.snapshots.start_paused;
        let threads = enter_guest(self.vcpus, &self.machine, host, paused)?;
        if self.print_stats {
            stats::entering_guest();
        }
        for (i, counters) in threads.counters().iter().enumerate() {
            host.metrics
                .add(format!("vcpu{i}"), vcpu_metrics(counters.clone()));
        }
        let parts = Parts {
            events,
            guest_facing: self.virtio.subscribers.clone(),
            host_input: self
                .stdin
                .iter()
                .chain(&self.virtio.console_input)
                .cloned()
                .chain(self.outputs.drains())
                .collect(),
            devices: self.virtio.devices.clone(),
            threads,
            exit,
            i8042: self.legacy.i8042.clone(),
            ged: self.legacy.ged.clone(),
            drives: self.virtio.drives.clone(),
            nets: self.virtio.nets.clone(),
            machine,
            landlocked,
            sources: Sources::new(self.machine, &self.legacy, &mut self.virtio, self.snapshots),
        };
        let (end, threads, sources) = Running::new(parts, host, paused).until_end(host);
        let vcpu_stats = threads.stop();
        // The machine (memory, VM) outlives the vCPU threads.
        drop(sources);
        self.outputs.finish();
        if self.print_stats {
            stats::vcpus_stopped(&vcpu_stats, self.legacy.debug_port.stats().writes);
        }
        Ok(end)
    }
}

/// The last stage, everything open and built: the user drops, the vCPU threads start and
/// take their filter, this thread takes its own, the last, and only then are the vCPUs let
/// into the guest (if this thread's filter fails, they end without running it).
///
/// `paused` (a snapshot loaded with `resume_vm: false`): the vCPUs stay parked until a
/// resume.
fn enter_guest(vcpus: Vcpus, machine: &Machine, host: &Host, paused: bool) -> Result<VcpuThreads> {
    host.sandbox.drop_user()?;
    let prologue = host.sandbox.vcpu_prologue();
    let parked = vcpus.prepare_with(machine.bus().clone(), machine.exit().clone(), prologue)?;
    host.sandbox.enter_vmm()?;
    Ok(if paused {
        parked.run_paused()
    } else {
        parked.run()
    })
}

/// A vCPU's exits by kind as a metrics group.
fn vcpu_metrics(counters: Arc<vmkit_vcpu::VcpuCounters>) -> Arc<dyn MetricsSource> {
    Arc::new(move || {
        let s = counters.snapshot();
        serde_json::json!({
            "pio_exits": s.pio_exits, "mmio_exits": s.mmio_exits, "interrupted": s.interrupted,
        })
    })
}

/// A device's counters as a metrics group: `{"requests": n, ...}`.
fn device_metrics(counters: Arc<AtomicMetrics>) -> Arc<dyn MetricsSource> {
    Arc::new(move || {
        let snapshot = counters.snapshot();
        let map: serde_json::Map<String, serde_json::Value> = snapshot
            .iter()
            .map(|(name, value)| (name.to_string(), value.into()))
            .collect();
        serde_json::Value::Object(map)
    })
}
