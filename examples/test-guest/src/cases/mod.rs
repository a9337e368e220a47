//! The tests: one per file, registered in `CASES` with the name
//! `test=<name>` selects, what it needs to run under `test=all`, and how it
//! runs. `run` goes through the table in its order: the cases that run
//! once, then per blk device the cases that run on a disk.
//!
//! (`support` holds what the cases share: their context, how they were
//! selected, the result line; `blk_data` the blk tests' data patterns,
//! `blk_slots` their requests in flight;
//! `blk_write_flush` is a command-line item of its own, not a case.)

pub mod blk_data;
pub mod blk_discard;
pub mod blk_inflight;
pub mod blk_ro;
pub mod blk_serial;
pub mod blk_slots;
pub mod blk_verify;
pub mod blk_write_flush;
pub mod pci;
pub mod serial_irq;
pub mod smp;
pub mod soak;
pub mod support;
pub mod timer;
pub mod virtio_console;
pub mod virtio_irq;
pub mod virtio_net;
pub mod virtio_rng;
pub mod virtio_vsock;

use crate::drivers::blk::BlkDisk;
use crate::println;
use alloc::string::String;
use support::{report, Ctx, Want};
use virtio_drivers::transport::DeviceType;

/// Which blk devices a disk case runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    Any,
    Writable,
    ReadOnly,
}

impl DiskKind {
    fn fits(self, disk: &BlkDisk) -> bool {
        match self {
            DiskKind::Any => true,
            DiskKind::Writable => !disk.ro,
            DiskKind::ReadOnly => disk.ro,
        }
    }

    /// The word in `FAIL no <word>blk device`.
    fn word(self) -> &'static str {
        match self {
            DiskKind::Any => "",
            DiskKind::Writable => "writable ",
            DiskKind::ReadOnly => "read-only ",
        }
    }
}

/// What a case needs to run under `test=all`. Named, a case always runs
/// (and fails without what it needs), except that a disk case runs on the
/// disks it fits and otherwise prints `FAIL no <kind> blk device`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Nothing: always part of `all`.
    Nothing,
    /// Not part of `all`: runs only when named.
    Naming,
    /// A virtio device of this type (on either transport).
    Device(DeviceType),
    /// Runs on each blk device of this kind.
    Disk(DiskKind),
}

/// How a case runs.
pub enum Run {
    /// Once; it prints its own `test <name>:` lines (`report`), one per
    /// transport for the virtio cases.
    Once(fn(&Ctx, Want)),
    /// Per blk device it fits; `run` prints `test <name>: ok<extra>` or
    /// `FAIL <why>`, with ` (pci)` for pci devices.
    OnDisk(fn(&Ctx, &BlkDisk, Want) -> Result<String, String>),
}

/// One test.
pub struct Case {
    /// Its name on the command line (`test=<name>[:N]`).
    pub name: &'static str,
    pub needs: Needs,
    /// The range of `N` in `<name>:N`; `None` when it takes no argument.
    pub arg: Option<(u64, u64)>,
    pub run: Run,
}

const fn case(name: &'static str, needs: Needs, run: Run) -> Case {
    Case {
        name,
        needs,
        arg: None,
        run,
    }
}

