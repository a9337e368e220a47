//! The control queue's commands (virtio 1.2 §5.1.6.5): receive mode, MAC filter, queue
//! pairs; and the receive filter they set.

use crate::features::{VIRTIO_NET_F_CTRL_RX, VIRTIO_NET_F_MQ};

/// Class: receive mode (`VIRTIO_NET_CTRL_RX`).
pub const VIRTIO_NET_CTRL_RX: u8 = 0;
/// Receive mode command: promiscuous on/off.
pub const VIRTIO_NET_CTRL_RX_PROMISC: u8 = 0;
/// Receive mode command: all multicast on/off.
pub const VIRTIO_NET_CTRL_RX_ALLMULTI: u8 = 1;
/// Class: MAC filter (`VIRTIO_NET_CTRL_MAC`).
pub const VIRTIO_NET_CTRL_MAC: u8 = 1;
/// MAC command: set the unicast and multicast filter tables.
pub const VIRTIO_NET_CTRL_MAC_TABLE_SET: u8 = 0;
/// Class: multi-queue (`VIRTIO_NET_CTRL_MQ`).
pub const VIRTIO_NET_CTRL_MQ: u8 = 4;
/// MQ command: how many queue pairs the driver uses.
pub const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
/// Command status: done.
pub const VIRTIO_NET_OK: u8 = 0;
/// Command status: refused.
pub const VIRTIO_NET_ERR: u8 = 1;
/// The most bytes a command (class, command, data) may have; longer ones are refused.
pub const MAX_CTRL_BYTES: usize = 4096;
/// The most addresses in each MAC filter table.
pub const MAX_MAC_TABLE_ENTRIES: usize = 256;

/// Which frames reach the driver: those addressed to its MAC, broadcast, and what the
/// control queue allowed (virtio 1.2 §5.1.6.5.1-2). Before any command every frame does
/// (promiscuous), as QEMU does, so a driver without `CTRL_RX` misses nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    /// Every frame.
    pub promiscuous: bool,
    /// Every multicast frame.
    pub all_multicast: bool,
    /// Unicast addresses accepted besides the device's own.
    pub unicast: Vec<[u8; 6]>,
    /// Multicast addresses accepted.
    pub multicast: Vec<[u8; 6]>,
}

impl Default for RxFilter {
    fn default() -> Self {
        Self {
            promiscuous: true,
            all_multicast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
        }
    }
}

impl RxFilter {
    /// Whether a frame to `dest` reaches a driver whose address is `own`. Without an
    /// address of the device's (`None`: the driver picked its own, which the device does
    /// not know), every unicast frame does.
    pub fn accepts(&self, own: Option<&[u8; 6]>, dest: &[u8; 6]) -> bool {
        if self.promiscuous || dest == &[0xff; 6] {
            return true;
        }
        if dest[0] & 1 != 0 {
            return self.all_multicast || self.multicast.contains(dest);
        }
        own.is_none_or(|own| dest == own) || self.unicast.contains(dest)
    }
}

/// What a command changed besides the filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlEffect {
    /// Nothing else.
    None,
    /// The driver now uses this many queue pairs.
    QueuePairs(u16),
}

/// Runs one command (`class`, `command`, then its data) and returns its status
/// (`VIRTIO_NET_OK` or `VIRTIO_NET_ERR`) and effect. Commands of features the driver did not
/// negotiate, unknown ones and malformed data are refused and change nothing.
pub fn execute(
    cmd: &[u8],
    features: u64,
    max_pairs: u16,
    filter: &mut RxFilter,
) -> (u8, CtrlEffect) {
    let has = |bit: u32| features & (1 << bit) != 0;
    let refused = (VIRTIO_NET_ERR, CtrlEffect::None);
    let [class, command, data @ ..] = cmd else {
        return refused;
    };
    match (*class, *command) {
        (VIRTIO_NET_CTRL_RX, c) if has(VIRTIO_NET_F_CTRL_RX) => {
            let [on] = data else { return refused };
            match c {
                VIRTIO_NET_CTRL_RX_PROMISC => filter.promiscuous = *on != 0,
                VIRTIO_NET_CTRL_RX_ALLMULTI => filter.all_multicast = *on != 0,
                _ => return refused,
            }
            (VIRTIO_NET_OK, CtrlEffect::None)
        }
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) if has(VIRTIO_NET_F_CTRL_RX) => {
            let Some((unicast, rest)) = mac_table(data) else {
                return refused;
            };
            let Some((multicast, [])) = mac_table(rest) else {
                return refused;
            };
            filter.unicast = unicast;
            filter.multicast = multicast;
            (VIRTIO_NET_OK, CtrlEffect::None)
        }
        (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if has(VIRTIO_NET_F_MQ) => {
            let [lo, hi] = data else { return refused };
            let pairs = u16::from_le_bytes([*lo, *hi]);
            if pairs == 0 || pairs > max_pairs {
                return refused;
            }
            (VIRTIO_NET_OK, CtrlEffect::QueuePairs(pairs))
        }
        _ => refused,
    }
}

