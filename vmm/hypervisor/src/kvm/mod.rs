//! The KVM backend (Linux, x86_64).
//!
//! [`KvmHypervisor`] opens `/dev/kvm`; [`KvmVm`] owns the VM file descriptor with its in-kernel
//! irqchip (PIC, IOAPIC, LAPICs) and PIT; [`KvmVcpu`] runs one vCPU. Interrupt lines pulse the
//! irqchip with `KVM_IRQ_LINE`; no irqfd or ioeventfd is used, so device code behaves as it would
//! under Hypervisor.framework.
//!
//! Kicking: [`KvmVcpu::kicker`] returns a handle that sets `kvm_run.immediate_exit` and sends a
//! real-time signal (with an empty handler installed without `SA_RESTART`) to the vCPU thread, so
//! `KVM_RUN` returns `EINTR` whether the thread is already inside it or about to enter it.

mod vcpu;

use std::sync::Arc;

use kvm_bindings::{KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VmFd};
use squib_devices::{InterruptError, InterruptLine};

use crate::x86_64::CpuidEntry;
use crate::{Hypervisor, HypervisorError, Vcpu, Vm};

pub use vcpu::KvmVcpu;

/// Where KVM keeps the three pages of the real-mode TSS; inside the 32-bit MMIO gap, below the
/// IOAPIC, where no RAM or device lives.
const TSS_ADDRESS: usize = 0xfffb_d000;
/// The identity-map page KVM needs for real mode on Intel, right after the TSS.
const IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// CPUID leaf 1 ECX: the local APIC timer supports TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;

fn call_error(operation: &'static str, e: &kvm_ioctls::Error) -> HypervisorError {
    HypervisorError::Call {
        operation,
        code: i64::from(e.errno()),
    }
}

/// The host's `/dev/kvm`.
#[derive(Debug)]
pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and checks the capabilities squib relies on.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Unavailable`] when `/dev/kvm` cannot be opened or speaks another API
    /// version, [`HypervisorError::Unsupported`] when a needed capability is missing.
    pub fn open() -> Result<Self, HypervisorError> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::Unavailable {
            reason: format!("cannot open /dev/kvm (errno {})", e.errno()),
        })?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(HypervisorError::Unavailable {
                reason: format!("KVM API version {version}, expected 12"),
            });
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (kvm_ioctls::Cap::Pit2, "KVM_CAP_PIT2"),
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (kvm_ioctls::Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::Unsupported { capability: name });
            }
        }
        Ok(Self { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| call_error("create vm", &e))?;
        // The order matters: the TSS and identity map must exist before the irqchip, and the
        // PIT needs the irqchip.
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|e| call_error("set tss address", &e))?;
        fd.set_identity_map_address(IDENTITY_MAP_ADDRESS)
            .map_err(|e| call_error("set identity map address", &e))?;
        fd.create_irq_chip()
            .map_err(|e| call_error("create irqchip", &e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(|e| call_error("create pit", &e))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| call_error("get supported cpuid", &e))?;
        let tsc_deadline = self.kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let supported_cpuid = cpuid
            .as_slice()
            .iter()
            .map(|e| {
                let mut entry = CpuidEntry {
                    function: e.function,
                    index: e.index,
                    index_significant: e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0,
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                };
                // KVM emulates the TSC-deadline timer but leaves it out of its supported
                // CPUID for historical reasons; the capability says whether it is there.
                // Without it a guest programs its local APIC timer through the xAPIC MMIO
                // count register: one decoded and emulated instruction per timer event.
                if tsc_deadline && entry.function == 1 {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                entry
            })
            .collect();
        Ok(Arc::new(KvmVm {
            fd: Arc::new(fd),
            supported_cpuid,
        }))
    }

    fn max_vcpus(&self) -> u32 {
        u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX)
    }
}

/// One KVM virtual machine.
#[derive(Debug)]
pub struct KvmVm {
    fd: Arc<VmFd>,
    supported_cpuid: Vec<CpuidEntry>,
}

impl Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        gpa: u64,
        host_addr: u64,
        len: u64,
        read_only: bool,
    ) -> Result<(), HypervisorError> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees that the host range stays mapped and valid for the life
        // of the VM (this function's own safety contract); KVM only records the range here.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| call_error("set user memory region", &e))
    }

    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        if index >= count {
            return Err(HypervisorError::OutOfRange {
                field: "vcpu index",
                value: u64::from(index),
            });
        }
        Ok(Box::new(KvmVcpu::new(&self.fd, index)?))
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, HypervisorError> {
        // The IOAPIC has 24 pins; GSIs above that would need MSI routing.
        if gsi >= 24 {
            return Err(HypervisorError::OutOfRange {
                field: "gsi",
                value: u64::from(gsi),
            });
        }
        Ok(Arc::new(KvmInterruptLine {
            vm: self.fd.clone(),
            gsi,
        }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>, HypervisorError> {
        Ok(self.supported_cpuid.clone())
    }
}

/// An IOAPIC (and PIC) input pin of the in-kernel irqchip.
#[derive(Debug)]
struct KvmInterruptLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmInterruptLine {
    fn set(&self, level: bool) -> Result<(), InterruptError> {
        self.vm
            .set_irq_line(self.gsi, level)
            .map_err(|e| InterruptError::SetLevel {
                gsi: self.gsi,
                level,
                code: i64::from(e.errno()),
            })
    }
}

impl InterruptLine for KvmInterruptLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.set(true)?;
        self.set(false)
    }

    fn set_level(&self, level: bool) -> Result<(), InterruptError> {
        self.set(level)
    }
}
