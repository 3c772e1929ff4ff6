//! The Firecracker-compatible control plane of squib-vmm.
//!
//! Owns the wire schemas ([`schema`]: `Raw*` request bodies turned into validated
//! `squib_core` types with `TryFrom`), the [`controller::RuntimeApiController`] that every
//! front door (the HTTP server and the in-process shim) dispatches through, the request
//! routing ([`http`]) and the HTTP/1.1 server on a Unix socket ([`server`]). Errors become
//! HTTP statuses in one place ([`error`]). It must not depend on a hypervisor backend:
//! everything below the event loop is reached through actions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::indexing_slicing)]

pub mod config_file;
pub mod controller;
pub mod error;
pub mod host;
pub mod http;
pub mod schema;
pub mod server;

pub use controller::{ControllerError, ControllerOptions, RuntimeApiController, TimeoutTable};
