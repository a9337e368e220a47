//! Transmit: one chain, checked, becomes one `writev` of its header (a checked copy on the
//! stack) and its payload (straight from guest memory).

use vm_memory::{Bytes, GuestAddress, Permissions};
use vmkit_virtio::{Descriptor, IoVecs, MappedMemory};

use crate::backend::NetBackend;
use crate::header::{HeaderError, NetHeader, NET_HDR_LEN};

/// The largest frame (header not counted) a driver may send or be sent: 64 KiB of IP
/// packet plus its Ethernet header, as with TSO.
pub const MAX_FRAME_LEN: usize = 65550;

/// Why a transmit chain was dropped.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TxDrop {
    /// Malformed chain, a buffer outside guest memory, or a device-writable buffer.
    #[error("malformed chain")]
    Malformed,
    /// Shorter than a header.
    #[error("chain of {0} bytes holds no header")]
    TooShort(usize),
    /// Larger than a header and [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is too large")]
    TooLarge(usize),
    /// The header asks for what was not negotiated or does not fit the frame.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The backend refused the frame.
    #[error("backend: {0}")]
    Backend(std::io::Error),
}

/// Sends one transmit chain through `backend`; returns the frame's length (header not
/// counted).
pub(crate) fn send_chain<M: MappedMemory>(
    memory: &M,
    descs: &[Descriptor],
    features: u64,
    backend: &mut dyn NetBackend,
    iov: &mut IoVecs,
) -> Result<usize, TxDrop> {
    let mut total: usize = 0;
    for d in descs {
        if d.is_write_only() {
            return Err(TxDrop::Malformed);
        }
        total = total.saturating_add(d.len() as usize);
    }
    let frame_len = total
        .checked_sub(NET_HDR_LEN)
        .ok_or(TxDrop::TooShort(total))?;
    if frame_len > MAX_FRAME_LEN {
        return Err(TxDrop::TooLarge(frame_len));
    }
    let mut header = [0u8; NET_HDR_LEN];
    let payload = read_header(memory, descs, &mut header)?;
    let mut h = NetHeader::from_bytes(&header);
    h.check_tx(frame_len, features)?;
    h.num_buffers = 0;
    let mut header = h.to_bytes();
    iov.clear();
    iov.push_host(&mut header);
    let pushed = push_payload(memory, descs, payload, iov);
    let sent = match pushed {
        // SAFETY: the first iovec is `header`, alive until after the call; the others point
        // into guest memory, which `memory` keeps mapped, checked readable by `push`.
        Ok(()) => unsafe { backend.send(iov.as_slice()) }.map_err(TxDrop::Backend),
        Err(e) => Err(e),
    };
    // On every path: the list must not keep a pointer to `header` past this frame.
    iov.clear();
    sent.map(|_| frame_len)
}

/// Appends the payload's buffers (from descriptor `first`, offset `skip` in it) to `iov`.
fn push_payload<M: MappedMemory>(
    memory: &M,
    descs: &[Descriptor],
    (first, mut skip): (usize, usize),
    iov: &mut IoVecs,
) -> Result<(), TxDrop> {
    for d in &descs[first..] {
        // `skip` is at most the first descriptor's length, then 0.
        let len = (d.len() as usize) - skip;
        let addr = GuestAddress(d.addr().0 + skip as u64);
        iov.push(memory, addr, len, Permissions::Read)
            .map_err(|_| TxDrop::Malformed)?;
        skip = 0;
    }
    Ok(())
}

/// Copies the header (which may be split across buffers) into `out`; returns where the
/// payload starts: the descriptor index and the offset in it.
fn read_header<M: MappedMemory>(
    memory: &M,
    descs: &[Descriptor],
    out: &mut [u8; NET_HDR_LEN],
) -> Result<(usize, usize), TxDrop> {
    let mut got = 0;
    for (i, d) in descs.iter().enumerate() {
        let n = (d.len() as usize).min(NET_HDR_LEN - got);
        memory
            .read_slice(&mut out[got..got + n], d.addr())
            .map_err(|_| TxDrop::Malformed)?;
        got += n;
        if got == NET_HDR_LEN {
            return Ok((i, n));
        }
    }
    Err(TxDrop::TooShort(got))
}
