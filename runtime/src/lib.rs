//! squib-runtime: turns an OCI bundle into a VM plan and drives it through the controller.
//!
//! The library is shared by the `squib` CLI and the containerd shim.
#![warn(missing_docs)]

pub mod agent_client;
pub mod console;
pub mod mounts;
pub mod plan;
pub mod rootfs;
#[cfg(target_arch = "x86_64")]
pub mod sandbox;
pub mod state;
