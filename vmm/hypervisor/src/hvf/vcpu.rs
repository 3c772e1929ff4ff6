//! An HVF vCPU: runs the guest and turns framework exits into backend-neutral [`VmExit`]s.
//!
//! What the exit handling does, per exit:
//!
//! - **Data abort** (MMIO): the syndrome is decoded ([`DataAbort`]); a store returns
//!   [`VmExit::MmioWrite`] with the register's bytes, a load returns [`VmExit::MmioRead`]. The
//!   load's value is written into the target register (sign-extended as the syndrome says) at the
//!   start of the next `run`, and only then PC moves past the instruction.
//! - **HVC / SMC**: a PSCI call, answered through [`psci::dispatch`] against the VM's power
//!   table. HVC leaves PC on the next instruction already; SMC traps on itself, so PC moves by 4.
//!   CPU_OFF parks the vCPU inside `run`; SYSTEM_OFF and SYSTEM_RESET end `run` with
//!   [`VmExit::Shutdown`] and [`VmExit::Reset`].
//! - **Virtual timer** — the rule: the framework reports `VTIMER_ACTIVATED` when the guest's
//!   timer condition (CNTV_CTL_EL0: ENABLE set, IMASK clear, ISTATUS set) becomes true, and masks
//!   the vtimer so it does not report it again. We then make the timer's PPI pending on this
//!   vCPU's redistributor and leave the vtimer masked. Before every later entry into the guest
//!   we read CNTV_CTL_EL0: while the condition still holds the line stays high (masked, pending);
//!   once the guest has cleared it (new CVAL in the future, IMASK set or timer disabled), the
//!   level-sensitive line drops: we clear the pending bit and only then unmask, so the next
//!   expiry is reported again. Unmasking earlier would make the framework exit at once, forever;
//!   never unmasking would lose every later tick.
//! - **WFI**: the thread sleeps instead of spinning, until an interrupt line is raised, the
//!   vCPU is kicked or powered, or the guest's timer deadline (computed from CNTV_CVAL_EL0 and
//!   the virtual counter) passes. WFE only yields the thread: it waits for events that other
//!   vCPUs send with SEV, which do not trap, so sleeping on it could stall spinlocks.
//! - **System register traps** (registers the framework does not handle itself, e.g. the OS lock
//!   and debug registers): read as zero, writes ignored.
//!
//! # Limitations
//!
//! SGIs that one vCPU sends another go through the framework's GIC without any exit, so a
//! vCPU sleeping in WFI cannot be told about them. It checks its redistributor's pending bits
//! before sleeping and sleeps at most [`WFI_MAX_SLICE`] at a time; an IPI sent during the
//! sleep waits that long at worst. A userspace GIC that sees every SGI would remove the bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::HvfError;
use super::ffi::{
    HV_EXIT_REASON_CANCELED, HV_EXIT_REASON_EXCEPTION, HV_EXIT_REASON_VTIMER_ACTIVATED,
    HV_REG_CPSR, HV_REG_PC, HV_REG_X0, HV_SYS_REG_CNTV_CTL_EL0, HV_SYS_REG_CNTV_CVAL_EL0,
    HV_SYS_REG_MPIDR_EL1, HV_SYS_REG_SCTLR_EL1, hv_vcpu_exit_exception_t, hv_vcpu_exit_t,
};
use super::ops::{VcpuOps, VmOps};
use super::power::{CpuSlot, Power, PowerTable};
use crate::aarch64::esr::{
    self, DataAbort, EC_DATA_ABORT_LOWER, EC_DATA_ABORT_SAME, EC_HVC64, EC_SMC64, EC_SYSREG,
    EC_WFX, SysRegAccess, WaitKind, XZR,
};
use crate::aarch64::psci::{self, PsciCall, PsciOutcome};
use crate::aarch64::{PSTATE_EL1H_DAIF_MASKED, VcpuSetup, mpidr_of};
use crate::{HypervisorError, Vcpu, VcpuKicker, VmExit};

/// The longest a vCPU sleeps in WFI before looking for interrupts it cannot be woken for.
pub const WFI_MAX_SLICE: Duration = Duration::from_millis(1);

const CNTV_CTL_ENABLE: u64 = 1 << 0;
const CNTV_CTL_IMASK: u64 = 1 << 1;
const CNTV_CTL_ISTATUS: u64 = 1 << 2;

/// Whether the timer's interrupt line is asserted, from CNTV_CTL_EL0.
fn timer_line_high(ctl: u64) -> bool {
    ctl & (CNTV_CTL_ENABLE | CNTV_CTL_IMASK | CNTV_CTL_ISTATUS)
        == CNTV_CTL_ENABLE | CNTV_CTL_ISTATUS
}

