//! The `msix` oracles on hand-built inputs, and the seeds reaching the code.

use super::*;

fn fails(f: impl FnOnce()) -> bool {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err()
}

#[test]
fn triggers_deliver_iff_enabled_and_unmasked_with_the_tables_message() {
    let ops = vec![
        Op::Trigger(Vector::In(0)),                           // disabled: nothing
        Op::Control(true, false),                             // enabled
        Op::Trigger(Vector::In(1)),                           // masked: pending
        Op::Program(Vector::In(1), 0xFEE0_1000, 0x41, false), // unmask: delivered
        Op::Trigger(Vector::In(1)),                           // straight through
        Op::Control(true, true),                              // function mask
        Op::Trigger(Vector::In(1)),                           // pending
        Op::ReadPba(0, Width::Eight),
        Op::Control(true, false), // delivered
        Op::Trigger(Vector::Out(5)),
        Op::Trigger(Vector::Out(u16::MAX)),
    ];
    let s = run_with_stats(&Input { vectors: 2, ops });
    assert_eq!((s.delivered, s.pended, s.flushed), (1, 2, 2), "{s:?}");
    // A delivery the model does not expect, or through a stale route, is caught.
    let mut h = Harness::new(2);
    vmkit_irq::MsiVectorSink::trigger(&*h.sink, 0).expect("recording sink");
    assert!(fails(|| h.check()), "an unexpected delivery passes");
}

#[test]
fn pending_bits_read_back_and_pba_writes_change_nothing() {
    let mut ops = vec![Op::Control(true, false)];
    ops.extend((0..70).step_by(3).map(|v| Op::Trigger(Vector::In(v))));
    for o in [
        0u16, 4, 8, 0x1000, 0x1004, 0x1008, 0x100C, 0x1010, 0x1001, 0xFFFF,
    ] {
        ops.push(Op::Bar(o, Width::Eight, Some(u64::MAX)));
        ops.push(Op::Bar(o, Width::Four, None));
        ops.push(Op::Bar(o, Width::Odd(2), None));
    }
    ops.extend((0..24).map(|o| Op::ReadPba(o, Width::Four)));
    ops.push(Op::ClearPending);
    ops.push(Op::ReadPba(8, Width::Eight));
    let s = run_with_stats(&Input { vectors: 69, ops });
    assert_eq!(s.pended, 24);
    // A pending bit the model does not know about is caught.
    let mut h = Harness::new(4);
    h.config_write(h.cap + 2, &MSIX_CONTROL_ENABLE.to_le_bytes());
    h.table.trigger(3).expect("recording sink");
    assert!(fails(|| h.check()), "a stray pending bit passes");
}

#[test]
fn table_reads_return_what_was_written_and_bad_accesses_nothing() {
    let mut ops = Vec::new();
    for f in [
        Field::AddrLo,
        Field::AddrHi,
        Field::Data,
        Field::Control,
        Field::Raw(2),
        Field::Raw(9),
    ] {
        for w in [Width::Four, Width::Eight, Width::Odd(0), Width::Odd(4)] {
            ops.push(Op::Write(Vector::In(1), f, w, u64::MAX));
            ops.push(Op::Read(Vector::In(1), f, w));
            ops.push(Op::Write(Vector::Out(0), f, w, 0));
            ops.push(Op::Read(Vector::Out(7), f, w));
        }
    }
    run(&Input { vectors: 3, ops });
    let mut h = Harness::new(2);
    h.table.write_table(16, &7u32.to_le_bytes());
    assert!(
        fails(|| h.read_table(16, 4)),
        "a write the model missed passes"
    );
}

#[test]
fn only_enable_and_function_mask_are_writable() {
    let ops = (0..0x10)
        .flat_map(|n| [Op::Config(n, 2, u32::MAX), Op::Config(n, 0, 0)])
        .chain([Op::Config(0xF3, 1, 0)])
        .collect();
    run(&Input { vectors: 80, ops });
    let mut h = Harness::new(2);
    h.cap_bytes[1] ^= 1;
    assert!(
        fails(|| h.config_write(0, &[0])),
        "a changed table offset passes"
    );
}

#[test]
fn resets_drop_pending_and_routes() {
    let ops = vec![
        Op::Control(true, false),
        Op::Trigger(Vector::Last),
        Op::Reset,
        Op::Trigger(Vector::Last),
        Op::Config(0, 0, 0), // the capability still says enabled: enabled again
        Op::Trigger(Vector::Last),
        Op::ClearPending,
        Op::Mask(Vector::Last, false),
    ];
    let s = run_with_stats(&Input { vectors: 5, ops });
    assert_eq!((s.pended, s.flushed), (2, 0), "{s:?}");
}

#[test]
fn the_seeds_enable_msix_and_deliver() {
    let mut total = Stats::default();
    for seed in crate::seeds::for_target("msix") {
        let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(&seed)) else {
            continue;
        };
        let s = run_with_stats(&input);
        total.delivered += s.delivered;
        total.pended += s.pended;
        total.flushed += s.flushed;
    }
    eprintln!("msix seeds: {total:?}");
    assert!(
        total.delivered > 0 && total.pended > 0 && total.flushed > 0,
        "{total:?}"
    );
}
