//! The `pci_config` oracles on hand-built inputs, and the seeds reaching the code.

use super::*;
use vmkit_pci::Bdf;

fn access(path: Path, dev: u8, reg: Reg, width: Width, value: Option<u32>) -> Op {
    let dev = Dev(SLOTS.iter().position(|s| *s == dev).expect("a named slot") as u8);
    Op::Access {
        path,
        dev,
        reg,
        width,
        value,
        oddity: Oddity::None,
    }
}

fn dev(slot: u8) -> Dev {
    Dev(SLOTS.iter().position(|s| *s == slot).expect("a named slot") as u8)
}

#[test]
fn read_only_fields_hold_and_the_model_catches_a_change() {
    let mut ops = Vec::new();
    for path in [Path::Port, Path::Ecam] {
        for reg in [0u16, 2, 8, 0x2C, 0x34, 0x40, 0x44, 0x52, 0x3D, 0x06] {
            for width in [Width::One, Width::Two, Width::Four, Width::Odd(1)] {
                ops.push(access(path, 5, Reg::Any(reg), width, Some(u32::MAX)));
                ops.push(access(path, 1, Reg::Any(reg), width, Some(0)));
                ops.push(access(path, 0, Reg::Any(reg), width, None));
            }
        }
    }
    let stats = run_with_stats(&Input { ops });
    assert!(stats.writes > 0);
    // A change the model was not told about (the device's own interrupt line) is caught.
    let h = Harness::new();
    h.bus.config_write(
        Bdf {
            bus: 0,
            device: 5,
            function: 0,
        },
        0x3C,
        &[7],
    );
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.model.check_all(&h.bus)));
    assert!(r.is_err(), "the model oracle misses a change");
}

#[test]
fn absent_functions_and_bad_accesses_read_all_ones() {
    let mut ops = vec![access(Path::Port, 9, Reg::Any(0), Width::Four, None)];
    for oddity in [Oddity::Function(0), Oddity::Bus(0), Oddity::Disabled] {
        let reg = Reg::Command(0);
        ops.push(Op::Access {
            path: Path::Port,
            dev: dev(1),
            reg,
            width: Width::Two,
            value: Some(0),
            oddity,
        });
        ops.push(Op::Access {
            path: Path::Ecam,
            dev: dev(1),
            reg,
            width: Width::Four,
            value: None,
            oddity,
        });
    }
    for (offset, width) in [
        (0x8_0FFE, Width::Four),
        (0x8_0001, Width::Two),
        (0x8_0000, Width::Odd(2)),
    ] {
        ops.push(Op::EcamRaw {
            offset: offset >> 1,
            width,
            value: Some(0),
        });
    }
    for offset in 0..12 {
        ops.push(Op::PortRaw {
            offset,
            width: Width::One,
            value: Some(0x80),
        });
        ops.push(Op::PortRaw {
            offset,
            width: Width::Four,
            value: None,
        });
    }
    run(&Input { ops });
}

#[test]
fn bar_sizing_reads_the_size_mask() {
    let mut ops = Vec::new();
    for (slot, bar) in [
        (1, 0),
        (1, 1),
        (5, 0),
        (5, 1),
        (5, 2),
        (5, 3),
        (5, 4),
        (0, 0),
    ] {
        for (path, pieces) in [
            (Path::Port, Pieces::Dword),
            (Path::Ecam, Pieces::Words),
            (Path::Port, Pieces::Bytes),
        ] {
            ops.push(Op::SizeBar {
                path,
                dev: dev(slot),
                bar,
                pieces,
                restore: true,
            });
        }
    }
    assert_eq!(run_with_stats(&Input { ops }).sized, 18);
    let bars = [PciBar {
        index: 0,
        kind: BarKind::Io,
        size: 0x20,
        address: 0,
    }];
    assert_eq!(size_mask(&bars, 0), 0xFFFF_FFE1);
}

#[test]
fn moves_map_where_allowed_and_nowhere_else() {
    let mv = |slot, bar, to| Op::MoveBar {
        path: Path::Ecam,
        dev: dev(slot),
        bar,
        to,
        halves: Halves::Both,
        pieces: Pieces::Dword,
    };
    let ops = vec![
        mv(1, 0, Place::Window(64)),
        mv(2, 0, Place::Window(80)),
        mv(1, 0, Place::OtherBar(dev(2), 0)),
        mv(1, 0, Place::Fixed(0)),
        mv(1, 0, Place::Scratch),
        mv(1, 0, Place::Outside(0x1000)),
        mv(1, 0, Place::Raw(0xFFFF_FFFF_FFFF_0000)),
        mv(1, 0, Place::Window(1)),
        Op::Command {
            path: Path::Port,
            dev: dev(5),
            change: Command::MemoryOn,
        },
        mv(5, 2, Place::OtherBar(dev(5), 1)),
        Op::Command {
            path: Path::Port,
            dev: dev(1),
            change: Command::MemoryOff,
        },
        Op::Command {
            path: Path::Ecam,
            dev: dev(1),
            change: Command::MemoryOn,
        },
    ];
    let stats = run_with_stats(&Input { ops });
    assert!(stats.moved >= 2 && stats.refused >= 3, "{stats:?}");
}

#[test]
fn the_mapping_oracles_fail_on_a_lie() {
    // An event the bus never sent.
    let mut h = Harness::new();
    let bar = h.bus.bar_mapping(1, 0).expect("01.0 decodes");
    h.events.0.lock().unwrap().push(BarEvent {
        bdf: Bdf {
            bus: 0,
            device: 1,
            function: 0,
        },
        bar,
        old: None,
        new: None,
    });
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.check_mappings()));
    assert!(r.is_err(), "a stray event passes");
    // A device on the VM's bus the model does not know about: the bus refuses a move
    // there, which the model thinks allowed.
    let mut h = Harness::new();
    let range = mmio_range(0xC040_0000, 0x1000).expect("range");
    h.vm_bus
        .register_mmio(range, Arc::new(Mutex::new(Scratch)))
        .expect("register");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        h.move_bar(Path::Ecam, 1, 0, 0xC040_0000, Halves::Both, Pieces::Dword)
    }));
    assert!(r.is_err(), "liveness misses an unmapped BAR");
}

#[test]
fn capability_walks_end_and_a_loop_is_caught() {
    let ops = [0u8, 1, 2, 5, 9]
        .iter()
        .map(|s| Op::WalkCaps {
            path: Path::Port,
            dev: dev(*s),
        })
        .collect();
    assert_eq!(run_with_stats(&Input { ops }).walks, 3);
    let looping = |reg: u16, _len: usize| match reg {
        6 => 0x10,
        0x34 => 0x40,
        0x40 => 0x4011, // MSI-X, next 0x40
        _ => 0,
    };
    assert!(std::panic::catch_unwind(|| walk(looping)).is_err());
}

#[test]
fn the_seeds_reach_sizing_moves_refusals_and_walks() {
    let mut total = Stats::default();
    for seed in crate::seeds::for_target("pci_config") {
        let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(&seed)) else {
            continue;
        };
        let s = run_with_stats(&input);
        total.sized += s.sized;
        total.moved += s.moved;
        total.refused += s.refused;
        total.mapped += s.mapped;
        total.walks += s.walks;
        total.writes += s.writes;
    }
    eprintln!("pci_config seeds: {total:?}");
    assert!(
        total.sized > 0 && total.moved > 0 && total.refused > 0,
        "{total:?}"
    );
    assert!(
        total.mapped > 2 && total.walks > 0 && total.writes > 100,
        "{total:?}"
    );
}
