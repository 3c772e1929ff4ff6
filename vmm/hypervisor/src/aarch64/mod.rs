//! Backend-neutral aarch64 pieces shared by the boot code and the backends: the vCPU boot state,
//! the MPIDR numbering of vCPUs, the GICv3 placement, and pure decoders for what a guest exit
//! carries ([`esr`]: exception syndromes; [`psci`]: power management calls).
//!
//! Compiled on every host: the Hypervisor.framework backend uses it and is type-checked on Linux
//! x86_64 too.

pub mod esr;
pub mod psci;

/// PSTATE a vCPU starts the kernel with: EL1 using SP_EL1 (EL1h), with debug, SError, IRQ and
/// FIQ masked, as the arm64 boot protocol requires.
pub const PSTATE_EL1H_DAIF_MASKED: u64 = 0x3c5;

/// Interrupt ID of the first private peripheral interrupt (PPI); a PPI number `n` is
/// INTID `16 + n`.
pub const PPI_BASE_INTID: u32 = 16;
/// Interrupt ID of the first shared peripheral interrupt (SPI); SPI `n` is INTID `32 + n`.
pub const SPI_BASE_INTID: u32 = 32;
/// Architected timer PPIs as the device tree numbers them: secure physical.
pub const TIMER_PPI_SECURE_PHYS: u32 = 13;
/// Architected timer PPI: non-secure physical.
pub const TIMER_PPI_NONSECURE_PHYS: u32 = 14;
/// Architected timer PPI: virtual (the one guests use under a hypervisor); INTID 27.
pub const TIMER_PPI_VIRT: u32 = 11;
/// Architected timer PPI: hypervisor (EL2) physical.
pub const TIMER_PPI_HYP: u32 = 10;

/// The MPIDR_EL1 affinity value of vCPU `index`: Aff0 counts 0..16 and Aff1 the groups of 16,
/// so that GICv3 SGIs (whose target list covers 16 CPUs of one Aff1 group) reach every vCPU.
pub fn mpidr_of(index: u32) -> u64 {
    (u64::from(index >> 4) << 8) | u64::from(index & 0xf)
}

/// The vCPU index of an MPIDR affinity value, the inverse of [`mpidr_of`]; `None` when the
/// value cannot come from [`mpidr_of`] (Aff0 above 15, or Aff2/Aff3 set).
pub fn index_of_mpidr(mpidr: u64) -> Option<u32> {
    // Only the affinity fields count: Aff3 (39:32), Aff2 (23:16), Aff1 (15:8), Aff0 (7:0).
    let affinity = mpidr & 0xff_00ff_ffff;
    let aff0 = affinity & 0xff;
    let aff1 = (affinity >> 8) & 0xff;
    if aff0 > 0xf || affinity >> 16 != 0 {
        return None;
    }
    u32::try_from((aff1 << 4) | aff0).ok()
}

/// Where the guest's GICv3 lives in guest-physical space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicV3Layout {
    /// Base of the distributor (GICD), 64 KiB.
    pub distributor_base: u64,
    /// Base of the redistributor region: one 128 KiB frame pair (RD + SGI) per vCPU.
    pub redistributor_base: u64,
    /// vCPUs, hence redistributor frames.
    pub vcpu_count: u32,
}

/// Size of the GICv3 distributor register frame.
pub const GICV3_DISTRIBUTOR_SIZE: u64 = 0x1_0000;
/// Size of one vCPU's redistributor (RD_base and SGI_base frames, 64 KiB each).
pub const GICV3_REDISTRIBUTOR_SIZE: u64 = 0x2_0000;

impl GicV3Layout {
    /// Total size of the redistributor region.
    pub fn redistributor_region_size(&self) -> u64 {
        u64::from(self.vcpu_count) * GICV3_REDISTRIBUTOR_SIZE
    }
}

/// The boot state of a vCPU that starts running the kernel (the arm64 boot protocol: X0 holds
/// the device tree's address, X1..X3 are zero, the MMU is off, PSTATE is
/// [`PSTATE_EL1H_DAIF_MASKED`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSetup {
    /// Guest-physical address of the first instruction (the kernel image's start).
    pub entry: u64,
    /// Guest-physical address of the flattened device tree.
    pub fdt_addr: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mpidr_round_trips_and_rejects_foreign_values() {
        for index in [0, 1, 15, 16, 17, 255, 4095] {
            assert_eq!(index_of_mpidr(mpidr_of(index)), Some(index));
        }
        assert_eq!(mpidr_of(17), 0x101);
        assert_eq!(index_of_mpidr(0x10), None);
        assert_eq!(index_of_mpidr(0x1_0000), None);
        // The MPIDR_EL1 U bit (30) and RES1 bit (31) are not affinity.
        assert_eq!(index_of_mpidr(0x8000_0001), Some(1));
    }

    #[test]
    fn test_gic_redistributor_region_scales_with_vcpus() {
        let gic = GicV3Layout {
            distributor_base: 0x0800_0000,
            redistributor_base: 0x080a_0000,
            vcpu_count: 4,
        };
        assert_eq!(gic.redistributor_region_size(), 0x8_0000);
    }
}
