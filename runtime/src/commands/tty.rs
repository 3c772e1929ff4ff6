//! The host terminal for a process that runs on a pty in the guest: raw mode while it runs,
//! and the window size forwarded initially and on every SIGWINCH.

use std::os::fd::AsFd;

use nix::sys::termios::{self, SetArg, Termios};
use squib_runtime::agent_client::AgentClient;

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
