//! containerd-shim-squib-v2: the containerd task v2 shim that runs each container in its own
//! microVM, with the VMM embedded in the shim process.
//!
//! The binary's `main` is a thin wrapper (start, delete and serve actions); the pieces live
//! here so they can be tested alone: [`service`] is the task service, [`config`] the runtime
//! options, [`stdio`] containerd's FIFOs and log URIs, [`closable`] the stdin end-of-input
//! handling behind `CloseIO`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod closable;
pub mod config;
#[cfg(target_arch = "x86_64")]
pub mod service;
pub mod stdio;
