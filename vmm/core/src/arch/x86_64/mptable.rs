//! The Intel MultiProcessor Specification 1.4 table that tells a kernel without ACPI how many
//! CPUs there are and how the IOAPIC is wired.
//!
//! Layout (MP spec chapter 4): a 16-byte floating pointer ("_MP_") followed by the
//! configuration table ("PCMP") header and its entries: one processor entry per vCPU, one ISA
//! bus, one IOAPIC, an I/O interrupt entry per IOAPIC pin (ISA line n on pin n) and the two local interrupt entries
//! (LINT0 = ExtINT, LINT1 = NMI). Each structure's bytes sum to zero. The table lives in the
//! last KiB below 640 KiB, where the kernel's MP scan looks.

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX};

/// A failure to build the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    /// Too many CPUs for the table's space (or for 8-bit APIC ids).
    #[error("vcpu_count {vcpu_count} does not fit in the MP table (1..={max})")]
    TooManyCpus {
        /// The requested count.
        vcpu_count: u8,
        /// The largest count that fits.
        max: u8,
    },
}

/// The most CPUs the table supports.
pub const MAX_CPUS: u8 = 32;
/// Space available for the whole table (the EBDA's first KiB).
const TABLE_SPACE: usize = 1024;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const LOCAL_APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// The guest address where [`build`]'s bytes go.
pub const MPTABLE_START: u64 = EBDA_START;

/// Builds the table for `vcpu_count` CPUs (APIC ids `0..vcpu_count`, CPU 0 the bootstrap
/// processor), to be written at [`MPTABLE_START`].
///
/// # Errors
///
/// [`MpTableError::TooManyCpus`] for zero or more than [`MAX_CPUS`] CPUs.
pub fn build(vcpu_count: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpu_count == 0 || vcpu_count > MAX_CPUS {
        return Err(MpTableError::TooManyCpus {
            vcpu_count,
            max: MAX_CPUS,
        });
    }
    let ioapic_id = vcpu_count;
    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;

    for cpu in 0..vcpu_count {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, LOCAL_APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC): informational only.
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes());
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        entry_count += 1;
    }

    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entry_count += 1;

    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&u32::try_from(IOAPIC_START).unwrap_or(0).to_le_bytes());
    entry_count += 1;

    for pin in 0..=IRQ_MAX {
        let pin = u8::try_from(pin).unwrap_or(u8::MAX);
        // Every pin is a vectored interrupt, ISA line n on pin n. The 8259's ExtINT path goes
        // through LINT0 (below), not through an IOAPIC pin: Linux refuses an ExtINT pin that
        // its probe of the in-kernel IOAPIC does not find wired.
        // Flags 0: polarity and trigger mode conform to the bus (ISA: active high, edge).
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            pin,
            ioapic_id,
            pin,
        ]);
        entry_count += 1;
    }

    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        // Destination 0xff: every local APIC.
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        entry_count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    if FLOATING_POINTER_LEN + table_len > TABLE_SPACE {
        return Err(MpTableError::TooManyCpus {
            vcpu_count,
            max: MAX_CPUS,
        });
    }
    let table_addr = MPTABLE_START + FLOATING_POINTER_LEN as u64;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&u16::try_from(table_len).unwrap_or(0).to_le_bytes());
    header.push(4); // specification revision 1.4
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"SQUIB   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&entry_count.to_le_bytes());
    header.extend_from_slice(&u32::try_from(APIC_START).unwrap_or(0).to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    header.push(0);
    header.push(0);

    let mut table = header;
    table.extend_from_slice(&entries);
    let sum = checksum(&table);
    if let Some(b) = table.get_mut(7) {
        *b = sum;
    }

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&u32::try_from(table_addr).unwrap_or(0).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // specification revision 1.4
    out.push(0); // checksum, filled below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: a configuration table is present
    let sum = checksum(&out);
    if let Some(b) = out.get_mut(10) {
        *b = sum;
    }
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn test_mptable_checksums_are_zero() {
        for n in [1u8, 2, 4, 32] {
            let t = build(n).unwrap();
            assert_eq!(sum(&t[..16]), 0, "floating pointer, {n} cpus");
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(t.len(), 16 + len);
            assert_eq!(sum(&t[16..]), 0, "config table, {n} cpus");
        }
    }

    #[test]
    fn test_mptable_lists_one_processor_per_vcpu() {
        let t = build(4).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(u32::from_le_bytes([t[4], t[5], t[6], t[7]]), 0x9fc10);
        assert_eq!(&t[16..20], b"PCMP");
        let count = u16::from_le_bytes([t[16 + 34], t[16 + 35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        let entries = &t[16 + 44..];
        let cpus: Vec<(u8, u8)> = entries.chunks(20).take(4).map(|e| (e[0], e[1])).collect();
        assert_eq!(cpus, vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
        assert_eq!(entries[3] & CPU_BOOTSTRAP, CPU_BOOTSTRAP);
        assert_eq!(entries[20 + 3] & CPU_BOOTSTRAP, 0);
    }

    #[test]
    fn test_mptable_rejects_zero_and_too_many_cpus() {
        assert!(matches!(build(0), Err(MpTableError::TooManyCpus { .. })));
        assert!(matches!(build(33), Err(MpTableError::TooManyCpus { .. })));
        assert!(build(32).unwrap().len() <= 1024);
    }
}
