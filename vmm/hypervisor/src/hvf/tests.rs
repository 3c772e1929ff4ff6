//! Scripted-framework tests: the real HVF exit handling runs against a fake `VmOps`/`VcpuOps`
//! whose `run` replays guest exits and whose registers record every write.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::ffi::*;
use super::ops::{VcpuOps, VmOps};
use super::real::{FrameworkGic, VmSlot, check_geometry, check_vtimer_intid};
use super::vm::HvfVm;
use super::*;
use crate::aarch64::esr::{EC_DATA_ABORT_LOWER, EC_HVC64, EC_SMC64, EC_SYSREG, EC_WFX};
use crate::aarch64::psci;
use crate::aarch64::{VcpuSetup, mpidr_of};
use crate::{Vcpu, VmExit};

/// What the fake framework recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    SetReg(u32, u64),
    SetSysReg(u16, u64),
    VtimerMask(bool),
    VtimerPending(bool),
    VtimerOffset(u64),
}

/// The guest-visible state of one fake vCPU.
#[derive(Debug, Default)]
struct State {
    regs: HashMap<u32, u64>,
    sys_regs: HashMap<u16, u64>,
    log: Vec<Event>,
    local_pending: bool,
    vtimer_offset: u64,
}

impl State {
    fn reg(&self, reg: u32) -> u64 {
        self.regs.get(&reg).copied().unwrap_or(0)
    }
    fn pc(&self) -> u64 {
        self.reg(HV_REG_PC)
    }
    fn set_x(&mut self, values: &[u64]) {
        for (n, value) in (0u32..).zip(values) {
            self.regs.insert(HV_REG_X0 + n, *value);
        }
    }
}

/// One guest run: may inspect and change the guest state, returns the exit.
type Run = Box<dyn FnOnce(&mut State) -> hv_vcpu_exit_t + Send>;

#[derive(Default)]
struct FakeVm {
    /// Scripts by MPIDR, picked up by the vCPU whose MPIDR the backend set.
    scripts: Mutex<HashMap<u64, VecDeque<Run>>>,
    states: Mutex<HashMap<u64, Arc<Mutex<State>>>>,
    spis: Mutex<Vec<(u32, bool)>>,
    exits_forced: Mutex<Vec<u64>>,
    next_handle: AtomicU64,
    maps: Mutex<Vec<(u64, u64, u64, u64)>>,
    epoch: Mutex<Option<Instant>>,
}

impl FakeVm {
    fn script(&self, mpidr: u64, runs: Vec<Run>) {
        self.scripts.lock().insert(mpidr, runs.into());
    }
    fn state(&self, mpidr: u64) -> Arc<Mutex<State>> {
        self.states.lock().get(&mpidr).unwrap().clone()
    }
    /// Host ticks are nanoseconds since the first call.
    fn ticks(&self) -> u64 {
        let epoch = *self.epoch.lock().get_or_insert_with(Instant::now);
        u64::try_from(epoch.elapsed().as_nanos()).unwrap()
    }
}

struct FakeVcpu {
    vm: Arc<FakeVm>,
    handle: u64,
    state: Arc<Mutex<State>>,
    script: Option<VecDeque<Run>>,
}

/// The fake framework as `VmOps`: its vCPUs refer back to the shared [`FakeVm`].
struct FakeVmHandle(Arc<FakeVm>);

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

const IL: u64 = 1 << 25;
/// The fake VM's common virtual counter offset, in host ticks.
const VTIMER_BASE: u64 = 1_000;

fn exception(ec: u8, iss: u64, ipa: u64) -> hv_vcpu_exit_t {
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
fn data_abort(ipa: u64, sas: u64, sse: bool, srt: u64, sf: bool, write: bool) -> hv_vcpu_exit_t {
    let iss = (1 << 24)
        | (sas << 22)
        | (u64::from(sse) << 21)
        | (srt << 16)
        | (u64::from(sf) << 15)
        | (u64::from(write) << 6);
    exception(EC_DATA_ABORT_LOWER, iss, ipa)
}

fn hvc() -> hv_vcpu_exit_t {
    exception(EC_HVC64, 0, 0)
}

fn wfi() -> hv_vcpu_exit_t {
    exception(EC_WFX, 0, 0)
}

fn vtimer() -> hv_vcpu_exit_t {
    hv_vcpu_exit_t {
        reason: HV_EXIT_REASON_VTIMER_ACTIVATED,
        ..hv_vcpu_exit_t::default()
    }
}

fn run<F: FnOnce(&mut State) -> hv_vcpu_exit_t + Send + 'static>(f: F) -> Run {
    Box::new(f)
}

