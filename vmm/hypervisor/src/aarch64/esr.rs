//! Decoding of the exception syndrome (ESR_EL2) a guest exit reports.
//!
//! Hypervisor.framework reports every guest access to unmapped guest-physical memory as a data
//! abort taken to EL2. When the syndrome is valid (ISV set), it names the access size, the
//! general-purpose register involved, the direction and how a load extends its value; that is
//! enough to emulate the access as an MMIO read or write without decoding the instruction. This
//! module turns the raw syndrome into a [`DataAbort`] and back into register values, with no
//! hypervisor call involved, so it is unit-tested on every host.
//!
//! Field positions follow the Arm Architecture Reference Manual (ESR_ELx, "ISS encoding for an
//! exception from a Data Abort", and the trapped-instruction classes).

/// Exception class: a WFI or WFE instruction was trapped.
pub const EC_WFX: u8 = 0x01;
/// Exception class: HVC executed in AArch64 state.
pub const EC_HVC64: u8 = 0x16;
/// Exception class: SMC executed in AArch64 state.
pub const EC_SMC64: u8 = 0x17;
/// Exception class: an MSR, MRS or system instruction was trapped.
pub const EC_SYSREG: u8 = 0x18;
/// Exception class: data abort from a lower exception level (the guest).
pub const EC_DATA_ABORT_LOWER: u8 = 0x24;
/// Exception class: data abort without a change of exception level.
pub const EC_DATA_ABORT_SAME: u8 = 0x25;

const ISS_MASK: u64 = (1 << 25) - 1;
const IL_BIT: u64 = 1 << 25;
const ISV_BIT: u64 = 1 << 24;
const SSE_BIT: u64 = 1 << 21;
const SF_BIT: u64 = 1 << 15;
const CM_BIT: u64 = 1 << 8;
const S1PTW_BIT: u64 = 1 << 7;
const WNR_BIT: u64 = 1 << 6;

/// Register number 31 in a load or store's transfer register field: the zero register.
pub const XZR: u8 = 31;

/// The exception class (bits 31:26) of a syndrome.
pub fn exception_class(esr: u64) -> u8 {
    // Six bits: the mask makes the truncation exact.
    ((esr >> 26) & 0x3f) as u8
}

/// The instruction-specific syndrome (bits 24:0).
pub fn iss(esr: u64) -> u32 {
    // Twenty-five bits: the mask makes the truncation exact.
    (esr & ISS_MASK) as u32
}

/// Whether the trapped instruction was 32 bits long (IL). Always the case for A64 code.
pub fn is_32bit_instruction(esr: u64) -> bool {
    esr & IL_BIT != 0
}

/// A data abort that cannot be emulated as a single MMIO access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DataAbortError {
    /// The syndrome is not a data abort at all.
    #[error("exception class {ec:#x} is not a data abort (esr {esr:#x})")]
    NotDataAbort {
        /// The exception class found.
        ec: u8,
        /// The whole syndrome.
        esr: u64,
    },
    /// ISV is clear: the instruction (load/store pair, register write-back, SIMD register, or an
    /// atomic) gives no syndrome to emulate it by. Guests must use plain loads and stores on MMIO.
    #[error("data abort without a valid instruction syndrome (esr {esr:#x})")]
    NoSyndrome {
        /// The whole syndrome.
        esr: u64,
    },
    /// The fault happened while the guest's MMU walked its own page tables, which sit in memory
    /// the guest does not have.
    #[error("stage-1 page table walk faulted on unbacked memory (esr {esr:#x})")]
    PageTableWalk {
        /// The whole syndrome.
        esr: u64,
    },
    /// A cache maintenance instruction targeted MMIO space.
    #[error("cache maintenance on mmio space (esr {esr:#x})")]
    CacheMaintenance {
        /// The whole syndrome.
        esr: u64,
    },
}

/// One emulatable MMIO access, decoded from a data abort syndrome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataAbort {
    /// Access size in bytes: 1, 2, 4 or 8.
    pub len: usize,
    /// The guest stored to memory (WnR).
    pub is_write: bool,
    /// The general-purpose register transferred (0..=30), or [`XZR`].
    pub register: u8,
    /// A load sign-extends the value it reads (SSE).
    pub sign_extend: bool,
    /// The register is 64 bits wide (SF); a load into a 32-bit register clears bits 63:32.
    pub register_64bit: bool,
}

