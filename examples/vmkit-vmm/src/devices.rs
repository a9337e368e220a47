//! The devices of the VM: the PC's legacy ones on the bus, and the virtio devices the
//! command line asks for, attached on the chosen transport by vmkit-kvm.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use vmkit_boot::linux_loader::cmdline::Cmdline;
use vmkit_boot::DsdtDevice;
use vmkit_bus::{mmio_range, pio_range};
use vmkit_kvm::{Machine, MmioPlatform, PciPlatform};
use vmkit_legacy::{
    AcpiSleep, AcpiSleepConfig, DebugPort, ExitNotifier, Ged, Serial, SerialConfig, SerialState,
    ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT, COM1_GSI, COM1_PORT, DEBUG_PORT, DEBUG_PORT_COUNT,
    GED_REGISTER_SIZE, I8042, I8042_GSI, I8042_PORT, I8042_PORT_COUNT, SERIAL_PORT_COUNT,
};
use vmkit_memory::layout::{GED_ADDR, GED_GSI};
use vmkit_memory::GuestRam;
use vmkit_virtio::{AtomicMetrics, VirtioDevice};
use vmkit_virtio_blk::{Block, DiskSource};
use vmkit_virtio_console::{Console, ConsoleConfig, ConsoleInput, Pty};
use vmkit_virtio_net::Net;
use vmkit_virtio_rng::{Rng, RngConfig};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::{Args, ConsoleOutput, SerialOutput, Transport};
use crate::error::{Error, Result};
use crate::io::{InputToConsole, StdinToSerial};
use crate::net::InheritedFds;
use crate::output::Outputs;
use crate::terminal::Escape;
use vmkit_virtio_vsock::{Vsock, VsockConfig};

/// The serial port as the VMM holds it: output to stdout, a file, or nowhere.
pub type GuestSerial = Serial<Box<dyn Write + Send>>;

/// An event-loop subscriber as the VMM's event manager holds it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The PC's devices: COM1, the i8042 (keyboard on IRQ 1, reset line), the ACPI sleep and
/// reset registers, the debug port.
pub struct LegacyDevices {
    pub serial: Arc<Mutex<GuestSerial>>,
    /// With `--serial stdio`: signalled when the UART's input FIFO drained.
    input_drained: Option<EventFd>,
    pub debug_port: Arc<DebugPort>,
    /// The keyboard controller, for Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// The ACPI Generic Event Device, for the power button.
    pub ged: Arc<Mutex<Ged>>,
}

