//! Hand-written declarations of the Hypervisor.framework (arm64) C interface, and the checked
//! safe wrappers the rest of the backend calls.
//!
//! The extern block links the framework only when building for macOS, so the declarations and
//! every caller type-check on any host; nothing here may be *called* elsewhere, and the backend
//! never constructs its real vCPUs off macOS. The GICv3 functions exist from macOS 15 only: they
//! are not declared in the extern block (a missing symbol would stop the binary from loading on
//! older systems) but looked up at run time with `dlsym`, see [`GicFunctions`].
//!
//! Each framework function has a safe wrapper below its declaration block that checks the
//! `hv_return_t` at once and keeps it in [`HvfError::Call`]. Types and values follow Apple's
//! `Hypervisor/hv_*.h` headers for arm64.
#![allow(non_camel_case_types)]

use std::ffi::{CStr, c_void};

use super::HvfError;

/// `hv_return_t`: a Mach error code, 0 on success.
pub type hv_return_t = i32;
/// `hv_vcpu_t`: a vCPU handle.
pub type hv_vcpu_t = u64;
/// `hv_ipa_t`: an intermediate physical (guest-physical) address.
pub type hv_ipa_t = u64;
/// `hv_memory_flags_t`: mapping permissions.
pub type hv_memory_flags_t = u64;
/// `hv_reg_t`: a general-purpose or special register.
pub type hv_reg_t = u32;
/// `hv_sys_reg_t`: a system register, encoded `op0:op1:CRn:CRm:op2`.
pub type hv_sys_reg_t = u16;
/// `hv_interrupt_type_t`.
pub type hv_interrupt_type_t = u32;
/// `hv_exit_reason_t`.
pub type hv_exit_reason_t = u32;
/// `hv_gic_intid_t`: the framework's reserved interrupts.
pub type hv_gic_intid_t = u16;
/// `hv_gic_redistributor_reg_t`: redistributor register offsets from RD_base.
pub type hv_gic_redistributor_reg_t = u32;
/// `hv_vm_config_t`, `hv_vcpu_config_t`, `hv_gic_config_t`: OS objects; null selects defaults.
pub type hv_config_t = *mut c_void;

/// The call succeeded.
pub const HV_SUCCESS: hv_return_t = 0;
/// Unspecified failure.
pub const HV_ERROR: hv_return_t = 0xfae9_4001_u32.cast_signed();
/// The resource is busy.
pub const HV_BUSY: hv_return_t = 0xfae9_4002_u32.cast_signed();
/// An argument is invalid.
pub const HV_BAD_ARGUMENT: hv_return_t = 0xfae9_4003_u32.cast_signed();
/// The guest state is invalid.
pub const HV_ILLEGAL_GUEST_STATE: hv_return_t = 0xfae9_4004_u32.cast_signed();
/// Out of resources.
pub const HV_NO_RESOURCES: hv_return_t = 0xfae9_4005_u32.cast_signed();
/// No virtualization device (no hardware support).
pub const HV_NO_DEVICE: hv_return_t = 0xfae9_4006_u32.cast_signed();
/// Denied: the process lacks the `com.apple.security.hypervisor` entitlement.
pub const HV_DENIED: hv_return_t = 0xfae9_4007_u32.cast_signed();
/// The operation is not supported.
pub const HV_UNSUPPORTED: hv_return_t = 0xfae9_400f_u32.cast_signed();

/// The symbolic name of an `hv_return_t`, for error messages.
pub fn return_name(code: hv_return_t) -> &'static str {
    match code {
        HV_SUCCESS => "HV_SUCCESS",
        HV_ERROR => "HV_ERROR",
        HV_BUSY => "HV_BUSY",
        HV_BAD_ARGUMENT => "HV_BAD_ARGUMENT",
        HV_ILLEGAL_GUEST_STATE => "HV_ILLEGAL_GUEST_STATE",
        HV_NO_RESOURCES => "HV_NO_RESOURCES",
        HV_NO_DEVICE => "HV_NO_DEVICE",
        HV_DENIED => "HV_DENIED",
        HV_UNSUPPORTED => "HV_UNSUPPORTED",
        _ => "unknown",
    }
}

