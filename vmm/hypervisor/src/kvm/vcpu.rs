//! One KVM vCPU: boot-state loading, the run call and its translation into [`VmExit`], and the
//! kick handle.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{CpuId, Msrs, kvm_cpuid_entry2, kvm_msr_entry, kvm_segment};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use super::call_error;
use crate::x86_64::{DescriptorTable, FaultRegisters, Segment, VcpuSetup};
use crate::{HypervisorError, Vcpu, VcpuKicker, VmExit};

/// Local APIC register offsets of the LINT0 and LINT1 local vector table entries.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 8..=10).
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn handle_kick_signal(_: libc::c_int) {}

static INSTALL_KICK_HANDLER: Once = Once::new();

/// Installs the empty kick handler once per process and unblocks the signal on this thread.
fn prepare_kick_signal() -> Result<(), HypervisorError> {
    let mut install_error = None;
    INSTALL_KICK_HANDLER.call_once(|| {
        // SAFETY: an all-zero sigaction is a valid value to start from; the handler is an
        // async-signal-safe function that does nothing, and SA_RESTART is deliberately left out
        // so that KVM_RUN returns EINTR.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handle_kick_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if rc != 0 {
            install_error = Some(std::io::Error::last_os_error());
        }
    });
    if let Some(e) = install_error {
        return Err(HypervisorError::Call {
            operation: "install vcpu kick signal handler",
            code: i64::from(e.raw_os_error().unwrap_or(0)),
        });
    }
    // SAFETY: the set is initialised by sigemptyset before use and only read by
    // pthread_sigmask, which changes this thread's mask alone.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(HypervisorError::Call {
            operation: "unblock vcpu kick signal",
            code: i64::from(rc),
        });
    }
    Ok(())
}

/// The `immediate_exit` byte of a vCPU's `kvm_run` page.
#[derive(Debug, Clone, Copy)]
struct ImmediateExit(*const AtomicU8);

// SAFETY: the pointer targets the shared kvm_run mapping, which any thread may touch; it is only
// dereferenced while the owning vCPU is alive (guarded by KickState's mutex).
unsafe impl Send for ImmediateExit {}

#[derive(Debug)]
struct KickState {
    /// `None` once the vCPU is dropped: kicks become no-ops.
    target: Mutex<Option<(ImmediateExit, libc::pthread_t)>>,
}

#[derive(Debug)]
struct KvmKicker(Arc<KickState>);

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let guard = match self.0.target.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((exit, thread)) = *guard {
            // SAFETY: the vCPU (and so its kvm_run mapping) is alive while the target is Some,
            // and we hold the lock that its drop takes before unmapping.
            unsafe { &*exit.0 }.store(1, Ordering::SeqCst);
            // SAFETY: the thread is the vCPU's own thread, alive while the vCPU exists (it is
            // dropped on that thread before the thread ends); the signal has an empty handler.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// A KVM vCPU, bound to the thread that created it.
#[derive(Debug)]
pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    kick: Arc<KickState>,
    immediate_exit: ImmediateExit,
    run_page: *const kvm_bindings::kvm_run,
}

impl KvmVcpu {
    /// Creates vCPU `index` of `vm` for the calling thread.
    pub(super) fn new(vm: &VmFd, index: u32) -> Result<Self, HypervisorError> {
        prepare_kick_signal()?;
        let mut fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| call_error("create vcpu", &e))?;
        let run: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
        // SAFETY: `run` points to the live kvm_run mapping owned by `fd`; taking a field address
        // does not read it. AtomicU8 has the size and alignment of u8.
        let immediate_exit = ImmediateExit(
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) }.cast::<AtomicU8>(),
        );
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        let kick = Arc::new(KickState {
            target: Mutex::new(Some((immediate_exit, thread))),
        });
        Ok(Self {
            fd,
            index,
            kick,
            immediate_exit,
            run_page: run,
        })
    }

    fn set_lapic_lints(&self) -> Result<(), HypervisorError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| call_error("get lapic", &e))?;
        for (offset, mode) in [
            (APIC_LVT_LINT0, APIC_MODE_EXTINT),
            (APIC_LVT_LINT1, APIC_MODE_NMI),
        ] {
            let bytes =
                lapic
                    .regs
                    .get_mut(offset..offset + 4)
                    .ok_or(HypervisorError::OutOfRange {
                        field: "lapic register offset",
                        value: offset as u64,
                    })?;
            let mut raw = [0u8; 4];
            for (dst, src) in raw.iter_mut().zip(bytes.iter()) {
                *dst = src.to_ne_bytes()[0];
            }
            let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
            for (dst, src) in bytes.iter_mut().zip(value.to_le_bytes()) {
                *dst = libc::c_char::from_ne_bytes([src]);
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| call_error("set lapic", &e))
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        let mut guard = match self.kick.target.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = None;
    }
}

