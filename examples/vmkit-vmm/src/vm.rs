//! Building and running one VM, top to bottom:
//! config → memory → irqchip → vCPUs → buses → devices (legacy, then virtio) → kernel and
//! ACPI → run.
//!
//! (KVM wants the irqchip before the first vCPU, so it comes first of the two.)

use crate::clock::monotonic_ns;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmkit_boot::{BootConfig, EntryPoint, ProtocolChoice};
use vmkit_bus::{pio_range, IoBus};
use vmkit_irq::{InterruptLine, Irqchip, IrqchipConfig};
use vmkit_legacy::{
    AcpiSleep, AcpiSleepConfig, DebugPort, ExitNotifier, Serial, SerialConfig, ACPI_SLEEP_PORT,
    ACPI_SLEEP_PORT_COUNT, COM1_GSI, COM1_PORT, DEBUG_PORT, DEBUG_PORT_COUNT, I8042, I8042_PORT,
    I8042_PORT_COUNT, SERIAL_PORT_COUNT,
};
use vmkit_memory::{create_guest_memory, register_memory_slots, Backing, MemoryConfig};
use vmkit_vcpu::{
    install_kick_handler, kick, restrict_cr4, setup_entry, setup_fpu, setup_lint, setup_msrs,
    CpuTemplate, CpuidConfig, CpuidTemplate, EntryState, Vcpu, VcpuControl, VcpuExitHandler,
    VcpuStop,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{Args, ConsoleOutput, DiskEngine, DiskSpec, SerialOutput, Transport};
use crate::event_loop::{ExitWatcher, InputToConsole, StdinToSerial};
use crate::exit::{VmEnd, VmExit};
use crate::pci::VirtioPci;
use crate::virtio::VirtioMmio;
use std::os::fd::AsFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmkit_virtio::VirtioDevice;
use vmkit_virtio_blk::{Block, BlockConfig, EngineKind};
use vmkit_virtio_console::{Console, ConsoleConfig, Pty};
use vmkit_virtio_rng::{Rng, RngConfig};

/// The highest vCPU count: APIC IDs are one byte in the xAPIC MADT entries we write.
const MAX_CPUS: u32 = 254;

/// The serial port as the VMM holds it: output to stdout, a file, or nowhere.
pub type GuestSerial = Serial<Box<dyn Write + Send>>;

/// What can go wrong before the guest runs. Each variant is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualization)")]
    NoKvm,
    #[error("cannot open /dev/kvm: {0} (the user needs read-write access, e.g. membership of group kvm)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("cannot create a VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("--cpus {0}: at least 1 vCPU is needed")]
    NoCpus(u32),
    #[error("--cpus {asked}: this host's KVM allows at most {max}")]
    TooManyCpus { asked: u32, max: u32 },
    #[error("--memory {asked} bytes is more than this host's {host} bytes of RAM")]
    MemoryAboveHost { asked: u64, host: u64 },
    #[error("--memory: {0}")]
    Memory(#[from] vmkit_memory::Error),
    #[error("{0}")]
    Irq(#[from] vmkit_irq::Error),
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up vCPU {index}: {source}")]
    SetupVcpu {
        index: u32,
        source: vmkit_vcpu::Error,
    },
    #[error("{0}")]
    Vcpu(#[from] vmkit_vcpu::Error),
    #[error("cannot read the MSR list: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("{0}")]
    Bus(#[from] vmkit_bus::Error),
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Boot(#[from] vmkit_boot::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("{0}")]
    Virtio(#[from] vmkit_virtio::Error),
    #[error("PCI: {0}")]
    Pci(#[from] vmkit_pci::Error),
    #[error("virtio-console: {0}")]
    Console(#[source] std::io::Error),
    #[error("virtio-console: {0}")]
    ConsoleConfig(#[from] vmkit_virtio_console::Error),
    #[error("--disk {path}: {source}")]
    Disk {
        path: String,
        source: vmkit_virtio_blk::Error,
    },
    #[error("virtio-rng: {0}")]
    Rng(#[from] vmkit_virtio_rng::Error),
    #[error("cannot register an ioeventfd at {addr:#x}: {source}")]
    IoEvent {
        addr: u64,
        source: kvm_ioctls::Error,
    },
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn open(what: &'static str, path: &Path) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// The buses as the vCPUs see them.
struct Buses(IoBus);

impl VcpuExitHandler for Buses {
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

fn open_kvm() -> Result<Kvm, Error> {
    if !Path::new("/dev/kvm").exists() {
        return Err(Error::NoKvm);
    }
    Kvm::new().map_err(Error::KvmOpen)
}

fn host_ram() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

fn cpu_time_us() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the rusage we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// How much of guest RAM is resident in this process (from /proc/self/smaps), so that the
/// footprint benchmark can tell the VMM's own memory from the guest's.
fn guest_resident_kib(mem: &GuestMemoryMmap) -> Option<u64> {
    let starts: Vec<u64> = mem.iter().map(|r| r.get_mmap().as_ptr() as u64).collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((start, _)) = range.split_once('-') {
                if let Ok(start) = u64::from_str_radix(start, 16) {
                    in_guest = starts.contains(&start);
                    continue;
                }
            }
        }
        if in_guest {
            if let Some(kb) = line.strip_prefix("Rss:") {
                total += kb
                    .trim()
                    .trim_end_matches(" kB")
                    .trim()
                    .parse::<u64>()
                    .ok()?;
            }
        }
    }
    Some(total)
}

fn check_cpus(kvm: &Kvm, cpus: u32) -> Result<(), Error> {
    if cpus == 0 {
        return Err(Error::NoCpus(cpus));
    }
    let max = (kvm.get_max_vcpus() as u32).min(MAX_CPUS);
    if cpus > max {
        return Err(Error::TooManyCpus { asked: cpus, max });
    }
    Ok(())
}

/// Creates and sets up every vCPU; only the boot vCPU gets an entry state, later. Also returns
/// Linux's `clearcpuid=` for features the template hides but this host's KVM still shows
/// (read back with KVM_GET_CPUID2: kvm_pvm passes host bits outside its supported set through).
fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    cpus: u32,
    cpu_template: CpuTemplate,
) -> Result<(Vec<Vcpu>, Option<String>), Error> {
    let template = CpuidTemplate::from_kvm(kvm)?;
    let cpuid_cfg = CpuidConfig {
        num_cpus: cpus,
        masks: cpu_template.masks(),
    };
    let msr_list = kvm.get_msr_index_list().map_err(Error::MsrList)?;
    let vcpus = (0..cpus)
        .map(|index| {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(|source| Error::CreateVcpu { index, source })?;
            let setup = |fd: &kvm_ioctls::VcpuFd| -> Result<(), vmkit_vcpu::Error> {
                let cpuid = template.for_vcpu(index, &cpuid_cfg)?;
                fd.set_cpuid2(&cpuid)
                    .map_err(vmkit_vcpu::Error::VcpuCpuid)?;
                setup_msrs(fd, msr_list.as_slice())?;
                setup_fpu(fd)?;
                setup_lint(fd)
            };
            setup(&fd).map_err(|source| Error::SetupVcpu { index, source })?;
            Ok(Vcpu::new(fd, index))
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut clearcpuid = None;
    if cpu_template != CpuTemplate::Host {
        let effective = vcpus[0]
            .fd()
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::SetupVcpu {
                index: 0,
                source: vmkit_vcpu::Error::VcpuCpuid(e),
            })?;
        clearcpuid = cpu_template.linux_clearcpuid(effective.as_slice());
        if clearcpuid.is_some() {
            eprintln!(
                "vmkit: this host's KVM does not hide {} from CPUID; the kernel is told with clearcpuid=",
                cpu_template.still_visible(effective.as_slice()).join(",")
            );
        }
    }
    Ok((vcpus, clearcpuid))
}

/// Opens a `--disk` as a virtio-blk device: one request queue per vCPU unless told otherwise.
fn open_disk(spec: &DiskSpec, cpus: u32) -> Result<Block, Error> {
    let mut config = BlockConfig::new(spec.path.clone());
    config.read_only = spec.readonly;
    config.direct = spec.direct;
    config.engine = match spec.engine {
        DiskEngine::Sync => EngineKind::Sync,
        DiskEngine::IoUring => EngineKind::IoUring,
    };
    config.serial = spec.serial.clone().unwrap_or_default();
    config.poll_us = spec.poll_us;
    // `--cpus` is checked against KVM's limit (at most 254) before devices are made.
    config.queues = spec.queues.unwrap_or(cpus.clamp(1, 64) as u16);
    Block::new(config).map_err(|source| Error::Disk {
        path: spec.path.display().to_string(),
        source,
    })
}

/// The console's output sink, the file its input comes from (if any), and the pty behind
/// both (if any), which must live as long as the VM: it keeps the slave side open so the
/// master never reports a hang-up while nobody is attached.
type ConsoleEnds = (Box<dyn Write + Send>, Option<File>, Option<Pty>);

fn console_sink(spec: &ConsoleOutput) -> Result<Option<ConsoleEnds>, Error> {
    Ok(match spec {
        ConsoleOutput::Off => None,
        ConsoleOutput::Stdio => {
            // A duplicate of fd 0, so the event loop owns what it polls.
            let stdin = std::io::stdin()
                .as_fd()
                .try_clone_to_owned()
                .map(File::from)
                .map_err(Error::Console)?;
            Some((Box::new(std::io::stdout()), Some(stdin), None))
        }
        ConsoleOutput::File(p) => {
            let f = File::create(p).map_err(|source| Error::Open {
                what: "console output file",
                path: p.display().to_string(),
                source,
            })?;
            Some((Box::new(f), None, None))
        }
        ConsoleOutput::Pty => {
            let pty = Pty::open().map_err(Error::Console)?;
            eprintln!("vmkit: virtio-console on {}", pty.path().display());
            let out = pty.output().map_err(Error::Console)?;
            let input = pty.master().try_clone().map_err(Error::Console)?;
            Some((Box::new(out), Some(input), Some(pty)))
        }
    })
}

fn serial_output(spec: &SerialOutput) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match spec {
        SerialOutput::Stdio => Box::new(std::io::stdout()),
        SerialOutput::Off => Box::new(std::io::sink()),
        SerialOutput::File(p) => Box::new(File::create(p).map_err(|source| Error::Open {
            what: "serial output file",
            path: p.display().to_string(),
            source,
        })?),
    })
}

/// Boots the VM described by `args` and runs it to its end.
pub fn run(args: &Args) -> Result<VmEnd, Error> {
    // Inputs first: a missing file is reported before anything is created.
    let mut kernel = open("kernel", &args.kernel)?;
    let mut initrd = args
        .initramfs
        .as_deref()
        .map(|p| open("initramfs", p))
        .transpose()?;

    // KVM and guest memory.
    let kvm = open_kvm()?;
    check_cpus(&kvm, args.cpus)?;
    let host = host_ram();
    if args.memory > host {
        return Err(Error::MemoryAboveHost {
            asked: args.memory,
            host,
        });
    }
    let vm = Arc::new(kvm.create_vm().map_err(Error::CreateVm)?);
    let mem: GuestMemoryMmap = create_guest_memory(&MemoryConfig {
        size: args.memory,
        backing: if args.hugepages {
            Backing::HugePages
        } else {
            Backing::Anonymous
        },
    })?;
    let _slots = register_memory_slots(&vm, &mem)?;

    // Interrupt controller, then vCPUs.
    let irqchip = Arc::new(Mutex::new(Irqchip::new(&vm, IrqchipConfig::default())?));
    let (mut vcpus, clearcpuid) = create_vcpus(&kvm, &vm, args.cpus, args.cpu_template)?;

    // Buses and devices.
    let exit = Arc::new(VmExit::new().map_err(Error::EventFd)?);
    let notifier: Arc<dyn ExitNotifier> = exit.clone();
    let mut bus = IoBus::new();
    let com1_irq: Arc<dyn InterruptLine> = Arc::new(lock(&irqchip).line(&vm, COM1_GSI)?);
    // With stdio, the UART tells the stdin forwarder when the guest has drained its FIFO.
    let input_drained = match args.serial {
        SerialOutput::Stdio => Some(EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd)?),
        _ => None,
    };
    let serial = Arc::new(Mutex::new(GuestSerial::with_config(SerialConfig {
        interrupt: com1_irq,
        out: serial_output(&args.serial)?,
        input_drained: input_drained
            .as_ref()
            .map(EventFd::try_clone)
            .transpose()
            .map_err(Error::EventFd)?,
    })));
    bus.register_pio(pio_range(COM1_PORT, SERIAL_PORT_COUNT)?, serial.clone())?;
    bus.register_pio(
        pio_range(I8042_PORT, I8042_PORT_COUNT)?,
        Arc::new(Mutex::new(I8042::new(notifier.clone()))),
    )?;
    bus.register_pio(
        pio_range(ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT)?,
        Arc::new(Mutex::new(AcpiSleep::new(
            notifier,
            AcpiSleepConfig::default(),
        ))),
    )?;
    let debug_port = Arc::new(DebugPort::new());
    bus.register_pio(pio_range(DEBUG_PORT, DEBUG_PORT_COUNT)?, debug_port.clone())?;
    bus.register_mmio(
        vmkit_bus::mmio_range(crate::virtio::DEBUG_MMIO, 0x1000)?,
        debug_port.clone(),
    )?;
    // Virtio devices, then their transport.
    let mut devices: Vec<Arc<Mutex<dyn VirtioDevice>>> = Vec::new();
    for disk in &args.disk {
        devices.push(Arc::new(Mutex::new(open_disk(disk, args.cpus)?)));
    }
    if args.rng {
        devices.push(Arc::new(Mutex::new(Rng::new(RngConfig::default())?)));
    }
    let mut _console_pty = None;
    let console_input = match console_sink(&args.console)? {
        Some((sink, source, pty)) => {
            _console_pty = pty;
            let console = Console::new(ConsoleConfig::new(sink))?;
            let input = console.input();
            devices.push(Arc::new(Mutex::new(console)));
            source.map(|s| (s, input))
        }
        None => None,
    };
    let (virtio_handlers, dsdt_devices, virtio_cmdline) = match args.transport {
        Transport::Mmio => {
            let mut mmio = VirtioMmio::new()?;
            for device in devices {
                mmio.add(&vm, &lock(&irqchip), &mem, &mut bus, device)?;
            }
            (
                mmio.handlers.split_off(0),
                mmio.dsdt_devices(),
                if args.no_mmio_cmdline {
                    String::new()
                } else {
                    mmio.cmdline()
                },
            )
        }
        Transport::Pci => {
            // BARs may cover neither RAM nor another device's window.
            let mut forbidden: Vec<_> = mem
                .iter()
                .map(|r| r.start_addr().0..=r.last_addr().0)
                .collect();
            forbidden.push(crate::virtio::MMIO_WINDOW.start..=crate::virtio::MMIO_WINDOW.end - 1);
            forbidden.push(0xFEC0_0000..=0xFFFF_FFFF);
            let mut pci = VirtioPci::new(vm.clone(), irqchip.clone(), &mut bus, forbidden)?;
            for device in devices {
                pci.add(&mem, device)?;
            }
            let host_bridge = pci.dsdt_device();
            (pci.handlers, vec![host_bridge], String::new())
        }
    };

    // Kernel, boot parameters and ACPI tables.
    let acpi = vmkit_boot::AcpiConfig {
        num_cpus: args.cpus,
        devices: dsdt_devices,
        ..Default::default()
    };
    let mut cmdline = args.cmdline.clone();
    for extra in [clearcpuid.unwrap_or_default(), virtio_cmdline] {
        if !extra.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&extra);
        }
    }
    let rsdp = vmkit_boot::create_acpi_tables(&mem, &acpi)?;
    // The same machine for kernels without ACPI: CPUs, IOAPIC, ISA wiring.
    vmkit_boot::create_mptable(
        &mem,
        &vmkit_boot::MpTableConfig {
            num_cpus: args.cpus,
            ..Default::default()
        },
    )?;
    let loaded = vmkit_boot::load(
        &mem,
        &mut kernel,
        BootConfig {
            cmdline: &cmdline,
            initrd: initrd.as_mut(),
            protocol: if args.no_pvh {
                ProtocolChoice::Linux64
            } else {
                ProtocolChoice::Auto
            },
            rsdp: Some(rsdp),
        },
    )?;
    let entry = match loaded.entry {
        EntryPoint::Linux64 { entry, boot_params } => EntryState::Linux64 { entry, boot_params },
        EntryPoint::Pvh { entry, start_info } => EntryState::Pvh { entry, start_info },
    };
    setup_entry(vcpus[0].fd(), &mem, entry)?;
    restrict_cr4(vcpus[0].fd(), args.cpu_template)?;

    // Run: one thread per vCPU, this thread runs the event loop.
    install_kick_handler()?;
    if args.stats {
        // For the start-up benchmark: when setup ended (CLOCK_MONOTONIC, comparable with the
        // parent's clock) and how much CPU the VMM used until then.
        eprintln!(
            "vmkit: entering guest at monotonic_ns={} cpu_us={}",
            monotonic_ns(),
            cpu_time_us()
        );
    }
    let buses = Arc::new(Buses(bus));
    let control = VcpuControl::new();
    let mut threads = Vec::with_capacity(vcpus.len());
    for mut vcpu in vcpus.drain(..) {
        let (buses, control, exit) = (buses.clone(), control.clone(), exit.clone());
        let t = thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                match vcpu.run(&*buses, &control) {
                    Ok(VcpuStop::Stopped) => {}
                    Ok(VcpuStop::Reset) => exit.end(VmEnd::Reset),
                    Ok(VcpuStop::PowerOff) => exit.end(VmEnd::PowerOff),
                    Ok(VcpuStop::Crash) => exit.end(VmEnd::Failed("the guest crashed".into())),
                    Ok(VcpuStop::Halted) => {
                        exit.end(VmEnd::Failed(format!("vCPU {} halted", vcpu.index())))
                    }
                    Err(e) => exit.end(VmEnd::Failed(e.to_string())),
                }
                vcpu.stats()
            })
            .map_err(Error::Thread)?;
        threads.push(t);
    }

    let mut events = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
    for handler in virtio_handlers {
        events.add_subscriber(Arc::new(Mutex::new(handler)));
    }
    if let Some((source, input)) = console_input {
        events.add_subscriber(Arc::new(Mutex::new(InputToConsole::new(source, input))));
    }
    // stdin feeds the serial port unless the console has it.
    if let Some(drained) = input_drained.filter(|_| args.console != ConsoleOutput::Stdio) {
        events.add_subscriber(Arc::new(Mutex::new(StdinToSerial::new(
            serial.clone(),
            drained,
        ))));
    }
    let end = loop {
        if let Some(end) = exit.reason() {
            break end;
        }
        if let Err(e) = events.run() {
            let msg = format!("event loop: {e:?}");
            exit.end(VmEnd::Failed(msg));
        }
    };

    // Stop every vCPU and collect its counters.
    control.stop();
    for t in &threads {
        // A thread that already returned cannot be signalled; that is fine.
        let _ = kick(t);
    }
    for (i, t) in threads.into_iter().enumerate() {
        let stats = t.join();
        if args.stats {
            if let Ok(s) = stats {
                eprintln!(
                    "vmkit: vcpu{i}: {} pio exits, {} mmio exits, {} interrupted",
                    s.pio_exits, s.mmio_exits, s.interrupted
                );
            }
        }
    }
    if args.stats {
        let d = debug_port.stats();
        eprintln!(
            "vmkit: debug port: {} writes (port 0x80 and MMIO page 0xd0f00000)",
            d.writes
        );
        if let Some(kib) = guest_resident_kib(&mem) {
            eprintln!("vmkit: guest memory resident: {kib} KiB");
        }
    }
    let _ = std::io::stdout().flush();
    Ok(end)
}
