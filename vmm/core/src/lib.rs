//! The VMM core: validated VM configuration, the actions the controller sends, the lifecycle
//! snapshot the event loop publishes, the VM builder, vCPU threads and the event loop itself.
//!
//! Data flow: a front door (HTTP API, in-process shim) validates a request into an
//! [`action::ApiAction`] and sends it over [`action::action_channel`] to the
//! [`event_loop::EventLoop`], which applies it, publishes a [`mirror::ControllerSnapshot`]
//! through its [`mirror::SnapshotPublisher`] and replies. Reads go to the
//! [`mirror::SnapshotReader`].
//!
//! Depends on `squib-devices` and `squib-hypervisor`; never on the API crate.
#![warn(missing_docs)]

pub mod action;
pub mod arch;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod builder;
pub mod config;
pub mod event_loop;
pub mod memory;
pub mod mirror;
pub mod snapshot;
pub mod vcpu;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub mod vm;
