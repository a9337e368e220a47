//! A hostile guest driving the vmkit-legacy devices through their vm-device trait methods,
//! interleaved with host input queued on the UART.
//!
//! Devices: `Serial` (`Vec<u8>` writer, `CountingLine`, an "input drained" eventfd), `I8042`,
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
//!   FIFO room, and the debug port counts exactly the valid writes and returns the last;
//! - the i8042's ports 0x61-0x63 read 0, its status never shows IBF, aux data, timeout or
//!   parity, its keyboard buffer stays bounded and its (`CountingLine`) interrupt never
//!   fails.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vm_device::bus::PioAddress;
use vm_device::{DevicePio, MutDevicePio};
use vmkit_irq::CountingLine;
use vmkit_legacy::{
    AcpiSleep, AcpiSleepConfig, DebugPort, ExitReason, Serial, SerialConfig, ACPI_SLEEP_PORT,
    ACPI_SLEEP_PORT_COUNT, COM1_PORT, DEBUG_PORT, DEBUG_PORT_COUNT, I8042, I8042_KBD_BUFFER_SIZE,
    I8042_PORT, I8042_PORT_COUNT, SERIAL_FIFO_SIZE, SERIAL_PORT_COUNT,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The device an access goes to.
#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dev {
    /// The UART.
    Serial,
    /// The i8042 controller.
    I8042,
    /// The ACPI sleep registers.
    Acpi,
    /// The debug port through `DevicePio` (`&self`, lock-free).
    Debug,
    /// The debug port through `MutDevicePio`.
    DebugMut,
}

/// One thing the guest or the host does.
#[derive(Arbitrary, Debug)]
pub enum Op<'a> {
    /// A guest read of `size % 4 + 1` bytes.
    Read {
        /// Which device.
        dev: Dev,
        /// Mostly small offsets, so that most accesses hit a register.
        offset: u8,
        /// Any offset instead (`offset` repeated in both bytes).
        far: bool,
        /// The access size, less one (modulo 4).
        size: u8,
    },
    /// A guest write of the low `size % 4 + 1` bytes of `value`.
    Write {
        /// Which device.
        dev: Dev,
        /// As for reads.
        offset: u8,
        /// As for reads.
        far: bool,
        /// As for reads.
        size: u8,
        /// The bytes, little-endian.
        value: u32,
    },
    /// Host input queued on the UART.
    Enqueue(&'a [u8]),
}

/// The fuzzer's input.
#[derive(Arbitrary, Debug)]
pub struct Input<'a> {
    /// The ACPI S5 sleep type (modulo 8); bit 7 also turns the debug port's timestamps on.
    pub s5_sleep_type: u8,
    /// The ACPI reset value.
    pub reset_value: u8,
    /// What happens, in order.
    pub ops: Vec<Op<'a>>,
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

/// The devices under test.
struct Devices {
    exits: Arc<Exits>,
    line: Arc<CountingLine>,
    serial: Serial<Vec<u8>>,
    i8042: I8042,
    acpi: AcpiSleep,
    debug: DebugPort,
}

/// A small model of what the guest did, for the oracles.
#[derive(Default)]
struct Model {
    power_offs: u64,
    resets: u64,
    debug_writes: u64,
    debug_last: Option<u8>,
    lcr: u8,
    mcr: u8,
    thr_writes: u64,
}

impl Devices {
    fn new(input: &Input<'_>, config: AcpiSleepConfig) -> Self {
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
        let drained = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let serial = Serial::with_config(SerialConfig {
            interrupt: line.clone(),
            out: Vec::new(),
            input_drained: Some(drained),
        });
        Self {
            exits,
            line,
            serial,
            i8042: I8042::new(notifier.clone(), Arc::new(CountingLine::new())),
            acpi: AcpiSleep::new(notifier, config),
            debug: DebugPort::with_timestamps(input.s5_sleep_type & 0x80 != 0),
        }
    }

    fn read(&mut self, dev: Dev, off: u16, data: &mut [u8]) {
        let b = base(dev);
        match dev {
            Dev::Serial => MutDevicePio::pio_read(&mut self.serial, b, off, data),
            Dev::I8042 => MutDevicePio::pio_read(&mut self.i8042, b, off, data),
            Dev::Acpi => MutDevicePio::pio_read(&mut self.acpi, b, off, data),
            Dev::Debug => DevicePio::pio_read(&self.debug, b, off, data),
            Dev::DebugMut => MutDevicePio::pio_read(&mut self.debug, b, off, data),
        }
    }

    fn write(&mut self, dev: Dev, off: u16, data: &[u8]) {
        let b = base(dev);
        match dev {
            Dev::Serial => MutDevicePio::pio_write(&mut self.serial, b, off, data),
            Dev::I8042 => MutDevicePio::pio_write(&mut self.i8042, b, off, data),
            Dev::Acpi => MutDevicePio::pio_write(&mut self.acpi, b, off, data),
            Dev::Debug => DevicePio::pio_write(&self.debug, b, off, data),
            Dev::DebugMut => MutDevicePio::pio_write(&mut self.debug, b, off, data),
        }
    }

