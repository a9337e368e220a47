//! virtio-net: in one boot per run, the test guest moves a TCP stream each way through its
//! smoltcp stack (`test=virtio-net net_bytes=N`: the host reads N bytes, then sends N), then
//! 64-byte UDP frames one way and the other (`bench=net-tx:S,net-rx:S`), through a TAP in a
//! network namespace of its own (`NetNs`, the integration tests' set-up). vmkit on
//! virtio-mmio with `--net ...,poll_us=0` and `poll_us=50`, QEMU microvm's
//! `virtio-net-device` with `-netdev tap,...,vhost=off` on the same TAP, and the host's own
//! loopback ([`peer`]) as the ceiling. Per row, over the window the row's traffic took
//! ([`Probe`] marks on guest lines and on the host peer): vCPU exits and the VMM's CPU time
//! per frame through the TAP.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;

use crate::peer::{self, Received};
use crate::probe::{Probe, Window};
use crate::run::{run_with, READY_LINE};
use crate::stats::{fixed, median, ratio};
use crate::svg::Chart;
use crate::table::Table;
use crate::vmm::{Setup, Vmm, QEMU_FIRST_VIRTIO_MMIO};
use vmkit_netns::NetNs;

/// The guest's MAC, given to both VMMs.
const MAC: &str = "52:54:00:12:34:56";
/// The host's TCP and UDP port, the guest's `net_port`.
const PORT: u16 = 5555;
/// Boots per configuration, alternating.
const RUNS: usize = 3;

/// The rows: heading, and the marks that open and close its window.
const ROWS: [(&str, &str, &str); 4] = [
    ("TCP guest → host (MiB/s)", "tcp", "tcp-half"),
    ("TCP host → guest (MiB/s)", "tcp-half", "tcp-end"),
    (
        "64-byte UDP guest → host (frames/s at the host)",
        "tx",
        "tx-end",
    ),
    (
        "64-byte UDP host → guest (frames/s at the guest)",
        "rx",
        "rx-end",
    ),
];

/// The mark a guest line sets, if any (`tcp-half` is set by the host peer).
fn mark_of(line: &str) -> Option<&'static str> {
    // Within the receive window: not its end.
    if line.starts_with("bench net-rx: first frame") {
        return None;
    }
    let marks = [
        ("virtio-net: ping ", "tcp"),
        ("virtio-net: tcp received ", "tcp-end"),
        ("bench net-tx: sending ", "tx"),
        ("bench net-tx: ", "tx-end"),
        ("bench net-rx: receiving ", "rx"),
        ("bench net-rx: ", "rx-end"),
    ];
    marks.iter().find(|m| line.starts_with(m.0)).map(|m| m.1)
}

/// A column: a VMM and how its device is set up.
#[derive(Debug, Clone, Copy)]
enum Config {
    /// vmkit with this transmit-ring polling window.
    Vmkit(u32),
    Qemu,
}

impl Config {
    fn name(self) -> String {
        match self {
            Config::Vmkit(us) => format!("vmkit poll_us={us}"),
            Config::Qemu => "QEMU microvm".into(),
        }
    }

    /// The VMM booting the guest with `cmdline` on the namespace's TAP, run inside it.
    fn command(self, setup: &Setup, ns: &NetNs, cmdline: &str) -> Command {
        let (vmm, cmdline) = match self {
            Config::Vmkit(_) => (Vmm::Vmkit, cmdline.to_string()),
            Config::Qemu => (Vmm::Qemu, format!("{cmdline} {QEMU_FIRST_VIRTIO_MMIO}")),
        };
        let plain = setup.command(vmm, "256M", &cmdline);
        let mut cmd = ns.command(&plain.get_program().to_string_lossy());
        cmd.args(plain.get_args()).stdin(Stdio::null());
        match self {
            Config::Vmkit(us) => cmd
                .arg("--net")
                .arg(format!("tap={},mac={MAC},poll_us={us}", ns.tap)),
            Config::Qemu => cmd
                .args(["-name", "vmkit-bench,debug-threads=on"])
                .args(["-global", "virtio-mmio.force-legacy=false"])
                .arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={},script=no,downscript=no,vhost=off",
                    ns.tap
                ))
                .args(["-device", &format!("virtio-net-device,netdev=n0,mac={MAC}")]),
        };
        cmd
    }
}

