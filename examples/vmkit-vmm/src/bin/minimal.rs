//! A second VMM built from the vmkit crates: the code of `docs/guide.md`, compiled and
//! tested (`tests/boot.rs` boots the test guest with it and reads entropy over virtio-pci).
//!
//! ```text
//! cargo run -p vmkit-vmm --bin vmkit-minimal -- KERNEL [CMDLINE]
//! ```

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmkit_kvm::{ExitWatcher, Machine, MachineConfig, PciPlatform, VcpuConfig, Vcpus};
use vmkit_legacy::{
    AcpiSleep, AcpiSleepConfig, Serial, ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT, COM1_GSI,
    COM1_PORT, I8042, I8042_GSI, I8042_PORT, I8042_PORT_COUNT, SERIAL_PORT_COUNT,
};
use vmkit_memory::GuestRam;
use vmkit_virtio_rng::{Rng, RngConfig};

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kernel_path = args.next().ok_or("usage: minimal KERNEL [CMDLINE]")?;
    let cmdline = args
        .next()
        .unwrap_or_else(|| "console=ttyS0 reboot=k panic=-1".into());

    // 1. The machine: KVM, 256 MiB of RAM in KVM's slots, the irqchip, the bus, the exit.
    let machine = Machine::new(&MachineConfig::new(256 << 20))?;

    // 2. vCPUs (after the irqchip): CPUID, MSRs, FPU, LAPIC pins.
    let vcpu_config = VcpuConfig {
        count: 2,
        template: vmkit_vcpu::CpuTemplate::Host,
    };
    let vcpus = Vcpus::create(machine.kvm(), machine.vm(), &vcpu_config)?;

    // 3. Legacy devices on the bus.
    add_legacy(&machine)?;

    // 4. A virtio-rng on PCI bus 0: BAR, MSI-X as KVM MSI routes, ioeventfds.
    let mut pci = PciPlatform::new(&machine)?;
    let rng = Arc::new(Mutex::new(Rng::<GuestRam>::for_memory(
        RngConfig::default(),
    )?));
    let (_, rng_events) = pci.attach(machine.memory().clone(), rng)?;

    // 5. Firmware tables (the host bridge in the DSDT and MCFG) and the kernel.
    let acpi = vmkit_boot::AcpiConfig {
        num_cpus: vcpu_config.count,
        devices: vec![pci.dsdt_device()],
        ..Default::default()
    };
    let rsdp = vmkit_boot::create_acpi_tables(machine.memory(), &acpi)?;
    let mut kernel = std::fs::File::open(&kernel_path)?;
    let boot = vmkit_boot::BootConfig {
        cmdline: &cmdline,
        rsdp: Some(rsdp),
        ..Default::default()
    };
    let loaded = vmkit_boot::load(machine.memory(), &mut kernel, boot)?;
    vcpus.set_entry(machine.memory(), loaded.entry)?;

    // 6. Run.
    let end = run(&machine, vcpus, rng_events)?;
    eprintln!("minimal: guest ended: {end}");
    Ok(())
}

/// COM1 on an irqfd, the i8042 and the ACPI sleep register, which end the VM through its exit
/// notifier.
fn add_legacy(machine: &Machine) -> Result<(), Box<dyn std::error::Error>> {
    let bus = machine.bus();
    let serial = Serial::new(machine.line(COM1_GSI)?, std::io::stdout());
    let com1 = vmkit_bus::pio_range(COM1_PORT, SERIAL_PORT_COUNT)?;
    bus.register_pio(com1, Arc::new(Mutex::new(serial)))?;
    let sleep = AcpiSleep::new(machine.exit().clone(), AcpiSleepConfig::default());
    let sleep_ports = vmkit_bus::pio_range(ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT)?;
    bus.register_pio(sleep_ports, Arc::new(Mutex::new(sleep)))?;
    let i8042 = I8042::new(machine.exit().clone(), machine.line(I8042_GSI)?);
    let i8042 = Arc::new(Mutex::new(i8042));
    bus.register_pio(vmkit_bus::pio_range(I8042_PORT, I8042_PORT_COUNT)?, i8042)?;
    Ok(())
}

/// A thread per vCPU, the event loop on this thread until a device or vCPU ends the VM.
fn run(
    machine: &Machine,
    vcpus: Vcpus,
    rng_events: vmkit_virtio::QueueEventHandler<GuestRam>,
) -> Result<vmkit_legacy::ExitReason, Box<dyn std::error::Error>> {
    let mut events = EventManager::<Subscriber>::new()?;
    events.add_subscriber(Arc::new(Mutex::new(rng_events)));
    let exit = machine.exit().clone();
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher::new(exit.clone()))));
    let threads = vcpus.start(machine.bus().clone(), exit.clone())?;
    let end = loop {
        if let Some(end) = exit.reason() {
            break end;
        }
        events.run()?;
    };
    threads.stop();
    Ok(end)
}
