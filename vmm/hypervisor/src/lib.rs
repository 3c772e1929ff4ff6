//! The hypervisor seam: `Hypervisor` -> `Vm` -> `Vcpu` traits returning backend-neutral exits,
//! with a KVM backend (Linux) and a Hypervisor.framework backend (macOS, type-checked on Linux).
//!
//! No `kvm_bindings` or `hv_*` type crosses the traits.
#![warn(missing_docs)]
