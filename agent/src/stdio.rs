//! Copying between a process's standard streams and its stream connections, with exact end
//! of file in both directions.
//!
//! - Output (stdout, stderr, pty output): a thread reads the pipe (or pty master) until end of
//!   file and writes everything to the connection, then half-closes and closes it. The
//!   process's [`Drain`] counts these threads; `WaitProcess` answers only once the count is
//!   zero, i.e. every byte has been handed to the vsock connection before the exit status.
//!   If the process exited but some other process (a daemonised grandchild) keeps the pipe
//!   open, the copy stops after [`IDLE_AFTER_EXIT`] without data, like runc's shim.
//! - Input: a thread copies the connection into the process's stdin pipe (or the pty master).
//!   Input ends when the host closes the connection, or when `CloseStdin` said how many bytes
//!   the host wrote in total and that many have been delivered; then the pipe is closed (for
//!   a pty the terminal's EOF character is written instead).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::reaper::lock;
use crate::streams::{Conn, StreamError, StreamRegistry};

/// After the process exited, an output pipe idle this long is considered abandoned.
pub const IDLE_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a request waits for its stream connections.
pub const STREAM_WAIT: Duration = Duration::from_secs(10);
const BUF_LEN: usize = 64 * 1024;
/// An output stream is read in pieces of up to this size: each write to the vsock connection
/// becomes as few full-size packets, queue notifications and interrupts as the data allows,
/// and each of those is a VM exit.
const OUT_BUF_LEN: usize = 256 * 1024;
/// Capacity asked for a process's output pipes (Linux's default is 64 KiB): a writer that
/// runs ahead of the copy thread blocks less often, and the copy finds more to send at once.
/// 1 MiB is the most an unprivileged process may ask for; the pages are allocated as data
/// arrives, so an idle pipe costs nothing more.
const OUT_PIPE_BYTES: i32 = 1 << 20;

