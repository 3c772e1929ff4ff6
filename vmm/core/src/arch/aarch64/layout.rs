//! The aarch64 guest-physical memory map, and where the kernel, device tree and initrd go.
//!
//! Devices sit below 2 GiB and RAM starts at 2 GiB, close to QEMU's `virt` board:
//!
//! | range                     | what                                              |
//! |---------------------------|---------------------------------------------------|
//! | 0x0800_0000 + 64 KiB      | GICv3 distributor                                 |
//! | 0x080a_0000 .. 0x0900_0000 | GICv3 redistributors, 128 KiB per vCPU (123 max) |
//! | 0x0900_0000 + 4 KiB       | PL011 UART, SPI 1                                 |
//! | 0x0a00_0000 + 4 KiB × 32  | virtio-mmio devices, SPIs 16..48                  |
//! | 0x8000_0000 ..            | RAM                                               |
//!
//! RAM holds, from the bottom: the kernel at RAM base + `text_offset` (the base is 2 MiB
//! aligned, as the arm64 boot protocol asks), then free memory, then the initrd, then the device
//! tree in the last 2 MiB aligned 2 MiB of RAM (the kernel maps the tree with 2 MiB blocks and
//! wants it alone in its block).

use squib_hypervisor::aarch64::{GICV3_REDISTRIBUTOR_SIZE, GicV3Layout};

use super::image::{BASE_ALIGN, ImageHeader};

/// Start of RAM.
pub const DRAM_BASE: u64 = 0x8000_0000;
/// Highest guest-physical address + 1 that RAM may reach: Hypervisor.framework's default
/// intermediate physical address space is 36 bits.
pub const DRAM_LIMIT: u64 = 1 << 36;
/// GICv3 distributor base.
pub const GIC_DISTRIBUTOR_BASE: u64 = 0x0800_0000;
/// GICv3 redistributor region base.
pub const GIC_REDISTRIBUTOR_BASE: u64 = 0x080a_0000;
/// End of the space reserved for redistributors.
pub const GIC_REDISTRIBUTOR_LIMIT: u64 = 0x0900_0000;
/// Bytes reserved for redistributors (a backend whose GIC claims a fixed region checks it fits).
pub const GIC_REDISTRIBUTOR_SPACE: u64 = GIC_REDISTRIBUTOR_LIMIT - GIC_REDISTRIBUTOR_BASE;
/// PL011 UART base.
pub const SERIAL_BASE: u64 = 0x0900_0000;
/// PL011 register window.
pub const SERIAL_SIZE: u64 = 0x1000;
/// The UART's SPI number.
pub const SERIAL_SPI: u32 = 1;
/// First virtio-mmio device.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// One page per virtio-mmio device.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// At most this many virtio-mmio devices.
pub const VIRTIO_MMIO_COUNT: u32 = 32;
/// SPI of the first virtio-mmio device; device `n` uses `VIRTIO_MMIO_FIRST_SPI + n`.
pub const VIRTIO_MMIO_FIRST_SPI: u32 = 16;
/// Room reserved for the device tree (the arm64 boot protocol's limit).
pub const FDT_MAX_SIZE: u64 = 2 << 20;
/// Alignment of the initrd's start.
pub const INITRD_ALIGN: u64 = 64 << 10;

/// A memory map request that cannot be satisfied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The vCPU count does not fit the redistributor space.
    #[error("vcpu_count {vcpu_count} is outside 1..={max}")]
    VcpuCount {
        /// Requested vCPUs.
        vcpu_count: u32,
        /// The most the layout holds.
        max: u32,
    },
    /// RAM too large for the address space.
    #[error("mem_size {mem_size:#x} does not fit between {DRAM_BASE:#x} and {DRAM_LIMIT:#x}")]
    MemoryTooLarge {
        /// Requested RAM in bytes.
        mem_size: u64,
    },
    /// RAM too small for kernel, initrd and device tree.
    #[error("mem_size {mem_size:#x} is too small: kernel, initrd and device tree need {needed:#x}")]
    MemoryTooSmall {
        /// Requested RAM in bytes.
        mem_size: u64,
        /// Bytes from RAM base needed.
        needed: u64,
    },
    /// A virtio-mmio slot beyond the reserved window.
    #[error("virtio-mmio slot {index} is beyond the {VIRTIO_MMIO_COUNT} the layout holds")]
    VirtioSlot {
        /// The slot asked for.
        index: u32,
    },
}

