//! The platform on this host's KVM: a VM that runs code and ends through the exit chain,
//! virtio-mmio and virtio-pci attachment with their ioeventfds (probed through KVM's own
//! collision check), BAR moves that take the ioeventfds along. Reported as ignored where
//! there is no /dev/kvm.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, NoDatamatch};
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};
use vmkit_boot::EntryPoint;
use vmkit_bus::pio_range;
use vmkit_kvm::{Machine, MachineConfig, MmioPlatform, PciPlatform, VcpuConfig, Vcpus};
use vmkit_legacy::{ExitReason, I8042, I8042_GSI, I8042_PORT, I8042_PORT_COUNT};
use vmkit_memory::layout::{PCI_BAR_WINDOW, PCI_ECAM, VIRTIO_MMIO_WINDOW};
use vmkit_memory::GuestRam;
use vmkit_vcpu::CpuTemplate;
use vmkit_virtio::{VirtioDevice, MMIO_MAGIC_VALUE};
use vmkit_virtio_rng::{Rng, RngConfig};
use vmm_sys_util::eventfd::EventFd;

fn machine() -> Machine {
    Machine::new(&MachineConfig::new(64 << 20)).expect("a VM on this host's KVM")
}

/// Two vCPUs of the host's CPU model in `m`.
fn two_vcpus(m: &Machine) -> Vcpus {
    let config = VcpuConfig {
        count: 2,
        template: CpuTemplate::Host,
    };
    Vcpus::create(m.kvm(), m.vm(), &config).unwrap()
}

/// `code` at 1 MiB, where vCPU 0 starts (32-bit protected mode, as a PVH entry).
fn load_code(m: &Machine, vcpus: &Vcpus, code: &[u8]) {
    let entry = GuestAddress(0x10_0000);
    m.memory().write_slice(code, entry).unwrap();
    let pvh = EntryPoint::Pvh {
        entry,
        start_info: GuestAddress(0x6000),
    };
    vcpus.set_entry(m.memory(), pvh).unwrap();
}

fn rng() -> Arc<Mutex<dyn VirtioDevice<GuestRam>>> {
    Arc::new(Mutex::new(Rng::for_memory(RngConfig::default()).unwrap()))
}

