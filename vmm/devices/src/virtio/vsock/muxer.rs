//! The vsock worker: moves packets between the guest's queues and host Unix sockets.
//!
//! State lives in one thread: the listening socket, host connections still sending their
//! `CONNECT` line, and established connections keyed by (host port, guest port). Control
//! packets for the guest wait in a queue until the guest posts rx buffers; payload is read from
//! host sockets straight into rx buffers, and written from tx buffers straight to host sockets,
//! with only the part a slow host peer cannot take yet copied into a per-connection buffer
//! bounded by the credit we advertised.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};
use vm_memory::GuestMemoryMmap;

use super::packet::{
    HDR_LEN, HOST_CID, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{CONN_BUF_BYTES, HostSocket, NAME, QUEUE_SIZE};
use crate::WakeEvent;
use crate::virtio::chain::{Chain, read_into, send_bytes, send_from};
use crate::virtio::worker::{DeviceQueue, Popped, poll_fds};
use crate::virtio::{
    ActivateContext, ActivateError, LogLimiter, VIRTIO_RING_F_EVENT_IDX, guest_warn,
};

/// Largest payload per packet in either direction.
const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// How long a host peer may take to send its `CONNECT` line, and the guest to answer a REQUEST.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// At most this many host connections may be waiting for their handshake.
const MAX_PENDING: usize = 64;
/// First host-side port handed out for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated; REQUEST sent, waiting for the guest's RESPONSE.
    AwaitResponse(Instant),
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// Guest data not yet taken by the host peer.
    pending: VecDeque<u8>,
    /// Bytes received from the guest, ever.
    rx_cnt: Wrapping<u32>,
    /// Bytes handed to the host peer, ever (our receive-buffer consumption).
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Host bytes read together with the CONNECT line, delivered before anything else.
    prefix: Vec<u8>,
    /// Bytes sent to the guest, ever.
    tx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The host peer closed its sending side; SHUTDOWN sent to the guest.
    host_eof: bool,
    /// The guest will send nothing more.
    guest_shut_send: bool,
    /// The guest will read nothing more.
    guest_shut_rcv: bool,
    /// `shutdown(Write)` done on the host socket.
    host_write_shut: bool,
    credit_update_queued: bool,
    credit_request_sent: bool,
}

impl Conn {
    fn new(stream: UnixStream, state: State, hdr: Option<&Header>) -> Self {
        let mut c = Self {
            stream,
            state,
            pending: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            prefix: Vec::new(),
            tx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            host_eof: false,
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            credit_update_queued: false,
            credit_request_sent: false,
        };
        if let Some(h) = hdr {
            c.update_peer_credit(h);
        }
        c
    }

    fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        self.credit_request_sent = false;
    }

    /// Bytes the guest can still take on this connection.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Both directions are over and nothing is left to flush: the connection can go.
    fn finished(&self) -> bool {
        self.pending.is_empty() && self.guest_shut_send && (self.host_eof || self.guest_shut_rcv)
    }
}

struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Ctrl {
    key: Key,
    op: u16,
    flags: u32,
}

#[derive(Clone, Copy)]
enum Target {
    Stop,
    RxNotify,
    TxNotify,
    EvNotify,
    Listener,
    Pending(usize),
    Conn(Key),
}

/// The vsock device's worker state.
pub(super) struct Muxer {
    mem: GuestMemoryMmap,
    rxq: DeviceQueue,
    txq: DeviceQueue,
    evq: DeviceQueue,
    guest_cid: u64,
    host: Arc<HostSocket>,
    pending: Vec<PendingHost>,
    conns: HashMap<Key, Conn>,
    ctrl: VecDeque<Ctrl>,
    next_local_port: u32,
    rx_starved: bool,
    limiter: LogLimiter,
    /// Runs each time a pop finds the rx ring empty: lets tests act as a driver that publishes
    /// buffers at exactly that moment.
    #[cfg(test)]
    on_rx_empty: Option<Box<dyn FnMut() + Send>>,
}