/// Mapping permission: readable.
pub const HV_MEMORY_READ: hv_memory_flags_t = 1 << 0;
/// Mapping permission: writable.
pub const HV_MEMORY_WRITE: hv_memory_flags_t = 1 << 1;
/// Mapping permission: executable.
pub const HV_MEMORY_EXEC: hv_memory_flags_t = 1 << 2;

/// Exit reason: `hv_vcpus_exit` was called for this vCPU.
pub const HV_EXIT_REASON_CANCELED: hv_exit_reason_t = 0;
/// Exit reason: a synchronous exception to EL2; see [`hv_vcpu_exit_exception_t`].
pub const HV_EXIT_REASON_EXCEPTION: hv_exit_reason_t = 1;
/// Exit reason: the virtual timer fired; the framework masked it (see the vCPU module).
pub const HV_EXIT_REASON_VTIMER_ACTIVATED: hv_exit_reason_t = 2;
/// Exit reason: unknown.
pub const HV_EXIT_REASON_UNKNOWN: hv_exit_reason_t = 3;

/// Interrupt type for `hv_vcpu_set_pending_interrupt`: IRQ.
pub const HV_INTERRUPT_TYPE_IRQ: hv_interrupt_type_t = 0;
/// Interrupt type: FIQ.
pub const HV_INTERRUPT_TYPE_FIQ: hv_interrupt_type_t = 1;

/// `HV_REG_X0`; `HV_REG_Xn` is `n` for n in 0..=30.
pub const HV_REG_X0: hv_reg_t = 0;
/// Program counter.
pub const HV_REG_PC: hv_reg_t = 31;
/// Floating-point control register.
pub const HV_REG_FPCR: hv_reg_t = 32;
/// Floating-point status register.
pub const HV_REG_FPSR: hv_reg_t = 33;
/// PSTATE as seen in SPSR layout.
pub const HV_REG_CPSR: hv_reg_t = 34;

/// `HV_SYS_REG_MPIDR_EL1`.
pub const HV_SYS_REG_MPIDR_EL1: hv_sys_reg_t = 0xc005;
/// `HV_SYS_REG_SCTLR_EL1`.
pub const HV_SYS_REG_SCTLR_EL1: hv_sys_reg_t = 0xc080;
/// `HV_SYS_REG_CNTV_CTL_EL0`.
pub const HV_SYS_REG_CNTV_CTL_EL0: hv_sys_reg_t = 0xdf19;
/// `HV_SYS_REG_CNTV_CVAL_EL0`.
pub const HV_SYS_REG_CNTV_CVAL_EL0: hv_sys_reg_t = 0xdf1a;

/// `HV_GIC_INT_EL1_VIRTUAL_TIMER`: the guest's virtual timer interrupt.
pub const HV_GIC_INT_EL1_VIRTUAL_TIMER: hv_gic_intid_t = 27;
/// GICR_ISPENDR0 (SGI_base + 0x200): set-pending bits of SGIs and PPIs.
pub const HV_GIC_REDISTRIBUTOR_REG_GICR_ISPENDR0: hv_gic_redistributor_reg_t = 0x1_0200;
/// GICR_ICPENDR0 (SGI_base + 0x280): clear-pending bits of SGIs and PPIs.
pub const HV_GIC_REDISTRIBUTOR_REG_GICR_ICPENDR0: hv_gic_redistributor_reg_t = 0x1_0280;

/// The exception part of an exit.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct hv_vcpu_exit_exception_t {
    /// ESR_EL2 of the exception.
    pub syndrome: u64,
    /// FAR_EL2: the faulting virtual address.
    pub virtual_address: u64,
    /// The faulting intermediate physical address.
    pub physical_address: u64,
}

