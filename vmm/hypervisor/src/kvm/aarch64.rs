//! The KVM backend on arm64 Linux hosts: vCPUs initialised with the host's preferred CPU target
//! and KVM's in-kernel PSCI 0.2+, an in-kernel GICv3 (`KVM_DEV_TYPE_ARM_VGIC_V3`), interrupt
//! lines as SPIs through `KVM_IRQ_LINE`, and the boot registers set with `KVM_SET_ONE_REG`.
//!
//! Shaped like the Hypervisor.framework backend so the generic vCPU loop sees the same thing:
//! every vCPU but the boot one starts powered off (`KVM_ARM_VCPU_POWER_OFF`) and stays inside
//! `KVM_RUN` until the guest's PSCI CPU_ON, which KVM answers itself; PSCI SYSTEM_OFF and
//! SYSTEM_RESET come back as system events.
//!
//! Order constraints of the vGIC (Linux `Documentation/virt/kvm/devices/arm-vgic-v3.rst`): the
//! device and its addresses are set up when the VM is created, before any vCPU; it is
//! initialised (`KVM_DEV_ARM_VGIC_CTRL_INIT`) only once every vCPU exists and has been through
//! `KVM_ARM_VCPU_INIT`, and before any vCPU runs. vCPUs are created on their own threads, so the
//! first `run` of each waits for the last one to be initialised, and one of them initialises the
//! vGIC.
//!
//! Kicks work as on x86_64: `kvm_run.immediate_exit` plus a real-time signal with an empty
//! handler, so `KVM_RUN` returns `EINTR` whether the thread is inside it or about to enter it.
//!
//! Tested on arm64 KVM inside an arm64 Linux guest of QEMU (TCG, `virtualization=on`): the
//! run test below boots two vCPUs through MMIO, PSCI CPU_ON, SYSTEM_OFF and a kick. On an x86_64
//! host the module is only compiled and linted for `aarch64-unknown-linux-gnu`.
//!
//! # Limitations
//!
//! The kick machinery repeats the x86_64 module's; both belong in one shared file once the KVM
//! module builds for both architectures. [`crate::probe_aarch64`] opens this backend with the
//! memory map's GIC placement, one per VM (the vGIC is sized for the VM's vCPUs).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use kvm_bindings::{
    KVM_ARM_IRQ_TYPE_SHIFT, KVM_ARM_IRQ_TYPE_SPI, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2,
    KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_MEM_READONLY, KVM_REG_ARM_CORE, KVM_REG_ARM64,
    KVM_REG_SIZE_U64, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST, kvm_create_device,
    kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_regs, kvm_vcpu_init,
};
use kvm_ioctls::{DeviceFd, Kvm, VcpuExit, VcpuFd, VmFd};
use parking_lot::{Condvar, Mutex};
use squib_devices::{InterruptError, InterruptLine};

use crate::aarch64::{GicV3Layout, PSTATE_EL1H_DAIF_MASKED, SPI_BASE_INTID, VcpuSetup};
use crate::{Hypervisor, HypervisorError, Vcpu, VcpuKicker, Vm, VmExit};

/// Interrupt IDs the vGIC implements: SGIs, PPIs and 224 SPIs (a multiple of 32, as KVM asks).
const VGIC_NR_IRQS: u32 = 256;

fn call_error(operation: &'static str, e: &kvm_ioctls::Error) -> HypervisorError {
    HypervisorError::Call {
        operation,
        code: i64::from(e.errno()),
    }
}

/// The `KVM_{GET,SET}_ONE_REG` id of a 64-bit core register at byte `offset` in `kvm_regs`.
fn core_reg_id(offset: usize) -> u64 {
    // Core register ids count 32-bit words from the start of `struct kvm_regs`.
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4) as u64
}

