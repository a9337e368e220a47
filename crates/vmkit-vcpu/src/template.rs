//! CPU templates: named sets of CPUID features to hide, with the CR4 bits that go with them.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;

use crate::cpuid::{CpuidMask, CpuidReg};

/// A named CPU model the guest sees, as a set of features hidden from KVM's supported CPUID.
///
/// Pass [`CpuTemplate::masks`] in [`CpuidConfig::masks`](crate::CpuidConfig::masks) and clear
/// [`CpuTemplate::cr4_clear`] from the boot vCPU's CR4, so that CPUID and control registers
/// tell the guest the same story.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuTemplate {
    /// Everything KVM supports on this host (nothing hidden).
    #[default]
    Host,
    /// For hosts whose KVM emulates guest kernel mode in software (the `kvm_pvm` module): hides
    /// what that emulator rejects or what leads the kernel to instructions it rejects — the
    /// XSAVE family (`xrstor`), AVX/AVX2 (need XSAVE), `cmpxchg16b`, PCID/INVPCID, FSGSBASE,
    /// RDRAND/RDSEED, SMAP (`clac`/`stac`), PKU, RDPID, POPCNT, and ERMS/FSRM (`rep movsb` is
    /// emulated byte by byte). On hardware-assisted KVM the guest runs with this model too, only
    /// without the features it hides.
    Pvm,
}

/// Every template, for help texts and tests.
pub const CPU_TEMPLATES: [CpuTemplate; 2] = [CpuTemplate::Host, CpuTemplate::Pvm];

/// CR4.PCIDE.
pub const CR4_PCIDE: u64 = 1 << 17;
/// CR4.FSGSBASE.
pub const CR4_FSGSBASE: u64 = 1 << 16;
/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.SMAP.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE.
pub const CR4_PKE: u64 = 1 << 22;

use CpuidReg::{Eax, Ebx, Ecx, Edx};

/// A feature [`CpuTemplate::Pvm`] hides.
struct Hidden {
    leaf: u32,
    subleaf: Option<u32>,
    reg: CpuidReg,
    bit: u32,
    name: &'static str,
    /// Linux's capability word for this register (`X86_FEATURE_* = word * 32 + bit`), for the
    /// `clearcpuid=` fallback; `None` for bits that mirror CR4 (OSXSAVE, OSPKE).
    linux_word: Option<u32>,
}

const fn h(
    leaf: u32,
    subleaf: Option<u32>,
    reg: CpuidReg,
    bit: u32,
    name: &'static str,
    linux_word: Option<u32>,
) -> Hidden {
    Hidden {
        leaf,
        subleaf,
        reg,
        bit,
        name,
        linux_word,
    }
}

/// The features [`CpuTemplate::Pvm`] hides. Linux words: 4 = CPUID 1 ECX, 9 = CPUID 7.0 EBX,
/// 10 = CPUID 0xD.1 EAX, 16 = CPUID 7.0 ECX, 18 = CPUID 7.0 EDX.
const PVM_HIDDEN: &[Hidden] = &[
    h(0x1, None, Ecx, 13, "cx16", Some(4)),
    h(0x1, None, Ecx, 17, "pcid", Some(4)),
    h(0x1, None, Ecx, 23, "popcnt", Some(4)),
    h(0x1, None, Ecx, 26, "xsave", Some(4)),
    h(0x1, None, Ecx, 27, "osxsave", None),
    h(0x1, None, Ecx, 28, "avx", Some(4)),
    h(0x1, None, Ecx, 30, "rdrand", Some(4)),
    h(0x7, Some(0), Ebx, 0, "fsgsbase", Some(9)),
    h(0x7, Some(0), Ebx, 5, "avx2", Some(9)),
    h(0x7, Some(0), Ebx, 9, "erms", Some(9)),
    h(0x7, Some(0), Ebx, 10, "invpcid", Some(9)),
    h(0x7, Some(0), Ebx, 18, "rdseed", Some(9)),
    h(0x7, Some(0), Ebx, 20, "smap", Some(9)),
    h(0x7, Some(0), Ecx, 3, "pku", Some(16)),
    h(0x7, Some(0), Ecx, 4, "ospke", None),
    h(0x7, Some(0), Ecx, 22, "rdpid", Some(16)),
    h(0x7, Some(0), Edx, 4, "fsrm", Some(18)),
    h(0xd, Some(1), Eax, 0, "xsaveopt", Some(10)),
    h(0xd, Some(1), Eax, 1, "xsavec", Some(10)),
    h(0xd, Some(1), Eax, 3, "xsaves", Some(10)),
];

