//! `bench=net-tx:S` and `bench=net-rx:S`: 64-byte UDP/IPv4 frames (14
//! bytes Ethernet, 20 IPv4, 8 UDP, 22 payload; no FCS) through the first
//! net device, over `drivers::net::Nic` (virtio-drivers' `VirtIONetRaw`
//! with the `Doorbell`), polled at CPL3 without smoltcp's stack: frames are
//! built and matched here, with smoltcp's `wire` types for the headers.
//!
//! - `net-tx`: resolves `net_peer`'s MAC with ARP, then for S seconds
//!   queues one frame (to `net_peer:net_port`, valid IPv4 and UDP
//!   checksums) in every free transmit buffer, one notification check per
//!   round, and reports the frames queued.
//! - `net-rx`: says it is ready, waits (at most 10 s) for the first UDP
//!   frame to `net_ip:net_port`, then counts those arriving in the next S
//!   seconds.
//!
//! Both answer ARP requests for `net_ip` throughout; other frames are
//! ignored.

use crate::cases::virtio_net::NetParams;
use crate::drivers::doorbell;
use crate::drivers::net::{Nic, DEFAULT_MTU, RX_QUEUE, TX_QUEUE};
use crate::drivers::virtio::{Bus, Devices};
use crate::platform::arch::rdtsc;
use crate::platform::ram::{Arena, FreeRam};
use crate::platform::time::{cycles_to_ns, us_to_cycles};
use crate::println;
use alloc::format;
use alloc::string::String;
use smoltcp::phy::{ChecksumCapabilities, Device, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame};
use smoltcp::wire::{EthernetProtocol, EthernetRepr, IpAddress, IpProtocol};
use smoltcp::wire::{Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
use virtio_drivers::transport::DeviceType;

/// Which way the frames go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The guest sends.
    Tx,
    /// The host sends, the guest counts.
    Rx,
}

/// One `bench=net-tx:S` or `bench=net-rx:S`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetBench {
    pub direction: Direction,
    pub seconds: u64,
}

/// Bytes per frame handed to the device (virtio-net header not counted).
const FRAME_LEN: usize = 64;
/// UDP payload of a `FRAME_LEN` frame.
const PAYLOAD_LEN: usize = FRAME_LEN - 14 - 20 - 8;
/// Length of an ARP frame over Ethernet/IPv4 (no padding).
const ARP_LEN: usize = 14 + 28;
/// How long the first frame, and the ARP reply (per try), may take.
const WAIT_US: u64 = 10_000_000;
const ARP_TRY_US: u64 = 1_000_000;
/// The guest's UDP source port.
const SRC_PORT: u16 = 40000;

/// Runs each benchmark on the first net device (mmio, else pci).
pub fn run(devices: &Devices, benches: &[NetBench], ram: Option<FreeRam>, params: NetParams) {
    for b in benches {
        let name = match b.direction {
            Direction::Tx => "net-tx",
            Direction::Rx => "net-rx",
        };
        if let Err(why) = one(devices, b, ram, params) {
            println!("bench {}: FAIL {}", name, why);
        }
    }
}

fn one(devices: &Devices, b: &NetBench, ram: Option<FreeRam>, p: NetParams) -> Result<(), String> {
    let dev = [Bus::Mmio, Bus::Pci]
        .iter()
        .find_map(|&bus| devices.first(DeviceType::Network, bus))
        .ok_or_else(|| String::from("no net device"))?;
    // SAFETY: benchmarks run one at a time, and nothing else uses the free
    // RAM while this one runs.
    let arena = unsafe { Arena::new(ram) }?;
    let mut nic = Nic::new(devices.open(dev)?, &arena, DEFAULT_MTU)?;
    nic.use_registers(doorbell::registers(devices, dev, [RX_QUEUE, TX_QUEUE])?);
    let mac = nic.mac();
    if mac == [0; 6] {
        return Err(String::from("no mac offered"));
    }
    let me = Me {
        mac: EthernetAddress(mac),
        params: p,
    };
    let mut link = Link { nic: &mut nic, me };
    let result = match b.direction {
        Direction::Tx => link.send(b.seconds),
        Direction::Rx => link.receive(b.seconds),
    };
    let c = nic.counters();
    println!(
        "net-bench: {} frames received, {} sent; {} receive and {} transmit notifications{}",
        c.rx_frames,
        c.tx_frames,
        c.rx_notifies,
        c.tx_notifies,
        dev.tag()
    );
    result
}

