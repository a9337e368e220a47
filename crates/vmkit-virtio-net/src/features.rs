//! virtio-net feature bits (virtio 1.2 §5.1.3) and what they mean for a TAP's offloads.

/// The device handles packets with partial checksum (guest → host checksum offload).
pub const VIRTIO_NET_F_CSUM: u32 = 0;
/// The driver handles packets with partial checksum (host → guest).
pub const VIRTIO_NET_F_GUEST_CSUM: u32 = 1;
/// `mtu` in the configuration space is valid.
pub const VIRTIO_NET_F_MTU: u32 = 3;
/// `mac` in the configuration space is valid.
pub const VIRTIO_NET_F_MAC: u32 = 5;
/// The driver takes TSO over IPv4.
pub const VIRTIO_NET_F_GUEST_TSO4: u32 = 7;
/// The driver takes TSO over IPv6.
pub const VIRTIO_NET_F_GUEST_TSO6: u32 = 8;
/// The driver takes UFO.
pub const VIRTIO_NET_F_GUEST_UFO: u32 = 10;
/// The device takes TSO over IPv4.
pub const VIRTIO_NET_F_HOST_TSO4: u32 = 11;
/// The device takes TSO over IPv6.
pub const VIRTIO_NET_F_HOST_TSO6: u32 = 12;
/// The device takes TSO with ECN (not offered).
pub const VIRTIO_NET_F_HOST_ECN: u32 = 13;
/// The device takes UFO.
pub const VIRTIO_NET_F_HOST_UFO: u32 = 14;
/// The driver merges receive buffers: a frame may take several chains.
pub const VIRTIO_NET_F_MRG_RXBUF: u32 = 15;
/// `status` in the configuration space is valid.
pub const VIRTIO_NET_F_STATUS: u32 = 16;
/// There is a control queue.
pub const VIRTIO_NET_F_CTRL_VQ: u32 = 17;
/// The control queue takes RX mode commands (promiscuous, all-multicast).
pub const VIRTIO_NET_F_CTRL_RX: u32 = 18;
/// Several queue pairs, set through the control queue.
pub const VIRTIO_NET_F_MQ: u32 = 22;

/// `status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// The offloads a TAP does for frames it hands the VMM (`TUNSETOFFLOAD`'s `TUN_F_*` bits):
/// what the guest's driver accepted to receive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offloads(pub u32);

impl Offloads {
    /// Partial checksums (`TUN_F_CSUM`).
    pub const CSUM: Self = Self(libc::TUN_F_CSUM);
    /// TCP over IPv4 segments larger than the MTU (`TUN_F_TSO4`).
    pub const TSO4: Self = Self(libc::TUN_F_TSO4);
    /// TCP over IPv6 (`TUN_F_TSO6`).
    pub const TSO6: Self = Self(libc::TUN_F_TSO6);
    /// UDP fragmentation offload (`TUN_F_UFO`).
    pub const UFO: Self = Self(libc::TUN_F_UFO);

    /// Whether all of `other` is in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both sets.
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// The offloads a driver that negotiated `features` takes: none without
    /// `GUEST_CSUM` (segmentation offloads need partial checksums), else `CSUM` and each
    /// `GUEST_TSO4`/`GUEST_TSO6`/`GUEST_UFO` it accepted.
    pub fn for_guest(features: u64) -> Self {
        let has = |bit: u32| features & (1 << bit) != 0;
        if !has(VIRTIO_NET_F_GUEST_CSUM) {
            return Self::default();
        }
        let mut o = Self::CSUM;
        for (bit, off) in [
            (VIRTIO_NET_F_GUEST_TSO4, Self::TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, Self::TSO6),
            (VIRTIO_NET_F_GUEST_UFO, Self::UFO),
        ] {
            if has(bit) {
                o = o.union(off);
            }
        }
        o
    }

    /// The `GUEST_*` feature bits a device may offer when its backend can do these
    /// offloads (the inverse of [`for_guest`](Self::for_guest)).
    pub fn guest_features(self) -> u64 {
        if !self.contains(Self::CSUM) {
            return 0;
        }
        let mut f = 1 << VIRTIO_NET_F_GUEST_CSUM;
        for (bit, off) in [
            (VIRTIO_NET_F_GUEST_TSO4, Self::TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, Self::TSO6),
            (VIRTIO_NET_F_GUEST_UFO, Self::UFO),
        ] {
            if self.contains(off) {
                f |= 1 << bit;
            }
        }
        f
    }

    /// Whether the driver may be sent frames larger than the MTU (any segmentation offload).
    pub fn large_frames(self) -> bool {
        self.0 & (Self::TSO4.0 | Self::TSO6.0 | Self::UFO.0) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(list: &[u32]) -> u64 {
        list.iter().fold(0, |f, b| f | (1 << b))
    }

    #[test]
    fn guest_features_map_to_tun_offloads() {
        assert_eq!(Offloads::for_guest(0), Offloads(0));
        // Segmentation offloads without partial checksums are not applied.
        let tso_only = bits(&[VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6]);
        assert_eq!(Offloads::for_guest(tso_only), Offloads(0));
        assert_eq!(
            Offloads::for_guest(bits(&[VIRTIO_NET_F_GUEST_CSUM])),
            Offloads(libc::TUN_F_CSUM)
        );
        let all = bits(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4, // host-side bits do not matter here
        ]);
        assert_eq!(
            Offloads::for_guest(all),
            Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO)
        );
        assert!(Offloads::for_guest(all).large_frames());
        assert!(!Offloads::for_guest(bits(&[VIRTIO_NET_F_GUEST_CSUM])).large_frames());
    }

    #[test]
    fn offered_guest_features_follow_the_backend() {
        assert_eq!(Offloads(libc::TUN_F_TSO4).guest_features(), 0);
        let no_ufo = Offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
        assert_eq!(
            no_ufo.guest_features(),
            bits(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6
            ])
        );
        // Round trip: what is offered and accepted maps back to the same offloads.
        assert_eq!(Offloads::for_guest(no_ufo.guest_features()), no_ufo);
    }
}
