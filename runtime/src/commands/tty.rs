//! The host terminal for a process that runs on a pty in the guest: raw mode while it runs,
//! and the window size forwarded initially and on every SIGWINCH. Either the caller's own
//! terminal (foreground `run` and `exec`), or a host pty whose master went to a console socket
//! ([`ConsoleSlave`]).

use std::os::fd::{AsFd, OwnedFd};

use anyhow::Context as _;
use nix::errno::Errno;
use nix::sys::termios::{self, SetArg, Termios};
use squib_runtime::agent_client::{AgentClient, StdioConfig};
use squib_runtime::console::{self, ConsoleError, PtyStream};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGHUP's number.
const SIGHUP: u32 = 1;

/// Raw mode on stdin, restored on drop.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts stdin into raw mode when it is a terminal; `None` when it is not.
    pub fn enable_on_stdin() -> Option<Self> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

nix::ioctl_read_bad!(get_window_size, nix::libc::TIOCGWINSZ, nix::libc::winsize);

/// The size of the terminal on stdout (or stdin) as (rows, cols).
pub fn window_size() -> Option<(u32, u32)> {
    use std::os::fd::AsRawFd;
    for fd in [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()] {
        let mut ws = nix::libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at a live,
        // properly aligned local; `fd` is one of this process's standard descriptors, and a
        // descriptor that is not a terminal makes the call fail with ENOTTY, nothing else.
        if unsafe { get_window_size(fd, &raw mut ws) }.is_ok() && ws.ws_row > 0 {
            return Some((u32::from(ws.ws_row), u32::from(ws.ws_col)));
        }
    }
    None
}

/// Sends the host terminal's size to the guest pty now and after every SIGWINCH, until the
/// process ends (the task is dropped with the runtime).
pub fn forward_resizes(agent: AgentClient, container_id: String, exec_id: String) {
    tokio::spawn(async move {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        loop {
            if let Some((rows, cols)) = window_size() {
                // A process that already exited has no pty to resize.
                let _ = agent.resize_pty(&container_id, &exec_id, rows, cols).await;
            }
            if winch.recv().await.is_none() {
                return;
            }
        }
    });
}

/// The slave of a host pty whose master was sent to a console socket, held by the process that
/// bridges it to a terminal process in the guest (the monitor for a container's init).
///
/// The slave is made this process's controlling terminal, so a resize on the master raises
/// SIGWINCH here, and the new size goes to the guest pty through the agent's resize call; the
/// master's last close raises SIGHUP here, which goes on to the guest process as a hangup of its
/// terminal would reach it under runc.
#[derive(Debug)]
pub struct ConsoleSlave {
    slave: OwnedFd,
    winch: Signal,
    hangup: Signal,
}

impl ConsoleSlave {
    /// Takes `slave`; must run inside a tokio runtime in a session leader that has no
    /// controlling terminal yet (the monitor calls `setsid` first).
    ///
    /// # Errors
    ///
    /// The signal handlers cannot be installed, or the slave cannot become the controlling
    /// terminal for any reason other than its master already being closed.
    pub fn attach(slave: OwnedFd) -> anyhow::Result<Self> {
        // Installed before the slave becomes the controlling terminal: from then on an
        // unhandled SIGHUP would end this process.
        let hangup = signal(SignalKind::hangup()).context("watching SIGHUP")?;
        let winch = signal(SignalKind::window_change()).context("watching SIGWINCH")?;
        match console::make_controlling_terminal(&slave) {
            Ok(()) => {}
            // Nobody holds the master any more: there is nothing to resize or to read.
            Err(ConsoleError::ControllingTerminal(Errno::EIO)) => {
                tracing::warn!("the console's master is closed already");
            }
            Err(e) => return Err(e).context("attaching the console"),
        }
        Ok(Self {
            slave,
            winch,
            hangup,
        })
    }

    /// The process's streams: terminal input read from the slave, output written to it.
    ///
    /// # Errors
    ///
    /// The slave cannot be duplicated or registered with the runtime.
    pub fn stdio(&self) -> anyhow::Result<StdioConfig> {
        let fd = self.slave.try_clone().context("duplicating the console")?;
        let (input, output) = tokio::io::split(PtyStream::new(fd)?);
        Ok(StdioConfig {
            stdin: Some(Box::new(input)),
            stdout: Some(Box::new(output)),
            stderr: None,
            terminal: true,
        })
    }

    /// Sends the slave's size to the guest pty of process `exec_id` ("" for the init) now and
    /// after every resize, and a hangup as SIGHUP, until the runtime ends.
    pub fn forward(self, agent: AgentClient, container_id: String, exec_id: String) {
        let Self {
            slave,
            mut winch,
            mut hangup,
        } = self;
        tokio::spawn(async move {
            loop {
                // A resize made before this process watched SIGWINCH is picked up on the first
                // pass; an unset size (0x0) is left alone.
                if let Ok((rows, cols)) = console::window_size(&slave)
                    && rows > 0
                    && cols > 0
                    && let Err(e) = agent
                        .resize_pty(&container_id, &exec_id, rows.into(), cols.into())
                        .await
                {
                    // The process may have exited, taking its pty with it.
                    tracing::debug!(container_id = %container_id, error = %e, "resize failed");
                }
                tokio::select! {
                    w = winch.recv() => if w.is_none() { return },
                    h = hangup.recv() => {
                        if h.is_none() {
                            return;
                        }
                        let sent = agent.signal_process(&container_id, &exec_id, SIGHUP, false);
                        if let Err(e) = sent.await {
                            tracing::debug!(container_id = %container_id, error = %e, "forwarding SIGHUP failed");
                        }
                    }
                }
            }
        });
    }
}
