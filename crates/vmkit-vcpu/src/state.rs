//! A vCPU's whole architectural state, read from KVM for a snapshot and written back into a
//! fresh vCPU on restore.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, KVM_MAX_XCRS, KVM_MP_STATE_SUSPENDED,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `IA32_TSC_DEADLINE`: KVM drops a write while the LAPIC timer is not in TSC-deadline mode,
/// so restore writes it again after the LAPIC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// 32-bit words of KVM's legacy `kvm_xsave` (4 KiB): the least an XSAVE state holds.
const LEGACY_XSAVE_WORDS: usize = std::mem::size_of::<kvm_xsave>() / 4;

/// The most XSAVE bytes a state may carry (AMX tile data makes it about 11 KiB today).
pub const MAX_XSAVE_BYTES: usize = 64 << 10;

/// The most MSRs a state may carry (KVM lists a few dozen).
pub const MAX_MSRS: usize = 1024;

/// One MSR and its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    /// The MSR's index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// The x87/SSE state of `KVM_GET_FPU` (kvm-bindings' `kvm_fpu` has no serde support).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// ST0–ST7 / MM0–MM7, 16 bytes each.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last instruction opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0–XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one x86_64 vCPU: what [`save_state`] reads and
/// [`restore_state`] writes back. The fixed KVM structures travel as their bytes
/// (kvm-bindings' `serde` feature).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's CPUID (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, pending interrupt bitmap.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// The XSAVE area (`KVM_GET_XSAVE2`) as 32-bit words: at least the legacy 4 KiB, zero
    /// words past it trimmed.
    pub xsave: Vec<u32>,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Every MSR of the list given to [`save_state`] that KVM could read.
    pub msrs: Vec<MsrEntry>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI...
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The guest TSC frequency in kHz (`None` where KVM cannot tell).
    pub tsc_khz: Option<u32>,
}

fn invalid(msg: String) -> Error {
    Error::InvalidState(msg)
}

impl VcpuState {
    /// Checks what KVM would not (counts and sizes that size buffers here): a state from a
    /// file is hostile. KVM checks the register values themselves on restore.
    pub fn validate(&self) -> Result<()> {
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid(format!(
                "{} CPUID entries (1 to {KVM_MAX_CPUID_ENTRIES})",
                self.cpuid.len()
            )));
        }
        let xsave_bytes = self.xsave.len().saturating_mul(4);
        if self.xsave.len() < LEGACY_XSAVE_WORDS || xsave_bytes > MAX_XSAVE_BYTES {
            return Err(invalid(format!(
                "XSAVE area of {xsave_bytes} bytes (4096 to {MAX_XSAVE_BYTES})"
            )));
        }
        if self.xcrs.nr_xcrs > KVM_MAX_XCRS {
            return Err(invalid(format!(
                "{} XCRs (at most {KVM_MAX_XCRS})",
                self.xcrs.nr_xcrs
            )));
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(invalid(format!(
                "{} MSRs (at most {MAX_MSRS})",
                self.msrs.len()
            )));
        }
        if self.mp_state.mp_state > KVM_MP_STATE_SUSPENDED {
            return Err(invalid(format!(
                "unknown MP state {}",
                self.mp_state.mp_state
            )));
        }
        if self.tsc_khz == Some(0) {
            return Err(invalid("a TSC frequency of 0 kHz".into()));
        }
        Ok(())
    }
}

/// 32-bit words of an XSAVE buffer large enough for whatever KVM copies: the size of every
/// XSAVE component this processor supports (CPUID leaf 0xD, ECX), at least the legacy 4 KiB.
/// KVM's own size (`KVM_CAP_XSAVE2`) needs the VM's fd; this bound needs nothing and is never
/// smaller.
fn xsave_buffer_words() -> usize {
    #[allow(unused_unsafe)]
    // SAFETY: CPUID is available on every x86_64 processor and only reads registers.
    let leaf = unsafe { std::arch::x86_64::__cpuid_count(0xd, 0) };
    (leaf.ecx as usize)
        .div_ceil(4)
        .clamp(LEGACY_XSAVE_WORDS, MAX_XSAVE_BYTES / 4)
}

fn get_xsave(fd: &VcpuFd) -> Result<Vec<u32>> {
    let words = xsave_buffer_words();
    let mut xsave = Xsave::new(words - LEGACY_XSAVE_WORDS).map_err(|_| Error::XsaveAlloc)?;
    // SAFETY: the buffer holds the processor's full XSAVE size (CPUID 0xD ECX), which bounds
    // the size KVM copies (`KVM_CAP_XSAVE2`), so the kernel writes inside it.
    unsafe { fd.get_xsave2(&mut xsave) }.map_err(|e| Error::GetState("XSAVE area", e))?;
    let fam = xsave.as_fam_struct_ref();
    let mut all: Vec<u32> = fam.xsave.region.to_vec();
    all.extend_from_slice(xsave.as_slice());
    let used = all.iter().rposition(|w| *w != 0).map_or(0, |i| i + 1);
    all.truncate(used.max(LEGACY_XSAVE_WORDS));
    Ok(all)
}

