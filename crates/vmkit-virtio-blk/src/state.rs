//! Snapshot/restore of a [`Block`] device's own state (the rings and negotiated features
//! belong to the transport).

use crate::device::Block;
use crate::request::ID_BYTES;
use crate::Error;
use vmkit_virtio::MappedMemory;

/// The device-specific state of a [`Block`] for a snapshot, taken by [`Block::state`] while
/// the device is quiesced (`VirtioDevice::quiesce` waits for every request in flight in the
/// engine and completes it into the used ring: nothing is in flight when it returns).
///
/// The write-cache mode is not here: the device offers no `CONFIG_WCE`, so the guest
/// cannot toggle it, and `writeback` follows the negotiated `VIRTIO_BLK_F_FLUSH`, which the
/// transport's restore hands back through `ack_features`. Counters, metrics and the rate
/// limiter's buckets are not saved (the limiter starts full).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// The capacity the guest saw, in 512-byte sectors: the restored image must have it.
    pub capacity: u64,
    /// Whether the device was read-only (the guest negotiated `VIRTIO_BLK_F_RO` or not):
    /// the restored device must be the same.
    pub read_only: bool,
    /// The logical block size the guest saw: the restored device must have it.
    pub block_size: u32,
    /// The number of request queues: the restored device must have as many.
    pub queues: u16,
    /// The serial the guest reads with `GET_ID` (at most 20 bytes): restored as it was.
    pub serial: Vec<u8>,
}

impl<M: MappedMemory> Block<M> {
    /// The device's state for a snapshot. Take it after `quiesce` (nothing in flight).
    pub fn state(&self) -> BlockState {
        let serial = self.serial_bytes();
        let len = serial.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        BlockState {
            capacity: self.capacity(),
            read_only: self.read_only(),
            block_size: self.block_size(),
            queues: self.queue_count(),
            serial: serial[..len].to_vec(),
        }
    }

    /// Restores `state` into a device freshly built from its image, before the transport
    /// re-activates it: the image, read-only mode, block size and queue count must be what
    /// the guest saw (a different one is an error naming both values); the serial is taken
    /// from the state. The activation that follows serves the requests the driver had made
    /// available (their notification may not have reached the paused device).
    pub fn restore(&mut self, state: &BlockState) -> Result<(), Error> {
        if state.serial.len() > ID_BYTES {
            return Err(Error::SerialTooLong(state.serial.len()));
        }
        if state.capacity != self.capacity() {
            return Err(Error::StateCapacity {
                saved: state.capacity,
                image: self.capacity(),
            });
        }
        if state.read_only != self.read_only() {
            return Err(Error::StateReadOnly {
                saved: state.read_only,
            });
        }
        if state.block_size != self.block_size() {
            return Err(Error::StateMismatch {
                what: "block size",
                saved: u64::from(state.block_size),
                device: u64::from(self.block_size()),
            });
        }
        if state.queues != self.queue_count() {
            return Err(Error::StateMismatch {
                what: "queue count",
                saved: u64::from(state.queues),
                device: u64::from(self.queue_count()),
            });
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..state.serial.len()].copy_from_slice(&state.serial);
        self.set_restored(serial);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockConfig;
    use std::fs::File;

    fn image(size: u64, name: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("vmkit-blk-state-{}-{name}.img", std::process::id()));
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    #[test]
    fn round_trip_and_refusals() {
        let path = image(1 << 20, "a");
        let mut config = BlockConfig::new(&path);
        config.serial = "disk-7".into();
        config.lock = false;
        let dev = Block::new(config.clone()).unwrap();
        let state = dev.state();
        assert_eq!(state.capacity, 2048);
        assert_eq!(state.serial, b"disk-7");
        assert_eq!(state.queues, 1);
        assert_eq!(state.block_size, 512);
        assert!(!state.read_only);

        // The serial comes from the state, not the new configuration.
        config.serial = String::new();
        let mut fresh = Block::new(config.clone()).unwrap();
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.state(), state);

        let mut bad = |f: &dyn Fn(&mut BlockState)| {
            let mut s = state.clone();
            f(&mut s);
            fresh.restore(&s).unwrap_err().to_string()
        };
        assert_eq!(
            bad(&|s| s.capacity = 4096),
            "restored disk image has 2048 sectors; the snapshot's had 4096"
        );
        assert_eq!(
            bad(&|s| s.read_only = true),
            "the snapshot's disk was read-only; the restored one is not"
        );
        assert_eq!(
            bad(&|s| s.block_size = 4096),
            "block size 4096 in the snapshot; the restored device has 512"
        );
        assert_eq!(
            bad(&|s| s.queues = 0),
            "queue count 0 in the snapshot; the restored device has 1"
        );
        assert_eq!(
            bad(&|s| s.serial = vec![b'x'; 21]),
            "serial of 21 bytes; at most 20"
        );
        std::fs::remove_file(path).unwrap();
    }
}
