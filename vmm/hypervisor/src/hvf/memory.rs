//! Giving memory the guest freed back to the host.
//!
//! When the guest reports pages it no longer uses (a balloon device, free page reporting), the
//! host can drop their contents instead of keeping them resident. [`release_guest_range`] does
//! that with `madvise`: `MADV_FREE_REUSABLE` on macOS, which takes the pages out of the process's
//! footprint at once and lets the mapping (and the framework's stage-2 mapping of it) stay in
//! place; `MADV_FREE` elsewhere. The guest may touch the range again at any time and then sees
//! either the old bytes or zeroes — acceptable only for memory the guest declared free.
//!
//! Only whole pages inside the range are released: a partial page at either end may still hold
//! data the guest uses.

/// A failure to release guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryReleaseError {
    /// The range wraps around the address space.
    #[error("release range {addr:#x}+{len:#x} wraps")]
    InvalidRange {
        /// Start of the range (host virtual address).
        addr: usize,
        /// Its length in bytes.
        len: usize,
    },
    /// `madvise` refused.
    #[error("madvise of {addr:#x}+{len:#x} failed")]
    Madvise {
        /// Start of the page-aligned range.
        addr: usize,
        /// Its length in bytes.
        len: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The whole pages inside `[addr, addr + len)` for a page size of `page` (a power of two):
/// `(start, len)`, with `len == 0` when no whole page fits.
///
/// # Errors
///
/// [`MemoryReleaseError::InvalidRange`] when the range wraps.
pub fn whole_pages(
    addr: usize,
    len: usize,
    page: usize,
) -> Result<(usize, usize), MemoryReleaseError> {
    let end = addr
        .checked_add(len)
        .ok_or(MemoryReleaseError::InvalidRange { addr, len })?;
    let mask = page.saturating_sub(1);
    let start = addr
        .checked_add(mask)
        .ok_or(MemoryReleaseError::InvalidRange { addr, len })?
        & !mask;
    let end = end & !mask;
    Ok((start, end.saturating_sub(start)))
}

/// The advice that drops page contents on this OS.
#[cfg(target_vendor = "apple")]
const RELEASE_ADVICE: libc::c_int = libc::MADV_FREE_REUSABLE;
/// The advice that drops page contents on this OS.
#[cfg(not(target_vendor = "apple"))]
const RELEASE_ADVICE: libc::c_int = libc::MADV_FREE;

/// Releases the whole pages of `[addr, addr + len)`, host memory backing guest RAM that the
/// guest reported free. Returns the number of bytes released.
///
/// # Errors
///
/// [`MemoryReleaseError`] for a wrapping range or when `madvise` refuses.
///
/// # Safety
///
/// The range must be part of an anonymous private mapping that this process owns, and nothing
/// may rely on its contents afterwards (the guest declared it free).
pub unsafe fn release_guest_range(addr: usize, len: usize) -> Result<usize, MemoryReleaseError> {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let (start, bytes) = whole_pages(addr, len, page)?;
    if bytes == 0 {
        return Ok(0);
    }
    // SAFETY: the caller guarantees the range is private anonymous memory whose contents no one
    // needs; the advice changes no mapping, only what backs it.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, bytes, RELEASE_ADVICE) };
    if rc != 0 {
        return Err(MemoryReleaseError::Madvise {
            addr: start,
            len: bytes,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_whole_pages_shrinks_to_page_boundaries() {
        assert_eq!(
            whole_pages(0x1000, 0x3000, 0x1000).unwrap(),
            (0x1000, 0x3000)
        );
        assert_eq!(
            whole_pages(0x1001, 0x3000, 0x1000).unwrap(),
            (0x2000, 0x2000)
        );
        assert_eq!(whole_pages(0x1800, 0x1000, 0x1000).unwrap(), (0x2000, 0));
        assert_eq!(whole_pages(0x1000, 0, 0x4000).unwrap(), (0x4000, 0));
        assert!(matches!(
            whole_pages(usize::MAX - 1, 4, 0x1000),
            Err(MemoryReleaseError::InvalidRange { .. })
        ));
    }

    #[test]
    fn test_release_guest_range_drops_anonymous_pages() {
        // SAFETY: a fresh private anonymous mapping of 4 pages, unmapped below.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let len = 4 * page;
        // SAFETY: as above.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let addr = base as usize;
        // SAFETY: the mapping is ours and writable.
        unsafe { std::ptr::write_bytes(base.cast::<u8>(), 0xaa, len) };
        // Half a page on each side stays: only the two middle pages go.
        // SAFETY: the range is inside our private mapping and its contents are not needed.
        let released = unsafe { release_guest_range(addr + page / 2, 3 * page) }.unwrap();
        assert_eq!(released, 2 * page);
        // The first page is untouched and the mapping is still usable.
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { *base.cast::<u8>() }, 0xaa);
        // SAFETY: inside the mapping.
        unsafe { *base.cast::<u8>().add(2 * page) = 1 };
        // SAFETY: unmapping what we mapped.
        assert_eq!(unsafe { libc::munmap(base, len) }, 0);
    }
}
