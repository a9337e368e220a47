//! `vmkit_fuzz_common::api`: see that module for what it drives and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz_common::api::fuzz(data));
