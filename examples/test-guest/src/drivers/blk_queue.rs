//! `BlkQueue`: queue 0 of a virtio-blk device driven directly, for what
//! virtio-drivers' `VirtIOBlk` does not offer: DISCARD and WRITE_ZEROES, and
//! more requests in flight than its 16-entry queue holds (the benchmarks).
//!
//! It is the crate's `VirtQueue` on a `StrictTransport` (so the device is
//! initialised in the specification's order), with the requests built
//! here: a 16-byte header {type, reserved, sector}, the data or a 16-byte
//! segment {sector u64, num_sectors u32, flags u32}, and a status byte, in
//! direct descriptors. Polled, without EVENT_IDX: notifications go through
//! the ring flags (the driver's NO_INTERRUPT always set, the device's
//! NO_NOTIFY honoured after a full fence). virtio-drivers 0.13's EVENT_IDX
//! check (`avail_idx >= avail_event + 1`, not wrapping) never kicks a batch
//! that takes `avail_idx` past 65535 while `avail_event` has not, and `add`
//! has no full fence between publishing `avail_idx` and `should_notify`
//! reading the device's side; both stalled queue depth 32.

use crate::drivers::blk::TIMEOUT_US;
use crate::drivers::hal::GuestHal;
use crate::drivers::spec::{blk_feature, blk_request, F_VERSION_1};
use crate::drivers::transport::StrictTransport;
use crate::platform::arch::{pause, rdtsc};
use crate::platform::time::us_to_cycles;
use alloc::format;
use alloc::string::String;
use core::sync::atomic::{fence, Ordering};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

/// Features `BlkQueue` can work with.
pub const FEATURES: u64 = F_VERSION_1
    | blk_feature::RO
    | blk_feature::FLUSH
    | blk_feature::SEG_MAX
    | blk_feature::SIZE_MAX
    | blk_feature::BLK_SIZE
    | blk_feature::DISCARD
    | blk_feature::WRITE_ZEROES;

/// A request header: type, reserved, sector (little-endian).
pub fn header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Queue 0 of a block device with `N` descriptors, polled.
pub struct BlkQueue<const N: usize> {
    /// Declared first: dropped (device reset, confirmed) before the queue
    /// memory.
    transport: StrictTransport,
    queue: VirtQueue<GuestHal, N>,
    /// The negotiated features.
    pub features: u64,
    /// Notifications sent.
    pub notifies: u64,
}

impl<const N: usize> BlkQueue<N> {
    /// Initialises the device (virtio 1.2, 3.1.1, through
    /// `StrictTransport`) with `want` ∩ offered, and sets up queue 0.
    pub fn new(mut transport: StrictTransport, want: u64) -> Result<Self, String> {
        let health = transport.health();
        let features = transport.negotiate(want);
        health.check()?;
        let mut queue = VirtQueue::new(&mut transport, 0, false, false)
            .map_err(|e| health.explain(format!("queue of {}: {}", N, e)))?;
        transport.finish_init();
        // Polled: no used-buffer interrupts (VIRTQ_AVAIL_F_NO_INTERRUPT).
        queue.set_dev_notify(false);
        Ok(BlkQueue {
            transport,
            queue,
            features,
            notifies: 0,
        })
    }

    /// Notifies the device unless it suppressed notifications: the
    /// available index is published before the device's flags are read
    /// (a full fence: a store followed by a load may pass it otherwise).
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        if self.queue.should_notify() {
            self.transport.notify(0);
            self.notifies += 1;
        }
    }

    /// Adds a request (not notified: see `kick`); returns its token.
    ///
    /// # Safety
    /// The buffers must not be touched until `complete` returns them for
    /// this token, or the device is reset (this queue dropped) first.
    pub unsafe fn submit<'a, 'b>(
        &mut self,
        inputs: &'a [&'b [u8]],
        outputs: &'a mut [&'b mut [u8]],
    ) -> Result<u16, String> {
        // SAFETY: the caller keeps the buffers alone until completion or reset.
        unsafe { self.queue.add(inputs, outputs) }.map_err(|e| format!("add: {}", e))
    }

    /// The token of the next completion, if there is one.
    pub fn peek_used(&self) -> Option<u16> {
        self.queue.peek_used()
    }

    /// Takes the completion of `token`.
    ///
    /// # Safety
    /// The buffers must be those `submit` was given for `token`.
    pub unsafe fn complete<'a>(
        &mut self,
        token: u16,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> Result<u32, String> {
        // SAFETY: the caller passes the buffers given to `add` for `token`.
        unsafe { self.queue.pop_used(token, inputs, outputs) }.map_err(|e| format!("pop: {}", e))
    }

    /// One request, waited for (5 s; then the device is reset, since the
    /// buffers are about to go away).
    fn run<'a>(
        &mut self,
        inputs: &'a [&'a [u8]],
        outputs: &'a mut [&'a mut [u8]],
    ) -> Result<(), String> {
        // SAFETY: the buffers stay borrowed until `complete` below, or the
        // device is reset before this returns.
        let token = unsafe { self.submit(inputs, outputs) }?;
        self.kick();
        let end = rdtsc() + us_to_cycles(TIMEOUT_US);
        while self.queue.peek_used().is_none() {
            if rdtsc() > end {
                return Err(match self.transport.reset() {
                    Ok(()) => String::from("request not completed in 5 s"),
                    Err(f) => format!("request not completed in 5 s; {}", f),
                });
            }
            pause();
        }
        // SAFETY: the buffers given to `submit` for `token`.
        unsafe { self.complete(token, inputs, outputs) }.map(|_| ())
    }

    /// A read or write of `data` at `sector`; returns the status byte.
    pub fn read_write(&mut self, write: bool, sector: u64, data: &mut [u8]) -> Result<u8, String> {
        let kind = if write {
            blk_request::OUT
        } else {
            blk_request::IN
        };
        let hdr = header(kind, sector);
        let mut status = [0xffu8];
        if write {
            self.run(&[&hdr, data], &mut [&mut status])?;
        } else {
            self.run(&[&hdr], &mut [data, &mut status])?;
        }
        Ok(status[0])
    }

    /// A DISCARD or WRITE_ZEROES (`kind`) of one segment, `sectors` from
    /// `sector`; returns the status byte.
    pub fn segment_request(
        &mut self,
        kind: u32,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> Result<u8, String> {
        let hdr = header(kind, 0);
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        let mut status = [0xffu8];
        self.run(&[&hdr, &seg], &mut [&mut status])?;
        Ok(status[0])
    }

    /// A 32-bit field of the device configuration (0 when unreadable).
    pub fn config_u32(&self, offset: usize) -> u32 {
        self.transport.read_config_space::<u32>(offset).unwrap_or(0)
    }
}
