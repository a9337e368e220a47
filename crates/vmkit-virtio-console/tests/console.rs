//! virtio-console against virtio-drivers' `VirtIOConsole` (through vmkit-virtio's harness),
//! and against hostile rings built with virtio-queue's mock.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{
    activate_context, guest_memory, mock_queue, GuestHal, Harness, RecordingInterrupt,
};
use vmkit_virtio::{
    regs, InterruptReason, NeedsReset, VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1,
};
use vmkit_virtio_console::{Console, ConsoleConfig, RECEIVEQ, TRANSMITQ};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// A sink the test can read back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

fn console_with(input_capacity: usize, max_tx: u32) -> (Arc<Mutex<Console>>, Sink) {
    let sink = Sink::default();
    let mut cfg = ConsoleConfig::new(Box::new(sink.clone()));
    cfg.input_capacity = input_capacity;
    cfg.max_tx_bytes_per_chain = max_tx;
    (Arc::new(Mutex::new(Console::new(cfg).unwrap())), sink)
}

fn console() -> (Arc<Mutex<Console>>, Sink) {
    console_with(64 * 1024, 1 << 20)
}

/// Bytes 0..len with a pattern that shows misordering.
fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 7 + seed * 13) % 251) as u8)
        .collect()
}

/// Receives `len` bytes with `recv`, running the transport's queue event handler (what the
/// VMM's event loop does) when nothing is there yet.
fn recv_exact(
    h: &Harness,
    driver: &mut VirtIOConsole<GuestHal, vmkit_virtio::test_utils::HarnessTransport>,
    len: usize,
) -> Vec<u8> {
    let mut handler = h.mmio().queue_event_handler().unwrap();
    let mut got = Vec::with_capacity(len);
    let mut idle = 0;
    while got.len() < len {
        match driver.recv(true).unwrap() {
            Some(b) => {
                got.push(b);
                idle = 0;
            }
            None => {
                handler.poll();
                idle += 1;
                assert!(idle < 3, "no input after {} of {len} bytes", got.len());
            }
        }
    }
    assert_eq!(driver.recv(false).unwrap(), None, "more input than pushed");
    got
}

// ---- against virtio-drivers ----

#[test]
fn guest_output_reaches_the_sink_exactly() {
    let (dev, sink) = console();
    let h = Harness::new(dev.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(h.read32(regs::STATUS), 0xF);
    assert_eq!(driver.size().unwrap(), None, "SIZE is not offered");

    driver.send_bytes(b"hello").unwrap();
    assert_eq!(sink.take(), b"hello");

    // Many more chains than the queue holds (the driver's queue has 2 entries, ours up to
    // 256), of many sizes, one byte at a time too, and one buffer of 200 KiB.
    let mut expected = Vec::new();
    let mut chains = 0u64;
    for i in 0..600 {
        let chunk = pattern(1 + (i * 37) % 3000, i);
        driver.send_bytes(&chunk).unwrap();
        expected.extend_from_slice(&chunk);
        chains += 1;
    }
    for &c in b"one at a time\n" {
        driver.send(c).unwrap();
        expected.push(c);
        chains += 1;
    }
    let big = pattern(200 * 1024, 99);
    driver.send_bytes(&big).unwrap();
    expected.extend_from_slice(&big);
    chains += 1;
    std::fmt::Write::write_fmt(&mut driver, format_args!("formatted {}", 42)).unwrap();
    expected.extend_from_slice(b"formatted 42");
    chains += 1;

    let got = sink.take();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "output differs");

    let stats = dev.lock().unwrap().stats();
    assert_eq!(stats.tx_chains, chains + 1);
    assert_eq!(stats.tx_bytes, expected.len() as u64 + 5);
    assert_eq!(stats.tx_dropped, 0);
    assert_eq!(stats.bad_chains, 0);
}

