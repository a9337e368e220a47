//! What every case gets and shares: the machine as boot and discovery left
//! it (`Ctx`), how the case was selected (`Want`), and the result line
//! (`report`).

use crate::cases::virtio_net::NetParams;
use crate::cases::virtio_vsock::VsockParams;
use crate::drivers::blk::BlkDisk;
use crate::drivers::virtio::Devices;
use crate::platform::acpi::Acpi;
use crate::platform::apic::Lapic;
use crate::platform::ram::FreeRam;
use crate::platform::smp::Online;
use crate::println;
use alloc::string::String;

/// What the cases may look at: the machine as boot and discovery left it.
pub struct Ctx<'a> {
    pub acpi: Option<&'a Acpi>,
    pub lapic: &'a Lapic,
    pub bsp_apic_id: u32,
    /// CPUs in the MADT (1 without one).
    pub cpus: usize,
    pub online: Online,
    pub devices: &'a Devices,
    pub disks: &'a [BlkDisk],
    /// RAM for data buffers (`platform::ram::Arena`).
    pub ram: Option<FreeRam>,
    /// The `net_*=` parameters (`test=virtio-net`).
    pub net: NetParams,
    /// The `vsock_*=` parameters (`test=virtio-vsock`).
    pub vsock: VsockParams,
    /// `soak_rounds=` (`test=soak`).
    pub soak_rounds: u32,
}

/// How a case was selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// By `all`.
    All,
    /// By name, with the `:N` argument when the case takes one and it was
    /// given.
    Named(Option<u64>),
}

/// Prints a test's result: `test <name>: ok<extra><suffix>` or
/// `test <name>: FAIL <why><suffix>`.
pub fn report(name: &str, suffix: &str, result: Result<String, String>) {
    match result {
        Ok(extra) => println!("test {}: ok{}{}", name, extra, suffix),
        Err(why) => println!("test {}: FAIL {}{}", name, why, suffix),
    }
}
