//! The tests.

pub mod timer;
