//! PSCI (Arm Power State Coordination Interface, DEN0022) over HVC/SMC, as a pure dispatcher.
//!
//! The guest kernel powers secondary CPUs on and off, and the whole machine down, through PSCI
//! calls: function id in X0, arguments in X1..X3, result in X0. KVM answers them in the kernel;
//! Hypervisor.framework hands them to us as HVC/SMC exits, and [`dispatch`] decides the answer.
//! Per-CPU power state lives behind [`PowerControl`], which the backend implements.
//!
//! squib implements PSCI 1.0 with the SMC Calling Convention's 32-bit and 64-bit function ids:
//! VERSION, CPU_ON, CPU_OFF, AFFINITY_INFO, MIGRATE_INFO_TYPE, SYSTEM_OFF, SYSTEM_RESET and
//! PSCI_FEATURES. Everything else (CPU_SUSPEND, SYSTEM_SUSPEND, SMCCC vendor calls) answers
//! NOT_SUPPORTED, which guests treat as "feature absent".

/// PSCI_VERSION.
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// CPU_SUSPEND, 32-bit convention (not supported).
pub const CPU_SUSPEND_32: u32 = 0x8400_0001;
/// CPU_OFF.
pub const CPU_OFF: u32 = 0x8400_0002;
/// CPU_ON, 32-bit convention.
pub const CPU_ON_32: u32 = 0x8400_0003;
/// CPU_ON, 64-bit convention.
pub const CPU_ON_64: u32 = 0xc400_0003;
/// AFFINITY_INFO, 32-bit convention.
pub const AFFINITY_INFO_32: u32 = 0x8400_0004;
/// AFFINITY_INFO, 64-bit convention.
pub const AFFINITY_INFO_64: u32 = 0xc400_0004;
/// MIGRATE_INFO_TYPE.
pub const MIGRATE_INFO_TYPE: u32 = 0x8400_0006;
/// SYSTEM_OFF.
pub const SYSTEM_OFF: u32 = 0x8400_0008;
/// SYSTEM_RESET.
pub const SYSTEM_RESET: u32 = 0x8400_0009;
/// PSCI_FEATURES.
pub const PSCI_FEATURES: u32 = 0x8400_000a;

/// The PSCI version squib reports: 1.0 (major in bits 31:16).
pub const VERSION_1_0: u32 = 1 << 16;

/// PSCI return codes (signed 32-bit values, sign-extended into X0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum PsciStatus {
    /// The call succeeded.
    Success = 0,
    /// The function is not implemented.
    NotSupported = -1,
    /// An argument is invalid (e.g. an unknown MPIDR).
    InvalidParameters = -2,
    /// The operation is not allowed.
    Denied = -3,
    /// CPU_ON on a CPU that is already on.
    AlreadyOn = -4,
    /// CPU_ON on a CPU whose power-on is still pending.
    OnPending = -5,
    /// The implementation failed.
    InternalFailure = -6,
}

impl PsciStatus {
    /// The value as the guest sees it in X0: the 32-bit code sign-extended to 64 bits.
    pub fn to_x0(self) -> u64 {
        i64::from(self as i32).cast_unsigned()
    }
}

/// The power state of one CPU as AFFINITY_INFO reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffinityState {
    /// Running.
    On = 0,
    /// Powered off.
    Off = 1,
    /// CPU_ON accepted, not running yet.
    OnPending = 2,
}

/// A decoded PSCI call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciCall {
    /// PSCI_VERSION.
    Version,
    /// CPU_ON: start `target_mpidr` at `entry` (guest physical, MMU off) with `context` in X0.
    CpuOn {
        /// MPIDR affinity fields of the CPU to start.
        target_mpidr: u64,
        /// Entry point address.
        entry: u64,
        /// Value for the started CPU's X0.
        context: u64,
    },
    /// CPU_OFF: power the calling CPU down.
    CpuOff,
    /// AFFINITY_INFO for `target_mpidr` at affinity level `lowest_level`.
    AffinityInfo {
        /// MPIDR affinity fields of the CPU asked about.
        target_mpidr: u64,
        /// The lowest affinity level considered; squib supports level 0 only.
        lowest_level: u64,
    },
    /// MIGRATE_INFO_TYPE.
    MigrateInfoType,
    /// SYSTEM_OFF.
    SystemOff,
    /// SYSTEM_RESET.
    SystemReset,
    /// PSCI_FEATURES for `function_id`.
    Features {
        /// The function id asked about.
        function_id: u32,
    },
    /// Anything else, with its function id.
    Unknown {
        /// The function id the guest passed in W0.
        function_id: u32,
    },
}

/// The low 32 bits of a register (a W register's value).
fn low32(x: u64) -> u32 {
    u32::try_from(x & u64::from(u32::MAX)).unwrap_or(u32::MAX)
}

