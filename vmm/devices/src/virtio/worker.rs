//! Device worker threads and the queue-draining loop they share.
//!
//! A [`Worker`] owns one thread and a stop event; dropping or stopping it signals the event and
//! joins the thread. [`DeviceQueue`] wraps a split ring with the checks the library leaves to
//! us: a driver that publishes more entries than the ring holds, a head index outside the table
//! or a used ring outside memory breaks the queue; the device is then marked DEVICE_NEEDS_RESET
//! and the queue stops, and the VMM carries on. Waiting uses `poll(2)`, which every host has.

use std::io;
use std::num::Wrapping;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::chain::{Chain, ChainError, load_u16, walk_chain};
use super::{ActiveQueue, IrqStatus, LogLimiter, guest_warn};
use crate::WakeEvent;

/// A device's worker thread.
#[derive(Debug)]
pub struct Worker {
    stop: Arc<WakeEvent>,
    handle: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts `body` on a thread named `name`; `body` must return soon after the stop event it
    /// is given becomes readable.
    ///
    /// # Errors
    ///
    /// The OS error from creating the stop event or the thread.
    pub fn spawn<F>(name: &str, body: F) -> io::Result<Self>
    where
        F: FnOnce(Arc<WakeEvent>) + Send + 'static,
    {
        let stop = Arc::new(WakeEvent::new()?);
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(stop2))?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Signals the worker to stop and waits for it.
    pub fn stop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if let Err(error) = self.stop.signal() {
                tracing::error!(%error, "signalling a device worker to stop failed");
                return;
            }
            if handle.join().is_err() {
                tracing::error!("a device worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: forever); retries `EINTR`.
///
/// # Errors
///
/// The OS error of `poll(2)`.
pub fn poll_fds(fds: &mut [PollFd<'_>], timeout: Option<Duration>) -> io::Result<()> {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        // Round up so that a sub-millisecond deadline does not spin.
        Some(d) => PollTimeout::try_from(d.as_millis().saturating_add(1).min(60_000))
            .unwrap_or(PollTimeout::MAX),
    };
    loop {
        match nix::poll::poll(fds, timeout) {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// A poll entry for readability of `fd`.
pub fn readable(fd: BorrowedFd<'_>) -> PollFd<'_> {
    PollFd::new(fd, PollFlags::POLLIN)
}

/// Whether a polled entry reported readiness (or an error or hang-up, which reads will report).
pub fn is_ready(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| !r.is_empty())
}

/// The next item a driver made available.
#[derive(Debug)]
pub enum Popped {
    /// A well-formed chain.
    Chain(Chain),
    /// A chain that failed the checks; it must be returned with [`DeviceQueue::add_used`] and
    /// length 0 (its buffers cannot be trusted).
    Bad {
        /// The head index to return.
        head: u16,
        /// What is wrong with it.
        error: ChainError,
    },
}

/// A split ring as a device worker uses it.
#[derive(Debug)]
pub struct DeviceQueue {
    queue: Queue,
    /// Signalled when the driver notifies this queue.
    pub notify: Arc<WakeEvent>,
    irq: Arc<IrqStatus>,
    max_descs: u32,
    added: bool,
    broken: bool,
    limiter: LogLimiter,
    name: &'static str,
}

impl DeviceQueue {
    /// Wraps an activated queue of device `name`; chains longer than `max_descs` buffers are
    /// refused.
    pub fn new(
        active: ActiveQueue,
        irq: Arc<IrqStatus>,
        event_idx: bool,
        max_descs: u32,
        name: &'static str,
    ) -> Self {
        let mut queue = active.queue;
        queue.set_event_idx(event_idx);
        Self {
            queue,
            notify: active.notify,
            irq,
            max_descs,
            added: false,
            broken: false,
            limiter: LogLimiter::new(Duration::from_secs(5)),
            name,
        }
    }

    /// Whether the driver broke this queue; a broken queue yields nothing until reset.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn break_queue(&mut self, what: &str) {
        if !self.broken {
            self.broken = true;
            tracing::warn!(
                device = self.name,
                problem = what,
                "driver broke a virtqueue, device needs reset"
            );
            self.irq.mark_needs_reset();
        }
    }

    /// Takes the next available chain, walked and checked.
    pub fn pop(&mut self, mem: &GuestMemoryMmap) -> Option<Popped> {
        if self.broken || !self.queue.ready() {
            return None;
        }
        let avail_idx = match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx,
            Err(_) => {
                self.break_queue("available ring unreadable");
                return None;
            }
        };
        let next = Wrapping(self.queue.next_avail());
        if avail_idx == next {
            return None;
        }
        let size = self.queue.size();
        if (avail_idx - next).0 > size {
            self.break_queue("available index runs ahead of the ring size");
            return None;
        }
        let slot = u64::from(next.0 % size.max(1));
        let head = GuestAddress(self.queue.avail_ring())
            .checked_add(4 + slot * 2)
            .and_then(|gpa| load_u16(mem, gpa));
        let Some(head) = head else {
            self.break_queue("available ring entry unreadable");
            return None;
        };
        self.queue.set_next_avail(next.0.wrapping_add(1));
        if head >= size {
            self.break_queue("available ring names a descriptor outside the table");
            return None;
        }
        let table = GuestAddress(self.queue.desc_table());
        Some(match walk_chain(mem, table, size, head, self.max_descs) {
            Ok(chain) => Popped::Chain(chain),
            Err(error) => {
                guest_warn!(self.limiter, device = self.name, %error, "bad descriptor chain");
                Popped::Bad { head, error }
            }
        })
    }

    /// Puts the last popped chain back (the device could not use it yet).
    pub fn undo_pop(&mut self) {
        let next = self.queue.next_avail();
        self.queue.set_next_avail(next.wrapping_sub(1));
    }

    /// Returns a chain to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if self.broken {
            return;
        }
        if self.queue.add_used(mem, head, len).is_err() {
            self.break_queue("used ring unwritable");
            return;
        }
        self.added = true;
    }

    /// Asks the driver not to notify while the worker drains the queue.
    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        if !self.broken && self.queue.disable_notification(mem).is_err() {
            self.break_queue("used ring flags unwritable");
        }
    }

    /// Re-enables driver notifications; returns whether more chains arrived meanwhile (drain
    /// again before sleeping).
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.enable_notification(mem) {
            Ok(more) => more,
            Err(_) => {
                self.break_queue("used ring event unwritable");
                false
            }
        }
    }

    /// Interrupts the driver if chains were used since the last call and the driver wants it.
    pub fn signal_used(&mut self, mem: &GuestMemoryMmap) {
        if !std::mem::take(&mut self.added) || self.broken {
            return;
        }
        match self.queue.needs_notification(mem) {
            Ok(true) => self.irq.signal_used(),
            Ok(false) => {}
            Err(_) => self.break_queue("used event unreadable"),
        }
    }
}
