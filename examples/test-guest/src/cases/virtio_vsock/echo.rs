//! The `echo` sub-case of `test=virtio-vsock`: `vsock_conns` connections
//! to the host's echo port at once; connection k sends 1000 + 61 k bytes of
//! its own stream (xorshift64 from `GUEST_SEED ^ (k + 1) · φ`), all
//! interleaved, and must get exactly those bytes back.

use super::{stalled, CLOSE_US, STALL_US};
use crate::cases::support::Ctx;
use crate::cases::virtio_net::data::{Pattern, GUEST_SEED};
use crate::drivers::virtio::Device;
use crate::drivers::vsock::{reason_text, State, Vsock};
use crate::platform::arch::rdtsc;
use crate::platform::time::cycles_to_ns;
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Bytes connection `k` sends.
fn len(k: usize) -> usize {
    1000 + 61 * k
}

/// One connection's message and how far it got each way.
struct Echo {
    conn: usize,
    msg: Vec<u8>,
    sent: usize,
    back: usize,
}

pub fn run(v: &mut Vsock, ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let p = ctx.vsock;
    let n = p.conns as usize;
    let start = rdtsc();
    // All requested before any is waited for.
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(v.connect(p.echo_port)?);
        v.poll()?;
    }
    v.wait(STALL_US, |v| {
        conns.iter().all(|&i| v.conn(i).state != State::Connecting)
    })?;
    for (k, &i) in conns.iter().enumerate() {
        match v.conn(i).state {
            State::Connected => {}
            State::Closed(r) => {
                return Err(format!(
                    "connection {} to host port {}: {}",
                    k,
                    p.echo_port,
                    reason_text(r)
                ))
            }
            State::Connecting => {
                return Err(format!(
                    "connection {} to host port {}: no answer in 10 s",
                    k, p.echo_port
                ))
            }
        }
    }
    let connected_us = cycles_to_ns(rdtsc() - start) / 1000;
    let mut echoes: Vec<Echo> = conns
        .iter()
        .enumerate()
        .map(|(k, &conn)| {
            let mut msg = vec![0u8; len(k)];
            let seed = GUEST_SEED ^ (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            Pattern::new(seed).fill(&mut msg);
            Echo {
                conn,
                msg,
                sent: 0,
                back: 0,
            }
        })
        .collect();
    let mut buf = vec![0u8; 8192];
    let mut progress = rdtsc();
    while echoes.iter().any(|e| e.back < e.msg.len()) {
        v.poll()?;
        for (k, e) in echoes.iter_mut().enumerate() {
            if e.sent < e.msg.len() {
                let sent = v.send(e.conn, &e.msg[e.sent..])?;
                e.sent += sent;
                if sent > 0 {
                    progress = rdtsc();
                }
            }
            loop {
                let got = v.recv(e.conn, &mut buf)?;
                if got == 0 {
                    break;
                }
                progress = rdtsc();
                let want = &e.msg[e.back..e.sent.max(e.back)];
                if got > want.len() {
                    return Err(format!(
                        "connection {}: {} bytes echoed, {} sent",
                        k,
                        e.back + got,
                        e.sent
                    ));
                }
                if buf[..got] != want[..got] {
                    let at = buf[..got]
                        .iter()
                        .zip(want)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    return Err(format!(
                        "connection {}: echo differs from byte {}",
                        k,
                        e.back + at
                    ));
                }
                e.back += got;
            }
            if e.back < e.msg.len() {
                if let State::Closed(r) = v.conn(e.conn).state {
                    if v.available(e.conn) == 0 {
                        return Err(format!(
                            "connection {}: {} by the host after {} of {} bytes echoed",
                            k,
                            reason_text(r),
                            e.back,
                            e.msg.len()
                        ));
                    }
                }
            }
        }
        if stalled(progress) {
            let done = echoes.iter().filter(|e| e.back == e.msg.len()).count();
            return Err(format!(
                "nothing moved for 10 s: {} of {} connections echoed",
                done, n
            ));
        }
    }
    let total: usize = echoes.iter().map(|e| e.msg.len()).sum();
    println!(
        "vsock-echo: {} connections to port {} connected in {} us, {} bytes echoed in {} ms{}",
        n,
        p.echo_port,
        connected_us,
        total,
        cycles_to_ns(rdtsc() - start) / 1_000_000,
        dev.tag()
    );
    // All shut down at once, then the answers waited for together.
    for e in &echoes {
        v.shutdown(e.conn)?;
    }
    let closed = |v: &Vsock| {
        echoes
            .iter()
            .all(|e| matches!(v.conn(e.conn).state, State::Closed(_)))
    };
    if !v.wait(CLOSE_US, closed)? {
        let open = echoes
            .iter()
            .filter(|e| !matches!(v.conn(e.conn).state, State::Closed(_)))
            .count();
        println!(
            "vsock-echo: {} connections not answered in 2 s after the shutdown, reset{}",
            open,
            dev.tag()
        );
        for e in &echoes {
            if !matches!(v.conn(e.conn).state, State::Closed(_)) {
                v.force_close(e.conn)?;
            }
        }
    }
    Ok(String::new())
}