/// Failures preparing a process's standard streams.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// A stream connection is missing or malformed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A pipe or /dev/null could not be opened.
    #[error("create {what}")]
    Setup {
        /// What was being created.
        what: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// A terminal process named non-terminal streams, or the other way round.
    #[error("stdio: {0}")]
    Mismatch(&'static str),
}

/// Sets a tty's window size (the kernel sends SIGWINCH to its foreground process group).
///
/// # Errors
///
/// The ioctl's errno.
pub fn set_window_size(fd: &impl AsFd, rows: u32, cols: u32) -> Result<(), Errno> {
    let ws = libc::winsize {
        ws_row: u16::try_from(rows).unwrap_or(u16::MAX),
        ws_col: u16::try_from(cols).unwrap_or(u16::MAX),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize struct from the pointer, which is valid for the call.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Tracks the output copies of one process.
#[derive(Debug, Default)]
pub struct Drain {
    state: Mutex<DrainState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct DrainState {
    pending: usize,
    exited_at: Option<Instant>,
}

impl Drain {
    fn add(&self) {
        lock(&self.state).pending += 1;
    }

    fn done(&self) {
        let mut s = lock(&self.state);
        s.pending = s.pending.saturating_sub(1);
        self.cond.notify_all();
    }

    /// Records that the process exited (starts the idle clock of abandoned pipes).
    pub fn mark_exited(&self) {
        let mut s = lock(&self.state);
        if s.exited_at.is_none() {
            s.exited_at = Some(Instant::now());
        }
        self.cond.notify_all();
    }

    fn exited_for(&self, d: Duration) -> bool {
        lock(&self.state)
            .exited_at
            .is_some_and(|t| t.elapsed() >= d)
    }

    /// Blocks until every output copy reached end of file.
    pub fn wait(&self) {
        let mut s = lock(&self.state);
        while s.pending > 0 {
            s = self.cond.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The host-facing end of a process's input, shared with `CloseStdin`.
#[derive(Debug)]
pub struct StdinControl {
    state: Mutex<StdinState>,
    wake_tx: OwnedFd,
}

#[derive(Debug, Default)]
struct StdinState {
    received: u64,
    close_at: Option<u64>,
}

impl StdinControl {
    /// Closes the process's input once `total` bytes from the host have been delivered.
    pub fn close_after(&self, total: u64) {
        lock(&self.state).close_at = Some(total);
        self.wake();
    }

    fn wake(&self) {
        let _ = nix::unistd::write(&self.wake_tx, &[1]);
    }
}

/// Streams of a process, connected but not yet copying.
#[derive(Debug)]
pub struct PreparedIo {
    /// Descriptors for the child's 0, 1, 2 (the agent drops its copies after the clone).
    pub child_fds: [OwnedFd; 3],
    stdin: Option<(Conn, OwnedFd)>,
    outputs: Vec<(OwnedFd, Conn)>,
    terminal: Option<Conn>,
}

impl PreparedIo {
    /// Claims the connections named in `stdio` and creates the pipes.
    ///
    /// # Errors
    ///
    /// [`StdioError`] when a stream is missing or a pipe cannot be made.
    pub fn prepare(
        stdio: &squib_agent_protocol::agent::Stdio,
        terminal: bool,
        registry: &StreamRegistry,
    ) -> Result<Self, StdioError> {
        if stdio.terminal != terminal {
            return Err(StdioError::Mismatch(
                "the terminal flag differs from process.terminal",
            ));
        }
        let null = || {
            nix::fcntl::open(
                "/dev/null",
                OFlag::O_RDWR | OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|source| StdioError::Setup {
                what: "/dev/null",
                source,
            })
        };
        let pipe = || {
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|source| StdioError::Setup {
                what: "pipe",
                source,
            })
        };
        if terminal {
            if !stdio.stdin_stream.is_empty()
                || !stdio.stdout_stream.is_empty()
                || !stdio.stderr_stream.is_empty()
            {
                return Err(StdioError::Mismatch(
                    "a terminal process uses terminal_stream only",
                ));
            }
            let terminal = if stdio.terminal_stream.is_empty() {
                None
            } else {
                Some(registry.take(&stdio.terminal_stream, STREAM_WAIT)?)
            };
            return Ok(Self {
                child_fds: [null()?, null()?, null()?],
                stdin: None,
                outputs: Vec::new(),
                terminal,
            });
        }
        if !stdio.terminal_stream.is_empty() {
            return Err(StdioError::Mismatch(
                "terminal_stream is set for a process without a terminal",
            ));
        }
        let (fd0, stdin) = if stdio.stdin_stream.is_empty() {
            (null()?, None)
        } else {
            let conn = registry.take(&stdio.stdin_stream, STREAM_WAIT)?;
            let (r, w) = pipe()?;
            (r, Some((conn, w)))
        };
        let mut outputs = Vec::new();
        let mut out_fd = |id: &str| -> Result<OwnedFd, StdioError> {
            if id.is_empty() {
                return null();
            }
            let conn = registry.take(id, STREAM_WAIT)?;
            let (r, w) = pipe()?;
            // Best effort: a pipe that cannot grow works at its default size.
            let _ = nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETPIPE_SZ(OUT_PIPE_BYTES));
            outputs.push((r, conn));
            Ok(w)
        };
        let fd1 = out_fd(&stdio.stdout_stream)?;
        let fd2 = out_fd(&stdio.stderr_stream)?;
        Ok(Self {
            child_fds: [fd0, fd1, fd2],
            stdin,
            outputs,
            terminal: None,
        })
    }

    /// Starts the copy threads. `pty_master` is the master the helper sent for a terminal
    /// process. Returns the stdin control (if the process has an input stream).
    ///
    /// # Errors
    ///
    /// A descriptor could not be duplicated or a thread not spawned.
    pub fn start(
        self,
        drain: &Arc<Drain>,
        pty_master: Option<&OwnedFd>,
    ) -> std::io::Result<Option<Arc<StdinControl>>> {
        let Self {
            child_fds,
            stdin,
            outputs,
            terminal,
        } = self;
        drop(child_fds);
        let mut control = None;
        if let Some((conn, pipe_w)) = stdin {
            control = Some(spawn_input(conn, pipe_w, false)?);
        }
        for (pipe_r, conn) in outputs {
            spawn_output(pipe_r, conn, drain.clone(), None)?;
        }
        if let (Some(conn), Some(master)) = (terminal, pty_master) {
            let input = spawn_input(conn.try_clone()?, master.try_clone()?, true)?;
            spawn_output(
                master.try_clone()?,
                conn,
                drain.clone(),
                Some(input.clone()),
            )?;
            control = Some(input);
        }
        Ok(control)
    }
}

fn spawn_input(conn: Conn, target: OwnedFd, is_pty: bool) -> std::io::Result<Arc<StdinControl>> {
    let (wake_rx, wake_tx) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    let control = Arc::new(StdinControl {
        state: Mutex::new(StdinState::default()),
        wake_tx,
    });
    let c = control.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || copy_in(conn, target, &c, &wake_rx, is_pty))?;
    Ok(control)
}

fn copy_in(mut conn: Conn, target: OwnedFd, control: &StdinControl, wake: &OwnedFd, is_pty: bool) {
    let mut buf = vec![0u8; BUF_LEN];
    let mut out = std::fs::File::from(target);
    loop {
        let reached = {
            let s = lock(&control.state);
            s.close_at.is_some_and(|t| s.received >= t)
        };
        if reached {
            break;
        }
        let mut fds = [
            PollFd::new(conn.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => break,
        }
        let conn_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        if fds[1].revents().is_some_and(|r| !r.is_empty()) {
            let mut drain_buf = [0u8; 64];
            let _ = nix::unistd::read(wake, &mut drain_buf);
        }
        if !conn_ready {
            continue;
        }
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        lock(&control.state).received += n as u64;
        let Some(chunk) = buf.get(..n) else { break };
        if out.write_all(chunk).is_err() {
            break;
        }
    }
    if is_pty {
        // A pty has no half-close: the line discipline's EOF character ends the input.
        if let Ok(t) = nix::sys::termios::tcgetattr(out.as_fd()) {
            let eof = t.control_chars[nix::sys::termios::SpecialCharacterIndices::VEOF as usize];
            let _ = out.write_all(&[eof]);
        }
    }
}

fn spawn_output(
    src: OwnedFd,
    conn: Conn,
    drain: Arc<Drain>,
    stop_input: Option<Arc<StdinControl>>,
) -> std::io::Result<()> {
    drain.add();
    let spawned = std::thread::Builder::new().name("stdout".into()).spawn({
        let drain = drain.clone();
        move || {
            copy_out(&src, conn, &drain);
            if let Some(input) = stop_input {
                // The terminal is gone; stop feeding it.
                input.close_after(0);
            }
            drain.done();
        }
    });
    if let Err(e) = spawned {
        drain.done();
        return Err(e);
    }
    Ok(())
}

fn copy_out(src: &OwnedFd, mut conn: Conn, drain: &Drain) {
    let mut buf = vec![0u8; OUT_BUF_LEN];
    let mut host_gone = false;
    let mut last_data = Instant::now();
    loop {
        let mut fds = [PollFd::new(src.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(0) => {
                if drain.exited_for(IDLE_AFTER_EXIT) && last_data.elapsed() >= IDLE_AFTER_EXIT {
                    tracing::debug!("output still open after the process exited; closing it");
                    break;
                }
                continue;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => break,
        }
        let n = match read_fd(src.as_fd(), &mut buf) {
            // A pty master reports EIO once every slave descriptor is closed.
            Ok(0) | Err(Errno::EIO) => break,
            Err(Errno::EAGAIN) => continue,
            Err(_) => break,
            Ok(n) => n,
        };
        last_data = Instant::now();
        if host_gone {
            continue;
        }
        let Some(chunk) = buf.get(..n) else { break };
        if conn.write_all(chunk).is_err() {
            // Keep draining so the process never blocks on a full pipe.
            host_gone = true;
        }
    }
    conn.shutdown(nix::sys::socket::Shutdown::Write);
}

fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Errno> {
    loop {
        match nix::unistd::read(fd, buf) {
            Err(Errno::EINTR) => continue,
            r => return r,
        }
    }
}