fn new_vm(vcpus: u32) -> (Arc<FakeVm>, Arc<HvfVm<FakeVmHandle>>) {
    let fake = Arc::new(FakeVm::default());
    let vm = Arc::new(HvfVm::new(Arc::new(FakeVmHandle(fake.clone())), vcpus));
    (fake, vm)
}

const ENTRY: u64 = 0x8020_0000;
const FDT: u64 = 0x8800_0000;
const CTL_ENABLE: u64 = 1;
const CTL_ISTATUS: u64 = 4;

#[test]
fn test_hvf_vcpu_replays_mmio_psci_vtimer_wfi_and_system_off() {
    let (fake, vm) = new_vm(2);
    fake.script(
        mpidr_of(0),
        vec![
            // A 32-bit store of W1 to the UART.
            run(|s| {
                assert_eq!(s.pc(), ENTRY);
                assert_eq!(s.reg(HV_REG_X0), FDT);
                s.set_x(&[FDT, 0x1234_5678_dead_beef]);
                data_abort(0x0900_0000, 2, false, 1, false, true)
            }),
            // LDRSB X2 from a device register.
            run(|s| {
                assert_eq!(s.pc(), ENTRY + 4, "the store was stepped over");
                data_abort(0x0900_0018, 0, true, 2, true, false)
            }),
            // PSCI CPU_ON for vCPU 1.
            run(|s| {
                assert_eq!(
                    s.reg(HV_REG_X0 + 2),
                    0xffff_ffff_ffff_ff80,
                    "sign-extended load"
                );
                assert_eq!(s.pc(), ENTRY + 8);
                s.set_x(&[u64::from(psci::CPU_ON_64), mpidr_of(1), 0x8030_0000, 0x55]);
                s.regs.insert(HV_REG_PC, ENTRY + 12); // HVC returns past itself
                hvc()
            }),
            // The timer fires: condition true.
            run(|s| {
                assert_eq!(s.reg(HV_REG_X0), 0, "CPU_ON succeeded");
                assert_eq!(s.pc(), ENTRY + 12, "HVC is not stepped over twice");
                s.sys_regs
                    .insert(HV_SYS_REG_CNTV_CTL_EL0, CTL_ENABLE | CTL_ISTATUS);
                vtimer()
            }),
            // Still firing: stays masked; then the guest moves CVAL into the future and waits.
            run(|s| {
                assert!(s.log.contains(&Event::VtimerPending(true)));
                assert!(
                    !s.log.contains(&Event::VtimerMask(false)),
                    "unmasked too early"
                );
                s.sys_regs.insert(HV_SYS_REG_CNTV_CTL_EL0, CTL_ENABLE);
                s.sys_regs.insert(HV_SYS_REG_CNTV_CVAL_EL0, u64::MAX);
                s.log.clear();
                wfi()
            }),
            // The condition cleared: pending dropped, then unmasked; PC past the WFI.
            run(|s| {
                assert_eq!(
                    s.log
                        .iter()
                        .filter(|e| matches!(e, Event::VtimerPending(_) | Event::VtimerMask(_)))
                        .cloned()
                        .collect::<Vec<_>>(),
                    vec![Event::VtimerPending(false), Event::VtimerMask(false)]
                );
                assert_eq!(s.pc(), ENTRY + 16);
                s.set_x(&[u64::from(psci::SYSTEM_OFF)]);
                hvc()
            }),
        ],
    );
    let mut vcpu = vm.create_hvf_vcpu(0, 2).unwrap();
    vcpu.configure_aarch64(&VcpuSetup {
        entry: ENTRY,
        fdt_addr: FDT,
    })
    .unwrap();
    match vcpu.run().unwrap() {
        VmExit::MmioWrite { addr, data } => {
            assert_eq!(addr, 0x0900_0000);
            assert_eq!(data, &[0xef, 0xbe, 0xad, 0xde]);
        }
        other => panic!("expected an mmio write, got {other:?}"),
    }
    match vcpu.run().unwrap() {
        VmExit::MmioRead { addr, data } => {
            assert_eq!(addr, 0x0900_0018);
            assert_eq!(data.len(), 1);
            data[0] = 0x80;
        }
        other => panic!("expected an mmio read, got {other:?}"),
    }
    assert!(matches!(vcpu.run().unwrap(), VmExit::Shutdown));
    // CPU_ON reached vCPU 1's mailbox.
    assert_eq!(
        psci::PowerControl::affinity_info(&*vm.power, mpidr_of(1)),
        Some(psci::AffinityState::OnPending)
    );
    let state = fake.state(mpidr_of(0));
    let state = state.lock();
    assert_eq!(state.sys_regs[&HV_SYS_REG_MPIDR_EL1], 0);
    assert_eq!(state.vtimer_offset, VTIMER_BASE);
    assert_eq!(state.reg(HV_REG_CPSR), 0x3c5);
}