/// Work left from the previous exit, done at the start of the next `run`.
#[derive(Debug, Clone, Copy)]
enum Pending {
    /// Move PC past the trapped instruction.
    Advance,
    /// Put the MMIO read's value into the register, then advance.
    Load(DataAbort),
}

/// The owned outcome of one pass through the exit handler.
#[derive(Debug)]
enum Step {
    Continue,
    MmioRead { addr: u64, len: usize },
    MmioWrite { addr: u64, len: usize },
    Shutdown,
    Reset,
    Interrupted,
    Unhandled { reason: u64, detail: String },
}

/// When a waiting vCPU's timer needs it.
enum TimerDeadline {
    /// Timer disabled or masked: no deadline.
    None,
    /// The timer condition already holds.
    Expired,
    /// It will hold after this long.
    In(Duration),
}

/// One vCPU of an HVF VM.
pub(crate) struct HvfVcpu<O: VmOps> {
    ops: O::Vcpu,
    vm: Arc<O>,
    power: Arc<PowerTable>,
    slot: Arc<CpuSlot>,
    index: u32,
    pending: Option<Pending>,
    mmio: [u8; 8],
    vtimer_masked: bool,
    reset_sctlr: u64,
    /// The longest WFI sleep; [`WFI_MAX_SLICE`] except in tests.
    pub(crate) wfi_slice: Duration,
}

impl<O: VmOps> std::fmt::Debug for HvfVcpu<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvfVcpu")
            .field("index", &self.index)
            .field("vtimer_masked", &self.vtimer_masked)
            .finish_non_exhaustive()
    }
}

impl<O: VmOps> HvfVcpu<O> {
    /// Creates vCPU `index` on the calling thread, powered off, with its MPIDR and the VM's
    /// common virtual counter offset set.
    pub(crate) fn new(
        vm: Arc<O>,
        power: Arc<PowerTable>,
        index: u32,
        slot: Arc<CpuSlot>,
    ) -> Result<Self, HvfError> {
        let mut ops = vm.create_vcpu()?;
        // One offset for all vCPUs: Linux expects every CPU to read the same counter.
        ops.set_vtimer_offset(vm.vtimer_base())?;
        ops.set_sys_reg(HV_SYS_REG_MPIDR_EL1, mpidr_of(index))?;
        let reset_sctlr = ops.sys_reg(HV_SYS_REG_SCTLR_EL1)?;
        slot.state.lock().handle = Some(ops.handle());
        Ok(Self {
            ops,
            vm,
            power,
            slot,
            index,
            pending: None,
            mmio: [0; 8],
            vtimer_masked: false,
            reset_sctlr,
            wfi_slice: WFI_MAX_SLICE,
        })
    }

    fn x(register: u8) -> u32 {
        HV_REG_X0 + u32::from(register)
    }

    fn advance_pc(&mut self) -> Result<(), HvfError> {
        let pc = self.ops.reg(HV_REG_PC)?;
        self.ops.set_reg(HV_REG_PC, pc.wrapping_add(4))
    }

    /// Puts the vCPU at `entry` with `x0`, MMU off, EL1h with interrupts masked.
    fn start_at(&mut self, entry: u64, x0: u64) -> Result<(), HvfError> {
        self.ops
            .set_sys_reg(HV_SYS_REG_SCTLR_EL1, self.reset_sctlr)?;
        self.ops.set_reg(HV_REG_X0, x0)?;
        for n in 1..=3 {
            self.ops.set_reg(HV_REG_X0 + n, 0)?;
        }
        self.ops.set_reg(HV_REG_PC, entry)?;
        self.ops.set_reg(HV_REG_CPSR, PSTATE_EL1H_DAIF_MASKED)?;
        self.pending = None;
        Ok(())
    }

    fn complete_pending(&mut self) -> Result<(), HvfError> {
        match self.pending.take() {
            None => Ok(()),
            Some(Pending::Advance) => self.advance_pc(),
            Some(Pending::Load(abort)) => {
                if let Some(value) = abort.read_value(&self.mmio) {
                    self.ops.set_reg(Self::x(abort.register), value)?;
                }
                self.advance_pc()
            }
        }
    }

    /// Applies the vtimer rule (module docs) before entering the guest.
    fn sync_vtimer(&mut self) -> Result<(), HvfError> {
        if !self.vtimer_masked {
            return Ok(());
        }
        let ctl = self.ops.sys_reg(HV_SYS_REG_CNTV_CTL_EL0)?;
        if timer_line_high(ctl) {
            return Ok(());
        }
        self.ops.set_vtimer_pending(false)?;
        self.ops.set_vtimer_mask(false)?;
        self.vtimer_masked = false;
        Ok(())
    }

