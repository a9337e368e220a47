//! `test=virtio-vsock`: on the first vsock device of each transport, the
//! sub-cases `vsock_cases=` lists (default `tx,rx,echo,refused`), each on a
//! fresh driver (`drivers::vsock::Vsock`: virtio-drivers'
//! `VsockConnectionManager`; the device is reset between them), polled at
//! CPL3, timed with the TSC. The host is CID 2; the host side follows
//! Firecracker's hybrid vsock (a guest connection to port P reaches the
//! Unix socket `PATH_P`, a host program reaches guest port P by writing
//! `CONNECT P\n` to `PATH`).
//!
//! - `tx`: a connection to host port `vsock_port` carries `vsock_bytes` of
//!   the guest's stream (`virtio_net::data`, `GUEST_SEED`) in packets of up
//!   to `vsock_chunk` bytes; its FNV-1a 64 is printed for the host to
//!   compare; then SHUTDOWN.
//! - `rx`: the guest listens on `vsock_listen`, says so, accepts the host's
//!   connection and reads `vsock_bytes`, which must be the host's stream
//!   (`HOST_SEED`), and no more; prints their FNV-1a 64; then SHUTDOWN.
//! - `echo`: `vsock_conns` connections to host port `vsock_echo_port` at
//!   once, each sending its own pattern (1000 + 61 k bytes from its own
//!   seed), all interleaved; every byte echoed must match.
//! - `refused`: a connection to host port `vsock_refused_port`, where
//!   nothing listens, must be reset within 5 s.
//! - `hold-listen`, `hold-connect`: a connection accepted on `vsock_listen`
//!   or made to `vsock_port`; then the guest does not touch the device
//!   until a byte arrives on COM1 (at most 120 s; the host measures the
//!   VMM meanwhile), then reads `vsock_bytes` of the host's stream as `rx`.
//!
//! Nothing progressing for 10 s fails the sub-case. One `test vsock-<sub>:`
//! line per sub-case and one `test virtio-vsock:` line per transport (mmio
//! unsuffixed, pci ` (pci)`).

mod echo;

use crate::cases::support::{report, Ctx, Want};
use crate::cases::virtio_net::data::{Fnv, Pattern, GUEST_SEED, HOST_SEED};
use crate::cases::virtio_net::rate;
use crate::drivers::virtio::{Bus, Device};
use crate::drivers::vsock::{reason_text, State, Vsock};
use crate::platform::arch::rdtsc;
use crate::platform::serial;
use crate::platform::time::{cycles_to_ns, delay_us, us_to_cycles, wait_until};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use virtio_drivers::transport::DeviceType;

const NAME: &str = "virtio-vsock";
/// How long a guest connection may wait for its answer.
const CONNECT_US: u64 = 10_000_000;
/// How long the guest waits for the host to connect to it.
const ACCEPT_US: u64 = 30_000_000;
/// How long nothing may progress before a sub-case fails.
pub const STALL_US: u64 = 10_000_000;
/// How long a SHUTDOWN may wait for the peer's answer (not a failure).
pub const CLOSE_US: u64 = 2_000_000;
/// How long `hold-*` waits for the byte on COM1.
const HOLD_US: u64 = 120_000_000;
/// How long `refused` waits for the reset.
const REFUSED_US: u64 = 5_000_000;
/// Per-connection receive buffers (the credit the guest gives): the
/// streams get room for eight full packets, the others little.
const STREAM_CAPACITY: u32 = 512 * 1024;
const SMALL_CAPACITY: u32 = 8 * 1024;

/// The `vsock_cases=` sub-cases, as bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubCases(pub u8);

