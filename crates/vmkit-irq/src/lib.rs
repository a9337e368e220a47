//! Interrupt controller support for KVM-based VMMs (x86_64).
//!
//! placeholder: filled in below
#![deny(missing_docs)]

mod line;
pub use line::{CountingLine, EventFdLine, InterruptLine};
