//! A scripted fake of Hypervisor.framework for tests on any host: the real HVF backend (its
//! `VmOps`/`VcpuOps` seam) runs against it. Each vCPU's `run` replays scripted guest exits,
//! which may read and change the guest state first; every register write is recorded. Built
//! for this crate's tests and, with the `fake-hvf` feature, for other crates' tests (the core's
//! vCPU loop runs HVF exits through it).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::HvfError;
use super::ffi::*;
use super::ops::{VcpuOps, VmOps};
use super::vm::HvfVm;
use crate::aarch64::esr::{EC_DATA_ABORT_LOWER, EC_HVC64, EC_WFX};

/// What the fake framework recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A general register (`HV_REG_*`) was set.
    SetReg(u32, u64),
    /// A system register (`HV_SYS_REG_*`) was set.
    SetSysReg(u16, u64),
    /// The virtual timer was masked or unmasked.
    VtimerMask(bool),
    /// The virtual timer's interrupt was made pending or not.
    VtimerPending(bool),
    /// The virtual timer offset was set.
    VtimerOffset(u64),
}

/// The guest-visible state of one fake vCPU.
#[derive(Debug, Default)]
pub struct State {
    /// General registers by `HV_REG_*` number.
    pub regs: HashMap<u32, u64>,
    /// System registers by `HV_SYS_REG_*` number.
    pub sys_regs: HashMap<u16, u64>,
    /// Every register and timer write, in order.
    pub log: Vec<Event>,
    /// What `local_interrupt_pending` answers.
    pub local_pending: bool,
    /// The vCPU's virtual timer offset.
    pub vtimer_offset: u64,
}

impl State {
    /// General register `reg` (0 if never written).
    pub fn reg(&self, reg: u32) -> u64 {
        self.regs.get(&reg).copied().unwrap_or(0)
    }
    /// The program counter.
    pub fn pc(&self) -> u64 {
        self.reg(HV_REG_PC)
    }
    /// Sets X0, X1, ... to `values`.
    pub fn set_x(&mut self, values: &[u64]) {
        for (n, value) in (0u32..).zip(values) {
            self.regs.insert(HV_REG_X0 + n, *value);
        }
    }
}

/// One guest run: may inspect and change the guest state, returns the exit.
pub type Run = Box<dyn FnOnce(&mut State) -> hv_vcpu_exit_t + Send>;

/// The fake framework: the scripts, the vCPUs' states and what the backend asked of it.
#[derive(Default)]
pub struct FakeVm {
    /// Scripts by MPIDR, picked up by the vCPU whose MPIDR the backend set.
    pub(crate) scripts: Mutex<HashMap<u64, VecDeque<Run>>>,
    pub(crate) states: Mutex<HashMap<u64, Arc<Mutex<State>>>>,
    pub(crate) spis: Mutex<Vec<(u32, bool)>>,
    pub(crate) exits_forced: Mutex<Vec<u64>>,
    pub(crate) next_handle: AtomicU64,
    pub(crate) maps: Mutex<Vec<(u64, u64, u64, u64)>>,
    pub(crate) epoch: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for FakeVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeVm")
            .field("spis", &self.spis)
            .field("exits_forced", &self.exits_forced)
            .finish_non_exhaustive()
    }
}

