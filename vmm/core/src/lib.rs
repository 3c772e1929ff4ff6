//! The VMM core: validated VM configuration, the actions the controller sends, the lifecycle
//! snapshot the event loop publishes, the VM builder, vCPU threads and the event loop itself.
//!
//! Depends on `squib-devices` and `squib-hypervisor`; never on the API crate.
#![warn(missing_docs)]
