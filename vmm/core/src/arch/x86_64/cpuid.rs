//! The CPUID table a vCPU sees: the hypervisor's supported leaves, filtered for this VM.
//!
//! Changes from what the host offers: the hypervisor bit (leaf 1 ECX bit 31) set; the initial
//! APIC id and logical CPU count in leaf 1 EBX; a topology of `vcpu_count` single-thread cores
//! in one package, told through leaf 4 (Intel cache sharing), leaf 0xb (extended topology) and
//! leaf 0x8000_0008 ECX (AMD core count); AMD's TOPOEXT and leaf 0x8000_001e dropped so the
//! guest uses the legacy AMD path that matches 0x8000_0008; leaf 0x1f dropped (0xb says the
//! same); and, when the TSC frequency is known, the hypervisor timing leaf 0x4000_0010.

use squib_hypervisor::x86_64::CpuidEntry;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const ECX_AMD_CMP_LEGACY: u32 = 1 << 1;
const ECX_AMD_TOPOEXT: u32 = 1 << 22;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// Number of bits needed to hold ids `0..count`.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (count - 1).leading_zeros()
    }
}

/// Returns the CPUID table for vCPU `index` of `count` (APIC id = index).
pub fn filter(
    supported: &[CpuidEntry],
    index: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> Vec<CpuidEntry> {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    let mut out: Vec<CpuidEntry> = Vec::with_capacity(supported.len() + 3);
    for entry in supported {
        let mut e = *entry;
        match e.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical CPUs, [15:8] CLFLUSH size / 8.
                e.ebx = (apic_id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                e.edx |= EDX_HTT;
            }
            LEAF_CACHE_PARAMS => {
                // EAX: [31:26] cores per package - 1, [25:14] threads sharing the cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY | LEAF_AMD_TOPOLOGY => continue,
            LEAF_HYPERVISOR_BASE if tsc_khz.is_some() => {
                e.eax = e.eax.max(LEAF_HYPERVISOR_TIMING);
            }
            LEAF_HYPERVISOR_TIMING => continue,
            LEAF_EXT_FEATURES => {
                e.ecx &= !ECX_AMD_TOPOEXT;
                if count > 1 {
                    e.ecx |= ECX_AMD_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_AMD_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES => {
                // ECX: [15:12] APIC id bits for the core id, [7:0] cores - 1.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(count) << 12) | ((count - 1) & 0xff);
            }
            _ => {}
        }
        out.push(e);
    }
    let has_leaf_0xb = supported
        .iter()
        .any(|e| e.function == 0 && e.eax >= LEAF_EXT_TOPOLOGY);
    if has_leaf_0xb {
        // Sub-leaf 0: SMT level, one thread per core. Sub-leaf 1: core level, `count` cores.
        // Sub-leaf 2: invalid level, ending the enumeration. EDX: x2APIC id.
        let levels = [
            (0u32, 0u32, 1u32, 1u32),
            (1, id_bits(count), count, 2),
            (2, 0, 0, 0),
        ];
        for (sub, shift, cpus, kind) in levels {
            out.push(CpuidEntry {
                function: LEAF_EXT_TOPOLOGY,
                index: sub,
                index_significant: true,
                eax: shift,
                ebx: cpus,
                ecx: (kind << 8) | sub,
                edx: apic_id,
            });
        }
    }
    if let Some(khz) = tsc_khz {
        out.push(CpuidEntry {
            function: LEAF_HYPERVISOR_TIMING,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, significant: bool, regs: [u32; 4]) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            index_significant: significant,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        }
    }

    fn host() -> Vec<CpuidEntry> {
        vec![
            leaf(0, 0, false, [0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            leaf(
                1,
                0,
                false,
                [0x806ec, 0x1122_3344, 0x0000_0001, 0x0000_0001],
            ),
            leaf(4, 0, true, [0x0000_0121, 0, 0, 0]),
            leaf(4, 3, true, [0x0000_0163, 0, 0, 0]),
            leaf(0xb, 0, true, [1, 2, 0x100, 7]),
            leaf(0x1f, 0, true, [1, 2, 0x100, 7]),
            leaf(
                0x4000_0000,
                0,
                false,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            leaf(0x8000_0001, 0, false, [0, 0, ECX_AMD_TOPOEXT, 0]),
            leaf(0x8000_0008, 0, false, [0x3030, 0, 0xffff, 0]),
            leaf(0x8000_001e, 0, false, [1, 1, 1, 0]),
        ]
    }

    fn find(t: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *t.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn test_cpuid_filter_sets_hypervisor_bit_and_apic_id() {
        let t = filter(&host(), 3, 4, None);
        let l1 = find(&t, 1, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xff, 0x44);
        assert_ne!(l1.edx & EDX_HTT, 0);
    }

    #[test]
    fn test_cpuid_filter_writes_topology_for_vcpu_count() {
        let t = filter(&host(), 2, 4, None);
        let smt = find(&t, 0xb, 0);
        let core = find(&t, 0xb, 1);
        let end = find(&t, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
        assert_eq!(t.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(
            t.iter()
                .all(|e| e.function != 0x1f && e.function != 0x8000_001e)
        );
        assert_eq!(find(&t, 4, 0).eax >> 26, 3);
        assert_eq!((find(&t, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&t, 4, 3).eax >> 14) & 0xfff, 3);
        let amd = find(&t, 0x8000_0008, 0);
        assert_eq!((amd.ecx & 0xff, (amd.ecx >> 12) & 0xf), (3, 2));
        assert_eq!(find(&t, 0x8000_0001, 0).ecx & ECX_AMD_TOPOEXT, 0);
    }

    #[test]
    fn test_cpuid_filter_adds_timing_leaf_when_tsc_known() {
        let t = filter(&host(), 0, 1, Some(2_500_000));
        assert_eq!(find(&t, 0x4000_0000, 0).eax, 0x4000_0010);
        let timing = find(&t, 0x4000_0010, 0);
        assert_eq!((timing.eax, timing.ebx), (2_500_000, 1_000_000));
        let t = filter(&host(), 0, 1, None);
        assert!(t.iter().all(|e| e.function != 0x4000_0010));
        assert_eq!(find(&t, 0x4000_0000, 0).eax, 0x4000_0001);
    }

    #[test]
    fn test_id_bits_rounds_up_to_power_of_two() {
        assert_eq!([1, 2, 3, 4, 5, 32].map(id_bits), [0, 1, 2, 2, 3, 5]);
    }
}
