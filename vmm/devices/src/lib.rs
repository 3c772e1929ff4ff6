//! Emulated devices as state machines over registers, queues and guest memory.
//!
//! Interrupts, host I/O and wake-ups come in through small traits ([`InterruptLine`],
//! [`WakeEvent`]) so that every device is unit-testable without a VM. Everything read from guest
//! memory is hostile input. Devices are reached through a [`Bus`]: the vCPU loop turns an MMIO or
//! port I/O exit into a [`Bus::read`] or [`Bus::write`]. Depends on no hypervisor backend.
#![warn(missing_docs)]
#![deny(clippy::indexing_slicing)]

pub mod bus;
pub mod interrupt;
pub mod pl011;
pub mod serial;
pub mod virtio;
pub mod wake;

pub use bus::{Bus, BusDevice, BusError};
pub use interrupt::{InterruptError, InterruptLine};
pub use wake::WakeEvent;
