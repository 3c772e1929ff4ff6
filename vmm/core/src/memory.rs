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

/// The size of a transparent huge page on the hosts squib runs on (x86_64, and arm64 with
/// 4 KiB base pages).
const HUGE_PAGE: u64 = 2 << 20;

/// Chooses the host page size for guest RAM: 4 KiB pages everywhere except the `dense`
/// guest-physical ranges `[start, end)` (rounded out to 2 MiB), which may use transparent huge
/// pages. Call it before anything is written to guest memory: pages already present keep
/// their size.
///
/// Why: with transparent huge pages on for every mapping (Debian's kernels), each page the
/// guest touches brings in the 2 MiB around it. A 128 MiB guest that wrote 24.5 MiB while it
/// booted held 28.7 MiB of host memory that way; without huge pages at all its boot took half
/// a second longer under nested KVM, since every 4 KiB page it touched was a fault of its own.
/// The ranges the boot writes from end to end (the kernel image, and the top of RAM where the
/// initrd and the kernel's early allocations go) keep huge pages and most of the speed; the
/// rest, which the guest touches here and there, gets small pages.
///
/// Best effort: a host without transparent huge pages refuses nothing that matters.
pub fn advise_page_sizes(memory: &GuestMemoryMmap, dense: &[(u64, u64)]) {
    for region in memory.iter() {
        let start = region.start_addr().0;
        let len = region.len();
        let Some(end) = start.checked_add(len) else {
            continue;
        };
        advise(region, 0, len, Advice::NoHuge);
        for &(d_start, d_end) in dense {
            let lo = (d_start / HUGE_PAGE * HUGE_PAGE).max(start);
            let hi = d_end.div_ceil(HUGE_PAGE).saturating_mul(HUGE_PAGE).min(end);
            if lo < hi {
                advise(region, lo - start, hi - lo, Advice::Huge);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Advice {
    NoHuge,
    Huge,
}

fn advise(region: &vm_memory::GuestRegionMmap, offset: u64, len: u64, advice: Advice) {
    #[cfg(target_os = "linux")]
    {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(offset)) else {
            return;
        };
        let Ok(len) = usize::try_from(len) else {
            return;
        };
        let flag = match advice {
            Advice::NoHuge => libc::MADV_NOHUGEPAGE,
            Advice::Huge => libc::MADV_HUGEPAGE,
        };
        // SAFETY: `[host, host + len)` lies inside the mapping `region` owns (the offsets come
        // from its own bounds); the advice changes how the kernel backs it, never its contents.
        let ret = unsafe { libc::madvise(host.cast(), len, flag) };
        if ret != 0 {
            tracing::debug!(
                ?advice,
                offset,
                len,
                error = %std::io::Error::last_os_error(),
                "madvise on guest memory failed"
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (region, offset, len, advice);
}

/// The guest-physical ranges a booting Linux writes from end to end: its kernel image, loaded
/// at `kernel_start` and at most `kernel_len` bytes long in memory, and the top of RAM (which
/// ends at `ram_end`), where the initrd (`initrd_len` bytes) and the kernel's early
/// allocations go (about 1/64 of RAM for the page structures, and a few MiB more).
pub fn boot_dense_ranges(
    kernel_start: u64,
    kernel_len: u64,
    ram_end: u64,
    mem_size: u64,
    initrd_len: u64,
) -> [(u64, u64); 2] {
    let top = initrd_len
        .saturating_add(mem_size / 64)
        .saturating_add(4 << 20);
    [
        (kernel_start, kernel_start.saturating_add(kernel_len)),
        (ram_end.saturating_sub(top), ram_end),
    ]
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

    /// The `VmFlags` of the mappings of this process that overlap `[start, end)`, by start.
    fn vm_flags(start: u64, end: u64) -> Vec<(u64, u64, String)> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut out = Vec::new();
        let mut current = None;
        for line in smaps.lines() {
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if let Some((a, b)) = current.take() {
                    out.push((a, b, flags.trim().to_owned()));
                }
            } else if let Some((range, _)) = line.split_once(' ')
                && let Some((a, b)) = range.split_once('-')
                && let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
            {
                current = (a < end && b > start).then_some((a, b));
            }
        }
        out
    }

    #[test]
    fn test_advise_page_sizes_allows_huge_pages_only_in_dense_ranges() {
        let mem = allocate(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let region = mem.iter().next().unwrap();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as u64;
        // One range inside, rounded out to 2 MiB; one past the end of RAM, clipped.
        advise_page_sizes(&mem, &[(17 << 20, 20 << 20), (62 << 20, 80 << 20)]);
        let flags = vm_flags(host, host + (64 << 20));
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            // A kernel without transparent huge pages refuses the advice: nothing changes.
            assert!(flags.iter().all(|(_, _, f)| !f.contains("hg")), "{flags:?}");
            return;
        }
        let huge = |a: u64, b: u64| {
            flags
                .iter()
                .any(|(s, e, f)| *s == host + a && *e == host + b && f.contains("hg"))
        };
        assert!(huge(16 << 20, 20 << 20), "{flags:?}");
        assert!(huge(62 << 20, 64 << 20), "{flags:?}");
        let small: u64 = flags
            .iter()
            .filter(|(_, _, f)| f.split(' ').any(|x| x == "nh"))
            .map(|(s, e, _)| e - s)
            .sum();
        assert_eq!(small, (64 - 4 - 2) << 20, "{flags:?}");
    }

    #[test]
    fn test_boot_dense_ranges_cover_the_kernel_and_the_top_of_ram() {
        let [kernel, top] = boot_dense_ranges(16 << 20, 13 << 20, 128 << 20, 128 << 20, 2 << 20);
        assert_eq!(kernel, (16 << 20, 29 << 20));
        // initrd 2 MiB + 128 MiB / 64 + 4 MiB.
        assert_eq!(top, (120 << 20, 128 << 20));
        let [_, top] = boot_dense_ranges(0, 0, 8 << 20, 8 << 20, 64 << 20);
        assert_eq!(top, (0, 8 << 20));
    }

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
}
