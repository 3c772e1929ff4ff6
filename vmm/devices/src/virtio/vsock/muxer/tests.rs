use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::virtio::VirtioDevice;
use crate::virtio::testing::{MockQueue, activate_context, test_memory};
use crate::virtio::vsock::{Vsock, VsockError};

const GUEST_CID: u64 = 3;
const RX_BASE: u64 = 0x10_0000;
const TX_BASE: u64 = 0x60_0000;
const TX_SLOT: u64 = 0x1_1000;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("squib-vsock-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A guest driver for the three vsock queues.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: MockQueue<'a>,
    tx: MockQueue<'a>,
    events: Vec<Arc<WakeEvent>>,
    rx_bufs: HashMap<u16, u64>,
    rx_seen: u16,
    tx_sent: u16,
}

impl<'a> Guest<'a> {
    fn post_rx(&mut self, n: usize) {
        for i in 0..n {
            // Alternate the two layouts drivers use: header and payload in one buffer, or
            // a header buffer followed by a payload buffer.
            let two = i % 2 == 1;
            let base = RX_BASE + u64::from(self.rx.next_head()) * 0x2000;
            let head = if two {
                self.rx
                    .add_chain(&[(base, 44, true), (base + 0x100, 4096, true)])
            } else {
                self.rx.add_chain(&[(base, 44 + 4096, true)])
            };
            self.rx_bufs.insert(head, base);
        }
        self.events[0].signal().unwrap();
    }

    fn recv_timeout(&mut self, timeout: Duration) -> Option<(Header, Vec<u8>)> {
        let deadline = Instant::now() + timeout;
        while self.rx.used_idx() == self.rx_seen {
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (id, len) = self.rx.used_elem(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let base = self
            .rx_bufs
            .remove(&(id as u16))
            .expect("used an unknown rx buffer");
        let mut raw = [0u8; 44];
        self.mem.read_slice(&mut raw, GuestAddress(base)).unwrap();
        let hdr = Header::parse(&raw);
        assert_eq!(len, 44 + hdr.len);
        // One-buffer layout has the payload right after the header; two-buffer at +0x100.
        let two = self
            .mem
            .read_obj::<u16>(self.rx.desc_table().unchecked_add(u64::from(id) * 16 + 12))
            .unwrap()
            & 1
            != 0;
        let at = if two { base + 0x100 } else { base + 44 };
        let mut payload = vec![0u8; hdr.len as usize];
        self.mem.read_slice(&mut payload, GuestAddress(at)).unwrap();
        Some((hdr, payload))
    }

    fn recv(&mut self) -> (Header, Vec<u8>) {
        self.recv_timeout(Duration::from_secs(10))
            .expect("no packet from the device")
    }

    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let slot = u64::from(self.tx_sent % 32);
        let base = TX_BASE + slot * TX_SLOT;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(base))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + 0x100))
            .unwrap();
        if payload.is_empty() {
            self.tx.add_chain(&[(base, 44, false)]);
        } else {
            self.tx.add_chain(&[
                (base, 44, false),
                (base + 0x100, payload.len() as u32, false),
            ]);
        }
        self.tx_sent = self.tx_sent.wrapping_add(1);
        self.events[1].signal().unwrap();
        self.tx.wait_used(self.tx_sent);
    }

    fn hdr(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        }
    }
}

fn setup<'a>(
    mem: &'a GuestMemoryMmap,
    dir: &Path,
) -> (Vsock, Guest<'a>, Arc<crate::virtio::IrqStatus>) {
    let rx = MockQueue::at(mem, 0x1000, 256);
    let tx = MockQueue::at(mem, 0x5000, 256);
    let ev = MockQueue::at(mem, 0x9000, 256);
    let (ctx, events, _line, irq) = activate_context(mem, &[&rx, &tx, &ev]);
    let mut dev = Vsock::new(GUEST_CID, &dir.join("v.sock")).unwrap();
    dev.activate(ctx).unwrap();
    let guest = Guest {
        mem,
        rx,
        tx,
        events,
        rx_bufs: HashMap::new(),
        rx_seen: 0,
        tx_sent: 0,
    };
    (dev, guest, irq)
}

fn read_line(s: &mut UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = s.read(&mut b).unwrap();
        if n == 0 || b[0] == b'\n' {
            return String::from_utf8(out).unwrap();
        }
        out.push(b[0]);
    }
}