impl LegacyDevices {
    /// Puts them on `machine`'s bus, reporting power-off and reset to its exit notifier;
    /// the serial port writes to a sink of `outputs`, and starts in `serial_state` (a
    /// snapshot's) when given.
    pub fn add(
        machine: &Machine,
        args: &Args,
        outputs: &mut Outputs,
        serial_state: Option<&SerialState>,
    ) -> Result<Self> {
        let bus = machine.bus();
        let exit = machine.exit().clone();
        let input_drained = match args.serial {
            SerialOutput::Stdio => {
                Some(EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(Error::EventFd)?)
            }
            _ => None,
        };
        let out: Box<dyn Write + Send> = match &args.serial {
            SerialOutput::Stdio => Box::new(outputs.stdout()?),
            SerialOutput::Off => Box::new(std::io::sink()),
            SerialOutput::File(f) => {
                Box::new(outputs.file("serial_file", "serial output file", f)?)
            }
        };
        let config = SerialConfig {
            interrupt: machine.line(COM1_GSI)?,
            out,
            input_drained: input_drained
                .as_ref()
                .map(EventFd::try_clone)
                .transpose()
                .map_err(Error::EventFd)?,
        };
        let serial = match serial_state {
            None => GuestSerial::with_config(config),
            Some(state) => GuestSerial::from_state(config, state)
                .map_err(|e| Error::Restore(format!("serial port: {e}")))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        bus.register_pio(pio_range(COM1_PORT, SERIAL_PORT_COUNT)?, serial.clone())?;
        let i8042 = I8042::new(exit.clone(), machine.line(I8042_GSI)?);
        let i8042 = Arc::new(Mutex::new(i8042));
        bus.register_pio(pio_range(I8042_PORT, I8042_PORT_COUNT)?, i8042.clone())?;
        let sleep = AcpiSleep::new(exit, AcpiSleepConfig::default());
        let sleep_ports = pio_range(ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT)?;
        bus.register_pio(sleep_ports, Arc::new(Mutex::new(sleep)))?;
        let ged = Arc::new(Mutex::new(Ged::new(machine.line(GED_GSI)?)));
        bus.register_mmio(mmio_range(GED_ADDR, GED_REGISTER_SIZE)?, ged.clone())?;
        let debug_port = Arc::new(DebugPort::new());
        bus.register_pio(pio_range(DEBUG_PORT, DEBUG_PORT_COUNT)?, debug_port.clone())?;
        Ok(Self {
            serial,
            input_drained,
            debug_port,
            i8042,
            ged,
        })
    }

    /// stdin to the serial port, with `--serial stdio` unless the console takes stdin; the
    /// console escape ends the VM through `exit`.
    pub fn stdin_subscriber(&self, args: &Args, exit: Arc<dyn ExitNotifier>) -> Option<Subscriber> {
        let drained = self.input_drained.as_ref()?.try_clone().ok()?;
        if args.console == ConsoleOutput::Stdio {
            return None;
        }
        Some(Arc::new(Mutex::new(StdinToSerial::new(
            self.serial.clone(),
            drained,
            Escape::for_stdin(exit),
        ))))
    }
}

/// The virtio-console's host ends: where its output goes, where its input comes from, and
/// the pty behind both (kept open so its master never reports a hang-up while nobody is
/// attached).
struct ConsoleEnds {
    output: Box<dyn Write + Send>,
    input: Option<File>,
    pty: Option<Pty>,
}

fn console_ends(spec: &ConsoleOutput, outputs: &mut Outputs) -> Result<Option<ConsoleEnds>> {
    Ok(match spec {
        ConsoleOutput::Off => None,
        ConsoleOutput::Stdio => {
            // A duplicate of fd 0, so the event loop owns what it polls.
            let stdin = std::io::stdin().as_fd().try_clone_to_owned();
            Some(ConsoleEnds {
                output: Box::new(outputs.stdout()?),
                input: Some(File::from(stdin.map_err(Error::Console)?)),
                pty: None,
            })
        }
        ConsoleOutput::File(f) => Some(ConsoleEnds {
            output: Box::new(outputs.file("console_file", "console output file", f)?),
            input: None,
            pty: None,
        }),
        ConsoleOutput::Pty => {
            let pty = Pty::open().map_err(Error::Console)?;
            eprintln!("vmkit: virtio-console on {}", pty.path().display());
            Some(ConsoleEnds {
                output: Box::new(
                    outputs
                        .connected("console_pty", pty.output().map_err(Error::Console)?.into())?,
                ),
                input: Some(pty.master().try_clone().map_err(Error::Console)?),
                pty: Some(pty),
            })
        }
    })
}

/// A disk, shared between its transport and the API's `PATCH /drives`.
pub type SharedBlock = Arc<Mutex<Block<GuestRam>>>;
/// A network card, shared between its transport and the API's `PATCH /network-interfaces`.
pub type SharedNet = Arc<Mutex<Net<GuestRam>>>;

/// The virtio devices of the VM, attached, with what the rest of the VMM needs of them.
pub struct VirtioDevices {
    /// The queue event handlers, for the event loop (out of it while the VM is paused).
    pub subscribers: Vec<Subscriber>,
    /// The console's host input (stdin or its pty), for the event loop: it only buffers, so
    /// it stays in the loop while the VM is paused (and the console escape keeps working).
    pub console_input: Option<Subscriber>,
    /// How the guest learns of them through ACPI.
    pub dsdt: Vec<DsdtDevice>,
    /// The devices, for a pause to quiesce them.
    pub devices: Vec<Arc<Mutex<dyn VirtioDevice<GuestRam>>>>,
    /// Each device's counters, with the name its metrics are written under.
    pub metrics: Vec<(String, Arc<AtomicMetrics>)>,
    /// The disks with an API `drive_id`, for `PATCH /drives/{id}`.
    pub drives: Vec<(String, SharedBlock)>,
    /// The cards with an API `iface_id`, for `PATCH /network-interfaces/{id}`.
    pub nets: Vec<(String, SharedNet)>,
    /// The devices by type, in attach order, for snapshots.
    pub handles: Vec<Handle>,
    /// virtio-mmio: the transports (the kernel command line, snapshots).
    pub mmio: Option<MmioPlatform>,
    /// virtio-pci: the transports (snapshots).
    pub pci: Option<PciPlatform>,
    /// Lives as long as the VM.
    _console_pty: Option<Pty>,
}

fn open_disk(args: &Args, index: usize, metrics: Arc<AtomicMetrics>) -> Result<Block<GuestRam>> {
    let spec = &args.disk[index];
    let config = spec.block_config(args.cpus).with_metrics(metrics);
    Block::for_memory(config).map_err(|source| Error::Disk {
        path: match &spec.config.source {
            DiskSource::Path(p) => p.display().to_string(),
            DiskSource::File(_) => format!("#{index}"),
        },
        source,
    })
}

/// A virtio device by its type, for its snapshot state.
#[derive(Clone)]
pub enum Handle {
    /// A disk.
    Block(SharedBlock),
    /// A network card.
    Net(SharedNet),
    /// The vsock device.
    Vsock(Arc<Mutex<Vsock<GuestRam>>>),
    /// The entropy device.
    Rng(Arc<Mutex<Rng<GuestRam>>>),
    /// The console.
    Console(Arc<Mutex<Console<GuestRam>>>),
}

/// The devices being built, in the order they are attached, and their counters.
#[derive(Default)]
struct Built {
    devices: Vec<Arc<Mutex<dyn VirtioDevice<GuestRam>>>>,
    handles: Vec<Handle>,
    metrics: Vec<(String, Arc<AtomicMetrics>)>,
}

impl Built {
    /// New counters for a device, written under `name`.
    fn counters(&mut self, name: String) -> Arc<AtomicMetrics> {
        let m = Arc::new(AtomicMetrics::new());
        self.metrics.push((name, m.clone()));
        m
    }

