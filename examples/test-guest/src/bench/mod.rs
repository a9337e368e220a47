//! The benchmarks.

pub mod exits;
