//! The i8042 keyboard controller with a PS/2 keyboard on its first port: enough of both for
//! Linux's `i8042` and `atkbd` drivers to find a keyboard, for the VMM to press
//! Ctrl-Alt-Del, and for the guest to reset the machine.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmkit_irq::InterruptLine;

use crate::error::{Error, Result};
use crate::exit::{ExitNotifier, ExitReason};

/// Number of ports of the i8042 (`0x60..0x65`: data at offset 0, command/status at 4).
pub const I8042_PORT_COUNT: u16 = 5;

/// Bytes the keyboard's output buffer holds (scancodes and replies not yet read by the guest).
pub const I8042_KBD_BUFFER_SIZE: usize = 16;

/// What [`I8042::send_ctrl_alt_del`] queues: Ctrl, Alt and Delete pressed, then released, in
/// scancode set 2 (make `14`, `11`, `E0 71`; break `E0 F0 71`, `F0 11`, `F0 14`).
pub const CTRL_ALT_DEL_SCANCODES: [u8; 11] = [
    0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14,
];

/// Offset of the data port (0x60).
const DATA: PioAddressOffset = 0;
/// Offset of the command (write) and status (read) port (0x64).
const COMMAND: PioAddressOffset = 4;

// Status register bits.
/// Output buffer full: a byte waits at the data port.
const STS_OBF: u8 = 1 << 0;
/// System flag: mirrors the command byte's bit 2 (set once the controller passed its self-test).
const STS_SYS: u8 = 1 << 2;
/// The last write went to the command port (so the data port's next byte is a parameter, if
/// the command takes one).
const STS_CMD: u8 = 1 << 3;
/// Keyboard not inhibited (the keylock switch is open); always set.
const STS_UNLOCKED: u8 = 1 << 4;

// Command byte (the controller's configuration, "CTR" in Linux) bits.
/// Raise IRQ 1 when a byte waits at the data port.
const CTR_KBD_INT: u8 = 1 << 0;
/// System flag (reflected in the status register).
const CTR_SYS: u8 = 1 << 2;
/// Keyboard interface disabled: keyboard bytes are held until it is enabled again.
const CTR_KBD_DISABLE: u8 = 1 << 4;
/// Aux (mouse) interface disabled; there is no aux port (the guest may write the command
/// byte with it clear, which changes nothing: no aux byte ever comes).
const CTR_AUX_DISABLE: u8 = 1 << 5;

/// The command byte at power-on: keyboard interrupt on, system flag set, no translation to
/// scancode set 1 (so Linux drives the keyboard in set 2, which is what this model sends).
const CTR_INITIAL: u8 = CTR_KBD_INT | CTR_SYS;
/// The output port at power-on: bit 0 (CPU reset line, active low) and bit 1 (A20 gate) high.
const OUTP_INITIAL: u8 = 0x03;

// Controller commands (written to port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xA7;
const CMD_AUX_ENABLE: u8 = 0xA8;
const CMD_AUX_TEST: u8 = 0xA9;
const CMD_SELF_TEST: u8 = 0xAA;
const CMD_KBD_TEST: u8 = 0xAB;
const CMD_KBD_DISABLE: u8 = 0xAD;
const CMD_KBD_ENABLE: u8 = 0xAE;
const CMD_READ_OUTP: u8 = 0xD0;
const CMD_WRITE_OUTP: u8 = 0xD1;
const CMD_WRITE_KBD_OUT: u8 = 0xD2;
const CMD_WRITE_AUX_OUT: u8 = 0xD3;
const CMD_WRITE_AUX: u8 = 0xD4;
const CMD_PULSE_RESET: u8 = 0xFE;

/// Reply to the self-test: passed.
const SELF_TEST_OK: u8 = 0x55;
/// Reply to the keyboard interface test: no error.
const KBD_TEST_OK: u8 = 0x00;
/// Reply to the aux interface test: "clock line stuck high", what an unconnected port reads.
/// Linux's i8042 driver takes any reply but 0x00, 0xFA and 0xFF as "no aux port".
const AUX_TEST_NO_PORT: u8 = 0x02;

// Keyboard commands (written to port 0x60 when no controller command waits for a parameter)
// and replies.
const KBD_SET_LEDS: u8 = 0xED;
const KBD_ECHO: u8 = 0xEE;
const KBD_SCANCODE_SET: u8 = 0xF0;
const KBD_GET_ID: u8 = 0xF2;
const KBD_SET_TYPEMATIC: u8 = 0xF3;
const KBD_RESEND: u8 = 0xFE;
const KBD_RESET: u8 = 0xFF;
/// Acknowledge.
const KBD_ACK: u8 = 0xFA;
/// Basic assurance test passed (after a reset).
const KBD_BAT_OK: u8 = 0xAA;
/// The ID of an MF2 keyboard, as GET ID returns it without translation.
const KBD_ID: [u8; 2] = [0xAB, 0x83];
/// The scancode set the keyboard reports using (it only speaks set 2).
const KBD_SET_2: u8 = 0x02;