/// Host connects with `line`, guest accepts; returns the host stream and the host-side port.
fn host_connect(g: &mut Guest<'_>, uds: &Path, line: &str, guest_port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(uds).unwrap();
    host.write_all(line.as_bytes()).unwrap();
    let (req, _) = g.recv();
    assert_eq!(req.op, OP_REQUEST);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, GUEST_CID, guest_port)
    );
    assert_eq!(req.buf_alloc, CONN_BUF_BYTES);
    let resp = g.hdr(guest_port, req.src_port, OP_RESPONSE, 0);
    g.send(resp, &[]);
    let ok = read_line(&mut host);
    assert_eq!(ok, format!("OK {}", req.src_port));
    (host, req.src_port)
}

#[test]
fn test_vsock_rejects_reserved_cid_and_existing_path() {
    let dir = TempDir::new();
    assert!(matches!(
        Vsock::new(2, &dir.0.join("a")),
        Err(VsockError::ReservedCid { cid: 2 })
    ));
    let path = dir.0.join("taken");
    std::fs::write(&path, b"").unwrap();
    assert!(matches!(Vsock::new(3, &path), Err(VsockError::Bind { .. })));
}

#[test]
fn test_vsock_removes_socket_file_on_drop() {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    let dev = Vsock::new(3, &path).unwrap();
    assert!(path.exists());
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 3);
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn test_vsock_host_connect_handshake_and_data_both_ways() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, irq) = setup(&mem, &dir.0);
    g.post_rx(16);
    let uds = dir.0.join("v.sock");
    let (mut host, port) = host_connect(&mut g, &uds, "CONNECT 1234\nearly", 1234);
    // Bytes sent right after the CONNECT line arrive first.
    host.write_all(b" hello").unwrap();
    let mut got = Vec::new();
    while got.len() < 11 {
        let (h, p) = g.recv();
        assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, port, 1234));
        got.extend(p);
    }
    assert_eq!(got, b"early hello");

    let rw = g.hdr(1234, port, OP_RW, 5);
    g.send(rw, b"world");
    let mut buf = [0u8; 5];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"world");

    // Host half-closes: the guest learns the host sends no more.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The guest can still send, then closes; the device answers RST and closes the host side.
    g.send(g.hdr(1234, port, OP_RW, 3), b"bye");
    let mut shut = g.hdr(1234, port, OP_SHUTDOWN, 0);
    shut.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
    g.send(shut, &[]);
    let (h, _) = g.recv();
    assert_eq!(h.op, OP_RST);
    let mut rest = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert!(!irq.needs_reset());
    dev.reset();
}

#[test]
fn test_vsock_lowercase_connect_and_guest_refusal_close_host() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, _) = setup(&mem, &dir.0);
    g.post_rx(4);
    let mut host = UnixStream::connect(dir.0.join("v.sock")).unwrap();
    host.write_all(b"connect 99\n").unwrap();
    let (req, _) = g.recv();
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 99));
    g.send(g.hdr(99, req.src_port, OP_RST, 0), &[]);
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);

    // A garbage line closes the connection without bothering the guest.
    let mut bad = UnixStream::connect(dir.0.join("v.sock")).unwrap();
    bad.write_all(b"HELLO 5\n").unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(bad.read_to_end(&mut buf).unwrap(), 0);
    assert!(g.recv_timeout(Duration::from_millis(200)).is_none());
    dev.reset();
}

#[test]
fn test_vsock_guest_connects_to_host_listener() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, _) = setup(&mem, &dir.0);
    let listener = UnixListener::bind(dir.0.join("v.sock_5000")).unwrap();
    g.post_rx(8);
    g.send(g.hdr(40000, 5000, OP_REQUEST, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.src_port, h.dst_port), (OP_RESPONSE, 5000, 40000));
    let (mut peer, _) = listener.accept().unwrap();
    g.send(g.hdr(40000, 5000, OP_RW, 4), b"ping");
    let mut buf = [0u8; 4];
    peer.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    peer.write_all(b"pong").unwrap();
    let (h, p) = g.recv();
    assert_eq!((h.op, p.as_slice()), (OP_RW, &b"pong"[..]));
    // The host peer closing fully ends the guest's receive side.
    // The host peer closing its socket ends both directions for the guest; the guest's RST
    // completes the close.
    drop(peer);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV));
    g.send(g.hdr(40000, 5000, OP_RST, 0), &[]);
    // The connection is gone: data for it is answered with a RST.
    g.send(g.hdr(40000, 5000, OP_RW, 1), b"z");
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 40000));

    // Nobody listens on port 5001: RST.
    g.send(g.hdr(40001, 5001, OP_REQUEST, 0), &[]);
    let (h, _) = g.recv();
    assert_eq!((h.op, h.dst_port), (OP_RST, 40001));
    dev.reset();
}

