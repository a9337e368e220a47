//! `bench=vsock-tx:S`, `bench=vsock-rx:S` and `bench=vsock-lat:N`, on the
//! first vsock device (mmio, else pci), each on a fresh driver
//! (`drivers::vsock::Vsock`), polled at CPL3, timed with the TSC:
//!
//! - `vsock-tx`: a connection to host port `vsock_port`, then S seconds of
//!   packets of `vsock_chunk` bytes (a constant byte, nothing computed per
//!   byte) as fast as the host's credit allows; the bytes the device took
//!   and their rate.
//! - `vsock-rx`: says it listens on `vsock_listen`, accepts the host's
//!   connection (at most 30 s), and counts the bytes read in the S seconds
//!   from the first (not checked); then resets the connection.
//! - `vsock-lat`: N times a connection to host port `vsock_echo_port`, one
//!   byte sent, its echo read: the time from the connection request to the
//!   echoed byte (min/median/mean/max); then, listening on `vsock_listen`,
//!   echoes the bytes of N connections the host makes (the host times those
//!   itself), each connection counted at its first echoed byte.

use crate::cases::virtio_net::rate;
use crate::cases::virtio_vsock::{connect, stalled, VsockParams, CLOSE_US, STALL_US};
use crate::drivers::virtio::{Bus, Devices};
use crate::drivers::vsock::{State, Vsock};
use crate::platform::arch::rdtsc;
use crate::platform::time::{cycles_to_ns, us_to_cycles};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use virtio_drivers::transport::DeviceType;

/// One `bench=vsock-...` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsockBench {
    /// Seconds of guest → host.
    Tx(u64),
    /// Seconds of host → guest.
    Rx(u64),
    /// Connections each way.
    Lat(u64),
}

/// Receive buffer per connection: the streams', and the latency's.
const STREAM_CAPACITY: u32 = 512 * 1024;
const SMALL_CAPACITY: u32 = 8 * 1024;
/// How long the guest waits for the host's connection.
const ACCEPT_US: u64 = 30_000_000;

impl VsockBench {
    /// Parses `vsock-tx:S`, `vsock-rx:S` (S 1 to 3600) or `vsock-lat:N`
    /// (N 1 to 100000).
    pub fn parse(item: &str) -> Option<VsockBench> {
        let (kind, n) = item.split_once(':')?;
        let n = n.parse::<u64>().ok()?;
        match kind {
            "vsock-tx" if (1..=3600).contains(&n) => Some(VsockBench::Tx(n)),
            "vsock-rx" if (1..=3600).contains(&n) => Some(VsockBench::Rx(n)),
            "vsock-lat" if (1..=100_000).contains(&n) => Some(VsockBench::Lat(n)),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            VsockBench::Tx(_) => "vsock-tx",
            VsockBench::Rx(_) => "vsock-rx",
            VsockBench::Lat(_) => "vsock-lat",
        }
    }
}

/// Runs each benchmark on the first vsock device.
pub fn run(devices: &Devices, benches: &[VsockBench], params: VsockParams) {
    for &b in benches {
        if let Err(why) = one(devices, b, params) {
            println!("bench {}: FAIL {}", b.name(), why);
        }
    }
}

fn one(devices: &Devices, b: VsockBench, p: VsockParams) -> Result<(), String> {
    let dev = [Bus::Mmio, Bus::Pci]
        .iter()
        .find_map(|&bus| devices.first(DeviceType::Socket, bus))
        .ok_or_else(|| String::from("no vsock device"))?;
    let capacity = match b {
        VsockBench::Rx(_) => STREAM_CAPACITY,
        _ => SMALL_CAPACITY,
    };
    let mut v = Vsock::open(devices, dev, capacity)?;
    let r = match b {
        VsockBench::Tx(s) => tx(&mut v, p, s),
        VsockBench::Rx(s) => rx(&mut v, p, s),
        VsockBench::Lat(n) => lat(&mut v, p, n),
    };
    let c = v.counters();
    println!("vsock-bench: {}: {c}{}", b.name(), dev.tag());
    let checked = v.check();
    drop(v);
    r.and(checked)
}

fn tx(v: &mut Vsock, p: VsockParams, secs: u64) -> Result<(), String> {
    let i = connect(v, p.port)?;
    println!(
        "bench vsock-tx: sending to port {} for {} s in packets of up to {} bytes",
        p.port, secs, p.chunk
    );
    let buf = vec![0x76u8; p.chunk as usize];
    let start = rdtsc();
    let end = start + us_to_cycles(secs * 1_000_000);
    let (mut sent, mut progress) = (0u64, start);
    while rdtsc() < end {
        v.poll()?;
        if let State::Closed(_) = v.conn(i).state {
            return Err(format!(
                "the host closed the connection after {} bytes",
                sent
            ));
        }
        let n = v.send(i, &buf)?;
        if n > 0 {
            sent += n as u64;
            progress = rdtsc();
        } else if stalled(progress) {
            return Err(format!(
                "no credit from the host for 10 s after {} bytes",
                sent
            ));
        }
    }
    let ns = cycles_to_ns(rdtsc() - start);
    println!("bench vsock-tx: {} bytes in {}", sent, rate(sent, ns));
    v.close(i, CLOSE_US)?;
    Ok(())
}