    fn timer_deadline(&self) -> Result<TimerDeadline, HvfError> {
        let ctl = self.ops.sys_reg(HV_SYS_REG_CNTV_CTL_EL0)?;
        if ctl & CNTV_CTL_ENABLE == 0 || ctl & CNTV_CTL_IMASK != 0 {
            return Ok(TimerDeadline::None);
        }
        let cval = self.ops.sys_reg(HV_SYS_REG_CNTV_CVAL_EL0)?;
        let now = self.vm.now_ticks().wrapping_sub(self.ops.vtimer_offset()?);
        Ok(if cval <= now {
            TimerDeadline::Expired
        } else {
            TimerDeadline::In(self.vm.ticks_to_duration(cval - now))
        })
    }

    /// One pass: leftovers, power state, timer, guest entry, exit handling.
    fn step(&mut self) -> Result<Step, HvfError> {
        self.complete_pending()?;
        let slot = self.slot.clone();
        let seen = {
            let mut state = slot.state.lock();
            if state.kicked {
                state.kicked = false;
                return Ok(Step::Interrupted);
            }
            match state.power {
                Power::On => {}
                Power::OnPending { entry, context } => {
                    self.start_at(entry, context)?;
                    state.power = Power::On;
                }
                Power::Off => {
                    let seq = state.wake_seq;
                    drop(state);
                    slot.wait_for_event(seq, None);
                    return Ok(Step::Continue);
                }
            }
            state.wake_seq
        };
        self.sync_vtimer()?;
        let exit = self.ops.run()?;
        self.handle_exit(exit, seen)
    }

    fn handle_exit(&mut self, exit: hv_vcpu_exit_t, seen: u64) -> Result<Step, HvfError> {
        match exit.reason {
            HV_EXIT_REASON_CANCELED => {
                let mut state = self.slot.state.lock();
                if state.kicked {
                    state.kicked = false;
                    Ok(Step::Interrupted)
                } else {
                    // A kick already consumed before the guest was entered.
                    Ok(Step::Continue)
                }
            }
            HV_EXIT_REASON_VTIMER_ACTIVATED => {
                self.vtimer_masked = true;
                self.ops.set_vtimer_pending(true)?;
                Ok(Step::Continue)
            }
            HV_EXIT_REASON_EXCEPTION => self.handle_exception(exit.exception, seen),
            reason => Ok(Step::Unhandled {
                reason: u64::from(reason),
                detail: format!("hvf exit reason {reason}"),
            }),
        }
    }

    fn handle_exception(
        &mut self,
        exception: hv_vcpu_exit_exception_t,
        seen: u64,
    ) -> Result<Step, HvfError> {
        let esr = exception.syndrome;
        match esr::exception_class(esr) {
            EC_DATA_ABORT_LOWER | EC_DATA_ABORT_SAME => {
                self.data_abort(esr, exception.physical_address)
            }
            EC_HVC64 => self.psci(false),
            EC_SMC64 => self.psci(true),
            EC_WFX => self.wait(esr, seen),
            EC_SYSREG => {
                let access = SysRegAccess::decode(esr);
                tracing::debug!(
                    vcpu = self.index,
                    encoding = access.encoding,
                    read = access.is_read,
                    "trapped system register access ignored"
                );
                if access.is_read && access.register != XZR {
                    self.ops.set_reg(Self::x(access.register), 0)?;
                }
                self.advance_pc()?;
                Ok(Step::Continue)
            }
            ec => Ok(Step::Unhandled {
                reason: esr,
                detail: format!(
                    "exception class {ec:#x} at ipa {:#x}",
                    exception.physical_address
                ),
            }),
        }
    }

    fn data_abort(&mut self, esr: u64, addr: u64) -> Result<Step, HvfError> {
        let abort = match DataAbort::decode(esr) {
            Ok(abort) => abort,
            Err(error) => {
                return Ok(Step::Unhandled {
                    reason: esr,
                    detail: format!("mmio access at {addr:#x}: {error}"),
                });
            }
        };
        if abort.is_write {
            let value = if abort.register == XZR {
                0
            } else {
                self.ops.reg(Self::x(abort.register))?
            };
            let (bytes, len) = abort.write_data(value);
            self.mmio = bytes;
            self.pending = Some(Pending::Advance);
            Ok(Step::MmioWrite { addr, len })
        } else {
            self.mmio = [0; 8];
            self.pending = Some(Pending::Load(abort));
            Ok(Step::MmioRead {
                addr,
                len: abort.len,
            })
        }
    }

