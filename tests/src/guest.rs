//! A one-page real-mode KVM guest: a few bytes of 16-bit code loaded at [`CODE_GPA`] and run
//! on one vCPU until it halts, with every exit on the way recorded. It is the smallest guest
//! that shows whether a `/dev/kvm` runs ordinary (not paravirtualization-aware) guests.
//!
//! Port writes are recorded and resumed; `hlt` ends the run; any other exit is an error that
//! says which exit it was.

use std::io;
use std::ptr::NonNull;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

/// Guest-physical address the code is loaded at and where the vCPU starts.
pub const CODE_GPA: u64 = 0x1000;
/// Size of guest memory, mapped at guest-physical address 0.
pub const MEM_SIZE_BYTES: usize = 0x10000;

/// Failures of [`RealModeGuest`].
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Opening `/dev/kvm` failed.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("cannot create a vm")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// Allocating the guest memory failed.
    #[error("cannot map {len_bytes} bytes of guest memory")]
    MapMemory {
        /// Requested size.
        len_bytes: usize,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("cannot register guest memory at gpa 0x0 ({len_bytes} bytes)")]
    SetMemoryRegion {
        /// Size of the region.
        len_bytes: usize,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The code does not fit between [`CODE_GPA`] and the end of guest memory.
    #[error("guest code of {len_bytes} bytes does not fit at gpa {CODE_GPA:#x}")]
    CodeTooLarge {
        /// Size of the code.
        len_bytes: usize,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vcpu 0")]
    CreateVcpu(#[source] kvm_ioctls::Error),
    /// Reading or writing the vCPU's registers failed.
    #[error("cannot {op} vcpu registers")]
    Registers {
        /// Which register ioctl.
        op: &'static str,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_RUN` failed; errno `EINTR` means a signal interrupted the guest.
    #[error("KVM_RUN failed after {exits} exits")]
    Run {
        /// Exits handled before the failure.
        exits: usize,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM could not emulate something the guest did (`KVM_EXIT_INTERNAL_ERROR`).
    #[error("kvm internal error, suberror {suberror} (1 = emulation failure) after {exits} exits")]
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Exits handled before this one.
        exits: usize,
    },
    /// The guest exited in a way this tiny guest never should.
    #[error("unexpected vcpu exit {exit} after {exits} exits")]
    UnexpectedExit {
        /// The exit, debug-formatted.
        exit: String,
        /// Exits handled before this one.
        exits: usize,
    },
    /// The guest did not halt within the allowed number of exits.
    #[error("guest did not halt within {limit} exits")]
    TooManyExits {
        /// The limit.
        limit: usize,
    },
}

/// One recorded exit of the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// An `out` instruction: the port and the bytes written.
    IoOut {
        /// I/O port.
        port: u16,
        /// Data written (1, 2 or 4 bytes).
        data: Vec<u8>,
    },
    /// The guest executed `hlt`.
    Hlt,
}

/// Anonymous host memory backing the guest, unmapped on drop.
#[derive(Debug)]
struct GuestMemory {
    addr: NonNull<u8>,
    len_bytes: usize,
}

impl GuestMemory {
    fn new(len_bytes: usize) -> Result<Self, GuestError> {
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches
        // no existing memory; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(GuestError::MapMemory {
                len_bytes,
                source: io::Error::last_os_error(),
            });
        }
        let addr = NonNull::new(ptr.cast::<u8>()).ok_or(GuestError::MapMemory {
            len_bytes,
            source: io::Error::from(io::ErrorKind::InvalidData),
        })?;
        Ok(Self { addr, len_bytes })
    }

    fn write(&mut self, offset: usize, bytes: &[u8]) -> Result<(), GuestError> {
        let end = offset.checked_add(bytes.len());
        if end.is_none_or(|end| end > self.len_bytes) {
            return Err(GuestError::CodeTooLarge {
                len_bytes: bytes.len(),
            });
        }
        // SAFETY: the mapping is `len_bytes` long and writable, `offset + bytes.len()` was
        // checked against it above, and `bytes` cannot overlap a mapping we own exclusively.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.addr.as_ptr().add(offset),
                bytes.len(),
            );
        }
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len_bytes` describe a mapping made in `new` and unmapped only here;
        // the VM that referenced it is dropped before this field (declaration order).
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len_bytes);
        }
    }
}

/// A VM with one vCPU in real mode, 64 KiB of memory and the given code at [`CODE_GPA`].
///
/// Create, run and drop it on one thread.
#[derive(Debug)]
pub struct RealModeGuest {
    // Field order is drop order: the vCPU and VM go before the memory they map.
    vcpu: VcpuFd,
    _vm: VmFd,
    _kvm: Kvm,
    _memory: GuestMemory,
}

impl RealModeGuest {
    /// Builds the VM and loads `code` at [`CODE_GPA`], with CS:IP pointing at it.
    ///
    /// # Errors
    /// Any failing KVM ioctl or mapping, named by [`GuestError`]'s variants.
    pub fn new(code: &[u8]) -> Result<Self, GuestError> {
        let kvm = Kvm::new().map_err(GuestError::OpenKvm)?;
        let vm = kvm.create_vm().map_err(GuestError::CreateVm)?;
        let mut memory = GuestMemory::new(MEM_SIZE_BYTES)?;
        let code_offset = usize::try_from(CODE_GPA).map_err(|_| GuestError::CodeTooLarge {
            len_bytes: code.len(),
        })?;
        memory.write(code_offset, code)?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE_BYTES as u64,
            userspace_addr: memory.addr.as_ptr() as u64,
        };
        // SAFETY: the region describes `memory`, a live mapping of exactly that size that
        // outlives the VM (see the field order of `RealModeGuest`).
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| {
            GuestError::SetMemoryRegion {
                len_bytes: MEM_SIZE_BYTES,
                source,
            }
        })?;
        let vcpu = vm.create_vcpu(0).map_err(GuestError::CreateVcpu)?;
        let mut sregs = vcpu.get_sregs().map_err(|source| GuestError::Registers {
            op: "get special",
            source,
        })?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|source| GuestError::Registers {
                op: "set special",
                source,
            })?;
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_GPA,
            rflags: 0x2,
            ..Default::default()
        };
        vcpu.set_regs(&regs)
            .map_err(|source| GuestError::Registers {
                op: "set general",
                source,
            })?;
        Ok(Self {
            vcpu,
            _vm: vm,
            _kvm: kvm,
            _memory: memory,
        })
    }

    /// Runs the guest until `hlt` and returns every exit, the `hlt` last.
    ///
    /// # Errors
    /// [`GuestError::Run`] if `KVM_RUN` fails (errno `EINTR` when a signal interrupted it),
    /// [`GuestError::InternalError`] or [`GuestError::UnexpectedExit`] for any exit other than
    /// a port write or `hlt`, [`GuestError::TooManyExits`] after `max_exits` port writes.
    pub fn run_until_halt(&mut self, max_exits: usize) -> Result<Vec<GuestExit>, GuestError> {
        let mut exits = Vec::new();
        while exits.len() < max_exits {
            let handled = exits.len();
            let exit = self.vcpu.run().map_err(|source| GuestError::Run {
                exits: handled,
                source,
            })?;
            match exit {
                VcpuExit::IoOut(port, data) => exits.push(GuestExit::IoOut {
                    port,
                    data: data.to_vec(),
                }),
                VcpuExit::Hlt => {
                    exits.push(GuestExit::Hlt);
                    return Ok(exits);
                }
                VcpuExit::InternalError => {
                    let run = self.vcpu.get_kvm_run();
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal`
                    // member of the exit union; reading a plain u32 from it is defined.
                    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                    return Err(GuestError::InternalError {
                        suberror,
                        exits: handled,
                    });
                }
                other => {
                    return Err(GuestError::UnexpectedExit {
                        exit: format!("{other:?}"),
                        exits: handled,
                    });
                }
            }
        }
        Err(GuestError::TooManyExits { limit: max_exits })
    }
}
