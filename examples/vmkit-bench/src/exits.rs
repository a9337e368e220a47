//! Exit cost: the guest writes port 0x80 and then an unassigned MMIO address N times from
//! CPL3 and divides its TSC delta, under each VMM and under a bare kvm-ioctls loop — the same
//! guest and command line with no bus and no device, a `match` on the exit.

use std::fmt::Display;
use std::path::Path;

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmkit_boot::{BootConfig, EntryPoint};
use vmkit_irq::{Irqchip, IrqchipConfig};
use vmkit_memory::layout::UNASSIGNED_MMIO;
use vmkit_memory::GuestRam;
use vmkit_vcpu::{setup_entry, setup_fpu, setup_lint, CpuidConfig, CpuidTemplate};

use crate::run::run;
use crate::stats::ratio;
use crate::svg::Chart;
use crate::table::Table;
use crate::vmm::{Setup, Vmm};

/// Where `bench=mmio` writes: deliberately unassigned in every VMM (an exit all the same).
const MMIO_ADDR: u64 = UNASSIGNED_MMIO.start;

fn text<E: Display>(e: E) -> String {
    e.to_string()
}

/// The guest command line of one kind of exit (`pio` or `mmio`), `n` times.
fn cmdline(kind: &str, n: u64) -> String {
    match kind {
        "pio" => format!("bench=pio:{n}"),
        _ => format!("bench=mmio:{n}:0x{MMIO_ADDR:x}"),
    }
}

/// ns per exit from the guest's `bench pio: N exits, M ns/exit` line.
fn per_exit(out: &str, kind: &str, who: &str) -> Result<f64, String> {
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("bench {kind}: ")))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|l| l.strip_suffix(" ns/exit"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{who}: no {kind} line:\n{out}"))
}

/// vCPU 0 of `vm`, set up as vmkit sets up its boot vCPU (CPUID, FPU, LAPIC LINT pins).
fn bare_vcpu(kvm: &Kvm, vm: &VmFd) -> Result<VcpuFd, String> {
    let vcpu = vm.create_vcpu(0).map_err(text)?;
    let config = CpuidConfig {
        num_cpus: 1,
        masks: vec![],
    };
    let cpuid = CpuidTemplate::from_kvm(kvm)
        .and_then(|t| t.for_vcpu(0, &config))
        .map_err(text)?;
    vcpu.set_cpuid2(&cpuid).map_err(text)?;
    setup_fpu(&vcpu).map_err(text)?;
    setup_lint(&vcpu).map_err(text)?;
    Ok(vcpu)
}

/// ACPI tables and the guest in `mem`; its entry point.
fn load_guest(mem: &GuestRam, guest: &Path, cmdline: &str) -> Result<EntryPoint, String> {
    let rsdp =
        vmkit_boot::create_acpi_tables(mem, &vmkit_boot::AcpiConfig::default()).map_err(text)?;
    let mut kernel = std::fs::File::open(guest).map_err(|e| format!("{}: {e}", guest.display()))?;
    let boot = BootConfig {
        cmdline,
        rsdp: Some(rsdp),
        ..Default::default()
    };
    Ok(vmkit_boot::load(mem, &mut kernel, boot)
        .map_err(text)?
        .entry)
}

/// Runs `vcpu` to the guest's end: a `match` on each exit, no bus, no device. Returns the
/// guest's serial output.
fn bare_run(vcpu: &mut VcpuFd) -> Result<String, String> {
    let mut out = Vec::new();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) | Ok(VcpuExit::MmioWrite(MMIO_ADDR, _)) => {}
            Ok(VcpuExit::MmioRead(_, d)) => d.fill(0xff),
            Ok(VcpuExit::IoOut(0x3f8, d)) => out.push(d[0]),
            Ok(VcpuExit::IoIn(0x3fd, d)) => d[0] = 0x60, // THR empty
            Ok(VcpuExit::IoOut(0x600, _)) | Ok(VcpuExit::IoOut(0x64, _)) => break,
            Ok(VcpuExit::IoIn(_, d)) => d.fill(0xff),
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::Hlt) => break,
            Ok(_) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The guest with `cmdline` under the bare loop; its serial output. Setup reuses the vmkit
