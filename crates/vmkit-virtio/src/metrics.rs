//! Per-device counters, injected: a device counts through a [`DeviceMetrics`] the VMM hands
//! it, and the VMM reads and writes them out as it likes (Firecracker-style metrics, a
//! Prometheus endpoint, a log line). Nothing here is global, serialised or allocated per
//! request.
//!
//! Directions are the guest's: a **read** moves data from the device into the guest's
//! buffers (a block `IN`, a received frame, entropy, console input, a vsock packet to the
//! guest), a **write** moves data from the guest's buffers to the device (a block `OUT`, a
//! transmitted frame, console output, a vsock packet from the guest).
//!
//! Two counters are counted here rather than in each device, once a device hands its
//! metrics to its queues with [`ActiveQueue::set_metrics`](crate::ActiveQueue::set_metrics):
//! [`Counter::Interrupts`] (in [`signal_used`](crate::ActiveQueue::signal_used)) and the
//! chain-level part of [`Counter::Malformed`] (in [`pop`](crate::ActiveQueue::pop): loops,
//! bad indices, buffers outside guest memory). The device counts the rest.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a device counts. Each device documents which it uses and in what unit; the
/// meaning below is common to all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(usize)]
pub enum Counter {
    /// Chains (requests, frames, packets, buffers) the device served and returned in a used
    /// ring, whatever their outcome.
    Requests,
    /// Of those, the ones that moved data to the guest: block `IN`, received frames,
    /// entropy requests, console input chains, vsock packets to the guest.
    ReadOps,
    /// Of those, the ones that moved data from the guest: block `OUT`, transmitted frames,
    /// console output chains, vsock packets from the guest.
    WriteOps,
    /// Payload bytes the device placed in guest buffers (protocol headers not counted).
    ReadBytes,
    /// Payload bytes the device took from guest buffers (protocol headers not counted).
    WriteBytes,
    /// Flush requests completed (block `FLUSH`).
    Flushes,
    /// Requests that failed on the host side: an I/O error of the backend, answered with an
    /// error status where the protocol has one.
    Errors,
    /// Chains rejected as malformed: by the queue (loops, bad indices, buffers outside guest
    /// memory) or by the device (a bad header, buffers of the wrong direction or size).
    Malformed,
    /// Data the device dropped for lack of guest buffers or by policy (the unit is the
    /// device's: frames for net, bytes for console, packets for vsock).
    Dropped,
    /// Queue notifications the device served: calls of
    /// [`process_queue`](crate::VirtioDevice::process_queue), one per driver kick plus one
    /// per round of the event handler's polling, when a queue polls.
    Notifications,
    /// Used-buffer interrupts sent to the driver (after the suppression rules).
    Interrupts,
    /// Connections reset (vsock: a `RST` sent or received).
    Resets,
    /// Times a rate limiter stopped the device serving a queue (each arms its timer once).
    Throttled,
}

impl Counter {
    /// How many counters there are.
    pub const COUNT: usize = 13;

    /// Every counter, in declaration order (the order of [`MetricsSnapshot::iter`]).
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::Requests,
        Counter::ReadOps,
        Counter::WriteOps,
        Counter::ReadBytes,
        Counter::WriteBytes,
        Counter::Flushes,
        Counter::Errors,
        Counter::Malformed,
        Counter::Dropped,
        Counter::Notifications,
        Counter::Interrupts,
        Counter::Resets,
        Counter::Throttled,
    ];

    /// A stable `snake_case` name, for the VMM's output.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Requests => "requests",
            Counter::ReadOps => "read_ops",
            Counter::WriteOps => "write_ops",
            Counter::ReadBytes => "read_bytes",
            Counter::WriteBytes => "write_bytes",
            Counter::Flushes => "flushes",
            Counter::Errors => "errors",
            Counter::Malformed => "malformed",
            Counter::Dropped => "dropped",
            Counter::Notifications => "notifications",
            Counter::Interrupts => "interrupts",
            Counter::Resets => "resets",
            Counter::Throttled => "throttled",
        }
    }

    /// The counter's position in [`ALL`](Self::ALL).
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Counter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a device counts. Implementations must be cheap (a relaxed atomic add, say): it is
/// called on the request path, several times per request.
///
/// A device takes it as `Arc<dyn DeviceMetrics>` in its configuration; the default is
/// [`NoMetrics`]. [`AtomicMetrics`] is a ready implementation.
pub trait DeviceMetrics: Send + Sync + fmt::Debug {
    /// Adds `n` to `counter`.
    fn add(&self, counter: Counter, n: u64);