/// What the next byte written to the data port is for, after a controller command that takes
/// a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Param {
    /// The command byte (`0x60`).
    Ctr,
    /// The output port (`0xD1`).
    OutputPort,
    /// A byte to pass as keyboard input (`0xD2`).
    KbdOutput,
    /// A byte for the aux loopback (`0xD3`).
    AuxLoop,
    /// A byte for the aux device (`0xD4`).
    AuxDevice,
}

/// Counters of an [`I8042`], for the VMM's metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct I8042Stats {
    /// Failures to raise the keyboard interrupt.
    pub interrupt_errors: u64,
    /// Keyboard bytes dropped because the keyboard's buffer was full (only bytes the guest
    /// itself asked the controller to pass as keyboard input, command `0xD2`; the host's are
    /// refused with an error instead).
    pub kbd_bytes_dropped: u64,
}

/// The i8042 keyboard controller and a PS/2 keyboard, on the PIO bus (vm-device's
/// [`MutDevicePio`]), for [`I8042_PORT_COUNT`] ports from 0x60.
///
/// - **Controller** (command port 0x64, status at the same port): the command byte
///   (`0x20`/`0x60`), self-test (`0xAA`, replies `0x55`), keyboard interface test (`0xAB`,
///   `0x00`), output port (`0xD0`/`0xD1`, stored only), keyboard interface disable/enable
///   (`0xAD`/`0xAE`), "write keyboard output" (`0xD2`, the byte comes back as keyboard input),
///   and pulse of the reset line (`0xFE`), reported to the [`ExitNotifier`] as
///   [`ExitReason::Reset`]. There is no aux (mouse) port, and the aux commands say so: the aux
///   interface test (`0xA9`) replies `0x02`, the aux loopback (`0xD3`) returns its byte as
///   keyboard data, enabling it (`0xA8`) leaves it disabled, bytes for it (`0xD4`) are dropped.
///   Other commands are ignored. Translation to scancode set 1 (command byte bit 6) is not
///   modelled: the keyboard always speaks set 2, and the power-on command byte (`0x05`) has
///   translation off, so Linux uses set 2.
/// - **Keyboard** (bytes written to port 0x60 that are not a controller command's parameter):
///   every command is acknowledged with `0xFA`; GET ID (`0xF2`) also returns `0xAB 0x83`,
///   reset (`0xFF`) also returns `0xAA`, echo (`0xEE`) returns `0xEE` alone, resend (`0xFE`)
///   repeats the last byte sent, and SET LEDS (`0xED`), SET SCANCODE SET (`0xF0`, whose
///   parameter 0 queries the set: `0x02`) and SET TYPEMATIC (`0xF3`) take a parameter byte,
///   acknowledged too. A command discards the keyboard bytes the guest has not read yet, as
///   real keyboards do. Keys come from the host: [`send_ctrl_alt_del`](Self::send_ctrl_alt_del)
///   and [`send_scancodes`](Self::send_scancodes), into a buffer of [`I8042_KBD_BUFFER_SIZE`]
///   bytes.
/// - **Interrupt** (IRQ 1, [`I8042_GSI`](crate::I8042_GSI)): raised (an edge) whenever a byte
///   becomes readable at the data port while the command byte's bit 0 enables it, and again
///   after each read that leaves a byte to read (Linux reads one byte per interrupt).
///   Controller replies take precedence over keyboard bytes; keyboard bytes wait while the
///   keyboard interface is disabled.
///
/// One-byte accesses only; others are ignored, and such reads return `0xFF`. Ports 0x61–0x63
/// (offsets 1–3) read 0 and ignore writes. No guest access panics.
pub struct I8042 {
    exit: Arc<dyn ExitNotifier>,
    interrupt: Arc<dyn InterruptLine>,
    /// The command byte.
    ctr: u8,
    /// The output port.
    outp: u8,
    /// The last write went to the command port.
    last_write_command: bool,
    /// What the next data-port write is for, if a controller command takes a parameter.
    pending: Option<Param>,
    /// A controller command's reply, read before any keyboard byte.
    reply: Option<u8>,
    /// The keyboard command waiting for its parameter byte.
    kbd_param_for: Option<u8>,
    /// Bytes from the keyboard, at most [`I8042_KBD_BUFFER_SIZE`].
    kbd: VecDeque<u8>,
    /// The last byte the keyboard sent (for its resend command).
    kbd_last_sent: u8,
    stats: I8042Stats,
}

impl I8042 {
    /// An i8042 that reports the reset command to `exit` and raises `interrupt` (IRQ 1) for
    /// the keyboard.
    pub fn new(exit: Arc<dyn ExitNotifier>, interrupt: Arc<dyn InterruptLine>) -> Self {
        Self {
            exit,
            interrupt,
            ctr: CTR_INITIAL,
            outp: OUTP_INITIAL,
            last_write_command: false,
            pending: None,
            reply: None,
            kbd_param_for: None,
            kbd: VecDeque::with_capacity(I8042_KBD_BUFFER_SIZE),
            kbd_last_sent: KBD_ACK,
            stats: I8042Stats::default(),
        }
    }

