//! Per-vCPU power state and wake-ups: the mailbox through which PSCI CPU_ON starts a parked vCPU.
//!
//! Every vCPU thread is created by the generic vCPU loop at boot and calls `run`; a vCPU that is
//! powered off (every secondary at boot, or one that called CPU_OFF) blocks inside `run` on its
//! [`CpuSlot`] until CPU_ON from another vCPU posts an entry point, or until it is kicked. The
//! generic loop therefore needs no PSCI knowledge, and behaves exactly as under KVM, whose
//! in-kernel PSCI parks secondaries the same way.
//!
//! The slot's wake sequence number also serves WFI: a vCPU waiting for an interrupt sleeps until
//! the number moves (an SPI was raised, a kick, a CPU_ON) or its timer deadline passes.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::aarch64::index_of_mpidr;
use crate::aarch64::psci::{AffinityState, PowerControl, PsciStatus};

/// The power state of one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Power {
    /// Parked until CPU_ON.
    Off,
    /// CPU_ON accepted: start at `entry` with `context` in X0 when next scheduled.
    OnPending {
        /// Entry point (guest physical).
        entry: u64,
        /// Value for X0.
        context: u64,
    },
    /// Running guest code.
    On,
}

#[derive(Debug)]
pub(crate) struct SlotState {
    pub(crate) power: Power,
    /// Set by a kick; consumed by the vCPU's next `run`.
    pub(crate) kicked: bool,
    /// The framework handle while the vCPU exists, for kicks from other threads.
    pub(crate) handle: Option<u64>,
    /// Moves on every event that ends a wait: kick, CPU_ON, a raised interrupt line.
    pub(crate) wake_seq: u64,
}

/// One vCPU's mailbox.
#[derive(Debug)]
pub(crate) struct CpuSlot {
    pub(crate) state: Mutex<SlotState>,
    pub(crate) wake: Condvar,
}

/// Why a wait on a [`CpuSlot`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The wake sequence moved or the power state changed.
    Woken,
    /// The deadline passed.
    TimedOut,
}

impl CpuSlot {
    fn new() -> Self {
        Self {
            state: Mutex::new(SlotState {
                power: Power::Off,
                kicked: false,
                handle: None,
                wake_seq: 0,
            }),
            wake: Condvar::new(),
        }
    }

    /// Bumps the wake sequence and wakes the vCPU if it waits.
    pub(crate) fn poke(&self) {
        let mut state = self.state.lock();
        state.wake_seq = state.wake_seq.wrapping_add(1);
        self.wake.notify_all();
    }

    /// The current wake sequence number.
    #[cfg(test)]
    pub(crate) fn wake_seq(&self) -> u64 {
        self.state.lock().wake_seq
    }

    /// Waits until the wake sequence differs from `seen`, a kick is pending, or `deadline`
    /// passes (no deadline: wait for an event).
    pub(crate) fn wait_for_event(&self, seen: u64, deadline: Option<Instant>) -> WaitEnd {
        let mut state = self.state.lock();
        loop {
            if state.wake_seq != seen || state.kicked {
                return WaitEnd::Woken;
            }
            match deadline {
                Some(deadline) => {
                    if self.wake.wait_until(&mut state, deadline).timed_out() {
                        return if state.wake_seq != seen || state.kicked {
                            WaitEnd::Woken
                        } else {
                            WaitEnd::TimedOut
                        };
                    }
                }
                None => self.wake.wait(&mut state),
            }
        }
    }
}

/// The power slots of all vCPUs of a VM, indexed by vCPU index.
#[derive(Debug)]
pub(crate) struct PowerTable {
    slots: Vec<Arc<CpuSlot>>,
}

impl PowerTable {
    /// Slots for `vcpu_count` vCPUs, all powered off.
    pub(crate) fn new(vcpu_count: u32) -> Self {
        Self {
            slots: (0..vcpu_count).map(|_| Arc::new(CpuSlot::new())).collect(),
        }
    }

    /// The slot of vCPU `index`.
    pub(crate) fn slot(&self, index: u32) -> Option<&Arc<CpuSlot>> {
        self.slots.get(usize::try_from(index).ok()?)
    }

    fn slot_of_mpidr(&self, mpidr: u64) -> Option<&Arc<CpuSlot>> {
        self.slot(index_of_mpidr(mpidr)?)
    }

    /// Wakes every vCPU waiting for an interrupt: the GIC routes SPIs itself, so any of them
    /// may be the target.
    pub(crate) fn poke_all(&self) {
        for slot in &self.slots {
            slot.poke();
        }
    }
}

impl PowerControl for PowerTable {
    fn cpu_on(&self, target_mpidr: u64, entry: u64, context: u64) -> PsciStatus {
        let Some(slot) = self.slot_of_mpidr(target_mpidr) else {
            return PsciStatus::InvalidParameters;
        };
        let mut state = slot.state.lock();
        match state.power {
            Power::On => PsciStatus::AlreadyOn,
            Power::OnPending { .. } => PsciStatus::OnPending,
            Power::Off => {
                state.power = Power::OnPending { entry, context };
                state.wake_seq = state.wake_seq.wrapping_add(1);
                slot.wake.notify_all();
                PsciStatus::Success
            }
        }
    }

    fn affinity_info(&self, target_mpidr: u64) -> Option<AffinityState> {
        let slot = self.slot_of_mpidr(target_mpidr)?;
        Some(match slot.state.lock().power {
            Power::On => AffinityState::On,
            Power::OnPending { .. } => AffinityState::OnPending,
            Power::Off => AffinityState::Off,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn test_power_table_cpu_on_states() {
        let table = PowerTable::new(2);
        assert_eq!(table.affinity_info(1), Some(AffinityState::Off));
        assert_eq!(table.cpu_on(1, 0x8000_0000, 7), PsciStatus::Success);
        assert_eq!(table.affinity_info(1), Some(AffinityState::OnPending));
        assert_eq!(table.cpu_on(1, 0x8000_0000, 7), PsciStatus::OnPending);
        table.slot(1).unwrap().state.lock().power = Power::On;
        assert_eq!(table.cpu_on(1, 0x8000_0000, 7), PsciStatus::AlreadyOn);
        assert_eq!(table.cpu_on(2, 0, 0), PsciStatus::InvalidParameters);
        assert_eq!(table.affinity_info(0x100), None);
    }

    #[test]
    fn test_cpu_slot_wait_ends_on_poke_or_deadline() {
        let table = Arc::new(PowerTable::new(1));
        let slot = table.slot(0).unwrap().clone();
        let seen = slot.wake_seq();
        let start = Instant::now();
        assert_eq!(
            slot.wait_for_event(seen, Some(start + Duration::from_millis(20))),
            WaitEnd::TimedOut
        );
        assert!(start.elapsed() >= Duration::from_millis(20));
        let poker = {
            let table = table.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                table.poke_all();
            })
        };
        assert_eq!(slot.wait_for_event(seen, None), WaitEnd::Woken);
        poker.join().unwrap();
        // An event that happened before the wait started is not lost.
        assert_eq!(slot.wait_for_event(seen, None), WaitEnd::Woken);
    }
}