impl SubCases {
    pub const TX: u8 = 1;
    pub const RX: u8 = 2;
    pub const ECHO: u8 = 4;
    pub const REFUSED: u8 = 8;
    pub const HOLD_LISTEN: u8 = 16;
    pub const HOLD_CONNECT: u8 = 32;
    pub const DEFAULT: SubCases =
        SubCases(SubCases::TX | SubCases::RX | SubCases::ECHO | SubCases::REFUSED);
    /// Names, in the order they run.
    pub const NAMES: [(&'static str, u8); 6] = [
        ("tx", SubCases::TX),
        ("rx", SubCases::RX),
        ("echo", SubCases::ECHO),
        ("refused", SubCases::REFUSED),
        ("hold-listen", SubCases::HOLD_LISTEN),
        ("hold-connect", SubCases::HOLD_CONNECT),
    ];

    /// Parses a comma-separated list of names.
    pub fn parse(value: &str) -> Option<SubCases> {
        let mut bits = 0;
        for name in value.split(',') {
            bits |= SubCases::NAMES.iter().find(|(n, _)| *n == name)?.1;
        }
        (bits != 0).then_some(SubCases(bits))
    }
}

/// The `vsock_*=` parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockParams {
    /// Host port of the guest's stream (`tx`, `hold-connect`, `bench=vsock-tx`).
    pub port: u32,
    /// Host port that echoes (`echo`, `bench=vsock-lat`).
    pub echo_port: u32,
    /// Host port where nothing listens (`refused`).
    pub refused_port: u32,
    /// The guest's port for the host's connections (`rx`, `hold-listen`,
    /// `bench=vsock-rx`, `bench=vsock-lat`).
    pub listen: u32,
    /// Bytes of each stream.
    pub bytes: u64,
    /// Connections of `echo`.
    pub conns: u32,
    /// Largest packet payload the guest sends.
    pub chunk: u32,
    pub cases: SubCases,
}

impl VsockParams {
    pub const DEFAULT: VsockParams = VsockParams {
        port: 1234,
        echo_port: 1235,
        refused_port: 1236,
        listen: 5000,
        bytes: 64 << 20,
        conns: 32,
        chunk: 64 << 10,
        cases: SubCases::DEFAULT,
    };
}

pub fn run(ctx: &Ctx, _: Want) {
    if !ctx.devices.has(DeviceType::Socket) {
        report(NAME, "", Err(String::from("no vsock device")));
        return;
    }
    for bus in [Bus::Mmio, Bus::Pci] {
        if let Some(dev) = ctx.devices.first(DeviceType::Socket, bus) {
            report(NAME, bus.suffix(), one(ctx, dev));
        }
    }
}

/// A sub-case: its name and how it runs on a freshly opened device.
type Sub = fn(&mut Vsock, &Ctx, &Device) -> Result<String, String>;

fn one(ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let subs: [(Sub, u32); 6] = [
        (tx, SMALL_CAPACITY),
        (rx, STREAM_CAPACITY),
        (echo::run, SMALL_CAPACITY),
        (refused, SMALL_CAPACITY),
        (hold_listen, STREAM_CAPACITY),
        (hold_connect, STREAM_CAPACITY),
    ];
    let mut first_failure = None;
    let mut cid_said = false;
    for ((name, bit), (sub, capacity)) in SubCases::NAMES.iter().zip(subs) {
        if ctx.vsock.cases.0 & bit == 0 {
            continue;
        }
        let result = Vsock::open(ctx.devices, dev, capacity).and_then(|mut v| {
            if !cid_said {
                println!("virtio-vsock: guest cid {}{}", v.guest_cid(), dev.tag());
                cid_said = true;
            }
            let r = sub(&mut v, ctx, dev);
            let c = v.counters();
            println!("virtio-vsock: {name}: {c}{}", dev.tag());
            let checked = v.check();
            // Dropping the driver unsets the queues and resets the device.
            drop(v);
            r.and_then(|extra| checked.map(|()| extra))
        });
        if let Err(why) = &result {
            first_failure.get_or_insert(format!("{}: {}", name, why));
        }
        report(&format!("vsock-{}", name), dev.bus().suffix(), result);
    }
    match first_failure {
        Some(why) => Err(why),
        None => Ok(String::new()),
    }
}

/// A connection to host `port`, waited for (`CONNECT_US`).
pub fn connect(v: &mut Vsock, port: u32) -> Result<usize, String> {
    let i = v.connect(port)?;
    v.wait(CONNECT_US, |v| v.conn(i).state != State::Connecting)?;
    match v.conn(i).state {
        State::Connected => Ok(i),
        State::Closed(r) => Err(format!("host port {}: {}", port, reason_text(r))),
        State::Connecting => Err(format!("no answer from host port {} in 10 s", port)),
    }
}