#[test]
fn test_vsock_respects_guest_credit() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, _) = setup(&mem, &dir.0);
    let listener = UnixListener::bind(dir.0.join("v.sock_7")).unwrap();
    g.post_rx(32);
    let mut req = g.hdr(50, 7, OP_REQUEST, 0);
    req.buf_alloc = 8192;
    g.send(req, &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut peer, _) = listener.accept().unwrap();
    peer.write_all(&vec![7u8; 20000]).unwrap();
    let mut total = 0;
    let mut credit_request = false;
    while let Some((h, p)) = g.recv_timeout(Duration::from_millis(300)) {
        match h.op {
            OP_RW => total += p.len(),
            OP_CREDIT_REQUEST => credit_request = true,
            op => panic!("unexpected op {op}"),
        }
    }
    assert_eq!(total, 8192);
    assert!(credit_request);
    let mut upd = g.hdr(50, 7, OP_CREDIT_UPDATE, 0);
    upd.buf_alloc = 8192;
    upd.fwd_cnt = 8192;
    g.send(upd, &[]);
    while total < 16384 {
        let (h, p) = g.recv();
        if h.op == OP_RW {
            total += p.len();
        }
    }
    assert!(
        g.recv_timeout(Duration::from_millis(200))
            .is_none_or(|(h, _)| h.op != OP_RW)
    );
    dev.reset();
}

#[test]
fn test_vsock_buffers_for_slow_host_and_resets_credit_overrun() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, _) = setup(&mem, &dir.0);
    let listener = UnixListener::bind(dir.0.join("v.sock_8")).unwrap();
    g.post_rx(32);
    g.send(g.hdr(60, 8, OP_REQUEST, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (mut peer, _) = listener.accept().unwrap();
    // The host peer does not read. The device takes what the host socket accepts, buffers up
    // to its advertised window on top, and resets the connection when a guest ignoring
    // credit goes past that.
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    let mut sent = 0usize;
    let mut saw_rst = false;
    for _ in 0..256 {
        g.send(g.hdr(60, 8, OP_RW, 65536), &chunk);
        sent += 65536;
        while let Some((h, _)) = g.recv_timeout(Duration::from_millis(20)) {
            saw_rst |= h.op == OP_RST;
        }
        if saw_rst {
            break;
        }
    }
    assert!(saw_rst, "no reset after {sent} bytes");
    assert!(sent > CONN_BUF_BYTES as usize);
    let _ = peer.set_read_timeout(Some(Duration::from_secs(5)));
    let mut got = Vec::new();
    let _ = peer.read_to_end(&mut got);
    // Whatever reached the host before the reset is an unchanged prefix of what was sent.
    assert!(got.len() <= CONN_BUF_BYTES as usize);
    for (i, b) in got.iter().enumerate() {
        assert_eq!(*b, ((i % 65536) as u32 % 253) as u8);
    }
    dev.reset();
}

#[test]
fn test_vsock_bulk_transfer_both_ways_is_unchanged() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, irq) = setup(&mem, &dir.0);
    let listener = UnixListener::bind(dir.0.join("v.sock_9")).unwrap();
    g.post_rx(64);
    g.send(g.hdr(70, 9, OP_REQUEST, 0), &[]);
    assert_eq!(g.recv().0.op, OP_RESPONSE);
    let (peer, _) = listener.accept().unwrap();

    const TOTAL: usize = 4 << 20;
    let data: Vec<u8> = (0..TOTAL)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    // Host to guest: a writer thread, the guest keeps reposting buffers and crediting.
    let writer = {
        let mut peer = peer.try_clone().unwrap();
        let data = data.clone();
        std::thread::spawn(move || peer.write_all(&data).unwrap())
    };
    let mut got = Vec::with_capacity(TOTAL);
    while got.len() < TOTAL {
        let (h, p) = g.recv();
        if h.op == OP_RW {
            got.extend_from_slice(&p);
        }
        g.post_rx(1);
        if h.op == OP_CREDIT_REQUEST || got.len() % (64 * 1024) < 4096 {
            let mut upd = g.hdr(70, 9, OP_CREDIT_UPDATE, 0);
            upd.fwd_cnt = got.len() as u32;
            g.send(upd, &[]);
        }
    }
    writer.join().unwrap();
    assert!(got == data, "host to guest data differs");

    // Guest to host, with a reader thread on the host.
    let reader = {
        let mut peer = peer.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; TOTAL];
            peer.read_exact(&mut buf).unwrap();
            buf
        })
    };
    let mut off = 0usize;
    let mut credit = CONN_BUF_BYTES as usize;
    let mut host_fwd = 0usize;
    while off < TOTAL {
        let n = (TOTAL - off).min(65536);
        while off + n - host_fwd > credit {
            // Wait for a credit update from the device.
            let (h, _) = g.recv();
            host_fwd = h.fwd_cnt as usize;
            credit = h.buf_alloc as usize;
            g.post_rx(1);
        }
        g.send(g.hdr(70, 9, OP_RW, n as u32), &data[off..off + n]);
        off += n;
    }
    let back = reader.join().unwrap();
    assert!(back == data, "guest to host data differs");
    assert!(!irq.needs_reset());
    dev.reset();
}

