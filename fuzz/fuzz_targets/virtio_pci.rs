//! `vmkit_fuzz_common::virtio_pci`: see that module for what it drives and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz_common::virtio_pci::fuzz(data));