    fn enqueue(&mut self, bytes: &[u8]) {
        let room = self.serial.fifo_capacity();
        assert!(room <= SERIAL_FIFO_SIZE);
        let taken = self.serial.enqueue_input(bytes);
        assert!(
            taken <= bytes.len().min(room),
            "took {taken} of {} with room {room}",
            bytes.len()
        );
        assert_eq!(self.serial.fifo_capacity(), room - taken);
    }

    /// The oracles at the end of a run.
    fn check(&self, m: &Model) {
        assert_eq!(self.exits.power_off.load(Ordering::Relaxed), m.power_offs);
        assert_eq!(self.exits.reset.load(Ordering::Relaxed), m.resets);
        let st = self.debug.stats();
        assert_eq!((st.writes, st.last_value), (m.debug_writes, m.debug_last));
        let ss = self.serial.stats();
        assert_eq!(ss.tx_lost, 0, "a Vec writer never refuses a byte");
        assert_eq!(ss.interrupt_errors, 0, "a CountingLine never fails");
        assert_eq!(ss.tx_bytes, m.thr_writes);
        assert_eq!(self.serial.writer().len() as u64, m.thr_writes);
        let _ = self.line.count();
        let ks = self.i8042.stats();
        assert_eq!(ks.interrupt_errors, 0, "a CountingLine never fails");
        assert!(self.i8042.kbd_free() <= I8042_KBD_BUFFER_SIZE);
    }
}

/// Checks what a read returned against the model.
fn check_read(dev: Dev, off: u16, data: &[u8], m: &Model) {
    if data.len() != 1 || off >= port_count(dev) {
        assert!(
            data.iter().all(|&x| x == 0xFF),
            "{dev:?} ignored read at {off} of {} bytes returned {data:02x?}",
            data.len()
        );
        return;
    }
    match dev {
        // Ports 0x61-0x63 read 0; the status never shows IBF, aux data or errors.
        Dev::I8042 if (1..=3).contains(&off) => assert_eq!(data[0], 0, "i8042 port {off}"),
        Dev::I8042 if off == 4 => assert_eq!(data[0] & 0xE2, 0, "i8042 status"),
        Dev::I8042 => {}
        Dev::Acpi => assert_eq!(data[0] & !0x80, 0, "ACPI register read"),
        Dev::Debug | Dev::DebugMut => {
            assert_eq!(data[0], m.debug_last.unwrap_or(0xFF), "debug port read")
        }
        Dev::Serial => {}
    }
}

/// Updates the model after a write.
fn model_write(dev: Dev, off: u16, data: &[u8], config: &AcpiSleepConfig, m: &mut Model) {
    let &[v] = data else { return };
    if off >= port_count(dev) {
        return;
    }
    match (dev, off) {
        (Dev::Serial, 0) if m.lcr & LCR_DLAB == 0 && m.mcr & MCR_LOOP == 0 => m.thr_writes += 1,
        (Dev::Serial, LCR) => m.lcr = v,
        (Dev::Serial, MCR) => m.mcr = v,
        (Dev::I8042, 4) if v == 0xFE => m.resets += 1,
        (Dev::Acpi, 0) if v & 0x20 != 0 && (v >> 2) & 7 == config.s5_sleep_type => {
            m.power_offs += 1
        }
        (Dev::Acpi, 2) if v == config.reset_value => m.resets += 1,
        (Dev::Debug | Dev::DebugMut, 0) => {
            m.debug_writes += 1;
            m.debug_last = Some(v);
        }
        _ => {}
    }
}

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode).
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input<'_>) {
    let _ = run_model(input);
}

fn run_model(input: &Input<'_>) -> Model {
    let config = AcpiSleepConfig {
        s5_sleep_type: input.s5_sleep_type % 8,
        reset_value: input.reset_value,
    };
    let mut devs = Devices::new(input, config);
    let mut m = Model::default();
    for op in &input.ops {
        match *op {
            Op::Read {
                dev,
                offset: o,
                far,
                size,
            } => {
                let off = offset(o, far);
                let mut data = vec![0u8; usize::from(size % 4) + 1];
                devs.read(dev, off, &mut data);
                check_read(dev, off, &data, &m);
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
                devs.write(dev, off, data);
                model_write(dev, off, data, &config, &mut m);
            }
            Op::Enqueue(bytes) => devs.enqueue(bytes),
        }
    }
    devs.check(&m);
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    /// Random bytes decode and run. They make about one operation each (arbitrary's `Vec`
    /// at the end of an input reads a "go on" bit before each element; the encoding is kept
    /// so the fuzzer's corpus stays valid) and rarely a counted register write: the
    /// fuzzer's corpus, not these seeds, is what reaches deep.
    #[test]
    fn seeds_decode_and_reach_the_registers() {
        let seeds = seeds::for_target("legacy_pio");
        let mut ops = 0;
        let mut counted = 0;
        for s in &seeds {
            let input = Input::arbitrary_take_rest(Unstructured::new(s)).expect("decodes");
            ops += input.ops.len();
            let m = run_model(&input);
            counted += m.thr_writes + m.debug_writes + m.resets + m.power_offs;
        }
        eprintln!("legacy_pio seeds: {ops} operations, {counted} counted writes");
        assert!(ops > 0);
    }
}