#[test]
fn test_hvf_cpu_on_starts_a_parked_vcpu_thread() {
    let (fake, vm) = new_vm(2);
    fake.script(
        mpidr_of(1),
        vec![run(|s| {
            assert_eq!(s.vtimer_offset, VTIMER_BASE, "same counter on every vcpu");
            assert_eq!(s.pc(), 0x8030_0000);
            assert_eq!(s.reg(HV_REG_X0), 0x55);
            assert_eq!(s.reg(HV_REG_CPSR), 0x3c5);
            s.set_x(&[u64::from(psci::SYSTEM_RESET)]);
            hvc()
        })],
    );
    fake.script(
        mpidr_of(0),
        vec![
            run(|s| {
                s.set_x(&[u64::from(psci::CPU_ON_64), mpidr_of(1), 0x8030_0000, 0x55]);
                hvc()
            }),
            run(|s| {
                assert_eq!(s.reg(HV_REG_X0), 0);
                s.set_x(&[u64::from(psci::SYSTEM_OFF)]);
                hvc()
            }),
        ],
    );
    let secondary = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let mut vcpu = vm.create_hvf_vcpu(1, 2).unwrap();
            matches!(vcpu.run().unwrap(), VmExit::Reset)
        })
    };
    // The secondary stays parked until CPU_ON.
    std::thread::sleep(Duration::from_millis(50));
    assert!(!secondary.is_finished());
    let mut vcpu = vm.create_hvf_vcpu(0, 2).unwrap();
    vcpu.configure_aarch64(&VcpuSetup {
        entry: ENTRY,
        fdt_addr: FDT,
    })
    .unwrap();
    assert!(matches!(vcpu.run().unwrap(), VmExit::Shutdown));
    assert!(secondary.join().unwrap());
}