/// `frames` over `ns` as `<n> frames in <ms> ms, <r> frames/s`.
fn rate(frames: u64, ns: u64) -> String {
    let per_s = u128::from(frames) * 1_000_000_000 / u128::from(ns.max(1));
    format!(
        "{} frames in {} ms, {} frames/s",
        frames,
        ns / 1_000_000,
        per_s
    )
}

/// The guest's MAC and the addresses.
#[derive(Clone, Copy)]
struct Me {
    mac: EthernetAddress,
    params: NetParams,
}

/// What a received frame was.
enum Seen {
    /// An ARP packet from `net_peer` (its MAC).
    Peer(EthernetAddress),
    /// A UDP datagram to `net_ip:net_port`.
    Udp,
    Other,
}

impl Me {
    /// A frame to `dst`: an ARP frame when `arp` is given, else the UDP
    /// frame to `net_peer:net_port` (checksums filled in).
    fn build(&self, dst: EthernetAddress, arp: Option<ArpRepr>, out: &mut [u8]) {
        let ethertype = match arp {
            Some(_) => EthernetProtocol::Arp,
            None => EthernetProtocol::Ipv4,
        };
        let mut eth = EthernetFrame::new_unchecked(out);
        let (src_addr, dst_addr) = (self.mac, dst);
        EthernetRepr {
            src_addr,
            dst_addr,
            ethertype,
        }
        .emit(&mut eth);
        if let Some(arp) = arp {
            return arp.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        }
        let (ip, peer) = (self.params.ip, self.params.peer);
        let caps = ChecksumCapabilities::default();
        let ip_repr = Ipv4Repr {
            src_addr: ip,
            dst_addr: peer,
            next_header: IpProtocol::Udp,
            payload_len: 8 + PAYLOAD_LEN,
            hop_limit: 64,
        };
        let mut packet = Ipv4Packet::new_unchecked(eth.payload_mut());
        ip_repr.emit(&mut packet, &caps);
        let udp = UdpRepr {
            src_port: SRC_PORT,
            dst_port: self.params.port,
        };
        let (from, to) = (IpAddress::Ipv4(ip), IpAddress::Ipv4(peer));
        let mut datagram = UdpPacket::new_unchecked(packet.payload_mut());
        let fill = |b: &mut [u8]| b.fill(0x76);
        udp.emit(&mut datagram, &from, &to, PAYLOAD_LEN, fill, &caps);
    }

    /// What `frame` is, and the ARP reply it needs, if any.
    fn classify(&self, frame: &[u8]) -> (Seen, Option<(EthernetAddress, ArpRepr)>) {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return (Seen::Other, None);
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => self.arp(eth.payload()),
            EthernetProtocol::Ipv4 => (self.udp_for_us(eth.payload()), None),
            _ => (Seen::Other, None),
        }
    }

    fn arp(&self, packet: &[u8]) -> (Seen, Option<(EthernetAddress, ArpRepr)>) {
        let repr = ArpPacket::new_checked(packet).and_then(|p| ArpRepr::parse(&p));
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr: from_mac,
            source_protocol_addr: from_ip,
            target_protocol_addr: to_ip,
            ..
        }) = repr
        else {
            return (Seen::Other, None);
        };
        let seen = match from_ip == self.params.peer {
            true => Seen::Peer(from_mac),
            false => Seen::Other,
        };
        if operation != ArpOperation::Request || to_ip != self.params.ip {
            return (seen, None);
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: self.mac,
            source_protocol_addr: self.params.ip,
            target_hardware_addr: from_mac,
            target_protocol_addr: from_ip,
        };
        (seen, Some((from_mac, reply)))
    }

    /// Whether `packet` is a UDP datagram to `net_ip:net_port` (the headers
    /// only; the host's checksums are not verified).
    fn udp_for_us(&self, packet: &[u8]) -> Seen {
        let Ok(ip) = Ipv4Packet::new_checked(packet) else {
            return Seen::Other;
        };
        if ip.next_header() != IpProtocol::Udp || ip.dst_addr() != self.params.ip {
            return Seen::Other;
        }
        match UdpPacket::new_checked(ip.payload()) {
            Ok(udp) if udp.dst_port() == self.params.port => Seen::Udp,
            _ => Seen::Other,
        }
    }
}

