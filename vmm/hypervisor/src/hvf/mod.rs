//! The Hypervisor.framework backend (macOS on Apple Silicon).
//!
//! [`Hvf`] creates one VM with an in-kernel GICv3 (`hv_gic_create`, macOS 15 and later); its
//! vCPUs turn framework exits into backend-neutral [`crate::VmExit`]s: data aborts become MMIO
//! reads and writes, PSCI calls are answered here, the virtual timer and WFI are handled without
//! returning to the caller (see `vcpu.rs` for the rules).
//!
//! Constraints of the framework that shape this module:
//!
//! - **One VM per process.** A process-wide slot enforces it: a second [`Hvf::create_vm`] while
//!   the first VM lives fails with [`HvfError::VmExists`].
//! - **A vCPU belongs to the thread that created it**: create, run and inspect it there only
//!   (the [`crate::Vcpu`] trait object is not `Send`). Other threads reach it only through its
//!   kicker (`hv_vcpus_exit` plus a wake-up) and through the power mailbox CPU_ON uses.
//! - **The GIC must exist before the first vCPU** and its distributor and redistributor bases
//!   are fixed then, so they are part of [`HvfConfig`].
//! - **macOS 15 for the GIC.** Older systems lack `hv_gic_*`; they are looked up with `dlsym`
//!   at VM creation, so the binary still loads there and the failure is a typed
//!   [`HvfError::GicUnavailable`] naming the missing symbol and the version needed. Presence of
//!   the symbol is the test, not the OS version string: it is exactly what the code needs.
//!
//! The code compiles and is linted on every host; the framework is linked, and the real VM
//! created, only on macOS. Elsewhere [`Hvf::new`] reports the backend unavailable. The exit
//! handling runs in unit tests on any host against a scripted framework (`fake.rs`, behind the
//! `ops.rs` seam; the core crate's tests run it through the real vCPU loop too).

pub mod ffi;
pub mod memory;
mod ops;
mod power;
#[cfg_attr(
    not(target_os = "macos"),
    expect(
        dead_code,
        reason = "the framework is called only on macOS; elsewhere this code is type-checked only"
    )
)]
mod real;
mod vcpu;
#[cfg_attr(
    all(not(target_os = "macos"), not(test), not(feature = "fake-hvf")),
    expect(
        dead_code,
        reason = "only the macOS build creates vms; elsewhere this is type-checked and unit-tested"
    )
)]
mod vm;

#[cfg(any(test, feature = "fake-hvf"))]
pub mod fake;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::aarch64::GicV3Layout;
use crate::{Hypervisor, HypervisorError, Vm};

pub use vcpu::WFI_MAX_SLICE;

/// A failure of the HVF backend; framework codes are kept.
#[derive(Debug, thiserror::Error)]
pub enum HvfError {
    /// A framework call returned an error.
    #[error("{operation} failed: {} ({code:#x})", ffi::return_name(*.code))]
    Call {
        /// The framework function.
        operation: &'static str,
        /// Its `hv_return_t`.
        code: i32,
    },
    /// The process already has its one VM.
    #[error("hypervisor.framework allows one vm per process and this process has one")]
    VmExists,
    /// The in-kernel GIC is missing.
    #[error("hypervisor.framework lacks {symbol}: the in-kernel GICv3 needs macOS 15 or later")]
    GicUnavailable {
        /// The first missing symbol.
        symbol: &'static str,
    },
    /// The GIC placement does not fit what the framework requires.
    #[error("gic {field} is {value:#x}, the framework requires {required:#x}")]
    GicLayout {
        /// What does not fit.
        field: &'static str,
        /// Our value.
        value: u64,
        /// The framework's size or alignment.
        required: u64,
    },
    /// The framework's virtual timer interrupt is not the PPI the device tree announces.
    #[error("the framework's virtual timer is intid {intid}, not ppi 11 (intid 27)")]
    VtimerIntid {
        /// The INTID the framework reported.
        intid: u32,
    },
    /// A vCPU index outside the configured count.
    #[error("vcpu index {index} with count {count} does not fit a vm of {configured} vcpus")]
    VcpuIndex {
        /// The index asked for.
        index: u32,
        /// The count the caller passed.
        count: u32,
        /// The count the VM was configured with.
        configured: u32,
    },
}

impl From<HvfError> for HypervisorError {
    fn from(error: HvfError) -> Self {
        match error {
            HvfError::Call { operation, code } => HypervisorError::Call {
                operation,
                code: i64::from(code.cast_unsigned()),
            },
            HvfError::VmExists => HypervisorError::Unsupported {
                capability: "a second vm in one process (hypervisor.framework allows one)",
            },
            HvfError::GicUnavailable { .. } => HypervisorError::Unavailable {
                reason: error.to_string(),
            },
            HvfError::GicLayout { field, value, .. } => {
                HypervisorError::OutOfRange { field, value }
            }
            HvfError::VtimerIntid { .. } => HypervisorError::Unsupported {
                capability: "the virtual timer on ppi 11",
            },
            HvfError::VcpuIndex { index, .. } => HypervisorError::OutOfRange {
                field: "vcpu index",
                value: u64::from(index),
            },
        }
    }
}

/// What an HVF VM needs to know before it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HvfConfig {
    /// The GICv3 placement (and the vCPU count it is sized for).
    pub gic: GicV3Layout,
    /// Bytes the memory map reserves for redistributors from `gic.redistributor_base`. The
    /// framework claims room for its own maximum of vCPUs, which must fit.
    pub redistributor_space: u64,
}

/// The Hypervisor.framework backend.
#[derive(Debug)]
pub struct Hvf {
    config: HvfConfig,
}

impl Hvf {
    /// Opens the backend for VMs shaped by `config`.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Unavailable`] on any host but macOS.
    pub fn new(config: HvfConfig) -> Result<Self, HypervisorError> {
        if cfg!(target_os = "macos") {
            Ok(Self { config })
        } else {
            Err(HypervisorError::Unavailable {
                reason: "hypervisor.framework exists only on macOS".to_string(),
            })
        }
    }
}

impl Hypervisor for Hvf {
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError> {
        #[cfg(target_os = "macos")]
        {
            let vm = real::RealVm::create(&self.config)?;
            Ok(Arc::new(vm::HvfVm::new(
                Arc::new(vm),
                self.config.gic.vcpu_count,
            )))
        }
        #[cfg(not(target_os = "macos"))]
        {
            Err(HypervisorError::Unavailable {
                reason: format!(
                    "hypervisor.framework exists only on macOS (vm of {} vcpus)",
                    self.config.gic.vcpu_count
                ),
            })
        }
    }

    fn max_vcpus(&self) -> u32 {
        // The redistributor region is laid out for this many; the framework's own limit is
        // higher on every Apple Silicon machine.
        self.config.gic.vcpu_count
    }
}
