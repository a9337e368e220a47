//! `vmkit_virtio_vsock::Vsock` through its real data path: receive, transmit and event
//! queues laid out in guest memory from fuzzer input, the device activated on them, then a
//! sequence of queue notifications, host-side actions on real Unix sockets (listeners at
//! `<dir>/v.sock_52` and `_53` that accept, read, write, shut down or close; host clients of
//! `<dir>/v.sock` writing `CONNECT <port>\n`, part of it or garbage, then data), host events,
//! more chains offered by the "driver", transmit headers rewritten, transport resets, device
//! resets and re-activations.
//!
//! Guest memory is 128 KiB in two adjacent regions; the three queues (16 entries) sit in the
//! first 12 KiB as in `net_queues`. The transmit chains are mostly structured packets: a
//! 44-byte header (guest CID to CID 2, ports from a small set that includes the listeners,
//! an unbound port and the host ports the device gives host clients, type stream, op 1..=7
//! mostly, `len` mostly the data's length, `buf_alloc`/`fwd_cnt` arbitrary) in its own
//! descriptor, with the data inline or in a second descriptor (up to 64 KiB), sometimes
//! damaged (a flipped header bit, a short or device-writable header descriptor, a header
//! past the end of memory or across the region boundary, a short data descriptor, a stray
//! `next`); the others are arbitrary descriptors as in `net_queues`. Receive chains are one
//! buffer, a header plus a data descriptor (up to 64 KiB), or arbitrary; event chains one
//! small buffer or arbitrary. No indirect descriptors, so the oracle knows every buffer.
//!
//! Inputs are compact (one-byte enum tags) and short inputs mean something: all-zero
//! header bytes are a request from guest port 1024 to the listener on port 52 with a 64 KiB
//! buffer, every chain is made available unless heads are given, eight full-size receive
//! buffers are offered unless receive chains are given, and unless the input's flags say
//! otherwise the transmit and event queues are notified after activation, the listeners
//! accept before every operation and a host event follows every host-side action (as the
//! VMM's event loop would run it once the device's epoll fd is readable).
//!
//! The device is created per run (guest CID 3, at most 4 connections, 4 KiB `buf_alloc`)
//! on a socket path in a directory of this thread's own (tests run targets on several
//! threads at once), and dropped at the end of the run with every host socket, so nothing
//! is left over from one run to the next. The harness is split into submodules: the input
//! types, the tables, the driver's rig and the host side.
//!
//! Oracles, besides "never panics" (overflow checks are on):
//! - guest memory changes only in the used rings and in buffers of descriptors marked
//!   device-writable (checked at the end, and before each write the harness makes; skipped
//!   when such a buffer overlaps a descriptor table or available ring, where the device may
//!   rewrite its own orders — see [`WriteOracle`](crate::guest::WriteOracle));
//! - `connections()` never exceeds `max_connections` (after every operation);
//! - after every operation, for each used element the device added: its id is a descriptor
//!   index, and its length is at most the chain's device-writable length (receive), 0
//!   (transmit), 0 or 4 (event); and no more elements than the ring holds were added at once
//!   (unless a device-writable buffer overlaps the queue area, where the device may rewrite
//!   the rings: then only the memory oracle applies);
//! - the device logs no warning (when this target's logger is the process's) (its host poll giving up after its bound of rounds, which
//!   means sockets that keep waking themselves; an `epoll_wait`, `accept` or `epoll_ctl`
//!   failure, which here would mean leaked descriptors).

mod host;
mod input;
mod rig;
mod tables;

use arbitrary::{Arbitrary, Unstructured};
use vmkit_virtio::{VirtioDevice, FEATURE_RING_EVENT_IDX, FEATURE_VERSION_1};
use vmkit_virtio_vsock::{Vsock, VsockConfig, VIRTIO_VSOCK_F_STREAM};

use host::{host_action, Host, Watch};
pub use input::Input;
use input::{Op, RxChain};
use rig::Rig;

