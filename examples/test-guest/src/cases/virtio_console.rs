//! `test=virtio-console`: on the first console device of each transport,
//! one line out through virtio-drivers' `VirtIOConsole` (port 0; `ok` once
//! the device has used the buffer), then up to 100 ms of input, counted.

use crate::cases::support::{report, Ctx, Want};
use crate::drivers::hal::GuestHal;
use crate::drivers::virtio::{Bus, Device, Devices};
use crate::platform::time::wait_until;
use crate::println;
use alloc::format;
use alloc::string::String;
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::transport::DeviceType;

/// The line written to the console.
const LINE: &[u8] = b"hello from the virtio console\n";

pub fn run(ctx: &Ctx, _: Want) {
    let devices = ctx.devices;
    if !devices.has(DeviceType::Console) {
        report("virtio-console", "", Err(String::from("no console device")));
        return;
    }
    for bus in [Bus::Mmio, Bus::Pci] {
        if let Some(dev) = devices.first(DeviceType::Console, bus) {
            one(devices, dev, bus.suffix());
        }
    }
}

fn one(devices: &Devices, dev: &Device, suffix: &str) {
    let transport = match devices.open(dev) {
        Ok(t) => t,
        Err(why) => return report("virtio-console", suffix, Err(why)),
    };
    let health = transport.health();
    let mut con = match VirtIOConsole::<GuestHal, _>::new(transport) {
        Ok(c) => c,
        Err(e) => {
            let why = health.explain(format!("init: {}", e));
            return report("virtio-console", suffix, Err(why));
        }
    };
    if let Err(why) = health.check() {
        return report("virtio-console", suffix, Err(why));
    }
    let sent = health
        .blocking(|| con.send_bytes(LINE))
        .and_then(|r| r.map_err(|e| format!("{}", e)));
    if let Err(e) = sent {
        return report("virtio-console", suffix, Err(format!("send: {}", e)));
    }
    report("virtio-console", suffix, Ok(String::new()));

    let mut received = 0usize;
    let mut failed = false;
    wait_until(100_000, || {
        loop {
            match con.recv(true) {
                Ok(Some(_)) => received += 1,
                Ok(None) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        failed
    });
    if received > 0 {
        println!("virtio-console: received {} bytes{}", received, suffix);
    }
}
