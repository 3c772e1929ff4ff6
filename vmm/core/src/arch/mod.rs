//! Architecture-specific boot: memory layout, boot structures and first vCPU state.
//!
//! `x86_64` is built on x86_64 hosts. `aarch64` is pure computation and built on every host, so
//! its tests run everywhere and the macOS (Hypervisor.framework) build shares it.

pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
