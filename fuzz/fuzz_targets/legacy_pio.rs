//! A hostile guest driving the vmkit-legacy devices through their vm-device trait methods,
//! interleaved with host input queued on the UART.
//!
//! Devices: `Serial` (Vec<u8> writer, `CountingLine`, an "input drained" eventfd), `I8042`,
//! `AcpiSleep` (fuzzed S5 sleep type and reset value) and `DebugPort` (through both
//! `DevicePio` and `MutDevicePio`). Accesses are 1 to 4 bytes at any offset.
//!
//! Oracles, besides "never panics", from the documented contracts (crate docs):
//! - an access that is not one byte, or outside the device's ports, is ignored and reads
//!   as all 0xFF;
//! - reset / power-off notifications happen exactly for i8042 command 0xFE at offset 4,
//!   ACPI SLP_EN with SLP_TYP = S5 at offset 0, and the reset value at ACPI offset 2;
//! - every byte the guest writes to THR outside loopback reaches the Vec writer
//!   (`tx_bytes` = writer length, nothing lost), `enqueue_input` takes at most the free
//!   FIFO room, and the debug port counts exactly the valid writes and returns the last.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::{DevicePio, MutDevicePio};
use vmkit_irq::CountingLine;
use vmkit_legacy::{
    AcpiSleep, AcpiSleepConfig, DebugPort, ExitReason, Serial, SerialConfig, ACPI_SLEEP_PORT,
    ACPI_SLEEP_PORT_COUNT, COM1_PORT, DEBUG_PORT, DEBUG_PORT_COUNT, I8042, I8042_PORT,
    I8042_PORT_COUNT, SERIAL_FIFO_SIZE, SERIAL_PORT_COUNT,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
enum Dev {
    Serial,
    I8042,
    Acpi,
    /// The debug port through `DevicePio` (`&self`, lock-free).
    Debug,
    /// The debug port through `MutDevicePio`.
    DebugMut,
}

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    Read {
        dev: Dev,
        /// Mostly small offsets, so that most accesses hit a register.
        offset: u8,
        far: bool,
        size: u8,
    },
    Write {
        dev: Dev,
        offset: u8,
        far: bool,
        size: u8,
        value: u32,
    },
    Enqueue(&'a [u8]),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    s5_sleep_type: u8,
    reset_value: u8,
    ops: Vec<Op<'a>>,
}

#[derive(Default)]
struct Exits {
    power_off: AtomicU64,
    reset: AtomicU64,
}

fn offset(offset: u8, far: bool) -> u16 {
    if far {
        // Any offset at all, as a bus with a wrong range or a direct caller might pass.
        u16::from(offset) << 8 | u16::from(offset)
    } else {
        u16::from(offset % 16)
    }
}

fn port_count(dev: Dev) -> u16 {
    match dev {
        Dev::Serial => SERIAL_PORT_COUNT,
        Dev::I8042 => I8042_PORT_COUNT,
        Dev::Acpi => ACPI_SLEEP_PORT_COUNT,
        Dev::Debug | Dev::DebugMut => DEBUG_PORT_COUNT,
    }
}

fn base(dev: Dev) -> PioAddress {
    PioAddress(match dev {
        Dev::Serial => COM1_PORT,
        Dev::I8042 => I8042_PORT,
        Dev::Acpi => ACPI_SLEEP_PORT,
        Dev::Debug | Dev::DebugMut => DEBUG_PORT,
    })
}

const LCR: u16 = 3;
const MCR: u16 = 4;
const LCR_DLAB: u8 = 0x80;
const MCR_LOOP: u8 = 0x10;

fuzz_target!(|input: Input<'_>| {
    let exits = Arc::new(Exits::default());
    let notifier = {
        let exits = exits.clone();
        Arc::new(move |reason: ExitReason| {
            let counter = match reason {
                ExitReason::PowerOff => &exits.power_off,
                ExitReason::Reset => &exits.reset,
                // Legacy devices only ever report the guest's own requests.
                other => panic!("a legacy device reported {other:?}"),
            };
            counter.fetch_add(1, Ordering::Relaxed);
        })
    };
    let line = Arc::new(CountingLine::new());
    let drained = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut serial = Serial::with_config(SerialConfig {
        interrupt: line.clone(),
        out: Vec::new(),
        input_drained: Some(drained),
    });
    let mut i8042 = I8042::new(notifier.clone());
    let config = AcpiSleepConfig {
        s5_sleep_type: input.s5_sleep_type % 8,
        reset_value: input.reset_value,
    };
    let mut acpi = AcpiSleep::new(notifier, config);
    let mut debug = DebugPort::with_timestamps(input.s5_sleep_type & 0x80 != 0);

    // A small model of what the guest did, for the oracles.
    let (mut power_offs, mut resets) = (0u64, 0u64);
    let mut debug_writes = 0u64;
    let mut debug_last: Option<u8> = None;
    let (mut lcr, mut mcr) = (0u8, 0u8);
    let mut thr_writes = 0u64;

    for op in input.ops {
        match op {
            Op::Read {
                dev,
                offset: o,
                far,
                size,
            } => {
                let off = offset(o, far);
                let mut data = vec![0u8; usize::from(size % 4) + 1];
                let b = base(dev);
                match dev {
                    Dev::Serial => MutDevicePio::pio_read(&mut serial, b, off, &mut data),
                    Dev::I8042 => MutDevicePio::pio_read(&mut i8042, b, off, &mut data),
                    Dev::Acpi => MutDevicePio::pio_read(&mut acpi, b, off, &mut data),
                    Dev::Debug => DevicePio::pio_read(&debug, b, off, &mut data),
                    Dev::DebugMut => MutDevicePio::pio_read(&mut debug, b, off, &mut data),
                }
                if data.len() != 1 || off >= port_count(dev) {
                    assert!(
                        data.iter().all(|&x| x == 0xFF),
                        "{dev:?} ignored read at {off} of {} bytes returned {data:02x?}",
                        data.len()
                    );
                    continue;
                }
                match dev {
                    Dev::I8042 => assert_eq!(data[0], 0, "i8042 reads 0"),
                    Dev::Acpi => assert_eq!(data[0] & !0x80, 0, "ACPI register read"),
                    Dev::Debug | Dev::DebugMut => {
                        assert_eq!(data[0], debug_last.unwrap_or(0xFF), "debug port read")
                    }
                    Dev::Serial => {}
                }
            }
            Op::Write {
                dev,
                offset: o,
                far,
                size,
                value,
            } => {
                let off = offset(o, far);
                let bytes = value.to_le_bytes();
                let data = &bytes[..usize::from(size % 4) + 1];
                let b = base(dev);
                match dev {
                    Dev::Serial => MutDevicePio::pio_write(&mut serial, b, off, data),
                    Dev::I8042 => MutDevicePio::pio_write(&mut i8042, b, off, data),
                    Dev::Acpi => MutDevicePio::pio_write(&mut acpi, b, off, data),
                    Dev::Debug => DevicePio::pio_write(&debug, b, off, data),
                    Dev::DebugMut => MutDevicePio::pio_write(&mut debug, b, off, data),
                }
                let &[v] = data else { continue };
                if off >= port_count(dev) {
                    continue;
                }
                match (dev, off) {
                    (Dev::Serial, 0) if lcr & LCR_DLAB == 0 && mcr & MCR_LOOP == 0 => {
                        thr_writes += 1
                    }
                    (Dev::Serial, LCR) => lcr = v,
                    (Dev::Serial, MCR) => mcr = v,
                    (Dev::I8042, 4) if v == 0xFE => resets += 1,
                    (Dev::Acpi, 0) if v & 0x20 != 0 && (v >> 2) & 7 == config.s5_sleep_type => {
                        power_offs += 1
                    }
                    (Dev::Acpi, 2) if v == config.reset_value => resets += 1,
                    (Dev::Debug | Dev::DebugMut, 0) => {
                        debug_writes += 1;
                        debug_last = Some(v);
                    }
                    _ => {}
                }
            }
            Op::Enqueue(bytes) => {
                let room = serial.fifo_capacity();
                assert!(room <= SERIAL_FIFO_SIZE);
                let taken = serial.enqueue_input(bytes);
                assert!(
                    taken <= bytes.len().min(room),
                    "took {taken} of {} with room {room}",
                    bytes.len()
                );
                assert_eq!(serial.fifo_capacity(), room - taken);
            }
        }
    }

    assert_eq!(exits.power_off.load(Ordering::Relaxed), power_offs);
    assert_eq!(exits.reset.load(Ordering::Relaxed), resets);
    let st = debug.stats();
    assert_eq!((st.writes, st.last_value), (debug_writes, debug_last));
    let ss = serial.stats();
    assert_eq!(ss.tx_lost, 0, "a Vec writer never refuses a byte");
    assert_eq!(ss.interrupt_errors, 0, "a CountingLine never fails");
    assert_eq!(ss.tx_bytes, thr_writes);
    assert_eq!(serial.writer().len() as u64, thr_writes);
    let _ = line.count();
});
