//! Saving a vCPU's state and restoring it into a fresh VM on this host's KVM, with a few
//! bytes of 32-bit guest code. Reported as ignored where there is no /dev/kvm.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmkit_vcpu::*;

const RAM: u64 = 2 << 20;

/// `in al, 0x80; mov [0x3000], al`, then a loop: `inc dword [0x2000]; mov eax, [0x2000];
/// out 0x80, eax; jmp loop`.
const CODE: [u8; 22] = [
    0xe4, 0x80, // in al, 0x80
    0xa2, 0x00, 0x30, 0x00, 0x00, // mov [0x3000], al
    0xff, 0x05, 0x00, 0x20, 0x00, 0x00, // loop: inc dword [0x2000]
    0xa1, 0x00, 0x20, 0x00, 0x00, // mov eax, [0x2000]
    0xe7, 0x80, // out 0x80, eax
    0xeb, 0xf1, // jmp loop
];

struct Vm<M> {
    _vm: VmFd,
    fd: VcpuFd,
    mem: M,
    msrs: Vec<u32>,
}

/// A VM with an in-kernel irqchip and one vCPU set up as vmkit-kvm does; with `entry`, it
/// starts at the code (a fresh VM for a restore gets no entry state).
fn vm(kvm: &Kvm, entry: bool) -> Vm<impl GuestMemoryBackend> {
    vm_with(kvm, entry.then_some(&CODE[..]))
}

/// [`vm`] with `code` at the entry, or no entry state.
fn vm_with(kvm: &Kvm, code: Option<&[u8]>) -> Vm<impl GuestMemoryBackend> {
    let vm = kvm.create_vm().unwrap();
    let mem = vmkit_memory::create_guest_memory(&vmkit_memory::MemoryConfig::new(RAM)).unwrap();
    let slots = vmkit_memory::register_memory_slots(&vm, &mem).unwrap();
    std::mem::forget(slots); // lives as long as the test process; `mem` keeps the mapping too
    vm.create_irq_chip().unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let template = CpuidTemplate::from_kvm(kvm).unwrap();
    let cfg = CpuidConfig {
        num_cpus: 1,
        masks: vec![],
    };
    fd.set_cpuid2(&template.for_vcpu(0, &cfg).unwrap()).unwrap();
    let msrs = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
    setup_msrs(&fd, &msrs).unwrap();
    setup_fpu(&fd).unwrap();
    setup_lint(&fd).unwrap();
    if let Some(code) = code {
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let pvh = vmkit_boot::EntryPoint::Pvh {
            entry: GuestAddress(0x1000),
            start_info: GuestAddress(0x6000),
        };
        setup_entry(&fd, &mem, pvh).unwrap();
    }
    Vm {
        _vm: vm,
        fd,
        mem,
        msrs,
    }
}

/// Makes a state hostile in one way.
type Breaker = fn(&mut VcpuState);

/// Runs until the next `out 0x80` and returns its value.
fn next_out(fd: &mut VcpuFd) -> u32 {
    match fd.run().unwrap() {
        VcpuExit::IoOut(0x80, data) => u32::from_le_bytes(data.try_into().unwrap()),
        other => panic!("unexpected exit {other:?}"),
    }
}

/// Copies guest RAM from `from` to `to` (what the memory file does for a VM).
fn copy_ram(from: &impl GuestMemoryBackend, to: &impl GuestMemoryBackend) {
    let mut buf = vec![0u8; RAM as usize];
    from.read_slice(&mut buf, GuestAddress(0)).unwrap();
    to.write_slice(&buf, GuestAddress(0)).unwrap();
}