/// What one boot measured.
#[derive(Debug)]
struct Boot {
    /// Per row: the receiver's rate.
    rates: [f64; 4],
    /// The senders' rates of the UDP rows (guest → host, host → guest), frames/s.
    sent: [f64; 2],
    /// Per row: what happened in its window.
    windows: [Option<Window>; 4],
    /// Why exits were not counted, if they were not.
    no_exits: Option<String>,
}

/// The host's sockets, made inside the namespace: the TCP listener and the UDP receiver at
/// the host's address, a UDP sender connected to the guest.
fn sockets(ns: &NetNs) -> Result<(TcpListener, UdpSocket, UdpSocket), String> {
    let host: SocketAddr = format!("{}:{PORT}", ns.host_ip)
        .parse()
        .map_err(|_| "host ip")?;
    let guest: SocketAddr = format!("{}:{PORT}", ns.guest_ip)
        .parse()
        .map_err(|_| "ip")?;
    ns.spawn_in(move || {
        let tcp = TcpListener::bind(host).map_err(|e| format!("listen at {host}: {e}"))?;
        let udp = peer::udp_bind(host)?;
        let flood = peer::udp_sender(SocketAddr::new(host.ip(), 0), guest)?;
        Ok((tcp, udp, flood))
    })
    .join()
    .map_err(|_| "socket set-up panicked")?
}

/// The host's end of `test=virtio-net`: reads `stream.len()` bytes, marks `tcp-half`, sends
/// the host's stream, waits for the guest's FIN.
fn tcp_peer(
    listener: TcpListener,
    stream: Arc<Vec<u8>>,
    probe: Arc<OnceLock<Probe>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let mut conn = peer::accept(&listener, &stop)?;
        peer::tcp_read(&mut conn, stream.len())?;
        if let Some(p) = probe.get() {
            p.mark("tcp-half");
        }
        peer::tcp_write(&mut conn, &stream)?;
        let _ = std::io::Read::read(&mut conn, &mut [0u8; 1]);
        Ok(())
    })
}

/// The number after `key` up to `end` in the first line starting with `prefix` that has
/// `key`.
fn number(out: &str, prefix: &str, key: &str, end: &str) -> Option<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix) && l.contains(key))?;
    let rest = line.split(key).nth(1)?;
    rest.split(end).next()?.trim().parse().ok()
}

/// The guest's figures: TCP each way (MiB/s), UDP frames/s queued and received; `Err` with
/// the output unless the TCP test passed and both benchmarks printed.
fn guest_figures(out: &str) -> Result<[f64; 4], String> {
    let get = || -> Option<[f64; 4]> {
        out.lines().find(|l| l.starts_with("test virtio-net: ok"))?;
        Some([
            number(out, "virtio-net: tcp sent ", " ms (", " MiB/s")?,
            number(out, "virtio-net: tcp received ", " ms (", " MiB/s")?,
            number(out, "bench net-tx: ", " ms, ", " frames/s")?,
            number(out, "bench net-rx: ", " ms, ", " frames/s")?,
        ])
    };
    get().ok_or_else(|| format!("the guest's net figures are missing:\n{out}"))
}

/// The host's threads of one boot, and what starts the flood.
struct Ends {
    stop: Arc<AtomicBool>,
    tcp: JoinHandle<Result<(), String>>,
    udp: JoinHandle<Received>,
    /// The sender, until the guest is ready to receive; then its thread.
    flood_socket: Option<UdpSocket>,
    flood: Option<JoinHandle<Received>>,
    flood_stop: Arc<AtomicBool>,
    /// How long the flood may last, s.
    flood_secs: f64,
    probe: Arc<OnceLock<Probe>>,
    tap: String,
}

impl Ends {
    /// The host's ends on `ns`'s sockets; nothing runs in the guest yet.
    fn start(ns: &NetNs, stream: &Arc<Vec<u8>>, flood_secs: f64) -> Result<Self, String> {
        let (listener, udp, flood) = sockets(ns)?;
        let probe = Arc::new(OnceLock::<Probe>::new());
        let stop = Arc::new(AtomicBool::new(false));
        let udp_stop = stop.clone();
        Ok(Self {
            tcp: tcp_peer(listener, stream.clone(), probe.clone(), stop.clone()),
            udp: std::thread::spawn(move || peer::udp_count(&udp, &udp_stop)),
            stop,
            flood_socket: Some(flood),
            flood: None,
            flood_stop: Arc::new(AtomicBool::new(false)),
            flood_secs,
            probe,
            tap: ns.tap.clone(),
        })
    }

