//! The hypervisor seam: [`Hypervisor`] -> [`Vm`] -> [`Vcpu`], returning backend-neutral
//! [`VmExit`]s, with a KVM backend (Linux) and a Hypervisor.framework backend (macOS, aarch64;
//! type-checked on every host).
//!
//! The traits follow the stricter backend, HVF: a vCPU is created, run and inspected only on the
//! thread that created it (so [`Vcpu`] is not `Send`), there is no ioeventfd or irqfd (queue
//! notifies arrive as MMIO exits), and interrupts go through an [`InterruptLine`] that the
//! backend implements. No `kvm_bindings` or `hv_*` type crosses these traits: x86_64 register
//! state travels in the neutral structs of the `x86_64` and [`aarch64`] modules. `probe`
//! (x86_64) and `probe_aarch64` (aarch64, given the VM's GIC placement) pick the host's backend.
#![warn(missing_docs)]

use std::sync::Arc;

pub use squib_devices::InterruptLine;

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
pub mod kvm;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

// aarch64 boot state and the Hypervisor.framework backend: compiled on every host, so that the
// HVF backend and its pure exit decoding are type-checked and unit-tested on Linux too.
pub mod aarch64;
pub mod hvf;
// The arm64 KVM backend is a separate module (its file sits with the x86_64 KVM backend) so the
// x86_64 module's gating stays as it is.
#[cfg(all(target_os = "linux", target_arch = "aarch64"))]
#[path = "kvm/aarch64.rs"]
pub mod kvm_aarch64;

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
    /// x86_64: the vCPU shut down on a triple fault (a fault while delivering a double fault),
    /// where real hardware would reset. A guest gets here when it has crashed beyond its own
    /// exception handling, or on purpose when Linux reboots with `reboot=t`. The registers at
    /// the fault can be read with `Vcpu::fault_registers_x86_64` before the next run, where the
    /// backend still has them. Other architectures never report it.
    TripleFault,
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
    /// yet (the next [`Vcpu::run`] returns at once). Does nothing once the vCPU is gone.
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

    /// x86_64: loads the boot state (CPUID, MSRs, registers) described by `setup`. The backend
    /// adds what it owns itself: FPU defaults and the local APIC's LINT0/LINT1 wiring.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Call`] naming the register class the backend refused.
    #[cfg(target_arch = "x86_64")]
    fn configure_x86_64(&mut self, setup: &x86_64::VcpuSetup) -> Result<(), HypervisorError>;

    /// x86_64: the registers that say where the vCPU was and how it translated addresses,
    /// for reporting a crash (read after [`VmExit::TripleFault`], on the vCPU's thread).
    /// `None` when the backend knows they no longer hold the state at the fault.
    ///
    /// # Limitations
    ///
    /// KVM on AMD processors puts a vCPU through INIT when it reports the triple fault (the
    /// processor leaves the guest state undefined after the shutdown intercept), so there the
    /// state at the fault is lost and the answer is `None`. KVM on Intel processors keeps it.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Call`] naming the register class the backend could not read.
    #[cfg(target_arch = "x86_64")]
    fn fault_registers_x86_64(&self) -> Result<Option<x86_64::FaultRegisters>, HypervisorError>;

    /// x86_64: the vCPU's TSC frequency in kHz when the backend can tell, `None` otherwise.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Call`] when the backend offers the query but it fails.
    #[cfg(target_arch = "x86_64")]
    fn tsc_khz(&self) -> Result<Option<u32>, HypervisorError>;

    /// aarch64: makes this vCPU the boot CPU, starting the kernel at `setup.entry` with the
    /// device tree's address in X0 (arm64 boot protocol). Every other vCPU stays powered off
    /// inside [`Vcpu::run`] until the guest starts it with PSCI CPU_ON.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Unsupported`] from backends without aarch64 vCPUs;
    /// [`HypervisorError::Call`] when the backend refuses a register.
    fn configure_aarch64(&mut self, setup: &aarch64::VcpuSetup) -> Result<(), HypervisorError> {
        let _ = setup;
        Err(HypervisorError::Unsupported {
            capability: "aarch64 vcpus",
        })
    }
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
    /// A value handed to the backend does not fit what it accepts.
    #[error("{field} = {value:#x} is out of range for the hypervisor")]
    OutOfRange {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
}

/// The host's hypervisor: creates VMs.
pub trait Hypervisor: Send + Sync {
    /// Creates an empty VM (no memory, no vCPUs) with its interrupt controller and, on x86_64,
    /// its timer (PIT) in place.
    ///
    /// # Errors
    ///
    /// [`HypervisorError`] when the backend refuses.
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError>;

    /// The most vCPUs one VM may have on this host.
    fn max_vcpus(&self) -> u32;
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

    /// x86_64: the CPUID leaves the backend can virtualise, before any per-VM filtering.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Call`] when the backend cannot list them.
    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> Result<Vec<x86_64::CpuidEntry>, HypervisorError>;
}

/// Opens the host's hypervisor: KVM on Linux x86_64.
///
/// # Errors
///
/// [`HypervisorError::Unavailable`] when the host has none squib can drive.
#[cfg(target_arch = "x86_64")]
pub fn probe() -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    #[cfg(target_os = "linux")]
    {
        Ok(Arc::new(kvm::KvmHypervisor::open()?))
    }
    #[cfg(not(target_os = "linux"))]
    {
        Err(HypervisorError::Unavailable {
            reason: "squib drives x86_64 guests only through KVM on Linux".to_string(),
        })
    }
}

/// Opens the host's hypervisor for aarch64 VMs whose GICv3 is placed as `gic` (the interrupt
/// controller is part of the VM on both backends, so its shape is fixed here):
/// Hypervisor.framework on macOS, KVM on Linux. `redistributor_space` is the room the memory
/// map leaves for redistributors from `gic.redistributor_base` (HVF claims its own maximum).
///
/// # Errors
///
/// [`HypervisorError::Unavailable`] when the host has none squib can drive,
/// [`HypervisorError::Unsupported`] when it lacks a capability squib needs.
#[cfg(target_arch = "aarch64")]
pub fn probe_aarch64(
    gic: aarch64::GicV3Layout,
    redistributor_space: u64,
) -> Result<Arc<dyn Hypervisor>, HypervisorError> {
    #[cfg(target_os = "linux")]
    {
        let _ = redistributor_space;
        Ok(Arc::new(kvm_aarch64::KvmAarch64::open(gic)?))
    }
    #[cfg(target_os = "macos")]
    {
        Ok(Arc::new(hvf::Hvf::new(hvf::HvfConfig {
            gic,
            redistributor_space,
        })?))
    }
    #[cfg(not(any(target_os = "linux", target_os = "macos")))]
    {
        let _ = (gic, redistributor_space);
        Err(HypervisorError::Unavailable {
            reason: "squib drives aarch64 guests through KVM (Linux) or \
                     Hypervisor.framework (macOS) only"
                .to_string(),
        })
    }
}