/// `KVM_IRQ_LINE`'s encoding of SPI `spi` (INTID 32 + spi): type in bits 31:24, INTID below.
fn spi_irq_line(spi: u32) -> Option<u32> {
    let intid = SPI_BASE_INTID.checked_add(spi)?;
    (intid < VGIC_NR_IRQS).then_some((KVM_ARM_IRQ_TYPE_SPI << KVM_ARM_IRQ_TYPE_SHIFT) | intid)
}

/// arm64 KVM (`/dev/kvm`).
#[derive(Debug)]
pub struct KvmAarch64 {
    kvm: Kvm,
    gic: GicV3Layout,
}

impl KvmAarch64 {
    /// Opens `/dev/kvm` for VMs with the GICv3 placement `gic`.
    ///
    /// # Errors
    ///
    /// [`HypervisorError::Unavailable`] without a usable `/dev/kvm`,
    /// [`HypervisorError::Unsupported`] when a needed capability is missing.
    pub fn open(gic: GicV3Layout) -> Result<Self, HypervisorError> {
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
            (kvm_ioctls::Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (kvm_ioctls::Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (kvm_ioctls::Cap::OneReg, "KVM_CAP_ONE_REG"),
            (kvm_ioctls::Cap::DeviceCtrl, "KVM_CAP_DEVICE_CTRL"),
            (kvm_ioctls::Cap::ArmPsci02, "KVM_CAP_ARM_PSCI_0_2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::Unsupported { capability: name });
            }
        }
        Ok(Self { kvm, gic })
    }
}

impl Hypervisor for KvmAarch64 {
    fn create_vm(&self) -> Result<Arc<dyn Vm>, HypervisorError> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| call_error("create vm", &e))?;
        let vgic = create_vgic(&fd, &self.gic)?;
        let mut target = kvm_vcpu_init::default();
        fd.get_preferred_target(&mut target)
            .map_err(|e| call_error("query preferred arm64 target", &e))?;
        Ok(Arc::new(KvmAarch64Vm {
            shared: Arc::new(Shared {
                fd,
                vgic,
                target,
                vcpu_count: self.gic.vcpu_count,
                init: Mutex::new(GicInit::default()),
                init_changed: Condvar::new(),
            }),
        }))
    }

    fn max_vcpus(&self) -> u32 {
        let host = u32::try_from(self.kvm.get_max_vcpus()).unwrap_or(u32::MAX);
        host.min(self.gic.vcpu_count)
    }
}

/// Creates the vGICv3 and places its distributor and redistributors.
fn create_vgic(vm: &VmFd, gic: &GicV3Layout) -> Result<DeviceFd, HypervisorError> {
    let mut device = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let vgic = vm
        .create_device(&mut device)
        .map_err(|e| call_error("create vgic-v3", &e))?;
    for (attr, address, operation) in [
        (
            KVM_VGIC_V3_ADDR_TYPE_DIST,
            gic.distributor_base,
            "set vgic distributor address",
        ),
        (
            KVM_VGIC_V3_ADDR_TYPE_REDIST,
            gic.redistributor_base,
            "set vgic redistributor address",
        ),
    ] {
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_ARM_VGIC_GRP_ADDR,
            attr: u64::from(attr),
            addr: std::ptr::addr_of!(address) as u64,
        };
        vgic.set_device_attr(&attr)
            .map_err(|e| call_error(operation, &e))?;
    }
    let nr_irqs = VGIC_NR_IRQS;
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        attr: 0,
        addr: std::ptr::addr_of!(nr_irqs) as u64,
    };
    vgic.set_device_attr(&attr)
        .map_err(|e| call_error("set vgic interrupt count", &e))?;
    Ok(vgic)
}

/// Progress towards the vGIC's initialisation.
#[derive(Debug, Default)]
struct GicInit {
    /// vCPUs through `KVM_ARM_VCPU_INIT`.
    vcpus_ready: u32,
    /// `None` until initialised; then the outcome (an errno on failure).
    outcome: Option<Result<(), i32>>,
}

#[derive(Debug)]
struct Shared {
    fd: VmFd,
    vgic: DeviceFd,
    target: kvm_vcpu_init,
    vcpu_count: u32,
    init: Mutex<GicInit>,
    init_changed: Condvar,
}

