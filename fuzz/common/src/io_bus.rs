//! Placeholder until the target lands.

/// Runs one input.
pub fn fuzz(_data: &[u8]) {}
