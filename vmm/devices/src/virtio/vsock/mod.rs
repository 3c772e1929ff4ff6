//! virtio-vsock (virtio 1.2, section 5.10) with the hybrid Unix-socket host side.
//!
//! The guest gets a context id (3 or more) and three queues: rx (host to guest packets), tx
//! (guest to host) and event. The host side is one listening Unix socket at `uds_path`:
//!
//! - a host process connects to it and writes `CONNECT <port>\n`; the device sends the guest a
//!   REQUEST for that port and, once the guest answers RESPONSE, writes `OK <host port>\n` back
//!   (a RST from the guest, or no answer in time, closes the host connection instead);
//! - a guest connecting to host port P is connected to the Unix socket `<uds_path>_<P>`, or
//!   gets a RST when nothing listens there.
//!
//! Then bytes flow both ways under virtio-vsock credit flow control: the device advertises
//! [`CONN_BUF_BYTES`] per connection, buffers guest data the host peer is too slow to take up to
//! that much, and never sends the guest more than its advertised credit. Host sockets are
//! non-blocking; the `muxer` worker waits on all of them with `poll(2)`.
//!
//! Known limitation: stream sockets only (no `VIRTIO_VSOCK_F_SEQPACKET`), and the event queue is
//! never used, so a guest is not told about a transport reset (it matters once snapshots
//! restore a VM with open connections).

mod muxer;
pub mod packet;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::worker::Worker;
use super::{
    ActivateContext, ActivateError, COMMON_FEATURES, DEVICE_TYPE_VSOCK, VirtioDevice,
    read_config_bytes,
};

/// Size of each of the three queues.
const QUEUE_SIZE: u16 = 256;
/// Receive buffer space the device advertises for each connection (guest to host direction).
pub const CONN_BUF_BYTES: u32 = 256 * 1024;
const NAME: &str = "vsock";

/// A failure to set up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest context id is reserved (0, 1 and 2 are; so is `u32::MAX`).
    #[error("guest_cid {cid} is reserved: use 3 or more")]
    ReservedCid {
        /// The rejected context id.
        cid: u64,
    },
    /// The host socket cannot be created.
    #[error("binding vsock unix socket {path} failed")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The host end of the vsock device: the listening socket, removed from the file system when
/// the device is dropped.
#[derive(Debug)]
struct HostSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for HostSocket {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path)
            && error.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %error, "removing the vsock socket failed");
        }
    }
}

/// A virtio socket device.
#[derive(Debug)]
pub struct Vsock {
    guest_cid: u64,
    host: Arc<HostSocket>,
    worker: Option<Worker>,
}

impl Vsock {
    /// Creates the device for guest context id `guest_cid`, listening at `uds_path` (which must
    /// not exist yet).
    ///
    /// # Errors
    ///
    /// [`VsockError::ReservedCid`] for a context id below 3; [`VsockError::Bind`] when the
    /// socket cannot be bound (e.g. the path exists).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::ReservedCid { cid: guest_cid });
        }
        let bind = |source| VsockError::Bind {
            path: uds_path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(uds_path).map_err(bind)?;
        // From here on the file is ours: HostSocket removes it on every exit path.
        let host = HostSocket {
            listener,
            path: uds_path.to_owned(),
        };
        host.listener.set_nonblocking(true).map_err(bind)?;
        Ok(Self {
            guest_cid,
            host: Arc::new(host),
            worker: None,
        })
    }

    /// The guest context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The path of the listening host socket.
    pub fn uds_path(&self) -> &Path {
        &self.host.path
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // virtio 1.2, 5.10.4: a single le64 guest_cid.
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let muxer = muxer::Muxer::new(ctx, self.guest_cid, self.host.clone())?;
        let worker =
            Worker::spawn("virtio-vsock", move |stop| muxer.run(&stop)).map_err(|source| {
                ActivateError::SpawnWorker {
                    device: NAME,
                    source,
                }
            })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Stopping the worker drops every connection and closes its host socket.
        self.worker = None;
    }
}