#[test]
fn test_vsock_survives_hostile_tx_packets() {
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, irq) = setup(&mem, &dir.0);
    g.post_rx(8);
    // Header cut short.
    g.tx.add_chain(&[(TX_BASE, 10, false)]);
    // Length claims more payload than the buffers hold.
    let mut h = g.hdr(1, 2, OP_RW, 60000);
    mem.write_slice(&h.to_bytes(), GuestAddress(TX_BASE))
        .unwrap();
    g.tx.add_chain(&[(TX_BASE, 44, false), (TX_BASE + 0x100, 10, false)]);
    // Buffer outside guest memory.
    g.tx.add_chain(&[(1 << 44, 44, false)]);
    // Wrong source cid, wrong type, unknown connection.
    h = g.hdr(1, 2, OP_RW, 0);
    h.src_cid = 9;
    mem.write_slice(&h.to_bytes(), GuestAddress(TX_BASE + 0x1000))
        .unwrap();
    g.tx.add_chain(&[(TX_BASE + 0x1000, 44, false)]);
    h = g.hdr(1, 2, OP_RW, 0);
    h.kind = 2;
    mem.write_slice(&h.to_bytes(), GuestAddress(TX_BASE + 0x2000))
        .unwrap();
    g.tx.add_chain(&[(TX_BASE + 0x2000, 44, false)]);
    g.events[1].signal().unwrap();
    g.tx.wait_used(5);
    // Rx buffer too small for a header gets returned empty, and the RSTs still arrive.
    let mut rsts = 0;
    while let Some((h, _)) = g.recv_timeout(Duration::from_millis(300)) {
        if h.op == OP_RST {
            rsts += 1;
        }
    }
    assert!(rsts >= 2);
    assert!(!irq.needs_reset());
    dev.reset();
}

#[test]
fn test_parse_connect_accepts_both_cases_only() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"connect 1024\r"), Some(1024));
    assert_eq!(parse_connect(b"CONNECT"), None);
    assert_eq!(parse_connect(b"CONNECT x"), None);
    assert_eq!(parse_connect(b"LISTEN 5"), None);
}

#[test]
fn test_vsock_survives_random_tx_packets_and_still_connects() {
    use crate::virtio::testing::XorShift;
    let dir = TempDir::new();
    let mem = test_memory();
    let (mut dev, mut g, irq) = setup(&mem, &dir.0);
    let _listener = UnixListener::bind(dir.0.join("v.sock_77")).unwrap();
    g.post_rx(64);
    let mut rng = XorShift(0xfeed_beef_1234_5678);
    let ops = [
        OP_REQUEST,
        OP_RESPONSE,
        OP_RST,
        OP_SHUTDOWN,
        OP_RW,
        OP_CREDIT_UPDATE,
        0,
        99,
    ];
    for _ in 0..2_000 {
        let len = rng.below(300) as u32;
        let mut h = g.hdr(
            rng.below(4) as u32,
            [77, 78, rng.next() as u32][rng.below(3) as usize],
            ops[rng.below(ops.len() as u64) as usize],
            len,
        );
        if rng.below(8) == 0 {
            h.len = rng.next() as u32;
        }
        if rng.below(16) == 0 {
            h.src_cid = rng.next();
        }
        h.flags = rng.below(4) as u32;
        h.buf_alloc = rng.next() as u32;
        h.fwd_cnt = rng.next() as u32;
        let payload = vec![0x5a; len as usize];
        g.send(h, &payload);
        // Drain whatever the device answered and give the buffers back.
        let mut answered = 0;
        while g.rx.used_idx() != g.rx_seen {
            let _ = g.recv();
            answered += 1;
        }
        g.post_rx(answered);
    }
    assert!(!irq.needs_reset());
    // The device still works: a fresh host connection completes its handshake.
    while g.recv_timeout(Duration::from_millis(100)).is_some() {
        g.post_rx(1);
    }
    let (mut host, port) = host_connect(&mut g, &dir.0.join("v.sock"), "CONNECT 4242\n", 4242);
    g.send(g.hdr(4242, port, OP_RW, 2), b"ok");
    let mut buf = [0u8; 2];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
    dev.reset();
}

