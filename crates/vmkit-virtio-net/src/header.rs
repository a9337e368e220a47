//! The virtio-net header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6) and what a
//! transmitted one may say.

use crate::features::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
};

/// The header's size with `VIRTIO_F_VERSION_1` (always negotiated here): 12 bytes.
pub const NET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` (le16) in the header.
pub const NUM_BUFFERS_OFFSET: usize = 10;

/// `flags`: the driver left the checksum at `csum_start + csum_offset` to the device.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum is known good (receive only).
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `gso_type`: not a segmentation offload.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 to be segmented.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP to be fragmented.
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 to be segmented.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type` bit: TCP ECN (needs `HOST_ECN`, never offered).
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// A virtio-net header, decoded from its 12 little-endian bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Maximum segment size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// How many buffers a received frame took (mergeable receive buffers).
    pub num_buffers: u16,
}

/// Why a transmitted frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Flags other than `NEEDS_CSUM`.
    #[error("header flags {0:#x} are not allowed on transmit")]
    Flags(u8),
    /// `NEEDS_CSUM` without `VIRTIO_NET_F_CSUM` negotiated.
    #[error("checksum offload requested but not negotiated")]
    CsumNotNegotiated,
    /// The checksum field lies outside the frame.
    #[error("checksum at {start}+{offset} is outside the {len}-byte frame")]
    CsumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The frame's length.
        len: usize,
    },
    /// An unknown GSO type, or one whose feature was not negotiated.
    #[error("gso type {0:#x} is unknown or not negotiated")]
    GsoType(u8),
    /// A segmentation offload without `NEEDS_CSUM`, with a zero segment size, or with a
    /// header length past the frame.
    #[error(
        "segmentation offload with gso_size {gso_size}, hdr_len {hdr_len} on a {len}-byte frame"
    )]
    Gso {
        /// `gso_size`.
        gso_size: u16,
        /// `hdr_len`.
        hdr_len: u16,
        /// The frame's length.
        len: usize,
    },
}

impl NetHeader {
    /// Decodes the 12 header bytes.
    pub fn from_bytes(b: &[u8; NET_HDR_LEN]) -> Self {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le16(2),
            gso_size: le16(4),
            csum_start: le16(6),
            csum_offset: le16(8),
            num_buffers: le16(10),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
            self.num_buffers,
        ]
        .into_iter()
        .enumerate()
        {
            b[2 + 2 * i..4 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Checks a header the driver put in front of a `frame_len`-byte frame (the header not
    /// counted) against the negotiated `features`: only `NEEDS_CSUM`, and only with
    /// `VIRTIO_NET_F_CSUM`, its checksum field inside the frame; a GSO type only with its
    /// `HOST_*` feature, with `NEEDS_CSUM`, a segment size and headers inside the frame.
    pub fn check_tx(&self, frame_len: usize, features: u64) -> Result<(), HeaderError> {
        let has = |bit: u32| features & (1 << bit) != 0;
        if self.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            return Err(HeaderError::Flags(self.flags));
        }
        let needs_csum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if needs_csum {
            if !has(VIRTIO_NET_F_CSUM) {
                return Err(HeaderError::CsumNotNegotiated);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::CsumOutside {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len: frame_len,
                });
            }
        }
        let feature = match self.gso_type {
            VIRTIO_NET_HDR_GSO_NONE => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP => VIRTIO_NET_F_HOST_UFO,
            other => return Err(HeaderError::GsoType(other)),
        };
        if !has(feature) {
            return Err(HeaderError::GsoType(self.gso_type));
        }
        if !needs_csum || self.gso_size == 0 || usize::from(self.hdr_len) > frame_len {
            return Err(HeaderError::Gso {
                gso_size: self.gso_size,
                hdr_len: self.hdr_len,
                len: frame_len,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::VIRTIO_NET_F_HOST_ECN;

    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_UFO);

    fn tso(gso_type: u8) -> NetHeader {
        NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    #[test]
    fn bytes_round_trip_little_endian() {
        let h = tso(VIRTIO_NET_HDR_GSO_TCPV4);
        let b = h.to_bytes();
        assert_eq!(b, [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0]);
        assert_eq!(NetHeader::from_bytes(&b), h);
    }

    #[test]
    fn plain_frames_pass_with_no_features() {
        assert_eq!(NetHeader::default().check_tx(60, 0), Ok(()));
        assert_eq!(NetHeader::default().check_tx(0, 0), Ok(()));
    }

    #[test]
    fn checksum_offload_needs_the_feature_and_a_field_inside() {
        let mut h = NetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        assert_eq!(h.check_tx(100, 0), Err(HeaderError::CsumNotNegotiated));
        assert_eq!(h.check_tx(52, ALL), Ok(()));
        assert!(matches!(
            h.check_tx(51, ALL),
            Err(HeaderError::CsumOutside { .. })
        ));
        h.csum_start = u16::MAX;
        h.csum_offset = u16::MAX;
        // No overflow: the sum is computed wide.
        assert_eq!(h.check_tx(131_072, ALL), Ok(()));
        assert!(matches!(
            h.check_tx(131_071, ALL),
            Err(HeaderError::CsumOutside { .. })
        ));
    }

    #[test]
    fn receive_only_and_unknown_flags_are_refused() {
        for flags in [VIRTIO_NET_HDR_F_DATA_VALID, 4, 0x80] {
            let h = NetHeader {
                flags,
                ..Default::default()
            };
            assert_eq!(h.check_tx(100, ALL), Err(HeaderError::Flags(flags)));
        }
    }

    #[test]
    fn each_gso_type_needs_its_feature() {
        for (t, f) in [
            (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_F_HOST_TSO4),
            (VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_F_HOST_TSO6),
            (VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_F_HOST_UFO),
        ] {
            let h = tso(t);
            assert_eq!(h.check_tx(3000, ALL), Ok(()));
            assert_eq!(
                h.check_tx(3000, ALL & !(1 << f)),
                Err(HeaderError::GsoType(t))
            );
        }
        for t in [2, 5, VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN] {
            let all = ALL | (1 << VIRTIO_NET_F_HOST_ECN);
            assert_eq!(tso(t).check_tx(3000, all), Err(HeaderError::GsoType(t)));
        }
    }

    #[test]
    fn gso_needs_csum_a_size_and_headers_inside() {
        let mut h = tso(VIRTIO_NET_HDR_GSO_TCPV4);
        h.gso_size = 0;
        assert!(matches!(
            h.check_tx(3000, ALL),
            Err(HeaderError::Gso { .. })
        ));
        let mut h = tso(VIRTIO_NET_HDR_GSO_TCPV4);
        h.hdr_len = 3001;
        assert!(matches!(
            h.check_tx(3000, ALL),
            Err(HeaderError::Gso { .. })
        ));
        let mut h = tso(VIRTIO_NET_HDR_GSO_TCPV4);
        h.flags = 0;
        assert!(matches!(
            h.check_tx(3000, ALL),
            Err(HeaderError::Gso { .. })
        ));
    }
}