impl Muxer {
    pub(super) fn new(
        ctx: ActivateContext,
        guest_cid: u64,
        host: Arc<HostSocket>,
    ) -> Result<Self, ActivateError> {
        let actual = ctx.queues.len();
        let event_idx = ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx), Some(ev), None) =
            (queues.next(), queues.next(), queues.next(), queues.next())
        else {
            return Err(ActivateError::QueueCount {
                device: NAME,
                expected: 3,
                actual,
            });
        };
        let max = u32::from(QUEUE_SIZE);
        Ok(Self {
            mem: ctx.mem,
            rxq: DeviceQueue::new(rx, ctx.irq.clone(), event_idx, max, NAME),
            txq: DeviceQueue::new(tx, ctx.irq.clone(), event_idx, max, NAME),
            evq: DeviceQueue::new(ev, ctx.irq, event_idx, max, NAME),
            guest_cid,
            host,
            pending: Vec::new(),
            conns: HashMap::new(),
            ctrl: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_starved: false,
            limiter: LogLimiter::new(Duration::from_secs(5)),
            #[cfg(test)]
            on_rx_empty: None,
        })
    }

    pub(super) fn run(mut self, stop: &Arc<WakeEvent>) {
        self.process_tx();
        self.process_rx();
        loop {
            let ready = match self.wait(stop) {
                Ok(ready) => ready,
                Err(error) => {
                    tracing::error!(device = NAME, %error, "poll failed, worker stops");
                    return;
                }
            };
            let mut accept = false;
            let mut pending_ready = Vec::new();
            for (target, revents) in ready {
                match target {
                    Target::Stop => return,
                    Target::RxNotify => {
                        let _ = self.rxq.notify.drain();
                        self.rx_starved = false;
                    }
                    Target::TxNotify => {
                        let _ = self.txq.notify.drain();
                        self.process_tx();
                    }
                    Target::EvNotify => {
                        // The event queue only carries device-to-driver transport resets,
                        // which this device never sends; buffers just stay posted.
                        let _ = self.evq.notify.drain();
                    }
                    Target::Listener => accept = true,
                    Target::Pending(i) => pending_ready.push(i),
                    Target::Conn(key) => {
                        // Readable sockets are served by `process_rx` below, which tries every
                        // connection that may send.
                        if revents.intersects(
                            PollFlags::POLLOUT | PollFlags::POLLHUP | PollFlags::POLLERR,
                        ) {
                            self.flush(key);
                        }
                    }
                }
            }
            if accept {
                self.accept();
            }
            self.read_connect_lines(&pending_ready);
            self.expire();
            self.process_rx();
        }
    }

    /// Polls everything the worker waits on; returns what is ready.
    fn wait(&self, stop: &WakeEvent) -> io::Result<Vec<(Target, PollFlags)>> {
        let mut targets = vec![
            Target::Stop,
            Target::RxNotify,
            Target::TxNotify,
            Target::EvNotify,
            Target::Listener,
        ];
        let mut fds = vec![
            PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.rxq.notify.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.txq.notify.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.evq.notify.as_fd(), PollFlags::POLLIN),
        ];
        if self.pending.len() < MAX_PENDING {
            fds.push(PollFd::new(self.host.listener.as_fd(), PollFlags::POLLIN));
        } else {
            targets.pop();
        }
        for (i, p) in self.pending.iter().enumerate() {
            targets.push(Target::Pending(i));
            fds.push(PollFd::new(p.stream.as_fd(), PollFlags::POLLIN));
        }
        let mut timeout = None;
        for (key, c) in &self.conns {
            let mut ev = PollFlags::empty();
            if c.wants_read() && !self.rx_starved {
                ev |= PollFlags::POLLIN;
            }
            if !c.pending.is_empty() {
                ev |= PollFlags::POLLOUT;
            }
            if let State::AwaitResponse(_) = c.state {
                timeout = Some(Duration::from_millis(500));
            }
            if !ev.is_empty() {
                targets.push(Target::Conn(*key));
                fds.push(PollFd::new(c.stream.as_fd(), ev));
            }
        }
        if !self.pending.is_empty() {
            timeout = Some(Duration::from_millis(500));
        }
        poll_fds(&mut fds, timeout)?;
        Ok(targets
            .into_iter()
            .zip(fds.iter())
            .filter_map(|(t, fd)| fd.revents().filter(|r| !r.is_empty()).map(|r| (t, r)))
            .collect())
    }

    fn accept(&mut self) {
        while self.pending.len() < MAX_PENDING {
            match self.host.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(error) = stream
                        .set_nonblocking(true)
                        .and_then(|()| no_sigpipe(&stream))
                    {
                        tracing::warn!(device = NAME, %error, "host vsock connection unusable");
                        continue;
                    }
                    self.pending.push(PendingHost {
                        stream,
                        line: Vec::new(),
                        since: Instant::now(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(
                        device = NAME,
                        %error,
                        "accepting a host vsock connection failed"
                    );
                    return;
                }
            }
        }
    }

    fn read_connect_lines(&mut self, ready: &[usize]) {
        let mut done: Vec<(usize, Option<u32>)> = Vec::new();
        for &i in ready {
            let Some(p) = self.pending.get_mut(i) else {
                continue;
            };
            let mut buf = [0u8; 64];
            match p.stream.read(&mut buf) {
                Ok(0) => done.push((i, None)),
                Ok(n) => {
                    p.line.extend_from_slice(buf.get(..n).unwrap_or_default());
                    if let Some(nl) = p.line.iter().position(|&b| b == b'\n') {
                        done.push((i, parse_connect(p.line.get(..nl).unwrap_or_default())));
                    } else if p.line.len() > MAX_CONNECT_LINE {
                        done.push((i, None));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => done.push((i, None)),
            }
        }
        // Remove from the back so earlier indices stay valid.
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, port) in done {
            if i >= self.pending.len() {
                continue;
            }
            let p = self.pending.swap_remove(i);
            match port {
                Some(port) => self.start_host_connection(p, port),
                None => {
                    tracing::debug!(
                        device = NAME,
                        "host vsock connection sent no valid CONNECT line"
                    );
                }
            }
        }
    }

    fn start_host_connection(&mut self, p: PendingHost, peer_port: u32) {
        let local_port = self.alloc_local_port(peer_port);
        let key = (local_port, peer_port);
        let mut conn = Conn::new(p.stream, State::AwaitResponse(Instant::now()), None);
        // Whatever followed the newline is the start of the host's data.
        if let Some(nl) = p.line.iter().position(|&b| b == b'\n') {
            conn.prefix = p.line.get(nl + 1..).unwrap_or_default().to_vec();
        }
        self.conns.insert(key, conn);
        self.push_ctrl(key, OP_REQUEST, 0);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.pending
            .retain(|p| now.duration_since(p.since) < HANDSHAKE_TIMEOUT);
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter_map(|(k, c)| match c.state {
                State::AwaitResponse(since) if now.duration_since(since) >= HANDSHAKE_TIMEOUT => {
                    Some(*k)
                }
                _ => None,
            })
            .collect();
        for key in expired {
            tracing::debug!(
                device = NAME,
                port = key.1,
                "guest did not answer a vsock connection request"
            );
            self.reset_conn(key);
        }
    }

    fn push_ctrl(&mut self, key: Key, op: u16, flags: u32) {
        self.ctrl.push_back(Ctrl { key, op, flags });
    }

    /// Drops a connection (closing its host socket) and tells the guest with a RST.
    fn reset_conn(&mut self, key: Key) {
        self.conns.remove(&key);
        self.push_ctrl(key, OP_RST, 0);
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt.0);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_BYTES,
            fwd_cnt,
        }
    }

    fn process_tx(&mut self) {
        loop {
            self.txq.disable_notification(&self.mem);
            while let Some(popped) = self.txq.pop(&self.mem) {
                let head = match popped {
                    Popped::Chain(chain) => {
                        self.handle_tx(&chain);
                        chain.head
                    }
                    Popped::Bad { head, .. } => head,
                };
                self.txq.add_used(&self.mem, head, 0);
            }
            if !self.txq.enable_notification(&self.mem) {
                break;
            }
        }
        self.txq.signal_used(&self.mem);
    }

    fn handle_tx(&mut self, chain: &Chain) {
        let mut raw = [0u8; HDR_LEN as usize];
        if chain.readable.read_bytes(&self.mem, 0, &mut raw) != raw.len() {
            guest_warn!(
                self.limiter,
                device = NAME,
                "tx packet shorter than its header"
            );
            return;
        }
        let hdr = Header::parse(&raw);
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            guest_warn!(
                self.limiter,
                device = NAME,
                src_cid = hdr.src_cid,
                dst_cid = hdr.dst_cid,
                "tx packet with foreign addresses dropped"
            );
            return;
        }
        let payload_room = chain.readable.len().saturating_sub(HDR_LEN);
        if hdr.kind != TYPE_STREAM || hdr.len > payload_room || hdr.len > MAX_PKT_PAYLOAD {
            guest_warn!(
                self.limiter,
                device = NAME,
                kind = hdr.kind,
                len = hdr.len,
                "malformed tx packet"
            );
            if hdr.op != OP_RST {
                self.reset_conn(key);
            }
            return;
        }
        if hdr.op == OP_REQUEST {
            self.guest_connect(key, &hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.push_ctrl(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(&hdr);
        match hdr.op {
            OP_RESPONSE => self.guest_accepted(key),
            OP_RST => {
                self.conns.remove(&key);
            }
            OP_SHUTDOWN => {
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.guest_shut_send = true;
                }
                if hdr.flags & SHUTDOWN_RCV != 0 {
                    conn.guest_shut_rcv = true;
                }
                self.after_progress(key);
            }
            OP_RW => self.guest_data(key, chain, hdr.len),
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_credit_update(key),
            op => {
                guest_warn!(self.limiter, device = NAME, op, "unknown vsock operation");
                self.reset_conn(key);
            }
        }
    }

    /// A guest connects to host port `key.0`: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: Key, hdr: &Header) {
        if self.conns.contains_key(&key) {
            self.reset_conn(key);
            return;
        }
        let mut path = self.host.path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        let path = PathBuf::from(path);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                self.conns
                    .insert(key, Conn::new(stream, State::Established, Some(hdr)));
                self.push_ctrl(key, OP_RESPONSE, 0);
            }
            Err(error) => {
                tracing::debug!(
                    device = NAME,
                    path = %path.display(),
                    %error,
                    "guest vsock connection refused"
                );
                self.push_ctrl(key, OP_RST, 0);
            }
        }
    }

    /// The guest accepted a host-initiated connection: tell the host process.
    fn guest_accepted(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state == State::Established {
            // A RESPONSE on an open connection is a protocol error (virtio 1.2, 5.10.6.4).
            self.reset_conn(key);
            return;
        }
        conn.state = State::Established;
        let line = format!("OK {}\n", key.0);
        match send_bytes(conn.stream.as_raw_fd(), line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            _ => self.reset_conn(key),
        }
    }

    fn guest_data(&mut self, key: Key, chain: &Chain, len: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.state != State::Established || conn.guest_shut_send {
            self.reset_conn(key);
            return;
        }
        let buffered = (conn.rx_cnt - conn.fwd_cnt).0;
        if buffered.saturating_add(len) > CONN_BUF_BYTES {
            guest_warn!(
                self.limiter,
                device = NAME,
                port = key.0,
                len,
                buffered,
                "guest exceeded its vsock credit"
            );
            self.reset_conn(key);
            return;
        }
        conn.rx_cnt += Wrapping(len);
        let mut sent = 0usize;
        if conn.pending.is_empty() && !conn.host_write_shut {
            let fd = conn.stream.as_raw_fd();
            match chain
                .readable
                .for_each_slice(&self.mem, HDR_LEN, len, |s| send_from(fd, s))
            {
                Ok(n) => sent = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
        let sent32 = u32::try_from(sent).unwrap_or(len);
        conn.fwd_cnt += Wrapping(sent32);
        if sent32 < len {
            let mut rest = vec![0u8; (len - sent32) as usize];
            let got = chain
                .readable
                .read_bytes(&self.mem, HDR_LEN + sent32, &mut rest);
            rest.truncate(got);
            conn.pending.extend(rest);
        }
        self.maybe_credit_update(key);
    }

    /// Writes buffered guest data to the host peer.
    fn flush(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fd = conn.stream.as_raw_fd();
        while !conn.pending.is_empty() {
            let (front, _) = conn.pending.as_slices();
            match send_bytes(fd, front) {
                Ok(0) => break,
                Ok(n) => {
                    conn.pending.drain(..n);
                    conn.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.reset_conn(key);
                    return;
                }
            }
        }
        self.maybe_credit_update(key);
        self.after_progress(key);
    }

    /// Applies shutdowns whose buffered data is gone, and retires finished connections.
    fn after_progress(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.guest_shut_send && conn.pending.is_empty() && !conn.host_write_shut {
            conn.host_write_shut = true;
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        if conn.finished() {
            self.reset_conn(key);
        }
    }

    fn maybe_credit_update(&mut self, key: Key) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        // Tell the guest about freed space once half the window was consumed, so a bulk sender
        // always has credit left while the update travels.
        if (conn.fwd_cnt - conn.fwd_cnt_sent).0 >= CONN_BUF_BYTES / 2 {
            self.queue_credit_update(key);
        }
    }

    fn queue_credit_update(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key)
            && !conn.credit_update_queued
        {
            conn.credit_update_queued = true;
            self.push_ctrl(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// Fills rx buffers: control packets first, then data from readable host sockets.
    ///
    /// Returns with either nothing left to send or the rx queue empty and its notification
    /// re-armed, so that the driver's next refill wakes the worker.
    fn process_rx(&mut self) {
        if self.rx_starved {
            return;
        }
        loop {
            self.fill_rx();
            if !self.rx_starved || !self.rxq.enable_notification(&self.mem) {
                break;
            }
            // The driver published buffers after the pop that found the ring empty but before
            // avail_event moved. With VIRTIO_RING_F_EVENT_IDX it decided whether to notify from
            // the old avail_event (virtio 1.2, 2.7.10), so no notification may ever come for
            // them: use them now. Leaving them for a later wake-up stalls control packets (a
            // credit update, a connection request) until some unrelated event happens.
            self.rx_starved = false;
        }
        self.rxq.signal_used(&self.mem);
    }

    /// One pass of [`Muxer::process_rx`] without re-arming the notification.
    fn fill_rx(&mut self) {
        self.send_ctrl();
        if self.rx_starved {
            return;
        }
        let keys: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.wants_read())
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            if self.rx_starved {
                break;
            }
            self.send_data(key);
        }
        // Data reads may have queued SHUTDOWNs or RSTs.
        self.send_ctrl();
    }

    /// Pops an rx chain, or marks the queue starved.
    fn pop_rx(&mut self) -> Option<Chain> {
        loop {
            match self.rxq.pop(&self.mem) {
                Some(Popped::Chain(chain)) => return Some(chain),
                Some(Popped::Bad { head, .. }) => self.rxq.add_used(&self.mem, head, 0),
                None => {
                    #[cfg(test)]
                    if let Some(hook) = self.on_rx_empty.as_mut() {
                        hook();
                    }
                    self.rx_starved = true;
                    return None;
                }
            }
        }
    }

    fn send_ctrl(&mut self) {
        while let Some(ctrl) = self.ctrl.front().copied() {
            let Some(chain) = self.pop_rx() else {
                return;
            };
            self.ctrl.pop_front();
            let hdr = self.header(ctrl.key, ctrl.op, ctrl.flags, 0);
            if let Some(conn) = self.conns.get_mut(&ctrl.key) {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                if ctrl.op == OP_CREDIT_UPDATE {
                    conn.credit_update_queued = false;
                }
            }
            let used = self.write_header(&chain, &hdr);
            self.rxq.add_used(&self.mem, chain.head, used);
        }
    }

    fn write_header(&mut self, chain: &Chain, hdr: &Header) -> u32 {
        let bytes = hdr.to_bytes();
        if chain.writable.write_bytes(&self.mem, 0, &bytes) != bytes.len() {
            guest_warn!(
                self.limiter,
                device = NAME,
                len = chain.writable.len(),
                "rx buffer too small for a header"
            );
            return 0;
        }
        HDR_LEN
    }

    /// Moves host bytes of one connection into rx buffers while credit and buffers last.
    fn send_data(&mut self, key: Key) {
        loop {
            let Some(conn) = self.conns.get(&key) else {
                return;
            };
            if !conn.wants_read() {
                if conn.peer_credit() == 0 && !conn.credit_request_sent && !conn.host_eof {
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.credit_request_sent = true;
                    }
                    self.push_ctrl(key, OP_CREDIT_REQUEST, 0);
                }
                return;
            }
            let credit = conn.peer_credit();
            let Some(chain) = self.pop_rx() else {
                return;
            };
            let room = chain.writable.len().saturating_sub(HDR_LEN);
            let cap = room.min(credit).min(MAX_PKT_PAYLOAD);
            if cap == 0 {
                // Too small to carry data: hand it back empty rather than spin on it.
                guest_warn!(
                    self.limiter,
                    device = NAME,
                    len = chain.writable.len(),
                    "rx buffer too small for data"
                );
                self.rxq.add_used(&self.mem, chain.head, 0);
                continue;
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            let result = if conn.prefix.is_empty() {
                let fd = conn.stream.as_raw_fd();
                chain
                    .writable
                    .for_each_slice(&self.mem, HDR_LEN, cap, |s| read_into(fd, s))
            } else {
                let take = conn.prefix.len().min(cap as usize);
                let part: Vec<u8> = conn.prefix.drain(..take).collect();
                Ok(chain.writable.write_bytes(&self.mem, HDR_LEN, &part))
            };
            match result {
                Ok(0) => {
                    self.rxq.undo_pop();
                    conn.host_eof = true;
                    // A peer that closed its socket (hang-up) takes no more data either; one that
                    // only shut its sending side down may still read the guest's answer.
                    let flags = if peer_hung_up(&conn.stream) {
                        SHUTDOWN_SEND | SHUTDOWN_RCV
                    } else {
                        SHUTDOWN_SEND
                    };
                    self.push_ctrl(key, OP_SHUTDOWN, flags);
                    self.after_progress(key);
                    return;
                }
                Ok(n) => {
                    let n = u32::try_from(n).unwrap_or(0);
                    conn.tx_cnt += Wrapping(n);
                    conn.fwd_cnt_sent = conn.fwd_cnt;
                    let hdr = self.header(key, OP_RW, 0, n);
                    let used = self.write_header(&chain, &hdr);
                    let used = if used == 0 { 0 } else { HDR_LEN + n };
                    self.rxq.add_used(&self.mem, chain.head, used);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rxq.undo_pop();
                    return;
                }
                Err(_) => {
                    self.rxq.undo_pop();
                    self.reset_conn(key);
                    return;
                }
            }
        }
    }
}

/// Whether the host peer closed its end entirely (poll reports a hang-up), as opposed to only
/// shutting down its sending side.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok()
        && fds
            .first()
            .and_then(PollFd::revents)
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Connects to a host listener without ever blocking the worker: a listener whose backlog is
/// full refuses (`EAGAIN`) instead of making us wait.
fn connect_nonblocking(path: &std::path::Path) -> io::Result<UnixStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )?;
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    nix::fcntl::fcntl(
        &stream,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    no_sigpipe(&stream)?;
    let addr = UnixAddr::new(path)?;
    connect(stream.as_raw_fd(), &addr)?;
    Ok(stream)
}

/// Linux suppresses `SIGPIPE` per send (`MSG_NOSIGNAL`); other hosts need it per socket.
#[cfg(target_os = "linux")]
fn no_sigpipe(_stream: &UnixStream) -> io::Result<()> {
    Ok(())
}

/// Linux suppresses `SIGPIPE` per send (`MSG_NOSIGNAL`); other hosts need it per socket.
#[cfg(not(target_os = "linux"))]
fn no_sigpipe(stream: &UnixStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is an open socket owned by `stream`; the option value points to a live
    // c_int whose size is passed alongside.
    let ret = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NOSIGPIPE,
            std::ptr::from_ref(&one).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Parses `CONNECT <port>` (either case) into the port.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let (verb, port) = line.split_once(' ')?;
    if !verb.eq_ignore_ascii_case("connect") {
        return None;
    }
    port.trim().parse().ok()
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test values are small")]
mod tests;
