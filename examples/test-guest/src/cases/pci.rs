//! `test=pci` (line `test pci-cam-ecam:`): bus 0 through port CAM and
//! through ECAM (segment 0 of the MCFG, or the DSDT's `_CBA`); each view
//! prints its functions, then the lists and the first 256 bytes of every
//! function's configuration space must match. Not part of `all` (QEMU's
//! microvm has no port CAM).

use crate::cases::support::{report, Ctx, Want};
use crate::drivers::pci::{open_ecam, print_ecam, scan, Function};
use crate::platform::pci::{port_cam_present, Cam};
use crate::println;
use alloc::format;
use alloc::string::String;
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, PciRoot};

pub fn run(ctx: &Ctx, _: Want) {
    report("pci-cam-ecam", "", compare(ctx));
}

fn compare(ctx: &Ctx) -> Result<String, String> {
    if !port_cam_present() {
        return Err(String::from("no port cam"));
    }
    let mcfg = ctx
        .acpi
        .and_then(|a| a.mcfg)
        .ok_or_else(|| String::from("no ecam"))?;
    println!("pci: port cam");
    let via_port = scan(&PciRoot::new(Cam::PORT), &Cam::PORT);
    print_ecam(&mcfg);
    let ecam = open_ecam(mcfg).ok_or_else(|| String::from("ecam cannot be mapped"))?;
    let via_ecam = scan(&PciRoot::new(ecam), &ecam);
    if via_port != via_ecam {
        return Err(format!(
            "cam lists {} functions, ecam {}",
            via_port.len(),
            via_ecam.len()
        ));
    }
    via_port.iter().try_for_each(|f| same_config(f, &ecam))?;
    Ok(String::new())
}

/// The first 256 bytes of `f`'s configuration space read the same both ways.
fn same_config(f: &Function, ecam: &Cam) -> Result<(), String> {
    for off in (0..=0xfcu8).step_by(4) {
        let (a, b) = (Cam::PORT.read_word(f.df, off), ecam.read_word(f.df, off));
        if a != b {
            return Err(format!(
                "{} offset 0x{:02x}: cam 0x{:08x} ecam 0x{:08x}",
                f.df, off, a, b
            ));
        }
    }
    Ok(())
}
