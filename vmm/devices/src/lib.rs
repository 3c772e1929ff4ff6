//! Emulated devices as state machines over registers, queues and guest memory.
//!
//! Interrupts, host I/O and wake-ups come in through small traits so that every device is
//! unit-testable without a VM. Everything read from guest memory is hostile input. Depends on no
//! hypervisor backend.
#![warn(missing_docs)]
#![deny(clippy::indexing_slicing)]
