//! Application processor start-up: INIT, SIPI, SIPI.
//!
//! The trampoline (boot.rs) is copied to 0x8000, so the SIPI vector is 0x08.
//! Each AP goes real mode -> protected mode -> long mode on the BSP's page
//! tables, takes a CPU index and a stack, records its APIC ID in
//! `ap_apic_ids[index]`, bumps `ap_online` and halts with interrupts off.

use crate::platform::acpi::Acpi;
use crate::platform::apic::Lapic;
use crate::platform::boot::{self, MAX_CPUS, TRAMPOLINE_ADDR};
use crate::platform::time::{delay_us, wait_until};
use crate::println;
use core::sync::atomic::Ordering;

const ICR_INIT: u32 = 0x0000_4500; // INIT, level assert
const ICR_STARTUP: u32 = 0x0000_4600; // STARTUP, level assert
const ONLINE: u32 = 0x8000_0000;

/// Outcome of bringing the APs up.
pub struct Smp {
    /// APIC IDs reported by the CPUs that came up, by CPU index (0 = BSP).
    pub reported: [Option<u32>; MAX_CPUS],
}

impl Smp {
    /// Whether a CPU with `apic_id` reported itself.
    pub fn is_online(&self, apic_id: u32) -> bool {
        self.reported.contains(&Some(apic_id))
    }
}

fn copy_trampoline() -> bool {
    let code = boot::ap_trampoline();
    if code.len() > 4096 {
        return false;
    }
    // SAFETY: 0x8000 is a free page of conventional memory below 1 MiB (the
    // start info, command line and memory map were copied out before this),
    // identity-mapped writable, and not part of the kernel image.
    unsafe {
        core::ptr::copy_nonoverlapping(code.as_ptr(), TRAMPOLINE_ADDR as *mut u8, code.len())
    };
    true
}

/// Starts every enabled AP of the MADT and waits (at most ~2 s) for them.
pub fn start_aps(acpi: &Acpi, lapic: &Lapic, bsp_apic_id: u32) -> Smp {
    boot::ap_apic_ids()[0].store(ONLINE | bsp_apic_id, Ordering::SeqCst);
    let aps = acpi.cpu_ids[..acpi.cpu_count]
        .iter()
        .copied()
        .filter(|&id| id != bsp_apic_id && id < 0xff);
    let wanted = aps.clone().count() as u32;

    if wanted > 0 && copy_trampoline() {
        for id in aps.clone() {
            lapic.send_ipi(id, ICR_INIT);
        }
        delay_us(10_000);
        for _ in 0..2 {
            for id in aps.clone() {
                lapic.send_ipi(id, ICR_STARTUP | (TRAMPOLINE_ADDR >> 12) as u32);
            }
            delay_us(200);
        }
        wait_until(2_000_000, || {
            boot::ap_online().load(Ordering::Acquire) >= wanted
        });
    }

    let mut reported = [None; MAX_CPUS];
    for (slot, id) in reported.iter_mut().zip(boot::ap_apic_ids().iter()) {
        let v = id.load(Ordering::Acquire);
        if v & ONLINE != 0 {
            *slot = Some(v & !ONLINE);
        }
    }
    Smp { reported }
}

/// What SMP start-up left running.
#[derive(Clone, Copy, Debug)]
pub struct Online {
    /// CPUs online, the BSP included.
    pub count: usize,
    /// The APIC ID of the first online AP (below 255, so an xAPIC MSI can
    /// name it).
    pub first_ap: Option<u32>,
}

/// Brings up the APs (when there are any) and prints one line per CPU and
/// `smp: <online>/<cpus> online`.
pub fn bring_up(acpi: Option<&Acpi>, lapic: &Lapic, bsp_apic_id: u32, cpus: usize) -> Online {
    let Some(acpi) = acpi.filter(|a| a.madt_found && a.cpu_count > 1) else {
        println!("cpu 0: apic {} online", bsp_apic_id);
        println!("smp: 1/{} online", cpus);
        return Online {
            count: 1,
            first_ap: None,
        };
    };
    let smp = start_aps(acpi, lapic, bsp_apic_id);
    let mut online = Online {
        count: 0,
        first_ap: None,
    };
    for (index, &id) in acpi.cpu_ids[..acpi.cpu_count].iter().enumerate() {
        if smp.is_online(id) {
            online.count += 1;
            if id != bsp_apic_id && id < 0xff {
                online.first_ap.get_or_insert(id);
            }
            println!("cpu {}: apic {} online", index, id);
        } else {
            println!("cpu {}: apic {} offline", index, id);
        }
    }
    println!("smp: {}/{} online", online.count, cpus);
    online
}