/// crates (it is not what is measured).
fn bare_loop(guest: &Path, cmdline: &str) -> Result<String, String> {
    let kvm = Kvm::new().map_err(text)?;
    let vm = kvm.create_vm().map_err(text)?;
    let mem = vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig::new(128 << 20))
        .map_err(text)?;
    let _slots = vmkit_memory::register_memory_slots(&vm, &mem).map_err(text)?;
    let _chip = Irqchip::new(&vm, IrqchipConfig::default()).map_err(text)?;
    let mut vcpu = bare_vcpu(&kvm, &vm)?;
    let entry = load_guest(&mem, guest, cmdline)?;
    if !matches!(entry, EntryPoint::Pvh { .. }) {
        return Err("the test guest is not PVH".into());
    }
    setup_entry(&vcpu, &mem, entry).map_err(text)?;
    bare_run(&mut vcpu)
}

/// One row: ns per exit of `kind` under the bare loop and each VMM, and the ratios.
fn row(setup: &Setup, kind: &str, n: u64, charts: &mut Vec<Chart>) -> Result<Vec<String>, String> {
    let cmd = cmdline(kind, n);
    let of =
        |vmm: Vmm| run(setup, vmm, &cmd, &[]).and_then(|o| per_exit(&o.stdout, kind, vmm.name()));
    let ours = of(Vmm::Vmkit)?;
    let bare = per_exit(&bare_loop(&setup.guest, &cmd)?, kind, "bare loop")?;
    let mut cells = vec![kind.to_string(), format!("{bare:.0}"), format!("{ours:.0}")];
    cells.push(ratio(ours, bare, 3));
    let mut bars = vec![("bare loop".to_string(), bare), ("vmkit".to_string(), ours)];
    if setup.baseline.is_some() {
        let base = of(Vmm::Baseline)?;
        cells.extend([format!("{base:.0}"), ratio(ours, base, 3)]);
        bars.push((Vmm::Baseline.name().into(), base));
    }
    if setup.qemu {
        let q = of(Vmm::Qemu)?;
        cells.extend([format!("{q:.0}"), ratio(q, bare, 3)]);
    }
    charts.push(Chart::new(
        &format!("{kind} exit round trip (ns, lower is better)"),
        bars,
    ));
    Ok(cells)
}

/// The exit-cost section; adds a chart per kind to `charts`.
pub fn section(setup: &Setup, n: u64, charts: &mut Vec<Chart>) -> Result<(), String> {
    println!(
        "\n## Exit cost: {n} port writes and {n} MMIO writes at guest CPL3 \
         (ns per exit by the guest's TSC)\n"
    );
    let mut header = vec![
        "exit",
        "bare kvm-ioctls loop",
        "vmkit (`Vcpu::run` → `IoBus`)",
        "vmkit / bare",
    ];
    if setup.baseline.is_some() {
        header.extend([Vmm::Baseline.name(), "vmkit / baseline"]);
    }
    if setup.qemu {
        header.extend(["QEMU microvm", "QEMU / bare"]);
    }
    let mut table = Table::new(header);
    for kind in ["pio", "mmio"] {
        table.row(row(setup, kind, n, charts)?);
    }
    table.print();
    println!(
        "\nThe bare loop runs the same guest under a `match` on `VcpuExit` with no bus and no \
         device. In vmkit port 0x80 is the `DebugPort`; MMIO page 0x{MMIO_ADDR:x} \
         (`vmkit_memory::layout::UNASSIGNED_MMIO`) is unassigned, in vmkit and in QEMU (where \
         port 0x80 is unassigned too): still an exit to the VMM, counted by `--stats`.{}",
        if setup.baseline.is_some() {
            " A baseline from before that page was unassigned writes to its debug MMIO page."
        } else {
            ""
        }
    );
    Ok(())
}