/// Listens on `port`, says so (`vsock-<sub>: listening on port <port>`),
/// and waits (`ACCEPT_US`) for the host's connection.
fn accept(v: &mut Vsock, port: u32, sub: &str, dev: &Device) -> Result<usize, String> {
    v.listen(port);
    println!("vsock-{}: listening on port {}{}", sub, port, dev.tag());
    let from = v.conns().len();
    let found = |v: &Vsock| {
        v.conns()[from..]
            .iter()
            .position(|c| c.incoming && c.port == port)
            .map(|k| from + k)
    };
    if !v.wait(ACCEPT_US, |v| found(v).is_some())? {
        return Err(format!("no connection to port {} in 30 s", port));
    }
    found(v).ok_or_else(|| String::from("connection lost"))
}

/// Whether `since` (TSC) is more than `STALL_US` ago.
pub fn stalled(since: u64) -> bool {
    rdtsc() - since > us_to_cycles(STALL_US)
}

/// Sends `total` bytes of the stream from `seed` on connection `i` in
/// packets of at most `chunk` bytes; their FNV-1a 64.
fn send_stream(
    v: &mut Vsock,
    i: usize,
    seed: u64,
    total: u64,
    chunk: usize,
) -> Result<u64, String> {
    let mut pattern = Pattern::new(seed);
    let mut fnv = Fnv::new();
    let mut buf = vec![0u8; chunk];
    let (mut filled, mut off, mut sent) = (0, 0, 0u64);
    let mut progress = rdtsc();
    while sent < total {
        if off == filled {
            filled = chunk.min((total - sent) as usize);
            pattern.fill(&mut buf[..filled]);
            fnv.add(&buf[..filled]);
            off = 0;
        }
        v.poll()?;
        if let State::Closed(r) = v.conn(i).state {
            return Err(format!(
                "the host closed the connection ({}) after {} of {} bytes",
                reason_text(r),
                sent,
                total
            ));
        }
        let n = v.send(i, &buf[off..filled])?;
        if n > 0 {
            off += n;
            sent += n as u64;
            progress = rdtsc();
        } else if stalled(progress) {
            return Err(format!(
                "no credit from the host for 10 s: {} of {} bytes sent",
                sent, total
            ));
        }
    }
    Ok(fnv.0)
}

/// One received stream: its checksum and when it started and ended (TSC).
struct Received {
    fnv: u64,
    first: u64,
    last: u64,
}

/// Reads `total` bytes of the stream from `seed` on connection `i`,
/// checking each; then the host must have sent no more.
fn receive_stream(v: &mut Vsock, i: usize, seed: u64, total: u64) -> Result<Received, String> {
    let mut pattern = Pattern::new(seed);
    let mut fnv = Fnv::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut first = None;
    let mut progress = rdtsc();
    while got < total {
        v.poll()?;
        loop {
            let want = buf.len().min((total - got) as usize);
            let n = v.recv(i, &mut buf[..want])?;
            if n == 0 {
                break;
            }
            first.get_or_insert_with(rdtsc);
            pattern.check(&buf[..n]).map_err(|at| {
                format!(
                    "received bytes differ from the host's stream from byte {}",
                    got + at as u64
                )
            })?;
            fnv.add(&buf[..n]);
            got += n as u64;
            progress = rdtsc();
            if got == total {
                break;
            }
        }
        if let State::Closed(r) = v.conn(i).state {
            if got < total && v.available(i) == 0 {
                return Err(format!(
                    "the host closed the connection ({}) after {} of {} bytes",
                    reason_text(r),
                    got,
                    total
                ));
            }
        }
        if got < total && stalled(progress) {
            return Err(format!(
                "nothing arrived for 10 s: {} of {} bytes",
                got, total
            ));
        }
    }
    let last = rdtsc();
    // Anything more is the host's mistake: give it 10 ms to show.
    let start = rdtsc();
    while rdtsc() - start < us_to_cycles(10_000) {
        v.poll()?;
        if v.available(i) > 0 {
            return Err(format!("the host sent more than {} bytes", total));
        }
    }
    Ok(Received {
        fnv: fnv.0,
        first: first.unwrap_or(last),
        last,
    })
}