    /// A guest line: the probe attached at the ready line, marks set, the flood started
    /// when the guest is ready to receive and stopped when it has counted.
    fn on_line(&mut self, line: &str, pid: u32) -> Result<(), String> {
        if line.contains(READY_LINE) {
            let _ = self.probe.set(Probe::attach(pid, &self.tap)?);
        }
        let Some(mark) = mark_of(line) else {
            return Ok(());
        };
        if let Some(p) = self.probe.get() {
            p.mark(mark);
        }
        match mark {
            "rx" => {
                if let Some(socket) = self.flood_socket.take() {
                    let (stop, secs) = (self.flood_stop.clone(), self.flood_secs);
                    let flood = move || peer::udp_flood(&socket, secs, &stop);
                    self.flood = Some(std::thread::spawn(flood));
                }
            }
            "rx-end" => self.flood_stop.store(true, Ordering::Relaxed),
            _ => {}
        }
        Ok(())
    }

    /// Stops and joins the threads: the UDP receiver's count and the flood's.
    fn finish(self) -> Result<(Received, Received), String> {
        self.stop.store(true, Ordering::Relaxed);
        self.flood_stop.store(true, Ordering::Relaxed);
        let flooded = self.flood.map_or(Ok(Received::default()), JoinHandle::join);
        let received = self.udp.join().map_err(|_| "udp receiver panicked")?;
        self.tcp.join().map_err(|_| "tcp peer panicked")??;
        Ok((received, flooded.map_err(|_| "flood panicked")?))
    }
}

/// One boot of `config` with every workload, `secs` per UDP direction.
fn boot(
    setup: &Setup,
    ns: &NetNs,
    config: Config,
    secs: u64,
    stream: &Arc<Vec<u8>>,
) -> Result<Boot, String> {
    let mut ends = Ends::start(ns, stream, (secs + 1) as f64)?;
    let cmdline = format!(
        "test=virtio-net net_bytes={} net_ip={} net_peer={} net_port={PORT} \
         bench=net-tx:{secs},net-rx:{secs}",
        stream.len(),
        ns.guest_ip,
        ns.host_ip
    );
    let cmd = config.command(setup, ns, &cmdline);
    let done = run_with(cmd, &config.name(), |line, _, child| {
        ends.on_line(line, child.id())
    });
    let probe = ends.probe.clone();
    let host = ends.finish();
    let done = done?.check(&config.name())?;
    let (received, flooded) = host?;
    let guest = guest_figures(&done.stdout)?;
    let probe = probe.get().ok_or("no ready line")?;
    Ok(Boot {
        rates: [guest[0], guest[1], received.rate(), guest[3]],
        sent: [guest[2], flooded.rate()],
        windows: ROWS.map(|(_, from, to)| probe.window(from, to)),
        no_exits: probe.counters_missing().map(String::from),
    })
}

/// The medians of one configuration's boots.
#[derive(Debug)]
struct Column {
    name: String,
    /// Per row: the receiver's rate.
    rates: [f64; 4],
    /// The UDP senders' rates.
    sent: [f64; 2],
    /// Per row: exits to the VMM, MMIO/PIO exits, VMM CPU µs and vCPU CPU µs, per frame.
    per_frame: [[f64; 4]; 4],
    /// Per row: frames through the TAP in the window.
    frames: [f64; 4],
}

/// Per frame in `w`: exits to the VMM, MMIO/PIO exits, VMM CPU µs, vCPU CPU µs.
fn per_frame(w: Option<Window>) -> [f64; 4] {
    let Some(w) = w.filter(|w| w.frames > 0) else {
        return [f64::NAN; 4];
    };
    let n = w.frames as f64;
    let exits =
        |f: fn(&crate::kvmtrace::Exits) -> u64| w.exits.map_or(f64::NAN, |e| f(&e) as f64 / n);
    [
        exits(|e| e.to_vmm),
        exits(|e| e.mmio_pio),
        w.vmm_ns as f64 / 1e3 / n,
        w.vcpu_ns as f64 / 1e3 / n,
    ]
}

