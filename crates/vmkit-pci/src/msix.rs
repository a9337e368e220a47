//! MSI-X: the capability, the vector table and the pending bit array. Vectors are delivered
//! through vmkit-irq's [`MsiVectorSink`] (KVM MSI routes in a VMM, a recorder in tests).

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use vmkit_irq::{MsiMessage, MsiVectorSink};

use crate::config::{ConfigSpace, CAP_ID_MSIX};
use crate::{Error, Result};

/// Size of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The most vectors an MSI-X table can have.
pub const MSIX_MAX_VECTORS: usize = 2048;
/// Message control: MSI-X enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: the entry is masked.
pub const MSIX_VECTOR_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Entries come out of reset masked.
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            control: MSIX_VECTOR_MASKED,
        }
    }
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }
    fn masked(&self) -> bool {
        self.control & MSIX_VECTOR_MASKED != 0
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_mask: bool,
}

impl State {
    fn masked(&self, v: usize) -> bool {
        self.function_mask || self.entries[v].masked()
    }
    fn route(&self, v: usize) -> (Option<MsiMessage>, bool) {
        let msg = self.enabled.then(|| self.entries[v].message());
        (msg, self.masked(v))
    }
}

/// The state of an [`MsixTable`] for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    /// Each entry: message address low, address high, data, vector control.
    pub entries: Vec<[u32; 4]>,
    /// Each vector's pending bit.
    pub pending: Vec<bool>,
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_mask: bool,
}

/// What the sink must hear after a state change: routes to update, vectors to deliver.
#[derive(Default)]
struct Effects {
    updates: Vec<(u16, Option<MsiMessage>, bool)>,
    triggers: Vec<u16>,
}

/// An MSI-X table and pending bit array, with the capability's enable and function mask.
///
/// Thread-safe: the device's interrupt path calls [`trigger`](Self::trigger) from any thread
/// while vCPUs program the table. Deliveries happen outside the table's lock.
pub struct MsixTable {
    state: Mutex<State>,
    sink: Arc<dyn MsiVectorSink>,
}

impl fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("MsixTable")
            .field("vectors", &s.entries.len())
            .field("enabled", &s.enabled)
            .field("function_mask", &s.function_mask)
            .finish_non_exhaustive()
    }
}