/// One `struct virtio_net_ctrl_mac` (le32 entries, then 6 bytes each) and what follows it.
fn mac_table(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let (count, rest) = data.split_first_chunk::<4>()?;
    let count = usize::try_from(u32::from_le_bytes(*count)).ok()?;
    if count > MAX_MAC_TABLE_ENTRIES {
        return None;
    }
    let len = count.checked_mul(6)?;
    if rest.len() < len {
        return None;
    }
    let (table, rest) = rest.split_at(len);
    let macs = table
        .chunks_exact(6)
        .map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]])
        .collect();
    Some((macs, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES: u64 = (1 << VIRTIO_NET_F_CTRL_RX) | (1 << VIRTIO_NET_F_MQ);
    const OWN: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const OTHER: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
    const MCAST: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

    fn run(cmd: &[u8], filter: &mut RxFilter) -> (u8, CtrlEffect) {
        execute(cmd, FEATURES, 4, filter)
    }

    #[test]
    fn the_default_filter_takes_everything() {
        let f = RxFilter::default();
        assert!(f.accepts(Some(&OWN), &OTHER) && f.accepts(Some(&OWN), &MCAST));
    }

    #[test]
    fn without_an_address_every_unicast_frame_passes() {
        let f = RxFilter {
            promiscuous: false,
            ..Default::default()
        };
        assert!(f.accepts(None, &OTHER));
        assert!(!f.accepts(None, &MCAST));
        assert!(!f.accepts(Some(&OWN), &OTHER));
    }

    #[test]
    fn rx_mode_and_mac_tables_filter_frames() {
        let mut f = RxFilter::default();
        assert_eq!(run(&[0, 0, 0], &mut f).0, VIRTIO_NET_OK);
        assert!(f.accepts(Some(&OWN), &OWN));
        assert!(f.accepts(Some(&OWN), &[0xff; 6]));
        assert!(!f.accepts(Some(&OWN), &OTHER));
        assert!(!f.accepts(Some(&OWN), &MCAST));
        // One unicast, one multicast entry.
        let mut cmd = vec![1, 0, 1, 0, 0, 0];
        cmd.extend_from_slice(&OTHER);
        cmd.extend_from_slice(&[1, 0, 0, 0]);
        cmd.extend_from_slice(&MCAST);
        assert_eq!(run(&cmd, &mut f).0, VIRTIO_NET_OK);
        assert!(f.accepts(Some(&OWN), &OTHER) && f.accepts(Some(&OWN), &MCAST));
        assert!(!f.accepts(Some(&OWN), &[0x33, 0x33, 0, 0, 0, 2]));
        assert_eq!(run(&[0, 1, 1], &mut f).0, VIRTIO_NET_OK);
        assert!(f.accepts(Some(&OWN), &[0x33, 0x33, 0, 0, 0, 2]));
    }

    #[test]
    fn malformed_commands_change_nothing() {
        let mut f = RxFilter::default();
        let before = f.clone();
        for cmd in [
            &[][..],
            &[0],
            &[0, 0],
            &[0, 0, 1, 1],
            &[0, 7, 1],
            &[9, 0, 1],
            // MAC tables: count past the data, count past the bound, trailing bytes.
            &[1, 0, 2, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0],
            &[1, 0, 0xff, 0xff, 0xff, 0xff],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            &[1, 1, 1, 2, 3, 4, 5, 6],
            // Queue pairs: 0, more than the device has, short.
            &[4, 0, 0, 0],
            &[4, 0, 5, 0],
            &[4, 0, 1],
        ] {
            assert_eq!(
                run(cmd, &mut f),
                (VIRTIO_NET_ERR, CtrlEffect::None),
                "{cmd:?}"
            );
        }
        assert_eq!(f, before);
    }

    #[test]
    fn commands_need_their_features() {
        let mut f = RxFilter::default();
        assert_eq!(execute(&[0, 0, 0], 0, 4, &mut f).0, VIRTIO_NET_ERR);
        assert!(f.promiscuous);
        assert_eq!(execute(&[4, 0, 2, 0], 0, 4, &mut f).0, VIRTIO_NET_ERR);
        assert_eq!(
            run(&[4, 0, 4, 0], &mut f),
            (VIRTIO_NET_OK, CtrlEffect::QueuePairs(4))
        );
    }
}
