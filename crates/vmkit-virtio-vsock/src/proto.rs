//! The virtio-vsock protocol's numbers (virtio 1.2 §5.10) and the header fields the device
//! acts on.

use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::bitmap::BitmapSlice;

/// The virtio device ID of a socket device.
pub const VSOCK_DEVICE_TYPE: u32 = 19;
/// The host's CID: where guest packets must be addressed.
pub const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_F_STREAM`: stream sockets (the only type this device offers).
pub const VIRTIO_VSOCK_F_STREAM: u32 = 0;
/// The largest payload of one packet the device accepts or sends (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_LEN: u32 = 64 * 1024;
/// The size of the configuration space: `guest_cid`, a little-endian u64.
pub const CONFIG_SPACE_SIZE: usize = 8;
/// The queues: receive (device to driver), transmit, event.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue (driver to device).
pub const TX_QUEUE: u16 = 1;
/// The event queue (transport reset).
pub const EVENT_QUEUE: u16 = 2;

pub(crate) const TYPE_STREAM: u16 = 1;

pub(crate) const OP_REQUEST: u16 = 1;
pub(crate) const OP_RESPONSE: u16 = 2;
pub(crate) const OP_RST: u16 = 3;
pub(crate) const OP_SHUTDOWN: u16 = 4;
pub(crate) const OP_RW: u16 = 5;
pub(crate) const OP_CREDIT_UPDATE: u16 = 6;
pub(crate) const OP_CREDIT_REQUEST: u16 = 7;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more.
pub(crate) const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more.
pub(crate) const SHUTDOWN_SEND: u32 = 2;
pub(crate) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
pub(crate) const EVENT_TRANSPORT_RESET: u32 = 0;

/// A packet header as read once from a transmit chain (virtio-vsock copies it out of guest
/// memory when it parses the chain, so the driver cannot change it under the device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub(crate) fn of<B: BitmapSlice>(p: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }

    /// The header's wire form.
    pub(crate) fn to_bytes(self) -> [u8; PKT_HEADER_SIZE] {
        let mut b = [0u8; PKT_HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_wire_form_matches_virtio_vsock() {
        let h = Header {
            src_cid: 2,
            dst_cid: 0x1234_5678_9abc,
            src_port: 7,
            dst_port: 0xdead_beef,
            len: 100,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 1 << 18,
            fwd_cnt: 42,
        };
        let mut bytes = [0u8; PKT_HEADER_SIZE];
        // SAFETY: `bytes` outlives the packet and nothing else touches it meanwhile.
        let mut p = unsafe { VsockPacket::new(&mut bytes, None) }.unwrap();
        p.set_header_from_raw(&h.to_bytes()).unwrap();
        assert_eq!(Header::of(&p), h);
        assert_eq!(bytes, h.to_bytes());
    }
}