/// `hv_vcpu_exit_t`: written by the framework on every return of `hv_vcpu_run`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct hv_vcpu_exit_t {
    /// One of the `HV_EXIT_REASON_*` values.
    pub reason: hv_exit_reason_t,
    /// Valid for [`HV_EXIT_REASON_EXCEPTION`].
    pub exception: hv_vcpu_exit_exception_t,
}

#[cfg_attr(target_os = "macos", link(name = "Hypervisor", kind = "framework"))]
unsafe extern "C" {
    /// Creates the process's VM.
    pub fn hv_vm_create(config: hv_config_t) -> hv_return_t;
    /// Destroys the process's VM.
    pub fn hv_vm_destroy() -> hv_return_t;
    /// Maps host memory into the guest-physical address space.
    pub fn hv_vm_map(
        addr: *mut c_void,
        ipa: hv_ipa_t,
        size: usize,
        flags: hv_memory_flags_t,
    ) -> hv_return_t;
    /// Unmaps a guest-physical range.
    pub fn hv_vm_unmap(ipa: hv_ipa_t, size: usize) -> hv_return_t;
    /// Changes the permissions of a guest-physical range.
    pub fn hv_vm_protect(ipa: hv_ipa_t, size: usize, flags: hv_memory_flags_t) -> hv_return_t;

    /// Creates a vCPU bound to the calling thread; `exit` receives the exit record's address.
    pub fn hv_vcpu_create(
        vcpu: *mut hv_vcpu_t,
        exit: *mut *const hv_vcpu_exit_t,
        config: hv_config_t,
    ) -> hv_return_t;
    /// Destroys a vCPU (on its thread).
    pub fn hv_vcpu_destroy(vcpu: hv_vcpu_t) -> hv_return_t;
    /// Runs a vCPU until the next exit (on its thread).
    pub fn hv_vcpu_run(vcpu: hv_vcpu_t) -> hv_return_t;
    /// Forces the listed vCPUs out of `hv_vcpu_run`; any thread.
    pub fn hv_vcpus_exit(vcpus: *const hv_vcpu_t, vcpu_count: u32) -> hv_return_t;
    /// Reads a general-purpose or special register.
    pub fn hv_vcpu_get_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: *mut u64) -> hv_return_t;
    /// Writes a general-purpose or special register.
    pub fn hv_vcpu_set_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: u64) -> hv_return_t;
    /// Reads a system register.
    pub fn hv_vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: *mut u64) -> hv_return_t;
    /// Writes a system register.
    pub fn hv_vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: u64) -> hv_return_t;
    /// Asserts or clears the vCPU's IRQ or FIQ input (without a framework GIC).
    pub fn hv_vcpu_set_pending_interrupt(
        vcpu: hv_vcpu_t,
        kind: hv_interrupt_type_t,
        pending: bool,
    ) -> hv_return_t;
    /// Reads whether the virtual timer's exits are masked.
    pub fn hv_vcpu_get_vtimer_mask(vcpu: hv_vcpu_t, masked: *mut bool) -> hv_return_t;
    /// Masks or unmasks the virtual timer's exits.
    pub fn hv_vcpu_set_vtimer_mask(vcpu: hv_vcpu_t, masked: bool) -> hv_return_t;
    /// Reads the virtual counter's offset from `mach_absolute_time`.
    pub fn hv_vcpu_get_vtimer_offset(vcpu: hv_vcpu_t, offset: *mut u64) -> hv_return_t;
    /// Sets the virtual counter's offset.
    pub fn hv_vcpu_set_vtimer_offset(vcpu: hv_vcpu_t, offset: u64) -> hv_return_t;
}