/// The state minus what moves while nobody looks (the TSC).
fn steady(s: &VcpuState) -> VcpuState {
    let mut s = s.clone();
    s.msrs.retain(|m| m.index != 0x10);
    s
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_restored_vcpu_continues_where_it_was_saved() {
    let kvm = Kvm::new().unwrap();
    let mut a = vm(&kvm, true);
    // The `in`: its value reaches AL only on the next KVM_RUN, which the save completes.
    match a.fd.run().unwrap() {
        VcpuExit::IoIn(0x80, data) => data[0] = 0x42,
        other => panic!("unexpected exit {other:?}"),
    }
    complete_pending_io(&mut a.fd).unwrap();
    let after_in = save_state(&a.fd, &a.msrs).unwrap();
    assert_eq!(after_in.regs.rax & 0xff, 0x42, "the pending `in` completed");
    assert_eq!(after_in.regs.rip, 0x1002, "and nothing more ran");
    assert_eq!(
        (1..=3).map(|_| next_out(&mut a.fd)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    complete_pending_io(&mut a.fd).unwrap();
    let saved = save_state(&a.fd, &a.msrs).unwrap();
    saved.validate().unwrap();
    assert_eq!(
        saved.msrs.len(),
        a.msrs.len(),
        "every listed MSR reads on this host"
    );
    assert!(saved.xsave.len() >= 1024);
    CpuIdentity::host(&kvm)
        .unwrap()
        .check_compatible(&saved.cpuid)
        .unwrap();

    let mut b = vm(&kvm, false);
    // The restoring VM's own vCPU answers the same question without a scratch VM.
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    CpuIdentity::of_vcpu(supported.as_slice(), &b.fd)
        .unwrap()
        .check_compatible(&saved.cpuid)
        .unwrap();
    copy_ram(&a.mem, &b.mem);
    restore_state(&b.fd, &saved).unwrap();
    let read_back = save_state(&b.fd, &b.msrs).unwrap();
    assert_eq!(
        steady(&read_back),
        steady(&saved),
        "the state reads back equal"
    );
    assert_eq!((next_out(&mut b.fd), next_out(&mut b.fd)), (4, 5));
    assert_eq!(b.mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0x42);
    // The original goes on independently.
    assert_eq!(next_out(&mut a.fd), 4);
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn hostile_states_are_refused_with_an_error() {
    let kvm = Kvm::new().unwrap();
    let mut a = vm(&kvm, true);
    let _ = a.fd.run().unwrap();
    complete_pending_io(&mut a.fd).unwrap();
    let good = save_state(&a.fd, &a.msrs).unwrap();
    let b = vm(&kvm, false);
    let cases: [(&str, Breaker); 4] = [
        ("invalid vCPU state: unknown MP state", |s| {
            s.mp_state.mp_state = 99
        }),
        // Paging without protection: KVM refuses the control registers.
        ("cannot restore the vCPU's special registers", |s| {
            s.sregs.cr0 = 1 << 31
        }),
        ("invalid vCPU state: XSAVE area of 65536 bytes", |s| {
            s.xsave = vec![0; 16384]
        }),
        ("KVM refused to set MSR 0xdeadbeef", |s| {
            s.msrs.push(MsrEntry {
                index: 0xdead_beef,
                data: 0,
            })
        }),
    ];
    for (what, break_it) in cases {
        let mut s = good.clone();
        break_it(&mut s);
        let e = restore_state(&b.fd, &s).unwrap_err().to_string();
        assert!(e.starts_with(what), "{what}: {e}");
    }
}

/// The TSC deadline MSR of a state (0 when absent).
fn tsc_deadline(s: &VcpuState) -> u64 {
    s.msrs
        .iter()
        .find(|m| m.index == 0x6e0)
        .map_or(0, |m| m.data)
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn an_armed_tsc_deadline_timer_survives_the_restore() {
    // The LAPIC timer in TSC-deadline mode, armed far ahead (the TSC + 2^40), then an `out`:
    let code = [
        0xc7, 0x05, 0xf0, 0x00, 0xe0, 0xfe, 0xff, 0x01, 0x00, 0x00, // mov [SVR], 0x1ff
        0xc7, 0x05, 0x20, 0x03, 0xe0, 0xfe, 0x40, 0x00, 0x04, 0x00, // mov [LVTT], 0x40040
        0x0f, 0x31, // rdtsc
        0x81, 0xc2, 0x00, 0x01, 0x00, 0x00, // add edx, 0x100
        0xb9, 0xe0, 0x06, 0x00, 0x00, // mov ecx, 0x6e0
        0x0f, 0x30, // wrmsr
        0xe7, 0x80, // out 0x80, eax
        0xeb, 0xfc, // jmp to the out
    ];
    let kvm = Kvm::new().unwrap();
    let mut a = vm_with(&kvm, Some(&code));
    next_out(&mut a.fd);
    complete_pending_io(&mut a.fd).unwrap();
    let saved = save_state(&a.fd, &a.msrs).unwrap();
    assert_ne!(tsc_deadline(&saved), 0, "the guest armed the timer");
    let b = vm_with(&kvm, None);
    restore_state(&b.fd, &saved).unwrap();
    let back = save_state(&b.fd, &b.msrs).unwrap();
    assert_eq!(
        tsc_deadline(&back),
        tsc_deadline(&saved),
        "the deadline is set again once the LAPIC is in deadline mode"
    );
}