impl DataAbort {
    /// Decodes a data abort syndrome.
    ///
    /// # Errors
    ///
    /// [`DataAbortError`] when the syndrome is no data abort or describes an access that cannot
    /// be emulated from the syndrome alone.
    pub fn decode(esr: u64) -> Result<Self, DataAbortError> {
        let ec = exception_class(esr);
        if ec != EC_DATA_ABORT_LOWER && ec != EC_DATA_ABORT_SAME {
            return Err(DataAbortError::NotDataAbort { ec, esr });
        }
        if esr & S1PTW_BIT != 0 {
            return Err(DataAbortError::PageTableWalk { esr });
        }
        if esr & ISV_BIT == 0 {
            return Err(DataAbortError::NoSyndrome { esr });
        }
        if esr & CM_BIT != 0 {
            return Err(DataAbortError::CacheMaintenance { esr });
        }
        // SAS, bits 23:22: log2 of the access size.
        let len = 1usize << ((esr >> 22) & 0x3);
        Ok(Self {
            len,
            is_write: esr & WNR_BIT != 0,
            // SRT, bits 20:16: five bits.
            register: ((esr >> 16) & 0x1f) as u8,
            sign_extend: esr & SSE_BIT != 0,
            register_64bit: esr & SF_BIT != 0,
        })
    }

    /// The bytes a store writes, little-endian, taken from the transfer register's value.
    /// `register_value` is ignored for [`XZR`], which stores zeroes.
    pub fn write_data(&self, register_value: u64) -> ([u8; 8], usize) {
        let value = if self.register == XZR {
            0
        } else {
            register_value
        };
        (value.to_le_bytes(), self.len)
    }

    /// The value a load leaves in the transfer register, from the little-endian bytes the device
    /// returned (at most 8; missing bytes read as zero). Applies sign extension (SSE) and the
    /// width of the destination register (SF). Returns `None` for [`XZR`], whose loads are
    /// discarded.
    pub fn read_value(&self, data: &[u8]) -> Option<u64> {
        if self.register == XZR {
            return None;
        }
        let mut bytes = [0u8; 8];
        for (dst, src) in bytes.iter_mut().zip(data.iter().take(self.len)) {
            *dst = *src;
        }
        let mut value = u64::from_le_bytes(bytes);
        let bits = self.len * 8;
        if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            // Arithmetic shift right of the value moved to the top replicates its sign bit.
            value = (value.cast_signed() << shift >> shift).cast_unsigned();
        }
        if !self.register_64bit {
            value &= u64::from(u32::MAX);
        }
        Some(value)
    }
}

/// The kind of wait instruction a [`EC_WFX`] exit trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitKind {
    /// WFI (or WFIT): wait for an interrupt.
    Interrupt,
    /// WFE (or WFET): wait for an event.
    Event,
}

/// Decodes the TI field of a WFx syndrome.
pub fn wait_kind(esr: u64) -> WaitKind {
    // TI, bits 1:0: 0 = WFI, 1 = WFE, 2 = WFIT, 3 = WFET.
    if esr & 1 == 0 {
        WaitKind::Interrupt
    } else {
        WaitKind::Event
    }
}

/// A trapped MSR/MRS access to a system register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SysRegAccess {
    /// Op0, Op1, CRn, CRm, Op2 packed as in the MRS encoding: `op0:op1:crn:crm:op2` (16 bits).
    pub encoding: u16,
    /// The general-purpose register transferred, or [`XZR`].
    pub register: u8,
    /// MRS (read of the system register into `register`).
    pub is_read: bool,
}