impl Column {
    fn of(name: String, boots: &[Boot]) -> Self {
        let med = |f: &dyn Fn(&Boot) -> f64| median(boots.iter().map(f).collect());
        Column {
            name,
            rates: std::array::from_fn(|r| med(&|b| b.rates[r])),
            sent: std::array::from_fn(|r| med(&|b| b.sent[r])),
            per_frame: std::array::from_fn(|r| {
                std::array::from_fn(|k| med(&|b| per_frame(b.windows[r])[k]))
            }),
            frames: std::array::from_fn(|r| {
                med(&|b| b.windows[r].map_or(f64::NAN, |w| w.frames as f64))
            }),
        }
    }
}

/// The host's own loopback ceilings, with the peer's code: TCP MiB/s for `bytes`, and
/// 64-byte UDP frames/s over `secs`.
fn loopback(bytes: usize, secs: u64) -> Result<[f64; 2], String> {
    Ok([peer::tcp_loopback(bytes)?, peer::udp_loopback(secs as f64)?])
}

/// The rates table (receivers' rates, the UDP senders' under them), with the loopback
/// ceiling and vmkit over QEMU; a chart per row.
fn rates(columns: &[Column], host: [f64; 2], charts: &mut Vec<Chart>) {
    let qemu = columns.iter().find(|c| c.name == Config::Qemu.name());
    let vmkits: Vec<&Column> = columns
        .iter()
        .filter(|c| c.name.starts_with("vmkit"))
        .collect();
    let mut header = vec![format!("median of {RUNS}")];
    header.extend(columns.iter().map(|c| c.name.clone()));
    header.push("host loopback".into());
    if qemu.is_some() {
        header.extend(vmkits.iter().map(|c| format!("{} / QEMU", c.name)));
    }
    let mut table = Table::new(header);
    let digits = |r: usize| if r < 2 { 1 } else { 0 };
    for (r, (label, _, _)) in ROWS.iter().enumerate() {
        let mut cells = vec![label.to_string()];
        cells.extend(columns.iter().map(|c| fixed(c.rates[r], digits(r))));
        cells.push(fixed(host[r / 2], digits(r)));
        if let Some(q) = qemu {
            cells.extend(vmkits.iter().map(|c| ratio(c.rates[r], q.rates[r], 2)));
        }
        table.row(cells);
        if r >= 2 {
            let who = if r == 2 { "the guest" } else { "the host" };
            let mut sent = vec![format!("… frames/s sent by {who}")];
            sent.extend(columns.iter().map(|c| fixed(c.sent[r - 2], 0)));
            table.row(sent);
        }
        let bars = columns.iter().map(|c| (c.name.clone(), c.rates[r]));
        let unit = if r < 2 { "MiB/s" } else { "frames/s" };
        let what = label.split(" (").next().unwrap_or(label);
        charts.push(Chart::new(
            &format!("virtio-net {what} ({unit}, higher is better)"),
            bars.chain([("host loopback".to_string(), host[r / 2])])
                .collect(),
        ));
    }
    table.print();
}

/// One table of a per-frame figure (`k`: exits to the VMM, MMIO/PIO exits, VMM CPU µs,
/// vCPU CPU µs), or of the frames in the windows (`k` = 4).
fn per_frame_table(columns: &[Column], k: usize) {
    let heads = [
        "vCPU exits to the VMM per frame",
        "vCPU MMIO/PIO exits (in KVM or the VMM) per frame",
        "VMM CPU µs per frame (threads other than the vCPUs)",
        "vCPU thread CPU µs per frame (the guest and the exits handled there; not the VMM's)",
        "frames through the TAP in the window (both ways)",
    ];
    let mut header = vec![heads[k].to_string()];
    header.extend(columns.iter().map(|c| c.name.clone()));
    let mut table = Table::new(header);
    for (r, (label, _, _)) in ROWS.iter().enumerate() {
        let mut cells = vec![label.split(" (").next().unwrap_or(label).to_string()];
        cells.extend(columns.iter().map(|c| match k {
            4 => fixed(c.frames[r], 0),
            0 => fixed(c.per_frame[r][k], 4),
            1 => fixed(c.per_frame[r][k], 3),
            _ => fixed(c.per_frame[r][k], 2),
        }));
        table.row(cells);
    }
    println!();
    table.print();
}

