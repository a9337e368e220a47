//! The benchmarks: VM-exit cost (`bench=pio`, `bench=mmio`) and virtio-blk
//! throughput (`bench=blk-...`).

pub mod blk;
pub mod exits;