    /// Adds 1 to `counter`.
    fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }
}

/// Counts nothing: the default of every device configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoMetrics;

impl DeviceMetrics for NoMetrics {
    #[inline]
    fn add(&self, _counter: Counter, _n: u64) {}
}

/// One relaxed `AtomicU64` per [`Counter`]. Share it between the device (as
/// `Arc<dyn DeviceMetrics>`) and the VMM, which reads it with [`snapshot`](Self::snapshot).
///
/// ```
/// use std::sync::Arc;
/// use vmkit_virtio::{AtomicMetrics, Counter, DeviceMetrics};
///
/// let metrics = Arc::new(AtomicMetrics::new());
/// let for_device: Arc<dyn DeviceMetrics> = metrics.clone();
/// for_device.add(Counter::ReadBytes, 4096);
/// for_device.inc(Counter::Requests);
/// let snap = metrics.snapshot();
/// assert_eq!((snap.requests, snap.read_bytes), (1, 4096));
/// let named: Vec<_> = snap.iter().filter(|(_, v)| *v > 0).collect();
/// assert_eq!(named, [("requests", 1), ("read_bytes", 4096)]);
/// ```
#[derive(Debug, Default)]
pub struct AtomicMetrics {
    counters: [AtomicU64; Counter::COUNT],
}

impl AtomicMetrics {
    /// All counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.counters[counter.index()].load(Ordering::Relaxed)
    }

    /// Every counter's value. Each is read on its own (relaxed): a snapshot taken while the
    /// device runs may be mid-request (requests counted before their bytes, say).
    pub fn snapshot(&self) -> MetricsSnapshot {
        let v = |c: Counter| self.get(c);
        MetricsSnapshot {
            requests: v(Counter::Requests),
            read_ops: v(Counter::ReadOps),
            write_ops: v(Counter::WriteOps),
            read_bytes: v(Counter::ReadBytes),
            write_bytes: v(Counter::WriteBytes),
            flushes: v(Counter::Flushes),
            errors: v(Counter::Errors),
            malformed: v(Counter::Malformed),
            dropped: v(Counter::Dropped),
            notifications: v(Counter::Notifications),
            interrupts: v(Counter::Interrupts),
            resets: v(Counter::Resets),
            throttled: v(Counter::Throttled),
        }
    }

    /// Sets every counter back to zero (a VMM writing deltas, Firecracker-style, may prefer
    /// to subtract its previous snapshot instead: a reset races with the device).
    pub fn reset(&self) {
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
    }
}

impl DeviceMetrics for AtomicMetrics {
    #[inline]
    fn add(&self, counter: Counter, n: u64) {
        self.counters[counter.index()].fetch_add(n, Ordering::Relaxed);
    }
}

/// The counters of an [`AtomicMetrics`] at one time, as plain fields (see [`Counter`] for
/// each one's meaning), or as `(name, value)` pairs with [`iter`](Self::iter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// [`Counter::Requests`].
    pub requests: u64,
    /// [`Counter::ReadOps`].
    pub read_ops: u64,
    /// [`Counter::WriteOps`].
    pub write_ops: u64,
    /// [`Counter::ReadBytes`].
    pub read_bytes: u64,
    /// [`Counter::WriteBytes`].
    pub write_bytes: u64,
    /// [`Counter::Flushes`].
    pub flushes: u64,
    /// [`Counter::Errors`].
    pub errors: u64,
    /// [`Counter::Malformed`].
    pub malformed: u64,
    /// [`Counter::Dropped`].
    pub dropped: u64,
    /// [`Counter::Notifications`].
    pub notifications: u64,
    /// [`Counter::Interrupts`].
    pub interrupts: u64,
    /// [`Counter::Resets`].
    pub resets: u64,
    /// [`Counter::Throttled`].
    pub throttled: u64,
}