const REGION: u64 = 0x1_0000;
const MEM: u64 = 2 * REGION;
const QSIZE: u16 = 16;
/// Per queue (receive, transmit, event): table at base, avail at base + 0x100, used at
/// base + 0x200.
const QUEUE_BASES: [u64; 3] = [0x0, 0x1000, 0x2000];
const USED: u64 = 0x200;
const AVAIL: u64 = 0x100;
/// Where arbitrary buffers mostly go (everything past the queues).
const DATA: u64 = 0x3000;
/// Structured buffers, by descriptor index: transmit headers (64 bytes each), transmit data
/// and inline packets (256 each), receive buffers (512 each), event buffers (16 each).
const TX_HDRS: u64 = 0x3000;
const TX_DATA: u64 = 0x3400;
const RX_SLOTS: u64 = 0x4400;
const EV_SLOTS: u64 = 0x6400;
/// Large data buffers (up to 64 KiB): the whole second region.
const LARGE: u64 = REGION;
const HDR: u32 = 44;

const CID: u64 = 3;
const MAX_CONNECTIONS: usize = 4;
const BUF_ALLOC: u32 = 4096;
/// Host ports with a listener at `<dir>/v.sock_<port>`.
const LISTEN_PORTS: [u32; 2] = [52, 53];
/// The first host port the device gives a host client's connection.
const LOCAL: u32 = 1 << 30;
/// Host ports packets mostly go to: the listeners, a port nothing listens on, and the
/// device's first host-client ports.
const HOST_PORTS: [u32; 6] = [52, 53, 54, LOCAL, LOCAL + 1, LOCAL + 2];
const GUEST_PORTS: [u32; 3] = [1024, 1025, 1026];
const MAX_OPS: usize = 48;
const MAX_PEERS: usize = 6;