#[test]
fn transmit_chains_are_bounded() {
    let (dev, sink) = console_with(1024, 1000);
    let h = Harness::new(dev.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    let data = pattern(4096, 1);
    driver.send_bytes(&data).unwrap();
    assert_eq!(sink.take(), &data[..1000]);
    assert_eq!(dev.lock().unwrap().stats().tx_dropped, 3096);
}

#[test]
fn host_input_reaches_the_guest() {
    let (dev, _sink) = console();
    let input = dev.lock().unwrap().input();
    let h = Harness::new(dev.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    let before = h.interrupts();

    // Through the handle: it signals the receiveq notifier; the event loop runs the device.
    assert_eq!(input.push(b"hello guest"), 11);
    assert_eq!(recv_exact(&h, &mut driver, 11), b"hello guest");
    assert!(h.interrupts() > before, "the guest was interrupted");

    // More than one receive buffer (virtio-drivers posts one page at a time): the rest
    // waits in the device until the driver posts the next buffer and notifies.
    let big = pattern(10_000, 3);
    assert_eq!(input.push(&big), 10_000);
    assert_eq!(recv_exact(&h, &mut driver, 10_000), big);

    // Directly on the device.
    assert_eq!(dev.lock().unwrap().enqueue_input(b"direct"), 6);
    assert_eq!(recv_exact(&h, &mut driver, 6), b"direct");

    assert_eq!(input.pending(), 0);
    let stats = dev.lock().unwrap().stats();
    assert_eq!(stats.rx_bytes, 10_017);
    assert!(stats.rx_chains >= 4);
    assert_eq!(stats.input_refused, 0);
}

#[test]
fn input_beyond_the_buffer_is_refused_not_lost() {
    let (dev, _sink) = console_with(5000, 1 << 20);
    let input = dev.lock().unwrap().input();
    // Before the driver: buffered, delivered once it posts its receive buffer.
    let data = pattern(12_000, 5);
    assert_eq!(input.push(&data), 5000);
    assert_eq!(input.free(), 0);
    let h = Harness::new(dev.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(recv_exact(&h, &mut driver, 5000), &data[..5000]);
    assert_eq!(dev.lock().unwrap().stats().input_refused, 7000);
    // Room again.
    assert_eq!(input.push(&data[5000..]), 5000);
    assert_eq!(recv_exact(&h, &mut driver, 5000), &data[5000..10_000]);
}

#[test]
fn emergency_write() {
    let (dev, sink) = console();
    let h = Harness::new(dev.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    for &c in b"SOS" {
        driver.emergency_write(c).unwrap();
    }
    assert_eq!(sink.take(), b"SOS");
    assert_eq!(dev.lock().unwrap().stats().emergency_bytes, 3);
    // Also before the driver negotiates anything, as the spec allows.
    drop(driver);
    h.write32(0x100 + 8, u32::from(b'!'));
    assert_eq!(sink.take(), b"!");
}

#[test]
fn reset_and_use_again() {
    let (dev, sink) = console();
    let input = dev.lock().unwrap().input();
    let h = Harness::new(dev.clone());
    for round in 0..3u8 {
        let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
        assert!(dev.lock().unwrap().is_active());
        driver.send_bytes(&[b'0' + round]).unwrap();
        assert_eq!(sink.take(), [b'0' + round]);
        input.push(&[b'a' + round]);
        assert_eq!(recv_exact(&h, &mut driver, 1), [b'a' + round]);
        drop(driver);
        assert!(!dev.lock().unwrap().is_active());
    }
    // Input pushed while reset waits for the next driver.
    assert_eq!(input.push(b"later"), 5);
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(recv_exact(&h, &mut driver, 5), b"later");
}

#[test]
fn input_not_yet_given_to_the_guest_survives_a_restore() {
    let (dev, sink) = console();
    let h = Harness::new(dev.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    // virtio-drivers posts one page at a time: most of this waits in the device.
    let data = pattern(10_000, 9);
    assert_eq!(dev.lock().unwrap().enqueue_input(&data), 10_000);
    // The guest reads a little of its first buffer (the rest of which is guest memory's).
    for want in &data[..100] {
        assert_eq!(driver.recv(true).unwrap(), Some(*want));
    }
    let pending = dev.lock().unwrap().pending_input();
    assert_eq!(pending, 10_000 - 4096, "input left in the device");
    let state = dev.lock().unwrap().state();
    assert_eq!(state.pending_input, &data[10_000 - pending..]);
    drop(driver);
    drop(h);

    // A console built afresh: the transport activates it, the rest reaches the guest.
    let (fresh, fresh_sink) = console();
    fresh.lock().unwrap().restore(&state).unwrap();
    let h = Harness::new(fresh.clone());
    let mut driver = VirtIOConsole::<GuestHal, _>::new(h.transport()).unwrap();
    assert_eq!(
        recv_exact(&h, &mut driver, pending),
        &data[10_000 - pending..]
    );
    // And it works both ways.
    driver.send_bytes(b"after").unwrap();
    assert_eq!(fresh_sink.take(), b"after");
    assert!(sink.take().is_empty());
}

// ---- hostile rings ----

const MEM: usize = 0x40_0000;
const POISON: u8 = 0x5A;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x2000;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

struct Hostile {
    mem: GuestMemoryMmap,
    dev: Console,
    sink: Sink,
    irq: Arc<RecordingInterrupt>,
    needs_reset: NeedsReset,
    rx_used: GuestAddress,
    tx_used: GuestAddress,
    rx_notifier: vmm_sys_util::eventfd::EventFd,
}

/// Memory with the data area (0x10000 up) poisoned, `setup` applied, rx and tx mock rings
/// of 16 entries holding `rx` and `tx` (descriptor tables from index 0), and a console
/// activated on them with `input` pushed. Nothing is processed yet.
fn hostile(
    max_tx: u32,
    features: u64,
    rx: &[RawDescriptor],
    tx: &[RawDescriptor],
    input: &[u8],
    setup: impl FnOnce(&GuestMemoryMmap),
) -> Hostile {
    hostile_with(max_tx, features, rx, tx, input, setup, |_| {})
}

/// [`hostile`], with `configure` applied to the console's configuration.
fn hostile_with(
    max_tx: u32,
    features: u64,
    rx: &[RawDescriptor],
    tx: &[RawDescriptor],
    input: &[u8],
    setup: impl FnOnce(&GuestMemoryMmap),
    configure: impl FnOnce(&mut ConsoleConfig),
) -> Hostile {
    let mem = guest_memory(MEM);
    mem.write_slice(&vec![POISON; MEM - 0x1_0000], GuestAddress(0x1_0000))
        .unwrap();
    setup(&mem);
    let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
    if !rx.is_empty() {
        rxq.add_desc_chains(rx, 0).unwrap();
    }
    if !tx.is_empty() {
        txq.add_desc_chains(tx, 0).unwrap();
    }
    let mut rx_queue = mock_queue(&rxq);
    let mut tx_queue = mock_queue(&txq);
    let event_idx = features & FEATURE_RING_EVENT_IDX != 0;
    rx_queue.set_event_idx(event_idx);
    tx_queue.set_event_idx(event_idx);
    let (rx_used, tx_used) = (
        GuestAddress(rx_queue.used_ring()),
        GuestAddress(tx_queue.used_ring()),
    );
    let irq = RecordingInterrupt::new();
    let (ctx, needs_reset) = activate_context(
        &mem,
        features,
        vec![(RECEIVEQ, rx_queue), (TRANSMITQ, tx_queue)],
        irq.clone(),
    );
    let rx_notifier = ctx.queue(RECEIVEQ).unwrap().notifier().try_clone().unwrap();
    let sink = Sink::default();
    let mut cfg = ConsoleConfig::new(Box::new(sink.clone()));
    cfg.max_tx_bytes_per_chain = max_tx;
    configure(&mut cfg);
    let mut dev = Console::new(cfg).unwrap();
    dev.input().push(input);
    dev.activate(ctx).unwrap();
    Hostile {
        mem,
        dev,
        sink,
        irq,
        needs_reset,
        rx_used,
        tx_used,
        rx_notifier,
    }
}

fn rx(chain: &[RawDescriptor], input: &[u8]) -> Hostile {
    hostile(1 << 20, FEATURE_VERSION_1, chain, &[], input, |_| {})
}

fn tx(chain: &[RawDescriptor], max_tx: u32) -> Hostile {
    let mut h = hostile(max_tx, FEATURE_VERSION_1, &[], chain, &[], |_| {});
    h.dev.process_queue(TRANSMITQ);
    h
}

impl Hostile {
    fn used_len(&self, used: GuestAddress, i: u64) -> u32 {
        self.mem
            .read_obj(used.unchecked_add(4 + 8 * i + 4))
            .unwrap()
    }
    fn used_idx(&self, used: GuestAddress) -> u16 {
        self.mem.read_obj(used.unchecked_add(2)).unwrap()
    }
    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
    fn untouched(&self, addr: u64, len: usize) -> bool {
        self.read(addr, len).iter().all(|b| *b == POISON)
    }
}

#[test]
fn tx_writable_descriptors_are_skipped() {
    let mut h = hostile(
        1 << 20,
        FEATURE_VERSION_1,
        &[],
        &[
            desc(0x1_0000, 3, NEXT, 1),
            desc(0x2_0000, 64, WRITE | NEXT, 2),
            desc(0x3_0000, 3, 0, 0),
        ],
        &[],
        |m| {
            m.write_slice(b"abc", GuestAddress(0x1_0000)).unwrap();
            m.write_slice(b"def", GuestAddress(0x3_0000)).unwrap();
        },
    );
    h.dev.process_queue(TRANSMITQ);
    assert_eq!(h.sink.take(), b"abcdef");
    assert_eq!(h.used_idx(h.tx_used), 1);
    assert_eq!(h.used_len(h.tx_used, 0), 0, "tx used length is 0");
    assert!(
        h.untouched(0x2_0000, 64),
        "the writable buffer is not touched"
    );
    let s = h.dev.stats();
    assert_eq!(
        (s.tx_chains, s.tx_bytes, s.tx_writable_descriptors),
        (1, 6, 1)
    );
    assert_eq!(h.irq.reasons(), [InterruptReason::Queue(TRANSMITQ)]);
    assert!(!h.needs_reset.is_set());
}

#[test]
fn tx_huge_lengths() {
    // 1 MiB inside memory with a 4 KiB bound: 4 KiB out, the rest dropped.
    let h = tx(&[desc(0x10_0000, 0x10_0000, 0, 0)], 0x1000);
    assert_eq!(h.sink.take(), vec![POISON; 0x1000]);
    assert_eq!(h.dev.stats().tx_dropped, 0xF_F000);
    // The bound spans descriptors.
    let h = tx(
        &[desc(0x1_0000, 0x800, NEXT, 1), desc(0x2_0000, 0x1000, 0, 0)],
        0x1000,
    );
    assert_eq!(h.sink.take().len(), 0x1000);
    // 4 GiB - 1 runs past the end of memory: the chain is refused, nothing written.
    let h = tx(&[desc(0x10_0000, u32::MAX, 0, 0)], u32::MAX);
    assert!(h.sink.take().is_empty());
    assert_eq!(h.dev.stats().bad_chains, 1);
    assert_eq!(h.used_idx(h.tx_used), 1);
    assert!(!h.needs_reset.is_set(), "a bad request, not a broken ring");
}

#[test]
fn tx_chains_crossing_the_end_of_memory_are_refused_whole() {
    let end = MEM as u64;
    for chain in [
        vec![desc(0x1_0000, 16, NEXT, 1), desc(end - 8, 16, 0, 0)],
        vec![desc(end - 8, 16, 0, 0)],
        vec![desc(end, 1, 0, 0)],
        vec![desc(u64::MAX - 7, 16, 0, 0)],
    ] {
        let h = tx(&chain, 1 << 20);
        assert!(h.sink.take().is_empty(), "{chain:?}");
        assert_eq!(h.used_idx(h.tx_used), 1);
        assert_eq!(h.used_len(h.tx_used, 0), 0);
    }
}

#[test]
fn tx_loops_and_bad_indirect_tables_are_refused() {
    let looped = [desc(0x1_0000, 16, NEXT, 1), desc(0x2_0000, 16, NEXT, 0)];
    let all: Vec<_> = (0..16u16)
        .map(|i| desc(0x1_0000, 16, NEXT, (i + 1) % 16))
        .collect();
    let bad_next = [desc(0x1_0000, 16, NEXT, 99)];
    let poison_table = [desc(0x30_0000, 32, INDIRECT, 0)];
    let odd_table = [desc(0x30_0000, 20, INDIRECT, 0)];
    for chain in [&looped[..], &all, &bad_next, &poison_table, &odd_table] {
        let h = tx(chain, 1 << 20);
        assert!(h.sink.take().is_empty());
        assert_eq!(h.dev.stats().bad_chains, 1);
        assert!(!h.needs_reset.is_set());
    }
}

#[test]
fn tx_indirect_table() {
    let mut h = hostile(
        1 << 20,
        FEATURE_VERSION_1,
        &[],
        &[desc(0x30_0000, 48, INDIRECT, 0)],
        &[],
        |m| {
            m.write_obj(desc(0x1_0000, 2, NEXT, 1), GuestAddress(0x30_0000))
                .unwrap();
            m.write_obj(desc(0x2_0000, 8, WRITE | NEXT, 2), GuestAddress(0x30_0010))
                .unwrap();
            m.write_obj(desc(0x1_0002, 2, 0, 0), GuestAddress(0x30_0020))
                .unwrap();
            m.write_slice(b"okay", GuestAddress(0x1_0000)).unwrap();
        },
    );
    h.dev.process_queue(TRANSMITQ);
    assert_eq!(h.sink.take(), b"okay");
    assert!(h.untouched(0x2_0000, 8));
}

#[test]
fn rx_read_only_descriptors_are_never_written() {
    let mut h = rx(
        &[
            desc(0x1_0000, 64, NEXT, 1),
            desc(0x2_0000, 4, WRITE | NEXT, 2),
            desc(0x3_0000, 64, NEXT, 3),
            desc(0x4_0000, 100, WRITE, 0),
        ],
        b"hello world",
    );
    // Activation already delivered to the posted buffer.
    assert_eq!(h.used_idx(h.rx_used), 1);
    assert_eq!(h.used_len(h.rx_used, 0), 11);
    assert_eq!(h.read(0x2_0000, 4), b"hell");
    assert_eq!(h.read(0x4_0000, 7), b"o world");
    assert!(h.untouched(0x4_0000 + 7, 93), "nothing past the data");
    assert!(h.untouched(0x1_0000, 64) && h.untouched(0x3_0000, 64));
    assert_eq!(h.dev.stats().rx_readable_descriptors, 2);
    assert_eq!(h.irq.reasons(), [InterruptReason::Queue(RECEIVEQ)]);
    h.dev.process_queue(RECEIVEQ);
    assert_eq!(h.used_idx(h.rx_used), 1);
}

#[test]
fn rx_read_only_chain_gets_nothing_and_input_stays() {
    let h = rx(&[desc(0x1_0000, 4096, 0, 0)], b"data");
    assert_eq!(h.used_idx(h.rx_used), 1);
    assert_eq!(h.used_len(h.rx_used, 0), 0);
    assert!(h.untouched(0x1_0000, 4096));
    assert_eq!(h.dev.pending_input(), 4);
}

#[test]
fn rx_huge_and_out_of_memory_buffers() {
    let h = rx(&[desc(0x10_0000, 0x10_0000, WRITE, 0)], b"12345");
    assert_eq!(h.used_len(h.rx_used, 0), 5);
    assert_eq!(h.read(0x10_0000, 5), b"12345");
    assert!(h.untouched(0x10_0005, 0x1000));

    let end = MEM as u64;
    for chain in [
        vec![desc(0x10_0000, u32::MAX, WRITE, 0)],
        vec![
            desc(0x1_0000, 16, WRITE | NEXT, 1),
            desc(end - 8, 16, WRITE, 0),
        ],
        vec![desc(end - 8, 16, WRITE, 0)],
        vec![desc(end, 1, WRITE, 0)],
        vec![desc(u64::MAX - 7, 16, WRITE, 0)],
    ] {
        let h = rx(&chain, b"12345");
        assert_eq!(h.used_idx(h.rx_used), 1, "{chain:?}");
        assert_eq!(h.used_len(h.rx_used, 0), 0);
        assert!(h.untouched(0x1_0000, 16));
        assert!(h.untouched(end - 8, 8));
        assert!(h.untouched(0x10_0000, 16));
        assert_eq!(h.dev.pending_input(), 5, "input kept for a good buffer");
        assert_eq!(h.dev.stats().bad_chains, 1);
        assert!(!h.needs_reset.is_set());
    }
}

#[test]
fn rx_loops_are_refused() {
    let all: Vec<_> = (0..16u16)
        .map(|i| {
            desc(
                0x1_0000 + 0x100 * u64::from(i),
                16,
                WRITE | NEXT,
                (i + 1) % 16,
            )
        })
        .collect();
    let h = rx(&all, b"xyz");
    assert_eq!(h.used_len(h.rx_used, 0), 0);
    assert!(h.untouched(0x1_0000, 0x1000));
    assert_eq!(h.dev.pending_input(), 3);
}

#[test]
fn rx_input_spans_chains_and_waits_for_buffers() {
    // With EVENT_IDX: three 4-byte buffers for 10 bytes, then none for the next 6.
    let mut h = hostile(
        1 << 20,
        FEATURE_VERSION_1 | FEATURE_RING_EVENT_IDX,
        &[
            desc(0x1_0000, 4, WRITE, 0),
            desc(0x2_0000, 4, WRITE, 0),
            desc(0x3_0000, 4, WRITE, 0),
        ],
        &[],
        b"",
        |_| {},
    );
    assert_eq!(h.used_idx(h.rx_used), 0, "no input, no buffer taken");
    h.dev.process_queue(RECEIVEQ);
    assert_eq!(h.used_idx(h.rx_used), 0, "no input, no buffer taken");

    assert_eq!(h.dev.enqueue_input(b"0123456789"), 10);
    assert_eq!(h.used_idx(h.rx_used), 3);
    let lens: Vec<u32> = (0..3).map(|i| h.used_len(h.rx_used, i)).collect();
    assert_eq!(lens, [4, 4, 2]);
    assert_eq!(h.read(0x1_0000, 4), b"0123");
    assert_eq!(h.read(0x2_0000, 4), b"4567");
    assert_eq!(h.read(0x3_0000, 4), [b'8', b'9', POISON, POISON]);

    // No buffers left: input waits, and the device asked to be notified of the next
    // buffer (avail_event = next available index = 3).
    assert_eq!(h.dev.enqueue_input(b"abcdef"), 6);
    assert_eq!(h.dev.pending_input(), 6);
    let avail_event: u16 = h.mem.read_obj(h.rx_used.unchecked_add(4 + 8 * 16)).unwrap();
    assert_eq!(avail_event, 3);

    // The driver posts one more buffer (descriptor 3, avail ring entry 3, idx 4) and
    // notifies. (Writing the ring by hand: a new MockSplitQueue would zero it.)
    let avail = GuestAddress(RX_RING + 16 * 16);
    h.mem
        .write_obj(desc(0x4_0000, 64, WRITE, 0), GuestAddress(RX_RING + 16 * 3))
        .unwrap();
    h.mem
        .write_obj(3u16, avail.unchecked_add(4 + 2 * 3))
        .unwrap();
    h.mem.write_obj(4u16, avail.unchecked_add(2)).unwrap();
    h.dev.process_queue(RECEIVEQ);
    assert_eq!(h.used_idx(h.rx_used), 4);
    assert_eq!(h.used_len(h.rx_used, 3), 6);
    assert_eq!(h.read(0x4_0000, 6), b"abcdef");
    assert_eq!(h.dev.pending_input(), 0);
}

#[test]
fn push_signals_the_receiveq_notifier() {
    let h = rx(&[], b"");
    assert!(h.rx_notifier.read().is_err(), "nothing pending yet");
    assert_eq!(h.dev.input().push(b"k"), 1);
    assert_eq!(h.rx_notifier.read().unwrap(), 1);
    // A push that takes nothing does not wake the device.
    let mut cfg = ConsoleConfig::new(Box::new(io::sink()));
    cfg.input_capacity = 1;
    let dev = Console::new(cfg).unwrap();
    assert_eq!(dev.input().push(b"ab"), 1);
    assert_eq!(dev.input().push(b"c"), 0);
}

#[test]
fn corrupt_rings_set_needs_reset_without_panicking() {
    for queue in [RECEIVEQ, TRANSMITQ] {
        let mut h = hostile(1 << 20, FEATURE_VERSION_1, &[], &[], b"", |_| {});
        let ring = if queue == RECEIVEQ { RX_RING } else { TX_RING };
        let avail = GuestAddress(ring + 16 * 16);
        // A head index outside the queue, and an available index far ahead.
        h.mem.write_obj(99u16, avail.unchecked_add(4)).unwrap();
        h.mem.write_obj(500u16, avail.unchecked_add(2)).unwrap();
        if queue == RECEIVEQ {
            assert_eq!(h.dev.enqueue_input(b"input"), 5);
        } else {
            h.dev.process_queue(TRANSMITQ);
        }
        assert!(h.needs_reset.is_set(), "queue {queue}");
        assert_eq!(h.irq.reasons(), [InterruptReason::Config]);
        // Nothing more happens until reset; no panic.
        h.dev.process_queue(RECEIVEQ);
        h.dev.process_queue(TRANSMITQ);
        h.dev.process_queue(7);
        h.dev.enqueue_input(b"more");
        assert_eq!(h.irq.count(), 1);
        assert!(h.sink.take().is_empty());
        assert!(h.dev.reset().is_some());
        assert!(!h.dev.is_active());
    }
    // Only a head index out of range (available index one ahead).
    let mut h = hostile(1 << 20, FEATURE_VERSION_1, &[], &[], b"", |_| {});
    let avail = GuestAddress(RX_RING + 16 * 16);
    h.mem.write_obj(99u16, avail.unchecked_add(4)).unwrap();
    h.mem.write_obj(1u16, avail.unchecked_add(2)).unwrap();
    h.dev.enqueue_input(b"x");
    assert!(h.needs_reset.is_set());
}

#[test]
fn activation_needs_both_queues() {
    let mem = guest_memory(MEM);
    let vq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
    let (ctx, _) = activate_context(
        &mem,
        FEATURE_VERSION_1,
        vec![(RECEIVEQ, mock_queue(&vq))],
        RecordingInterrupt::new(),
    );
    let mut dev = Console::new(ConsoleConfig::new(Box::new(io::sink()))).unwrap();
    assert!(dev.activate(ctx).is_err());
    assert!(!dev.is_active());
}

#[test]
fn metrics_count_bytes_each_way_drops_and_malformed_chains() {
    use vmkit_virtio::{AtomicMetrics, MetricsSnapshot};
    let metrics = Arc::new(AtomicMetrics::new());
    let m = metrics.clone();
    let rx = [desc(0x2_0000, 4, WRITE, 0), desc(0x2_1000, 16, WRITE, 0)];
    let tx = [
        desc(0x1_0000, 5, 0, 0),
        // 12 bytes over a bound of 8: 4 dropped.
        desc(0x1_1000, 12, 0, 0),
        // A loop: refused by the queue.
        desc(0x1_2000, 4, NEXT, 2),
    ];
    let setup = |mem: &GuestMemoryMmap| {
        mem.write_slice(b"hello", GuestAddress(0x1_0000)).unwrap();
        mem.write_slice(b"0123456789ab", GuestAddress(0x1_1000))
            .unwrap();
    };
    let mut h = hostile_with(8, FEATURE_VERSION_1, &rx, &tx, b"abcdef", setup, |c| {
        c.input_capacity = 16;
        c.metrics = m;
    });
    // Activation delivered the input: 4 bytes, then 2.
    assert_eq!(h.read(0x2_0000, 4), b"abcd");
    assert_eq!(h.read(0x2_1000, 2), b"ef");
    h.dev.process_queue(TRANSMITQ);
    assert_eq!(h.sink.take(), b"hello01234567");
    assert_eq!(h.used_idx(h.tx_used), 3);
    let expected = MetricsSnapshot {
        requests: 5,
        read_ops: 2,
        read_bytes: 6,
        write_ops: 2,
        write_bytes: 13,
        dropped: 4,
        malformed: 1,
        notifications: 1,
        interrupts: 2,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot(), expected);
    assert_eq!(h.irq.count(), 2);
    // Input beyond the buffer (no receive buffers left): 16 taken, 4 dropped.
    assert_eq!(h.dev.input().push(&[b'x'; 20]), 16);
    assert_eq!(metrics.snapshot().dropped, 8);
    assert_eq!(h.dev.stats().input_refused, 4);
}

#[test]
fn a_restored_console_serves_output_left_in_the_ring_on_activation() {
    for restored in [false, true] {
        let mem = guest_memory(MEM);
        mem.write_slice(b"written while paused", GuestAddress(0x1_0000))
            .unwrap();
        let rxq = MockSplitQueue::create(&mem, GuestAddress(RX_RING), 16);
        let txq = MockSplitQueue::create(&mem, GuestAddress(TX_RING), 16);
        txq.add_desc_chains(&[desc(0x1_0000, 20, 0, 0)], 0).unwrap();
        let (ctx, _) = activate_context(
            &mem,
            FEATURE_VERSION_1,
            vec![(RECEIVEQ, mock_queue(&rxq)), (TRANSMITQ, mock_queue(&txq))],
            RecordingInterrupt::new(),
        );
        let sink = Sink::default();
        let mut dev = Console::new(ConsoleConfig::new(Box::new(sink.clone()))).unwrap();
        if restored {
            let state = vmkit_virtio_console::ConsoleState {
                pending_input: Vec::new(),
            };
            dev.restore(&state).unwrap();
        }
        dev.activate(ctx).unwrap();
        // No notification: only a restored device looks at the ring by itself.
        let want: &[u8] = if restored {
            b"written while paused"
        } else {
            b""
        };
        assert_eq!(sink.take(), want, "restored: {restored}");
    }
}
