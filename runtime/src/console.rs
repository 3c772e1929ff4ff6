//! Host ptys for detached containers whose terminal lives in the guest, and the OCI console
//! socket they are handed over.
//!
//! With `process.terminal` the process runs on a pty that the guest agent allocates in the
//! guest. A detached container has no caller terminal to attach, so the caller names a Unix
//! socket (`--console-socket`) and expects the master side of a pty on it. [`HostPty::open`]
//! allocates that pty on the host, [`HostPty::send_master`] passes its master over the socket
//! as a single message carrying one descriptor (`SCM_RIGHTS`), the protocol runc's callers
//! (containerd's shims, `recvtty`) speak, and the runtime keeps the slave.
//!
//! The host pty is put into raw mode: the guest pty's line discipline (echo, `ONLCR`, `ISIG`)
//! is the one the process sees, and the host pty passes bytes through unchanged in both
//! directions. [`PtyStream`] reads and writes the slave without blocking a thread, so that the
//! slave can be one end of the agent's terminal stream.
//!
//! Window size: the host pty starts with the container's `consoleSize`; a resize made on the
//! master changes the slave's size and, when the slave is the controlling terminal of the
//! process holding it ([`make_controlling_terminal`]), raises SIGWINCH there, where the size
//! is read back with [`window_size`] and forwarded to the guest.

use std::fs::File;
use std::io::{self, IoSlice, Read as _, Write as _};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use nix::sys::stat::Mode;
use nix::sys::termios::{self, SetArg};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The name sent along with the master: the device a pty master is opened from, as other OCI
/// runtimes send it. Receivers use the descriptor; the name is informational.
const MASTER_NAME: &str = "/dev/ptmx";