/// The GICv3 placement for `vcpu_count` vCPUs.
///
/// # Errors
///
/// [`LayoutError::VcpuCount`] for zero or more vCPUs than the redistributor space holds.
pub fn gic_layout(vcpu_count: u32) -> Result<GicV3Layout, LayoutError> {
    let max = max_vcpus();
    if vcpu_count == 0 || vcpu_count > max {
        return Err(LayoutError::VcpuCount { vcpu_count, max });
    }
    Ok(GicV3Layout {
        distributor_base: GIC_DISTRIBUTOR_BASE,
        redistributor_base: GIC_REDISTRIBUTOR_BASE,
        vcpu_count,
    })
}

/// The most vCPUs the redistributor space holds.
pub fn max_vcpus() -> u32 {
    let frames = GIC_REDISTRIBUTOR_SPACE / GICV3_REDISTRIBUTOR_SIZE;
    u32::try_from(frames).unwrap_or(u32::MAX)
}

/// A device's MMIO window and interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest-physical base.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
    /// SPI number (the interrupt line's `gsi`).
    pub spi: u32,
}

/// The UART's window and interrupt.
pub fn serial_slot() -> MmioSlot {
    MmioSlot {
        base: SERIAL_BASE,
        size: SERIAL_SIZE,
        spi: SERIAL_SPI,
    }
}

/// The window and interrupt of virtio-mmio device `index`.
///
/// # Errors
///
/// [`LayoutError::VirtioSlot`] past the reserved window.
pub fn virtio_slot(index: u32) -> Result<MmioSlot, LayoutError> {
    if index >= VIRTIO_MMIO_COUNT {
        return Err(LayoutError::VirtioSlot { index });
    }
    Ok(MmioSlot {
        base: VIRTIO_MMIO_BASE + u64::from(index) * VIRTIO_MMIO_SIZE,
        size: VIRTIO_MMIO_SIZE,
        spi: VIRTIO_MMIO_FIRST_SPI + index,
    })
}

/// Where each boot blob goes in RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootPlan {
    /// Load address of the kernel image, and the first instruction executed.
    pub kernel_addr: u64,
    /// First byte after the kernel's memory footprint (bss included).
    pub kernel_end: u64,
    /// Start and length of the initrd, when there is one.
    pub initrd: Option<(u64, u64)>,
    /// Address of the device tree.
    pub fdt_addr: u64,
    /// First byte after RAM.
    pub ram_end: u64,
}

fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

/// Places kernel, initrd and device tree in `mem_size` bytes of RAM at [`DRAM_BASE`].
/// `kernel_len` is the image file's length, used when the header gives no image size.
///
/// # Errors
///
/// [`LayoutError::MemoryTooLarge`] or [`LayoutError::MemoryTooSmall`].
pub fn plan_boot(
    mem_size: u64,
    header: &ImageHeader,
    kernel_len: u64,
    initrd_len: Option<u64>,
) -> Result<BootPlan, LayoutError> {
    let ram_end = DRAM_BASE
        .checked_add(mem_size)
        .filter(|end| *end <= DRAM_LIMIT)
        .ok_or(LayoutError::MemoryTooLarge { mem_size })?;
    // DRAM_BASE is 2 MiB aligned, so the kernel goes at the lowest place the protocol allows
    // whatever the header's placement flag says.
    let kernel_addr = DRAM_BASE + header.text_offset;
    let footprint = header.image_size.unwrap_or(0).max(kernel_len);
    let too_small = |extra: u64| LayoutError::MemoryTooSmall {
        mem_size,
        needed: header
            .text_offset
            .saturating_add(footprint)
            .saturating_add(extra)
            .saturating_add(FDT_MAX_SIZE),
    };
    let kernel_end = kernel_addr
        .checked_add(footprint)
        .ok_or_else(|| too_small(0))?;
    let fdt_addr = align_down(ram_end.saturating_sub(FDT_MAX_SIZE), BASE_ALIGN);
    if fdt_addr < kernel_end || fdt_addr < DRAM_BASE {
        return Err(too_small(initrd_len.unwrap_or(0)));
    }
    let initrd = match initrd_len {
        None => None,
        Some(len) => {
            let start = fdt_addr
                .checked_sub(len)
                .map(|start| align_down(start, INITRD_ALIGN))
                .filter(|start| *start >= kernel_end)
                .ok_or_else(|| too_small(len))?;
            Some((start, len))
        }
    };
    Ok(BootPlan {
        kernel_addr,
        kernel_end,
        initrd,
        fdt_addr,
        ram_end,
    })
}