#[test]
fn test_hvf_cpu_off_parks_and_a_second_cpu_on_restarts_from_reset_state() {
    let (fake, vm) = new_vm(2);
    fake.script(
        mpidr_of(1),
        vec![
            // First start: turn the MMU on, then power off.
            run(|s| {
                assert_eq!(s.pc(), 0x8030_0000);
                s.sys_regs.insert(HV_SYS_REG_SCTLR_EL1, 0x30d0_0801);
                s.set_x(&[u64::from(psci::CPU_OFF)]);
                hvc()
            }),
            // Second start: new entry and context, MMU off again.
            run(|s| {
                assert_eq!(s.pc(), 0x8040_0000);
                assert_eq!(s.reg(HV_REG_X0), 2);
                assert_eq!(s.sys_regs[&HV_SYS_REG_SCTLR_EL1], 0x30d0_0800);
                // WFE only yields: PC moves on without any sleep.
                exception(EC_WFX, 1, 0)
            }),
            run(|s| {
                assert_eq!(s.pc(), 0x8040_0004);
                s.set_x(&[u64::from(psci::SYSTEM_OFF)]);
                hvc()
            }),
        ],
    );
    let secondary = {
        let vm = vm.clone();
        std::thread::spawn(move || {
            let mut vcpu = vm.create_hvf_vcpu(1, 2).unwrap();
            vcpu.wfi_slice = Duration::from_secs(10);
            let start = Instant::now();
            let exit = matches!(vcpu.run().unwrap(), VmExit::Shutdown);
            (exit, start.elapsed())
        })
    };
    let power = vm.power.clone();
    let on =
        |entry: u64, context: u64| psci::PowerControl::cpu_on(&*power, mpidr_of(1), entry, context);
    assert_eq!(on(0x8030_0000, 1), psci::PsciStatus::Success);
    // Wait until the secondary has powered itself off again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while psci::PowerControl::affinity_info(&*power, mpidr_of(1)) != Some(psci::AffinityState::Off)
        || fake.states.lock().get(&mpidr_of(1)).is_none()
        || fake.state(mpidr_of(1)).lock().pc() != 0x8030_0000
    {
        assert!(Instant::now() < deadline, "secondary never powered off");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(on(0x8040_0000, 2), psci::PsciStatus::Success);
    let (shutdown, elapsed) = secondary.join().unwrap();
    assert!(shutdown);
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn test_hvf_kick_interrupts_a_parked_vcpu_and_a_wfi_sleep() {
    let (fake, vm) = new_vm(1);
    let mut vcpu = vm.create_hvf_vcpu(0, 1).unwrap();
    let kicker = vcpu.kicker();
    // Parked (never configured): a kick ends run.
    let kick_later = |kicker: Arc<dyn crate::VcpuKicker>| {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            kicker.kick();
        })
    };
    let t = kick_later(kicker.clone());
    // Kicked while parked or (on a slow host) before parking: either way run ends.
    assert!(matches!(vcpu.run().unwrap(), VmExit::Interrupted));
    t.join().unwrap();
    assert_eq!(*fake.exits_forced.lock(), vec![100]);

    // Sleeping in WFI with no timer: a kick ends the sleep and run; PC then moves past the WFI.
    let in_wfi = Arc::new(AtomicBool::new(false));
    let entered = in_wfi.clone();
    fake.script(
        mpidr_of(0),
        vec![
            run(move |_| {
                entered.store(true, Ordering::SeqCst);
                wfi()
            }),
            run(|s| {
                assert_eq!(s.pc(), ENTRY + 4);
                s.set_x(&[u64::from(psci::SYSTEM_OFF)]);
                hvc()
            }),
        ],
    );
    vcpu.configure_aarch64(&VcpuSetup {
        entry: ENTRY,
        fdt_addr: FDT,
    })
    .unwrap();
    vcpu.wfi_slice = Duration::from_secs(10);
    // Kick only once the guest has reached its WFI, so the kick ends the sleep itself.
    let t = std::thread::spawn(move || {
        while !in_wfi.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(20));
        kicker.kick();
    });
    let start = Instant::now();
    assert!(matches!(vcpu.run().unwrap(), VmExit::Interrupted));
    assert!(start.elapsed() < Duration::from_secs(5));
    t.join().unwrap();
    assert!(matches!(vcpu.run().unwrap(), VmExit::Shutdown));
}

