//! Identity-mapping page tables for the 64-bit boot protocol.
//!
//! The kernel's 64-bit entry expects paging on and the memory it touches first (itself, the
//! zero page, the command line) identity-mapped. One PML4 entry -> one PDPT entry -> a page
//! directory of 512 2 MiB pages maps the first GiB, where all of that lives.

use super::layout::{PDE_START, PDPTE_START, PML4_START};

/// Present | writable.
const PRESENT_RW: u64 = 0x3;
/// Present | writable | page size (2 MiB leaf).
const PRESENT_RW_HUGE: u64 = 0x83;

/// The three tables, each 512 entries, to be written at `PML4_START`, `PDPTE_START` and
/// `PDE_START`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityTables {
    /// Page-map level 4.
    pub pml4: Vec<u64>,
    /// Page-directory-pointer table.
    pub pdpt: Vec<u64>,
    /// Page directory.
    pub pd: Vec<u64>,
}

/// Builds tables identity-mapping `[0, 1 GiB)`.
pub fn identity_tables() -> IdentityTables {
    let mut pml4 = vec![0u64; 512];
    let mut pdpt = vec![0u64; 512];
    if let Some(e) = pml4.first_mut() {
        *e = PDPTE_START | PRESENT_RW;
    }
    if let Some(e) = pdpt.first_mut() {
        *e = PDE_START | PRESENT_RW;
    }
    let pd = (0u64..512).map(|i| (i << 21) | PRESENT_RW_HUGE).collect();
    IdentityTables { pml4, pdpt, pd }
}

/// CR3 for these tables.
pub const fn cr3() -> u64 {
    PML4_START
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU for a 2 MiB-page mapping.
    fn translate(t: &IdentityTables, va: u64) -> Option<u64> {
        let pml4e = t.pml4[((va >> 39) & 0x1ff) as usize];
        if pml4e & 1 == 0 || pml4e & !0xfff != PDPTE_START {
            return None;
        }
        let pdpte = t.pdpt[((va >> 30) & 0x1ff) as usize];
        if pdpte & 1 == 0 || pdpte & !0xfff != PDE_START {
            return None;
        }
        let pde = t.pd[((va >> 21) & 0x1ff) as usize];
        if pde & 0x81 != 0x81 {
            return None;
        }
        Some((pde & !0x1f_ffff & !0xfff) | (va & 0x1f_ffff))
    }

    #[test]
    fn test_identity_tables_map_first_gib_one_to_one() {
        let t = identity_tables();
        for va in [0u64, 0x7000, 0x100_0000, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&t, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&t, 1 << 30), None);
        assert_eq!(cr3(), 0x9000);
    }
}