/// Every test, in the order they run.
pub const CASES: [Case; 15] = [
    case("timer", Needs::Nothing, Run::Once(timer::run)),
    case("serial-irq", Needs::Nothing, Run::Once(serial_irq::run)),
    case("smp", Needs::Nothing, Run::Once(smp::run)),
    case("pci", Needs::Naming, Run::Once(pci::run)),
    case(
        "virtio-rng",
        Needs::Device(DeviceType::EntropySource),
        Run::Once(virtio_rng::run),
    ),
    case(
        "virtio-console",
        Needs::Device(DeviceType::Console),
        Run::Once(virtio_console::run),
    ),
    case(
        "virtio-irq",
        Needs::Device(DeviceType::EntropySource),
        Run::Once(virtio_irq::run),
    ),
    case(
        "virtio-net",
        Needs::Device(DeviceType::Network),
        Run::Once(virtio_net::run),
    ),
    case(
        "virtio-vsock",
        Needs::Device(DeviceType::Socket),
        Run::Once(virtio_vsock::run),
    ),
    case("soak", Needs::Naming, Run::Once(soak::run)),
    case(
        "blk-serial",
        Needs::Disk(DiskKind::Any),
        Run::OnDisk(blk_serial::run),
    ),
    Case {
        name: "blk-verify",
        needs: Needs::Disk(DiskKind::Writable),
        arg: Some((1, 1 << 20)),
        run: Run::OnDisk(blk_verify::run),
    },
    case(
        "blk-inflight",
        Needs::Disk(DiskKind::Writable),
        Run::OnDisk(blk_inflight::run),
    ),
    case(
        "blk-discard",
        Needs::Disk(DiskKind::Writable),
        Run::OnDisk(blk_discard::run),
    ),
    case(
        "blk-ro",
        Needs::Disk(DiskKind::ReadOnly),
        Run::OnDisk(blk_ro::run),
    ),
];

/// Which cases the command line selected, by index in `CASES`.
#[derive(Clone, Copy, Debug)]
pub struct Selection([Option<Want>; CASES.len()]);

/// Why a `test=` item was not taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadItem {
    /// No such case (or an argument for one that takes none).
    Unknown,
    /// The argument is not a number in the case's range.
    BadValue,
}

impl Selection {
    pub const NONE: Selection = Selection([None; CASES.len()]);

    /// Takes one `test=` item: `all`, `<name>` or `<name>:N`. A name wins
    /// over `all`, the last mention of a name over earlier ones.
    pub fn add(&mut self, item: &str) -> Result<(), BadItem> {
        if item == "all" {
            for (want, case) in self.0.iter_mut().zip(CASES.iter()) {
                if case.needs != Needs::Naming && !matches!(want, Some(Want::Named(_))) {
                    *want = Some(Want::All);
                }
            }
            return Ok(());
        }
        let (name, arg) = match item.split_once(':') {
            Some((name, arg)) => (name, Some(arg)),
            None => (item, None),
        };
        let index = CASES
            .iter()
            .position(|c| c.name == name)
            .ok_or(BadItem::Unknown)?;
        let value = match (arg, CASES[index].arg) {
            (None, _) => None,
            (Some(_), None) => return Err(BadItem::Unknown),
            (Some(text), Some((min, max))) => Some(
                text.parse::<u64>()
                    .ok()
                    .filter(|v| (min..=max).contains(v))
                    .ok_or(BadItem::BadValue)?,
            ),
        };
        self.0[index] = Some(Want::Named(value));
        Ok(())
    }
}

/// Runs the selected cases: those that run once in table order, then per
/// blk device those that run on it, then a `FAIL` line for each named disk
/// case that found no disk it fits.
pub fn run(ctx: &Ctx, selection: &Selection) {
    let selected = || {
        CASES
            .iter()
            .zip(selection.0.iter())
            .filter_map(|(case, want)| Some((case, (*want)?)))
    };
    for (case, want) in selected() {
        if let Run::Once(f) = case.run {
            let present = match case.needs {
                Needs::Device(kind) => ctx.devices.has(kind),
                Needs::Nothing => true,
                Needs::Naming | Needs::Disk(_) => false,
            };
            if present || want != Want::All {
                f(ctx, want);
            }
        }
    }
    for disk in ctx.disks {
        for (case, want) in selected() {
            if let (Run::OnDisk(f), Needs::Disk(kind)) = (&case.run, case.needs) {
                if kind.fits(disk) {
                    report(case.name, disk.dev.bus().suffix(), f(ctx, disk, want));
                }
            }
        }
    }
    for (case, want) in selected() {
        if let (Needs::Disk(kind), Want::Named(_)) = (case.needs, want) {
            if !ctx.disks.iter().any(|d| kind.fits(d)) {
                println!("test {}: FAIL no {}blk device", case.name, kind.word());
            }
        }
    }
}
