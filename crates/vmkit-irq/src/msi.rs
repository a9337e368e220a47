//! MSI delivery as device models see it: the message, and the sink a device's MSI or MSI-X
//! capability delivers its vectors through. No KVM: the KVM implementation is
//! [`KvmMsiSink`](crate::KvmMsiSink) (feature `kvm`).

use std::io;
use std::sync::{Arc, Mutex};

/// An MSI message: the address and data a device writes to interrupt a CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// The 64-bit message address.
    pub address: u64,
    /// The message data.
    pub data: u32,
}

/// Where a function's MSI or MSI-X vectors go.
///
/// A PCI device model (`vmkit_pci::MsixTable`) calls it; a VMM implements it with KVM MSI
/// routes and one irqfd per vector ([`KvmMsiSink`](crate::KvmMsiSink)); tests record
/// ([`RecordingSink`]).
pub trait MsiVectorSink: Send + Sync {
    /// Vector `vector`'s route changed: `message` is `None` while MSI-X is disabled (remove
    /// the route), and `masked` says whether the vector is masked (entry or function mask).
    /// The table never calls [`trigger`](Self::trigger) for a masked vector: it keeps the
    /// pending bit and triggers when the vector is unmasked.
    fn update(&self, vector: u16, message: Option<MsiMessage>, masked: bool) -> io::Result<()>;

    /// Sends vector `vector` (its last [`update`](Self::update)d message).
    fn trigger(&self, vector: u16) -> io::Result<()>;
}

impl<T: MsiVectorSink + ?Sized> MsiVectorSink for Arc<T> {
    fn update(&self, vector: u16, message: Option<MsiMessage>, masked: bool) -> io::Result<()> {
        (**self).update(vector, message, masked)
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        (**self).trigger(vector)
    }
}

/// What a [`RecordingSink`] was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkEvent {
    /// [`MsiVectorSink::update`].
    Update(u16, Option<MsiMessage>, bool),
    /// [`MsiVectorSink::trigger`].
    Trigger(u16),
}

/// A sink that records what it is told, for tests of device models.
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: Mutex<Vec<SinkEvent>>,
}

impl RecordingSink {
    /// A sink that has heard nothing.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn events(&self) -> std::sync::MutexGuard<'_, Vec<SinkEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything it heard, in order, and forgets it.
    pub fn take(&self) -> Vec<SinkEvent> {
        std::mem::take(&mut *self.events())
    }

    /// The vectors triggered so far (without forgetting).
    pub fn triggers(&self) -> Vec<u16> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                SinkEvent::Trigger(v) => Some(*v),
                SinkEvent::Update(..) => None,
            })
            .collect()
    }
}

impl MsiVectorSink for RecordingSink {
    fn update(&self, vector: u16, message: Option<MsiMessage>, masked: bool) -> io::Result<()> {
        self.events()
            .push(SinkEvent::Update(vector, message, masked));
        Ok(())
    }
    fn trigger(&self, vector: u16) -> io::Result<()> {
        self.events().push(SinkEvent::Trigger(vector));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_sink_through_an_arc() {
        let sink = RecordingSink::new();
        let dyn_sink: Arc<dyn MsiVectorSink> = sink.clone();
        let m = MsiMessage {
            address: 0xFEE0_0000,
            data: 0x41,
        };
        dyn_sink.update(3, Some(m), false).unwrap();
        dyn_sink.trigger(3).unwrap();
        assert_eq!(sink.triggers(), vec![3]);
        assert_eq!(
            sink.take(),
            vec![SinkEvent::Update(3, Some(m), false), SinkEvent::Trigger(3)]
        );
        assert!(sink.take().is_empty());
    }
}
