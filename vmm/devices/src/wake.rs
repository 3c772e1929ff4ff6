//! A portable wake-up event between a vCPU thread and a device worker.
//!
//! Hypervisor.framework has no ioeventfd: a queue notify arrives as an MMIO exit on the vCPU
//! thread, which hands it to the device's worker through this event. On Linux it is an eventfd;
//! elsewhere a non-blocking pipe. Either way it exposes one readable fd for `poll`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// A counter-like event: [`WakeEvent::signal`] wakes a poller, [`WakeEvent::drain`] resets it.
#[derive(Debug)]
pub struct WakeEvent {
    read: OwnedFd,
    #[cfg(not(target_os = "linux"))]
    write: OwnedFd,
}

impl WakeEvent {
    /// Creates a non-blocking event.
    ///
    /// # Errors
    ///
    /// The OS error from `eventfd(2)` or `pipe(2)`.
    #[cfg(target_os = "linux")]
    pub fn new() -> io::Result<Self> {
        let fd = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )?;
        Ok(Self {
            read: OwnedFd::from(fd),
        })
    }

    /// Creates a non-blocking event.
    ///
    /// # Errors
    ///
    /// The OS error from `eventfd(2)` or `pipe(2)`.
    #[cfg(not(target_os = "linux"))]
    pub fn new() -> io::Result<Self> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let (read, write) = nix::unistd::pipe()?;
        for fd in [&read, &write] {
            fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
            fcntl(fd, FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        }
        Ok(Self { read, write })
    }

    /// Wakes whoever polls [`WakeEvent::as_fd`]. Signals coalesce until [`WakeEvent::drain`].
    ///
    /// # Errors
    ///
    /// The OS error from `write(2)`; a full pipe is not an error (a wake-up is already pending).
    pub fn signal(&self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        let (fd, buf) = (&self.read, 1u64.to_ne_bytes());
        #[cfg(not(target_os = "linux"))]
        let (fd, buf) = (&self.write, [1u8]);
        match nix::unistd::write(fd, &buf) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Consumes pending signals; returns whether any was pending.
    ///
    /// # Errors
    ///
    /// The OS error from `read(2)` other than "would block".
    pub fn drain(&self) -> io::Result<bool> {
        let mut buf = [0u8; 64];
        let mut any = false;
        loop {
            match nix::unistd::read(&self.read, &mut buf) {
                Ok(0) => return Ok(any),
                Ok(_) => {
                    any = true;
                    // An eventfd returns its whole counter in one read.
                    if cfg!(target_os = "linux") {
                        return Ok(true);
                    }
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(any),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for WakeEvent {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.read.as_fd()
    }
}

impl AsRawFd for WakeEvent {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_wake_event_signal_then_drain() {
        let ev = WakeEvent::new().unwrap();
        assert!(!ev.drain().unwrap());
        ev.signal().unwrap();
        ev.signal().unwrap();
        assert!(ev.drain().unwrap());
        assert!(!ev.drain().unwrap());
    }
}
