//! virtio-vsock against hand-built rings (virtio-queue's mock): malformed packets are
//! dropped or reset and counted, the device keeps working, a guest ignoring credit is reset,
//! and the transport-reset event reaches the event queue.

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_virtio::test_utils::{activate_context, guest_memory, mock_queue, RecordingInterrupt};
use vmkit_virtio::{VirtioDevice, FEATURE_VERSION_1};
use vmkit_virtio_vsock::*;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const RINGS: [u64; 3] = [0x1000, 0x3000, 0x5000];
const CID: u64 = 3;
const HDR: u32 = 44;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_RW: u16 = 5;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

#[derive(Clone, Copy)]
struct H {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    buf_alloc: u32,
}

impl H {
    fn new(op: u16, src_port: u32, dst_port: u32) -> Self {
        Self {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: 1,
            op,
            buf_alloc: 65536,
        }
    }
    fn bytes(self) -> [u8; 44] {
        let mut b = [0u8; 44];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    dev: Vsock,
    avail: Vec<GuestAddress>,
    used: Vec<GuestAddress>,
    pushed: [u16; 3],
    /// Receive used entries [`Rig::receive`] has looked at.
    seen: u16,
    dir: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(tag: &str, buf_alloc: u32) -> Rig {
    rig_with(tag, |c| c.buf_alloc = buf_alloc)
}

fn rig_with(tag: &str, configure: impl FnOnce(&mut VsockConfig)) -> Rig {
    rig_full(tag, configure, None)
}

/// [`rig_with`], counting into `metrics` when given.
fn rig_full(
    tag: &str,
    configure: impl FnOnce(&mut VsockConfig),
    metrics: Option<std::sync::Arc<dyn vmkit_virtio::DeviceMetrics>>,
) -> Rig {
    let dir = std::env::temp_dir().join(format!("vmkit-vsock-h-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mem = guest_memory(16 << 20);
    let mut config = VsockConfig::new(CID, dir.join("v.sock"));
    configure(&mut config);
    let mut dev = Vsock::new(config).unwrap();
    if let Some(m) = metrics {
        dev = dev.with_metrics(m);
    }
    dev.ack_features(FEATURE_VERSION_1);
    let (mut queues, mut used, mut avail) = (Vec::new(), Vec::new(), Vec::new());
    for (i, ring) in RINGS.iter().enumerate() {
        let vq = MockSplitQueue::create(&mem, GuestAddress(*ring), 16);
        let q = mock_queue(&vq);
        used.push(GuestAddress(q.used_ring()));
        avail.push(GuestAddress(q.avail_ring()));
        queues.push((i as u16, q));
    }
    let (ctx, _) = activate_context(&mem, FEATURE_VERSION_1, queues, RecordingInterrupt::new());
    dev.activate(ctx).unwrap();
    Rig {
        mem,
        dev,
        avail,
        used,
        pushed: [0; 3],
        seen: 0,
        dir,
    }
}

impl Rig {
    /// Writes descriptor `index` of queue `q`'s table.
    fn set(&self, q: usize, index: u16, d: RawDescriptor) {
        let at = GuestAddress(RINGS[q]).unchecked_add(16 * u64::from(index));
        self.mem.write_obj(d, at).unwrap();
    }
    /// Makes chain `head` available on queue `q` and notifies the device.
    fn push(&mut self, q: usize, head: u16) {
        let n = self.pushed[q];
        let slot = self.avail[q].unchecked_add(4 + 2 * u64::from(n % 16));
        self.mem.write_obj(head, slot).unwrap();
        self.pushed[q] = n.wrapping_add(1);
        self.mem
            .write_obj(self.pushed[q], self.avail[q].unchecked_add(2))
            .unwrap();
        self.dev.process_queue(q as u16);
    }
    /// Sends a packet as a header chain at `addr` (plus a data descriptor if `data`).
    fn send(&mut self, h: H, data: Option<&[u8]>) {
        self.mem
            .write_slice(&h.bytes(), GuestAddress(0x10_0000))
            .unwrap();
        match data {
            Some(d) => {
                self.mem.write_slice(d, GuestAddress(0x20_0000)).unwrap();
                self.set(1, 0, desc(0x10_0000, HDR, NEXT, 1));
                self.set(1, 1, desc(0x20_0000, d.len() as u32, 0, 0));
            }
            None => self.set(1, 0, desc(0x10_0000, HDR, 0, 0)),
        }
        self.push(1, 0);
    }
    fn used_idx(&self, q: usize) -> u16 {
        self.mem.read_obj(self.used[q].unchecked_add(2)).unwrap()
    }
    fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let at = self.used[q].unchecked_add(4 + 8 * u64::from(i % 16));
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }
    /// Offers `n` receive buffers (header + 4 KiB, one descriptor each, at 0x40_0000 + i
    /// pages); returns the (op, src_port, dst_port, len) of what the device put in buffers
    /// since the last call.
    fn receive(&mut self, n: u16) -> Vec<(u16, u32, u32, u32)> {
        let before = self.seen;
        for k in 0..n {
            // Descriptor indices not in use by buffers still offered.
            let i = (self.pushed[0] + k) % 16;
            self.set(
                0,
                i,
                desc(0x40_0000 + u64::from(i) * 0x2000, HDR + 4096, WRITE, 0),
            );
            self.push(0, i);
        }
        let mut out = Vec::new();
        for k in before..self.used_idx(0) {
            let (id, len) = self.used_elem(0, k);
            let a = GuestAddress(0x40_0000 + u64::from(id) * 0x2000);
            let op: u16 = self.mem.read_obj(a.unchecked_add(30)).unwrap();
            let src: u32 = self.mem.read_obj(a.unchecked_add(16)).unwrap();
            let dst: u32 = self.mem.read_obj(a.unchecked_add(20)).unwrap();
            let cid: u64 = self.mem.read_obj(a.unchecked_add(8)).unwrap();
            assert_eq!(cid, CID);
            out.push((op, src, dst, len));
        }
        self.seen = self.used_idx(0);
        out
    }
}

#[test]
fn malformed_transmit_packets_are_dropped_and_the_device_goes_on() {
    let mut r = rig("bad", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_1234")).unwrap();
    // Unknown operation, to no connection: dropped, answered with a reset.
    r.send(H::new(99, 5000, 1234), None);
    // Not a stream (seqpacket): dropped, reset.
    let mut seq = H::new(OP_REQUEST, 5001, 1234);
    seq.type_ = 2;
    r.send(seq, None);
    // From a CID that is not the guest's, and to a CID that is not the host's: dropped.
    let mut spoof = H::new(OP_REQUEST, 5002, 1234);
    spoof.src_cid = 7;
    r.send(spoof, None);
    let mut elsewhere = H::new(OP_REQUEST, 5003, 1234);
    elsewhere.dst_cid = 9;
    r.send(elsewhere, None);
    assert_eq!(r.dev.stats().dropped, 4);
    // A length past the data buffer.
    let mut long = H::new(OP_RW, 5000, 1234);
    long.len = 1000;
    r.send(long, Some(&[0; 100]));
    // A length over 64 KiB.
    long.len = MAX_PKT_LEN + 1;
    r.send(long, Some(&[0; 100]));
    // The header split across two descriptors.
    r.mem
        .write_slice(
            &H::new(OP_REQUEST, 5004, 1234).bytes(),
            GuestAddress(0x10_0000),
        )
        .unwrap();
    r.set(1, 2, desc(0x10_0000, 20, NEXT, 3));
    r.set(1, 3, desc(0x10_0014, 24, 0, 0));
    r.push(1, 2);
    // A device-writable header; a chain looping on itself; a buffer outside memory.
    r.set(1, 4, desc(0x10_0000, HDR, WRITE, 0));
    r.push(1, 4);
    r.set(1, 5, desc(0x10_0000, HDR, NEXT, 5));
    r.push(1, 5);
    r.set(1, 6, desc(0xffff_0000, HDR, 0, 0));
    r.push(1, 6);
    let s = r.dev.stats();
    assert_eq!(s.malformed, 6, "{s:?}");
    assert_eq!(r.used_idx(1), 10, "every chain returned");
    for i in 0..10 {
        assert_eq!(r.used_elem(1, i).1, 0);
    }
    assert_eq!(r.dev.connections(), 0, "nothing was opened");

    // The device still works: a proper request connects, data reaches the host.
    r.send(H::new(OP_REQUEST, 6000, 1234), None);
    let mut rw = H::new(OP_RW, 6000, 1234);
    rw.len = 5;
    r.send(rw, Some(b"hello"));
    let (mut s, _) = listener.accept().unwrap();
    let mut got = [0u8; 5];
    s.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // What the guest is owed: resets for the bad operation and the seqpacket request, and
    // the response.
    let rx = r.receive(4);
    assert_eq!(
        rx,
        [
            (OP_RST, 1234, 5000, HDR),
            (OP_RST, 1234, 5001, HDR),
            (OP_RESPONSE, 1234, 6000, HDR)
        ]
    );
    assert_eq!(r.dev.connections(), 1);
}

#[test]
fn unusable_receive_buffers_are_returned_empty() {
    let mut r = rig("rxbad", DEFAULT_BUF_ALLOC);
    r.send(H::new(OP_REQUEST, 5000, 1), None); // nothing listens: a reset is owed
    r.send(H::new(OP_REQUEST, 5001, 1), None);
    // A device-readable buffer, then one shorter than a header, then a good one.
    r.set(0, 0, desc(0x40_0000, HDR + 10, 0, 0));
    r.push(0, 0);
    r.set(0, 1, desc(0x40_2000, HDR - 1, WRITE, 0));
    r.push(0, 1);
    assert_eq!(r.dev.stats().malformed, 2);
    assert_eq!((r.used_elem(0, 0).1, r.used_elem(0, 1).1), (0, 0));
    r.seen = 2;
    let rx = r.receive(2);
    assert_eq!(rx, [(OP_RST, 1, 5000, HDR), (OP_RST, 1, 5001, HDR)]);
}

#[test]
fn a_guest_sending_past_its_credit_is_reset_and_nothing_piles_up() {
    let mut r = rig("credit", 4096);
    let listener = UnixListener::bind(r.dir.join("v.sock_80")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 80), None);
    // The host accepts and never reads.
    let (_s, _) = listener.accept().unwrap();
    assert_eq!(r.dev.connections(), 1);
    let chunk = vec![0x5a; 65536];
    let mut rw = H::new(OP_RW, 5000, 80);
    rw.len = chunk.len() as u32;
    let mut sent = 0u64;
    for _ in 0..1000 {
        r.send(rw, Some(&chunk));
        sent += chunk.len() as u64;
        if r.dev.stats().credit_violations > 0 {
            break;
        }
    }
    let s = r.dev.stats();
    assert_eq!(s.credit_violations, 1, "after {sent} bytes");
    assert_eq!(r.dev.connections(), 0);
    // The connection is gone: the guest (which never took its response) gets the reset.
    let rx = r.receive(2);
    assert_eq!(rx, [(OP_RST, 80, 5000, HDR)]);
    // Later data on the dead connection is answered with another reset, not buffered.
    r.send(rw, Some(&chunk));
    assert_eq!(r.receive(1), [(OP_RST, 80, 5000, HDR)]);
}

#[test]
fn transport_reset_event_reaches_the_driver() {
    let mut r = rig("event", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_9")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 9), None);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(r.dev.connections(), 1);
    // No event buffer yet: the event waits for one.
    r.dev.transport_reset();
    assert_eq!(r.dev.connections(), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "the host side sees its connection end");
    assert_eq!(r.used_idx(2), 0);
    r.mem
        .write_obj(0xffff_ffffu32, GuestAddress(0x30_0000))
        .unwrap();
    r.set(2, 0, desc(0x30_0000, 8, WRITE, 0));
    r.push(2, 0);
    assert_eq!(r.used_idx(2), 1);
    assert_eq!(r.used_elem(2, 0), (0, 4));
    let id: u32 = r.mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // Only one event per reset.
    r.set(2, 1, desc(0x30_1000, 8, WRITE, 0));
    r.push(2, 1);
    assert_eq!(r.used_idx(2), 1);
}

#[test]
fn a_device_reset_closes_the_host_sockets() {
    let mut r = rig("reset", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_9")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 9), None);
    let (mut host, _) = listener.accept().unwrap();
    assert!(r.dev.reset().is_some());
    assert_eq!(r.dev.connections(), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn a_host_client_leaving_before_the_guest_answers_is_forgotten() {
    let mut r = rig("leave", DEFAULT_BUF_ALLOC);
    let mut c = std::os::unix::net::UnixStream::connect(r.dir.join("v.sock")).unwrap();
    std::io::Write::write_all(&mut c, b"CONNECT 5\n").unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.dev.connections(), 1);
    drop(c);
    r.dev.process_device_event(0);
    assert_eq!(r.dev.connections(), 0);
    // The guest, which has not seen the request yet, is told the connection is reset.
    let rx = r.receive(2);
    assert_eq!(rx.len(), 1);
    assert_eq!((rx[0].0, rx[0].2), (OP_RST, 5));
    assert!(rx[0].1 >= 1 << 30);
}

#[test]
fn a_receive_buffer_without_room_for_data_does_not_stall_the_stream() {
    let mut r = rig("hdronly", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_9")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 9), None);
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(r.receive(1), [(OP_RESPONSE, 9, 5000, HDR)]);
    std::io::Write::write_all(&mut host, b"abc").unwrap();
    r.dev.process_device_event(0);
    // A header and an empty data buffer: no room for data, it gets a credit update.
    let i = r.pushed[0] % 16;
    r.set(
        0,
        i,
        desc(0x40_0000 + u64::from(i) * 0x2000, HDR, WRITE | NEXT, 15),
    );
    r.set(
        0,
        15,
        desc(0x40_0000 + u64::from(i) * 0x2000 + 0x100, 0, WRITE, 0),
    );
    r.push(0, i);
    let got = r.receive(1);
    assert_eq!(got, [(6, 9, 5000, HDR), (OP_RW, 9, 5000, HDR + 3)]);
}

/// Runs `f` on the rig in another thread; not done in 10 s fails.
fn bounded(r: Rig, f: impl FnOnce(&mut Rig) + Send + 'static) -> Rig {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = r;
        f(&mut r);
        let _ = tx.send(r);
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .expect("not done in 10 s: the device loops on its own wake-ups, or stalled")
}

#[test]
fn a_half_closed_connection_does_not_spin_the_host_poll() {
    let mut r = rig("halfclose", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_9")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 9), None);
    let (mut host, _) = listener.accept().unwrap();
    // The guest will send no more: the host sees end of file.
    let mut shut = H::new(4, 5000, 9);
    shut.buf_alloc = 65536;
    let mut b = shut.bytes();
    b[32] = 2; // VIRTIO_VSOCK_SHUTDOWN_F_SEND
    r.mem.write_slice(&b, GuestAddress(0x10_0000)).unwrap();
    r.set(1, 0, desc(0x10_0000, HDR, 0, 0));
    r.push(1, 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // The host replies and closes; the device handles both and returns.
    std::io::Write::write_all(&mut host, b"reply").unwrap();
    drop(host);
    let mut r = bounded(r, |r| {
        for _ in 0..3 {
            r.dev.process_device_event(0);
        }
    });
    let got = r.receive(4);
    assert_eq!(got[0], (OP_RESPONSE, 9, 5000, HDR));
    assert_eq!(got[1], (OP_RW, 9, 5000, HDR + 5));
    // End of file from a host that closed both ways: SHUTDOWN, then the reset that ends it
    // (the guest already said it sends no more).
    assert_eq!(got[2].0, 4);
    assert_eq!(got[3].0, OP_RST);
    assert_eq!(r.dev.connections(), 0);
}

#[test]
fn bytes_a_full_host_socket_did_not_take_reach_it_once_it_reads() {
    let mut r = rig("full", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_9")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 9), None);
    let (mut host, _) = listener.accept().unwrap();
    // 256 KiB, the credit the device gave, while the host reads nothing: more than a Unix
    // socket holds, so the device keeps the rest.
    let data: Vec<u8> = (0..DEFAULT_BUF_ALLOC)
        .map(|i| (i * 7 + i / 4096) as u8)
        .collect();
    for chunk in data.chunks(32 * 1024) {
        let mut rw = H::new(OP_RW, 5000, 9);
        rw.len = chunk.len() as u32;
        r.send(rw, Some(chunk));
    }
    assert_eq!(r.dev.stats().credit_violations, 0);
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; DEFAULT_BUF_ALLOC as usize];
        host.read_exact(&mut got).unwrap();
        got
    });
    // The reader drains the socket; the device writes the rest when it is writable again.
    let _r = bounded(r, move |r| {
        for _ in 0..100_000 {
            if reader.is_finished() {
                break;
            }
            r.dev.process_device_event(0);
            std::thread::yield_now();
        }
        let got = reader.join().unwrap();
        assert!(got == data, "the host got other bytes");
    });
}

#[test]
fn a_host_connect_the_guest_never_answers_times_out() {
    let mut r = rig_with("timeout", |c| {
        c.connect_timeout = std::time::Duration::from_millis(100)
    });
    let mut c = std::os::unix::net::UnixStream::connect(r.dir.join("v.sock")).unwrap();
    std::io::Write::write_all(&mut c, b"CONNECT 5\n").unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.dev.connections(), 1);
    // The guest offers no receive buffer, so it never even sees the request.
    std::thread::sleep(std::time::Duration::from_millis(150));
    r.dev.process_device_event(0);
    assert_eq!(r.dev.connections(), 0);
    assert_eq!(r.dev.stats().connect_timeouts, 1);
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "closed, without OK");
    // The guest is told the connection it may yet see the request of is reset.
    let rx = r.receive(2);
    assert_eq!(rx.len(), 1);
    assert_eq!((rx[0].0, rx[0].2), (OP_RST, 5));
    // A second client later gets its own full timeout.
    let mut c2 = std::os::unix::net::UnixStream::connect(r.dir.join("v.sock")).unwrap();
    std::io::Write::write_all(&mut c2, b"CONNECT 6\n").unwrap();
    r.dev.process_device_event(0);
    assert_eq!(r.dev.connections(), 1);
    std::thread::sleep(std::time::Duration::from_millis(150));
    r.dev.process_device_event(0);
    assert_eq!(r.dev.stats().connect_timeouts, 2);
}

#[test]
fn metrics_count_packets_bytes_drops_resets_and_malformed_chains() {
    use std::io::Write;
    use std::sync::Arc;
    use vmkit_virtio::{AtomicMetrics, MetricsSnapshot};
    let metrics = Arc::new(AtomicMetrics::new());
    let mut r = rig_full("metrics", |_| {}, Some(metrics.clone()));
    assert_eq!(metrics.snapshot(), MetricsSnapshot::default());
    let listener = UnixListener::bind(r.dir.join("v.sock_1234")).unwrap();
    // A connection and 5 bytes of data; an unknown operation to no connection (dropped, a
    // reset owed); a chain looping on itself (the queue refuses it) and a device-writable
    // header (the device does).
    r.send(H::new(OP_REQUEST, 6000, 1234), None);
    let mut rw = H::new(OP_RW, 6000, 1234);
    rw.len = 5;
    r.send(rw, Some(b"hello"));
    r.send(H::new(99, 5000, 1234), None);
    r.set(1, 5, desc(0x10_0000, HDR, NEXT, 5));
    r.push(1, 5);
    r.set(1, 4, desc(0x10_0000, HDR, WRITE, 0));
    r.push(1, 4);
    let (mut host, _) = listener.accept().unwrap();
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    let tx = MetricsSnapshot {
        requests: 5,
        write_ops: 3,
        write_bytes: 5,
        malformed: 2,
        dropped: 1,
        notifications: 5,
        interrupts: 5,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot(), tx);

    // Four receive buffers: the reset and the response take two.
    let rx = r.receive(4);
    assert_eq!(
        rx,
        [(OP_RST, 1234, 5000, HDR), (OP_RESPONSE, 1234, 6000, HDR)]
    );
    let expected = MetricsSnapshot {
        requests: 2,
        read_ops: 2,
        resets: 1,
        notifications: 4,
        interrupts: 2,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot().since(&tx), expected);

    // The host answers 5 bytes: they fill a third buffer.
    let before = metrics.snapshot();
    host.write_all(b"world").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while r.dev.stats().rx_bytes < 5 {
        assert!(std::time::Instant::now() < deadline, "host data never came");
        r.dev.process_device_event(0);
    }
    let expected = MetricsSnapshot {
        requests: 1,
        read_ops: 1,
        read_bytes: 5,
        interrupts: 1,
        ..MetricsSnapshot::default()
    };
    assert_eq!(metrics.snapshot().since(&before), expected);
}

#[test]
fn a_restored_device_resets_the_transport_once_and_serves_again() {
    let mut r = rig("restore", DEFAULT_BUF_ALLOC);
    let listener = UnixListener::bind(r.dir.join("v.sock_9")).unwrap();
    r.send(H::new(OP_REQUEST, 5000, 9), None);
    let (_old_host, _) = listener.accept().unwrap();
    assert_eq!(r.dev.connections(), 1);
    // The driver's event buffer, offered before the snapshot, unused so far.
    r.mem
        .write_obj(0xffff_ffffu32, GuestAddress(0x30_0000))
        .unwrap();
    r.set(2, 0, desc(0x30_0000, 8, WRITE, 0));
    r.push(2, 0);
    assert_eq!(r.used_idx(2), 0);

    // The driver queues a connection request while the VM is paused: its notification
    // never reaches the device.
    r.mem
        .write_slice(
            &H::new(OP_REQUEST, 5002, 9).bytes(),
            GuestAddress(0x10_0000),
        )
        .unwrap();
    r.set(1, 0, desc(0x10_0000, HDR, 0, 0));
    let n = r.pushed[1];
    r.mem
        .write_obj(0u16, r.avail[1].unchecked_add(4 + 2 * u64::from(n % 16)))
        .unwrap();
    r.pushed[1] = n + 1;
    r.mem
        .write_obj(r.pushed[1], r.avail[1].unchecked_add(2))
        .unwrap();

    let state = r.dev.state();
    assert_eq!(state.guest_cid, CID);
    let ctx = r.dev.reset().expect("was active");
    let listener = UnixListener::bind(r.dir.join("w.sock_9")).unwrap();
    // The restored device is built on its own socket path (a vsock override).
    let mut fresh = Vsock::new(VsockConfig::new(CID + 1, r.dir.join("w.sock"))).unwrap();
    fresh.restore(&state).unwrap();
    fresh.ack_features(FEATURE_VERSION_1);
    fresh.activate(ctx).unwrap();
    r.dev = fresh;
    assert_eq!(r.dev.guest_cid(), CID, "the CID comes from the state");
    assert_eq!(r.used_idx(2), 1, "one event on activation");
    assert_eq!(r.used_elem(2, 0), (0, 4));
    let id: u32 = r.mem.read_obj(GuestAddress(0x30_0000)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // Only one event.
    r.set(2, 1, desc(0x30_1000, 8, WRITE, 0));
    r.push(2, 1);
    assert_eq!(r.used_idx(2), 1);
    // The request queued while paused was taken on activation, after the reset.
    listener.set_nonblocking(true).unwrap();
    let _queued_host = listener.accept().expect("the queued request connected");
    assert_eq!(r.dev.connections(), 1);

    // The driver connects again, through the new device to the new path.
    r.send(H::new(OP_REQUEST, 5001, 9), None);
    let _new_host = listener.accept().unwrap();
    assert_eq!(r.dev.connections(), 2);
    assert_eq!(
        r.receive(2),
        [(OP_RESPONSE, 9, 5002, HDR), (OP_RESPONSE, 9, 5001, HDR)]
    );
}

#[test]
fn a_restored_state_with_a_reserved_cid_is_refused() {
    let mut r = rig("restore-cid", DEFAULT_BUF_ALLOC);
    for cid in [0, 2, u64::from(u32::MAX), u64::MAX] {
        let err = r.dev.restore(&VsockState { guest_cid: cid }).unwrap_err();
        assert!(matches!(err, vmkit_virtio_vsock::Error::Cid(c) if c == cid));
    }
    assert_eq!(r.dev.guest_cid(), CID);
}

#[test]
fn a_driver_reset_before_activation_owes_no_event() {
    let mut r = rig("restore-reset", DEFAULT_BUF_ALLOC);
    let state = r.dev.state();
    let ctx = r.dev.reset().unwrap();
    r.dev.restore(&state).unwrap();
    // The driver resets the device before the restored activation: it starts afresh.
    assert!(r.dev.reset().is_none());
    r.set(2, 0, desc(0x30_0000, 8, WRITE, 0));
    r.push(2, 0);
    r.dev.activate(ctx).unwrap();
    assert_eq!(r.used_idx(2), 0);
}
