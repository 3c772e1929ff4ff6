//! The real framework behind the `ops.rs` seam: the VM (with its GICv3 and the process-wide
//! one-VM slot) and the vCPUs, each call checked at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::HvfError;
use super::ffi::{self, hv_reg_t, hv_sys_reg_t, hv_vcpu_exit_t};
use super::ops::{VcpuOps, VmOps};
use crate::aarch64::{
    GICV3_DISTRIBUTOR_SIZE, GICV3_REDISTRIBUTOR_SIZE, PPI_BASE_INTID, TIMER_PPI_VIRT,
};

/// The process-wide VM slot of the framework.
pub(crate) static PROCESS_VM: AtomicBool = AtomicBool::new(false);

/// Holds a process-wide "one VM" flag while alive.
#[derive(Debug)]
pub(crate) struct VmSlot {
    flag: &'static AtomicBool,
}

impl VmSlot {
    pub(crate) fn acquire(flag: &'static AtomicBool) -> Result<Self, HvfError> {
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| HvfError::VmExists)?;
        Ok(Self { flag })
    }
}

impl Drop for VmSlot {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::Release);
    }
}

/// The framework's GIC geometry, in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameworkGic {
    /// Distributor frame size.
    pub(crate) distributor_size: u64,
    /// Required distributor base alignment.
    pub(crate) distributor_align: u64,
    /// One vCPU's redistributor.
    pub(crate) redistributor_size: u64,
    /// Required redistributor region base alignment.
    pub(crate) redistributor_align: u64,
    /// The whole redistributor region the framework claims.
    pub(crate) redistributor_region: u64,
}

/// Checks our GIC placement against the framework's sizes and alignments.
fn check_gic_geometry(gic: &ffi::GicFunctions, config: &super::HvfConfig) -> Result<(), HvfError> {
    let (distributor_size, distributor_align) = gic.distributor_geometry()?;
    let (redistributor_size, redistributor_align, redistributor_region) =
        gic.redistributor_geometry()?;
    check_geometry(
        config,
        &FrameworkGic {
            distributor_size,
            distributor_align,
            redistributor_size,
            redistributor_align,
            redistributor_region,
        },
    )
}

/// Checks the guest's GIC placement (`config`) against what the framework requires.
pub(crate) fn check_geometry(
    config: &super::HvfConfig,
    framework: &FrameworkGic,
) -> Result<(), HvfError> {
    let layout = &config.gic;
    let misaligned = |base: u64, align: u64| align != 0 && !base.is_multiple_of(align);
    if framework.distributor_size > GICV3_DISTRIBUTOR_SIZE {
        return Err(HvfError::GicLayout {
            field: "distributor size",
            value: GICV3_DISTRIBUTOR_SIZE,
            required: framework.distributor_size,
        });
    }
    if misaligned(layout.distributor_base, framework.distributor_align) {
        return Err(HvfError::GicLayout {
            field: "distributor base",
            value: layout.distributor_base,
            required: framework.distributor_align,
        });
    }
    if framework.redistributor_size != GICV3_REDISTRIBUTOR_SIZE {
        return Err(HvfError::GicLayout {
            field: "redistributor size",
            value: GICV3_REDISTRIBUTOR_SIZE,
            required: framework.redistributor_size,
        });
    }
    if misaligned(layout.redistributor_base, framework.redistributor_align) {
        return Err(HvfError::GicLayout {
            field: "redistributor base",
            value: layout.redistributor_base,
            required: framework.redistributor_align,
        });
    }
    // The framework claims its whole region whatever the vCPU count: it must not reach the
    // devices placed after the space the memory map reserves.
    if framework.redistributor_region > config.redistributor_space {
        return Err(HvfError::GicLayout {
            field: "redistributor space",
            value: config.redistributor_space,
            required: framework.redistributor_region,
        });
    }
    Ok(())
}

/// Checks that the framework's virtual timer INTID is the one the device tree announces.
pub(crate) fn check_vtimer_intid(intid: u32) -> Result<u32, HvfError> {
    if intid == PPI_BASE_INTID + TIMER_PPI_VIRT {
        Ok(intid)
    } else {
        Err(HvfError::VtimerIntid { intid })
    }
}

/// The framework's VM, owning the process-wide VM slot while it lives.
#[derive(Debug)]
pub(crate) struct RealVm {
    gic: ffi::GicFunctions,
    vtimer_intid: u32,
    vtimer_base: u64,
    timebase: (u32, u32),
    _slot: VmSlot,
}

/// `mach_timebase_info_data_t`.
#[repr(C)]
#[derive(Default)]
struct MachTimebaseInfo {
    numer: u32,
    denom: u32,
}

unsafe extern "C" {
    // libSystem on macOS; never called elsewhere.
    fn mach_absolute_time() -> u64;
    fn mach_timebase_info(info: *mut MachTimebaseInfo) -> i32;
}

impl RealVm {
    /// Creates the framework VM and its GICv3. Order matters: `hv_gic_create` must follow
    /// `hv_vm_create` and precede every `hv_vcpu_create`.
    pub(crate) fn create(config: &super::HvfConfig) -> Result<Self, HvfError> {
        let gic = &config.gic;
        let slot = VmSlot::acquire(&PROCESS_VM)?;
        // Resolve the GIC before creating the VM, so an old macOS fails without side effects.
        let functions = ffi::GicFunctions::resolve()?;
        ffi::vm_create()?;
        let mut vm = Self {
            gic: functions,
            vtimer_intid: 0,
            // SAFETY: no preconditions.
            vtimer_base: unsafe { mach_absolute_time() },
            timebase: timebase(),
            _slot: slot,
        };
        check_gic_geometry(&vm.gic, config)?;
        vm.gic
            .create_gic(gic.distributor_base, gic.redistributor_base)?;
        vm.vtimer_intid = check_vtimer_intid(vm.gic.vtimer_intid()?)?;
        Ok(vm)
    }
}

