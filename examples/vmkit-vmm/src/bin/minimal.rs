//! The smallest useful VMM built from the vmkit crates: the code of `docs/guide.md`, compiled
//! and tested (`tests/boot.rs` boots the test guest with it).
//!
//! ```text
//! cargo run -p vmkit-vmm --bin vmkit-minimal -- KERNEL [CMDLINE]
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmkit_legacy::{
    AcpiSleep, AcpiSleepConfig, EventFdExit, Serial, ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT,
    COM1_GSI, COM1_PORT, I8042, I8042_PORT, I8042_PORT_COUNT, SERIAL_PORT_COUNT,
};

struct Buses(vmkit_bus::IoBus);

impl vmkit_vcpu::VcpuExitHandler for Buses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let _ = self.0.pio_read(port, data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        let _ = self.0.pio_write(port, data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let _ = self.0.mmio_read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        let _ = self.0.mmio_write(addr, data);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kernel_path = args.next().ok_or("usage: minimal KERNEL [CMDLINE]")?;
    let cmdline = args
        .next()
        .unwrap_or_else(|| "console=ttyS0 reboot=k panic=-1".into());
    const CPUS: u32 = 2;

    // 1. Memory.
    let kvm = kvm_ioctls::Kvm::new()?;
    let vm = kvm.create_vm()?;
    let mem = vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig::new(256 << 20))?;
    let _slots = vmkit_memory::register_memory_slots(&vm, &mem)?;

    // 2. Interrupt controller, then vCPUs.
    let irqchip = vmkit_irq::Irqchip::new(&vm, vmkit_irq::IrqchipConfig::default())?;
    let template = vmkit_vcpu::CpuidTemplate::from_kvm(&kvm)?;
    let cfg = vmkit_vcpu::CpuidConfig {
        num_cpus: CPUS,
        masks: vec![],
    };
    let msrs = kvm.get_msr_index_list()?;
    let mut vcpus = Vec::new();
    for i in 0..CPUS {
        let fd = vm.create_vcpu(u64::from(i))?;
        fd.set_cpuid2(&template.for_vcpu(i, &cfg)?)?;
        vmkit_vcpu::setup_msrs(&fd, msrs.as_slice())?;
        vmkit_vcpu::setup_fpu(&fd)?;
        vmkit_vcpu::setup_lint(&fd)?;
        vcpus.push(vmkit_vcpu::Vcpu::new(fd, i));
    }

    // 3. Devices on a bus.
    let mut bus = vmkit_bus::IoBus::new();
    let com1_irq = Arc::new(irqchip.line(&vm, COM1_GSI)?);
    let serial = Arc::new(Mutex::new(Serial::new(com1_irq, std::io::stdout())));
    bus.register_pio(vmkit_bus::pio_range(COM1_PORT, SERIAL_PORT_COUNT)?, serial)?;
    let exit = Arc::new(EventFdExit::new()?);
    bus.register_pio(
        vmkit_bus::pio_range(ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_COUNT)?,
        Arc::new(Mutex::new(AcpiSleep::new(
            exit.clone(),
            AcpiSleepConfig::default(),
        ))),
    )?;
    bus.register_pio(
        vmkit_bus::pio_range(I8042_PORT, I8042_PORT_COUNT)?,
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
    )?;

    // 4. ACPI and the kernel.
    let rsdp = vmkit_boot::create_acpi_tables(
        &mem,
        &vmkit_boot::AcpiConfig {
            num_cpus: CPUS,
            ..Default::default()
        },
    )?;
    let mut kernel = std::fs::File::open(&kernel_path)?;
    let loaded = vmkit_boot::load(
        &mem,
        &mut kernel,
        vmkit_boot::BootConfig {
            cmdline: &cmdline,
            rsdp: Some(rsdp),
            ..Default::default()
        },
    )?;
    let entry = match loaded.entry {
        vmkit_boot::EntryPoint::Linux64 { entry, boot_params } => {
            vmkit_vcpu::EntryState::Linux64 { entry, boot_params }
        }
        vmkit_boot::EntryPoint::Pvh { entry, start_info } => {
            vmkit_vcpu::EntryState::Pvh { entry, start_info }
        }
    };
    vmkit_vcpu::setup_entry(vcpus[0].fd(), &mem, entry)?;

    // 5. Run until a device ends the VM (a real VMM waits on exit.eventfd() with epoll).
    vmkit_vcpu::install_kick_handler()?;
    let buses = Arc::new(Buses(bus));
    let control = vmkit_vcpu::VcpuControl::new();
    let threads: Vec<_> = vcpus
        .into_iter()
        .map(|mut vcpu| {
            let (buses, control) = (buses.clone(), control.clone());
            std::thread::spawn(move || vcpu.run(&*buses, &control).map_err(|e| e.to_string()))
        })
        .collect();
    while exit.reason().is_none() && !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    control.stop();
    for t in &threads {
        let _ = vmkit_vcpu::kick(t);
    }
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            return Err(e.into());
        }
    }
    eprintln!("minimal: guest ended: {:?}", exit.reason());
    Ok(())
}