impl MetricsSnapshot {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        match counter {
            Counter::Requests => self.requests,
            Counter::ReadOps => self.read_ops,
            Counter::WriteOps => self.write_ops,
            Counter::ReadBytes => self.read_bytes,
            Counter::WriteBytes => self.write_bytes,
            Counter::Flushes => self.flushes,
            Counter::Errors => self.errors,
            Counter::Malformed => self.malformed,
            Counter::Dropped => self.dropped,
            Counter::Notifications => self.notifications,
            Counter::Interrupts => self.interrupts,
            Counter::Resets => self.resets,
            Counter::Throttled => self.throttled,
        }
    }

    /// `(name, value)` of every counter, in [`Counter::ALL`] order, for the VMM to
    /// serialise.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }

    /// Each counter's increase since `earlier` (wrapping), for a VMM writing deltas.
    pub fn since(&self, earlier: &MetricsSnapshot) -> MetricsSnapshot {
        let mut out = MetricsSnapshot::default();
        for c in Counter::ALL {
            *out.field_mut(c) = self.get(c).wrapping_sub(earlier.get(c));
        }
        out
    }

    fn field_mut(&mut self, counter: Counter) -> &mut u64 {
        match counter {
            Counter::Requests => &mut self.requests,
            Counter::ReadOps => &mut self.read_ops,
            Counter::WriteOps => &mut self.write_ops,
            Counter::ReadBytes => &mut self.read_bytes,
            Counter::WriteBytes => &mut self.write_bytes,
            Counter::Flushes => &mut self.flushes,
            Counter::Errors => &mut self.errors,
            Counter::Malformed => &mut self.malformed,
            Counter::Dropped => &mut self.dropped,
            Counter::Notifications => &mut self.notifications,
            Counter::Interrupts => &mut self.interrupts,
            Counter::Resets => &mut self.resets,
            Counter::Throttled => &mut self.throttled,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn names_indices_and_all_agree() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{c}");
        }
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::COUNT);
    }

    #[test]
    fn every_counter_lands_in_its_own_field() {
        let m = AtomicMetrics::new();
        let dyn_m: &dyn DeviceMetrics = &m;
        for (i, c) in Counter::ALL.iter().enumerate() {
            dyn_m.add(*c, 10 + i as u64);
        }
        dyn_m.inc(Counter::Interrupts);
        let s = m.snapshot();
        for (i, c) in Counter::ALL.iter().enumerate() {
            let extra = u64::from(*c == Counter::Interrupts);
            assert_eq!(s.get(*c), 10 + i as u64 + extra, "{c}");
            assert_eq!(m.get(*c), s.get(*c), "{c}");
        }
        let pairs: Vec<_> = s.iter().collect();
        assert_eq!(pairs.len(), Counter::COUNT);
        assert_eq!(pairs[0], ("requests", 10));
        assert_eq!(pairs[10], ("interrupts", 21));
        assert_eq!(s.since(&MetricsSnapshot::default()), s);
        let later = {
            dyn_m.add(Counter::Dropped, 5);
            m.snapshot()
        };
        let delta = later.since(&s);
        assert_eq!(delta.iter().map(|(_, v)| v).sum::<u64>(), 5);
        assert_eq!(delta.dropped, 5);
        m.reset();
        assert_eq!(m.snapshot(), MetricsSnapshot::default());
    }

    #[test]
    fn counts_from_many_threads() {
        let m = Arc::new(AtomicMetrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m: Arc<dyn DeviceMetrics> = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        m.inc(Counter::Requests);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.get(Counter::Requests), 4000);
        NoMetrics.add(Counter::Requests, 1);
    }
}