/// Creates the process's VM with the framework's default configuration (36-bit IPA space).
///
/// # Errors
///
/// [`HvfError::Call`]: `HV_DENIED` without the hypervisor entitlement, `HV_BUSY` when the
/// process has a VM already, `HV_NO_DEVICE` without hardware support.
pub fn vm_create() -> Result<(), HvfError> {
    // SAFETY: a null configuration selects the defaults; no pointer is kept.
    check("hv_vm_create", unsafe {
        hv_vm_create(std::ptr::null_mut())
    })
}

/// Destroys the process's VM. Every vCPU must be destroyed first.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vm_destroy() -> Result<(), HvfError> {
    // SAFETY: no arguments; the framework checks that a VM exists.
    check("hv_vm_destroy", unsafe { hv_vm_destroy() })
}

/// Maps `size` bytes of host memory at `host_addr` to guest-physical `ipa`.
///
/// # Errors
///
/// [`HvfError::Call`] for unaligned or overlapping ranges and other refusals.
///
/// # Safety
///
/// The host range must stay mapped, and not be reused for anything else, for as long as the
/// guest mapping exists: the guest reads and writes it at any time.
pub unsafe fn vm_map(
    host_addr: *mut c_void,
    ipa: hv_ipa_t,
    size: usize,
    flags: hv_memory_flags_t,
) -> Result<(), HvfError> {
    // SAFETY: the caller guarantees the host range outlives the mapping.
    check("hv_vm_map", unsafe {
        hv_vm_map(host_addr, ipa, size, flags)
    })
}

/// Removes the guest mapping of `[ipa, ipa + size)`.
///
/// # Errors
///
/// [`HvfError::Call`] when the range is not mapped or not aligned.
pub fn vm_unmap(ipa: hv_ipa_t, size: usize) -> Result<(), HvfError> {
    // SAFETY: plain values; the framework checks the range.
    check("hv_vm_unmap", unsafe { hv_vm_unmap(ipa, size) })
}

/// Changes the guest's permissions on `[ipa, ipa + size)`.
///
/// # Errors
///
/// [`HvfError::Call`] when the range is not mapped or not aligned.
pub fn vm_protect(ipa: hv_ipa_t, size: usize, flags: hv_memory_flags_t) -> Result<(), HvfError> {
    // SAFETY: plain values; the framework checks the range.
    check("hv_vm_protect", unsafe { hv_vm_protect(ipa, size, flags) })
}

/// Creates a vCPU bound to the calling thread; returns its handle and its exit record, which
/// the framework fills on every return from [`vcpu_run`] and keeps alive until [`vcpu_destroy`].
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses (too many vCPUs, one already on this thread).
pub fn vcpu_create() -> Result<(hv_vcpu_t, *const hv_vcpu_exit_t), HvfError> {
    let mut handle: hv_vcpu_t = 0;
    let mut exit: *const hv_vcpu_exit_t = std::ptr::null();
    // SAFETY: both out pointers are valid for the call; a null configuration selects defaults.
    check("hv_vcpu_create", unsafe {
        hv_vcpu_create(&mut handle, &mut exit, std::ptr::null_mut())
    })?;
    if exit.is_null() {
        return Err(HvfError::Call {
            operation: "hv_vcpu_create",
            code: HV_ERROR,
        });
    }
    Ok((handle, exit))
}

/// Destroys a vCPU; call on its own thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_destroy(vcpu: hv_vcpu_t) -> Result<(), HvfError> {
    // SAFETY: plain value; the framework checks the handle and the thread.
    check("hv_vcpu_destroy", unsafe { hv_vcpu_destroy(vcpu) })
}

/// Runs a vCPU until its next exit; call on its own thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_run(vcpu: hv_vcpu_t) -> Result<(), HvfError> {
    // SAFETY: plain value; the framework checks the handle and the thread.
    check("hv_vcpu_run", unsafe { hv_vcpu_run(vcpu) })
}

