//! The run loop on a real KVM VM, with a few bytes of 32-bit guest code.
//! Reported as ignored where there is no /dev/kvm.

use std::sync::Mutex;
use std::time::Duration;

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmkit_memory::GuestRam;
use vmkit_vcpu::*;

#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
}

impl VcpuExitHandler for Recorder {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        data.fill(0x5a);
        self.log
            .lock()
            .unwrap()
            .push(format!("in {port:#x} {}", data.len()));
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(format!("out {port:#x} {data:02x?}"));
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        data.copy_from_slice(&0x1122_3344u32.to_le_bytes()[..data.len()]);
        self.log
            .lock()
            .unwrap()
            .push(format!("mmio read {addr:#x} {}", data.len()));
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.log
            .lock()
            .unwrap()
            .push(format!("mmio write {addr:#x} {data:02x?}"));
    }
}

/// A VM without irqchip (so HLT exits to us) running `code` at 0x1000 in 32-bit mode.
fn vm_with_code(code: &[u8]) -> (kvm_ioctls::VmFd, Vcpu, GuestRam) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let mem = vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig::new(2 << 20)).unwrap();
    let slots = vmkit_memory::register_memory_slots(&vm, &mem).unwrap();
    std::mem::forget(slots); // lives as long as the test process; `mem` keeps the mapping too
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    mem.write_slice(b"abc", GuestAddress(0x3000)).unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let template = CpuidTemplate::from_kvm(&kvm).unwrap();
    fd.set_cpuid2(
        &template
            .for_vcpu(
                0,
                &CpuidConfig {
                    num_cpus: 1,
                    masks: vec![],
                },
            )
            .unwrap(),
    )
    .unwrap();
    let msrs = kvm.get_msr_index_list().unwrap();
    setup_msrs(&fd, msrs.as_slice()).unwrap();
    setup_fpu(&fd).unwrap();
    setup_entry(
        &fd,
        &mem,
        vmkit_boot::EntryPoint::Pvh {
            entry: GuestAddress(0x1000),
            start_info: GuestAddress(0x6000),
        },
    )
    .unwrap();
    (vm, Vcpu::new(fd, 0), mem)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn pio_mmio_string_io_and_halt_reach_the_handler() {
    let code = [
        0x89, 0xd8, // mov eax, ebx (start_info pointer)
        0xe7, 0x84, // out 0x84, eax
        0xb0, 0x42, // mov al, 0x42
        0xe6, 0x80, // out 0x80, al
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xa2, 0x00, 0x20, 0x00, 0x00, // mov [0x2000], al
        0xa1, 0x00, 0x00, 0x00, 0xd0, // mov eax, [0xd0000000]
        0xa3, 0x04, 0x00, 0x00, 0xd0, // mov [0xd0000004], eax
        0xbe, 0x00, 0x30, 0x00, 0x00, // mov esi, 0x3000
        0xb9, 0x03, 0x00, 0x00, 0x00, // mov ecx, 3
        0xfc, // cld
        0xf3, 0x6e, // rep outsb (dx = 0x3f8)
        0xf4, // hlt
    ];
    let (_vm, mut vcpu, mem) = vm_with_code(&code);
    let rec = Recorder::default();
    let stop = vcpu.run(&rec, &VcpuControl::new()).unwrap();
    assert_eq!(stop, VcpuStop::Halted);
    let log = rec.log.lock().unwrap().clone();
    let mut expected = vec![
        "out 0x84 [00, 60, 00, 00]".to_string(),
        "out 0x80 [42]".into(),
        "in 0x3f8 1".into(),
        "mmio read 0xd0000000 4".into(),
        "mmio write 0xd0000004 [44, 33, 22, 11]".into(),
    ];
    // KVM may hand a `rep outsb` over in one exit or several; each byte arrives once.
    expected.extend([
        "out 0x3f8 [61]".into(),
        "out 0x3f8 [62]".into(),
        "out 0x3f8 [63]".into(),
    ]);
    assert_eq!(log, expected);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0x5a);
    let stats = vcpu.stats();
    assert!(stats.pio_exits >= 4 && stats.pio_exits <= 6, "{stats:?}");
    assert_eq!(stats.mmio_exits, 2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_kick_stops_a_spinning_vcpu() {
    install_kick_handler().unwrap();
    let (_vm, mut vcpu, _mem) = vm_with_code(&[0xeb, 0xfe]); // jmp $
    let control = VcpuControl::new();
    let c2 = control.clone();
    let t = std::thread::spawn(move || {
        let r = vcpu.run(&Recorder::default(), &c2);
        (r.map_err(|e| e.to_string()), vcpu.stats())
    });
    std::thread::sleep(Duration::from_millis(100));
    control.stop();
    kick(&t).unwrap();
    let (r, stats) = t.join().unwrap();
    assert_eq!(r, Ok(VcpuStop::Stopped));
    assert!(stats.interrupted >= 1);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_kicked_vcpu_parks_while_paused_and_resumes() {
    install_kick_handler().unwrap();
    // out 0x80, al; jmp back: a port exit on every iteration, so parking happens both after
    // a kick and after a handled exit.
    let (_vm, mut vcpu, _mem) = vm_with_code(&[0xe6, 0x80, 0xeb, 0xfc]);
    let rec = std::sync::Arc::new(Recorder::default());
    let control = VcpuControl::new();
    let (c2, r2) = (control.clone(), rec.clone());
    let counters = vcpu.counters();
    let t = std::thread::spawn(move || {
        let r = vcpu.run(&*r2, &c2);
        (r.map_err(|e| e.to_string()), vcpu.stats())
    });
    let outs = || rec.log.lock().unwrap().len();
    while outs() < 10 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // The live counters follow the exits while the vCPU runs.
    assert!(
        counters.snapshot().pio_exits >= 10,
        "{:?}",
        counters.snapshot()
    );
    control.request_pause();
    kick(&t).unwrap();
    assert!(control.wait_parked(Duration::from_secs(10)));
    assert_eq!((control.live(), control.parked()), (1, 1));
    let paused_at = outs();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(outs(), paused_at, "no exit while parked");
    control.resume();
    while outs() < paused_at + 10 {
        std::thread::sleep(Duration::from_millis(1));
    }
    control.request_pause();
    kick(&t).unwrap();
    assert!(control.wait_parked(Duration::from_secs(10)));
    // A stop wakes the parked vCPU.
    control.stop();
    let (r, _stats) = t.join().unwrap();
    assert_eq!(r, Ok(VcpuStop::Stopped));
    assert_eq!(control.live(), 0);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_stop_before_run_never_enters_the_guest() {
    let (_vm, mut vcpu, _mem) = vm_with_code(&[0xe6, 0x80, 0xf4]); // out 0x80, al; hlt
    let control = VcpuControl::new();
    control.stop();
    let rec = Recorder::default();
    assert_eq!(vcpu.run(&rec, &control).unwrap(), VcpuStop::Stopped);
    assert!(rec.log.lock().unwrap().is_empty());
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn triple_fault_is_reported() {
    // Load an empty IDT, then raise an exception: #UD → no handler → triple fault.
    let code = [
        0x0f, 0x01, 0x1d, 0x00, 0x40, 0x00, 0x00, // lidt [0x4000] (limit 0)
        0x0f, 0x0b, // ud2
    ];
    let (_vm, mut vcpu, mem) = vm_with_code(&code);
    mem.write_slice(&[0u8; 6], GuestAddress(0x4000)).unwrap();
    let stop = vcpu.run(&Recorder::default(), &VcpuControl::new());
    match stop {
        Ok(s) => assert_eq!(s, VcpuStop::TripleFault),
        // An emulating host may report the fault as an internal error instead; it must be
        // an error, never a hang or a panic.
        Err(e) => assert!(matches!(e, Error::InternalError { .. }), "{e}"),
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn pvm_template_reaches_the_vcpu_and_keeps_cr4_consistent() {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let mem = vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig::new(2 << 20)).unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let template = CpuidTemplate::from_kvm(&kvm).unwrap();
    let cfg = CpuidConfig {
        num_cpus: 1,
        masks: CpuTemplate::Pvm.masks(),
    };
    fd.set_cpuid2(&template.for_vcpu(0, &cfg).unwrap()).unwrap();
    // A masked bit that KVM lists as supported is hidden in what the vCPU reports. (Bits
    // outside the supported set may still show on some hosts — kvm_pvm passes the host's
    // through —, which is what `still_visible` reports.)
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let effective = fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).unwrap();
    let reg = |e: &kvm_bindings::kvm_cpuid_entry2, r: CpuidReg| match r {
        CpuidReg::Eax => e.eax,
        CpuidReg::Ebx => e.ebx,
        CpuidReg::Ecx => e.ecx,
        CpuidReg::Edx => e.edx,
    };
    let mut checked = 0;
    for m in CpuTemplate::Pvm.masks() {
        let applies = |e: &&kvm_bindings::kvm_cpuid_entry2| {
            e.function == m.leaf && m.subleaf.is_none_or(|s| s == e.index)
        };
        for s in supported.as_slice().iter().filter(applies) {
            let bits = reg(s, m.reg) & m.clear;
            if bits == 0 {
                continue;
            }
            let e = effective
                .as_slice()
                .iter()
                .find(|e| e.function == s.function && e.index == s.index)
                .expect("the vCPU reports every leaf it was given");
            assert_eq!(
                reg(e, m.reg) & bits,
                0,
                "leaf {:#x}.{} {:?} bits {bits:#x} supported, masked, still shown",
                s.function,
                s.index,
                m.reg
            );
            checked += 1;
        }
    }
    eprintln!(
        "{checked} supported feature bits hidden; visible despite the template: {:?}",
        CpuTemplate::Pvm.still_visible(effective.as_slice())
    );
    setup_entry(
        &fd,
        &mem,
        vmkit_boot::EntryPoint::Linux64 {
            entry: GuestAddress(0x1000),
            boot_params: GuestAddress(0x7000),
        },
    )
    .unwrap();
    restrict_cr4(&fd, CpuTemplate::Pvm).unwrap();
    let cr4 = fd.get_sregs().unwrap().cr4;
    assert_eq!(cr4 & CpuTemplate::Pvm.cr4_clear(), 0, "cr4 {cr4:#x}");
    assert_ne!(
        cr4 & (1 << 5),
        0,
        "PAE stays for the 64-bit entry: cr4 {cr4:#x}"
    );
}