impl Shared {
    fn vcpu_initialised(&self) {
        let mut init = self.init.lock();
        init.vcpus_ready = init.vcpus_ready.saturating_add(1);
        self.init_changed.notify_all();
    }

    /// Waits until every vCPU is initialised, initialising the vGIC once. Returns `Ok(false)`
    /// when `kicked` says the wait was interrupted.
    fn wait_for_vgic(&self, kicked: &dyn Fn() -> bool) -> Result<bool, HypervisorError> {
        let mut init = self.init.lock();
        loop {
            match init.outcome {
                Some(Ok(())) => return Ok(true),
                Some(Err(errno)) => {
                    return Err(HypervisorError::Call {
                        operation: "initialise vgic",
                        code: i64::from(errno),
                    });
                }
                None if init.vcpus_ready >= self.vcpu_count => {
                    let attr = kvm_device_attr {
                        flags: 0,
                        group: KVM_DEV_ARM_VGIC_GRP_CTRL,
                        attr: u64::from(KVM_DEV_ARM_VGIC_CTRL_INIT),
                        addr: 0,
                    };
                    init.outcome = Some(self.vgic.set_device_attr(&attr).map_err(|e| e.errno()));
                    self.init_changed.notify_all();
                }
                None => {
                    if kicked() {
                        return Ok(false);
                    }
                    // Bounded, so that a kick (which only sets a flag and signals) is noticed.
                    self.init_changed
                        .wait_for(&mut init, Duration::from_millis(10));
                }
            }
        }
    }
}

/// An arm64 KVM VM.
#[derive(Debug)]
pub struct KvmAarch64Vm {
    shared: Arc<Shared>,
}

impl Vm for KvmAarch64Vm {
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
        // SAFETY: the caller guarantees the host range stays mapped and valid for the VM's
        // lifetime (this function's contract); KVM only records the range here.
        unsafe { self.shared.fd.set_user_memory_region(region) }
            .map_err(|e| call_error("set user memory region", &e))
    }

    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
        if index >= count || count != self.shared.vcpu_count {
            return Err(HypervisorError::OutOfRange {
                field: "vcpu index",
                value: u64::from(index),
            });
        }
        Ok(Box::new(KvmAarch64Vcpu::new(self.shared.clone(), index)?))
    }

    fn interrupt_line(&self, gsi: u32) -> Result<Arc<dyn InterruptLine>, HypervisorError> {
        let irq = spi_irq_line(gsi).ok_or(HypervisorError::OutOfRange {
            field: "spi",
            value: u64::from(gsi),
        })?;
        Ok(Arc::new(KvmSpi {
            shared: self.shared.clone(),
            gsi,
            irq,
        }))
    }
}

/// A shared peripheral interrupt of the vGIC.
#[derive(Debug)]
struct KvmSpi {
    shared: Arc<Shared>,
    gsi: u32,
    irq: u32,
}

impl InterruptLine for KvmSpi {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.set_level(true)?;
        self.set_level(false)
    }

    fn set_level(&self, level: bool) -> Result<(), InterruptError> {
        self.shared
            .fd
            .set_irq_line(self.irq, level)
            .map_err(|e| InterruptError::SetLevel {
                gsi: self.gsi,
                level,
                code: i64::from(e.errno()),
            })
    }
}

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
        // SAFETY: an all-zero sigaction is a valid start; the handler does nothing (so it is
        // async-signal-safe) and SA_RESTART is left out so that KVM_RUN returns EINTR.
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
    // SAFETY: the set is initialised by sigemptyset before use; pthread_sigmask changes this
    // thread's mask only.
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

impl ImmediateExit {
    /// Reads and clears the flag.
    ///
    /// # Safety
    ///
    /// The vCPU owning the mapping must be alive.
    unsafe fn take(self) -> bool {
        // SAFETY: the caller keeps the mapping alive.
        unsafe { &*self.0 }.swap(0, Ordering::SeqCst) != 0
    }
}