fn timebase() -> (u32, u32) {
    let mut info = MachTimebaseInfo::default();
    // SAFETY: `info` is a valid out pointer for the duration of the call.
    let rc = unsafe { mach_timebase_info(&mut info) };
    if rc != 0 || info.denom == 0 {
        // Apple Silicon's counter runs at 24 MHz: 125/3 ns per tick.
        (125, 3)
    } else {
        (info.numer, info.denom)
    }
}

impl Drop for RealVm {
    fn drop(&mut self) {
        // Every vCPU is gone first: each holds an Arc of this VM.
        if let Err(error) = ffi::vm_destroy() {
            tracing::warn!(%error, "destroying the vm failed");
        }
    }
}

impl VmOps for RealVm {
    type Vcpu = RealVcpu;

    unsafe fn map(&self, host_addr: u64, gpa: u64, len: u64, flags: u64) -> Result<(), HvfError> {
        let size = usize::try_from(len).map_err(|_| HvfError::Call {
            operation: "hv_vm_map",
            code: ffi::HV_BAD_ARGUMENT,
        })?;
        // SAFETY: the caller guarantees the host range stays mapped for the VM's lifetime.
        unsafe { ffi::vm_map(host_addr as *mut std::ffi::c_void, gpa, size, flags) }
    }

    fn create_vcpu(&self) -> Result<RealVcpu, HvfError> {
        // The vCPU is bound to this thread; RealVcpu holds a raw pointer, so it is not Send and
        // stays here.
        let (handle, exit) = ffi::vcpu_create()?;
        Ok(RealVcpu {
            handle,
            exit,
            gic: self.gic,
            vtimer_intid: self.vtimer_intid,
        })
    }

    fn exit_vcpu(&self, handle: u64) -> Result<(), HvfError> {
        ffi::vcpus_exit(&[handle])
    }

    fn set_spi(&self, intid: u32, level: bool) -> Result<(), HvfError> {
        self.gic.set_spi(intid, level)
    }

    fn now_ticks(&self) -> u64 {
        // SAFETY: no preconditions.
        unsafe { mach_absolute_time() }
    }

    fn vtimer_base(&self) -> u64 {
        self.vtimer_base
    }

    fn ticks_to_duration(&self, ticks: u64) -> Duration {
        let (numer, denom) = self.timebase;
        let nanos = u128::from(ticks) * u128::from(numer) / u128::from(denom.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// A framework vCPU. Not `Send`: the framework binds it to the creating thread.
#[derive(Debug)]
pub(crate) struct RealVcpu {
    handle: ffi::hv_vcpu_t,
    exit: *const hv_vcpu_exit_t,
    gic: ffi::GicFunctions,
    vtimer_intid: u32,
}

impl Drop for RealVcpu {
    fn drop(&mut self) {
        // The handle came from vcpu_create on this thread and is destroyed once.
        if let Err(error) = ffi::vcpu_destroy(self.handle) {
            tracing::warn!(%error, "destroying a vcpu failed");
        }
    }
}

impl VcpuOps for RealVcpu {
    fn handle(&self) -> u64 {
        self.handle
    }

    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvfError> {
        ffi::vcpu_run(self.handle)?;
        // SAFETY: the framework keeps the exit record alive until the vCPU is destroyed and
        // writes it only inside hv_vcpu_run on this thread, which has returned.
        Ok(unsafe { *self.exit })
    }

    fn reg(&self, reg: hv_reg_t) -> Result<u64, HvfError> {
        ffi::vcpu_get_reg(self.handle, reg)
    }

    fn set_reg(&mut self, reg: hv_reg_t, value: u64) -> Result<(), HvfError> {
        ffi::vcpu_set_reg(self.handle, reg, value)
    }

    fn sys_reg(&self, reg: hv_sys_reg_t) -> Result<u64, HvfError> {
        ffi::vcpu_get_sys_reg(self.handle, reg)
    }

    fn set_sys_reg(&mut self, reg: hv_sys_reg_t, value: u64) -> Result<(), HvfError> {
        ffi::vcpu_set_sys_reg(self.handle, reg, value)
    }

    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), HvfError> {
        ffi::vcpu_set_vtimer_mask(self.handle, masked)
    }

    fn vtimer_offset(&self) -> Result<u64, HvfError> {
        ffi::vcpu_get_vtimer_offset(self.handle)
    }

    fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), HvfError> {
        ffi::vcpu_set_vtimer_offset(self.handle, offset)
    }

    fn set_vtimer_pending(&mut self, pending: bool) -> Result<(), HvfError> {
        let reg = if pending {
            ffi::HV_GIC_REDISTRIBUTOR_REG_GICR_ISPENDR0
        } else {
            ffi::HV_GIC_REDISTRIBUTOR_REG_GICR_ICPENDR0
        };
        self.gic
            .set_redistributor_reg(self.handle, reg, 1u64 << self.vtimer_intid)
    }

    fn local_interrupt_pending(&self) -> Result<bool, HvfError> {
        let pending = self
            .gic
            .redistributor_reg(self.handle, ffi::HV_GIC_REDISTRIBUTOR_REG_GICR_ISPENDR0)?;
        Ok(pending != 0)
    }
}