/// Forces the given vCPUs out of [`vcpu_run`]; any thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpus_exit(vcpus: &[hv_vcpu_t]) -> Result<(), HvfError> {
    let count = u32::try_from(vcpus.len()).map_err(|_| HvfError::Call {
        operation: "hv_vcpus_exit",
        code: HV_BAD_ARGUMENT,
    })?;
    // SAFETY: the pointer and count describe the borrowed slice for the duration of the call.
    check("hv_vcpus_exit", unsafe {
        hv_vcpus_exit(vcpus.as_ptr(), count)
    })
}

/// Reads a general-purpose or special register; call on the vCPU's thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_get_reg(vcpu: hv_vcpu_t, reg: hv_reg_t) -> Result<u64, HvfError> {
    let mut value = 0;
    // SAFETY: `value` is a valid out pointer for the duration of the call.
    check("hv_vcpu_get_reg", unsafe {
        hv_vcpu_get_reg(vcpu, reg, &mut value)
    })?;
    Ok(value)
}

/// Writes a general-purpose or special register; call on the vCPU's thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_set_reg(vcpu: hv_vcpu_t, reg: hv_reg_t, value: u64) -> Result<(), HvfError> {
    // SAFETY: plain values.
    check("hv_vcpu_set_reg", unsafe {
        hv_vcpu_set_reg(vcpu, reg, value)
    })
}

/// Reads a system register; call on the vCPU's thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_get_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t) -> Result<u64, HvfError> {
    let mut value = 0;
    // SAFETY: `value` is a valid out pointer for the duration of the call.
    check("hv_vcpu_get_sys_reg", unsafe {
        hv_vcpu_get_sys_reg(vcpu, reg, &mut value)
    })?;
    Ok(value)
}

/// Writes a system register; call on the vCPU's thread.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_set_sys_reg(vcpu: hv_vcpu_t, reg: hv_sys_reg_t, value: u64) -> Result<(), HvfError> {
    // SAFETY: plain values.
    check("hv_vcpu_set_sys_reg", unsafe {
        hv_vcpu_set_sys_reg(vcpu, reg, value)
    })
}

/// Asserts or clears the vCPU's IRQ or FIQ input directly (only without a framework GIC).
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_set_pending_interrupt(
    vcpu: hv_vcpu_t,
    kind: hv_interrupt_type_t,
    pending: bool,
) -> Result<(), HvfError> {
    // SAFETY: plain values.
    check("hv_vcpu_set_pending_interrupt", unsafe {
        hv_vcpu_set_pending_interrupt(vcpu, kind, pending)
    })
}

/// Whether the vCPU's virtual timer exits are masked.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_get_vtimer_mask(vcpu: hv_vcpu_t) -> Result<bool, HvfError> {
    let mut masked = false;
    // SAFETY: `masked` is a valid out pointer for the duration of the call.
    check("hv_vcpu_get_vtimer_mask", unsafe {
        hv_vcpu_get_vtimer_mask(vcpu, &mut masked)
    })?;
    Ok(masked)
}

/// Masks or unmasks the vCPU's virtual timer exits.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_set_vtimer_mask(vcpu: hv_vcpu_t, masked: bool) -> Result<(), HvfError> {
    // SAFETY: plain values.
    check("hv_vcpu_set_vtimer_mask", unsafe {
        hv_vcpu_set_vtimer_mask(vcpu, masked)
    })
}

/// The vCPU's virtual counter offset: CNTVCT = `mach_absolute_time()` − offset.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_get_vtimer_offset(vcpu: hv_vcpu_t) -> Result<u64, HvfError> {
    let mut offset = 0;
    // SAFETY: `offset` is a valid out pointer for the duration of the call.
    check("hv_vcpu_get_vtimer_offset", unsafe {
        hv_vcpu_get_vtimer_offset(vcpu, &mut offset)
    })?;
    Ok(offset)
}

/// Sets the vCPU's virtual counter offset.
///
/// # Errors
///
/// [`HvfError::Call`] when the framework refuses.
pub fn vcpu_set_vtimer_offset(vcpu: hv_vcpu_t, offset: u64) -> Result<(), HvfError> {
    // SAFETY: plain values.
    check("hv_vcpu_set_vtimer_offset", unsafe {
        hv_vcpu_set_vtimer_offset(vcpu, offset)
    })
}