/// Decodes an input from the fuzzer's bytes and runs it (nothing to run if they do not
/// decode).
pub fn fuzz(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// Runs `input`, panicking when an oracle fails.
pub fn run(input: &Input) {
    let _ = run_counting(input);
}

/// Whether `data` decodes to an input that gets a connection up (for seed selection).
pub fn reaches_goal(data: &[u8]) -> bool {
    Input::arbitrary_take_rest(Unstructured::new(data))
        .is_ok_and(|input| run_counting(&input).connections > 0)
}

/// What a run got to.
#[derive(Debug, Default, Clone, Copy)]
struct Reached {
    /// The most connections the device had at once.
    connections: usize,
}

fn run_counting(input: &Input) -> Reached {
    let _watch = Watch::start();
    let path = host::dir().join("v.sock");
    let _ = std::fs::remove_file(&path);
    let mut config = VsockConfig::new(CID, &path);
    config.max_connections = MAX_CONNECTIONS;
    config.buf_alloc = BUF_ALLOC;
    config.queue_size = QSIZE;
    let mut dev = Vsock::new(config).expect("Vsock::new");
    let mut host = Host::new();
    let features = FEATURE_VERSION_1
        | (u64::from(input.features & 1) * FEATURE_RING_EVENT_IDX)
        | (u64::from(input.features >> 1 & 1) << VIRTIO_VSOCK_F_STREAM);
    dev.ack_features(features);
    let mut rig = rig(input, features);

    dev.activate(rig.context()).expect("activate");
    if input.features & 4 == 0 {
        // The driver notifies what it made available.
        dev.process_queue(1);
        dev.process_queue(2);
    }
    rig.check_used();
    let mut reached = Reached::default();
    for op in input.ops.iter().take(MAX_OPS) {
        if input.features & 16 == 0 {
            // The host programs behind the listeners accept what came in.
            host.accept_all();
        }
        step(input, op, &mut dev, &mut rig, &mut host);
        assert!(
            dev.connections() <= MAX_CONNECTIONS,
            "{} connections, over the limit of {MAX_CONNECTIONS}",
            dev.connections()
        );
        reached.connections = reached.connections.max(dev.connections());
        rig.check_used();
    }
    // Every host socket closes here; the device removes its socket file.
    drop(dev);
    host.close();
    rig.finish();
    reached
}

/// The tables, the initial available rings, zeroed used rings.
fn rig(input: &Input, features: u64) -> Rig {
    let default_rx = [0, 0, 0, 0, 0, 0, 0, 0].map(RxChain::Single);
    let rx_chains = match input.rx.chains.is_empty() {
        true => &default_rx[..],
        false => &input.rx.chains[..],
    };
    let tables = [
        tables::rx_table(rx_chains),
        tables::tx_table(&input.tx.chains),
        tables::event_table(&input.event.chains),
    ];
    let heads = [
        input.rx.heads.as_deref(),
        input.tx.heads.as_deref(),
        input.event.heads.as_deref(),
    ];
    let extra = [
        input.rx.extra_avail,
        input.tx.extra_avail,
        input.event.extra_avail,
    ];
    Rig::new(input.fill, features, tables, heads, extra)
}

/// One operation.
fn step(input: &Input, op: &Op, dev: &mut Vsock, rig: &mut Rig, host: &mut Host) {
    match op {
        Op::Notify(q) => dev.process_queue(u16::from(q % 4)),
        Op::Offer {
            queue,
            heads,
            notify,
        } => {
            let q = usize::from(queue % 3);
            rig.offer(q, heads);
            if *notify {
                dev.process_queue(q as u16);
            }
        }
        Op::Rewrite { packet, hdr } => {
            if !rig.packets.is_empty() {
                let (at, data_len) = rig.packets[usize::from(*packet) % rig.packets.len()];
                rig.write(at, &hdr.bytes(data_len));
            }
        }
        Op::HostEvent => dev.process_device_event(0),
        Op::TransportReset => dev.transport_reset(),
        Op::Reset => {
            let _ = dev.reset();
        }
        Op::Activate => {
            if dev.is_active() {
                assert!(dev.activate(rig.context()).is_err(), "activated twice");
            } else {
                rig.reset_rings();
                dev.activate(rig.context()).expect("activate again");
            }
        }
        host_op => {
            host_action(host_op, host);
            if input.features & 8 == 0 {
                // What the VMM's event loop does once the device's epoll fd is readable;
                // else only `HostEvent` runs it (host actions batched).
                dev.process_device_event(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::{fuzz_dir, inputs_in};
    use crate::seeds;

    /// Random bytes decode and run; short inputs mean a request to the listener on port
    /// 52, so some seeds get a connection up.
    #[test]
    fn seeds_decode_and_run() {
        let seeds = seeds::for_target("vsock_queues");
        let mut decoded = 0;
        let mut connected = 0;
        for s in &seeds {
            if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(s)) {
                decoded += 1;
                connected += usize::from(run_counting(&input).connections > 0);
            }
        }
        eprintln!(
            "vsock_queues seeds: {decoded} of {} decode, {connected} connect",
            seeds.len()
        );
        assert!(decoded > seeds.len() / 2);
    }

    /// A request from guest port 1024 to the listener on port 52 (the all-zero packet
    /// header), which accepts it: the connection is up after one host event.
    #[test]
    fn a_request_connects_to_the_listener() {
        let hdr = input::Hdr {
            op: 0,
            ports: 0,
            len: 0,
            flags: 0,
            odd: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        let packet = input::Packet {
            hdr,
            payload: input::Payload::None,
            damage: 0,
            damage_arg: 0,
        };
        fn queue<C>(chains: Vec<C>) -> input::QueueInput<C> {
            input::QueueInput {
                chains,
                heads: None,
                extra_avail: None,
            }
        }
        let input = Input {
            features: 0,
            tx: queue(vec![input::TxChain::Packet(packet)]),
            ops: vec![Op::HostEvent, Op::HostEvent],
            rx: queue(Vec::new()),
            event: queue(Vec::new()),
            fill: 0,
        };
        assert_eq!(run_counting(&input).connections, 1);
    }

    /// The two reproducers of earlier hangs (a guest half-close then a host reply; a
    /// shutdown-send then a host close).
    #[test]
    fn regressions() {
        let files = inputs_in(&fuzz_dir().join("regressions").join("vsock_queues"));
        assert_eq!(files.len(), 2);
        for f in files {
            fuzz(&std::fs::read(&f).expect("read a reproducer"));
        }
    }
}
