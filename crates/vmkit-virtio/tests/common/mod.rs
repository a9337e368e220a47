//! What both driver tests use: a minimal entropy device.

#![allow(dead_code)]

use vm_memory::Bytes;
use vmkit_virtio::{ActivateContext, ActivateError, VirtioDevice};

/// A minimal entropy device: fills writable buffers with an incrementing byte pattern.
#[derive(Default)]
pub struct PatternRng {
    pub ring_features: Option<u64>,
    pub acked: u64,
    pub next: u8,
    pub active: Option<ActivateContext>,
    pub activations: usize,
}

impl VirtioDevice for PatternRng {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn ring_features(&self) -> u64 {
        self.ring_features.unwrap_or(vmkit_virtio::RING_FEATURES)
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queue(0).is_none() {
            return Err(ActivateError::MissingQueue(0));
        }
        self.activations += 1;
        self.active = Some(ctx);
        Ok(())
    }
    fn process_queue(&mut self, index: u16) {
        let next = &mut self.next;
        let Some(q) = self.active.as_mut().and_then(|c| c.queue_mut(index)) else {
            return;
        };
        while let Some(chain) = q.pop().unwrap() {
            let mut written = 0u32;
            let descs = chain.descriptors().unwrap_or_default();
            for d in descs.iter().filter(|d| d.is_write_only()) {
                let bytes: Vec<u8> = (0..d.len())
                    .map(|_| {
                        *next = next.wrapping_add(1);
                        *next
                    })
                    .collect();
                chain.memory().write_slice(&bytes, d.addr()).unwrap();
                written += d.len();
            }
            let head = chain.head();
            q.complete(head, written).unwrap();
        }
        q.signal_used().unwrap();
    }
    fn reset(&mut self) -> Option<ActivateContext> {
        self.acked = 0;
        self.next = 0;
        self.active.take()
    }
}
