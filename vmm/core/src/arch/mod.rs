//! Architecture-specific boot: memory layout, boot structures and first vCPU state.
//!
//! `x86_64` is built on x86_64 hosts; `aarch64` on arm64 hosts.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;