impl PsciCall {
    /// Decodes a call from the guest's X0..X3. Arguments of 32-bit convention calls are
    /// truncated to 32 bits, as SMCCC requires.
    pub fn decode(x0: u64, x1: u64, x2: u64, x3: u64) -> Self {
        // SMCCC: the function id is W0; bits 63:32 of X0 are ignored.
        let function_id = low32(x0);
        let w = |x: u64| x & u64::from(u32::MAX);
        match function_id {
            PSCI_VERSION => Self::Version,
            CPU_OFF => Self::CpuOff,
            CPU_ON_32 => Self::CpuOn {
                target_mpidr: w(x1),
                entry: w(x2),
                context: w(x3),
            },
            CPU_ON_64 => Self::CpuOn {
                target_mpidr: x1,
                entry: x2,
                context: x3,
            },
            AFFINITY_INFO_32 => Self::AffinityInfo {
                target_mpidr: w(x1),
                lowest_level: w(x2),
            },
            AFFINITY_INFO_64 => Self::AffinityInfo {
                target_mpidr: x1,
                lowest_level: x2,
            },
            MIGRATE_INFO_TYPE => Self::MigrateInfoType,
            SYSTEM_OFF => Self::SystemOff,
            SYSTEM_RESET => Self::SystemReset,
            PSCI_FEATURES => Self::Features {
                function_id: low32(x1),
            },
            function_id => Self::Unknown { function_id },
        }
    }
}

/// Per-CPU power state, owned by the backend. Both calls may come from any vCPU thread.
pub trait PowerControl {
    /// Marks the CPU with affinity `target_mpidr` to start at `entry` with `context` in X0 and
    /// wakes it. Returns [`PsciStatus::Success`], [`PsciStatus::AlreadyOn`],
    /// [`PsciStatus::OnPending`] or [`PsciStatus::InvalidParameters`] for an unknown MPIDR.
    fn cpu_on(&self, target_mpidr: u64, entry: u64, context: u64) -> PsciStatus;

    /// The power state of the CPU with affinity `target_mpidr`; `None` for an unknown MPIDR.
    fn affinity_info(&self, target_mpidr: u64) -> Option<AffinityState>;
}

/// What the vCPU must do after a PSCI call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PsciOutcome {
    /// Write this value into X0 and resume the guest.
    Return(u64),
    /// Power the calling vCPU off: park it until another CPU_ON targets it.
    CpuOff,
    /// The guest powered the machine off.
    SystemOff,
    /// The guest asked for a reset.
    SystemReset,
}

/// MIGRATE_INFO_TYPE answer: no Trusted OS that would need migrating is present.
const MIGRATE_TYPE_NO_TRUSTED_OS: u64 = 2;

