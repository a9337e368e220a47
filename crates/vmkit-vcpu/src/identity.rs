//! Whether a saved vCPU can run on this host: the CPU vendor and the CPUID features the
//! guest was shown, against what this host's KVM supports.

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::cpuid::CpuidReg;
use crate::{Error, Result};

use CpuidReg::{Eax, Ebx, Ecx, Edx};

/// The feature words compared: (leaf, sub-leaf, register). Leaf 0xD.0 EAX/EDX are the XSAVE
/// components (XCR0 bits) the guest may enable.
const FEATURE_WORDS: [(u32, u32, CpuidReg); 10] = [
    (0x1, 0, Ecx),
    (0x1, 0, Edx),
    (0x7, 0, Ebx),
    (0x7, 0, Ecx),
    (0x7, 0, Edx),
    (0xd, 0, Eax),
    (0xd, 0, Edx),
    (0x8000_0001, 0, Ecx),
    (0x8000_0001, 0, Edx),
    // Leaf 0xD.1 EAX: XSAVEOPT/XSAVEC/XGETBV1/XSAVES.
    (0xd, 1, Eax),
];

/// Bits a vCPU's CPUID shows that are not features KVM "supports": set by the VMM for the
/// topology (HTT, hypervisor) or by KVM from the vCPU's own state (OSXSAVE and OSPKE follow
/// CR4, APIC follows `IA32_APIC_BASE`).
fn dynamic_bits(leaf: u32, subleaf: u32, reg: CpuidReg) -> u32 {
    match (leaf, subleaf, reg) {
        // OSXSAVE (27), hypervisor (31).
        (0x1, 0, Ecx) => (1 << 27) | (1 << 31),
        // APIC (9), HTT (28).
        (0x1, 0, Edx) => (1 << 9) | (1 << 28),
        // OSPKE (4).
        (0x7, 0, Ecx) => 1 << 4,
        // AMD's mirror of the APIC bit.
        (0x8000_0001, 0, Edx) => 1 << 9,
        _ => 0,
    }
}

/// Leaves whose sub-leaf (ECX input) matters among the compared ones.
fn indexed(leaf: u32) -> bool {
    matches!(leaf, 0x7 | 0xd)
}

fn reg_value(e: &kvm_cpuid_entry2, reg: CpuidReg) -> u32 {
    match reg {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && (!indexed(leaf) || e.index == subleaf))
}

fn vendor_of(entries: &[kvm_cpuid_entry2]) -> Option<String> {
    let e = find(entries, 0, 0)?;
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// One compared CPUID register of the host: the features KVM supports there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidWord {
    /// The leaf.
    pub leaf: u32,
    /// The sub-leaf.
    pub subleaf: u32,
    /// The register.
    pub reg: CpuidReg,
    /// Its supported bits.
    pub value: u32,
}

/// This host's CPU as KVM offers it to guests: its vendor, the feature words a restored
/// guest may rely on (leaf 1 ECX/EDX, leaf 7.0 EBX/ECX/EDX, 0xD.0 EAX/EDX and 0xD.1 EAX,
/// 0x80000001 ECX/EDX) and the largest XSAVE area (leaf 0xD.0 ECX).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuIdentity {
    /// The vendor string of CPUID leaf 0 ("GenuineIntel", "AuthenticAMD").
    pub vendor: String,
    /// The supported bits of each compared register.
    pub features: Vec<CpuidWord>,
    /// The XSAVE area size for every supported component, in bytes (leaf 0xD.0 ECX).
    pub xsave_size: u32,
}