impl MsixTable {
    /// A table of `vectors` entries (1–2048), all masked, MSI-X disabled.
    pub fn new(vectors: usize, sink: Arc<dyn MsiVectorSink>) -> Result<Self> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(Error::InvalidVectorCount(vectors));
        }
        Ok(Self {
            state: Mutex::new(State {
                entries: vec![Entry::default(); vectors],
                pending: vec![false; vectors],
                enabled: false,
                function_mask: false,
            }),
            sink,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many vectors.
    pub fn vectors(&self) -> usize {
        self.lock().entries.len()
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.vectors() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size of the pending bit array in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.vectors() as u64).div_ceil(64) * 8
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether vector `vector` is masked (by its entry or the function mask); out of range
    /// counts as masked.
    pub fn is_masked(&self, vector: u16) -> bool {
        let s = self.lock();
        usize::from(vector) >= s.entries.len() || s.masked(usize::from(vector))
    }

    /// Whether vector `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.lock()
            .pending
            .get(usize::from(vector))
            .copied()
            .unwrap_or(false)
    }

    /// Adds the MSI-X capability to `config`: `vectors` entries, the table at `table_offset`
    /// of BAR `table_bar`, the PBA at `pba_offset` of BAR `pba_bar` (offsets 8-byte
    /// aligned). Only the enable and function-mask bits are writable. Returns the
    /// capability's offset.
    pub fn add_capability(
        &self,
        config: &mut ConfigSpace,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<u16> {
        let n = self.vectors() as u16 - 1;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&n.to_le_bytes());
        body.extend_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body.extend_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        let at = config.add_capability(CAP_ID_MSIX, &body)?;
        config.set_writable(
            at + 2,
            2,
            u32::from(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK),
        );
        Ok(at)
    }

    fn apply(&self, effects: Effects) {
        for (v, msg, masked) in effects.updates {
            if let Err(e) = self.sink.update(v, msg, masked) {
                log::warn!("pci: MSI-X vector {v}: route update failed: {e}");
            }
        }
        for v in effects.triggers {
            if let Err(e) = self.sink.trigger(v) {
                log::warn!("pci: MSI-X vector {v}: delivery failed: {e}");
            }
        }
    }

    /// Delivers pending vectors that are no longer masked.
    fn flush_pending(s: &mut State, fx: &mut Effects) {
        if !s.enabled {
            return;
        }
        for v in 0..s.entries.len() {
            if s.pending[v] && !s.masked(v) {
                s.pending[v] = false;
                fx.triggers.push(v as u16);
            }
        }
    }

    /// The message control word as the guest wrote it (the enable and function-mask bits
    /// count; the rest is read-only). A device calls it after every configuration write
    /// that touches the capability; an unchanged value does nothing.
    pub fn set_control(&self, control: u16) {
        let mut fx = Effects::default();
        {
            let mut s = self.lock();
            let enabled = control & MSIX_CONTROL_ENABLE != 0;
            let function_mask = control & MSIX_CONTROL_FUNCTION_MASK != 0;
            if enabled == s.enabled && function_mask == s.function_mask {
                return;
            }
            s.enabled = enabled;
            s.function_mask = function_mask;
            for v in 0..s.entries.len() {
                let (msg, masked) = s.route(v);
                fx.updates.push((v as u16, msg, masked));
            }
            Self::flush_pending(&mut s, &mut fx);
        }
        self.apply(fx);
    }

    /// Interrupts through vector `vector`. Returns `Ok(false)` when MSI-X is disabled (the
    /// device may fall back to INTx) or the vector is out of range; a masked vector sets its
    /// pending bit instead (`Ok(true)`).
    pub fn trigger(&self, vector: u16) -> io::Result<bool> {
        {
            let mut s = self.lock();
            let v = usize::from(vector);
            if !s.enabled || v >= s.entries.len() {
                return Ok(false);
            }
            if s.masked(v) {
                s.pending[v] = true;
                return Ok(true);
            }
        }
        self.sink.trigger(vector).map(|()| true)
    }

    fn access_ok(offset: u64, len: usize) -> bool {
        matches!(len, 4 | 8) && offset.is_multiple_of(len as u64)
    }

    /// A guest read of the table at `offset` (4 or 8 bytes, aligned; others read all ones).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        if !Self::access_ok(offset, data.len()) {
            data.fill(0xFF);
            return;
        }
        let s = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset.saturating_add(4 * i as u64);
            let value = usize::try_from(at / MSIX_ENTRY_SIZE)
                .ok()
                .and_then(|e| s.entries.get(e))
                .map_or(u32::MAX, |e| match at % MSIX_ENTRY_SIZE {
                    0 => e.addr_lo,
                    4 => e.addr_hi,
                    8 => e.data,
                    _ => e.control,
                });
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// A guest write to the table at `offset` (4 or 8 bytes, aligned; others are ignored).
    /// Unmasking a vector with its pending bit set delivers it.
    pub fn write_table(&self, offset: u64, data: &[u8]) {
        if !Self::access_ok(offset, data.len()) {
            return;
        }
        let mut fx = Effects::default();
        {
            let mut s = self.lock();
            for (i, chunk) in data.chunks(4).enumerate() {
                let at = offset.saturating_add(4 * i as u64);
                let Some(v) = usize::try_from(at / MSIX_ENTRY_SIZE)
                    .ok()
                    .filter(|v| *v < s.entries.len())
                else {
                    continue;
                };
                let mut b = [0u8; 4];
                b.copy_from_slice(chunk);
                let value = u32::from_le_bytes(b);
                let before = s.entries[v];
                let e = &mut s.entries[v];
                match at % MSIX_ENTRY_SIZE {
                    0 => e.addr_lo = value & !3,
                    4 => e.addr_hi = value,
                    8 => e.data = value,
                    _ => e.control = value & MSIX_VECTOR_MASKED,
                }
                if s.entries[v] != before {
                    let (msg, masked) = s.route(v);
                    fx.updates.retain(|(u, _, _)| usize::from(*u) != v);
                    fx.updates.push((v as u16, msg, masked));
                }
            }
            Self::flush_pending(&mut s, &mut fx);
        }
        self.apply(fx);
    }

    /// A guest read of the pending bit array at `offset` (4 or 8 bytes, aligned).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        if !Self::access_ok(offset, data.len()) {
            data.fill(0xFF);
            return;
        }
        let s = self.lock();
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let first = offset
                .checked_add(4 * i as u64)
                .and_then(|o| o.checked_mul(8))
                .unwrap_or(u64::MAX - 32);
            let mut value = 0u32;
            for bit in 0..32u64 {
                let v = usize::try_from(first + bit).unwrap_or(usize::MAX);
                if s.pending.get(v).copied().unwrap_or(false) {
                    value |= 1 << bit;
                }
            }
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// The table, pending bits, enable and function mask, for a snapshot.
    pub fn state(&self) -> MsixState {
        let s = self.lock();
        MsixState {
            entries: s
                .entries
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.control])
                .collect(),
            pending: s.pending.clone(),
            enabled: s.enabled,
            function_mask: s.function_mask,
        }
    }

    /// Restores `state` into this table (of the same size), before the guest runs: every
    /// vector's route is given to the sink again (a VMM's KVM MSI routes are re-programmed),
    /// and a pending vector that is not masked is delivered (a spurious interrupt is
    /// harmless, a lost one is not).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidState`] for another vector count or a value no guest write could
    /// leave (reserved control or address bits); nothing is changed then.
    pub fn restore(&self, state: &MsixState) -> Result<()> {
        let vectors = self.vectors();
        if state.entries.len() != vectors || state.pending.len() != vectors {
            return Err(Error::InvalidState(format!(
                "{} MSI-X entries and {} pending bits for a table of {vectors}",
                state.entries.len(),
                state.pending.len()
            )));
        }
        if let Some(v) = state
            .entries
            .iter()
            .position(|e| e[0] & 3 != 0 || e[3] & !MSIX_VECTOR_MASKED != 0)
        {
            return Err(Error::InvalidState(format!(
                "MSI-X entry {v}: reserved address or control bits set"
            )));
        }
        let mut fx = Effects::default();
        {
            let mut s = self.lock();
            for (e, saved) in s.entries.iter_mut().zip(&state.entries) {
                *e = Entry {
                    addr_lo: saved[0],
                    addr_hi: saved[1],
                    data: saved[2],
                    control: saved[3],
                };
            }
            s.pending.copy_from_slice(&state.pending);
            s.enabled = state.enabled;
            s.function_mask = state.function_mask;
            for v in 0..s.entries.len() {
                let (msg, masked) = s.route(v);
                fx.updates.push((v as u16, msg, masked));
            }
            Self::flush_pending(&mut s, &mut fx);
        }
        self.apply(fx);
        Ok(())
    }

    /// Drops every pending message (the device was reset: what it signalled before must not
    /// reach the new driver session). Table entries, masks and the enable bit stay: they
    /// belong to the PCI function, which was not reset.
    pub fn clear_pending(&self) {
        self.lock().pending.fill(false);
    }

    /// Returns the table to its reset state (all masked, nothing pending, disabled), telling
    /// the sink if MSI-X was enabled.
    pub fn reset(&self) {
        let mut fx = Effects::default();
        {
            let mut s = self.lock();
            let was_enabled = s.enabled;
            s.entries.fill(Entry::default());
            s.pending.fill(false);
            s.enabled = false;
            s.function_mask = false;
            if was_enabled {
                for v in 0..s.entries.len() {
                    fx.updates.push((v as u16, None, true));
                }
            }
        }
        self.apply(fx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PciIds;
    use vmkit_irq::{RecordingSink, SinkEvent};

    fn w(t: &MsixTable, off: u64, v: u32) {
        t.write_table(off, &v.to_le_bytes());
    }
    fn r(t: &MsixTable, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read_table(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn pba(t: &MsixTable) -> u64 {
        let mut b = [0u8; 8];
        t.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn state_restores_routes_and_delivers_what_was_pending() {
        let a = MsixTable::new(3, RecordingSink::new()).unwrap();
        a.set_control(MSIX_CONTROL_ENABLE);
        w(&a, 16, 0xFEE0_1000);
        w(&a, 24, 0x42);
        w(&a, 28, 0); // vector 1 unmasked
        w(&a, 32, 0xFEE0_2000);
        w(&a, 40, 0x43); // vector 2 stays masked…
        assert!(a.trigger(2).unwrap()); // …and pending
        let state = a.state();
        assert_eq!(state.entries[1], [0xFEE0_1000, 0, 0x42, 0]);
        assert_eq!(state.pending, vec![false, false, true]);

        let sink = RecordingSink::new();
        let b = MsixTable::new(3, sink.clone()).unwrap();
        b.restore(&state).unwrap();
        assert_eq!(b.state(), state);
        let m1 = MsiMessage {
            address: 0xFEE0_1000,
            data: 0x42,
        };
        let events = sink.take();
        // Every vector's route given again, vector 1 unmasked; vector 2 still pending.
        assert!(
            events.contains(&SinkEvent::Update(1, Some(m1), false)),
            "{events:?}"
        );
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(b.is_pending(2));
        w(&b, 44, 0); // unmasking delivers it
        assert_eq!(sink.triggers(), vec![2]);
    }

    #[test]
    fn hostile_msix_states_are_refused() {
        let a = MsixTable::new(3, RecordingSink::new()).unwrap();
        let good = a.state();
        let b = MsixTable::new(2, RecordingSink::new()).unwrap();
        assert!(matches!(b.restore(&good), Err(Error::InvalidState(_))));
        let mut s = good.clone();
        s.pending.pop();
        assert!(matches!(a.restore(&s), Err(Error::InvalidState(_))));
        let mut s = good.clone();
        s.entries[1][3] = 0x8000_0001;
        let err = a.restore(&s).unwrap_err().to_string();
        assert!(err.contains("entry 1"), "{err}");
        let mut s = good;
        s.entries[0][0] = 0xFEE0_0002;
        assert!(matches!(a.restore(&s), Err(Error::InvalidState(_))));
    }

    #[test]
    fn capability_layout() {
        let sink = RecordingSink::new();
        let t = MsixTable::new(3, sink).unwrap();
        let mut c = ConfigSpace::new(PciIds::default());
        let at = t.add_capability(&mut c, 0, 0x4000, 0, 0x5000).unwrap();
        assert_eq!(c.read_u8(at), CAP_ID_MSIX);
        assert_eq!(c.read_u16(at + 2), 2, "table size N-1, disabled");
        assert_eq!(c.read_u32(at + 4), 0x4000);
        assert_eq!(c.read_u32(at + 8), 0x5000);
        c.write(at + 2, &0xFFFFu16.to_le_bytes());
        assert_eq!(
            c.read_u16(at + 2),
            0xC002,
            "only enable and mask are writable"
        );
        assert_eq!((t.table_size(), t.pba_size()), (48, 8));
        assert!(MsixTable::new(0, RecordingSink::new()).is_err());
        assert!(MsixTable::new(2049, RecordingSink::new()).is_err());
    }

    #[test]
    fn masking_pending_and_delivery() {
        let sink = RecordingSink::new();
        let t = MsixTable::new(2, sink.clone()).unwrap();
        // Disabled: nothing delivered, nothing pending.
        assert!(!t.trigger(0).unwrap());
        assert!(!t.is_pending(0));
        t.set_control(MSIX_CONTROL_ENABLE);
        let ev = sink.take();
        assert_eq!(ev.len(), 2);
        assert_eq!(
            ev[0],
            SinkEvent::Update(0, Some(MsiMessage::default()), true)
        );
        // Entries come out of reset masked: pending.
        assert!(t.trigger(1).unwrap());
        assert!(t.is_pending(1));
        assert_eq!(pba(&t), 0b10);
        assert!(sink.take().is_empty());
        // Program vector 1 and unmask it: delivered once, pending clear.
        w(&t, 16, 0xFEE0_0000);
        w(&t, 20, 0);
        w(&t, 24, 0x41);
        assert!(t.is_pending(1));
        w(&t, 28, 0);
        assert!(!t.is_pending(1));
        let ev = sink.take();
        assert_eq!(ev.last().copied(), Some(SinkEvent::Trigger(1)), "{ev:?}");
        assert!(ev.contains(&SinkEvent::Update(
            1,
            Some(MsiMessage {
                address: 0xFEE0_0000,
                data: 0x41
            }),
            false
        )));
        assert_eq!(r(&t, 16), 0xFEE0_0000);
        assert_eq!(r(&t, 24), 0x41);
        assert_eq!(r(&t, 28), 0);
        // Unmasked: straight through.
        t.trigger(1).unwrap();
        assert_eq!(sink.take(), vec![SinkEvent::Trigger(1)]);
        // Function mask: pending again, delivered when the function mask clears.
        t.set_control(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        sink.take();
        t.trigger(1).unwrap();
        assert!(t.is_pending(1));
        assert!(sink.triggers().is_empty());
        t.set_control(MSIX_CONTROL_ENABLE);
        assert_eq!(sink.triggers(), vec![1]);
        assert!(!t.is_pending(1));
        // Disable: routes removed.
        sink.take();
        t.set_control(0);
        assert!(sink
            .take()
            .iter()
            .all(|e| matches!(e, SinkEvent::Update(_, None, _))));
        // Reset.
        t.set_control(MSIX_CONTROL_ENABLE);
        t.reset();
        assert!(!t.enabled());
        assert!(t.is_masked(1));
    }

    #[test]
    fn hostile_table_accesses() {
        let sink = RecordingSink::new();
        let t = MsixTable::new(2, sink.clone()).unwrap();
        let mut b = [0u8; 4];
        t.read_table(2, &mut b);
        assert_eq!(b, [0xFF; 4]);
        let mut b2 = [0u8; 2];
        t.read_table(0, &mut b2);
        assert_eq!(b2, [0xFF; 2]);
        t.read_table(u64::MAX - 3, &mut b);
        t.read_table(32, &mut b);
        assert_eq!(u32::from_le_bytes(b), u32::MAX, "past the table");
        t.write_table(32, &[0; 4]);
        t.write_table(u64::MAX - 7, &[0; 8]);
        t.write_table(1, &[0; 4]);
        t.write_table(0, &[0; 2]);
        t.write_table(0, &[]);
        t.read_pba(u64::MAX - 7, &mut [0; 8]);
        t.read_pba(3, &mut b);
        // Reserved control bits do not stick.
        w(&t, 12, 0xFFFF_FFFF);
        assert_eq!(r(&t, 12), 1);
        // An 8-byte write of address lo+hi.
        t.write_table(0, &0x0000_0001_FEE0_1000u64.to_le_bytes());
        let mut q = [0u8; 8];
        t.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x0000_0001_FEE0_1000);
        assert!(!t.trigger(7).unwrap(), "out of range");
    }
}