/// Whether a driver that moved the available index from `old` to `new` must notify, given the
/// device's avail_event (virtio 1.2, 2.7.10: the `vring_need_event` rule).
fn driver_must_notify(avail_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
}

#[test]
fn test_vsock_rx_uses_buffers_published_while_rearming_notifications() {
    let dir = TempDir::new();
    let mem = test_memory();
    let mut rx = MockQueue::at(&mem, 0x1000, 256);
    let tx = MockQueue::at(&mem, 0x5000, 256);
    let ev = MockQueue::at(&mem, 0x9000, 256);
    let (mut ctx, _events, _line, _irq) = activate_context(&mem, &[&rx, &tx, &ev]);
    ctx.acked_features |= VIRTIO_RING_F_EVENT_IDX;
    let dev = Vsock::new(GUEST_CID, &dir.0.join("v.sock")).unwrap();
    let mut muxer = Muxer::new(ctx, GUEST_CID, dev.host.clone()).unwrap();
    let avail_event_at = rx.used_addr().unchecked_add(4 + 8 * u64::from(rx.size()));
    let avail_event = |mem: &GuestMemoryMmap| u16::from_le(mem.read_obj(avail_event_at).unwrap());
    let post = |rx: &mut MockQueue<'_>| {
        let base = RX_BASE + u64::from(rx.next_head()) * 0x2000;
        rx.add_chain(&[(base, 44 + 4096, true)]);
    };

    // Two buffers, three packets: the device uses both, finds the ring empty and re-arms
    // notifications at avail_event 2.
    post(&mut rx);
    post(&mut rx);
    for port in 1..4 {
        muxer.push_ctrl((port, port), OP_RST, 0);
    }
    muxer.process_rx();
    assert_eq!(rx.used_idx(), 2);
    assert!(muxer.rx_starved);
    assert_eq!(avail_event(&mem), 2);

    // The driver posts one buffer and must notify: the worker wakes up (as on RxNotify).
    post(&mut rx);
    assert!(driver_must_notify(avail_event(&mem), 3, 2));
    muxer.rx_starved = false;
    for port in 4..7 {
        muxer.push_ctrl((port, port), OP_RST, 0);
    }

    // The device uses that buffer and finds the ring empty; right then, before it moves
    // avail_event, the driver publishes two more and checks avail_event, still 2.
    let hook_mem = mem.clone();
    let staged_avail = rx.avail_addr().unchecked_add(2);
    post(&mut rx);
    post(&mut rx);
    // Staged in the ring, published by the hook.
    rx.set_avail_idx(3);
    let notified = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let notified2 = notified.clone();
    let mut fired = false;
    muxer.on_rx_empty = Some(Box::new(move || {
        if std::mem::replace(&mut fired, true) {
            return;
        }
        hook_mem.write_obj(5u16.to_le(), staged_avail).unwrap();
        let event = u16::from_le(hook_mem.read_obj(avail_event_at).unwrap());
        notified2.store(
            driver_must_notify(event, 5, 3),
            std::sync::atomic::Ordering::SeqCst,
        );
    }));
    muxer.process_rx();
    assert!(
        !notified.load(std::sync::atomic::Ordering::SeqCst),
        "the driver saw a stale avail_event and does not notify"
    );
    // Nothing will wake the worker for those two buffers: it must have used them already.
    assert_eq!(
        rx.used_idx(),
        5,
        "buffers posted while re-arming were left unused"
    );
    assert_eq!(muxer.ctrl.len(), 1);
    // And with the ring empty again, avail_event now asks for a notification on the next post.
    assert!(muxer.rx_starved);
    assert!(driver_must_notify(avail_event(&mem), 6, 5));
}
