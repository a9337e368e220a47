//! The guest command line: space-separated `key=value` pairs.
//!
//! `test=smp,timer,serial-irq,all`, `bench=pio:N`, `exit=poweroff|reset|halt`.

use crate::println;

/// How the guest ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// ACPI S5 through the FADT.
    Poweroff,
    /// i8042 reset, then the FADT reset register.
    Reset,
    /// `cli; hlt` forever.
    Halt,
}

/// What the command line asks for.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub test_smp: bool,
    pub test_timer: bool,
    pub test_serial_irq: bool,
    /// Number of `out 0x80` writes to time, if any.
    pub bench_pio: Option<u64>,
    pub exit: Exit,
}

impl Config {
    /// Parses `cmdline`, reporting (and ignoring) what it does not understand.
    pub fn parse(cmdline: &str) -> Config {
        let mut cfg = Config {
            test_smp: false,
            test_timer: false,
            test_serial_irq: false,
            bench_pio: None,
            exit: Exit::Poweroff,
        };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "test" => {
                    for name in value.split(',').filter(|n| !n.is_empty()) {
                        match name {
                            "smp" => cfg.test_smp = true,
                            "timer" => cfg.test_timer = true,
                            "serial-irq" => cfg.test_serial_irq = true,
                            "all" => {
                                cfg.test_smp = true;
                                cfg.test_timer = true;
                                cfg.test_serial_irq = true;
                            }
                            other => println!("cmdline: unknown test {}", other),
                        }
                    }
                }
                "bench" => match value
                    .strip_prefix("pio:")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    Some(n) => cfg.bench_pio = Some(n),
                    None => println!("cmdline: bad value bench={}", value),
                },
                "exit" => match value {
                    "poweroff" => cfg.exit = Exit::Poweroff,
                    "reset" => cfg.exit = Exit::Reset,
                    "halt" => cfg.exit = Exit::Halt,
                    other => println!("cmdline: bad value exit={}", other),
                },
                other => println!("cmdline: unknown key {}", other),
            }
        }
        cfg
    }
}