/// A failure to set up or hand over a host pty.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A new pty could not be allocated.
    #[error("allocating a pty: {step}")]
    OpenPty {
        /// The step that failed (`posix_openpt`, `grantpt`, `unlockpt`, `ptsname`, `open`).
        step: &'static str,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// The pty's terminal settings could not be read or made raw.
    #[error("making the pty raw")]
    SetRaw(#[source] Errno),
    /// The pty's window size could not be read or set.
    #[error("the pty's window size ({rows}x{cols})")]
    WindowSize {
        /// Rows asked for (0 when reading).
        rows: u16,
        /// Columns asked for (0 when reading).
        cols: u16,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// The console socket could not be connected to.
    #[error("connecting to the console socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The master could not be sent over the console socket.
    #[error("sending the pty master over the console socket {path}")]
    Send {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: Errno,
    },
    /// The pty could not become this process's controlling terminal.
    #[error("making the pty the controlling terminal")]
    ControllingTerminal(#[source] Errno),
    /// The slave could not be registered for non-blocking I/O.
    #[error("registering the pty for non-blocking I/O")]
    Register(#[source] io::Error),
}

/// A host pty: both sides, until the master is sent away.
#[derive(Debug)]
pub struct HostPty {
    master: OwnedFd,
    slave: OwnedFd,
    slave_name: String,
}

impl HostPty {
    /// Allocates a pty in raw mode with the window size `size` (rows, columns) when given.
    /// Both descriptors are close-on-exec and neither becomes a controlling terminal here.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::OpenPty`], [`ConsoleError::SetRaw`] or [`ConsoleError::WindowSize`].
    pub fn open(size: Option<(u16, u16)>) -> Result<Self, ConsoleError> {
        let step = |step: &'static str| move |source| ConsoleError::OpenPty { step, source };
        let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
            .map_err(step("posix_openpt"))?;
        nix::pty::grantpt(&master).map_err(step("grantpt"))?;
        nix::pty::unlockpt(&master).map_err(step("unlockpt"))?;
        let slave_name = nix::pty::ptsname_r(&master).map_err(step("ptsname"))?;
        let slave = nix::fcntl::open(
            slave_name.as_str(),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(step("open"))?;
        let mut attrs = termios::tcgetattr(&slave).map_err(ConsoleError::SetRaw)?;
        termios::cfmakeraw(&mut attrs);
        termios::tcsetattr(&slave, SetArg::TCSANOW, &attrs).map_err(ConsoleError::SetRaw)?;
        if let Some((rows, cols)) = size {
            set_window_size(&slave, rows, cols)?;
        }
        Ok(Self {
            master: master.into(),
            slave,
            slave_name,
        })
    }

    /// The host path of the slave (e.g. `/dev/pts/3`).
    pub fn slave_name(&self) -> &str {
        &self.slave_name
    }

    /// Connects to the console socket at `path`, sends the master there as one message with
    /// one `SCM_RIGHTS` descriptor, closes this process's copy of the master and returns the
    /// slave. The message is queued on the socket: the receiver may accept it later.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::Connect`] or [`ConsoleError::Send`]; the pty is closed.
    pub fn send_master(self, path: &Path) -> Result<OwnedFd, ConsoleError> {
        let socket = UnixStream::connect(path).map_err(|source| ConsoleError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let fds = [self.master.as_raw_fd()];
        let payload = [IoSlice::new(MASTER_NAME.as_bytes())];
        let sent = sendmsg::<()>(
            socket.as_raw_fd(),
            &payload,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        );
        match sent {
            Ok(n) if n == MASTER_NAME.len() => Ok(self.slave),
            // A stream socket may take part of the payload; the descriptor went with the first
            // byte, but a receiver reading the name would see it cut short.
            Ok(_) => Err(ConsoleError::Send {
                path: path.to_path_buf(),
                source: Errno::EMSGSIZE,
            }),
            Err(source) => Err(ConsoleError::Send {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

/// The window-size ioctls, kept private: the functions the macros generate are unsafe.
mod ioctl {
    nix::ioctl_read_bad!(get_winsize, nix::libc::TIOCGWINSZ, nix::libc::winsize);
    nix::ioctl_write_ptr_bad!(set_winsize, nix::libc::TIOCSWINSZ, nix::libc::winsize);
}

/// The window size of the terminal `fd` as (rows, columns).
///
/// # Errors
///
/// [`ConsoleError::WindowSize`] when `fd` is not a terminal.
pub fn window_size(fd: &impl AsFd) -> Result<(u16, u16), ConsoleError> {
    let mut ws = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at a live,
    // aligned local; the descriptor is borrowed open for the call, and a descriptor that is not
    // a terminal only makes the call fail.
    unsafe { ioctl::get_winsize(fd.as_fd().as_raw_fd(), &raw mut ws) }.map_err(|source| {
        ConsoleError::WindowSize {
            rows: 0,
            cols: 0,
            source,
        }
    })?;
    Ok((ws.ws_row, ws.ws_col))
}

/// Sets the window size of the terminal `fd`.
///
/// # Errors
///
/// [`ConsoleError::WindowSize`] when `fd` is not a terminal.
pub fn set_window_size(fd: &impl AsFd, rows: u16, cols: u16) -> Result<(), ConsoleError> {
    let ws = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` through the pointer, which points at a live,
    // aligned local; the descriptor is borrowed open for the call.
    unsafe { ioctl::set_winsize(fd.as_fd().as_raw_fd(), &raw const ws) }
        .map(drop)
        .map_err(|source| ConsoleError::WindowSize { rows, cols, source })
}

/// Makes the terminal `fd` the controlling terminal of this process, which must lead a
/// session without one (after `setsid`). The session's process group becomes the terminal's
/// foreground group, so a resize on the master raises SIGWINCH in this process, and closing
/// the master raises SIGHUP (handle or ignore it).
///
/// # Errors
///
/// [`ConsoleError::ControllingTerminal`], e.g. EPERM when not a session leader, EIO when the
/// master is already closed.
pub fn make_controlling_terminal(fd: &impl AsFd) -> Result<(), ConsoleError> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal a terminal another session
    // controls) and no pointer; the descriptor is borrowed open for the call.
    let rc = unsafe { nix::libc::ioctl(fd.as_fd().as_raw_fd(), nix::libc::TIOCSCTTY, 0) };
    if rc < 0 {
        return Err(ConsoleError::ControllingTerminal(Errno::last()));
    }
    Ok(())
}

/// Non-blocking reads and writes on one side of a pty, for tokio.
///
/// A pty whose other side is gone reports EIO (or end of file after a hangup): reads then end
/// with end of file, and writes are discarded, as output to a terminal nobody reads any more,
/// so that a copy into it does not fail the process whose output it carries.
#[derive(Debug)]
pub struct PtyStream {
    fd: AsyncFd<File>,
}

impl PtyStream {
    /// Takes `fd` (a pty side), makes it non-blocking and registers it with the current tokio
    /// runtime.
    ///
    /// # Errors
    ///
    /// [`ConsoleError::Register`]; must be called within a tokio runtime.
    pub fn new(fd: OwnedFd) -> Result<Self, ConsoleError> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| ConsoleError::Register(e.into()))?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| ConsoleError::Register(e.into()))?;
        // SAFETY: a `File` owns its descriptor: it stays open and names the same open file
        // description until the `File` is dropped, which only happens with the `AsyncFd`
        // (nothing here takes the `File` back out), and `as_raw_fd` always returns it.
        let fd = unsafe { AsyncFd::register(File::from(fd)) }
            .map_err(|e| ConsoleError::Register(e.into()))?;
        Ok(Self { fd })
    }
}

fn is_hangup(e: &io::Error) -> bool {
    e.raw_os_error() == Some(nix::libc::EIO)
}

impl AsyncRead for PtyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if is_hangup(&e) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for PtyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(buf)) {
                Ok(Err(e)) if is_hangup(&e) => return Poll::Ready(Ok(buf.len())),
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A terminal has no half-close; the descriptor closes when the stream is dropped.
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn receive_fd(listener: &UnixListener) -> (OwnedFd, Vec<u8>) {
        use nix::sys::socket::{ControlMessageOwned, recvmsg};
        use std::io::IoSliceMut;
        use std::os::fd::FromRawFd;
        let (conn, _) = listener.accept().unwrap();
        let mut name = [0u8; 4096];
        let mut iov = [IoSliceMut::new(&mut name)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .unwrap();
        let n = msg.bytes;
        let mut fds = Vec::new();
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        assert_eq!(fds.len(), 1, "one descriptor per message");
        // SAFETY: the descriptor was just received and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
        (fd, name[..n].to_vec())
    }

    fn socket_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("squib-console-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn test_host_pty_sends_a_raw_master_with_the_console_size() {
        let d = socket_dir("send");
        let path = d.join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = HostPty::open(Some((40, 120))).unwrap();
        assert!(pty.slave_name().starts_with("/dev/pts/"));
        // Sent before the receiver accepts, as `create` does before its caller reads.
        let slave = pty.send_master(&path).unwrap();
        let (master, name) = receive_fd(&listener);
        assert_eq!(name, MASTER_NAME.as_bytes());
        assert_eq!(window_size(&master).unwrap(), (40, 120));
        // Raw: a newline written on the master arrives as is, and nothing is echoed back.
        let mut m = File::from(master);
        m.write_all(b"a\r\n").unwrap();
        let mut got = [0u8; 3];
        File::from(slave.try_clone().unwrap())
            .read_exact(&mut got)
            .unwrap();
        assert_eq!(&got, b"a\r\n");
        // A resize on the master is what the slave reads back.
        set_window_size(&m, 50, 200).unwrap();
        assert_eq!(window_size(&slave).unwrap(), (50, 200));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_send_master_names_a_missing_socket() {
        let d = socket_dir("missing");
        let path = d.join("nobody.sock");
        let err = HostPty::open(None).unwrap().send_master(&path).unwrap_err();
        assert!(
            matches!(&err, ConsoleError::Connect { path: p, .. } if *p == path),
            "{err}"
        );
        assert!(err.to_string().contains("nobody.sock"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn test_pty_stream_copies_and_ends_at_hangup() {
        let pty = HostPty::open(None).unwrap();
        let HostPty { master, slave, .. } = pty;
        let mut stream = PtyStream::new(slave).unwrap();
        let mut m = File::from(master);
        m.write_all(b"in").unwrap();
        let mut got = [0u8; 2];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"in");
        stream.write_all(b"out").await.unwrap();
        let mut got = [0u8; 3];
        m.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out");
        drop(m);
        // The master is gone: reads end, writes are swallowed.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        stream.write_all(b"lost").await.unwrap();
    }
}
