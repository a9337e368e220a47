//! `vmkit_fuzz_common::snapshot_state`: see that module for what it drives and what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmkit_fuzz_common::snapshot_state::fuzz(data));
