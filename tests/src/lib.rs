//! End-to-end test support: the KVM probe that decides where VM tests run, a minimal
//! real-mode KVM guest, the paths the VM test runner hands to tests, and a child-process
//! helper with a deadline.
//!
//! VM tests (test targets named `vm_*`) run where a real KVM is: directly on a host whose
//! `/dev/kvm` passes [`probe`], or inside the VM test host (`tests/vmhost/run`) otherwise.
//! `tests/run-vm-tests` makes that choice; see `tests/README.md`.
#![warn(missing_docs)]

// The probe's guest is a real-mode x86 program: x86_64 hosts only.
#[cfg(target_arch = "x86_64")]
pub mod guest;
#[cfg(target_arch = "x86_64")]
pub mod probe;
pub mod process;
pub mod vm_env;