impl SysRegAccess {
    /// Decodes an [`EC_SYSREG`] syndrome.
    pub fn decode(esr: u64) -> Self {
        // The masks make each truncation exact.
        let op0 = ((esr >> 20) & 0x3) as u16;
        let op2 = ((esr >> 17) & 0x7) as u16;
        let op1 = ((esr >> 14) & 0x7) as u16;
        let crn = ((esr >> 10) & 0xf) as u16;
        let crm = ((esr >> 1) & 0xf) as u16;
        Self {
            encoding: (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2,
            register: ((esr >> 5) & 0x1f) as u8,
            is_read: esr & 1 != 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a data abort syndrome from its fields.
    fn da(sas: u64, sse: bool, srt: u64, sf: bool, wnr: bool) -> u64 {
        (u64::from(EC_DATA_ABORT_LOWER) << 26)
            | IL_BIT
            | ISV_BIT
            | (sas << 22)
            | (u64::from(sse) << 21)
            | (srt << 16)
            | (u64::from(sf) << 15)
            | (u64::from(wnr) << 6)
    }

    #[test]
    fn test_data_abort_decodes_sizes_register_and_direction() {
        for (sas, len) in [(0, 1), (1, 2), (2, 4), (3, 8)] {
            let abort = DataAbort::decode(da(sas, false, 7, true, true)).unwrap();
            assert_eq!(abort.len, len);
            assert!(abort.is_write);
            assert_eq!(abort.register, 7);
        }
        let read = DataAbort::decode(da(2, false, 30, false, false)).unwrap();
        assert!(!read.is_write);
        assert!(!read.register_64bit);
        assert_eq!(read.register, 30);
    }

    #[test]
    fn test_data_abort_accepts_same_level_class() {
        let esr =
            da(0, false, 1, true, false) & !(0x3f << 26) | (u64::from(EC_DATA_ABORT_SAME) << 26);
        assert_eq!(DataAbort::decode(esr).unwrap().len, 1);
    }

    #[test]
    fn test_data_abort_rejects_missing_syndrome_and_walks() {
        let no_isv = da(2, false, 1, true, false) & !ISV_BIT;
        assert_eq!(
            DataAbort::decode(no_isv),
            Err(DataAbortError::NoSyndrome { esr: no_isv })
        );
        let walk = da(2, false, 1, true, false) | S1PTW_BIT;
        assert_eq!(
            DataAbort::decode(walk),
            Err(DataAbortError::PageTableWalk { esr: walk })
        );
        let cm = da(2, false, 1, true, true) | CM_BIT;
        assert_eq!(
            DataAbort::decode(cm),
            Err(DataAbortError::CacheMaintenance { esr: cm })
        );
        let hvc = u64::from(EC_HVC64) << 26;
        assert_eq!(
            DataAbort::decode(hvc),
            Err(DataAbortError::NotDataAbort {
                ec: EC_HVC64,
                esr: hvc
            })
        );
    }

    #[test]
    fn test_data_abort_write_data_truncates_and_zero_register_stores_zero() {
        let abort = DataAbort::decode(da(1, false, 3, true, true)).unwrap();
        let (bytes, len) = abort.write_data(0x1122_3344_5566_7788);
        assert_eq!(&bytes[..len], &[0x88, 0x77]);
        let xzr = DataAbort::decode(da(3, false, 31, true, true)).unwrap();
        let (bytes, len) = xzr.write_data(0xffff_ffff_ffff_ffff);
        assert_eq!(&bytes[..len], &[0; 8]);
    }

    #[test]
    fn test_data_abort_read_value_sign_extends_by_register_width() {
        // LDRSB Xt: sign extend a byte into 64 bits.
        let ldrsb_x = DataAbort::decode(da(0, true, 2, true, false)).unwrap();
        assert_eq!(ldrsb_x.read_value(&[0x80]), Some(0xffff_ffff_ffff_ff80));
        assert_eq!(ldrsb_x.read_value(&[0x7f]), Some(0x7f));
        // LDRSH Wt: sign extend a halfword into 32 bits, upper half cleared.
        let ldrsh_w = DataAbort::decode(da(1, true, 2, false, false)).unwrap();
        assert_eq!(ldrsh_w.read_value(&[0x00, 0x80]), Some(0xffff_8000));
        // LDRSW Xt.
        let ldrsw = DataAbort::decode(da(2, true, 2, true, false)).unwrap();
        assert_eq!(
            ldrsw.read_value(&[0, 0, 0, 0x80]),
            Some(0xffff_ffff_8000_0000)
        );
        // LDR Wt: zero extension.
        let ldr_w = DataAbort::decode(da(2, false, 2, false, false)).unwrap();
        assert_eq!(ldr_w.read_value(&[0xff; 4]), Some(0xffff_ffff));
        // LDR Xt, 8 bytes: nothing to extend.
        let ldr_x = DataAbort::decode(da(3, true, 2, true, false)).unwrap();
        assert_eq!(
            ldr_x.read_value(&[1, 2, 3, 4, 5, 6, 7, 0x88]),
            Some(0x8807_0605_0403_0201)
        );
        // Loads into XZR are discarded.
        let xzr = DataAbort::decode(da(2, false, 31, true, false)).unwrap();
        assert_eq!(xzr.read_value(&[1, 2, 3, 4]), None);
    }

    #[test]
    fn test_wait_kind_and_sysreg_decode() {
        assert_eq!(wait_kind(u64::from(EC_WFX) << 26), WaitKind::Interrupt);
        assert_eq!(wait_kind((u64::from(EC_WFX) << 26) | 1), WaitKind::Event);
        // MRS x3, OSLSR_EL1: op0=2 op1=0 CRn=1 CRm=1 op2=4.
        let esr = (u64::from(EC_SYSREG) << 26)
            | (2 << 20)
            | (4 << 17)
            | (1 << 10)
            | (3 << 5)
            | (1 << 1)
            | 1;
        let access = SysRegAccess::decode(esr);
        assert_eq!(access.encoding, (2 << 14) | (1 << 7) | (1 << 3) | 4);
        assert_eq!(access.register, 3);
        assert!(access.is_read);
        assert_eq!(exception_class(esr), EC_SYSREG);
    }
}
