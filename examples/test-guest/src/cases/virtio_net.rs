//! `test=virtio-net`: on the first net device of each transport, the smoltcp
//! TCP/IP stack over virtio-drivers' `VirtIONetRaw` (`drivers::net::Nic`),
//! polled at CPL3 without sleeping, timed with the TSC:
//!
//! - `virtio-net: mac <mac> mtu <n|-> status <up|down|->`: the MAC from the
//!   driver, MTU and status from the config space (only when the device
//!   offers VIRTIO_NET_F_MTU / VIRTIO_NET_F_STATUS; a link that is down
//!   fails the test); a device that offers no VIRTIO_NET_F_MAC gets a
//!   generated, locally administered MAC (5.1.5), said on a line before;
//! - the guest at `net_ip`/24 answers ARP and ICMP echo requests for as long
//!   as the test runs (smoltcp does), and pings `net_peer` 3 times
//!   (`virtio-net: ping <peer> ok 3/3 ...`, each reply within 1 s);
//! - a TCP connection to `net_peer:net_port` carries `net_bytes` of the
//!   guest's stream (`data::GUEST_SEED`) to the host, which sends
//!   `net_bytes` of `HOST_SEED`'s back on it; the guest checks those bytes
//!   against the stream and prints both directions' time, rate and
//!   FNV-1a 64, then closes.
//!
//! Nothing progressing for 10 s (no connection, no byte acknowledged or
//! received) fails the test instead of hanging. One `test virtio-net:` line
//! per transport with a net device (mmio unsuffixed, pci ` (pci)`).

pub mod data;
mod tcp;

use crate::cases::support::{report, Ctx, Want};
use crate::drivers::doorbell;
use crate::drivers::net::{Nic, DEFAULT_MTU, RX_QUEUE, TX_QUEUE};
use crate::drivers::transport::StrictTransport;
use crate::drivers::virtio::{Bus, Device};
use crate::platform::arch::rdtsc;
use crate::platform::ram::Arena;
use crate::platform::time::{cycles_to_ns, us_to_cycles};
use crate::println;
use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::net::Ipv4Addr;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::socket::icmp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, Icmpv4Packet, Icmpv4Repr};
use smoltcp::wire::{IpAddress, IpCidr};
use virtio_drivers::transport::{DeviceType, Transport};

const NAME: &str = "virtio-net";
/// The guest's prefix length on the peer's network.
const PREFIX: u8 = 24;
const PING_COUNT: u16 = 3;
const PING_TIMEOUT_US: u64 = 1_000_000;
/// ICMP identifier of the guest's echo requests.
const PING_IDENT: u16 = 0x766d;
/// How long nothing may progress before the test fails.
const STALL_US: u64 = 10_000_000;
/// How long the close may take (not a failure when it does not finish).
const CLOSE_US: u64 = 1_000_000;
/// Each TCP socket buffer (the receive window is this, scaled).
const SOCKET_BUF: usize = 1 << 20;
/// Feature bits and config offsets (virtio 1.2 §5.1.3, 5.1.4).
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const CONFIG_STATUS: usize = 6;
const CONFIG_MTU: usize = 10;
const STATUS_LINK_UP: u16 = 1;

/// The `net_ip=`, `net_peer=`, `net_port=` and `net_bytes=` parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetParams {
    /// The guest's address (prefix /24).
    pub ip: Ipv4Addr,
    /// The host: pinged, and the TCP peer.
    pub peer: Ipv4Addr,
    pub port: u16,
    /// Bytes each way on the TCP connection.
    pub bytes: u64,
}

impl NetParams {
    pub const DEFAULT: NetParams = NetParams {
        ip: Ipv4Addr::new(10, 77, 0, 2),
        peer: Ipv4Addr::new(10, 77, 0, 1),
        port: 5555,
        bytes: 64 << 20,
    };
}

pub fn run(ctx: &Ctx, _: Want) {
    if !ctx.devices.has(DeviceType::Network) {
        report(NAME, "", Err(String::from("no net device")));
        return;
    }
    for bus in [Bus::Mmio, Bus::Pci] {
        if let Some(dev) = ctx.devices.first(DeviceType::Network, bus) {
            report(NAME, bus.suffix(), one(ctx, dev));
        }
    }
}