/// Whether an ioeventfd is registered at `addr` (any length, no datamatch): KVM refuses a
/// second one there with EEXIST. A probe that got in is taken out again.
fn ioeventfd_at(m: &Machine, addr: u64) -> bool {
    let probe = EventFd::new(0).unwrap();
    let at = IoEventAddress::Mmio(addr);
    match m.vm().register_ioevent(&probe, &at, NoDatamatch) {
        Ok(()) => {
            m.vm().unregister_ioevent(&probe, &at, NoDatamatch).unwrap();
            false
        }
        Err(e) => {
            assert_eq!(e.errno(), libc::EEXIST, "probe at {addr:#x}: {e}");
            true
        }
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_vcpu_runs_and_its_reset_ends_the_vm_through_the_exit_chain() {
    let m = machine();
    let vcpus = two_vcpus(&m);
    assert_eq!(vcpus.count(), 2);
    m.bus()
        .register_pio(
            pio_range(I8042_PORT, I8042_PORT_COUNT).unwrap(),
            Arc::new(Mutex::new(I8042::new(
                m.exit().clone(),
                m.line(I8042_GSI).unwrap(),
            ))),
        )
        .unwrap();
    // 32-bit code at 1 MiB: mov al, 0xFE; out 0x64, al (the i8042's reset pulse); jmp $.
    let code = [0xB0, 0xFE, 0xE6, 0x64, 0xEB, 0xFE];
    load_code(&m, &vcpus, &code);
    let threads = vcpus.start(m.bus().clone(), m.exit().clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.exit().reason().is_none() {
        assert!(Instant::now() < deadline, "the guest never reset");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(m.exit().reason(), Some(ExitReason::Reset));
    // vCPU 0 has returned; a pause waits only for vCPU 1 (kicked out of its wait for SIPI).
    threads.pause(Duration::from_secs(10)).unwrap();
    assert!(threads.is_paused());
    let stats = threads.stop();
    assert_eq!(stats.len(), 2);
    let boot = stats[0].expect("vCPU 0 stats");
    assert!(boot.pio_exits >= 1, "{boot:?}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn paused_vcpus_run_no_guest_code_until_resumed() {
    let m = machine();
    let vcpus = two_vcpus(&m);
    // 32-bit code at 1 MiB: inc dword [0x200000]; jmp back. (Kernel mode: emulated, about a
    // microsecond an instruction, on kvm_pvm.) vCPU 1 waits for INIT/SIPI inside KVM_RUN.
    let counter = GuestAddress(0x20_0000);
    let code = [0xFF, 0x05, 0x00, 0x00, 0x20, 0x00, 0xEB, 0xF8];
    load_code(&m, &vcpus, &code);
    let read = || m.memory().read_obj::<u32>(counter).unwrap();
    let wait_beyond = |value: u32, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while read() <= value {
            assert!(
                Instant::now() < deadline,
                "{what}: the counter stays at {value}"
            );
            std::thread::sleep(Duration::from_micros(20));
        }
    };
    let threads = vcpus.start(m.bus().clone(), m.exit().clone()).unwrap();
    assert!(!threads.is_paused());
    wait_beyond(0, "start");
    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for round in 0..5 {
        let t0 = Instant::now();
        threads.pause(Duration::from_secs(10)).unwrap();
        pauses.push(t0.elapsed());
        assert!(threads.is_paused());
        let a = read();
        std::thread::sleep(Duration::from_millis(if round == 0 { 200 } else { 20 }));
        let b = read();
        assert_eq!(a, b, "round {round}: the guest ran while paused");
        // Pausing again changes nothing.
        threads.pause(Duration::from_secs(10)).unwrap();
        assert_eq!(read(), b);
        let t0 = Instant::now();
        threads.resume();
        assert!(!threads.is_paused());
        wait_beyond(b, "resume");
        resumes.push(t0.elapsed());
    }
    eprintln!("pause (request to all parked): {pauses:?}");
    eprintln!("resume (request to the counter moving): {resumes:?}");
    threads.pause(Duration::from_secs(10)).unwrap();
    let stats = threads.stop();
    assert!(stats.iter().all(Option::is_some));
    assert_eq!(m.exit().reason(), None, "no vCPU ended the VM");
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_mmio_devices_get_windows_pins_ioeventfds_and_descriptions() {
    let m = machine();
    let mut mmio = MmioPlatform::new(&m).unwrap();
    let _h0 = mmio.attach(m.memory().clone(), rng()).unwrap();
    let _h1 = mmio.attach(m.memory().clone(), rng()).unwrap();
    let base = VIRTIO_MMIO_WINDOW.start;
    let slots: Vec<_> = mmio.slots().iter().map(|s| (s.base, s.gsi)).collect();
    assert_eq!(slots, vec![(base, 5), (base + 0x1000, 6)]);
    // The registers answer on the VM's bus, the notify register is an ioeventfd.
    let mut magic = [0u8; 4];
    assert!(m.bus().mmio_read(base, &mut magic).is_handled());
    assert_eq!(u32::from_le_bytes(magic), MMIO_MAGIC_VALUE);
    // QueueNotify is an ioeventfd (with the queue index as datamatch: a probe of any length
    // collides with it).
    assert!(ioeventfd_at(&m, base + 0x50));
    assert!(ioeventfd_at(&m, base + 0x1050));
    assert!(!ioeventfd_at(&m, base + 0x2050), "nothing there");
    let mut cmdline = Cmdline::new(4096).unwrap();
    cmdline.insert_str("console=ttyS0").unwrap();
    mmio.add_to_cmdline(&mut cmdline).unwrap();
    let text = cmdline.as_cstring().unwrap().into_string().unwrap();
    assert_eq!(
        text,
        "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    );
    assert_eq!(mmio.dsdt_devices().len(), 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_mmio_states_restore_into_the_same_devices_of_another_vm() {
    let m = machine();
    let mut mmio = MmioPlatform::new(&m).unwrap();
    let _h0 = mmio.attach(m.memory().clone(), rng()).unwrap();
    let _h1 = mmio.attach(m.memory().clone(), rng()).unwrap();
    let base = VIRTIO_MMIO_WINDOW.start;
    // The guest's driver of the second device got as far as DRIVER (status 3).
    assert!(m
        .bus()
        .mmio_write(base + 0x1070, &3u32.to_le_bytes())
        .is_handled());
    let states = mmio.states();
    assert_eq!(states.len(), 2);
    assert_eq!((states[0].common.status, states[1].common.status), (0, 3));

    let m2 = machine();
    let mut mmio2 = MmioPlatform::new(&m2).unwrap();
    let _g0 = mmio2.attach(m2.memory().clone(), rng()).unwrap();
    let err = mmio2.restore(&states).unwrap_err().to_string();
    assert!(err.contains("2 virtio-mmio devices but 1"), "{err}");
    let _g1 = mmio2.attach(m2.memory().clone(), rng()).unwrap();
    let mut wrong = states.clone();
    wrong[1].common.device_type = 2;
    let err = mmio2.restore(&wrong).unwrap_err().to_string();
    assert!(err.contains("virtio device 1"), "{err}");
    mmio2.restore(&states).unwrap();
    let mut status = [0u8; 4];
    assert!(m2.bus().mmio_read(base + 0x1070, &mut status).is_handled());
    assert_eq!(u32::from_le_bytes(status), 3);
    assert_eq!(mmio2.states(), states);
}

fn ecam_write(m: &Machine, device: u8, reg: u64, value: u32) {
    let addr = PCI_ECAM.start + (u64::from(device) << 15) + reg;
    assert!(m.bus().mmio_write(addr, &value.to_le_bytes()).is_handled());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_pci_notify_ioeventfds_follow_bar_moves() {
    let m = machine();
    let mut pci = PciPlatform::new(&m).unwrap();
    let (bdf, _h) = pci.attach(m.memory().clone(), rng()).unwrap();
    let bar = PCI_BAR_WINDOW.start;
    assert_eq!(pci.bus().bar_mapping(bdf.device, 0).unwrap().address, bar);
    // Vendor and device ID through the ECAM on the VM's bus.
    let mut id = [0u8; 4];
    assert!(m
        .bus()
        .mmio_read(PCI_ECAM.start + (u64::from(bdf.device) << 15), &mut id)
        .is_handled());
    assert_eq!(u32::from_le_bytes(id), 0x1044_1AF4);
    // The notify register of queue 0 is an ioeventfd at BAR 0 + 0x3000.
    assert!(ioeventfd_at(&m, bar + 0x3000));
    // The guest moves BAR 0 (64-bit: 0x10 and 0x14) with decoding off, as Linux does.
    let new = bar + 0x10_0000;
    ecam_write(&m, bdf.device, 0x04, 0x4); // bus master only
    ecam_write(&m, bdf.device, 0x10, new as u32);
    ecam_write(&m, bdf.device, 0x14, 0);
    assert!(
        !ioeventfd_at(&m, bar + 0x3000),
        "unregistered while not decoding"
    );
    ecam_write(&m, bdf.device, 0x04, 0x6); // memory + bus master
    assert!(
        ioeventfd_at(&m, new + 0x3000),
        "registered at the new place"
    );
    assert!(!ioeventfd_at(&m, bar + 0x3000), "not left at the old place");
    // The registers answer there too.
    let mut status = [0u8; 1];
    assert!(m.bus().mmio_read(new + 0x14, &mut status).is_handled());
    assert_eq!(status, [0]);
    assert!(!m.bus().mmio_read(bar + 0x14, &mut status).is_handled());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn virtio_pci_states_restore_bar_ioeventfds_and_msi_routes_into_another_vm() {
    let m = machine();
    let mut pci = PciPlatform::new(&m).unwrap();
    let (bdf, _h) = pci.attach(m.memory().clone(), rng()).unwrap();
    let bar = PCI_BAR_WINDOW.start;
    // The guest moves BAR 0, enables MSI-X (the capability found by walking the list) and
    // programs vector 1.
    let new = bar + 0x10_0000;
    ecam_write(&m, bdf.device, 0x04, 0x4);
    ecam_write(&m, bdf.device, 0x10, new as u32);
    ecam_write(&m, bdf.device, 0x14, 0);
    ecam_write(&m, bdf.device, 0x04, 0x6);
    let mut cap = [0u8; 1];
    let mut at = 0x34u64;
    let ecam = PCI_ECAM.start + (u64::from(bdf.device) << 15);
    loop {
        assert!(m.bus().mmio_read(ecam + at, &mut cap).is_handled());
        let mut id = [0u8; 1];
        assert!(m
            .bus()
            .mmio_read(ecam + u64::from(cap[0]), &mut id)
            .is_handled());
        at = u64::from(cap[0]);
        if id[0] == 0x11 {
            break;
        }
        at += 1;
    }
    let msix_control = ecam + at + 2;
    assert!(m
        .bus()
        .mmio_write(msix_control, &0x8000u16.to_le_bytes())
        .is_handled());
    let table = new + 0x4000 + 16;
    for (off, v) in [(0u64, 0xFEE0_0000u32), (8, 0x41), (12, 0)] {
        assert!(m
            .bus()
            .mmio_write(table + off, &v.to_le_bytes())
            .is_handled());
    }
    // The MSI routes of the VM (every vector has one while MSI-X is enabled).
    let routed = |m: &Machine| -> Vec<vmkit_irq::MsiMessage> {
        (24..64)
            .filter_map(|gsi| m.irqchip().lock().unwrap().routing().msi(gsi))
            .collect()
    };
    let msg = vmkit_irq::MsiMessage {
        address: 0xFEE0_0000,
        data: 0x41,
    };
    assert!(routed(&m).contains(&msg));
    let states = pci.states();
    assert_eq!(states.len(), 1);

    let m2 = machine();
    let mut pci2 = PciPlatform::new(&m2).unwrap();
    let err = pci2.restore(&states).unwrap_err().to_string();
    assert!(err.contains("1 virtio-pci devices but 0"), "{err}");
    let (bdf2, _h2) = pci2.attach(m2.memory().clone(), rng()).unwrap();
    assert_eq!(bdf2, bdf);
    assert!(ioeventfd_at(&m2, bar + 0x3000));
    assert!(routed(&m2).is_empty());
    pci2.restore(&states).unwrap();
    // BAR 0 where the guest had put it, the notify ioeventfd with it, the MSI route back.
    assert_eq!(pci2.bus().bar_mapping(bdf.device, 0).unwrap().address, new);
    assert!(ioeventfd_at(&m2, new + 0x3000));
    assert!(!ioeventfd_at(&m2, bar + 0x3000));
    assert_eq!(routed(&m2), routed(&m));
    assert!(routed(&m2).contains(&msg));
    assert_eq!(pci2.states(), states);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_failed_vcpu_prologue_fails_the_start_and_no_guest_code_runs() {
    let m = machine();
    let vcpus = two_vcpus(&m);
    // The counter loop of the pause test: the guest ran if the counter moved.
    let counter = GuestAddress(0x20_0000);
    load_code(
        &m,
        &vcpus,
        &[0xFF, 0x05, 0x00, 0x00, 0x20, 0x00, 0xEB, 0xF8],
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let prologue = Arc::new(move |index: u32| {
        s.lock()
            .unwrap()
            .push((index, std::thread::current().name().map(String::from)));
        if index == 1 {
            Err("no filter for you".to_string())
        } else {
            Ok(())
        }
    });
    let err = vcpus
        .start_with(m.bus().clone(), m.exit().clone(), prologue)
        .unwrap_err();
    assert_eq!(err.to_string(), "vCPU 1: no filter for you");
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        [(0, Some("vcpu0".into())), (1, Some("vcpu1".into()))],
        "each prologue runs in its own vCPU thread"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        m.memory().read_obj::<u32>(counter).unwrap(),
        0,
        "the guest ran"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn prepared_vcpus_run_no_guest_code_until_let_in_and_an_abort_runs_none() {
    let counter = GuestAddress(0x20_0000);
    let code = [0xFF, 0x05, 0x00, 0x00, 0x20, 0x00, 0xEB, 0xF8];
    let prologue = Arc::new(|_: u32| Ok(()));
    for let_in in [true, false] {
        let m = machine();
        let vcpus = two_vcpus(&m);
        // The counter loop of the pause test: the guest ran if the counter moved.
        load_code(&m, &vcpus, &code);
        let read = || m.memory().read_obj::<u32>(counter).unwrap();
        let parked = vcpus
            .prepare_with(m.bus().clone(), m.exit().clone(), prologue.clone())
            .unwrap();
        // What the caller does here (its own filter) comes before any guest instruction: a
        // guest let in already would have counted to thousands by now.
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(read(), 0, "the guest ran before it was let in");
        if !let_in {
            parked.abort();
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(read(), 0, "the guest ran after an abort");
            continue;
        }
        let threads = parked.run();
        let deadline = Instant::now() + Duration::from_secs(20);
        while read() == 0 {
            assert!(Instant::now() < deadline, "the guest never ran once let in");
            std::thread::sleep(Duration::from_millis(1));
        }
        threads.pause(Duration::from_secs(10)).unwrap();
        assert!(threads.stop().iter().all(Option::is_some));
    }
}
