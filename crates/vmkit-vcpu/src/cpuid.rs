//! CPUID: KVM's supported set, a coherent topology for N vCPUs, caller masks.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::{Error, Result};

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuidReg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Bits to clear in one CPUID leaf: how a caller hides features from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidMask {
    /// The leaf (EAX input).
    pub leaf: u32,
    /// The sub-leaf (ECX input); `None` applies to every sub-leaf.
    pub subleaf: Option<u32>,
    /// The register.
    pub reg: CpuidReg,
    /// The bits to clear.
    pub clear: u32,
}

impl CpuidMask {
    /// Clears `bit` of `reg` in `leaf` (all sub-leaves).
    pub const fn bit(leaf: u32, reg: CpuidReg, bit: u32) -> Self {
        Self {
            leaf,
            subleaf: None,
            reg,
            clear: 1 << bit,
        }
    }
}

/// What the CPUID of every vCPU is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuidConfig {
    /// Number of vCPUs of the VM (the topology reports one package of this many cores).
    pub num_cpus: u32,
    /// Features to hide, applied last.
    pub masks: Vec<CpuidMask>,
}

/// KVM's supported CPUID set, fetched once per VM and specialised per vCPU.
#[derive(Debug, Clone)]
pub struct CpuidTemplate {
    base: CpuId,
}

/// Leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;

impl CpuidTemplate {
    /// Fetches what KVM supports on this host.
    pub fn from_kvm(kvm: &Kvm) -> Result<Self> {
        let base = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        Ok(Self { base })
    }

    /// The entries it starts from (what KVM supports, from [`from_kvm`](Self::from_kvm)).
    pub fn supported(&self) -> &[kvm_cpuid_entry2] {
        self.base.as_slice()
    }

    /// Starts from the given entries (for tests, or a saved CPU model).
    pub fn from_entries(entries: &[kvm_cpuid_entry2]) -> Result<Self> {
        let base = CpuId::from_entries(entries).map_err(|_| Error::TooManyCpuidEntries)?;
        Ok(Self { base })
    }

    /// The CPUID of vCPU `index` (its APIC ID is `index`).
    pub fn for_vcpu(&self, index: u32, config: &CpuidConfig) -> Result<CpuId> {
        if config.num_cpus == 0 || index >= config.num_cpus || config.num_cpus > 255 {
            return Err(Error::BadTopology {
                index,
                num_cpus: config.num_cpus,
            });
        }
        let mut cpuid = self.base.clone();
        let n = config.num_cpus;
        // ceil(log2(n)): how many low APIC ID bits number the cores of the package.
        let core_bits = 32 - (n - 1).leading_zeros();
        let amd = is_amd(self.base.as_slice());
        for e in cpuid.as_mut_slice() {
            match e.function {
                0x1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (n.min(255) << 16) | (index << 24);
                    e.ecx |= LEAF1_ECX_HYPERVISOR;
                    if n > 1 {
                        e.edx |= LEAF1_EDX_HTT;
                    } else {
                        e.edx &= !LEAF1_EDX_HTT;
                    }
                }
                // Cores per package - 1 in EAX[31:26]; one thread per core shares L1/L2, the
                // package shares L3. A cache type of 0 ends the list and stays as it is.
                0x4 if e.eax & 0x1f != 0 => {
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { n - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((n - 1) & 0x3f) << 26);
                }
                0xb | 0x1f => {
                    e.edx = index;
                    match e.index {
                        0 => {
                            // SMT level: one thread per core.
                            e.eax = 0;
                            e.ebx = 1;
                            e.ecx = 1 << 8;
                        }
                        1 => {
                            // Core level: the whole package.
                            e.eax = core_bits;
                            e.ebx = n;
                            e.ecx = (2 << 8) | 1;
                        }
                        i => {
                            e.eax = 0;
                            e.ebx = 0;
                            e.ecx = i & 0xff;
                        }
                    }
                }
                0x8000_0008 if amd => {
                    // NC: cores per package - 1; ApicIdSize.
                    e.ecx = (e.ecx & !0xf0ff) | ((n - 1) & 0xff) | (core_bits << 12);
                }
                _ => {}
            }
        }
        for m in &config.masks {
            for e in cpuid.as_mut_slice() {
                if e.function == m.leaf && m.subleaf.is_none_or(|s| s == e.index) {
                    let r = match m.reg {
                        CpuidReg::Eax => &mut e.eax,
                        CpuidReg::Ebx => &mut e.ebx,
                        CpuidReg::Ecx => &mut e.ecx,
                        CpuidReg::Edx => &mut e.edx,
                    };
                    *r &= !m.clear;
                }
            }
        }
        Ok(cpuid)
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
        .is_some_and(|e| e.ebx == 0x6874_7541 && e.edx == 0x6974_6e65 && e.ecx == 0x444d_4163)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A CPUID entry with the given registers (EAX, EBX, ECX, EDX).
    pub(crate) fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    /// The entry of leaf `f`, sub-leaf `i`.
    pub(crate) fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    fn template() -> CpuidTemplate {
        CpuidTemplate::from_entries(&[
            // GenuineIntel
            entry(0, 0, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(1, 0, [0x806f8, 0x0800, 0x7ffa_fbff, 0xbfeb_fbff]),
            entry(4, 0, [0x1c00_4121, 0, 0, 0]),
            entry(4, 3, [0x1c03_c163, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [4, 16, 0x201, 7]),
            entry(0xb, 2, [0, 0, 2, 7]),
            entry(7, 0, [0, 0xffff_ffff, 0, 0]),
        ])
        .unwrap()
    }

    #[test]
    fn topology_of_vcpu_2_of_3() {
        let c = template()
            .for_vcpu(
                2,
                &CpuidConfig {
                    num_cpus: 3,
                    masks: vec![],
                },
            )
            .unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 4, 0).eax >> 26, 2, "cores per package - 1");
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let end = find(&c, 0xb, 2);
        assert_eq!((end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 2));
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = template()
            .for_vcpu(
                0,
                &CpuidConfig {
                    num_cpus: 1,
                    masks: vec![],
                },
            )
            .unwrap();
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn masks_clear_only_their_bits() {
        let cfg = CpuidConfig {
            num_cpus: 1,
            masks: vec![
                CpuidMask::bit(7, CpuidReg::Ebx, 20),
                CpuidMask {
                    leaf: 1,
                    subleaf: Some(0),
                    reg: CpuidReg::Ecx,
                    clear: 1 << 26,
                },
            ],
        };
        let c = template().for_vcpu(0, &cfg).unwrap();
        assert_eq!(find(&c, 7, 0).ebx, !(1u32 << 20));
        assert_eq!(find(&c, 1, 0).ecx & (1 << 26), 0);
        assert_ne!(find(&c, 1, 0).ecx & (1 << 25), 0);
    }

    #[test]
    fn bad_topology_is_an_error() {
        let t = template();
        for (i, n) in [(0, 0), (2, 2), (0, 256)] {
            assert!(matches!(
                t.for_vcpu(
                    i,
                    &CpuidConfig {
                        num_cpus: n,
                        masks: vec![]
                    }
                ),
                Err(Error::BadTopology { .. })
            ));
        }
    }
}
