//! Stream connections: the raw byte pipes that carry a process's stdin, stdout, stderr or
//! terminal between the host and the guest.
//!
//! The host dials the agent's stream port once per stream and writes one header line naming
//! the stream id ([`squib_agent_protocol::stream_header`]); the rest of the connection is raw
//! data. A listener thread reads the header (with a timeout, byte by byte so no payload byte is
//! consumed) and parks the connection in [`StreamRegistry`] until a create or exec request
//! claims it by id. Requests wait a bounded time for their streams, so the host may dial
//! before or right after sending the request.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, VsockAddr};

use crate::reaper::lock;

/// How long a header may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Parked connections beyond this many are refused.
const MAX_PARKED: usize = 1024;
/// A parked connection nobody claims is dropped after this long.
const PARK_LIMIT: Duration = Duration::from_secs(120);

/// Failures around stream connections.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The listening socket could not be set up.
    #[error("listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// A requested stream did not arrive in time.
    #[error("stream {id:?} was not connected within {secs} s")]
    Missing {
        /// The stream id.
        id: String,
        /// The wait.
        secs: u64,
    },
    /// A stream id is malformed.
    #[error("invalid stream id")]
    BadId(#[from] squib_agent_protocol::StreamIdError),
}

/// Where to listen.
#[derive(Debug, Clone)]
pub enum ListenAddr {
    /// vsock port on any CID.
    Vsock(u32),
    /// A Unix socket path (host tests).
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vsock(p) => write!(f, "vsock://-1:{p}"),
            Self::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A connected stream socket (vsock or Unix), read and written with plain syscalls.
#[derive(Debug)]
pub struct Conn(OwnedFd);

impl Conn {
    /// Wraps a connected socket.
    pub fn new(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// A second handle on the same socket.
    ///
    /// # Errors
    ///
    /// `dup` failed.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// Half-closes the socket in the given direction(s); errors are ignored because the peer
    /// may already be gone.
    pub fn shutdown(&self, how: nix::sys::socket::Shutdown) {
        let _ = nix::sys::socket::shutdown(self.0.as_raw_fd(), how);
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl std::io::Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match nix::unistd::read(&self.0, buf) {
                Err(Errno::EINTR) => continue,
                r => return r.map_err(std::io::Error::from),
            }
        }
    }
}

impl std::io::Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        loop {
            match nix::sys::socket::send(
                self.0.as_raw_fd(),
                buf,
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            ) {
                Err(Errno::EINTR) => continue,
                r => return r.map_err(std::io::Error::from),
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Connections waiting to be claimed, by stream id.
#[derive(Debug, Default)]
pub struct StreamRegistry {
    parked: Mutex<HashMap<String, (Conn, Instant)>>,
    arrived: Condvar,
}

impl StreamRegistry {
    /// Parks a connection under `id`, replacing an unclaimed one with the same id.
    pub fn park(&self, id: String, conn: Conn) {
        let mut p = lock(&self.parked);
        p.retain(|_, (_, at)| at.elapsed() < PARK_LIMIT);
        if p.len() >= MAX_PARKED {
            tracing::warn!(stream = %id, "too many unclaimed streams, refusing one");
            return;
        }
        p.insert(id, (conn, Instant::now()));
        self.arrived.notify_all();
    }

    /// Takes the connection for `id`, waiting up to `timeout` for it to arrive.
    ///
    /// # Errors
    ///
    /// [`StreamError::Missing`] after the timeout.
    pub fn take(&self, id: &str, timeout: Duration) -> Result<Conn, StreamError> {
        squib_agent_protocol::validate_stream_id(id)?;
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.parked);
        loop {
            if let Some((conn, _)) = p.remove(id) {
                return Ok(conn);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StreamError::Missing {
                    id: id.to_owned(),
                    secs: timeout.as_secs(),
                });
            }
            p = self
                .arrived
                .wait_timeout(p, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// Binds a listening stream socket.
///
/// # Errors
///
/// [`StreamError::Listen`].
pub fn listen(addr: &ListenAddr) -> Result<OwnedFd, StreamError> {
    let err = |source| StreamError::Listen {
        addr: addr.to_string(),
        source,
    };
    let fd = match addr {
        ListenAddr::Vsock(port) => {
            let fd = nix::sys::socket::socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(err)?;
            nix::sys::socket::bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port))
                .map_err(err)?;
            fd
        }
        ListenAddr::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let fd = nix::sys::socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(err)?;
            let ua = nix::sys::socket::UnixAddr::new(path.as_path()).map_err(err)?;
            nix::sys::socket::bind(fd.as_raw_fd(), &ua).map_err(err)?;
            fd
        }
    };
    nix::sys::socket::listen(&fd, Backlog::new(128).map_err(err)?).map_err(err)?;
    Ok(fd)
}

/// Accepts stream connections forever, parking each under the id from its header.
pub fn serve(listener: OwnedFd, registry: Arc<StreamRegistry>) {
    loop {
        let fd = match nix::sys::socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "accept on the stream port failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        let conn = Conn::new(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
        let registry = registry.clone();
        let spawned = std::thread::Builder::new()
            .name("stream-header".into())
            .spawn(move || match read_header(&conn) {
                Some(id) => registry.park(id, conn),
                None => tracing::debug!("stream connection without a valid header dropped"),
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot spawn a stream header reader");
        }
    }
}

fn read_header(conn: &Conn) -> Option<String> {
    let tv = nix::sys::time::TimeVal::new(i64::try_from(HEADER_TIMEOUT.as_secs()).unwrap_or(10), 0);
    let _ = nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::ReceiveTimeout, &tv);
    let mut line = Vec::with_capacity(64);
    let limit = squib_agent_protocol::STREAM_HEADER_KEYWORD.len()
        + 2
        + squib_agent_protocol::MAX_STREAM_ID_LEN;
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(conn, &mut byte) {
            Ok(1) => {}
            Err(Errno::EINTR) => continue,
            _ => return None,
        }
        if byte == [b'\n'] {
            break;
        }
        line.extend_from_slice(&byte);
        if line.len() > limit {
            return None;
        }
    }
    let zero = nix::sys::time::TimeVal::new(0, 0);
    let _ = nix::sys::socket::setsockopt(conn, nix::sys::socket::sockopt::ReceiveTimeout, &zero);
    let line = String::from_utf8(line).ok()?;
    squib_agent_protocol::parse_stream_header(&line).map(str::to_owned)
}