/// `hv_gic_config_create`.
pub type HvGicConfigCreate = unsafe extern "C" fn() -> hv_config_t;
/// `hv_gic_config_set_distributor_base` / `..._set_redistributor_base`.
pub type HvGicConfigSetBase = unsafe extern "C" fn(hv_config_t, hv_ipa_t) -> hv_return_t;
/// `hv_gic_create`.
pub type HvGicCreate = unsafe extern "C" fn(hv_config_t) -> hv_return_t;
/// `hv_gic_set_spi`.
pub type HvGicSetSpi = unsafe extern "C" fn(u32, bool) -> hv_return_t;
/// `hv_gic_get_distributor_size`, `hv_gic_get_redistributor_size`, the region size and the
/// alignments.
pub type HvGicGetSize = unsafe extern "C" fn(*mut usize) -> hv_return_t;
/// `hv_gic_get_intid`.
pub type HvGicGetIntid = unsafe extern "C" fn(hv_gic_intid_t, *mut u32) -> hv_return_t;
/// `hv_gic_get_redistributor_reg`.
pub type HvGicGetRedistributorReg =
    unsafe extern "C" fn(hv_vcpu_t, hv_gic_redistributor_reg_t, *mut u64) -> hv_return_t;
/// `hv_gic_set_redistributor_reg`.
pub type HvGicSetRedistributorReg =
    unsafe extern "C" fn(hv_vcpu_t, hv_gic_redistributor_reg_t, u64) -> hv_return_t;
/// `os_release`, for the configuration object.
pub type OsRelease = unsafe extern "C" fn(*mut c_void);

/// The macOS 15 GICv3 functions, resolved at run time.
#[derive(Debug, Clone, Copy)]
pub struct GicFunctions {
    config_create: HvGicConfigCreate,
    config_set_distributor_base: HvGicConfigSetBase,
    config_set_redistributor_base: HvGicConfigSetBase,
    create: HvGicCreate,
    set_spi: HvGicSetSpi,
    get_distributor_size: HvGicGetSize,
    get_distributor_base_alignment: HvGicGetSize,
    get_redistributor_size: HvGicGetSize,
    get_redistributor_base_alignment: HvGicGetSize,
    get_redistributor_region_size: HvGicGetSize,
    get_intid: HvGicGetIntid,
    get_redistributor_reg: HvGicGetRedistributorReg,
    set_redistributor_reg: HvGicSetRedistributorReg,
    os_release: OsRelease,
}

/// Looks up a symbol in the images already loaded into the process.
fn lookup(name: &CStr) -> Option<*mut c_void> {
    // SAFETY: RTLD_DEFAULT searches the loaded images; `name` is a NUL-terminated string that
    // lives across the call. dlsym has no other precondition.
    let ptr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    (!ptr.is_null()).then_some(ptr)
}

macro_rules! resolve {
    ($name:literal, $ty:ty) => {{
        let ptr = lookup($name).ok_or(HvfError::GicUnavailable {
            symbol: match $name.to_str() {
                Ok(s) => s,
                Err(_) => "?",
            },
        })?;
        // SAFETY: the symbol of this name is the framework function whose C prototype `$ty`
        // transcribes (Apple's hv_gic.h); a data pointer and a function pointer have the same
        // size and representation on every platform Rust and the framework support.
        unsafe { std::mem::transmute::<*mut c_void, $ty>(ptr) }
    }};
}