fn set_xsave(fd: &VcpuFd, words: &[u32]) -> Result<()> {
    let buffer = xsave_buffer_words();
    if words.len() > buffer {
        return Err(invalid(format!(
            "XSAVE area of {} bytes: this processor's is {} bytes",
            words.len() * 4,
            buffer * 4
        )));
    }
    let mut xsave = Xsave::new(buffer - LEGACY_XSAVE_WORDS).map_err(|_| Error::XsaveAlloc)?;
    let (legacy, extra) = words.split_at(LEGACY_XSAVE_WORDS.min(words.len()));
    // SAFETY: only plain data is written, within the lengths the wrapper allocated: the
    // legacy region (`legacy` is at most its 1024 words) and the flexible array (`extra` is
    // at most `buffer - 1024` words, checked above).
    let fam = unsafe { xsave.as_mut_fam_struct() };
    fam.xsave.region[..legacy.len()].copy_from_slice(legacy);
    xsave.as_mut_slice()[..extra.len()].copy_from_slice(extra);
    // SAFETY: the buffer holds the processor's full XSAVE size, which bounds what KVM reads.
    unsafe { fd.set_xsave2(&xsave) }.map_err(|e| Error::SetState("XSAVE area", e))
}

/// Reads `indices` in chunks KVM takes; an MSR KVM cannot read (`KVM_GET_MSRS` stops at the
/// first it fails) is left out and the rest read on.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>> {
    let mut out = Vec::with_capacity(indices.len());
    let mut left = indices;
    while !left.is_empty() {
        let chunk = &left[..left.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::TooManyMsrs)?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|e| Error::GetState("MSRs", e))?;
        out.extend(msrs.as_slice().iter().take(read).map(|e| MsrEntry {
            index: e.index,
            data: e.data,
        }));
        // `read` entries were read; the next one (if the chunk is not done) failed: skip it.
        let skip = if read < chunk.len() { read + 1 } else { read };
        left = left.get(skip..).unwrap_or_default();
    }
    Ok(out)
}

fn set_msrs(fd: &VcpuFd, entries: &[MsrEntry]) -> Result<()> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let raw: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|e| kvm_msr_entry {
                index: e.index,
                data: e.data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&raw).map_err(|_| Error::TooManyMsrs)?;
        let set = fd.set_msrs(&msrs).map_err(|e| Error::SetState("MSRs", e))?;
        if let Some(refused) = chunk.get(set) {
            return Err(Error::MsrRefused(refused.index));
        }
    }
    Ok(())
}

