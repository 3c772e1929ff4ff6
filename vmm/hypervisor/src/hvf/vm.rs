//! An HVF VM over an implementation of the framework calls ([`VmOps`]): guest memory mapping,
//! vCPU creation against the power table, and SPI interrupt lines on the framework's GIC.

use std::sync::Arc;

use squib_devices::{InterruptError, InterruptLine};

use super::ops::VmOps;
use super::power::PowerTable;
use super::{HvfError, ffi, vcpu};
use crate::aarch64::SPI_BASE_INTID;
use crate::{HypervisorError, Vcpu, Vm};

/// Highest SPI INTID a GICv3 supports (1020..1023 are special).
const MAX_SPI_INTID: u32 = 1019;

/// An HVF VM over some implementation of the framework calls.
pub(crate) struct HvfVm<O: VmOps> {
    ops: Arc<O>,
    pub(crate) power: Arc<PowerTable>,
    vcpu_count: u32,
}

impl<O: VmOps> std::fmt::Debug for HvfVm<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvfVm")
            .field("vcpu_count", &self.vcpu_count)
            .finish_non_exhaustive()
    }
}

impl<O: VmOps> HvfVm<O> {
    pub(crate) fn new(ops: Arc<O>, vcpu_count: u32) -> Self {
        Self {
            ops,
            power: Arc::new(PowerTable::new(vcpu_count)),
            vcpu_count,
        }
    }

    /// Creates vCPU `index` as the concrete type (the trait method boxes it).
    pub(crate) fn create_hvf_vcpu(
        &self,
        index: u32,
        count: u32,
    ) -> Result<vcpu::HvfVcpu<O>, HvfError> {
        let invalid = HvfError::VcpuIndex {
            index,
            count,
            configured: self.vcpu_count,
        };
        if count != self.vcpu_count {
            return Err(invalid);
        }
        let slot = self.power.slot(index).ok_or(invalid)?.clone();
        vcpu::HvfVcpu::new(self.ops.clone(), self.power.clone(), index, slot)
    }
}

impl<O: VmOps> Vm for HvfVm<O> {
    unsafe fn map_memory(
        &self,
        _slot: u32,
        gpa: u64,
        host_addr: u64,
        len: u64,
        read_only: bool,
    ) -> Result<(), HypervisorError> {
        let mut flags = ffi::HV_MEMORY_READ | ffi::HV_MEMORY_EXEC;
        if !read_only {
            flags |= ffi::HV_MEMORY_WRITE;
        }
        // SAFETY: the caller guarantees the host range outlives the VM (the trait's contract).
        unsafe { self.ops.map(host_addr, gpa, len, flags) }?;
        Ok(())
    }

    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        Ok(Box::new(self.create_hvf_vcpu(index, count)?))
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, HypervisorError> {
        let intid = SPI_BASE_INTID
            .checked_add(gsi)
            .filter(|intid| *intid <= MAX_SPI_INTID)
            .ok_or(HypervisorError::OutOfRange {
                field: "spi",
                value: u64::from(gsi),
            })?;
        Ok(Arc::new(HvfSpi {
            ops: self.ops.clone(),
            power: self.power.clone(),
            gsi,
            intid,
        }))
    }

    #[cfg(target_arch = "x86_64")]
    fn supported_cpuid(&self) -> Result<Vec<crate::x86_64::CpuidEntry>, HypervisorError> {
        Err(HypervisorError::Unsupported {
            capability: "cpuid under hypervisor.framework",
        })
    }
}

/// A shared peripheral interrupt of the framework's GIC; `gsi` is the SPI number (INTID − 32),
/// the number the device tree's interrupt specifiers carry.
struct HvfSpi<O: VmOps> {
    ops: Arc<O>,
    power: Arc<PowerTable>,
    gsi: u32,
    intid: u32,
}

impl<O: VmOps> InterruptLine for HvfSpi<O> {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.set_level(true)?;
        self.set_level(false)
    }

    fn set_level(&self, level: bool) -> Result<(), InterruptError> {
        self.ops
            .set_spi(self.intid, level)
            .map_err(|error| InterruptError::SetLevel {
                gsi: self.gsi,
                level,
                code: match error {
                    HvfError::Call { code, .. } => i64::from(code.cast_unsigned()),
                    _ => i64::from(ffi::HV_ERROR.cast_unsigned()),
                },
            })?;
        if level {
            // The GIC picks the target vCPU; wake whichever sleeps in WFI.
            self.power.poke_all();
        }
        Ok(())
    }
}
