//! The `ioctl` requests each thread kind may issue, computed from the kernel's encoding
//! (vmm-sys-util's `ioctl_*_nr!` macros, kvm-bindings' structures for the sizes).

#![allow(non_snake_case)]

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_fpu, kvm_ioeventfd,
    kvm_irq_level, kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msi,
    kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use crate::ThreadKind;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);

ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);

ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);

/// The TUN driver's ioctl type (`'T'`).
const TUNIO: u32 = b'T' as u32;
ioctl_iow_nr!(TUNSETOFFLOAD, TUNIO, 208, libc::c_uint);
ioctl_iow_nr!(TUNSETQUEUE, TUNIO, 217, libc::c_int);

/// One `ioctl` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ioctl {
    /// The kernel's name for it.
    pub name: &'static str,
    /// Its number (the second argument of `ioctl(2)`).
    pub request: u64,
}

// `c_ulong` is 32 bits on some targets.
#[allow(clippy::useless_conversion)]
fn ioctl(name: &'static str, request: libc::c_ulong) -> Ioctl {
    Ioctl {
        name,
        request: u64::from(request),
    }
}

/// KVM requests on the VM's fd that raise interrupts or move doorbells: a device, or the
/// guest reprogramming a PCI BAR or an MSI-X vector, may do any of them.
fn interrupts() -> Vec<Ioctl> {
    vec![
        ioctl("KVM_IRQ_LINE", KVM_IRQ_LINE()),
        ioctl("KVM_SIGNAL_MSI", KVM_SIGNAL_MSI()),
        ioctl("KVM_IRQFD", KVM_IRQFD()),
        ioctl("KVM_IOEVENTFD", KVM_IOEVENTFD()),
        ioctl("KVM_SET_GSI_ROUTING", KVM_SET_GSI_ROUTING()),
    ]
}

/// The vCPU state reads of a snapshot: a paused vCPU reads its own state on its thread
/// (vmkit-kvm's `VcpuThreads::save_states`, after a `KVM_RUN` with `immediate_exit`).
fn vcpu_state() -> Vec<Ioctl> {
    vec![
        ioctl("KVM_GET_CPUID2", KVM_GET_CPUID2()),
        ioctl("KVM_GET_REGS", KVM_GET_REGS()),
        ioctl("KVM_GET_SREGS", KVM_GET_SREGS()),
        ioctl("KVM_GET_FPU", KVM_GET_FPU()),
        ioctl("KVM_GET_XSAVE2", KVM_GET_XSAVE2()),
        ioctl("KVM_GET_XCRS", KVM_GET_XCRS()),
        ioctl("KVM_GET_MSRS", KVM_GET_MSRS()),
        ioctl("KVM_GET_LAPIC", KVM_GET_LAPIC()),
        ioctl("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS()),
        ioctl("KVM_GET_MP_STATE", KVM_GET_MP_STATE()),
        ioctl("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS()),
        ioctl("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ()),
    ]
}

/// The VM-wide state reads of a snapshot, on the VMM thread while the VM is paused: the
/// irqchip, the PIT, the clock, and the pages written since the last snapshot.
fn vm_state() -> Vec<Ioctl> {
    vec![
        ioctl("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP()),
        ioctl("KVM_GET_PIT2", KVM_GET_PIT2()),
        ioctl("KVM_GET_CLOCK", KVM_GET_CLOCK()),
        ioctl("KVM_GET_DIRTY_LOG", KVM_GET_DIRTY_LOG()),
    ]
}

/// The TAP requests a virtio-net device makes when the guest activates it or changes its
/// queues and offloads.
fn tap() -> Vec<Ioctl> {
    vec![
        ioctl("TUNSETOFFLOAD", TUNSETOFFLOAD()),
        ioctl("TUNSETQUEUE", TUNSETQUEUE()),
    ]
}

/// The `ioctl` requests `kind` may issue.
pub fn ioctls(kind: ThreadKind) -> Vec<Ioctl> {
    let fionbio = ioctl("FIONBIO", libc::FIONBIO as libc::c_ulong);
    match kind {
        ThreadKind::Vcpu => {
            let mut v = vec![ioctl("KVM_RUN", KVM_RUN())];
            v.extend(vcpu_state());
            v.extend(interrupts());
            v.extend(tap());
            v.push(fionbio);
            v
        }
        ThreadKind::Vmm => {
            let mut v = interrupts();
            v.extend(vm_state());
            v.extend(tap());
            v.extend([
                ioctl("TCGETS", libc::TCGETS as libc::c_ulong),
                ioctl("TCSETS", libc::TCSETS as libc::c_ulong),
                fionbio,
            ]);
            v
        }
        ThreadKind::Api => vec![fionbio],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_numbers_are_the_kernels() {
        // From the kernel's headers (include/uapi/linux/kvm.h, if_tun.h) on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_IRQ_LINE(), 0x4008_ae61);
        assert_eq!(KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_ae83);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
        assert_eq!(KVM_GET_FPU(), 0x81a0_ae8c);
        assert_eq!(KVM_GET_LAPIC(), 0x8400_ae8e);
        assert_eq!(KVM_GET_CPUID2(), 0xc008_ae91);
        assert_eq!(KVM_GET_MP_STATE(), 0x8004_ae98);
        assert_eq!(KVM_GET_VCPU_EVENTS(), 0x8040_ae9f);
        assert_eq!(KVM_GET_DEBUGREGS(), 0x8080_aea1);
        assert_eq!(KVM_GET_TSC_KHZ(), 0xaea3);
        assert_eq!(KVM_GET_XCRS(), 0x8188_aea6);
        assert_eq!(KVM_GET_XSAVE2(), 0x9000_aecf);
        assert_eq!(KVM_GET_DIRTY_LOG(), 0x4010_ae42);
        assert_eq!(KVM_GET_IRQCHIP(), 0xc208_ae62);
        assert_eq!(KVM_GET_CLOCK(), 0x8030_ae7c);
        assert_eq!(KVM_GET_PIT2(), 0x8070_ae9f);
        assert_eq!(TUNSETOFFLOAD(), libc::TUNSETOFFLOAD as libc::c_ulong);
        assert_eq!(TUNSETQUEUE(), libc::TUNSETQUEUE as libc::c_ulong);
    }

    #[test]
    fn only_vcpus_run_the_guest() {
        let runs = |k| ioctls(k).iter().any(|i| i.name == "KVM_RUN");
        assert!(runs(ThreadKind::Vcpu));
        assert!(!runs(ThreadKind::Vmm));
        assert!(!runs(ThreadKind::Api));
        assert!(ioctls(ThreadKind::Api).iter().all(|i| i.name == "FIONBIO"));
    }
}