    /// The disks, with those that have an API `drive_id`.
    fn disks(&mut self, args: &Args) -> Result<Vec<(String, SharedBlock)>> {
        let mut drives = Vec::new();
        for (i, spec) in args.disk.iter().enumerate() {
            let name = spec
                .id
                .as_ref()
                .map_or(format!("block{i}"), |id| format!("block_{id}"));
            let disk = Arc::new(Mutex::new(open_disk(args, i, self.counters(name))?));
            if let Some(id) = &spec.id {
                drives.push((id.clone(), disk.clone()));
            }
            self.handles.push(Handle::Block(disk.clone()));
            self.devices.push(disk);
        }
        Ok(drives)
    }

    /// The network cards, with those that have an API `iface_id`.
    fn nets(
        &mut self,
        args: &Args,
        net_fds: &mut InheritedFds,
    ) -> Result<Vec<(String, SharedNet)>> {
        let mut nets = Vec::new();
        for (i, spec) in args.net.iter().enumerate() {
            let m = self.counters(format!("net{i}"));
            let net = crate::net::open_net(spec, args.cpus, net_fds, m)?;
            let net = Arc::new(Mutex::new(net));
            if let Some(id) = &spec.id {
                nets.push((id.clone(), net.clone()));
            }
            self.handles.push(Handle::Net(net.clone()));
            self.devices.push(net);
        }
        Ok(nets)
    }

    /// The vsock and the entropy device, if asked for.
    fn vsock_and_rng(&mut self, args: &Args) -> Result<()> {
        if let Some(spec) = &args.vsock {
            let mut config = VsockConfig::new(spec.cid, spec.socket.clone());
            config.poll_us = spec.poll_us;
            let vsock = Vsock::for_memory(config)?.with_metrics(self.counters("vsock".into()));
            let vsock = Arc::new(Mutex::new(vsock));
            self.handles.push(Handle::Vsock(vsock.clone()));
            self.devices.push(vsock);
        }
        if args.rng || args.rng_rate_limiter.is_some() {
            let rng = Rng::for_memory(RngConfig::default())?
                .with_metrics(self.counters("entropy".into()))
                .with_rate_limiter(args.rng_rate_limiter.unwrap_or_default());
            let rng = Arc::new(Mutex::new(rng));
            self.handles.push(Handle::Rng(rng.clone()));
            self.devices.push(rng);
        }
        Ok(())
    }

