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
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
    /// A boot blob could not be written to guest memory.
    #[error("cannot write the {what} ({len} bytes) to guest memory at {gpa:#x}")]
    Load {
        /// Which blob: kernel, initrd or device tree.
        what: &'static str,
        /// Where it was to go.
        gpa: u64,
        /// Its size.
        len: usize,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// An initrd was planned for but not given, or given but not planned for.
    #[error("initrd given: {given}, planned: {planned}")]
    InitrdMismatch {
        /// Whether the loader got initrd bytes.
        given: bool,
        /// Whether the boot plan has room for one.
        planned: bool,
    },
}

/// The guest RAM regions of a machine with `mem_size` bytes: one, at [`layout::DRAM_BASE`].
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    vec![(GuestAddress(layout::DRAM_BASE), mem_size)]
}

/// Writes the kernel, the initrd and the device tree to guest memory where `boot` planned them.
///
/// # Errors
///
/// [`BootError::Load`] when a blob does not fit guest memory, [`BootError::InitrdMismatch`]
/// when `initrd` and the plan disagree.
pub fn load_boot_images(
    memory: &GuestMemoryMmap,
    boot: &BootSetup,
    kernel: &[u8],
    initrd: Option<&[u8]>,
) -> Result<(), BootError> {
    let write = |what: &'static str, gpa: u64, bytes: &[u8]| {
        memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|source| BootError::Load {
                what,
                gpa,
                len: bytes.len(),
                source,
            })
    };
    write("kernel", boot.plan.kernel_addr, kernel)?;
    match (initrd, boot.plan.initrd) {
        (Some(bytes), Some((gpa, _))) => write("initrd", gpa, bytes)?,
        (None, None) => {}
        (given, planned) => {
            return Err(BootError::InitrdMismatch {
                given: given.is_some(),
                planned: planned.is_some(),
            });
        }
    }
    write("device tree", boot.plan.fdt_addr, &boot.fdt)
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

        // The blobs land where the plan says.
        let memory = crate::memory::allocate(&ram_regions(256 << 20)).unwrap();
        let initrd = vec![0x5a; 4 << 20];
        load_boot_images(&memory, &boot, &kernel, Some(&initrd)).unwrap();
        let mut magic = [0u8; 4];
        memory
            .read_slice(&mut magic, GuestAddress(boot.plan.kernel_addr + 0x38))
            .unwrap();
        assert_eq!(&magic, b"ARM\x64");
        let (initrd_gpa, _) = boot.plan.initrd.unwrap();
        let mut byte = [0u8; 1];
        memory
            .read_slice(&mut byte, GuestAddress(initrd_gpa + (4 << 20) - 1))
            .unwrap();
        assert_eq!(byte, [0x5a]);
        memory
            .read_slice(&mut magic, GuestAddress(boot.plan.fdt_addr))
            .unwrap();
        assert_eq!(magic, [0xd0, 0x0d, 0xfe, 0xed]);
        assert!(matches!(
            load_boot_images(&memory, &boot, &kernel, None),
            Err(BootError::InitrdMismatch {
                given: false,
                planned: true
            })
        ));
        let small = crate::memory::allocate(&ram_regions(8 << 20)).unwrap();
        assert!(matches!(
            load_boot_images(&small, &boot, &kernel, Some(&initrd)),
            Err(BootError::Load { what: "initrd", .. })
        ));

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
