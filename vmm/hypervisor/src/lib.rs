//! The hypervisor seam: [`Hypervisor`] -> [`Vm`] -> [`Vcpu`], returning backend-neutral
//! [`VmExit`]s, with a KVM backend (Linux, x86_64 and aarch64) and a Hypervisor.framework backend
//! (macOS, aarch64; type-checked on every host).
//!
//! The traits follow the stricter backend, HVF: a vCPU is created, run and inspected only on the
//! thread that created it (so [`Vcpu`] is not `Send`), there is no ioeventfd or irqfd (queue
//! notifies arrive as MMIO exits), and interrupts go through an [`InterruptLine`] that the
//! backend implements. No `kvm_bindings` or `hv_*` type crosses these traits.
#![warn(missing_docs)]

use std::sync::Arc;

pub use squib_devices::InterruptLine;

/// Why a vCPU stopped running guest code.
///
/// Data buffers borrow from the vCPU: for reads the caller fills `data`, and the backend hands
/// it to the guest on the next [`Vcpu::run`].
#[derive(Debug)]
pub enum VmExit<'a> {
    /// The guest read `data.len()` bytes of MMIO at `addr`.
    MmioRead {
        /// Guest physical address of the access.
        addr: u64,
        /// Fill with the value to return, little-endian.
        data: &'a mut [u8],
    },
    /// The guest wrote `data` to MMIO at `addr`.
    MmioWrite {
        /// Guest physical address of the access.
        addr: u64,
        /// The bytes written, little-endian.
        data: &'a [u8],
    },
    /// x86_64: the guest read from an I/O port.
    IoIn {
        /// The port.
        port: u16,
        /// Fill with the value to return.
        data: &'a mut [u8],
    },
    /// x86_64: the guest wrote to an I/O port.
    IoOut {
        /// The port.
        port: u16,
        /// The bytes written.
        data: &'a [u8],
    },
    /// The guest powered the machine off.
    Shutdown,
    /// The guest asked for a reset (reboot); squib ends the VM as Firecracker does.
    Reset,
    /// The run was interrupted from another thread through a [`VcpuKicker`].
    Interrupted,
    /// An exit the backend does not handle, with the backend's raw reason.
    Unhandled {
        /// The raw exit reason (KVM exit code, HVF exit reason or ESR class).
        reason: u64,
        /// A short description for logs.
        detail: String,
    },
}

/// A handle that makes a running vCPU return [`VmExit::Interrupted`] from another thread.
pub trait VcpuKicker: Send + Sync {
    /// Forces the vCPU out of guest mode as soon as possible, also if it is not in guest mode
    /// yet (the next [`Vcpu::run`] returns at once).
    fn kick(&self);
}

/// One virtual CPU. Created, run and inspected on one thread only.
pub trait Vcpu {
    /// Runs guest code until the next exit that needs the VMM.
    ///
    /// # Errors
    ///
    /// [`HypervisorError`] when the backend fails to run the vCPU at all.
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError>;

    /// A handle other threads use to kick this vCPU out of [`Vcpu::run`].
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
}

/// A failure of the hypervisor backend. Raw codes are kept for diagnosis.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    /// The host offers no usable hypervisor.
    #[error("no usable hypervisor on this host: {reason}")]
    Unavailable {
        /// What is missing.
        reason: String,
    },
    /// The host lacks a capability squib needs.
    #[error("the hypervisor lacks {capability}")]
    Unsupported {
        /// The missing capability.
        capability: &'static str,
    },
    /// A backend call failed with a raw code (errno for KVM, `hv_return_t` for HVF).
    #[error("{operation} failed (code {code:#x})")]
    Call {
        /// The operation that failed, e.g. "create vcpu".
        operation: &'static str,
        /// The raw code.
        code: i64,
    },
}

/// The host's hypervisor: creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Creates an empty VM (no memory, no vCPUs).
    ///
    /// # Errors
    ///
    /// [`HypervisorError`] when the backend refuses.
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError>;
}

/// One virtual machine: memory, interrupt controller, vCPUs.
pub trait Vm: Send + Sync {
    /// Maps `len` bytes of host memory at `host_addr` into the guest at `gpa`.
    ///
    /// # Errors
    ///
    /// [`HypervisorError`] when the backend refuses the mapping.
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + len` must stay mapped and valid for as long as the VM exists.
    unsafe fn map_memory(
        &self,
        slot: u32,
        gpa: u64,
        host_addr: u64,
        len: u64,
        read_only: bool,
    ) -> Result<(), HypervisorError>;

    /// Creates vCPU `index` of `count`. Must be called on the thread that will run it.
    ///
    /// # Errors
    ///
    /// [`HypervisorError`] when the backend refuses.
    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>, HypervisorError>;

    /// The interrupt line for global system interrupt `gsi`.
    ///
    /// # Errors
    ///
    /// [`HypervisorError`] when the line cannot be had.
    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, HypervisorError>;
}