#[cfg(test)]
mod tests {
    use super::super::image::tests::header;
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn test_gic_layout_limits_vcpus_to_redistributor_space() {
        assert_eq!(max_vcpus(), 123);
        let gic = gic_layout(4).unwrap();
        assert_eq!(
            gic.redistributor_base + gic.redistributor_region_size(),
            0x0812_0000
        );
        assert_eq!(
            gic_layout(0),
            Err(LayoutError::VcpuCount {
                vcpu_count: 0,
                max: 123
            })
        );
        assert!(gic_layout(124).is_err());
        assert!(
            gic_layout(123).unwrap().redistributor_base
                + gic_layout(123).unwrap().redistributor_region_size()
                <= SERIAL_BASE
        );
    }

    #[test]
    fn test_virtio_slots_are_pages_with_consecutive_spis() {
        assert_eq!(
            virtio_slot(0).unwrap(),
            MmioSlot {
                base: 0x0a00_0000,
                size: 0x1000,
                spi: 16
            }
        );
        assert_eq!(virtio_slot(31).unwrap().base, 0x0a01_f000);
        assert_eq!(virtio_slot(31).unwrap().spi, 47);
        assert_eq!(virtio_slot(32), Err(LayoutError::VirtioSlot { index: 32 }));
    }

    #[test]
    fn test_plan_boot_places_kernel_initrd_and_fdt() {
        let h = ImageHeader::parse(&header(0, 40 * MIB, 0b1010)).unwrap();
        let plan = plan_boot(256 * MIB, &h, 30 * MIB, Some(10 * MIB + 5)).unwrap();
        assert_eq!(plan.kernel_addr, DRAM_BASE);
        assert_eq!(plan.kernel_end, DRAM_BASE + 40 * MIB, "bss counted");
        assert_eq!(plan.ram_end, DRAM_BASE + 256 * MIB);
        assert_eq!(plan.fdt_addr, DRAM_BASE + 254 * MIB);
        let (start, len) = plan.initrd.unwrap();
        assert_eq!(len, 10 * MIB + 5);
        assert_eq!(start % INITRD_ALIGN, 0);
        assert!(start + len <= plan.fdt_addr);
        assert!(start >= plan.kernel_end);

        // A legacy kernel keeps its 512 KiB text offset and counts its file length.
        let legacy = ImageHeader::parse(&header(0, 0, 0)).unwrap();
        let plan = plan_boot(64 * MIB, &legacy, 20 * MIB, None).unwrap();
        assert_eq!(plan.kernel_addr, DRAM_BASE + 0x8_0000);
        assert_eq!(plan.kernel_end, DRAM_BASE + 0x8_0000 + 20 * MIB);
        assert_eq!(plan.initrd, None);
        // RAM not a multiple of 2 MiB: the tree still sits in an aligned block inside RAM.
        let plan = plan_boot(65 * MIB, &legacy, 20 * MIB, None).unwrap();
        assert_eq!(plan.fdt_addr, DRAM_BASE + 62 * MIB);
    }

    #[test]
    fn test_plan_boot_rejects_memory_that_does_not_fit() {
        let h = ImageHeader::parse(&header(0, 40 * MIB, 0)).unwrap();
        assert_eq!(
            plan_boot(40 * MIB, &h, 1, None),
            Err(LayoutError::MemoryTooSmall {
                mem_size: 40 * MIB,
                needed: 42 * MIB
            })
        );
        assert!(matches!(
            plan_boot(64 * MIB, &h, 1, Some(30 * MIB)),
            Err(LayoutError::MemoryTooSmall { .. })
        ));
        assert_eq!(
            plan_boot(DRAM_LIMIT, &h, 1, None),
            Err(LayoutError::MemoryTooLarge {
                mem_size: DRAM_LIMIT
            })
        );
    }
}