impl GicFunctions {
    /// Resolves every GIC function.
    ///
    /// # Errors
    ///
    /// [`HvfError::GicUnavailable`] naming the first missing symbol: the host runs a macOS
    /// older than 15, which has no in-kernel GIC.
    pub fn resolve() -> Result<Self, HvfError> {
        Ok(Self {
            config_create: resolve!(c"hv_gic_config_create", HvGicConfigCreate),
            config_set_distributor_base: resolve!(
                c"hv_gic_config_set_distributor_base",
                HvGicConfigSetBase
            ),
            config_set_redistributor_base: resolve!(
                c"hv_gic_config_set_redistributor_base",
                HvGicConfigSetBase
            ),
            create: resolve!(c"hv_gic_create", HvGicCreate),
            set_spi: resolve!(c"hv_gic_set_spi", HvGicSetSpi),
            get_distributor_size: resolve!(c"hv_gic_get_distributor_size", HvGicGetSize),
            get_distributor_base_alignment: resolve!(
                c"hv_gic_get_distributor_base_alignment",
                HvGicGetSize
            ),
            get_redistributor_size: resolve!(c"hv_gic_get_redistributor_size", HvGicGetSize),
            get_redistributor_base_alignment: resolve!(
                c"hv_gic_get_redistributor_base_alignment",
                HvGicGetSize
            ),
            get_redistributor_region_size: resolve!(
                c"hv_gic_get_redistributor_region_size",
                HvGicGetSize
            ),
            get_intid: resolve!(c"hv_gic_get_intid", HvGicGetIntid),
            get_redistributor_reg: resolve!(
                c"hv_gic_get_redistributor_reg",
                HvGicGetRedistributorReg
            ),
            set_redistributor_reg: resolve!(
                c"hv_gic_set_redistributor_reg",
                HvGicSetRedistributorReg
            ),
            os_release: resolve!(c"os_release", OsRelease),
        })
    }