fn one(ctx: &Ctx, dev: &Device) -> Result<String, String> {
    let mut transport = ctx.devices.open(dev)?;
    let health = transport.health();
    let link = Link::probe(&mut transport)?;
    // SAFETY: cases run one at a time, and nothing else uses the free RAM
    // while this one runs.
    let arena = unsafe { Arena::new(ctx.ram) }?;
    let mut nic = Nic::new(transport, &arena, link.mtu.unwrap_or(DEFAULT_MTU))?;
    nic.use_registers(doorbell::registers(ctx.devices, dev, [RX_QUEUE, TX_QUEUE])?);
    let mac = match link.mac_offered {
        true => nic.mac(),
        false => generated_mac(),
    };
    if !link.mac_offered {
        println!(
            "virtio-net: no mac offered, generated {}{}",
            mac_text(mac),
            dev.tag()
        );
    }
    println!(
        "virtio-net: mac {} mtu {} status {}{}",
        mac_text(mac),
        link.mtu.map_or(String::from("-"), |m| format!("{}", m)),
        link.status_text(),
        dev.tag()
    );
    if link.status.is_some_and(|s| s & STATUS_LINK_UP == 0) {
        return Err(String::from("link is down"));
    }
    let mut stack = Stack::new(&mut nic, mac, ctx.net);
    let result = stack.ping().and_then(|()| stack.transfer(&arena));
    drop(stack);
    let c = nic.counters();
    println!(
        "virtio-net: {} frames received, {} sent, {} dropped for want of a buffer; \
         {} receive and {} transmit notifications{}",
        c.rx_frames,
        c.tx_frames,
        c.tx_dropped,
        c.rx_notifies,
        c.tx_notifies,
        dev.tag()
    );
    result?;
    // Dropping the driver unsets the queues and resets the device.
    drop(nic);
    health.check()?;
    Ok(String::new())
}

/// What the config space says, read before the driver negotiates.
struct Link {
    mac_offered: bool,
    mtu: Option<u16>,
    status: Option<u16>,
}

impl Link {
    /// Steps 1-3 of the initialisation and the offered features (the
    /// driver continues from there), then MTU and status if offered.
    fn probe(t: &mut StrictTransport) -> Result<Link, String> {
        let offered = t.probe()?;
        let read = |t: &StrictTransport, offset: usize| {
            t.read_config_space::<u16>(offset)
                .map_err(|e| format!("config at {}: {}", offset, e))
        };
        let mtu = match offered & F_MTU {
            0 => None,
            _ => Some(read(t, CONFIG_MTU)?),
        };
        let status = match offered & F_STATUS {
            0 => None,
            _ => Some(read(t, CONFIG_STATUS)?),
        };
        Ok(Link {
            mac_offered: offered & F_MAC != 0,
            mtu,
            status,
        })
    }

    fn status_text(&self) -> &'static str {
        match self.status {
            None => "-",
            Some(s) if s & STATUS_LINK_UP != 0 => "up",
            Some(_) => "down",
        }
    }
}

/// A locally administered unicast MAC (first byte 0x02) from the TSC.
fn generated_mac() -> [u8; 6] {
    let mut x = rdtsc() | 1;
    for _ in 0..4 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    let b = x.to_le_bytes();
    [0x02, b[0], b[1], b[2], b[3], b[4]]
}

fn mac_text(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        a, b, c, d, e, f
    )
}

/// smoltcp's clock: the TSC in microseconds.
fn now() -> Instant {
    Instant::from_micros((cycles_to_ns(rdtsc()) / 1000) as i64)
}

/// `bytes` in `ns` as `<n> ms (<x.y> MiB/s)`.
pub fn rate(bytes: u64, ns: u64) -> String {
    let ns = ns.max(1);
    let tenths = u128::from(bytes) * 10 * 1_000_000_000 / (u128::from(ns) << 20);
    format!(
        "{} ms ({}.{} MiB/s)",
        ns / 1_000_000,
        tenths / 10,
        tenths % 10
    )
}

