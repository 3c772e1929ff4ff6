//! Guest memory: anonymous host mappings (`vm-memory` [`GuestMemoryMmap`]) registered with the
//! hypervisor, one slot per region.

use squib_hypervisor::{HypervisorError, Vm};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A failure to create or register guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A region's size does not fit the host's address width.
    #[error("guest memory region at {gpa:#x} of {size_bytes} bytes is too large for this host")]
    RegionTooLarge {
        /// Guest physical start.
        gpa: u64,
        /// Size in bytes.
        size_bytes: u64,
    },
    /// The host refused the anonymous mapping.
    #[error("cannot allocate {size_bytes} bytes of guest memory")]
    Allocate {
        /// Total size asked for.
        size_bytes: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The hypervisor refused a region.
    #[error("cannot map guest memory slot {slot} at {gpa:#x} ({size_bytes} bytes)")]
    Map {
        /// Memory slot.
        slot: u32,
        /// Guest physical start.
        gpa: u64,
        /// Size in bytes.
        size_bytes: u64,
        /// The backend's error.
        #[source]
        source: HypervisorError,
    },
    /// A region's host address could not be had.
    #[error("guest memory region at {gpa:#x} has no host address")]
    HostAddress {
        /// Guest physical start.
        gpa: u64,
    },
}

/// Allocates guest memory for `regions` (guest physical start, size in bytes).
///
/// Known shortcoming: the mapping takes whatever page size the host's transparent huge page
/// policy gives it. Where that is `always` (Debian's kernels), each page the guest touches
/// brings in the 2 MiB around it, and a booted 128 MiB guest holds 28.7 MiB of host memory
/// for the 24.5 MiB it touched (measured with pagemap in the VM test host, 2026-12-05: three
/// dense clusters, the kernel image, the top of RAM and the first 6 MiB, plus partly used
/// 2 MiB pieces at their edges). Backing guest RAM with 4 KiB pages instead
/// (`MADV_NOHUGEPAGE`) gave those 4.6 MiB back but made every first touch of a guest page a
/// fault of its own: under nested KVM the boot took 0.5 s longer, and with huge pages kept
/// only for the kernel image and the top of RAM, reading 64 MiB in the guest ran at 0.12x the
/// host instead of 0.42x and `ctr run` took 2.0x runc instead of 1.7x (`make bench`, same
/// test host either way). Speed won, except in the two ranges the x86_64 loader knows the
/// guest to use sparsely ([`prefer_small_pages`]; an idle container went from 33.1 to 29.7 MiB
/// with that, 2026-12-05); free page reporting (virtio-balloon) would be the way to return
/// the rest without the faults' cost.
///
/// # Errors
///
/// [`MemoryError::RegionTooLarge`] or [`MemoryError::Allocate`].
pub fn allocate(regions: &[(GuestAddress, u64)]) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = regions
        .iter()
        .map(|(gpa, size)| {
            usize::try_from(*size)
                .map(|s| (*gpa, s))
                .map_err(|_| MemoryError::RegionTooLarge {
                    gpa: gpa.0,
                    size_bytes: *size,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        size_bytes: regions.iter().map(|(_, s)| *s).sum(),
        source,
    })
}

/// Asks the host to back guest RAM in `[gpa, gpa + len)` with 4 KiB pages
/// (`MADV_NOHUGEPAGE`): for ranges the guest touches only here and there, where a 2 MiB page
/// would hold mostly memory nobody uses. The advice must come before the range is first
/// touched (it does not split a huge page already there). Parts of the range outside guest RAM
/// are ignored. Without transparent huge pages (other hosts) this does nothing.
///
/// # Errors
///
/// The `madvise` error; the range then keeps the host's default page size.
pub fn prefer_small_pages(memory: &GuestMemoryMmap, gpa: u64, len: u64) -> std::io::Result<()> {
    for region in memory.iter() {
        let start = region.start_addr().0;
        let from = gpa.max(start) & !0xfff;
        let to = gpa.saturating_add(len).min(start + region.len());
        if from >= to {
            continue;
        }
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(from - start))
            .map_err(|e| std::io::Error::other(format!("guest address {from:#x}: {e}")))?;
        let bytes = usize::try_from(to - from).map_err(std::io::Error::other)?;
        advise_no_huge_pages(host, bytes)?;
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn advise_no_huge_pages(host: *mut u8, bytes: usize) -> std::io::Result<()> {
    // SAFETY: the range lies inside one of the guest memory's mappings (checked by the caller
    // against the region's bounds), and MADV_NOHUGEPAGE changes only the size of the pages
    // the kernel backs it with, never its contents or its mapping.
    let rc = unsafe { libc::madvise(host.cast(), bytes, libc::MADV_NOHUGEPAGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_no_huge_pages(_host: *mut u8, _bytes: usize) -> std::io::Result<()> {
    Ok(())
}

/// Registers every region of `memory` with `vm`, slot numbers from 0.
///
/// The caller keeps `memory` alive for as long as `vm` may run vCPUs (the microVM owns both
/// and drops its vCPU threads first).
///
/// # Errors
///
/// [`MemoryError::Map`] naming the slot the hypervisor refused.
pub fn map_into(vm: &dyn Vm, memory: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(memory.iter()) {
        let gpa = region.start_addr().0;
        let size_bytes = region.len();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress { gpa })?;
        // SAFETY: the mapping belongs to `memory`, which the microVM keeps until after every
        // vCPU has stopped and the VM is dropped (see this function's contract).
        unsafe { vm.map_memory(slot, gpa, host as u64, size_bytes, false) }.map_err(|source| {
            MemoryError::Map {
                slot,
                gpa,
                size_bytes,
                source,
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn test_allocate_creates_regions_at_their_addresses() {
        let mem = allocate(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x100_0000), 0x1000),
        ])
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x100_0ffc))
            .unwrap();
        assert!(mem.write_obj(1u32, GuestAddress(0x20_0000)).is_err());
    }

    /// The `VmFlags` line of this process's mapping that contains `addr`.
    #[cfg(target_os = "linux")]
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = (a..b).contains(&addr);
            } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return flags.trim().to_owned();
            }
        }
        panic!("no mapping contains {addr:#x}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn test_prefer_small_pages_advises_only_the_range_inside_guest_ram() {
        let mem = allocate(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
        // Reaches past the end of guest RAM: that part is ignored, not an error.
        prefer_small_pages(&mem, 0x60_0000, 0x40_0000).unwrap();
        let flags = |gpa| vm_flags(host(gpa)).split(' ').any(|f| f == "nh");
        assert!(flags(0x60_0000));
        assert!(flags(0x7f_f000));
        assert!(!flags(0x5f_f000));
        // Wholly outside guest RAM: nothing to do.
        prefer_small_pages(&mem, 0x100_0000, 0x20_0000).unwrap();
    }
}
