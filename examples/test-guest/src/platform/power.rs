//! Ending the guest: ACPI S5, reset, or halt.

use crate::platform::acpi::Acpi;
use crate::platform::arch::{halt_forever, outb};
use crate::platform::time::delay_us;
use crate::println;

/// How the guest ends (`exit=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// ACPI S5 through the FADT.
    Poweroff,
    /// i8042 reset, then the FADT reset register.
    Reset,
    /// `cli; hlt` forever.
    Halt,
}

/// Leaves the way `exit` asks; prints `exit: failed` and halts if the VM
/// is still running ~100 ms later.
pub fn exit(how: Exit, acpi: Option<&Acpi>) -> ! {
    match how {
        Exit::Halt => {
            println!("exit: halt");
            halt_forever();
        }
        Exit::Poweroff => {
            println!("exit: poweroff");
            if let Some(acpi) = acpi {
                let typ = u64::from(acpi.s5_type & 7);
                if let Some(reg) = acpi.sleep_control {
                    reg.write((typ << 2) | (1 << 5)); // SLP_TYP | SLP_EN
                } else if let Some(reg) = acpi.pm1a_control {
                    reg.write((typ << 10) | (1 << 13));
                }
            }
        }
        Exit::Reset => {
            println!("exit: reset");
            outb(0x64, 0xfe); // i8042: pulse the reset line
            delay_us(10_000);
            if let Some((reg, value)) = acpi.and_then(|a| a.reset) {
                reg.write(u64::from(value));
            }
        }
    }
    delay_us(100_000);
    println!("exit: failed");
    halt_forever()
}
