//! The seam between the HVF backend's logic and Hypervisor.framework: two small traits, one per
//! VM and one per vCPU, that carry exactly the framework calls the backend makes. The real
//! implementation (`real.rs`) calls the framework; tests replay scripted exits through a
//! recording implementation, so the exit handling in `vcpu.rs` runs on any host.

use std::time::Duration;

use super::HvfError;
use super::ffi::{hv_reg_t, hv_sys_reg_t, hv_vcpu_exit_t};

/// Calls made on behalf of the whole VM; any thread.
pub(crate) trait VmOps: Send + Sync + 'static {
    /// The per-vCPU half.
    type Vcpu: VcpuOps;

    /// Maps host memory into the guest.
    ///
    /// # Safety
    ///
    /// `host_addr..host_addr + len` must stay mapped for the VM's lifetime.
    unsafe fn map(&self, host_addr: u64, gpa: u64, len: u64, flags: u64) -> Result<(), HvfError>;

    /// Creates a vCPU bound to the calling thread.
    fn create_vcpu(&self) -> Result<Self::Vcpu, HvfError>;

    /// Forces the vCPU with framework handle `handle` out of `hv_vcpu_run`.
    fn exit_vcpu(&self, handle: u64) -> Result<(), HvfError>;

    /// Sets the level of shared peripheral interrupt `intid` on the GIC.
    fn set_spi(&self, intid: u32, level: bool) -> Result<(), HvfError>;

    /// The host counter the guest's virtual counter derives from (CNTVCT = this − offset).
    fn now_ticks(&self) -> u64;

    /// The virtual counter offset every vCPU of this VM gets: the host counter when the VM was
    /// created, so the guest's counter starts near zero and reads the same on every vCPU.
    fn vtimer_base(&self) -> u64;

    /// Converts a number of counter ticks to wall time.
    fn ticks_to_duration(&self, ticks: u64) -> Duration;
}

/// Calls on one vCPU; only on the thread that created it.
pub(crate) trait VcpuOps {
    /// The framework's handle of this vCPU, for [`VmOps::exit_vcpu`] from other threads.
    fn handle(&self) -> u64;
    /// Runs the vCPU until the next exit and returns the exit information.
    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvfError>;
    /// Reads a general-purpose or special register.
    fn reg(&self, reg: hv_reg_t) -> Result<u64, HvfError>;
    /// Writes a general-purpose or special register.
    fn set_reg(&mut self, reg: hv_reg_t, value: u64) -> Result<(), HvfError>;
    /// Reads a system register.
    fn sys_reg(&self, reg: hv_sys_reg_t) -> Result<u64, HvfError>;
    /// Writes a system register.
    fn set_sys_reg(&mut self, reg: hv_sys_reg_t, value: u64) -> Result<(), HvfError>;
    /// Masks or unmasks the virtual timer's exits.
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), HvfError>;
    /// The virtual counter's offset from the host counter.
    fn vtimer_offset(&self) -> Result<u64, HvfError>;
    /// Sets the virtual counter's offset from the host counter.
    fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), HvfError>;
    /// Sets or clears the virtual timer's PPI as pending on this vCPU's redistributor.
    fn set_vtimer_pending(&mut self, pending: bool) -> Result<(), HvfError>;
    /// Whether an SGI or PPI is pending on this vCPU's redistributor.
    fn local_interrupt_pending(&self) -> Result<bool, HvfError>;
}
