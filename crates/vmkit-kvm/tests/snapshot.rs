//! vCPU and irqchip state on this host's KVM: saved from paused vCPUs on their own threads
//! (under the vCPU seccomp filter too), restored into a fresh VM started paused, and the
//! guest continuing there. Reported as ignored where there is no /dev/kvm.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmkit_boot::EntryPoint;
use vmkit_kvm::{Machine, MachineConfig, VcpuConfig, Vcpus};
use vmkit_vcpu::CpuTemplate;

const RAM: u64 = 64 << 20;
const COUNTER: GuestAddress = GuestAddress(0x20_0000);

/// 32-bit code at 1 MiB: `loop: inc ebx; mov [0x200000], ebx; out 0x80, al; jmp loop`. The
/// count lives in EBX: memory only mirrors it, so a restored vCPU that counts on from the
/// saved value got its registers.
const CODE: [u8; 11] = [
    0x43, // inc ebx
    0x89, 0x1d, 0x00, 0x00, 0x20, 0x00, // mov [0x200000], ebx
    0xe6, 0x80, // out 0x80, al
    0xeb, 0xf5, // jmp loop
];

fn machine() -> Machine {
    Machine::new(&MachineConfig::new(RAM)).expect("a VM on this host's KVM")
}

fn vcpus(m: &Machine, count: u32) -> Vcpus {
    let config = VcpuConfig {
        count,
        template: CpuTemplate::Host,
    };
    Vcpus::create(m.kvm(), m.vm(), &config).unwrap()
}

fn load_code(m: &Machine, vcpus: &Vcpus) {
    let entry = GuestAddress(0x10_0000);
    m.memory().write_slice(&CODE, entry).unwrap();
    let pvh = EntryPoint::Pvh {
        entry,
        start_info: GuestAddress(0x6000),
    };
    vcpus.set_entry(m.memory(), pvh).unwrap();
}

fn counter(m: &Machine) -> u32 {
    m.memory().read_obj::<u32>(COUNTER).unwrap()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Guest RAM from `a` into `b`, as the memory file carries it.
fn copy_ram(a: &Machine, b: &Machine) {
    let mut buf = vec![0u8; RAM as usize];
    a.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
    b.memory().write_slice(&buf, GuestAddress(0)).unwrap();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn saved_vcpus_continue_in_a_fresh_vm_started_paused() {
    let a = machine();
    let vcpus_a = vcpus(&a, 2);
    load_code(&a, &vcpus_a);
    let threads_a = vcpus_a.start(a.bus().clone(), a.exit().clone()).unwrap();
    wait_for("the guest never counted", || counter(&a) > 100);
    let e = threads_a.save_states().unwrap_err();
    assert_eq!(
        e.to_string(),
        "the vCPUs must be paused to save their state"
    );
    threads_a.pause(Duration::from_secs(10)).unwrap();
    let states = threads_a.save_states().unwrap();
    assert_eq!(states.len(), 2);
    let saved = states[0].regs.rbx as u32;
    assert_eq!(counter(&a), saved, "memory mirrors EBX at every exit");
    assert_eq!(
        states[1].mp_state.mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
        "vCPU 1 still waits for INIT/SIPI"
    );
    let irqchip = a.lock_irqchip().save_state(a.vm()).unwrap();

    let b = machine();
    let vcpus_b = vcpus(&b, 2);
    copy_ram(&a, &b);
    b.memory().write_obj(0u32, COUNTER).unwrap();
    b.lock_irqchip().restore_state(b.vm(), &irqchip).unwrap();
    vcpus_b.restore_states(&states).unwrap();
    let threads_b = vcpus_b
        .prepare_with(b.bus().clone(), b.exit().clone(), Arc::new(|_| Ok(())))
        .unwrap()
        .run_paused();
    assert!(threads_b.is_paused());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&b), 0, "a VM started paused ran guest code");
    let again = threads_b.save_states().unwrap();
    assert_eq!(
        again[0].regs, states[0].regs,
        "the restored registers read back"
    );
    threads_b.resume();
    wait_for("the restored guest never counted", || counter(&b) != 0);
    assert!(
        counter(&b) > saved,
        "the restored vCPU counts on from {saved}, not from 0: {}",
        counter(&b)
    );
    // The original, still paused, has not moved.
    assert_eq!(counter(&a), saved);
    threads_b.pause(Duration::from_secs(10)).unwrap();
    assert!(threads_b.stop().iter().all(Option::is_some));
    assert!(threads_a.stop().iter().all(Option::is_some));
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn a_restore_needs_as_many_states_as_vcpus() {
    let a = machine();
    let two = vcpus(&a, 2);
    load_code(&a, &two);
    let threads = two.start(a.bus().clone(), a.exit().clone()).unwrap();
    wait_for("the guest never counted", || counter(&a) > 0);
    threads.pause(Duration::from_secs(10)).unwrap();
    let states = threads.save_states().unwrap();
    threads.stop();
    let b = machine();
    let one = vcpus(&b, 1);
    assert_eq!(
        one.restore_states(&states).unwrap_err().to_string(),
        "the snapshot has 2 vCPUs, this VM 1"
    );
    let mut hostile = states[..1].to_vec();
    hostile[0].xsave.clear();
    let e = one.restore_states(&hostile).unwrap_err().to_string();
    assert!(
        e.starts_with("cannot restore vCPU 0: invalid vCPU state: XSAVE"),
        "{e}"
    );
}

/// The variable that makes [`seccomp_child`] run in a re-executed test binary (a seccomp
/// filter cannot be removed: never in the test process itself).
const CHILD: &str = "VMKIT_KVM_SECCOMP_CHILD";

/// In a child: vCPU threads under vmkit-seccomp's vCPU filter at `kill` level; pauses and
/// saves their states. A call outside the filter kills the process with SIGSYS.
#[test]
fn seccomp_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let options = vmkit_seccomp::Options::default();
    assert_eq!(options.level, vmkit_seccomp::SeccompLevel::Kill);
    let program = vmkit_seccomp::filter(vmkit_seccomp::ThreadKind::Vcpu, &options)
        .unwrap()
        .unwrap();
    let m = machine();
    let vcpus = vcpus(&m, 2);
    load_code(&m, &vcpus);
    let prologue = Arc::new(move |_: u32| {
        vmkit_seccomp::set_no_new_privs().map_err(|e| e.to_string())?;
        vmkit_seccomp::apply(&program).map_err(|e| e.to_string())
    });
    let threads = vcpus
        .start_with(m.bus().clone(), m.exit().clone(), prologue)
        .unwrap();
    wait_for("the guest never counted", || counter(&m) > 0);
    threads.pause(Duration::from_secs(10)).unwrap();
    let states = threads.save_states().unwrap();
    println!("child: saved {} vCPU states", states.len());
    threads.stop();
}

#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn save_states_runs_under_the_vcpu_seccomp_filter() {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("child: saved 2 vCPU states"),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
