//! Scripted-framework tests: the real HVF exit handling runs against the fake framework of
//! `fake.rs`, whose `run` replays guest exits and whose registers record every write.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::fake::*;
use super::ffi::*;
use super::real::{FrameworkGic, VmSlot, check_geometry, check_vtimer_intid};
use super::*;
use crate::aarch64::esr::{EC_DATA_ABORT_LOWER, EC_SMC64, EC_SYSREG, EC_WFX};
use crate::aarch64::psci;
use crate::aarch64::{VcpuSetup, mpidr_of};
use crate::{Vcpu, VmExit};

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
    let state = fake.state(mpidr_of(0)).unwrap();
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
        || fake.state(mpidr_of(1)).unwrap().lock().pc() != 0x8030_0000
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
