//! containerd-shim-squib-v2: the containerd task v2 shim that runs each container in its own
//! microVM, with the VMM embedded in the shim process.
//!
//! The binary's `main` is a thin wrapper; the pieces live here so they can be tested alone.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod stdio;