/// The vCPU's thread, for `pthread_kill`. musl's `pthread_t` is a pointer, glibc's an integer.
#[derive(Debug, Clone, Copy)]
struct VcpuThread(libc::pthread_t);

// SAFETY: a pthread_t is an opaque handle that any thread of the process may pass to
// pthread_kill; it is only used while the vCPU (which lives on that thread) exists.
unsafe impl Send for VcpuThread {}

#[derive(Debug)]
struct KickState {
    /// `None` once the vCPU is dropped: kicks become no-ops.
    target: Mutex<Option<(ImmediateExit, VcpuThread)>>,
}

#[derive(Debug)]
struct KvmKicker(Arc<KickState>);

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        if let Some((exit, thread)) = *self.0.target.lock() {
            // SAFETY: the vCPU (and its kvm_run mapping) is alive while the target is Some, and
            // we hold the lock its drop takes first.
            unsafe { &*exit.0 }.store(1, Ordering::SeqCst);
            // SAFETY: the thread is the vCPU's own, alive while the vCPU exists (the vCPU is
            // dropped on it); the signal's handler is empty.
            unsafe { libc::pthread_kill(thread.0, kick_signal()) };
        }
    }
}

/// An arm64 KVM vCPU, bound to the thread that created it.
#[derive(Debug)]
pub struct KvmAarch64Vcpu {
    fd: VcpuFd,
    index: u32,
    shared: Arc<Shared>,
    kick: Arc<KickState>,
    immediate_exit: ImmediateExit,
    vgic_ready: bool,
}

impl KvmAarch64Vcpu {
    fn new(shared: Arc<Shared>, index: u32) -> Result<Self, HypervisorError> {
        prepare_kick_signal()?;
        let mut fd = shared
            .fd
            .create_vcpu(u64::from(index))
            .map_err(|e| call_error("create vcpu", &e))?;
        let mut init = shared.target;
        init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
        if index != 0 {
            // Secondaries wait for the guest's PSCI CPU_ON.
            init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        fd.vcpu_init(&init)
            .map_err(|e| call_error("initialise arm64 vcpu", &e))?;
        let run: *mut kvm_bindings::kvm_run = fd.get_kvm_run();
        // SAFETY: `run` points to the live kvm_run mapping owned by `fd`; taking a field address
        // reads nothing. AtomicU8 has the size and alignment of u8.
        let immediate_exit = ImmediateExit(
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit) }.cast::<AtomicU8>(),
        );
        // SAFETY: pthread_self has no preconditions.
        let thread = VcpuThread(unsafe { libc::pthread_self() });
        shared.vcpu_initialised();
        Ok(Self {
            fd,
            index,
            shared,
            kick: Arc::new(KickState {
                target: Mutex::new(Some((immediate_exit, thread))),
            }),
            immediate_exit,
            vgic_ready: false,
        })
    }

    fn set_core_reg(
        &self,
        offset: usize,
        value: u64,
        operation: &'static str,
    ) -> Result<(), HypervisorError> {
        self.fd
            .set_one_reg(core_reg_id(offset), &value.to_le_bytes())
            .map(|_| ())
            .map_err(|e| call_error(operation, &e))
    }
}

impl Drop for KvmAarch64Vcpu {
    fn drop(&mut self) {
        // Kicks after this point do nothing; the kvm_run mapping goes away with `fd`.
        *self.kick.target.lock() = None;
    }
}