/// The interface, its sockets and the device under them.
struct Stack<'n, 'a> {
    nic: &'n mut Nic<'a>,
    iface: Interface,
    sockets: SocketSet<'a>,
    params: NetParams,
}

impl<'n, 'a> Stack<'n, 'a> {
    fn new(nic: &'n mut Nic<'a>, mac: [u8; 6], params: NetParams) -> Self {
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        config.random_seed = rdtsc();
        let mut iface = Interface::new(config, nic, now());
        iface.update_ip_addrs(|addrs| {
            // The list is empty: one address fits.
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(params.ip), PREFIX));
        });
        Stack {
            nic,
            iface,
            sockets: SocketSet::new(Vec::new()),
            params,
        }
    }

    /// One round of smoltcp: every received frame, one frame out per
    /// socket; the queue notifications that asked for; then whether the
    /// device misbehaved.
    fn poll(&mut self) -> Result<(), String> {
        self.iface.poll(now(), &mut *self.nic, &mut self.sockets);
        self.nic.flush();
        self.nic.check()
    }

    /// `PING_COUNT` echo requests to the peer, one at a time; all must be
    /// answered.
    fn ping(&mut self) -> Result<(), String> {
        let buffer =
            || icmp::PacketBuffer::new(vec![icmp::PacketMetadata::EMPTY; 4], vec![0; 1024]);
        let mut socket = icmp::Socket::new(buffer(), buffer());
        socket
            .bind(icmp::Endpoint::Ident(PING_IDENT))
            .map_err(|e| format!("icmp bind: {}", e))?;
        let handle = self.sockets.add(socket);
        let mut rtts = Vec::new();
        for seq in 0..PING_COUNT {
            if let Some(us) = self.echo(handle, seq)? {
                rtts.push(us);
            }
        }
        self.sockets.remove(handle);
        let peer = self.params.peer;
        let n = rtts.len();
        if n != usize::from(PING_COUNT) {
            return Err(format!("ping {}: {}/{} replies", peer, n, PING_COUNT));
        }
        let (min, max) = (rtts.iter().min(), rtts.iter().max());
        let avg = rtts.iter().sum::<u64>() / n as u64;
        println!(
            "virtio-net: ping {} ok {}/{} rtt min/avg/max {}/{}/{} us",
            peer,
            n,
            PING_COUNT,
            min.unwrap_or(&0),
            avg,
            max.unwrap_or(&0)
        );
        Ok(())
    }

    /// One echo request; its round trip in µs, `None` without a reply
    /// within `PING_TIMEOUT_US`.
    fn echo(&mut self, handle: SocketHandle, seq: u16) -> Result<Option<u64>, String> {
        let payload = [seq as u8; 32];
        let request = Icmpv4Repr::EchoRequest {
            ident: PING_IDENT,
            seq_no: seq,
            data: &payload,
        };
        let mut bytes = vec![0; request.buffer_len()];
        let caps = ChecksumCapabilities::default();
        request.emit(&mut Icmpv4Packet::new_unchecked(&mut bytes), &caps);
        let peer = IpAddress::Ipv4(self.params.peer);
        let t0 = rdtsc();
        self.sockets
            .get_mut::<icmp::Socket>(handle)
            .send_slice(&bytes, peer)
            .map_err(|e| format!("icmp send: {}", e))?;
        while rdtsc() - t0 < us_to_cycles(PING_TIMEOUT_US) {
            self.poll()?;
            let socket = self.sockets.get_mut::<icmp::Socket>(handle);
            while let Ok((data, from)) = socket.recv() {
                let reply = Icmpv4Packet::new_checked(data)
                    .and_then(|p| Icmpv4Repr::parse(&p, &caps))
                    .ok();
                let ours = Icmpv4Repr::EchoReply {
                    ident: PING_IDENT,
                    seq_no: seq,
                    data: &payload,
                };
                if from == peer && reply == Some(ours) {
                    return Ok(Some(cycles_to_ns(rdtsc() - t0) / 1000));
                }
            }
        }
        Ok(None)
    }
}