fn rx(v: &mut Vsock, p: VsockParams, secs: u64) -> Result<(), String> {
    v.listen(p.listen);
    println!(
        "bench vsock-rx: listening on port {} for {} s",
        p.listen, secs
    );
    if !v.wait(ACCEPT_US, |v| v.conns().iter().any(|c| c.incoming))? {
        return Err(format!("no connection to port {} in 30 s", p.listen));
    }
    let i = v.conns().iter().position(|c| c.incoming).unwrap_or(0);
    let mut buf = vec![0u8; 64 * 1024];
    let (mut got, mut first, mut progress) = (0u64, None, rdtsc());
    let mut last = progress;
    loop {
        v.poll()?;
        loop {
            let n = v.recv(i, &mut buf)?;
            if n == 0 {
                break;
            }
            let now = rdtsc();
            first.get_or_insert(now);
            got += n as u64;
            progress = now;
            last = now;
        }
        if let Some(f) = first {
            if rdtsc() - f >= us_to_cycles(secs * 1_000_000) {
                break;
            }
        }
        if let State::Closed(_) = v.conn(i).state {
            if v.available(i) == 0 {
                return Err(format!(
                    "the host closed the connection after {} bytes",
                    got
                ));
            }
        }
        if stalled(progress) {
            return Err(format!("nothing arrived for 10 s after {} bytes", got));
        }
    }
    let ns = cycles_to_ns(last - first.unwrap_or(last));
    println!("bench vsock-rx: {} bytes in {}", got, rate(got, ns));
    v.force_close(i)?;
    Ok(())
}

/// `min/median/mean/max` of `us`.
fn summary(mut us: Vec<u64>) -> String {
    us.sort_unstable();
    let n = us.len().max(1) as u64;
    format!(
        "{}/{}/{}/{}",
        us.first().copied().unwrap_or(0),
        us.get(us.len() / 2).copied().unwrap_or(0),
        us.iter().sum::<u64>() / n,
        us.last().copied().unwrap_or(0)
    )
}

fn lat(v: &mut Vsock, p: VsockParams, n: u64) -> Result<(), String> {
    let mut times = Vec::new();
    let mut byte = [0u8; 1];
    for k in 0..n {
        let start = rdtsc();
        let i = connect(v, p.echo_port)?;
        while v.send(i, &[k as u8])? == 0 {
            v.poll()?;
            if stalled(start) {
                return Err(format!("connection {}: no credit in 10 s", k));
            }
        }
        loop {
            v.poll()?;
            if v.recv(i, &mut byte)? == 1 {
                break;
            }
            if v.conn(i).state != State::Connected || stalled(start) {
                return Err(format!("connection {}: no echo", k));
            }
        }
        times.push(cycles_to_ns(rdtsc() - start) / 1000);
        if byte[0] != k as u8 {
            return Err(format!("connection {}: echoed 0x{:02x}", k, byte[0]));
        }
        v.close(i, CLOSE_US)?;
    }
    println!(
        "bench vsock-lat: guest connect to echoed byte, {} connections to port {}: \
         min/median/mean/max {} us",
        n,
        p.echo_port,
        summary(times)
    );
    v.listen(p.listen);
    println!(
        "bench vsock-lat: listening on port {} for {} connections",
        p.listen, n
    );
    let from = v.conns().len();
    let mut echoed: Vec<bool> = Vec::new();
    let mut progress = rdtsc();
    let mut buf = [0u8; 64];
    while (echoed.iter().filter(|&&e| e).count() as u64) < n {
        v.poll()?;
        echoed.resize(v.conns().len() - from, false);
        for (k, done) in echoed.iter_mut().enumerate() {
            let i = from + k;
            if !v.conn(i).incoming || v.conn(i).state != State::Connected {
                continue;
            }
            let got = v.recv(i, &mut buf)?;
            if got == 0 {
                continue;
            }
            let mut off = 0;
            while off < got {
                let sent = v.send(i, &buf[off..got])?;
                off += sent;
                if sent == 0 {
                    v.poll()?;
                    if stalled(progress) {
                        return Err(format!("host connection {}: no credit in 10 s", k));
                    }
                }
            }
            *done = true;
            progress = rdtsc();
        }
        if rdtsc() - progress > us_to_cycles(STALL_US) {
            return Err(format!(
                "{} of {} host connections in 10 s",
                echoed.iter().filter(|&&e| e).count(),
                n
            ));
        }
    }
    println!(
        "bench vsock-lat: echoed the first bytes of {} host connections",
        n
    );
    Ok(())
}
