//! Segment descriptors for the boot GDT and the matching hidden segment state.
//!
//! Descriptor layout per the Intel SDM, volume 3, section 3.4.5: base in bits 16..40 and
//! 56..64, limit in bits 0..16 and 48..52, type/S/DPL/P in 40..48, AVL/L/D/G in 52..56. The
//! `flags` argument packs bits 40..56 (access byte, then the limit's high nibble position
//! holding the AVL/L/D/G nibble), e.g. `0xa09b` is a present, ring-0, 64-bit code segment.

use squib_hypervisor::x86_64::Segment;

/// 64-bit code, execute/read, accessed, 4 KiB granularity.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// 32-bit code, execute/read, accessed, 4 KiB granularity.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// 32-bit data, read/write, accessed, 4 KiB granularity.
pub const DATA_FLAGS: u16 = 0xc093;
/// Busy 32/64-bit TSS.
pub const TSS_FLAGS: u16 = 0x008b;

/// Selector of GDT entry 1 (code).
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of GDT entry 2 (data).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of GDT entry 3 (TSS).
pub const TSS_SELECTOR: u16 = 0x18;

/// Encodes a segment descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The hidden segment state a CPU holds after loading descriptor `entry` through `selector`.
pub fn segment_from_entry(entry: u64, selector: u16) -> Segment {
    let bit = |n: u32| (entry >> n) & 1 == 1;
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granular = bit(55);
    // With 4 KiB granularity the low 12 bits of the effective limit read as ones.
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    Segment {
        base,
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: u8::try_from((entry >> 40) & 0xf).unwrap_or(0),
        present: bit(47),
        dpl: u8::try_from((entry >> 45) & 0x3).unwrap_or(0),
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granular,
        avl: bit(52),
        unusable: !bit(47),
    }
}

/// The boot GDT: null, code (64-bit for long mode, 32-bit for the PVH entry), data, TSS.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code = if long_mode {
        CODE64_FLAGS
    } else {
        CODE32_FLAGS
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0x67),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gdt_entry_matches_known_encodings() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(TSS_FLAGS, 0, 0x67), 0x0000_8b00_0000_0067);
        assert_eq!(
            gdt_entry(DATA_FLAGS, 0x1234_5678, 0xabcde),
            0x12ca_9334_5678_bcde
        );
    }

    #[test]
    fn test_segment_from_entry_decodes_long_mode_code() {
        let seg = segment_from_entry(gdt_entry(CODE64_FLAGS, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x08);
        assert_eq!(seg.type_, 0xb);
        assert!(seg.present && seg.s && seg.l && seg.g && !seg.db && !seg.unusable);
        assert_eq!(seg.dpl, 0);
    }

    #[test]
    fn test_segment_from_entry_decodes_tss_without_granularity() {
        let seg = segment_from_entry(gdt_entry(TSS_FLAGS, 0x1000, 0x67), TSS_SELECTOR);
        assert_eq!((seg.base, seg.limit, seg.type_), (0x1000, 0x67, 0xb));
        assert!(!seg.s && !seg.g && seg.present);
    }

    #[test]
    fn test_segment_from_entry_null_is_unusable() {
        assert!(segment_from_entry(0, 0).unusable);
    }
}
