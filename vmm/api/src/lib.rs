//! The Firecracker-compatible control plane of squib-vmm.
//!
//! Owns the wire schemas (`Raw*` request bodies turned into validated `squib_core` types with
//! `TryFrom`), the [`RuntimeApiController`] that every front door (the HTTP server and the
//! in-process shim) dispatches through, and the HTTP/1.1 server on a Unix socket. It must not
//! depend on a hypervisor backend: everything below the event loop is reached through actions.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![deny(clippy::indexing_slicing)]