/// The virtio-net section; adds a chart per row to `charts`. Skipped (said in the output)
/// where a namespace with a TAP cannot be made (not root, no /dev/net/tun).
pub fn section(setup: &Setup, secs: u64, mib: u64, charts: &mut Vec<Chart>) -> Result<(), String> {
    println!(
        "\n## virtio-net: TCP through the test guest's smoltcp ({mib} MiB each way) and 64-byte \
         UDP frames ({secs} s each way), TAP in a network namespace (median of {RUNS} boots)\n"
    );
    let ns = match NetNs::create("bench", 1) {
        Ok(ns) => ns,
        Err(why) => {
            println!("Not measured: {why}.");
            return Ok(());
        }
    };
    let mut configs = vec![Config::Vmkit(0), Config::Vmkit(50)];
    if setup.qemu {
        configs.push(Config::Qemu);
    }
    let stream = Arc::new(peer::host_stream((mib << 20) as usize));
    let mut boots: Vec<Vec<Boot>> = configs.iter().map(|_| Vec::new()).collect();
    let mut ceilings = Vec::new();
    for _ in 0..RUNS {
        for (i, &c) in configs.iter().enumerate() {
            boots[i].push(boot(setup, &ns, c, secs, &stream)?);
        }
        ceilings.push(loopback(stream.len(), secs)?);
    }
    let columns: Vec<Column> = configs
        .iter()
        .zip(&boots)
        .map(|(c, b)| Column::of(c.name(), b))
        .collect();
    let host = [0, 1].map(|i| median(ceilings.iter().map(|c| c[i]).collect()));
    rates(&columns, host, charts);
    for k in 0..5 {
        per_frame_table(&columns, k);
    }
    if let Some(why) = boots.iter().flatten().find_map(|b| b.no_exits.as_ref()) {
        println!("\nvCPU exits not counted: {why}.");
    }
    if setup.baseline.is_some() {
        println!("\nThe baseline vmkit is not run here (it may have no `--net`).");
    }
    println!("\n{NOTE}");
    Ok(())
}

const NOTE: &str = "Rates are the receiver's: the guest's for TCP (smoltcp, 1 MiB socket \
buffers; sending timed to the last byte acknowledged, receiving from the first byte to the \
last; the guest checks every byte it receives against the host's stream) and for UDP host → \
guest (frames counted in the S seconds from the first), the host's UDP socket for UDP guest \
→ host (first to last datagram); the senders' rates are under them. The host peer reads the \
guest's bytes before it sends its own, so the TCP directions do not overlap. Per-frame \
figures are over each row's window (TCP: from the guest's ping line to the host having read \
every byte, then to the guest's last `tcp` line; UDP: from the guest's line before it starts \
to its result line) divided by the frames through the TAP in it, both ways (data and ACKs \
for TCP; `/proc/PID/net/dev`). Exits come from KVM's tracepoints on the vCPU threads (perf \
counters): to the VMM, `kvm:kvm_userspace_exit` for PIO and MMIO; MMIO/PIO, \
`kvm:kvm_mmio` without unsatisfied reads, `kvm:kvm_fast_mmio` and `kvm:kvm_pio`, so ioeventfd \
notifications too; both without the serial port (the guest's report lines). CPU time comes \
from `/proc/PID/task/TID/schedstat`: the VMM's is every thread but the vCPUs (the guest's \
own time is on the vCPU threads, shown apart). vmkit is on virtio-mmio (version 2), QEMU's \
`virtio-net-device` with `-global virtio-mmio.force-legacy=false` (version 2 too) and \
`-netdev tap,...,vhost=off`; the guest negotiates MAC, STATUS, EVENT_IDX, VERSION_1 (no \
offloads, no MRG_RXBUF) and polls (no interrupts). Host loopback: the same peer code over \
127.0.0.1, TCP one way for the TCP rows, the UDP flood into the counting receiver for the \
UDP rows.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_s_lines_set_their_marks() {
        let rx = "bench net-rx: receiving 64-byte udp frames on 10.0.0.2:5555 for 3 s";
        assert_eq!(mark_of(rx), Some("rx"));
        // Inside the receive window: the flood goes on.
        assert_eq!(mark_of("bench net-rx: first frame"), None);
        let end = "bench net-rx: 3000 frames in 3000 ms, 1000 frames/s";
        assert_eq!(mark_of(end), Some("rx-end"));
    }
}
