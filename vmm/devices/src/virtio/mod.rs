//! virtio 1.x devices over the MMIO transport.
//!
//! [`MmioTransport`] is the register file a driver sees (virtio 1.2, section 4.2); it owns one
//! [`VirtioDevice`] and, when the driver sets DRIVER_OK, hands it the configured queues, guest
//! memory and an [`IrqStatus`] to raise interrupts with. Each activated device processes its
//! queues on a worker thread of its own ([`worker`]), woken by a [`crate::WakeEvent`] per queue:
//! the vCPU thread only flips registers and signals. Everything a descriptor says is hostile:
//! [`chain`] turns descriptor chains into bounds-checked segment lists before any device reads
//! them.

pub mod block;
pub mod chain;
pub mod mmio;
pub mod rng;
pub mod vsock;
pub mod worker;

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test values are small")]
pub(crate) mod testing;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use vm_memory::GuestMemoryMmap;

use crate::{InterruptLine, WakeEvent};

pub use block::{Block, BlockError};
pub use mmio::MmioTransport;
pub use rng::Rng;
pub use vsock::{Vsock, VsockError};

/// virtio device type of a block device (virtio 1.2, section 5).
pub const DEVICE_TYPE_BLOCK: u32 = 2;
/// virtio device type of an entropy device.
pub const DEVICE_TYPE_RNG: u32 = 4;
/// virtio device type of a socket device.
pub const DEVICE_TYPE_VSOCK: u32 = 19;

/// Feature bit: the device complies with virtio 1.0 or later (modern only).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/available event index suppression of notifications and interrupts.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Features every device of ours offers on top of its own.
pub const COMMON_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

/// Interrupt status bit: the device used a buffer in some queue.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the device configuration (or its status) changed.
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Device status bits (virtio 1.2, section 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest knows how to drive the device.
    pub const DRIVER: u32 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u32 = 4;
    /// The driver acknowledged the features it understands; negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// A failure to activate a device when the driver sets DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not make the expected number of queues ready.
    #[error("device {device} expects {expected} queues, driver configured {actual}")]
    QueueCount {
        /// The device type name.
        device: &'static str,
        /// Queues the device needs.
        expected: usize,
        /// Queues handed over.
        actual: usize,
    },
    /// Creating a wake-up event or another host resource failed.
    #[error("creating host resources for device {device} failed")]
    HostResource {
        /// The device type name.
        device: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Spawning the worker thread failed.
    #[error("spawning the worker thread of device {device} failed")]
    SpawnWorker {
        /// The device type name.
        device: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The interrupt side of a device shared between its transport (vCPU thread) and its worker.
///
/// Holds the interrupt status register: a worker sets [`INT_USED_RING`] or
/// [`INT_CONFIG_CHANGE`] and pulses the line; the driver reads the register and acknowledges bits
/// through the transport. Also carries the "device needs reset" flag a worker sets when the
/// driver broke the queue protocol.
pub struct IrqStatus {
    status: AtomicU32,
    needs_reset: AtomicBool,
    line: Arc<dyn InterruptLine>,
    limiter: Mutex<LogLimiter>,
}

impl std::fmt::Debug for IrqStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqStatus")
            .field("status", &self.status.load(Ordering::Relaxed))
            .field("needs_reset", &self.needs_reset.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl IrqStatus {
    /// Creates a status register with no bit set, signalling through `line`.
    pub fn new(line: Arc<dyn InterruptLine>) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            line,
            limiter: Mutex::new(LogLimiter::new(Duration::from_secs(5))),
        }
    }

    /// Sets [`INT_USED_RING`] and pulses the line.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Sets [`INT_CONFIG_CHANGE`] and pulses the line.
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Err(error) = self.line.trigger()
            && self.limiter.lock().allow()
        {
            tracing::warn!(%error, "raising a virtio interrupt failed");
        }
    }

    /// The interrupt status register as the driver reads it.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Marks the device as broken by its driver: DEVICE_NEEDS_RESET shows in the status register
    /// and a configuration change interrupt tells the driver to look (virtio 1.2, 2.1.2).
    pub fn mark_needs_reset(&self) {
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            self.signal_config();
        }
    }

    /// Whether a worker marked the device as needing a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

/// One queue handed to a device on activation: the ring state and the event its notifications
/// arrive on.
#[derive(Debug)]
pub struct ActiveQueue {
    /// The split ring, configured by the driver and checked against guest memory.
    pub queue: virtio_queue::Queue,
    /// Signalled by the transport when the driver writes this queue's index to QueueNotify.
    pub notify: Arc<WakeEvent>,
}

/// Everything a device needs to start working, handed over when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory, shared with the VM.
    pub mem: GuestMemoryMmap,
    /// The queues in device order; exactly as many as [`VirtioDevice::queue_max_sizes`] lists.
    pub queues: Vec<ActiveQueue>,
    /// The interrupt status register and line.
    pub irq: Arc<IrqStatus>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device behind a transport.
///
/// The transport calls these on the vCPU thread with its lock held: keep them quick. Heavy work
/// belongs to the worker that [`VirtioDevice::activate`] starts.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`DEVICE_TYPE_BLOCK`], ...).
    fn device_type(&self) -> u32;

    /// A short name for logs and errors.
    fn name(&self) -> &'static str;

    /// The maximum size of each queue, in device order; each a power of two.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers, [`COMMON_FEATURES`] included.
    fn avail_features(&self) -> u64;

    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space; devices without writable fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// Starts processing queues.
    ///
    /// # Errors
    ///
    /// [`ActivateError`] when the queues do not match or host resources cannot be set up; the
    /// transport then reports DEVICE_NEEDS_RESET to the driver.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Stops the worker and returns to the state before activation.
    fn reset(&mut self);
}

/// Lets one warning through per interval and counts the ones it held back.
///
/// Used for anything a guest can trigger at will, so that a hostile driver cannot flood the log.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting one message through per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now; when it says yes, [`LogLimiter::take_suppressed`] tells how many
    /// messages were dropped since the last one.
    pub fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < self.interval => {
                self.suppressed = self.suppressed.saturating_add(1);
                false
            }
            _ => {
                self.last = Some(now);
                true
            }
        }
    }

    /// Returns and resets the count of suppressed messages.
    pub fn take_suppressed(&mut self) -> u64 {
        std::mem::take(&mut self.suppressed)
    }
}

/// Logs a warning about guest misbehaviour through a [`LogLimiter`].
macro_rules! guest_warn {
    ($limiter:expr, $($arg:tt)+) => {
        if $limiter.allow() {
            let suppressed = $limiter.take_suppressed();
            tracing::warn!(suppressed, $($arg)+);
        }
    };
}
pub(crate) use guest_warn;

/// Copies `src` into `data` as a configuration-space read at `offset`, zero beyond `src`.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(tail) = src.get(start..) {
        let n = tail.len().min(data.len());
        if let (Some(dst), Some(s)) = (data.get_mut(..n), tail.get(..n)) {
            dst.copy_from_slice(s);
        }
    }
}