    /// Creates the GICv3 with its distributor and redistributors at the given bases. Must run
    /// after `hv_vm_create` and before the first `hv_vcpu_create`.
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] for the configuration step the framework refused.
    pub fn create_gic(
        &self,
        distributor_base: u64,
        redistributor_base: u64,
    ) -> Result<(), HvfError> {
        // SAFETY: the function takes no argument and returns a new object or null.
        let config = unsafe { (self.config_create)() };
        if config.is_null() {
            return Err(HvfError::Call {
                operation: "hv_gic_config_create",
                code: HV_NO_RESOURCES,
            });
        }
        let result = (|| {
            // SAFETY: `config` is the live object created above.
            check("hv_gic_config_set_distributor_base", unsafe {
                (self.config_set_distributor_base)(config, distributor_base)
            })?;
            // SAFETY: as above.
            check("hv_gic_config_set_redistributor_base", unsafe {
                (self.config_set_redistributor_base)(config, redistributor_base)
            })?;
            // SAFETY: as above; the framework copies what it needs from the configuration.
            check("hv_gic_create", unsafe { (self.create)(config) })
        })();
        // SAFETY: `config` was returned retained by hv_gic_config_create and is not used after.
        unsafe { (self.os_release)(config) };
        result
    }

    fn size(&self, operation: &'static str, f: HvGicGetSize) -> Result<u64, HvfError> {
        let mut value = 0usize;
        // SAFETY: `value` is a valid out pointer for the duration of the call.
        check(operation, unsafe { f(&mut value) })?;
        Ok(value as u64)
    }

    /// Distributor size and required base alignment, in bytes.
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] when the framework refuses.
    pub fn distributor_geometry(&self) -> Result<(u64, u64), HvfError> {
        Ok((
            self.size("hv_gic_get_distributor_size", self.get_distributor_size)?,
            self.size(
                "hv_gic_get_distributor_base_alignment",
                self.get_distributor_base_alignment,
            )?,
        ))
    }

    /// Per-vCPU redistributor size, required region base alignment, and the size of the whole
    /// redistributor region (for the most vCPUs the framework supports), in bytes.
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] when the framework refuses.
    pub fn redistributor_geometry(&self) -> Result<(u64, u64, u64), HvfError> {
        Ok((
            self.size("hv_gic_get_redistributor_size", self.get_redistributor_size)?,
            self.size(
                "hv_gic_get_redistributor_base_alignment",
                self.get_redistributor_base_alignment,
            )?,
            self.size(
                "hv_gic_get_redistributor_region_size",
                self.get_redistributor_region_size,
            )?,
        ))
    }

    /// The INTID of the guest's virtual timer interrupt.
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] when the framework refuses.
    pub fn vtimer_intid(&self) -> Result<u32, HvfError> {
        let mut intid = 0u32;
        // SAFETY: `intid` is a valid out pointer for the duration of the call.
        check("hv_gic_get_intid", unsafe {
            (self.get_intid)(HV_GIC_INT_EL1_VIRTUAL_TIMER, &mut intid)
        })?;
        Ok(intid)
    }

    /// Sets the level of the shared peripheral interrupt `intid` (32 and up).
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] when the framework refuses.
    pub fn set_spi(&self, intid: u32, level: bool) -> Result<(), HvfError> {
        // SAFETY: plain values; the framework validates the INTID.
        check("hv_gic_set_spi", unsafe { (self.set_spi)(intid, level) })
    }

    /// Reads a redistributor register of `vcpu`. Call on the vCPU's own thread.
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] when the framework refuses.
    pub fn redistributor_reg(
        &self,
        vcpu: hv_vcpu_t,
        reg: hv_gic_redistributor_reg_t,
    ) -> Result<u64, HvfError> {
        let mut value = 0u64;
        // SAFETY: `value` is a valid out pointer for the duration of the call.
        check("hv_gic_get_redistributor_reg", unsafe {
            (self.get_redistributor_reg)(vcpu, reg, &mut value)
        })?;
        Ok(value)
    }

    /// Writes a redistributor register of `vcpu`. Call on the vCPU's own thread.
    ///
    /// # Errors
    ///
    /// [`HvfError::Call`] when the framework refuses.
    pub fn set_redistributor_reg(
        &self,
        vcpu: hv_vcpu_t,
        reg: hv_gic_redistributor_reg_t,
        value: u64,
    ) -> Result<(), HvfError> {
        // SAFETY: plain values; the framework validates the vCPU and register.
        check("hv_gic_set_redistributor_reg", unsafe {
            (self.set_redistributor_reg)(vcpu, reg, value)
        })
    }
}

/// Turns an `hv_return_t` into a result that keeps the code.
///
/// # Errors
///
/// [`HvfError::Call`] for any code but [`HV_SUCCESS`].
pub fn check(operation: &'static str, code: hv_return_t) -> Result<(), HvfError> {
    if code == HV_SUCCESS {
        Ok(())
    } else {
        Err(HvfError::Call { operation, code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_struct_layout_matches_the_c_header() {
        // reason (u32) is padded to 8 before the 8-byte aligned exception struct.
        assert_eq!(std::mem::size_of::<hv_vcpu_exit_t>(), 32);
        assert_eq!(std::mem::offset_of!(hv_vcpu_exit_t, exception), 8);
        assert_eq!(
            std::mem::offset_of!(hv_vcpu_exit_exception_t, physical_address),
            16
        );
    }

    #[test]
    fn test_check_keeps_the_code_and_names_it() {
        assert!(check("hv_vm_create", HV_SUCCESS).is_ok());
        let err = check("hv_vm_create", HV_DENIED).unwrap_err();
        assert!(matches!(
            err,
            HvfError::Call {
                operation: "hv_vm_create",
                code: HV_DENIED
            }
        ));
        assert_eq!(return_name(HV_DENIED), "HV_DENIED");
        assert_eq!(return_name(0x1234), "unknown");
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn test_gic_functions_missing_off_macos_name_the_symbol() {
        let err = GicFunctions::resolve().unwrap_err();
        assert!(matches!(
            err,
            HvfError::GicUnavailable {
                symbol: "hv_gic_config_create"
            }
        ));
    }
}
