//! The x86_64 guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4, then PDPT, PD (identity map)
//! 0x0000_0520  IDT (empty)              0x0009_fc00  MP table (last KiB below 640 KiB)
//! 0x0000_6000  PVH start info + tables  0x0002_0000  kernel command line
//! 0x0000_7000  boot_params (zero page)  0x0010_0000  high memory: kernel, then initrd at the top
//! 0x0000_8ff0  boot stack (grows down)  0xc000_0000  32-bit MMIO gap up to 4 GiB:
//!                                           0xd000_0000  virtio-mmio devices, 4 KiB each
//!                                           0xfec0_0000  IOAPIC, 0xfee0_0000 local APICs
//! 0x1_0000_0000 RAM above 4 GiB, when the VM has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// The GDT the boot code installs.
pub const GDT_START: u64 = 0x500;
/// An empty IDT (the kernel installs its own before enabling interrupts).
pub const IDT_START: u64 = 0x520;
/// The PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// The PVH module list (the initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// The PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// How many PVH memory map entries fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;
/// The Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The identity-mapping page tables: PML4, PDPT, PD, one page each.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 entries of 2 MiB: the first GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, terminating NUL included (Linux's x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and initrd may live (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-mmio windows the layout reserves (up to the IOAPIC).
pub const VIRTIO_MMIO_MAX_DEVICES: u64 = 0x1000;
/// First IOAPIC pin handed to virtio-mmio devices (0..=4 are the legacy ISA lines in use).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last IOAPIC pin (the in-kernel IOAPIC has 24).
pub const IRQ_MAX: u32 = 23;
/// The IOAPIC's MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// The 8250 UART's I/O port base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// IRQ of the first UART.
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 command port (0x64); writing 0xfe there resets the machine.
pub const I8042_PORT: u16 = 0x64;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's physical memory map (E820 / PVH memmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The RAM regions for `mem_size_bytes` of guest memory: one below the MMIO gap and, when the
/// memory does not fit there, a second one from 4 GiB.
pub fn ram_regions(mem_size_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(MMIO_GAP_END), mem_size_bytes - MMIO_GAP_START),
        ]
    }
}

/// The memory map the guest is told about: low RAM up to the EBDA (which holds the MP table),
/// RAM from 1 MiB up to the end of the first region, RAM above 4 GiB, and the MMIO gap as
/// reserved so that nothing is placed there.
pub fn memory_map(mem_size_bytes: u64) -> Vec<MemoryMapEntry> {
    let mut map = vec![MemoryMapEntry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    for (start, size) in ram_regions(mem_size_bytes) {
        let (addr, size) = if start.0 == 0 {
            (HIMEM_START, size.saturating_sub(HIMEM_START))
        } else {
            (start.0, size)
        };
        if size > 0 {
            map.push(MemoryMapEntry {
                addr,
                size,
                kind: E820_RAM,
            });
        }
    }
    map.push(MemoryMapEntry {
        addr: MMIO_GAP_START,
        size: MMIO_GAP_END - MMIO_GAP_START,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// End (exclusive) of the RAM that starts at 0, where the initrd is placed.
pub fn low_ram_end(mem_size_bytes: u64) -> u64 {
    mem_size_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_ram_regions_fit_below_gap_when_small() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn test_ram_regions_split_around_mmio_gap() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![
                (GuestAddress(0), 0xc000_0000),
                (GuestAddress(0x1_0000_0000), 0x4000_0000)
            ]
        );
    }

    #[test]
    fn test_memory_map_skips_legacy_hole_and_reserves_gap() {
        let map = memory_map(256 << 20);
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0x10_0000,
                    size: (256 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0xc000_0000,
                    size: 0x4000_0000,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn test_memory_map_lists_ram_above_4g() {
        let map = memory_map(5 << 30);
        assert!(map.contains(&MemoryMapEntry {
            addr: 0x1_0000_0000,
            size: 2 << 30,
            kind: E820_RAM
        }));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, (5 << 30) - 0x10_0000 + 0x9fc00);
    }

    #[test]
    fn test_virtio_windows_stay_below_ioapic() {
        const {
            assert!(VIRTIO_MMIO_START + VIRTIO_MMIO_MAX_DEVICES * VIRTIO_MMIO_SIZE <= IOAPIC_START);
            assert!(VIRTIO_MMIO_START >= MMIO_GAP_START);
        }
    }
}