    /// Presses and releases Ctrl, Alt and Delete: queues [`CTRL_ALT_DEL_SCANCODES`] as
    /// keyboard input and raises the keyboard interrupt if the guest enabled it.
    ///
    /// Linux turns it into `ctrl_alt_del()` (a reboot, or SIGINT to init once init turned
    /// C-A-D off) if it has the `atkbd` driver and the VT keyboard handler.
    ///
    /// # Errors
    ///
    /// See [`send_scancodes`](Self::send_scancodes).
    pub fn send_ctrl_alt_del(&mut self) -> Result<()> {
        self.send_scancodes(&CTRL_ALT_DEL_SCANCODES)
    }

    /// Queues `bytes` (scancode set 2) as keyboard input, all or nothing, and raises the
    /// keyboard interrupt if the guest enabled it (command byte bit 0) and its keyboard
    /// interface is enabled. While either is disabled, the bytes wait in the buffer.
    ///
    /// # Errors
    ///
    /// - [`Error::KbdBufferFull`] if the keyboard's buffer has less free room than `bytes`
    ///   (the guest has not read what was sent before): nothing was queued.
    /// - [`Error::Interrupt`] if raising the interrupt failed: the bytes are queued, and the
    ///   guest reads them on its next interrupt from the keyboard.
    pub fn send_scancodes(&mut self, bytes: &[u8]) -> Result<()> {
        let free = self.kbd_free();
        if bytes.len() > free {
            return Err(Error::KbdBufferFull {
                needed: bytes.len(),
                free,
            });
        }
        self.kbd.extend(bytes);
        if let Some(&last) = bytes.last() {
            self.kbd_last_sent = last;
        }
        self.raise().map_err(|e| {
            self.stats.interrupt_errors += 1;
            Error::Interrupt(e)
        })
    }

    /// Free room in the keyboard's buffer, in bytes.
    pub fn kbd_free(&self) -> usize {
        I8042_KBD_BUFFER_SIZE - self.kbd.len()
    }

    /// The counters.
    pub fn stats(&self) -> I8042Stats {
        self.stats
    }

    fn kbd_enabled(&self) -> bool {
        self.ctr & CTR_KBD_DISABLE == 0
    }

    /// Whether a byte waits at the data port.
    fn output_full(&self) -> bool {
        self.reply.is_some() || (self.kbd_enabled() && !self.kbd.is_empty())
    }

    fn status(&self) -> u8 {
        let mut status = STS_UNLOCKED;
        if self.output_full() {
            status |= STS_OBF;
        }
        if self.ctr & CTR_SYS != 0 {
            status |= STS_SYS;
        }
        if self.last_write_command {
            status |= STS_CMD;
        }
        status
    }

    /// Raises IRQ 1 if a byte waits and the command byte enables the interrupt.
    fn raise(&self) -> io::Result<()> {
        if self.ctr & CTR_KBD_INT != 0 && self.output_full() {
            self.interrupt.trigger()
        } else {
            Ok(())
        }
    }

    /// [`raise`](Self::raise) on a guest access, which has no error path: count failures.
    fn raise_counted(&mut self) {
        if self.raise().is_err() {
            self.stats.interrupt_errors += 1;
        }
    }

    /// A controller command's reply; it replaces one the guest did not read.
    fn controller_reply(&mut self, byte: u8) {
        self.reply = Some(byte);
        self.raise_counted();
    }

    /// The keyboard's reply to a command: what it had not sent yet is discarded first, so
    /// the reply (at most 3 bytes) always fits.
    fn kbd_reply(&mut self, bytes: &[u8]) {
        self.kbd.clear();
        self.kbd.extend(bytes);
        if let Some(&last) = bytes.last() {
            self.kbd_last_sent = last;
        }
        self.raise_counted();
    }