/// SHUTDOWN, and up to `CLOSE_US` for the host's answer; an info line if
/// none came (then the connection was reset).
fn close(v: &mut Vsock, i: usize, sub: &str, dev: &Device) -> Result<(), String> {
    if !v.close(i, CLOSE_US)? {
        println!(
            "vsock-{}: no answer to the shutdown in 2 s, reset{}",
            sub,
            dev.tag()
        );
    }
    Ok(())
}

fn tx(v: &mut Vsock, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let p = ctx.vsock;
    let i = connect(v, p.port)?;
    let start = rdtsc();
    let fnv = send_stream(v, i, GUEST_SEED, p.bytes, p.chunk as usize)?;
    let ns = cycles_to_ns(rdtsc() - start);
    println!(
        "vsock-tx: sent {} bytes to port {} in {} fnv1a64 0x{:016x}{}",
        p.bytes,
        p.port,
        rate(p.bytes, ns),
        fnv,
        dev.tag()
    );
    close(v, i, "tx", dev)?;
    Ok(String::new())
}

/// The `received` line of `rx` and `hold-*`.
fn say_received(sub: &str, v: &Vsock, i: usize, bytes: u64, r: &Received, dev: &Device) {
    println!(
        "vsock-{}: received {} bytes from port {} in {} fnv1a64 0x{:016x}{}",
        sub,
        bytes,
        v.conn(i).peer.port,
        rate(bytes, cycles_to_ns(r.last - r.first)),
        r.fnv,
        dev.tag()
    );
}

fn rx(v: &mut Vsock, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let p = ctx.vsock;
    let i = accept(v, p.listen, "rx", dev)?;
    let r = receive_stream(v, i, HOST_SEED, p.bytes)?;
    say_received("rx", v, i, p.bytes, &r, dev);
    close(v, i, "rx", dev)?;
    Ok(String::new())
}

fn refused(v: &mut Vsock, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let port = ctx.vsock.refused_port;
    let start = rdtsc();
    let i = v.connect(port)?;
    v.wait(REFUSED_US, |v| v.conn(i).state != State::Connecting)?;
    match v.conn(i).state {
        State::Closed(r) => {
            println!(
                "vsock-refused: port {}: {} after {} us{}",
                port,
                reason_text(r),
                cycles_to_ns(rdtsc() - start) / 1000,
                dev.tag()
            );
            Ok(String::new())
        }
        State::Connected => {
            v.force_close(i)?;
            Err(format!("host port {} accepted the connection", port))
        }
        State::Connecting => Err(format!("no reset from host port {} in 5 s", port)),
    }
}

fn hold_listen(v: &mut Vsock, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let i = accept(v, ctx.vsock.listen, "hold", dev)?;
    hold(v, i, ctx, dev)
}

fn hold_connect(v: &mut Vsock, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let i = connect(v, ctx.vsock.port)?;
    hold(v, i, ctx, dev)
}

/// Leaves the device alone until a byte arrives on COM1, then reads the
/// host's stream.
fn hold(v: &mut Vsock, i: usize, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    println!(
        "vsock-hold: connected with host port {}, not reading until a byte on COM1{}",
        v.conn(i).peer.port,
        dev.tag()
    );
    let start = rdtsc();
    let released = wait_until(HOLD_US, || {
        let got = serial::read_byte().is_some();
        if !got {
            delay_us(1000);
        }
        got
    });
    if !released {
        return Err(String::from("no byte on COM1 in 120 s"));
    }
    println!(
        "vsock-hold: released after {} ms{}",
        cycles_to_ns(rdtsc() - start) / 1_000_000,
        dev.tag()
    );
    let bytes = ctx.vsock.bytes;
    let r = receive_stream(v, i, HOST_SEED, bytes)?;
    say_received("hold", v, i, bytes, &r, dev);
    close(v, i, "hold", dev)?;
    Ok(String::new())
}