impl FakeVm {
    /// Gives the vCPU with MPIDR `mpidr` its guest runs, in order; past the last, its `run`
    /// fails.
    pub fn script(&self, mpidr: u64, runs: Vec<Run>) {
        self.scripts.lock().insert(mpidr, runs.into());
    }
    /// The state of the vCPU with MPIDR `mpidr` (once the backend has set its MPIDR).
    pub fn state(&self, mpidr: u64) -> Option<Arc<Mutex<State>>> {
        self.states.lock().get(&mpidr).cloned()
    }
    /// Host ticks are nanoseconds since the first call.
    pub fn ticks(&self) -> u64 {
        let epoch = *self.epoch.lock().get_or_insert_with(Instant::now);
        u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A vCPU of the fake framework.
pub(crate) struct FakeVcpu {
    vm: Arc<FakeVm>,
    handle: u64,
    state: Arc<Mutex<State>>,
    script: Option<VecDeque<Run>>,
}

/// The fake framework as `VmOps`: its vCPUs refer back to the shared [`FakeVm`].
pub(crate) struct FakeVmHandle(Arc<FakeVm>);

impl VmOps for FakeVmHandle {
    type Vcpu = FakeVcpu;

    unsafe fn map(&self, host_addr: u64, gpa: u64, len: u64, flags: u64) -> Result<(), HvfError> {
        self.0.maps.lock().push((host_addr, gpa, len, flags));
        Ok(())
    }
    fn create_vcpu(&self) -> Result<FakeVcpu, HvfError> {
        Ok(FakeVcpu {
            vm: self.0.clone(),
            handle: self.0.next_handle.fetch_add(1, Ordering::Relaxed) + 100,
            state: Arc::new(Mutex::new(State {
                sys_regs: HashMap::from([(HV_SYS_REG_SCTLR_EL1, 0x30d0_0800)]),
                ..State::default()
            })),
            script: None,
        })
    }
    fn exit_vcpu(&self, handle: u64) -> Result<(), HvfError> {
        self.0.exits_forced.lock().push(handle);
        Ok(())
    }
    fn set_spi(&self, intid: u32, level: bool) -> Result<(), HvfError> {
        if intid > 100 {
            return Err(HvfError::Call {
                operation: "hv_gic_set_spi",
                code: HV_BAD_ARGUMENT,
            });
        }
        self.0.spis.lock().push((intid, level));
        Ok(())
    }
    fn now_ticks(&self) -> u64 {
        self.0.ticks()
    }
    fn vtimer_base(&self) -> u64 {
        VTIMER_BASE
    }
    fn ticks_to_duration(&self, ticks: u64) -> Duration {
        Duration::from_nanos(ticks)
    }
}

impl VcpuOps for FakeVcpu {
    fn handle(&self) -> u64 {
        self.handle
    }

    fn run(&mut self) -> Result<hv_vcpu_exit_t, HvfError> {
        let mpidr = self.state.lock().sys_regs[&HV_SYS_REG_MPIDR_EL1];
        let script = self
            .script
            .get_or_insert_with(|| self.vm.scripts.lock().remove(&mpidr).unwrap_or_default());
        match script.pop_front() {
            Some(step) => Ok(step(&mut self.state.lock())),
            None => Err(HvfError::Call {
                operation: "hv_vcpu_run",
                code: HV_ERROR,
            }),
        }
    }

    fn reg(&self, reg: u32) -> Result<u64, HvfError> {
        Ok(self.state.lock().reg(reg))
    }

    fn set_reg(&mut self, reg: u32, value: u64) -> Result<(), HvfError> {
        let mut state = self.state.lock();
        state.regs.insert(reg, value);
        state.log.push(Event::SetReg(reg, value));
        Ok(())
    }

    fn sys_reg(&self, reg: u16) -> Result<u64, HvfError> {
        Ok(self.state.lock().sys_regs.get(&reg).copied().unwrap_or(0))
    }

    fn set_sys_reg(&mut self, reg: u16, value: u64) -> Result<(), HvfError> {
        let mut state = self.state.lock();
        state.sys_regs.insert(reg, value);
        state.log.push(Event::SetSysReg(reg, value));
        if reg == HV_SYS_REG_MPIDR_EL1 {
            self.vm.states.lock().insert(value, self.state.clone());
        }
        Ok(())
    }

    fn set_vtimer_mask(&mut self, masked: bool) -> Result<(), HvfError> {
        self.state.lock().log.push(Event::VtimerMask(masked));
        Ok(())
    }

    fn vtimer_offset(&self) -> Result<u64, HvfError> {
        Ok(self.state.lock().vtimer_offset)
    }

    fn set_vtimer_offset(&mut self, offset: u64) -> Result<(), HvfError> {
        let mut state = self.state.lock();
        state.vtimer_offset = offset;
        state.log.push(Event::VtimerOffset(offset));
        Ok(())
    }

    fn set_vtimer_pending(&mut self, pending: bool) -> Result<(), HvfError> {
        self.state.lock().log.push(Event::VtimerPending(pending));
        Ok(())
    }

    fn local_interrupt_pending(&self) -> Result<bool, HvfError> {
        Ok(self.state.lock().local_pending)
    }
}

/// The syndrome's instruction-length bit (a 32-bit instruction).
const IL: u64 = 1 << 25;
/// The fake VM's common virtual counter offset, in host ticks.
pub const VTIMER_BASE: u64 = 1_000;

/// An exception exit of class `ec`.
pub fn exception(ec: u8, iss: u64, ipa: u64) -> hv_vcpu_exit_t {
    hv_vcpu_exit_t {
        reason: HV_EXIT_REASON_EXCEPTION,
        exception: hv_vcpu_exit_exception_t {
            syndrome: (u64::from(ec) << 26) | IL | iss,
            virtual_address: 0,
            physical_address: ipa,
        },
    }
}

/// A data abort with a valid syndrome.
pub fn data_abort(
    ipa: u64,
    sas: u64,
    sse: bool,
    srt: u64,
    sf: bool,
    write: bool,
) -> hv_vcpu_exit_t {
    let iss = (1 << 24)
        | (sas << 22)
        | (u64::from(sse) << 21)
        | (srt << 16)
        | (u64::from(sf) << 15)
        | (u64::from(write) << 6);
    exception(EC_DATA_ABORT_LOWER, iss, ipa)
}

/// An HVC exit (PSCI calls).
pub fn hvc() -> hv_vcpu_exit_t {
    exception(EC_HVC64, 0, 0)
}

/// A WFI exit.
pub fn wfi() -> hv_vcpu_exit_t {
    exception(EC_WFX, 0, 0)
}

/// The virtual timer fired.
pub fn vtimer() -> hv_vcpu_exit_t {
    hv_vcpu_exit_t {
        reason: HV_EXIT_REASON_VTIMER_ACTIVATED,
        ..hv_vcpu_exit_t::default()
    }
}

/// One guest run.
pub fn run<F: FnOnce(&mut State) -> hv_vcpu_exit_t + Send + 'static>(f: F) -> Run {
    Box::new(f)
}

/// A backend VM of `vcpus` vCPUs over a fresh fake framework.
pub(crate) fn new_vm(vcpus: u32) -> (Arc<FakeVm>, Arc<HvfVm<FakeVmHandle>>) {
    let fake = Arc::new(FakeVm::default());
    let vm = Arc::new(HvfVm::new(Arc::new(FakeVmHandle(fake.clone())), vcpus));
    (fake, vm)
}

/// The HVF backend's VM of `vcpus` vCPUs over a fresh fake framework, as the hypervisor seam's
/// [`crate::Vm`], with the fake to script and inspect it.
pub fn new_seam_vm(vcpus: u32) -> (Arc<FakeVm>, Arc<dyn crate::Vm>) {
    let (fake, vm) = new_vm(vcpus);
    (fake, vm)
}