    fn read_data(&mut self) -> u8 {
        let byte = match self.reply.take() {
            Some(b) => b,
            None if self.kbd_enabled() => self.kbd.pop_front().unwrap_or(0),
            None => 0,
        };
        // Linux reads one byte per interrupt: tell it about the next one.
        self.raise_counted();
        byte
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_write_command = true;
        // A new command abandons one that was waiting for its parameter.
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.controller_reply(self.ctr),
            CMD_WRITE_CTR => self.pending = Some(Param::Ctr),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            // There is no aux port to enable.
            CMD_AUX_ENABLE => {}
            CMD_AUX_TEST => self.controller_reply(AUX_TEST_NO_PORT),
            CMD_SELF_TEST => {
                self.ctr |= CTR_SYS;
                self.controller_reply(SELF_TEST_OK);
            }
            CMD_KBD_TEST => self.controller_reply(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => {
                self.ctr &= !CTR_KBD_DISABLE;
                self.raise_counted();
            }
            CMD_READ_OUTP => self.controller_reply(self.outp),
            CMD_WRITE_OUTP => self.pending = Some(Param::OutputPort),
            CMD_WRITE_KBD_OUT => self.pending = Some(Param::KbdOutput),
            CMD_WRITE_AUX_OUT => self.pending = Some(Param::AuxLoop),
            CMD_WRITE_AUX => self.pending = Some(Param::AuxDevice),
            CMD_PULSE_RESET => self.exit.notify_exit(ExitReason::Reset),
            _ => {}
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_write_command = false;
        match self.pending.take() {
            Some(Param::Ctr) => {
                self.ctr = byte;
                // Enabling the interrupt or the keyboard may reveal a waiting byte.
                self.raise_counted();
            }
            Some(Param::OutputPort) => self.outp = byte,
            Some(Param::KbdOutput) => {
                if self.kbd_free() == 0 {
                    self.stats.kbd_bytes_dropped += 1;
                } else {
                    self.kbd.push_back(byte);
                    self.raise_counted();
                }
            }
            // No aux port: the loopback byte comes back from the controller, without the
            // status register's "aux data" bit, which is how Linux tells there is no port.
            Some(Param::AuxLoop) => self.controller_reply(byte),
            Some(Param::AuxDevice) => {}
            None => self.kbd_command(byte),
        }
    }

    fn kbd_command(&mut self, byte: u8) {
        // Sending to the keyboard enables its interface again, as the controller does.
        self.ctr &= !CTR_KBD_DISABLE;
        // Parameters are below 0x80; a command byte instead starts a new command.
        if let Some(cmd) = self.kbd_param_for.take() {
            if byte < 0x80 {
                if cmd == KBD_SCANCODE_SET && byte == 0 {
                    self.kbd_reply(&[KBD_ACK, KBD_SET_2]);
                } else {
                    self.kbd_reply(&[KBD_ACK]);
                }
                return;
            }
        }
        match byte {
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_TYPEMATIC => {
                self.kbd_param_for = Some(byte);
                self.kbd_reply(&[KBD_ACK]);
            }
            KBD_ECHO => self.kbd_reply(&[KBD_ECHO]),
            KBD_GET_ID => self.kbd_reply(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
            KBD_RESEND => {
                let last = self.kbd_last_sent;
                self.kbd_reply(&[last]);
            }
            KBD_RESET => self.kbd_reply(&[KBD_ACK, KBD_BAT_OK]),
            _ => self.kbd_reply(&[KBD_ACK]),
        }
    }
}

/// The state of an [`I8042`] for a snapshot: the controller's registers, a command waiting
/// for its parameter, the byte it answered, and the keyboard's queued bytes. Counters are
/// not saved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    /// The command byte ("CTR").
    pub ctr: u8,
    /// The output port.
    pub outp: u8,
    /// Whether the last write went to the command port (status bit 3).
    pub last_write_command: bool,
    /// The controller command (0x60, 0xD1, 0xD2, 0xD3 or 0xD4) waiting for its parameter.
    pub pending_command: Option<u8>,
    /// The controller's answer the guest has not read.
    pub reply: Option<u8>,
    /// The keyboard command (0xED, 0xF0 or 0xF3) waiting for its parameter.
    pub kbd_param_for: Option<u8>,
    /// Bytes from the keyboard the guest has not read (at most
    /// [`I8042_KBD_BUFFER_SIZE`]).
    pub kbd: Vec<u8>,
    /// The keyboard's last byte (sent again on `RESEND`).
    pub kbd_last_sent: u8,
}

impl Param {
    fn command(self) -> u8 {
        match self {
            Param::Ctr => CMD_WRITE_CTR,
            Param::OutputPort => CMD_WRITE_OUTP,
            Param::KbdOutput => CMD_WRITE_KBD_OUT,
            Param::AuxLoop => CMD_WRITE_AUX_OUT,
            Param::AuxDevice => CMD_WRITE_AUX,
        }
    }

    fn of_command(cmd: u8) -> Option<Self> {
        [
            Param::Ctr,
            Param::OutputPort,
            Param::KbdOutput,
            Param::AuxLoop,
            Param::AuxDevice,
        ]
        .into_iter()
        .find(|p| p.command() == cmd)
    }
}

impl I8042 {
    /// The controller's state for a snapshot.
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            outp: self.outp,
            last_write_command: self.last_write_command,
            pending_command: self.pending.map(Param::command),
            reply: self.reply,
            kbd_param_for: self.kbd_param_for,
            kbd: self.kbd.iter().copied().collect(),
            kbd_last_sent: self.kbd_last_sent,
        }
    }

    /// Restores `state` into a freshly built controller before the guest runs; raises the
    /// keyboard interrupt if a byte waits for the guest and the interrupt is enabled (a
    /// spurious one is harmless, a lost one is not).
    ///
    /// # Errors
    ///
    /// [`Error::State`] (nothing restored) for more keyboard bytes than the buffer holds,
    /// or a pending controller or keyboard command that takes no parameter;
    /// [`Error::Interrupt`] if the interrupt cannot be raised (the state is restored).
    pub fn restore(&mut self, state: &I8042State) -> Result<()> {
        let bad = |what: String| Err(Error::State(format!("i8042: {what}")));
        if state.kbd.len() > I8042_KBD_BUFFER_SIZE {
            return bad(format!(
                "{} keyboard bytes queued; the buffer holds {I8042_KBD_BUFFER_SIZE}",
                state.kbd.len()
            ));
        }
        let pending = match state.pending_command {
            None => None,
            Some(cmd) => match Param::of_command(cmd) {
                Some(p) => Some(p),
                None => return bad(format!("command {cmd:#04x} takes no parameter")),
            },
        };
        if let Some(cmd) = state.kbd_param_for {
            if ![KBD_SET_LEDS, KBD_SCANCODE_SET, KBD_SET_TYPEMATIC].contains(&cmd) {
                return bad(format!("keyboard command {cmd:#04x} takes no parameter"));
            }
        }
        self.ctr = state.ctr;
        self.outp = state.outp;
        self.last_write_command = state.last_write_command;
        self.pending = pending;
        self.reply = state.reply;
        self.kbd_param_for = state.kbd_param_for;
        self.kbd.clear();
        self.kbd.extend(&state.kbd);
        self.kbd_last_sent = state.kbd_last_sent;
        self.raise().map_err(|e| {
            self.stats.interrupt_errors += 1;
            Error::Interrupt(e)
        })
    }
}