    /// The console, if asked for: its host input's subscriber and its pty, if any.
    fn console(
        &mut self,
        machine: &Machine,
        args: &Args,
        outputs: &mut Outputs,
    ) -> Result<(Option<Subscriber>, Option<Pty>)> {
        let Some(ends) = console_ends(&args.console, outputs)? else {
            return Ok((None, None));
        };
        let config = ConsoleConfig::new(ends.output).with_metrics(self.counters("console".into()));
        let console = Console::for_memory(config)?;
        let escape = match args.console {
            ConsoleOutput::Stdio => Escape::for_stdin(machine.exit().clone()),
            _ => None,
        };
        let input = console_input(ends.input, console.input(), escape);
        let console = Arc::new(Mutex::new(console));
        self.handles.push(Handle::Console(console.clone()));
        self.devices.push(console);
        Ok((input, ends.pty))
    }
}

impl VirtioDevices {
    /// Builds the disks, network cards, vsock, rng and console the command line asks for
    /// and attaches them; the console writes to a sink of `outputs`.
    pub fn add(
        machine: &Machine,
        args: &Args,
        mut net_fds: InheritedFds,
        outputs: &mut Outputs,
    ) -> Result<Self> {
        let mut built = Built::default();
        let drives = built.disks(args)?;
        let nets = built.nets(args, &mut net_fds)?;
        built.vsock_and_rng(args)?;
        let (console_input, console_pty) = built.console(machine, args, outputs)?;
        let Built {
            devices,
            handles,
            metrics,
        } = built;
        let mut this = Self {
            subscribers: Vec::new(),
            console_input,
            dsdt: Vec::new(),
            devices: devices.clone(),
            metrics,
            drives,
            nets,
            handles,
            mmio: None,
            pci: None,
            _console_pty: console_pty,
        };
        match args.transport {
            Transport::Mmio => this.attach_mmio(machine, devices)?,
            Transport::Pci => this.attach_pci(machine, devices)?,
        }
        Ok(this)
    }

    fn attach_mmio(
        &mut self,
        machine: &Machine,
        devices: Vec<Arc<Mutex<dyn VirtioDevice<GuestRam>>>>,
    ) -> Result<()> {
        let mut mmio = MmioPlatform::new(machine)?;
        for device in devices {
            let handler = mmio.attach(machine.memory().clone(), device)?;
            self.subscribers.push(Arc::new(Mutex::new(handler)));
        }
        self.dsdt = mmio.dsdt_devices();
        self.mmio = Some(mmio);
        Ok(())
    }

    fn attach_pci(
        &mut self,
        machine: &Machine,
        devices: Vec<Arc<Mutex<dyn VirtioDevice<GuestRam>>>>,
    ) -> Result<()> {
        let mut pci = PciPlatform::new(machine)?;
        for device in devices {
            let (_, handler) = pci.attach(machine.memory().clone(), device)?;
            self.subscribers.push(Arc::new(Mutex::new(handler)));
        }
        self.dsdt = vec![pci.dsdt_device()];
        self.pci = Some(pci);
        Ok(())
    }

    /// Adds the virtio-mmio devices' `virtio_mmio.device=` entries to `cmdline` (none on
    /// PCI, where the guest enumerates the bus).
    pub fn add_to_cmdline(&self, cmdline: &mut Cmdline) -> Result<()> {
        match &self.mmio {
            Some(mmio) => Ok(mmio.add_to_cmdline(cmdline)?),
            None => Ok(()),
        }
    }
}

fn console_input(
    source: Option<File>,
    input: ConsoleInput,
    escape: Option<Escape>,
) -> Option<Subscriber> {
    Some(Arc::new(Mutex::new(InputToConsole::new(
        source?, input, escape,
    ))))
}