impl Vcpu for KvmAarch64Vcpu {
    fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
        if !self.vgic_ready {
            let exit = self.immediate_exit;
            // SAFETY: the mapping lives as long as `self.fd`.
            let kicked = move || unsafe { exit.take() };
            if !self.shared.wait_for_vgic(&kicked)? {
                return Ok(VmExit::Interrupted);
            }
            self.vgic_ready = true;
        }
        let index = self.index;
        let exit_flag = self.immediate_exit;
        match self.fd.run() {
            Ok(exit) => Ok(match exit {
                VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
                VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Shutdown,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    other => VmExit::Unhandled {
                        reason: u64::from(kvm_bindings::KVM_EXIT_SYSTEM_EVENT),
                        detail: format!("vcpu {index} system event {other}"),
                    },
                },
                VcpuExit::Intr => VmExit::Interrupted,
                other => VmExit::Unhandled {
                    reason: u64::MAX,
                    detail: format!("vcpu {index} exit {other:?}"),
                },
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // SAFETY: the mapping lives as long as `self.fd`.
                unsafe { exit_flag.take() };
                Ok(VmExit::Interrupted)
            }
            Err(e) => Err(call_error("run vcpu", &e)),
        }
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(KvmKicker(self.kick.clone()))
    }

    fn configure_aarch64(&mut self, setup: &VcpuSetup) -> Result<(), HypervisorError> {
        let x = |n: usize| std::mem::offset_of!(kvm_regs, regs.regs) + n * 8;
        self.set_core_reg(x(0), setup.fdt_addr, "set x0")?;
        for n in 1..=3 {
            self.set_core_reg(x(n), 0, "set x1..x3")?;
        }
        self.set_core_reg(
            std::mem::offset_of!(kvm_regs, regs.pc),
            setup.entry,
            "set pc",
        )?;
        self.set_core_reg(
            std::mem::offset_of!(kvm_regs, regs.pstate),
            PSTATE_EL1H_DAIF_MASKED,
            "set pstate",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_core_reg_ids_match_the_kernel_abi() {
        // PC is the 33rd u64 of struct kvm_regs: word offset 64.
        assert_eq!(
            core_reg_id(std::mem::offset_of!(kvm_regs, regs.pc)),
            0x6030_0000_0010_0040
        );
        assert_eq!(core_reg_id(0), 0x6030_0000_0010_0000);
        assert_eq!(
            core_reg_id(std::mem::offset_of!(kvm_regs, regs.pstate)),
            0x6030_0000_0010_0042
        );
    }

    /// Guest RAM base for the run test; the code below runs there with the MMU off.
    const RAM: u64 = 0x8000_0000;
    const RAM_LEN: usize = 2 << 20;
    /// The UART page: unmapped, so accesses exit as MMIO.
    const MMIO: u64 = 0x0900_0000;

    /// Boot CPU: store 'A' to MMIO, load from MMIO+0x18, store what was loaded to MMIO+4, then
    /// PSCI CPU_ON(mpidr 1, RAM+0x100, context 0x1234) and spin.
    const PRIMARY: [u32; 13] = [
        0xd2a1_2001, // movz x1, #0x0900, lsl #16
        0x5280_0822, // movz w2, #0x41
        0xb900_0022, // str  w2, [x1]
        0xb940_1823, // ldr  w3, [x1, #0x18]
        0xb900_0423, // str  w3, [x1, #4]
        0xd280_0060, // movz x0, #0x0003
        0xf2b8_8000, // movk x0, #0xc400, lsl #16   (CPU_ON, 64-bit)
        0xd280_0021, // movz x1, #1
        0xd280_2002, // movz x2, #0x0100
        0xf2b0_0002, // movk x2, #0x8000, lsl #16
        0xd282_4683, // movz x3, #0x1234
        0xd400_0002, // hvc  #0
        0x1400_0000, // b    .
    ];
    /// Secondary CPU at RAM+0x100: store its X0 (the CPU_ON context) to MMIO+8, SYSTEM_OFF.
    const SECONDARY: [u32; 6] = [
        0xd2a1_2001, // movz x1, #0x0900, lsl #16
        0xf900_0420, // str  x0, [x1, #8]
        0xd280_0100, // movz x0, #0x0008
        0xf2b0_8000, // movk x0, #0x8400, lsl #16   (SYSTEM_OFF)
        0xd400_0002, // hvc  #0
        0x1400_0000, // b    .
    ];

    /// Boots two vCPUs on real arm64 KVM: MMIO both ways, in-kernel PSCI CPU_ON with the
    /// context reaching the parked secondary, SYSTEM_OFF as a shutdown exit, and a kick.
    #[test]
    fn test_kvm_aarch64_runs_mmio_psci_and_kick() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: this host has no /dev/kvm");
            return;
        }
        let gic = GicV3Layout {
            distributor_base: 0x0800_0000,
            redistributor_base: 0x080a_0000,
            vcpu_count: 2,
        };
        let vm = KvmAarch64::open(gic).unwrap().create_vm().unwrap();
        // SAFETY: a fresh private anonymous mapping, unmapped at the end after the VM is gone.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(mem, libc::MAP_FAILED);
        for (offset, code) in [(0usize, &PRIMARY[..]), (0x100, &SECONDARY[..])] {
            for (i, word) in code.iter().enumerate() {
                // SAFETY: inside the mapping, 4-byte aligned.
                unsafe {
                    mem.cast::<u8>()
                        .add(offset + 4 * i)
                        .cast::<u32>()
                        .write(word.to_le())
                };
            }
        }
        // SAFETY: the mapping outlives the VM (dropped before munmap below).
        unsafe { vm.map_memory(0, RAM, mem as u64, RAM_LEN as u64, false) }.unwrap();

        let secondary = {
            let vm = vm.clone();
            std::thread::spawn(move || {
                let mut vcpu = vm.create_vcpu(1, 2).unwrap();
                let mut writes = Vec::new();
                loop {
                    match vcpu.run().unwrap() {
                        VmExit::MmioWrite { addr, data } => writes.push((addr, data.to_vec())),
                        VmExit::Shutdown => return writes,
                        other => panic!("secondary: unexpected exit {other:?}"),
                    }
                }
            })
        };
        let mut vcpu = vm.create_vcpu(0, 2).unwrap();
        vcpu.configure_aarch64(&VcpuSetup {
            entry: RAM,
            fdt_addr: 0,
        })
        .unwrap();
        match vcpu.run().unwrap() {
            VmExit::MmioWrite { addr, data } => {
                assert_eq!((addr, data), (MMIO, &[0x41, 0, 0, 0][..]));
            }
            other => panic!("expected the store of 'A', got {other:?}"),
        }
        match vcpu.run().unwrap() {
            VmExit::MmioRead { addr, data } => {
                assert_eq!((addr, data.len()), (MMIO + 0x18, 4));
                data.copy_from_slice(&[0x90, 0, 0, 0]);
            }
            other => panic!("expected the load, got {other:?}"),
        }
        match vcpu.run().unwrap() {
            VmExit::MmioWrite { addr, data } => {
                assert_eq!((addr, data), (MMIO + 4, &[0x90, 0, 0, 0][..]));
            }
            other => panic!("expected the loaded value stored back, got {other:?}"),
        }
        // The boot CPU now starts the secondary and spins: kick it once the secondary is done.
        let kicker = vcpu.kicker();
        let waiter = std::thread::spawn(move || {
            let writes = secondary.join().unwrap();
            kicker.kick();
            writes
        });
        assert!(matches!(vcpu.run().unwrap(), VmExit::Interrupted));
        let writes = waiter.join().unwrap();
        assert_eq!(writes, vec![(MMIO + 8, 0x1234u64.to_le_bytes().to_vec())]);
        drop(vcpu);
        drop(vm);
        // SAFETY: the VM and its vCPUs are gone; the mapping is ours.
        assert_eq!(unsafe { libc::munmap(mem, RAM_LEN) }, 0);
    }

    #[test]
    fn test_spi_irq_line_encoding_and_range() {
        assert_eq!(spi_irq_line(0), Some(0x0100_0020));
        assert_eq!(spi_irq_line(16), Some(0x0100_0030));
        assert_eq!(spi_irq_line(223), Some(0x0100_00ff));
        assert_eq!(spi_irq_line(224), None);
    }
}