impl fmt::Debug for I8042 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042")
            .field("ctr", &self.ctr)
            .field("status", &self.status())
            .field("kbd_pending", &self.kbd.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let [out] = data else {
            data.fill(0xFF);
            return;
        };
        *out = match offset {
            DATA => self.read_data(),
            COMMAND => self.status(),
            1..=3 => 0,
            _ => 0xFF,
        };
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let &[byte] = data else {
            return;
        };
        match offset {
            DATA => self.write_data(byte),
            COMMAND => self.write_command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Recorder;
    use vmkit_irq::CountingLine;

    const BASE: PioAddress = PioAddress(0x60);

    struct Fixture {
        kbd: I8042,
        exit: Arc<Recorder>,
        irq: Arc<CountingLine>,
    }

    fn fixture() -> Fixture {
        let exit = Recorder::new();
        let irq = Arc::new(CountingLine::new());
        Fixture {
            kbd: I8042::new(exit.clone(), irq.clone()),
            exit,
            irq,
        }
    }

    #[test]
    fn state_moves_to_a_fresh_controller_mid_command() {
        let mut f = fixture();
        // The guest disables the keyboard interrupt... then asks to write the CTR, and a
        // snapshot comes before the parameter.
        f.command(CMD_WRITE_CTR);
        f.write(CTR_SYS);
        f.command(CMD_WRITE_CTR);
        f.kbd.send_scancodes(&[0x1C, 0xF0, 0x1C]).unwrap();
        let state = f.kbd.state();
        assert_eq!(state.pending_command, Some(CMD_WRITE_CTR));
        assert_eq!(state.kbd, [0x1C, 0xF0, 0x1C]);

        let mut g = fixture();
        g.kbd.restore(&state).unwrap();
        assert_eq!(g.kbd.state(), state);
        assert_eq!(g.irq.count(), 0, "the keyboard interrupt is off");
        // The parameter goes where the saved command said: the CTR, interrupt back on.
        g.write(CTR_INITIAL);
        assert_eq!(
            g.irq.count(),
            1,
            "queued bytes raise once the interrupt is enabled"
        );
        assert_eq!(g.status() & STS_OBF, STS_OBF);
        assert_eq!([g.read(), g.read(), g.read()], [0x1C, 0xF0, 0x1C]);
        assert_eq!(g.status() & STS_OBF, 0);
        assert!(g.exit.reasons().is_empty());
    }

    #[test]
    fn a_restore_raises_for_a_byte_waiting() {
        let mut f = fixture();
        f.command(CMD_READ_CTR);
        let mut g = fixture();
        g.kbd.restore(&f.kbd.state()).unwrap();
        assert_eq!(g.irq.count(), 1);
        assert_eq!(g.read(), CTR_INITIAL);
    }

    #[test]
    fn hostile_states_are_refused_and_change_nothing() {
        let mut f = fixture();
        let good = f.kbd.state();
        let cases: [(I8042State, &str); 3] = [
            (
                I8042State {
                    kbd: vec![0; 17],
                    ..good.clone()
                },
                "invalid device state: i8042: 17 keyboard bytes queued; the buffer holds 16",
            ),
            (
                I8042State {
                    pending_command: Some(CMD_SELF_TEST),
                    ..good.clone()
                },
                "invalid device state: i8042: command 0xaa takes no parameter",
            ),
            (
                I8042State {
                    kbd_param_for: Some(KBD_RESET),
                    ..good.clone()
                },
                "invalid device state: i8042: keyboard command 0xff takes no parameter",
            ),
        ];
        for (state, message) in cases {
            let ctr_before = f.kbd.state();
            assert_eq!(f.kbd.restore(&state).unwrap_err().to_string(), message);
            assert_eq!(f.kbd.state(), ctr_before);
        }
    }

    impl Fixture {
        fn command(&mut self, cmd: u8) {
            self.kbd.pio_write(BASE, COMMAND, &[cmd]);
        }
        fn write(&mut self, byte: u8) {
            self.kbd.pio_write(BASE, DATA, &[byte]);
        }
        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.kbd.pio_read(BASE, COMMAND, &mut b);
            b[0]
        }
        fn read(&mut self) -> u8 {
            let mut b = [0];
            self.kbd.pio_read(BASE, DATA, &mut b);
            b[0]
        }
        /// What Linux's i8042_command does: the command, its parameter if any, then reads
        /// while the status says a byte waits.
        fn drain(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.status() & STS_OBF != 0 {
                out.push(self.read());
                assert!(out.len() <= 64, "the output never empties");
            }
            out
        }
        /// Disables the interrupt, as Linux does while probing.
        fn interrupt_off(&mut self) {
            self.command(CMD_WRITE_CTR);
            self.write(CTR_SYS);
        }
    }

    #[test]
    fn power_on_state() {
        let mut f = fixture();
        assert_eq!(f.status(), STS_UNLOCKED | STS_SYS);
        assert_eq!(f.read(), 0, "nothing to read");
        assert_eq!(f.irq.count(), 0);
        assert_eq!(f.kbd.kbd_free(), I8042_KBD_BUFFER_SIZE);
    }

    #[test]
    fn reset_command_notifies_reset() {
        let mut f = fixture();
        // Other commands, and 0xFE on the data port (a keyboard "resend"), do not reset.
        f.command(CMD_SELF_TEST);
        f.command(0xFF);
        f.command(0xFC);
        f.write(0xFE);
        assert!(f.exit.reasons().is_empty());
        f.command(CMD_PULSE_RESET);
        assert_eq!(f.exit.reasons(), vec![ExitReason::Reset]);
    }

    #[test]
    fn read_and_write_the_command_byte() {
        let mut f = fixture();
        f.command(CMD_READ_CTR);
        assert_eq!(f.status() & (STS_OBF | STS_CMD), STS_OBF | STS_CMD);
        assert_eq!(f.drain(), vec![CTR_INITIAL]);
        f.command(CMD_WRITE_CTR);
        assert_ne!(f.status() & STS_CMD, 0);
        f.write(0x70);
        assert_eq!(
            f.status() & STS_CMD,
            0,
            "the last write went to the data port"
        );
        assert_eq!(
            f.status() & STS_SYS,
            0,
            "the system flag follows the command byte"
        );
        f.command(CMD_READ_CTR);
        assert_eq!(f.drain(), vec![0x70]);
        // The parameter was the command's, not a keyboard command: no ACK anywhere.
        assert_eq!(f.drain(), Vec::<u8>::new());
    }

    #[test]
    fn controller_tests_and_output_port() {
        let mut f = fixture();
        f.interrupt_off();
        f.command(CMD_SELF_TEST);
        assert_eq!(f.drain(), vec![SELF_TEST_OK]);
        assert_ne!(
            f.status() & STS_SYS,
            0,
            "the self-test sets the system flag"
        );
        f.command(CMD_KBD_TEST);
        assert_eq!(f.drain(), vec![KBD_TEST_OK]);
        f.command(CMD_READ_OUTP);
        assert_eq!(f.drain(), vec![OUTP_INITIAL]);
        // Linux turns A20 on at probe: 0xD1 0xDF, then the "null" pulse command 0xFF.
        f.command(CMD_WRITE_OUTP);
        f.write(0xDF);
        f.command(0xFF);
        f.command(CMD_READ_OUTP);
        assert_eq!(f.drain(), vec![0xDF]);
        assert!(f.exit.reasons().is_empty());
        assert_eq!(f.irq.count(), 0, "the interrupt is off");
    }

    /// What Linux's i8042_check_aux concludes: the loopback byte comes back without the aux
    /// bit, the aux test fails, and the aux port cannot be enabled.
    #[test]
    fn aux_commands_say_there_is_no_aux_port() {
        let mut f = fixture();
        f.interrupt_off();
        f.command(CMD_WRITE_AUX_OUT);
        f.write(0x5A);
        assert_eq!(
            f.status() & (STS_OBF | 0x20),
            STS_OBF,
            "a byte, not from aux"
        );
        // Linux leaves it there and sends the aux test, whose reply replaces it.
        f.command(CMD_AUX_TEST);
        let reply = f.drain();
        assert_eq!(reply, vec![AUX_TEST_NO_PORT]);
        assert!(!matches!(reply[0], 0x00 | 0xFA | 0xFF));
        f.command(CMD_AUX_DISABLE);
        f.command(CMD_AUX_ENABLE);
        f.command(CMD_READ_CTR);
        assert_eq!(f.drain()[0] & CTR_AUX_DISABLE, CTR_AUX_DISABLE);
        // A byte for the aux device goes nowhere (not to the keyboard: no ACK).
        f.command(CMD_WRITE_AUX);
        f.write(0xF4);
        assert_eq!(f.drain(), Vec::<u8>::new());
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let mut f = fixture();
        f.interrupt_off();
        for (cmds, want) in [
            (&[KBD_GET_ID][..], &[KBD_ACK, 0xAB, 0x83][..]),
            (&[KBD_RESET], &[KBD_ACK, KBD_BAT_OK]),
            (&[KBD_ECHO], &[KBD_ECHO]),
            (&[0xF4], &[KBD_ACK]),
            (&[0xF5], &[KBD_ACK]),
            (&[0xF6], &[KBD_ACK]),
            (&[0x42], &[KBD_ACK]),
        ] {
            f.write(cmds[0]);
            assert_eq!(f.drain(), want, "command {cmds:02x?}");
        }
        // Commands with a parameter: ACK for each byte; scancode set 0 is a query.
        for (cmd, param, want) in [
            (KBD_SET_LEDS, 0x07, &[KBD_ACK][..]),
            (KBD_SET_TYPEMATIC, 0x20, &[KBD_ACK]),
            (KBD_SCANCODE_SET, 0x02, &[KBD_ACK]),
            (KBD_SCANCODE_SET, 0x00, &[KBD_ACK, KBD_SET_2]),
        ] {
            f.write(cmd);
            assert_eq!(f.drain(), vec![KBD_ACK]);
            f.write(param);
            assert_eq!(f.drain(), want, "{cmd:#x} {param:#x}");
        }
        // A command byte where a parameter was expected is a command.
        f.write(KBD_SET_LEDS);
        f.write(KBD_GET_ID);
        assert_eq!(f.drain(), vec![KBD_ACK, 0xAB, 0x83]);
        // Resend repeats the last byte sent.
        f.write(KBD_RESEND);
        assert_eq!(f.drain(), vec![0x83]);
    }

    #[test]
    fn keyboard_replies_raise_the_interrupt_per_byte() {
        let mut f = fixture();
        // Power-on command byte: interrupt enabled.
        f.write(KBD_GET_ID);
        assert_eq!(f.irq.count(), 1, "the reply arrived");
        assert_eq!(f.read(), KBD_ACK);
        assert_eq!(f.irq.count(), 2, "another byte waits");
        assert_eq!(f.read(), 0xAB);
        assert_eq!(f.irq.count(), 3);
        assert_eq!(f.read(), 0x83);
        assert_eq!(f.irq.count(), 3, "nothing left: no interrupt");
        assert_eq!(f.status() & STS_OBF, 0);
    }

    #[test]
    fn disabled_keyboard_holds_its_bytes() {
        let mut f = fixture();
        f.command(CMD_KBD_DISABLE);
        f.kbd.send_ctrl_alt_del().unwrap();
        assert_eq!(
            f.status() & STS_OBF,
            0,
            "held while the interface is disabled"
        );
        assert_eq!(f.irq.count(), 0);
        // A controller reply still gets through.
        f.command(CMD_READ_CTR);
        assert_eq!(f.drain(), vec![CTR_INITIAL | CTR_KBD_DISABLE]);
        let before = f.irq.count();
        f.command(CMD_KBD_ENABLE);
        assert_eq!(
            f.irq.count(),
            before + 1,
            "enabling reveals the waiting bytes"
        );
        assert_eq!(f.drain(), CTRL_ALT_DEL_SCANCODES.to_vec());
    }

    #[test]
    fn enabling_the_interrupt_reveals_a_waiting_byte() {
        let mut f = fixture();
        f.interrupt_off();
        f.kbd.send_ctrl_alt_del().unwrap();
        assert_eq!(f.irq.count(), 0, "the guest disabled the interrupt");
        assert_ne!(f.status() & STS_OBF, 0, "but can poll");
        f.command(CMD_WRITE_CTR);
        f.write(CTR_INITIAL);
        assert_eq!(f.irq.count(), 1);
    }

    /// Ctrl-Alt-Del as Linux's interrupt handler reads it: status, then data, one byte per
    /// interrupt.
    #[test]
    fn ctrl_alt_del_read_byte_by_byte() {
        let mut f = fixture();
        f.kbd.send_ctrl_alt_del().unwrap();
        assert_eq!(f.kbd.kbd_free(), I8042_KBD_BUFFER_SIZE - 11);
        let mut got = Vec::new();
        let mut interrupts = f.irq.count();
        assert_eq!(interrupts, 1);
        loop {
            let status = f.status();
            // Keyboard data: no aux bit, no parity or timeout error.
            assert_eq!(status & 0xE0, 0, "status {status:#x}");
            if status & STS_OBF == 0 {
                break;
            }
            got.push(f.read());
            let now = f.irq.count();
            let more = f.status() & STS_OBF != 0;
            assert_eq!(
                now - interrupts,
                u64::from(more),
                "one interrupt per waiting byte"
            );
            interrupts = now;
        }
        assert_eq!(
            got,
            [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
        );
        assert_eq!(f.kbd.kbd_free(), I8042_KBD_BUFFER_SIZE);
        assert_eq!(f.kbd.stats(), I8042Stats::default());
    }

    #[test]
    fn a_controller_reply_comes_before_keyboard_bytes() {
        let mut f = fixture();
        f.kbd.send_scancodes(&[0x1C, 0xF0, 0x1C]).unwrap();
        f.command(CMD_READ_CTR);
        assert_eq!(f.drain(), vec![CTR_INITIAL, 0x1C, 0xF0, 0x1C]);
    }

    #[test]
    fn full_buffer_refuses_the_whole_sequence() {
        let mut f = fixture();
        f.kbd.send_ctrl_alt_del().unwrap();
        let err = f.kbd.send_ctrl_alt_del().unwrap_err();
        assert!(
            matches!(
                err,
                Error::KbdBufferFull {
                    needed: 11,
                    free: 5
                }
            ),
            "{err}"
        );
        assert!(f
            .kbd
            .send_scancodes(&[0; I8042_KBD_BUFFER_SIZE + 1])
            .is_err());
        f.kbd.send_scancodes(&[0x1C; 5]).unwrap();
        assert!(f.kbd.send_scancodes(&[0x1C]).is_err());
        // Nothing of the refused sequences was queued.
        let mut want = CTRL_ALT_DEL_SCANCODES.to_vec();
        want.extend([0x1C; 5]);
        assert_eq!(f.drain(), want);
        f.kbd.send_ctrl_alt_del().unwrap();
        // "Write keyboard output" from the guest drops what does not fit, and counts it.
        for _ in 0..10 {
            f.command(CMD_WRITE_KBD_OUT);
            f.write(0x5A);
        }
        assert_eq!(f.kbd.stats().kbd_bytes_dropped, 5);
        assert_eq!(f.drain().len(), I8042_KBD_BUFFER_SIZE);
    }

    #[test]
    fn interrupt_failure_is_reported_and_counted() {
        struct Broken;
        impl InterruptLine for Broken {
            fn trigger(&self) -> io::Result<()> {
                Err(io::Error::other("broken"))
            }
        }
        let mut kbd = I8042::new(Recorder::new(), Arc::new(Broken));
        assert!(matches!(kbd.send_ctrl_alt_del(), Err(Error::Interrupt(_))));
        assert_eq!(
            kbd.kbd_free(),
            I8042_KBD_BUFFER_SIZE - 11,
            "the keys are queued"
        );
        let mut b = [0];
        kbd.pio_read(BASE, DATA, &mut b);
        assert_eq!(b, [0x14]);
        assert_eq!(kbd.stats().interrupt_errors, 2);
    }

    #[test]
    fn bad_accesses_are_ignored() {
        let mut f = fixture();
        let mut b = [0xAAu8];
        f.kbd.pio_read(BASE, 5, &mut b);
        assert_eq!(b, [0xFF]);
        f.kbd.pio_read(BASE, 1, &mut b);
        assert_eq!(b, [0]);
        let mut w = [0u8; 2];
        f.kbd.pio_read(BASE, COMMAND, &mut w);
        assert_eq!(w, [0xFF; 2]);
        f.kbd.pio_write(BASE, COMMAND, &[0xFE, 0x00]);
        f.kbd.pio_write(BASE, COMMAND, &[]);
        f.kbd.pio_write(BASE, 9, &[0xFE]);
        f.kbd.pio_write(BASE, 1, &[0xFE]);
        f.kbd.pio_write(BASE, DATA, &[0xFF, 0xFF]);
        assert!(f.exit.reasons().is_empty());
        assert_eq!(f.status(), STS_UNLOCKED | STS_SYS, "nothing changed");
    }

    /// Hostile guests: random accesses of any size at any offset never panic, the buffer
    /// stays bounded, and only 0xFE on the command port resets.
    #[test]
    fn random_accesses_never_panic() {
        let mut f = fixture();
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut resets = 0;
        for _ in 0..200_000 {
            let r = next();
            let offset = ((r >> 8) % 8) as PioAddressOffset;
            let len = [1, 1, 1, 1, 1, 1, 2, 0][(r >> 16) as usize % 8];
            let byte = (r >> 24) as u8;
            let mut buf = vec![byte; len];
            match r % 4 {
                0 => f.kbd.pio_read(BASE, offset, &mut buf),
                1 => {
                    let _ = f.kbd.send_scancodes(&buf);
                }
                _ => {
                    if offset == COMMAND && len == 1 && byte == CMD_PULSE_RESET {
                        resets += 1;
                    }
                    f.kbd.pio_write(BASE, offset, &buf);
                }
            }
            assert!(f.kbd.kbd.len() <= I8042_KBD_BUFFER_SIZE);
        }
        assert_eq!(f.exit.reasons().len(), resets);
        // Whatever state the guest left, the host's keys still get through once it reads.
        f.drain();
        f.command(CMD_KBD_ENABLE);
        f.drain();
        f.kbd.send_ctrl_alt_del().unwrap();
        assert_eq!(f.drain(), CTRL_ALT_DEL_SCANCODES.to_vec());
    }
}
