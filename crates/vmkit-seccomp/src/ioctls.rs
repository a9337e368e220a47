//! The `ioctl` requests each thread kind may issue, computed from the kernel's encoding
//! (vmm-sys-util's `ioctl_*_nr!` macros, kvm-bindings' structures for the sizes).

#![allow(non_snake_case)]

use kvm_bindings::{kvm_ioeventfd, kvm_irq_level, kvm_irq_routing, kvm_irqfd, kvm_msi, KVMIO};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

use crate::ThreadKind;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);

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
            v.extend(interrupts());
            v.extend(tap());
            v.push(fionbio);
            v
        }
        ThreadKind::Vmm => {
            let mut v = interrupts();
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
