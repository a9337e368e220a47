//! `vmkit_fuzz_common::io_bus`: see that module for what it drives and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz_common::io_bus::fuzz(data));
