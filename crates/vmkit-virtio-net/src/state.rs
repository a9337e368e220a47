//! Snapshot/restore of a [`Net`](crate::Net) device's own state (the rings and negotiated
//! features belong to the transport).

use crate::ctrl::{RxFilter, MAX_MAC_TABLE_ENTRIES};
use crate::Error;

/// The device-specific state of a [`Net`](crate::Net) for a snapshot, taken by
/// [`Net::state`](crate::Net::state) after `quiesce` (which gives the receive buffers the
/// device held for the next frame back to the driver, empty).
///
/// The link status is not saved (always `LINK_UP`), nor the counters and rate limiters'
/// buckets (they start afresh).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// The MAC the guest saw (`VIRTIO_NET_F_MAC`), or `None` (the driver picked one).
    pub mac: Option<[u8; 6]>,
    /// The MTU offered (`VIRTIO_NET_F_MTU`), or `None`.
    pub mtu: Option<u16>,
    /// The queue pairs the device has: the restored device must have as many.
    pub pairs: u16,
    /// The queue pairs the driver uses (set through the control queue).
    pub active_pairs: u16,
    /// Receive mode: every frame.
    pub promiscuous: bool,
    /// Receive mode: every multicast frame.
    pub all_multicast: bool,
    /// The driver's unicast filter table.
    pub unicast: Vec<[u8; 6]>,
    /// The driver's multicast filter table.
    pub multicast: Vec<[u8; 6]>,
}

impl NetState {
    /// Checks the state against itself and against a device of `pairs` queue pairs with a
    /// MAC (`has_mac`) and an MTU (`has_mtu`) or not (what decides the features offered,
    /// which the driver negotiated); returns the receive filter.
    pub(crate) fn validate(
        &self,
        pairs: u16,
        has_mac: bool,
        has_mtu: bool,
    ) -> Result<RxFilter, Error> {
        let bad = |what: String| Err(Error::State(what));
        if self.pairs != pairs {
            return bad(format!(
                "{} queue pairs in the snapshot; the restored device has {pairs}",
                self.pairs
            ));
        }
        if self.active_pairs == 0 || self.active_pairs > self.pairs {
            return bad(format!(
                "{} queue pairs in use of {}",
                self.active_pairs, self.pairs
            ));
        }
        if self.mac.is_some() != has_mac {
            return bad(presence(("a MAC", "MAC"), self.mac.is_some()));
        }
        if self.mtu.is_some() != has_mtu {
            return bad(presence(("an MTU", "MTU"), self.mtu.is_some()));
        }
        if let Some(mtu) = self.mtu.filter(|m| *m < 68) {
            return Err(Error::Mtu(mtu));
        }
        for (name, table) in [("unicast", &self.unicast), ("multicast", &self.multicast)] {
            if table.len() > MAX_MAC_TABLE_ENTRIES {
                return bad(format!(
                    "{} {name} filter entries; at most {MAX_MAC_TABLE_ENTRIES}",
                    table.len()
                ));
            }
        }
        Ok(RxFilter {
            promiscuous: self.promiscuous,
            all_multicast: self.all_multicast,
            unicast: self.unicast.clone(),
            multicast: self.multicast.clone(),
        })
    }
}

/// "had a MAC; … none" or "had no MAC; … one": `(with article, bare)`.
fn presence((a, bare): (&str, &str), saved: bool) -> String {
    if saved {
        format!("the snapshot's device had {a}; the restored one has none")
    } else {
        format!("the snapshot's device had no {bare}; the restored one has one")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> NetState {
        NetState {
            mac: Some([2, 0, 0, 0, 0, 1]),
            mtu: Some(1500),
            pairs: 2,
            active_pairs: 2,
            promiscuous: false,
            all_multicast: true,
            unicast: vec![[2, 0, 0, 0, 0, 2]],
            multicast: vec![[1, 0, 0x5e, 0, 0, 1]],
        }
    }

    fn refused(f: impl FnOnce(&mut NetState)) -> String {
        let mut s = state();
        f(&mut s);
        s.validate(2, true, true).unwrap_err().to_string()
    }

    #[test]
    fn a_good_state_gives_its_filter() {
        let f = state().validate(2, true, true).unwrap();
        assert!(!f.promiscuous && f.all_multicast);
        assert_eq!(f.unicast, [[2, 0, 0, 0, 0, 2]]);
        assert_eq!(f.multicast, [[1, 0, 0x5e, 0, 0, 1]]);
    }

    #[test]
    fn hostile_states_are_refused() {
        let prefix = "invalid virtio-net state: ";
        let cases = [
            (
                refused(|s| s.pairs = 3),
                "3 queue pairs in the snapshot; the restored device has 2",
            ),
            (refused(|s| s.active_pairs = 0), "0 queue pairs in use of 2"),
            (refused(|s| s.active_pairs = 3), "3 queue pairs in use of 2"),
            (
                refused(|s| s.mac = None),
                "the snapshot's device had no MAC; the restored one has one",
            ),
            (
                refused(|s| s.unicast = vec![[0; 6]; 257]),
                "257 unicast filter entries; at most 256",
            ),
            (
                refused(|s| s.multicast = vec![[1; 6]; 300]),
                "300 multicast filter entries; at most 256",
            ),
        ];
        for (got, want) in cases {
            assert_eq!(got, format!("{prefix}{want}"));
        }
        assert_eq!(refused(|s| s.mtu = Some(67)), "MTU 67 is below 68");
        let no_mtu = NetState {
            mtu: None,
            ..state()
        };
        assert!(no_mtu.validate(2, true, true).is_err());
        assert!(no_mtu.validate(2, true, false).is_ok());
    }
}