/// The device and who the guest is on it.
struct Link<'n, 'a> {
    nic: &'n mut Nic<'a>,
    me: Me,
}

impl Link<'_, '_> {
    /// Every received frame: ARP requests for `net_ip` answered, each frame
    /// handed to `each`; then the held notifications; then whether the
    /// device misbehaved.
    fn poll(&mut self, mut each: impl FnMut(Seen)) -> Result<(), String> {
        let me = self.me;
        while let Some((rx, tx)) = self.nic.receive(Instant::ZERO) {
            let (seen, reply) = rx.consume(|f| me.classify(f));
            if let Some((to, arp)) = reply {
                tx.consume(ARP_LEN, |b| me.build(to, Some(arp), b));
            }
            each(seen);
        }
        self.nic.flush();
        self.nic.check()
    }

    /// `net_peer`'s MAC: an ARP request a second, 3 tries.
    fn resolve(&mut self) -> Result<EthernetAddress, String> {
        let me = self.me;
        let request = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr: me.mac,
            source_protocol_addr: me.params.ip,
            target_hardware_addr: EthernetAddress([0; 6]),
            target_protocol_addr: me.params.peer,
        };
        for _ in 0..3 {
            if let Some(tx) = self.nic.transmit(Instant::ZERO) {
                let to = EthernetAddress::BROADCAST;
                tx.consume(ARP_LEN, |b| me.build(to, Some(request), b));
            }
            let t0 = rdtsc();
            let mut found = None;
            while found.is_none() && rdtsc() - t0 < us_to_cycles(ARP_TRY_US) {
                self.poll(|seen| {
                    if let Seen::Peer(mac) = seen {
                        found = Some(mac);
                    }
                })?;
            }
            if let Some(mac) = found {
                return Ok(mac);
            }
        }
        Err(format!("no arp reply from {} in 3 s", me.params.peer))
    }

    /// `bench=net-tx:S`.
    fn send(&mut self, seconds: u64) -> Result<(), String> {
        let peer_mac = self.resolve()?;
        let mut frame = [0u8; FRAME_LEN];
        self.me.build(peer_mac, None, &mut frame);
        let p = self.me.params;
        println!(
            "bench net-tx: sending {}-byte udp frames to {}:{} ({}) for {} s",
            FRAME_LEN, p.peer, p.port, peer_mac, seconds
        );
        let (t0, mut sent) = (rdtsc(), 0u64);
        let end = t0 + us_to_cycles(seconds * 1_000_000);
        while rdtsc() < end {
            while let Some(tx) = self.nic.transmit(Instant::ZERO) {
                tx.consume(FRAME_LEN, |b| b.copy_from_slice(&frame));
                sent += 1;
            }
            self.poll(|_| {})?;
        }
        println!("bench net-tx: {}", rate(sent, cycles_to_ns(rdtsc() - t0)));
        Ok(())
    }

    /// `bench=net-rx:S`.
    fn receive(&mut self, seconds: u64) -> Result<(), String> {
        let p = self.me.params;
        println!(
            "bench net-rx: receiving {}-byte udp frames on {}:{} for {} s",
            FRAME_LEN, p.ip, p.port, seconds
        );
        let (t0, mut first, mut got) = (rdtsc(), None, 0u64);
        loop {
            let now = rdtsc();
            match first {
                None if now - t0 > us_to_cycles(WAIT_US) => {
                    return Err(String::from("no frame in 10 s"))
                }
                Some(start) if now - start >= us_to_cycles(seconds * 1_000_000) => break,
                _ => {}
            }
            let waiting = first.is_none();
            self.poll(|seen| {
                if let Seen::Udp = seen {
                    got += 1;
                    first.get_or_insert_with(rdtsc);
                }
            })?;
            if waiting && first.is_some() {
                // When the measured interval starts, for a host that times it too.
                println!("bench net-rx: first frame");
            }
        }
        let ns = cycles_to_ns(rdtsc() - first.unwrap_or(t0));
        println!("bench net-rx: {}", rate(got, ns));
        Ok(())
    }
}