/// Reads the state of `fd`, with the MSRs of `msrs` that KVM can read (pass
/// `Kvm::get_msr_index_list`). Call on a vCPU that is not running, after
/// [`complete_pending_io`] if its last exit was port or MMIO I/O.
pub fn save_state(fd: &VcpuFd, msrs: &[u32]) -> Result<VcpuState> {
    let get = |what| move |e| Error::GetState(what, e);
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(get("CPUID"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().to_vec(),
        regs: fd.get_regs().map_err(get("registers"))?,
        sregs: fd.get_sregs().map_err(get("special registers"))?,
        fpu: FpuState::from(&fd.get_fpu().map_err(get("FPU state"))?),
        xsave: get_xsave(fd)?,
        xcrs: fd.get_xcrs().map_err(get("XCRs"))?,
        msrs: get_msrs(fd, msrs)?,
        lapic: fd.get_lapic().map_err(get("local APIC"))?,
        events: fd.get_vcpu_events().map_err(get("vCPU events"))?,
        mp_state: fd.get_mp_state().map_err(get("MP state"))?,
        debugregs: fd.get_debug_regs().map_err(get("debug registers"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
    })
}

/// Completes a port or MMIO exit the VMM has handled but KVM has not applied yet (an `in`'s
/// value reaches the register on the next `KVM_RUN`): one `KVM_RUN` with `immediate_exit`
/// set, which finishes the instruction and returns without running the guest. KVM's API
/// documentation requires this before reading the state after such an exit. Does nothing
/// after any other exit.
pub fn complete_pending_io(fd: &mut VcpuFd) -> Result<()> {
    let reason = fd.get_kvm_run().exit_reason;
    if reason != kvm_bindings::KVM_EXIT_IO && reason != kvm_bindings::KVM_EXIT_MMIO {
        return Ok(());
    }
    fd.set_kvm_immediate_exit(1);
    let ran = fd.run().map(|exit| format!("{exit:?}"));
    fd.set_kvm_immediate_exit(0);
    match ran {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(Error::Run(e)),
        Ok(exit) => Err(Error::UnexpectedExit(exit)),
    }
}

/// Writes `state` into `fd`, a vCPU that has not run (created and set up as for a boot; its
/// CPUID is replaced). In KVM's order: CPUID first (it decides which registers and MSRs
/// exist), the TSC frequency (MSR values are scaled by it), special registers before
/// general ones, XSAVE/XCRs, FPU, MSRs, LAPIC, the TSC deadline again (KVM ignores it until
/// the LAPIC timer is in deadline mode), events, MP state, debug registers.
///
/// A TSC frequency this host cannot set is logged, not an error (the guest's clock then
/// runs at the host's rate).
pub fn restore_state(fd: &VcpuFd, state: &VcpuState) -> Result<()> {
    state.validate()?;
    let set = |what| move |e| Error::SetState(what, e);
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::TooManyCpuidEntries)?;
    fd.set_cpuid2(&cpuid).map_err(Error::VcpuCpuid)?;
    restore_tsc_khz(fd, state.tsc_khz);
    fd.set_sregs(&state.sregs)
        .map_err(set("special registers"))?;
    fd.set_regs(&state.regs).map_err(set("registers"))?;
    set_xsave(fd, &state.xsave)?;
    fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(set("FPU state"))?;
    set_msrs(fd, &state.msrs)?;
    fd.set_lapic(&state.lapic).map_err(set("local APIC"))?;
    let deadline: Vec<MsrEntry> = state
        .msrs
        .iter()
        .filter(|m| m.index == MSR_IA32_TSC_DEADLINE)
        .copied()
        .collect();
    set_msrs(fd, &deadline)?;
    fd.set_vcpu_events(&state.events)
        .map_err(set("vCPU events"))?;
    fd.set_mp_state(state.mp_state).map_err(set("MP state"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(set("debug registers"))
}

fn restore_tsc_khz(fd: &VcpuFd, saved: Option<u32>) {
    let Some(khz) = saved else { return };
    if fd.get_tsc_khz().ok() == Some(khz) {
        return;
    }
    if let Err(e) = fd.set_tsc_khz(khz) {
        log::warn!(
            "cannot set the guest TSC to the saved {khz} kHz ({e}): the guest's clock runs at this host's rate"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes a state invalid in one way.
    type Breaker = fn(&mut VcpuState);

    /// A state that passes validation (not one KVM would take as a whole).
    fn valid() -> VcpuState {
        VcpuState {
            cpuid: vec![kvm_cpuid_entry2::default()],
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            fpu: FpuState::from(&kvm_fpu::default()),
            xsave: vec![0; LEGACY_XSAVE_WORDS],
            xcrs: kvm_xcrs::default(),
            msrs: vec![MsrEntry {
                index: 0x10,
                data: 1,
            }],
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn out_of_range_counts_and_sizes_are_refused() {
        valid().validate().unwrap();
        let cases: [(&str, Breaker); 8] = [
            ("0 CPUID entries", |s| s.cpuid.clear()),
            ("257 CPUID entries", |s| {
                s.cpuid = vec![kvm_cpuid_entry2::default(); 257]
            }),
            ("XSAVE area of 4092 bytes", |s| {
                s.xsave.pop();
            }),
            ("XSAVE area of 65540 bytes", |s| s.xsave = vec![0; 16385]),
            ("17 XCRs", |s| s.xcrs.nr_xcrs = 17),
            ("1025 MSRs", |s| {
                s.msrs = vec![MsrEntry { index: 0, data: 0 }; 1025]
            }),
            ("unknown MP state 11", |s| s.mp_state.mp_state = 11),
            ("a TSC frequency of 0 kHz", |s| s.tsc_khz = Some(0)),
        ];
        for (what, break_it) in cases {
            let mut s = valid();
            break_it(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid vCPU state: {what}")), "{e}");
        }
    }

    #[test]
    fn the_fpu_state_converts_both_ways() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            fsw: 1,
            ftwx: 2,
            last_opcode: 3,
            last_ip: 4,
            last_dp: 5,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.fpr[7][15] = 6;
        f.xmm[15][0] = 7;
        let back = kvm_fpu::from(&FpuState::from(&f));
        assert_eq!(FpuState::from(&back), FpuState::from(&f));
        assert_eq!(
            (back.fpr[7][15], back.xmm[15][0], back.mxcsr),
            (6, 7, 0x1f80)
        );
    }

    #[test]
    fn a_state_round_trips_through_serde() {
        let mut s = valid();
        s.regs.rip = 0x1234;
        s.sregs.cr0 = 0x11;
        s.lapic.regs[0x20] = 3;
        let text = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_xsave_buffer_holds_at_least_the_legacy_area() {
        let words = xsave_buffer_words();
        assert!((LEGACY_XSAVE_WORDS..=MAX_XSAVE_BYTES / 4).contains(&words));
    }
}