#[test]
fn test_hvf_wfi_sleeps_until_timer_deadline_or_interrupt() {
    let (fake, vm) = new_vm(1);
    let deadline_ns = Arc::new(AtomicU64::new(0));
    let second_wfi_ns = Arc::new(AtomicU64::new(0));
    let woke = Arc::new(AtomicBool::new(false));
    let fake_for_script = fake.clone();
    let fake_for_second = fake.clone();
    let d = deadline_ns.clone();
    let second = second_wfi_ns.clone();
    fake.script(
        mpidr_of(0),
        vec![
            // Timer armed 40 ms ahead.
            run(move |s| {
                let cval = fake_for_script.ticks() + 40_000_000;
                d.store(cval, Ordering::SeqCst);
                s.sys_regs.insert(HV_SYS_REG_CNTV_CTL_EL0, CTL_ENABLE);
                s.sys_regs.insert(HV_SYS_REG_CNTV_CVAL_EL0, cval);
                wfi()
            }),
            // Timer disabled: only an interrupt line wakes the vCPU.
            run(move |s| {
                second.store(fake_for_second.ticks(), Ordering::SeqCst);
                s.sys_regs.insert(HV_SYS_REG_CNTV_CTL_EL0, 0);
                wfi()
            }),
            // Timer already expired: no sleep at all.
            run(|s| {
                s.sys_regs.insert(HV_SYS_REG_CNTV_CTL_EL0, CTL_ENABLE);
                s.sys_regs.insert(HV_SYS_REG_CNTV_CVAL_EL0, 0);
                wfi()
            }),
            // An SGI/PPI already pending: no sleep either.
            run(|s| {
                s.sys_regs.insert(HV_SYS_REG_CNTV_CTL_EL0, 0);
                s.local_pending = true;
                wfi()
            }),
            run(|s| {
                s.set_x(&[u64::from(psci::SYSTEM_OFF)]);
                hvc()
            }),
        ],
    );
    let mut vcpu = vm.create_hvf_vcpu(0, 1).unwrap();
    vcpu.wfi_slice = Duration::from_secs(10);
    vcpu.configure_aarch64(&VcpuSetup {
        entry: ENTRY,
        fdt_addr: FDT,
    })
    .unwrap();
    let line = crate::Vm::interrupt_line(&*vm, 3).unwrap();
    let raiser = {
        let woke = woke.clone();
        let second_wfi_ns = second_wfi_ns.clone();
        std::thread::spawn(move || {
            // Raise the line 30 ms into the second (timer-less) WFI: the guest has entered it
            // once its script step ran, so the wake-up cannot come before the sleep.
            while second_wfi_ns.load(Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(30));
            woke.store(true, Ordering::SeqCst);
            line.trigger().unwrap();
        })
    };
    let start = Instant::now();
    assert!(matches!(vcpu.run().unwrap(), VmExit::Shutdown));
    let elapsed = start.elapsed();
    raiser.join().unwrap();
    assert!(woke.load(Ordering::SeqCst));
    // The first sleep lasted until the timer deadline.
    assert!(
        second_wfi_ns.load(Ordering::SeqCst) >= deadline_ns.load(Ordering::SeqCst),
        "left the timer wait early"
    );
    // 40 ms for the timer, then 30 ms until the interrupt, and no 10 s slice anywhere.
    assert!(elapsed >= Duration::from_millis(70), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert_eq!(*fake.spis.lock(), vec![(35, true), (35, false)]);
}

#[test]
fn test_hvf_smc_steps_over_and_sysreg_traps_read_zero() {
    let (fake, vm) = new_vm(1);
    fake.script(
        mpidr_of(0),
        vec![
            run(|s| {
                s.set_x(&[u64::from(psci::PSCI_VERSION)]);
                exception(EC_SMC64, 0, 0)
            }),
            run(|s| {
                assert_eq!(s.reg(HV_REG_X0), 0x1_0000);
                assert_eq!(s.pc(), ENTRY + 4, "SMC is stepped over");
                s.set_x(&[0, 0, 0, 0, 0, 0, 0, 0xffff]);
                // MRS X7, OSLSR_EL1.
                exception(
                    EC_SYSREG,
                    (2 << 20) | (4 << 17) | (1 << 10) | (7 << 5) | (1 << 1) | 1,
                    0,
                )
            }),
            run(|s| {
                assert_eq!(s.reg(HV_REG_X0 + 7), 0);
                assert_eq!(s.pc(), ENTRY + 8);
                // A store pair: no valid syndrome.
                exception(EC_DATA_ABORT_LOWER, 1 << 6, 0x0a00_0000)
            }),
        ],
    );
    let mut vcpu = vm.create_hvf_vcpu(0, 1).unwrap();
    vcpu.configure_aarch64(&VcpuSetup {
        entry: ENTRY,
        fdt_addr: FDT,
    })
    .unwrap();
    match vcpu.run().unwrap() {
        VmExit::Unhandled { reason, detail } => {
            assert_eq!(reason >> 26, u64::from(EC_DATA_ABORT_LOWER));
            assert!(detail.contains("0xa000000"), "{detail}");
        }
        other => panic!("expected an unhandled exit, got {other:?}"),
    }
}

#[test]
fn test_hvf_vm_maps_memory_and_checks_lines_and_indexes() {
    let (fake, vm) = new_vm(2);
    // SAFETY: the fake maps nothing.
    unsafe { crate::Vm::map_memory(&*vm, 0, 0x8000_0000, 0x1000, 0x10_0000, true) }.unwrap();
    assert_eq!(
        *fake.maps.lock(),
        vec![(
            0x1000,
            0x8000_0000,
            0x10_0000,
            HV_MEMORY_READ | HV_MEMORY_EXEC
        )]
    );
    assert!(matches!(
        crate::Vm::interrupt_line(&*vm, 988),
        Err(crate::HypervisorError::OutOfRange {
            field: "spi",
            value: 988
        })
    ));
    // The framework's refusal keeps its code.
    let line = crate::Vm::interrupt_line(&*vm, 90).unwrap();
    assert!(matches!(
        line.set_level(true),
        Err(squib_devices::InterruptError::SetLevel {
            gsi: 90,
            level: true,
            code: 0xfae9_4003
        })
    ));
    assert!(matches!(
        vm.create_hvf_vcpu(2, 2),
        Err(HvfError::VcpuIndex {
            index: 2,
            count: 2,
            configured: 2
        })
    ));
    assert!(matches!(
        vm.create_hvf_vcpu(0, 3),
        Err(HvfError::VcpuIndex { .. })
    ));
}

#[test]
fn test_vm_slot_allows_one_vm_per_process() {
    static FLAG: AtomicBool = AtomicBool::new(false);
    let first = VmSlot::acquire(&FLAG).unwrap();
    assert!(matches!(VmSlot::acquire(&FLAG), Err(HvfError::VmExists)));
    drop(first);
    assert!(VmSlot::acquire(&FLAG).is_ok());
}

#[test]
fn test_gic_geometry_and_vtimer_checks() {
    let config = HvfConfig {
        gic: GicV3Layout {
            distributor_base: 0x0800_0000,
            redistributor_base: 0x080a_0000,
            vcpu_count: 2,
        },
        redistributor_space: 0xf6_0000,
    };
    let apple = FrameworkGic {
        distributor_size: 0x1_0000,
        distributor_align: 0x1_0000,
        redistributor_size: 0x2_0000,
        redistributor_align: 0x2_0000,
        redistributor_region: 0x80_0000,
    };
    assert!(check_geometry(&config, &apple).is_ok());
    let cases = [
        (
            FrameworkGic {
                distributor_align: 0x1000_0000,
                ..apple
            },
            "distributor base",
        ),
        (
            FrameworkGic {
                distributor_size: 0x2_0000,
                ..apple
            },
            "distributor size",
        ),
        (
            FrameworkGic {
                redistributor_size: 0x4_0000,
                ..apple
            },
            "redistributor size",
        ),
        (
            FrameworkGic {
                redistributor_align: 0x4_0000,
                ..apple
            },
            "redistributor base",
        ),
        (
            FrameworkGic {
                redistributor_region: 0x100_0000,
                ..apple
            },
            "redistributor space",
        ),
    ];
    for (framework, expected) in cases {
        match check_geometry(&config, &framework) {
            Err(HvfError::GicLayout { field, .. }) => assert_eq!(field, expected),
            other => panic!("expected a {expected} error, got {other:?}"),
        }
    }
    assert_eq!(check_vtimer_intid(27).unwrap(), 27);
    assert!(matches!(
        check_vtimer_intid(30),
        Err(HvfError::VtimerIntid { intid: 30 })
    ));
}

#[test]
fn test_hvf_backend_is_unavailable_off_macos() {
    let config = HvfConfig {
        gic: GicV3Layout {
            distributor_base: 0x0800_0000,
            redistributor_base: 0x080a_0000,
            vcpu_count: 1,
        },
        redistributor_space: 0xf6_0000,
    };
    let result = Hvf::new(config);
    if cfg!(target_os = "macos") {
        assert!(result.is_ok());
    } else {
        assert!(matches!(
            result,
            Err(crate::HypervisorError::Unavailable { .. })
        ));
    }
}