impl CpuIdentity {
    /// This host's: `KVM_GET_SUPPORTED_CPUID`, widened by what a vCPU given exactly that
    /// reads back (`KVM_GET_CPUID2` on a scratch VM). Where KVM emulates guest kernel mode
    /// (kvm_pvm) the processor's own bits pass through beyond the supported set, so a saved
    /// CPUID holds them too; on hardware-assisted KVM the read-back adds only the dynamic
    /// bits, which are not compared. The scratch VM needs `KVM_CREATE_VM`: call this before
    /// a seccomp filter forbids it.
    pub fn host(kvm: &Kvm) -> Result<Self> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        let mut id = Self::from_supported(supported.as_slice());
        let vm = kvm.create_vm().map_err(Error::ScratchVm)?;
        let vcpu = vm.create_vcpu(0).map_err(Error::ScratchVm)?;
        vcpu.set_cpuid2(&supported).map_err(Error::VcpuCpuid)?;
        let effective = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::VcpuCpuid)?;
        id.widen(effective.as_slice());
        Ok(id)
    }

    /// This host's, without a scratch VM: the supported list widened by what `vcpu` (a vCPU
    /// of the VM being built, its CPUID set from `supported` through a CPU template) reads
    /// back. Checked against a snapshot taken with the same template, it answers the same
    /// question as [`host`](Self::host) — can this host's KVM show the saved bits — at the
    /// cost of one `KVM_GET_CPUID2`.
    pub fn of_vcpu(supported: &[kvm_cpuid_entry2], vcpu: &VcpuFd) -> Result<Self> {
        let mut id = Self::from_supported(supported);
        let effective = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::VcpuCpuid)?;
        id.widen(effective.as_slice());
        Ok(id)
    }

    /// Adds the feature bits of `entries` (a vCPU's effective CPUID) to the compared ones.
    fn widen(&mut self, entries: &[kvm_cpuid_entry2]) {
        for word in &mut self.features {
            if let Some(e) = find(entries, word.leaf, word.subleaf) {
                word.value |= reg_value(e, word.reg);
            }
        }
    }

    /// The identity of a supported-CPUID list (for tests, or a CPU model).
    pub fn from_supported(entries: &[kvm_cpuid_entry2]) -> Self {
        let features = FEATURE_WORDS
            .iter()
            .map(|&(leaf, subleaf, reg)| CpuidWord {
                leaf,
                subleaf,
                reg,
                value: find(entries, leaf, subleaf).map_or(0, |e| reg_value(e, reg)),
            })
            .collect();
        Self {
            vendor: vendor_of(entries).unwrap_or_default(),
            features,
            xsave_size: find(entries, 0xd, 0).map_or(0, |e| e.ecx),
        }
    }

    /// Whether a vCPU saved with CPUID `saved` (a [`VcpuState::cpuid`](crate::VcpuState))
    /// can run here: the same vendor, no compared feature bit this host lacks, an XSAVE area
    /// no larger. The error names the first leaf, register and bit that differ.
    pub fn check_compatible(&self, saved: &[kvm_cpuid_entry2]) -> Result<()> {
        let vendor = vendor_of(saved)
            .ok_or_else(|| Error::InvalidState("the saved CPUID has no leaf 0 (vendor)".into()))?;
        if vendor != self.vendor {
            return Err(Error::CpuVendor {
                saved: vendor,
                host: self.vendor.clone(),
            });
        }
        for word in &self.features {
            let Some(e) = find(saved, word.leaf, word.subleaf) else {
                continue;
            };
            let missing = reg_value(e, word.reg)
                & !word.value
                & !dynamic_bits(word.leaf, word.subleaf, word.reg);
            if missing != 0 {
                return Err(Error::CpuFeature {
                    leaf: word.leaf,
                    subleaf: word.subleaf,
                    reg: word.reg,
                    bit: missing.trailing_zeros(),
                });
            }
        }
        let saved_xsave = find(saved, 0xd, 0).map_or(0, |e| e.ecx);
        if saved_xsave > self.xsave_size {
            return Err(Error::XsaveSize {
                saved: saved_xsave,
                host: self.xsave_size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::tests::entry;

    const INTEL: [u32; 3] = [0x756e_6547, 0x6c65_746e, 0x4965_6e69]; // EBX, ECX, EDX

    fn supported() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0xd, INTEL[0], INTEL[1], INTEL[2]]),
            entry(1, 0, [0x806f8, 0, 0x0000_0201, 0x0000_0001]),
            entry(7, 0, [0, 0x0000_0009, 0, 0]),
            entry(0xd, 0, [0x7, 0x240, 0x340, 0]),
            entry(0x8000_0001, 0, [0, 0, 0x1, 0x2000_0000]),
        ]
    }

    #[test]
    fn the_host_identity_reads_vendor_words_and_xsave_size() {
        let id = CpuIdentity::from_supported(&supported());
        assert_eq!(id.vendor, "GenuineIntel");
        assert_eq!(id.xsave_size, 0x340);
        let word = |leaf, subleaf, reg| {
            id.features
                .iter()
                .find(|w| (w.leaf, w.subleaf, w.reg) == (leaf, subleaf, reg))
                .unwrap()
                .value
        };
        assert_eq!(word(1, 0, Ecx), 0x201);
        assert_eq!(word(7, 0, Ebx), 0x9);
        assert_eq!(word(0xd, 0, Eax), 0x7);
        assert_eq!(word(0xd, 1, Eax), 0, "absent leaves support nothing");
    }

    #[test]
    fn a_subset_with_vmm_and_dynamic_bits_is_compatible() {
        let id = CpuIdentity::from_supported(&supported());
        let mut saved = supported();
        saved[1].ecx = 0x1 | (1 << 27) | (1 << 31); // fewer features, OSXSAVE, hypervisor
        saved[1].edx |= (1 << 9) | (1 << 28); // APIC, HTT
        saved[2].ecx |= 1 << 4; // OSPKE
        id.check_compatible(&saved).unwrap();
    }

    #[test]
    fn another_vendor_is_refused() {
        let id = CpuIdentity::from_supported(&supported());
        let mut saved = supported();
        // "AuthenticAMD"
        saved[0] = entry(0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]);
        let e = id.check_compatible(&saved).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the snapshot's CPU vendor is \"AuthenticAMD\", this host's is \"GenuineIntel\""
        );
        assert!(id.check_compatible(&saved[1..]).is_err(), "no leaf 0");
    }

    #[test]
    fn a_missing_feature_bit_is_named() {
        let id = CpuIdentity::from_supported(&supported());
        for (i, set, leaf, reg, bit) in [
            (1, (0, 0, 1 << 13, 0), 1, Ecx, 13),
            (2, (0, 1 << 5, 0, 0), 7, Ebx, 5),
            (2, (0, 0, 0, 1 << 4), 7, Edx, 4),
            (3, (1 << 9, 0, 0, 0), 0xd, Eax, 9),
            (4, (0, 0, 0, 1 << 11), 0x8000_0001, Edx, 11),
        ] {
            let mut saved = supported();
            saved[i].eax |= set.0;
            saved[i].ebx |= set.1;
            saved[i].ecx |= set.2;
            saved[i].edx |= set.3;
            match id.check_compatible(&saved) {
                Err(Error::CpuFeature {
                    leaf: l,
                    reg: r,
                    bit: b,
                    ..
                }) => assert_eq!((l, r, b), (leaf, reg, bit)),
                other => panic!("{leaf:#x} {reg:?} {bit}: {other:?}"),
            }
        }
        let mut saved = supported();
        saved[1].ecx |= 1 << 13;
        assert_eq!(
            id.check_compatible(&saved).unwrap_err().to_string(),
            "the snapshot's CPU has CPUID leaf 0x1.0 Ecx bit 13, which this host's KVM does not support"
        );
    }

    #[test]
    fn widening_adds_the_bits_a_vcpu_reads_back() {
        let mut id = CpuIdentity::from_supported(&supported());
        let mut saved = supported();
        saved[1].ecx |= 1 << 13; // CX16, passed through beyond the supported set
        assert!(id.check_compatible(&saved).is_err());
        id.widen(&saved);
        id.check_compatible(&saved).unwrap();
    }

    #[test]
    fn a_larger_xsave_area_is_refused() {
        let id = CpuIdentity::from_supported(&supported());
        let mut saved = supported();
        saved[3].ecx = 0x2b00;
        assert!(matches!(
            id.check_compatible(&saved),
            Err(Error::XsaveSize {
                saved: 0x2b00,
                host: 0x340
            })
        ));
    }
}
