//! Dirty page tracking on this host's KVM: the pages a guest writes (KVM's dirty log) and
//! those written through vm-memory (the regions' bitmaps) come back from
//! `Machine::take_dirty_pages`, exactly, once. Reported as ignored where there is no
//! /dev/kvm.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmkit_boot::EntryPoint;
use vmkit_bus::pio_range;
use vmkit_kvm::{Error, Machine, MachineConfig, VcpuConfig, Vcpus};
use vmkit_legacy::{ExitReason, I8042, I8042_GSI, I8042_PORT, I8042_PORT_COUNT};
use vmkit_vcpu::CpuTemplate;

fn tracked_machine() -> Machine {
    let config = MachineConfig {
        track_dirty_pages: true,
        ..MachineConfig::new(64 << 20)
    };
    Machine::new(&config).expect("a VM on this host's KVM")
}

/// One vCPU of `m` starting at `code`, placed at 1 MiB (32-bit protected mode, as a PVH
/// entry), with the i8042 on the bus so that the code can end the VM with a reset pulse.
fn one_vcpu_running(m: &Machine, code: &[u8]) -> Vcpus {
    let config = VcpuConfig {
        count: 1,
        template: CpuTemplate::Host,
    };
    let vcpus = Vcpus::create(m.kvm(), m.vm(), &config).unwrap();
    let i8042 = I8042::new(m.exit().clone(), m.line(I8042_GSI).unwrap());
    m.bus()
        .register_pio(
            pio_range(I8042_PORT, I8042_PORT_COUNT).unwrap(),
            Arc::new(Mutex::new(i8042)),
        )
        .unwrap();
    let entry = GuestAddress(0x10_0000);
    m.memory().write_slice(code, entry).unwrap();
    let pvh = EntryPoint::Pvh {
        entry,
        start_info: GuestAddress(0x6000),
    };
    vcpus.set_entry(m.memory(), pvh).unwrap();
    vcpus
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn guest_and_device_writes_are_the_dirty_pages_and_are_taken_once() {
    let m = tracked_machine();
    // 32-bit code: mov dword [0x200000], 1; mov dword [0x305ffe], 2 (across a page
    // boundary: two pages); mov al, 0xFE; out 0x64, al (reset); jmp $.
    let code = [
        0xC7, 0x05, 0x00, 0x00, 0x20, 0x00, 0x01, 0x00, 0x00, 0x00, //
        0xC7, 0x05, 0xFE, 0x5F, 0x30, 0x00, 0x02, 0x00, 0x00, 0x00, //
        0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE,
    ];
    let vcpus = one_vcpu_running(&m, &code);
    // The set-up wrote the code, the page tables, the GDT: taken away before the run.
    let setup = m.take_dirty_pages().unwrap();
    assert!(
        setup.is_dirty(GuestAddress(0x10_0000)),
        "the code was written"
    );
    assert_eq!(m.take_dirty_pages().unwrap().count(), 0, "cleared");

    let threads = vcpus.start(m.bus().clone(), m.exit().clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.exit().reason().is_none() {
        assert!(Instant::now() < deadline, "the guest never reset");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(m.exit().reason(), Some(ExitReason::Reset));
    threads.stop();
    // A device-style write through vm-memory.
    m.memory().write_obj(3u8, GuestAddress(0x40_0000)).unwrap();

    let dirty = m.take_dirty_pages().unwrap();
    assert_eq!(
        dirty.file_ranges(),
        vec![
            0x20_0000..0x20_1000,
            0x30_5000..0x30_7000,
            0x40_0000..0x40_1000
        ],
        "exactly the pages written"
    );
    assert_eq!(
        m.take_dirty_pages().unwrap().count(),
        0,
        "both logs cleared"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn dirty_pages_without_tracking_are_an_error() {
    let m = Machine::new(&MachineConfig::new(64 << 20)).unwrap();
    let e = m.take_dirty_pages().unwrap_err();
    assert!(
        matches!(e, Error::Memory(vmkit_memory::Error::DirtyLogOff)),
        "{e}"
    );
    assert!(e.to_string().contains("tracking is off"), "{e}");
}