fn to_kvm_segment(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

/// The real-mode code segment and instruction pointer of the x86 INIT (and reset) state.
const INIT_CS_SELECTOR: u16 = 0xf000;
const INIT_CS_BASE: u64 = 0xffff_0000;
const INIT_RIP: u64 = 0xfff0;

/// Whether the registers are the INIT state. KVM on AMD (SVM) INITs a vCPU before it reports
/// KVM_EXIT_SHUTDOWN, because the processor leaves the guest state undefined after a shutdown
/// intercept; what is read afterwards then says nothing about the fault. KVM on Intel (VMX)
/// leaves the state at the triple fault in place. A squib guest never runs at the reset vector
/// (it is started in protected or long mode, without firmware), so this state means the reset.
fn is_init_state(regs: &kvm_bindings::kvm_regs, sregs: &kvm_bindings::kvm_sregs) -> bool {
    regs.rip == INIT_RIP && sregs.cs.selector == INIT_CS_SELECTOR && sregs.cs.base == INIT_CS_BASE
}

/// The crash-report subset of KVM's register sets.
fn fault_registers(
    regs: &kvm_bindings::kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> FaultRegisters {
    FaultRegisters {
        rip: regs.rip,
        rsp: regs.rsp,
        rflags: regs.rflags,
        cs: sregs.cs.selector,
        cr0: sregs.cr0,
        cr2: sregs.cr2,
        cr3: sregs.cr3,
        cr4: sregs.cr4,
        efer: sregs.efer,
        idt: DescriptorTable {
            base: sregs.idt.base,
            limit: sregs.idt.limit,
        },
    }
}

impl Vcpu for KvmVcpu {
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        let index = self.index;
        let exit_flag = self.immediate_exit;
        let run_page = self.run_page;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
                VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                // KVM_EXIT_SHUTDOWN is x86's shutdown state, entered on a triple fault.
                VcpuExit::Shutdown => VmExit::TripleFault,
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    other => VmExit::Unhandled {
                        reason: u64::from(kvm_bindings::KVM_EXIT_SYSTEM_EVENT),
                        detail: format!("system event {other}"),
                    },
                },
                VcpuExit::Intr => VmExit::Interrupted,
                VcpuExit::InternalError => {
                    // SAFETY: the kvm_run mapping lives as long as `self.fd`; KVM filled the
                    // `internal` member of the exit union for KVM_EXIT_INTERNAL_ERROR, and it
                    // is plain old data copied out here.
                    let internal = unsafe { (*run_page).__bindgen_anon_1.internal };
                    let ndata = usize::try_from(internal.ndata).unwrap_or(0).min(16);
                    VmExit::Unhandled {
                        reason: u64::from(kvm_bindings::KVM_EXIT_INTERNAL_ERROR),
                        detail: format!(
                            "vcpu {index} internal error, suberror {} data {:x?}",
                            internal.suberror,
                            internal.data.get(..ndata).unwrap_or(&[])
                        ),
                    }
                }
                VcpuExit::FailEntry(reason, cpu) => VmExit::Unhandled {
                    reason: u64::from(kvm_bindings::KVM_EXIT_FAIL_ENTRY),
                    detail: format!(
                        "vcpu {index} entry failed, hardware reason {reason:#x} on cpu {cpu}"
                    ),
                },
                other => VmExit::Unhandled {
                    reason: u64::MAX,
                    detail: format!("vcpu {index} exit {other:?}"),
                },
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the mapping lives as long as `self.fd`.
                unsafe { &*exit_flag.0 }.store(0, Ordering::SeqCst);
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(call_error("run vcpu", &e)),
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(KvmKicker(self.kick.clone()))
    }

    fn configure_x86_64(&mut self, setup: &VcpuSetup) -> Result<(), HypervisorError> {
        // CPUID first: KVM checks later register writes (EFER.LME, CR4 bits) against it.
        let entries: Vec<kvm_cpuid_entry2> = setup
            .cpuid
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: if e.index_significant {
                    kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                } else {
                    0
                },
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                padding: [0; 3],
            })
            .collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| HypervisorError::OutOfRange {
            field: "cpuid entry count",
            value: entries.len() as u64,
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| call_error("set cpuid", &e))?;

        let msr_entries: Vec<kvm_msr_entry> = setup
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                reserved: 0,
                data: m.data,
            })
            .collect();
        let msrs = Msrs::from_entries(&msr_entries).map_err(|_| HypervisorError::OutOfRange {
            field: "msr entry count",
            value: msr_entries.len() as u64,
        })?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| call_error("set msrs", &e))?;
        if written != msr_entries.len() {
            // KVM stops at the first MSR it refuses; report which one.
            let refused = msr_entries.get(written).map_or(0, |m| m.index);
            return Err(HypervisorError::OutOfRange {
                field: "msr index",
                value: u64::from(refused),
            });
        }

        let g = &setup.general;
        let regs = kvm_bindings::kvm_regs {
            rax: g.rax,
            rbx: g.rbx,
            rcx: g.rcx,
            rdx: g.rdx,
            rsi: g.rsi,
            rdi: g.rdi,
            rsp: g.rsp,
            rbp: g.rbp,
            r8: g.r8,
            r9: g.r9,
            r10: g.r10,
            r11: g.r11,
            r12: g.r12,
            r13: g.r13,
            r14: g.r14,
            r15: g.r15,
            rip: g.rip,
            rflags: g.rflags,
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| call_error("set regs", &e))?;

        // Start from KVM's values so that the APIC base and pending interrupts stay valid.
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| call_error("get sregs", &e))?;
        let s = &setup.special;
        sregs.cs = to_kvm_segment(&s.cs);
        sregs.ds = to_kvm_segment(&s.ds);
        sregs.es = to_kvm_segment(&s.es);
        sregs.fs = to_kvm_segment(&s.fs);
        sregs.gs = to_kvm_segment(&s.gs);
        sregs.ss = to_kvm_segment(&s.ss);
        sregs.tr = to_kvm_segment(&s.tr);
        sregs.ldt = to_kvm_segment(&s.ldt);
        sregs.gdt.base = s.gdt.base;
        sregs.gdt.limit = s.gdt.limit;
        sregs.idt.base = s.idt.base;
        sregs.idt.limit = s.idt.limit;
        sregs.cr0 = s.cr0;
        sregs.cr3 = s.cr3;
        sregs.cr4 = s.cr4;
        sregs.efer = s.efer;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| call_error("set sregs", &e))?;

        // x87 and SSE control words as after FNINIT / reset.
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| call_error("set fpu", &e))?;

        self.set_lapic_lints()
    }

    fn fault_registers_x86_64(&self) -> Result<Option<FaultRegisters>, HypervisorError> {
        let regs = self.fd.get_regs().map_err(|e| call_error("get regs", &e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| call_error("get sregs", &e))?;
        if is_init_state(&regs, &sregs) {
            return Ok(None);
        }
        Ok(Some(fault_registers(&regs, &sregs)))
    }

    fn tsc_khz(&self) -> Result<Option<u32>, HypervisorError> {
        match self.fd.get_tsc_khz() {
            Ok(khz) if khz > 0 => Ok(Some(khz)),
            Ok(_) => Ok(None),
            // The host kernel lacks KVM_CAP_GET_TSC_KHZ.
            Err(e) if e.errno() == libc::EINVAL || e.errno() == libc::ENOTTY => Ok(None),
            Err(e) => Err(call_error("get tsc khz", &e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fault_registers_take_each_field_from_its_kvm_register() {
        let regs = kvm_bindings::kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rsp: 0xffff_c900_0001_3f00,
            rflags: 0x10046,
            rax: 1,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs {
            cr0: 0x8005_0033,
            cr2: 0xdead_b000,
            cr3: 0x1c0_a000,
            cr4: 0x3606f0,
            efer: 0xd01,
            ..Default::default()
        };
        sregs.cs.selector = 0x10;
        sregs.idt.base = 0xffff_fe00_0000_0000;
        sregs.idt.limit = 0xfff;
        let f = fault_registers(&regs, &sregs);
        assert_eq!(
            (f.rip, f.rsp, f.rflags, f.cs),
            (0xffff_ffff_8100_0000, 0xffff_c900_0001_3f00, 0x10046, 0x10)
        );
        assert_eq!(
            (f.cr0, f.cr2, f.cr3, f.cr4, f.efer),
            (0x8005_0033, 0xdead_b000, 0x1c0_a000, 0x3606f0, 0xd01)
        );
        assert_eq!((f.idt.base, f.idt.limit), (0xffff_fe00_0000_0000, 0xfff));
    }

    #[test]
    fn test_init_state_is_recognised_and_a_long_mode_fault_is_not() {
        // What KVM on AMD hands back after a triple fault.
        let regs = kvm_bindings::kvm_regs {
            rip: 0xfff0,
            rflags: 0x2,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs {
            cr0: 0x10,
            ..Default::default()
        };
        sregs.cs.selector = 0xf000;
        sregs.cs.base = 0xffff_0000;
        assert!(is_init_state(&regs, &sregs));
        // A fault in long mode, as KVM on Intel leaves it.
        let regs = kvm_bindings::kvm_regs {
            rip: 0x10_0078,
            ..regs
        };
        sregs.cs.selector = 0x8;
        sregs.cs.base = 0;
        assert!(!is_init_state(&regs, &sregs));
    }

    #[test]
    fn test_segment_conversion_keeps_every_bit() {
        let s = Segment {
            base: 0x1000,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 3,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: true,
            unusable: false,
        };
        let k = to_kvm_segment(&s);
        assert_eq!(
            (k.base, k.limit, k.selector, k.type_, k.dpl),
            (0x1000, 0xffff_ffff, 0x10, 0xb, 3)
        );
        assert_eq!(
            (k.present, k.db, k.s, k.l, k.g, k.avl, k.unusable),
            (1, 0, 1, 1, 1, 1, 0)
        );
    }
}