/// Answers one PSCI call.
pub fn dispatch(call: PsciCall, power: &dyn PowerControl) -> PsciOutcome {
    let ret = |status: PsciStatus| PsciOutcome::Return(status.to_x0());
    match call {
        PsciCall::Version => PsciOutcome::Return(u64::from(VERSION_1_0)),
        PsciCall::CpuOn {
            target_mpidr,
            entry,
            context,
        } => ret(power.cpu_on(target_mpidr, entry, context)),
        PsciCall::CpuOff => PsciOutcome::CpuOff,
        PsciCall::AffinityInfo {
            target_mpidr,
            lowest_level,
        } => {
            if lowest_level != 0 {
                return ret(PsciStatus::InvalidParameters);
            }
            match power.affinity_info(target_mpidr) {
                Some(state) => PsciOutcome::Return(state as u64),
                None => ret(PsciStatus::InvalidParameters),
            }
        }
        PsciCall::MigrateInfoType => PsciOutcome::Return(MIGRATE_TYPE_NO_TRUSTED_OS),
        PsciCall::SystemOff => PsciOutcome::SystemOff,
        PsciCall::SystemReset => PsciOutcome::SystemReset,
        PsciCall::Features { function_id } => match function_id {
            PSCI_VERSION | CPU_OFF | CPU_ON_32 | CPU_ON_64 | AFFINITY_INFO_32
            | AFFINITY_INFO_64 | MIGRATE_INFO_TYPE | SYSTEM_OFF | SYSTEM_RESET | PSCI_FEATURES => {
                ret(PsciStatus::Success)
            }
            _ => ret(PsciStatus::NotSupported),
        },
        PsciCall::Unknown { .. } => ret(PsciStatus::NotSupported),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<(u64, u64, u64)>>,
    }

    impl PowerControl for Recorder {
        fn cpu_on(&self, target_mpidr: u64, entry: u64, context: u64) -> PsciStatus {
            self.calls.borrow_mut().push((target_mpidr, entry, context));
            match target_mpidr {
                0 => PsciStatus::AlreadyOn,
                1 => PsciStatus::Success,
                _ => PsciStatus::InvalidParameters,
            }
        }
        fn affinity_info(&self, target_mpidr: u64) -> Option<AffinityState> {
            match target_mpidr {
                0 => Some(AffinityState::On),
                1 => Some(AffinityState::Off),
                _ => None,
            }
        }
    }

    fn run(x: [u64; 4], power: &Recorder) -> PsciOutcome {
        dispatch(PsciCall::decode(x[0], x[1], x[2], x[3]), power)
    }

    #[test]
    fn test_psci_version_is_1_0() {
        let power = Recorder::default();
        assert_eq!(
            run([u64::from(PSCI_VERSION), 0, 0, 0], &power),
            PsciOutcome::Return(0x1_0000)
        );
        // Bits 63:32 of X0 are not part of the function id.
        assert_eq!(
            run([0xdead_0000_8400_0000, 0, 0, 0], &power),
            PsciOutcome::Return(0x1_0000)
        );
    }

    #[test]
    fn test_psci_cpu_on_passes_target_entry_context_and_status() {
        let power = Recorder::default();
        assert_eq!(
            run(
                [u64::from(CPU_ON_64), 1, 0x8020_0000, 0xffff_0000_1234],
                &power
            ),
            PsciOutcome::Return(0)
        );
        assert_eq!(
            run([u64::from(CPU_ON_64), 0, 0x8020_0000, 0], &power),
            PsciOutcome::Return(PsciStatus::AlreadyOn.to_x0())
        );
        // 32-bit convention truncates its arguments.
        assert_eq!(
            run(
                [
                    u64::from(CPU_ON_32),
                    0xffff_ffff_0000_0001,
                    0x1_8000_0000,
                    0x1_0000_0007
                ],
                &power
            ),
            PsciOutcome::Return(0)
        );
        assert_eq!(
            run([u64::from(CPU_ON_64), 9, 0, 0], &power),
            PsciOutcome::Return((-2i64).cast_unsigned())
        );
        assert_eq!(
            *power.calls.borrow(),
            vec![
                (1, 0x8020_0000, 0xffff_0000_1234),
                (0, 0x8020_0000, 0),
                (1, 0x8000_0000, 7),
                (9, 0, 0)
            ]
        );
    }

    #[test]
    fn test_psci_power_and_system_calls() {
        let power = Recorder::default();
        assert_eq!(
            run([u64::from(CPU_OFF), 0, 0, 0], &power),
            PsciOutcome::CpuOff
        );
        assert_eq!(
            run([u64::from(SYSTEM_OFF), 0, 0, 0], &power),
            PsciOutcome::SystemOff
        );
        assert_eq!(
            run([u64::from(SYSTEM_RESET), 0, 0, 0], &power),
            PsciOutcome::SystemReset
        );
        assert_eq!(
            run([u64::from(AFFINITY_INFO_64), 1, 0, 0], &power),
            PsciOutcome::Return(1)
        );
        assert_eq!(
            run([u64::from(AFFINITY_INFO_32), 0, 0, 0], &power),
            PsciOutcome::Return(0)
        );
        assert_eq!(
            run([u64::from(AFFINITY_INFO_64), 0, 1, 0], &power),
            PsciOutcome::Return(PsciStatus::InvalidParameters.to_x0())
        );
        assert_eq!(
            run([u64::from(AFFINITY_INFO_64), 5, 0, 0], &power),
            PsciOutcome::Return(PsciStatus::InvalidParameters.to_x0())
        );
        assert_eq!(
            run([u64::from(MIGRATE_INFO_TYPE), 0, 0, 0], &power),
            PsciOutcome::Return(2)
        );
    }

    #[test]
    fn test_psci_features_and_unknown_calls() {
        let power = Recorder::default();
        assert_eq!(
            run(
                [u64::from(PSCI_FEATURES), u64::from(CPU_ON_64), 0, 0],
                &power
            ),
            PsciOutcome::Return(0)
        );
        assert_eq!(
            run(
                [u64::from(PSCI_FEATURES), u64::from(CPU_SUSPEND_32), 0, 0],
                &power
            ),
            PsciOutcome::Return(u64::MAX)
        );
        // SMCCC_VERSION and anything unknown: NOT_SUPPORTED (-1).
        assert_eq!(
            run([0x8000_0000, 0, 0, 0], &power),
            PsciOutcome::Return(u64::MAX)
        );
        assert_eq!(
            run([u64::from(CPU_SUSPEND_32), 0, 0, 0], &power),
            PsciOutcome::Return(u64::MAX)
        );
    }
}