fn reg_of(e: &kvm_cpuid_entry2, reg: CpuidReg) -> u32 {
    match reg {
        Eax => e.eax,
        Ebx => e.ebx,
        Ecx => e.ecx,
        Edx => e.edx,
    }
}

/// AVX-512 and AMX bits of leaf 7 (all need XSAVE, which [`CpuTemplate::Pvm`] hides).
const LEAF7_EBX_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);
const LEAF7_ECX_AVX512: u32 = (1 << 1) | (1 << 6) | (1 << 11) | (1 << 12) | (1 << 14);
const LEAF7_EDX_AVX512_AMX: u32 =
    (1 << 2) | (1 << 3) | (1 << 8) | (1 << 22) | (1 << 23) | (1 << 24);

impl CpuTemplate {
    /// The template's command-line name.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Pvm => "pvm",
        }
    }

    /// The CPUID bits this template hides.
    pub fn masks(self) -> Vec<CpuidMask> {
        match self {
            CpuTemplate::Host => Vec::new(),
            CpuTemplate::Pvm => {
                let mut masks: Vec<CpuidMask> = PVM_HIDDEN
                    .iter()
                    .map(|f| CpuidMask {
                        leaf: f.leaf,
                        subleaf: f.subleaf,
                        reg: f.reg,
                        clear: 1 << f.bit,
                    })
                    .collect();
                for (reg, clear) in [
                    (Ebx, LEAF7_EBX_AVX512),
                    (Ecx, LEAF7_ECX_AVX512),
                    (Edx, LEAF7_EDX_AVX512_AMX),
                ] {
                    masks.push(CpuidMask {
                        leaf: 0x7,
                        subleaf: Some(0),
                        reg,
                        clear,
                    });
                }
                masks
            }
        }
    }

    /// The features this template hides that `effective` (the CPUID a vCPU reports with
    /// `KVM_GET_CPUID2` after `KVM_SET_CPUID2`) still shows. Empty on hardware-assisted KVM;
    /// on kvm_pvm hosts, CPUID bits outside KVM's supported set come from the host CPU and
    /// cannot be hidden this way. Bits that mirror CR4 (OSXSAVE, OSPKE) are not counted.
    pub fn still_visible(self, effective: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
        self.visible(effective).map(|f| f.name).collect()
    }

    /// Linux's `clearcpuid=` parameter for what [`still_visible`](Self::still_visible) finds,
    /// or `None` when CPUID hides everything: a Linux guest then ignores those features as if
    /// CPUID had hidden them (it clears their dependants too, e.g. AVX with XSAVE).
    pub fn linux_clearcpuid(self, effective: &[kvm_cpuid_entry2]) -> Option<String> {
        let numbers: Vec<String> = self
            .visible(effective)
            .filter_map(|f| Some((f.linux_word? * 32 + f.bit).to_string()))
            .collect();
        (!numbers.is_empty()).then(|| format!("clearcpuid={}", numbers.join(",")))
    }

    fn visible<'a>(
        self,
        effective: &'a [kvm_cpuid_entry2],
    ) -> impl Iterator<Item = &'static Hidden> + 'a {
        let table: &'static [Hidden] = match self {
            CpuTemplate::Host => &[],
            CpuTemplate::Pvm => PVM_HIDDEN,
        };
        table.iter().filter(move |f| {
            f.linux_word.is_some()
                && effective.iter().any(|e| {
                    e.function == f.leaf
                        && f.subleaf.is_none_or(|s| s == e.index)
                        && reg_of(e, f.reg) & (1 << f.bit) != 0
                })
        })
    }

    /// CR4 bits that must be clear with this template: those that enable a hidden feature.
    pub fn cr4_clear(self) -> u64 {
        match self {
            CpuTemplate::Host => 0,
            CpuTemplate::Pvm => CR4_PCIDE | CR4_FSGSBASE | CR4_OSXSAVE | CR4_SMAP | CR4_PKE,
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown template name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPU template '{0}' (known: host, pvm)")]
pub struct UnknownTemplate(pub String);

impl FromStr for CpuTemplate {
    type Err = UnknownTemplate;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CPU_TEMPLATES
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownTemplate(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpuid::tests::{entry, find};
    use crate::{CpuidConfig, CpuidTemplate};

    #[test]
    fn names_round_trip() {
        for t in CPU_TEMPLATES {
            assert_eq!(t.name().parse::<CpuTemplate>(), Ok(t));
        }
        assert_eq!(
            "t2".parse::<CpuTemplate>().unwrap_err().to_string(),
            "unknown CPU template 't2' (known: host, pvm)"
        );
    }

    #[test]
    fn host_hides_nothing() {
        assert!(CpuTemplate::Host.masks().is_empty());
        assert_eq!(CpuTemplate::Host.cr4_clear(), 0);
    }

    #[test]
    fn pvm_clears_exactly_its_features() {
        let all = u32::MAX;
        let t = CpuidTemplate::from_entries(&[
            entry(0x0, 0, [0xd, 0, 0, 0]),
            entry(0x1, 0, [0, 0, all, all]),
            entry(0x7, 0, [0, all, all, all]),
            entry(0x7, 1, [all, all, all, all]),
            entry(0xd, 1, [all, 0, 0, 0]),
        ])
        .unwrap();
        let cfg = CpuidConfig {
            num_cpus: 1,
            masks: CpuTemplate::Pvm.masks(),
        };
        let c = t.for_vcpu(0, &cfg).unwrap();
        let l1 = find(&c, 0x1, 0);
        for bit in [13, 17, 23, 26, 27, 28, 30] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        // Others stay: SSE4.2 (20), x2APIC (21), hypervisor (31).
        for bit in [20, 21, 31] {
            assert_ne!(l1.ecx & (1 << bit), 0, "leaf 1 ecx bit {bit}");
        }
        assert_eq!(
            l1.edx,
            all & !(1 << 28),
            "leaf 1 edx keeps all but HTT (1 vCPU)"
        );
        let l7 = find(&c, 0x7, 0);
        for bit in [0, 5, 9, 10, 16, 18, 20, 31] {
            assert_eq!(l7.ebx & (1 << bit), 0, "leaf 7 ebx bit {bit}");
        }
        assert_ne!(l7.ebx & (1 << 3), 0, "BMI1 stays");
        assert_eq!(l7.ecx & ((1 << 3) | (1 << 22)), 0);
        assert_eq!(l7.edx & (1 << 4), 0);
        // Only sub-leaf 0 of leaf 7 carries these bits.
        assert_eq!(find(&c, 0x7, 1).ebx, all);
        assert_eq!(find(&c, 0xd, 1).eax & 0b1011, 0);
    }

    #[test]
    fn what_cpuid_could_not_hide_becomes_clearcpuid() {
        let all = u32::MAX;
        // What KVM reports back when it honoured the masks: nothing left to tell Linux.
        let t = CpuidTemplate::from_entries(&[
            entry(0x1, 0, [0, 0, all, all]),
            entry(0x7, 0, [0, all, all, all]),
            entry(0xd, 1, [all, 0, 0, 0]),
        ])
        .unwrap();
        let cfg = CpuidConfig {
            num_cpus: 1,
            masks: CpuTemplate::Pvm.masks(),
        };
        let honoured = t.for_vcpu(0, &cfg).unwrap();
        assert!(CpuTemplate::Pvm
            .still_visible(honoured.as_slice())
            .is_empty());
        assert_eq!(CpuTemplate::Pvm.linux_clearcpuid(honoured.as_slice()), None);
        // What a kvm_pvm host reports: XSAVE (leaf 1 ECX 26), SMAP (7.0 EBX 20), FSRM (7.0 EDX 4)
        // and OSXSAVE (27, mirrors CR4: not counted) came through from the host.
        let leaky = [
            entry(0x1, 0, [0, 0, (1 << 26) | (1 << 27) | (1 << 0), 0]),
            entry(0x7, 0, [0, 1 << 20, 0, 1 << 4]),
            entry(0x7, 1, [0, 1 << 20, 0, 0]),
        ];
        assert_eq!(
            CpuTemplate::Pvm.still_visible(&leaky),
            vec!["xsave", "smap", "fsrm"]
        );
        // Linux numbering: 4*32+26, 9*32+20, 18*32+4 (the numbers of its cpufeatures.h).
        assert_eq!(
            CpuTemplate::Pvm.linux_clearcpuid(&leaky).as_deref(),
            Some("clearcpuid=154,308,580")
        );
        assert_eq!(CpuTemplate::Host.linux_clearcpuid(&leaky), None);
    }

    #[test]
    fn pvm_cr4_covers_hidden_features() {
        let c = CpuTemplate::Pvm.cr4_clear();
        for bit in [CR4_PCIDE, CR4_FSGSBASE, CR4_OSXSAVE, CR4_SMAP, CR4_PKE] {
            assert_ne!(c & bit, 0);
        }
        // PAE and the SSE bits (OSFXSR, OSXMMEXCPT) are not the template's business.
        assert_eq!(c & ((1 << 5) | (1 << 9) | (1 << 10)), 0);
    }
}
