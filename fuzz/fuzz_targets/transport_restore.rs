//! `vmkit_fuzz_common::transport_restore`: see that module for what it drives and what it
//! checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz_common::transport_restore::fuzz(data));
