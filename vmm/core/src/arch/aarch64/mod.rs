//! aarch64 boot: the guest memory map ([`layout`]), the kernel `Image` header ([`image`]) and
//! the device tree ([`fdt`]), tied together by [`prepare_boot`], which turns a kernel, an initrd
//! size, the machine shape and the device list into where everything goes, the device tree blob
//! and the boot vCPU's state.
//!
//! Pure computation with no hypervisor call: built and unit-tested on every host, used by both
//! the KVM (Linux arm64) and the Hypervisor.framework (macOS) builds. On arm64 Linux with KVM, a
//! test boots a real kernel through all of it (PL011 console, vGICv3, PSCI power-off) when
//! `SQUIB_ARM64_KERNEL` and `SQUIB_ARM64_INITRD` name a kernel `Image` and an initrd.

pub mod fdt;
pub mod image;
pub mod layout;

#[cfg(all(test, target_os = "linux", target_arch = "aarch64"))]
mod boot_test;

use squib_hypervisor::aarch64::VcpuSetup;

use fdt::{FdtConfig, FdtError};
use image::{ImageError, ImageHeader};
use layout::{BootPlan, LayoutError, MmioSlot};

/// A failure to prepare an aarch64 boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel is not a loadable arm64 `Image`.
    #[error("invalid kernel image")]
    Image(#[from] ImageError),
    /// The machine shape does not fit the memory map.
    #[error("invalid machine layout")]
    Layout(#[from] LayoutError),
    /// The device tree could not be built.
    #[error("cannot build the device tree")]
    Fdt(#[from] FdtError),
}

/// The shape of the machine to boot.
#[derive(Debug, Clone)]
pub struct MachineShape<'a> {
    /// vCPUs.
    pub vcpu_count: u32,
    /// RAM in bytes, from [`layout::DRAM_BASE`].
    pub mem_size: u64,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Whether the PL011 console exists.
    pub serial: bool,
    /// The virtio-mmio devices, from [`layout::virtio_slot`].
    pub virtio: &'a [MmioSlot],
}

/// Everything the builder writes into guest memory and loads into the boot vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSetup {
    /// Where the kernel, initrd and device tree go.
    pub plan: BootPlan,
    /// The device tree blob, to be written at `plan.fdt_addr`.
    pub fdt: Vec<u8>,
    /// The boot vCPU's entry state ([`squib_hypervisor::Vcpu::configure_aarch64`]).
    pub vcpu: VcpuSetup,
}

/// Plans an aarch64 boot. `kernel` is the raw `Image` (only its header is read, its length
/// counted); `initrd_len` the initrd's size if there is one.
///
/// # Errors
///
/// [`BootError`] naming the part that does not fit.
pub fn prepare_boot(
    kernel: &[u8],
    initrd_len: Option<u64>,
    shape: &MachineShape<'_>,
) -> Result<BootSetup, BootError> {
    let header = ImageHeader::parse(kernel)?;
    let gic = layout::gic_layout(shape.vcpu_count)?;
    let kernel_len = u64::try_from(kernel.len()).unwrap_or(u64::MAX);
    let plan = layout::plan_boot(shape.mem_size, &header, kernel_len, initrd_len)?;
    let fdt = fdt::build_fdt(&FdtConfig {
        mem_base: layout::DRAM_BASE,
        mem_size: shape.mem_size,
        gic,
        serial: shape.serial.then(layout::serial_slot),
        virtio: shape.virtio,
        cmdline: shape.cmdline,
        initrd: plan.initrd,
    })?;
    Ok(BootSetup {
        vcpu: VcpuSetup {
            entry: plan.kernel_addr,
            fdt_addr: plan.fdt_addr,
        },
        plan,
        fdt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_prepare_boot_ties_header_layout_and_fdt_together() {
        let mut kernel = image::tests::header(0, 8 << 20, 0b1010);
        kernel.resize(6 << 20, 0);
        let virtio = [layout::virtio_slot(0).unwrap()];
        let shape = MachineShape {
            vcpu_count: 2,
            mem_size: 256 << 20,
            cmdline: "console=ttyAMA0",
            serial: true,
            virtio: &virtio,
        };
        let boot = prepare_boot(&kernel, Some(4 << 20), &shape).unwrap();
        assert_eq!(boot.vcpu.entry, layout::DRAM_BASE);
        assert_eq!(boot.vcpu.fdt_addr, boot.plan.fdt_addr);
        assert_eq!(boot.plan.kernel_end, layout::DRAM_BASE + (8 << 20));
        // A valid blob: FDT magic, big-endian.
        assert_eq!(boot.fdt[..4], [0xd0, 0x0d, 0xfe, 0xed]);

        assert!(matches!(
            prepare_boot(&kernel[..10], None, &shape),
            Err(BootError::Image(ImageError::TooShort { len: 10 }))
        ));
        let too_many = MachineShape {
            vcpu_count: 500,
            ..shape.clone()
        };
        assert!(matches!(
            prepare_boot(&kernel, None, &too_many),
            Err(BootError::Layout(LayoutError::VcpuCount { .. }))
        ));
        let nul = MachineShape {
            cmdline: "x\0",
            ..shape
        };
        assert!(matches!(
            prepare_boot(&kernel, None, &nul),
            Err(BootError::Fdt(FdtError::CmdlineNul { offset: 1 }))
        ));
    }
}
