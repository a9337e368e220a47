//! The benchmarks: VM-exit cost (`bench=pio`, `bench=mmio`), virtio-blk
//! throughput (`bench=blk-...`), small-frame rate over virtio-net
//! (`bench=net-tx`, `bench=net-rx`), virtio-vsock throughput and connection
//! latency (`bench=vsock-tx`, `bench=vsock-rx`, `bench=vsock-lat`), and
//! `hold=`, which keeps the guest alive for a footprint measurement from
//! outside.

pub mod blk;
pub mod exits;
pub mod hold;
pub mod net;
pub mod vsock;