    fn psci(&mut self, trapped_on_instruction: bool) -> Result<Step, HvfError> {
        let mut x = [0u64; 4];
        for (n, value) in (0u32..).zip(x.iter_mut()) {
            *value = self.ops.reg(HV_REG_X0 + n)?;
        }
        let [x0, x1, x2, x3] = x;
        let call = PsciCall::decode(x0, x1, x2, x3);
        tracing::trace!(vcpu = self.index, ?call, "psci call");
        let outcome = psci::dispatch(call, &*self.power);
        if trapped_on_instruction {
            self.pending = Some(Pending::Advance);
        }
        Ok(match outcome {
            PsciOutcome::Return(value) => {
                self.ops.set_reg(HV_REG_X0, value)?;
                Step::Continue
            }
            PsciOutcome::CpuOff => {
                self.slot.state.lock().power = Power::Off;
                Step::Continue
            }
            PsciOutcome::SystemOff => Step::Shutdown,
            PsciOutcome::SystemReset => Step::Reset,
        })
    }

    fn wait(&mut self, esr: u64, seen: u64) -> Result<Step, HvfError> {
        // PC moves past the WFx on the next entry, whatever ends the wait.
        self.pending = Some(Pending::Advance);
        if esr::wait_kind(esr) == WaitKind::Event {
            std::thread::yield_now();
            return Ok(Step::Continue);
        }
        if self.ops.local_interrupt_pending()? {
            return Ok(Step::Continue);
        }
        let sleep = match self.timer_deadline()? {
            TimerDeadline::Expired => return Ok(Step::Continue),
            TimerDeadline::In(left) => left.min(self.wfi_slice),
            TimerDeadline::None => self.wfi_slice,
        };
        let deadline = Instant::now().checked_add(sleep);
        self.slot.wait_for_event(seen, deadline);
        Ok(Step::Continue)
    }
}

impl<O: VmOps> Drop for HvfVcpu<O> {
    fn drop(&mut self) {
        self.slot.state.lock().handle = None;
    }
}

/// Kicks one HVF vCPU: out of the guest, out of a WFI sleep, or out of its parked state.
pub(crate) struct HvfKicker<O: VmOps> {
    vm: Arc<O>,
    slot: Arc<CpuSlot>,
}

impl<O: VmOps> std::fmt::Debug for HvfKicker<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HvfKicker").finish_non_exhaustive()
    }
}

impl<O: VmOps> VcpuKicker for HvfKicker<O> {
    fn kick(&self) {
        let handle = {
            let mut state = self.slot.state.lock();
            state.kicked = true;
            state.wake_seq = state.wake_seq.wrapping_add(1);
            self.slot.wake.notify_all();
            state.handle
        };
        // A vCPU that is not inside hv_vcpu_run sees the flag before it enters the guest.
        if let Some(handle) = handle
            && let Err(error) = self.vm.exit_vcpu(handle)
        {
            tracing::warn!(%error, "forcing a vcpu exit failed");
        }
    }
}

impl<O: VmOps> Vcpu for HvfVcpu<O> {
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        let step = loop {
            match self.step()? {
                Step::Continue => continue,
                step => break step,
            }
        };
        Ok(match step {
            Step::MmioRead { addr, len } => VmExit::MmioRead {
                addr,
                data: self.mmio.get_mut(..len).unwrap_or_default(),
            },
            Step::MmioWrite { addr, len } => VmExit::MmioWrite {
                addr,
                data: self.mmio.get(..len).unwrap_or_default(),
            },
            Step::Shutdown => VmExit::Shutdown,
            Step::Reset => VmExit::Reset,
            Step::Interrupted | Step::Continue => VmExit::Interrupted,
            Step::Unhandled { reason, detail } => VmExit::Unhandled { reason, detail },
        })
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(HvfKicker {
            vm: self.vm.clone(),
            slot: self.slot.clone(),
        })
    }

    fn configure_aarch64(&mut self, setup: &VcpuSetup) -> Result<(), HypervisorError> {
        self.start_at(setup.entry, setup.fdt_addr)?;
        self.slot.state.lock().power = Power::On;
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    fn configure_x86_64(
        &mut self,
        _setup: &crate::x86_64::VcpuSetup,
    ) -> Result<(), HypervisorError> {
        Err(HypervisorError::Unsupported {
            capability: "x86_64 vcpus under hypervisor.framework",
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn fault_registers_x86_64(
        &self,
    ) -> Result<Option<crate::x86_64::FaultRegisters>, HypervisorError> {
        Err(HypervisorError::Unsupported {
            capability: "x86_64 vcpus under hypervisor.framework",
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn tsc_khz(&self) -> Result<Option<u32>, HypervisorError> {
        Ok(None)
    }
}
