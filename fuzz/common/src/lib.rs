//! What vmkit's fuzz targets share: structure-aware input types (`arbitrary`), harnesses that
//! drive the real devices, transports and buses, and the oracles that judge a run.
//!
//! Each target module has `fuzz(data: &[u8])`, which decodes the input from the fuzzer's bytes
//! and runs it, panicking when an oracle fails. The cargo-fuzz targets in `fuzz/fuzz_targets/`
//! are one call to it; the unit tests here call the same function on every checked-in
//! reproducer (`fuzz/regressions/<target>/`), on generated seeds and on the local corpus, so
//! the oracles and regressions run on stable in `cargo test`, without nightly or libFuzzer.
//!
//! | module | what it holds |
//! |---|---|
//! | [`guest`] | guest memory of two adjacent regions, and the write oracle (what changed outside the buffers the driver made writable) |
//! | [`ring`] | descriptor tables, indirect tables and available rings written into guest memory from structured input; chain builders |
//! | [`driver`] | a virtio driver for the transport targets: the initialisation, any step alone or out of order, raw register accesses of any width and offset, and a legitimate request after the hostile sequence |
//! | [`devices`] | what the device harnesses share: a recording interrupt, a memfd disk, a shared output |
//! | [`seeds`] | deterministic seed inputs for every target |
//!
//! # Example
//!
//! ```
//! // Any bytes are an input; a run panics only if an oracle fails.
//! vmkit_fuzz_common::virtqueue::fuzz(&[0u8; 64]);
//! ```

pub mod api;
pub mod blk_device;
pub mod blk_request;
pub mod console;
pub mod devices;
pub mod driver;
pub mod guest;
pub mod io_bus;
pub mod kernel_image;
pub mod legacy_pio;
pub mod msix;
pub mod net_queues;
pub mod pci_config;
pub mod replay;
pub mod ring;
pub mod rng;
pub mod seeds;
pub mod snapshot_state;
pub mod transport_restore;
pub mod virtio_mmio;
pub mod virtio_pci;
pub mod virtqueue;
pub mod vsock_queues;

/// A target: its name (as in `fuzz/fuzz_targets/<name>.rs`) and its entry point.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: &[Target] = &[
    ("api", api::fuzz),
    ("blk_device", blk_device::fuzz),
    ("blk_request", blk_request::fuzz),
    ("console", console::fuzz),
    ("io_bus", io_bus::fuzz),
    ("kernel_image", kernel_image::fuzz),
    ("legacy_pio", legacy_pio::fuzz),
    ("msix", msix::fuzz),
    ("net_queues", net_queues::fuzz),
    ("pci_config", pci_config::fuzz),
    ("rng", rng::fuzz),
    ("snapshot_state", snapshot_state::fuzz),
    ("transport_restore", transport_restore::fuzz),
    ("virtio_mmio", virtio_mmio::fuzz),
    ("virtio_pci", virtio_pci::fuzz),
    ("virtqueue", virtqueue::fuzz),
    ("vsock_queues", vsock_queues::fuzz),
];
