//! x86_64 boot: load the kernel (ELF `vmlinux`, with its PVH entry when it has one, or
//! `bzImage`), the initrd and the command line into guest memory, write what the kernel reads
//! at entry (PVH `hvm_start_info` and memory map, or `boot_params` with its E820 table), the
//! GDT, identity page tables and MP table, and describe each vCPU's first register state.
//!
//! Two entry protocols:
//! - PVH (preferred when the ELF has a `XEN_ELFNOTE_PHYS32_ENTRY` note): 32-bit protected
//!   mode, paging off, EBX = address of `hvm_start_info`.
//! - Linux 64-bit boot protocol: long mode with the first GiB identity-mapped, RSI = address
//!   of `boot_params`.

pub mod cpuid;
pub mod gdt;
pub mod i8042;
pub mod layout;
pub mod mptable;
pub mod paging;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use squib_hypervisor::x86_64::{
    CpuidEntry, DescriptorTable, GeneralRegisters, MsrEntry, SpecialRegisters, VcpuSetup,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use layout::{
    BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, CMDLINE_START, GDT_START, HIMEM_START, IDT_START,
    MemoryMapEntry, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

/// A failure while loading the boot images or writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image cannot be opened or read.
    #[error("cannot read kernel image {path}")]
    ReadKernel {
        /// The image's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is neither a loadable ELF nor a bzImage.
    #[error("kernel image {path} cannot be loaded: {reason}")]
    LoadKernel {
        /// The image's path.
        path: PathBuf,
        /// What linux-loader said.
        reason: String,
    },
    /// The initrd cannot be opened or read.
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        /// The initrd's path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge {
        /// The initrd's path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is longer than the kernel accepts.
    #[error("kernel command line is {len} bytes, longer than {max}")]
    CmdlineTooLong {
        /// Its length with the terminating NUL.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line holds a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// A boot structure does not fit in guest memory.
    #[error("writing {what} at {gpa:#x} into guest memory failed")]
    WriteGuestMemory {
        /// Which structure.
        what: &'static str,
        /// Where it was to go.
        gpa: u64,
    },
    /// The memory map has more entries than the boot structure holds.
    #[error("memory map has {entries} entries, more than {max}")]
    MemoryMapTooLong {
        /// How many there are.
        entries: usize,
        /// How many fit.
        max: usize,
    },
    /// The MP table cannot describe the VM.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode at `entry`, EBX = the `hvm_start_info` address.
    Pvh {
        /// Physical entry address from the ELF note.
        entry: u64,
    },
    /// Linux 64-bit boot protocol at `entry`, RSI = the `boot_params` address.
    Linux64 {
        /// Physical address of the 64-bit entry.
        entry: u64,
    },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootImages<'a> {
    /// ELF vmlinux or bzImage.
    pub kernel: &'a Path,
    /// Optional initramfs.
    pub initrd: Option<&'a Path>,
    /// The complete kernel command line.
    pub cmdline: &'a str,
}

const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the bzImage has the 64-bit entry point at offset 0x200.
const XLF_KERNEL_64: u16 = 1;
/// The boot protocol version (2.10) from which `pref_address` and `init_size` are valid.
const BOOT_PROTOCOL_INIT_SIZE: u16 = 0x020a;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 0x1000;
const HUGE_PAGE_SIZE: u64 = 0x20_0000;
/// The end of the ISA DMA zone (Linux's ZONE_DMA on x86).
const ZONE_DMA_END: u64 = 0x100_0000;

fn write_bytes(
    mem: &GuestMemoryMmap,
    what: &'static str,
    gpa: u64,
    bytes: &[u8],
) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(gpa))
        .map_err(|_| BootError::WriteGuestMemory { what, gpa })
}

fn write_u64s(
    mem: &GuestMemoryMmap,
    what: &'static str,
    gpa: u64,
    words: &[u64],
) -> Result<(), BootError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    write_bytes(mem, what, gpa, &bytes)
}

/// Loads the kernel, initrd and command line and writes every boot structure. `mem_size_bytes`
/// is the VM's RAM size (the layout of [`layout::ram_regions`]).
///
/// # Errors
///
/// [`BootError`] naming the image or structure that could not be loaded or written.
pub fn load_boot_images(
    mem: &GuestMemoryMmap,
    mem_size_bytes: u64,
    vcpu_count: u8,
    images: &BootImages<'_>,
) -> Result<EntryPoint, BootError> {
    let read_kernel = |source| BootError::ReadKernel {
        path: images.kernel.to_path_buf(),
        source,
    };
    let mut kernel = File::open(images.kernel).map_err(read_kernel)?;
    let mut magic = [0u8; 4];
    kernel.read_exact(&mut magic).map_err(read_kernel)?;
    kernel.seek(SeekFrom::Start(0)).map_err(read_kernel)?;
    let load_error = |e: linux_loader::loader::Error| BootError::LoadKernel {
        path: images.kernel.to_path_buf(),
        reason: e.to_string(),
    };
    let is_elf = magic == *b"\x7fELF";
    prefer_small_pages(mem, 0, ZONE_DMA_END, "the first 16 MiB");
    let loaded = if is_elf {
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(load_error)?
    } else {
        BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(load_error)?
    };

    let cmdline = images.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len() + 1,
            max: CMDLINE_MAX_SIZE,
        });
    }
    let mut cmdline_nul = cmdline.to_vec();
    cmdline_nul.push(0);
    write_bytes(mem, "kernel command line", CMDLINE_START, &cmdline_nul)?;

    if let Some(header) = loaded.setup_header
        && header.xloadflags & XLF_KERNEL_64 == 0
    {
        return Err(BootError::LoadKernel {
            path: images.kernel.to_path_buf(),
            reason: format!("bzImage has no 64-bit entry point (xloadflags {:#x})", {
                header.xloadflags
            }),
        });
    }
    let kernel_end = kernel_footprint_end(&loaded);
    let tail = kernel_end & !(HUGE_PAGE_SIZE - 1);
    if tail != kernel_end {
        prefer_small_pages(mem, tail, HUGE_PAGE_SIZE, "the kernel image's last 2 MiB");
    }
    let initrd_limit = loaded
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|max| *max > 0)
        .map_or(layout::low_ram_end(mem_size_bytes), |max| {
            layout::low_ram_end(mem_size_bytes).min(max + 1)
        });
    let initrd = match images.initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end, initrd_limit)?),
        None => None,
    };

    let map = layout::memory_map(mem_size_bytes);
    write_u64s(mem, "gdt", GDT_START, &gdt::boot_gdt(true))?;
    write_bytes(mem, "idt", IDT_START, &[0u8; 8])?;
    let tables = paging::identity_tables();
    write_u64s(mem, "pml4", PML4_START, &tables.pml4)?;
    write_u64s(mem, "pdpt", PDPTE_START, &tables.pdpt)?;
    write_u64s(mem, "page directory", PDE_START, &tables.pd)?;
    write_bytes(
        mem,
        "mp table",
        mptable::MPTABLE_START,
        &mptable::build(vcpu_count)?,
    )?;

    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if is_elf => {
            // The PVH GDT has a 32-bit code segment in the code slot.
            write_u64s(mem, "gdt", GDT_START, &gdt::boot_gdt(false))?;
            write_pvh_info(mem, &map, initrd)?;
            Ok(EntryPoint::Pvh { entry: entry.0 })
        }
        _ => {
            let entry = if is_elf {
                loaded.kernel_load.0
            } else {
                loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET
            };
            write_boot_params(mem, &map, loaded.setup_header, cmdline_nul.len(), initrd)?;
            Ok(EntryPoint::Linux64 { entry })
        }
    }
}

/// Backs `[gpa, gpa + len)` with 4 KiB pages, where the guest uses memory sparsely; a failure
/// only costs memory, so it is logged, not returned.
///
/// Two ranges qualify (measured with pagemap in the VM test host, 2026-12-05, 128 MiB guest
/// booted to its init: 22.3 MiB touched, held in 24.6 MiB of 2 MiB pages). The first 16 MiB
/// are the guest's ISA DMA zone, which Linux allocates from only when the rest of memory is
/// used up: 2.9 MiB of its first 4 MiB were touched (boot structures, the real-mode
/// trampoline, early allocations), held in two or three huge pages. And an x86_64 kernel built
/// with STRICT_KERNEL_RWX (not optional there) ends its .bss on a 2 MiB boundary and puts
/// .brk after it, which boot code clears: that alone brings in one more huge page, of which
/// 1 MiB was touched. With both, an idle container's host RSS went from 33.1 to 29.7 MiB (128
/// MiB guest) and from 41.2 to 36.1 MiB (512 MiB) in `make bench`; the guest's boot to init
/// took 0.98 s where the run before had 0.89 s (one run each: within the test host's spread,
/// but some of it is likely the thousand more page faults). Everything else keeps huge pages:
/// elsewhere 4 KiB pages cost more in faults than they save (see `memory::allocate`).
fn prefer_small_pages(mem: &GuestMemoryMmap, gpa: u64, len: u64, what: &'static str) {
    if let Err(error) = crate::memory::prefer_small_pages(mem, gpa, len) {
        tracing::debug!(%error, what, "guest memory keeps the default page size");
    }
}

/// Where the memory the kernel occupies ends. For an ELF image that is the end of its last
/// segment. A bzImage is only the compressed kernel: its decompressor writes the kernel to
/// `pref_address` (where a kernel that is not relocatable must run, and where a relocatable one
/// loaded below it goes too) and needs `init_size` bytes from there, far beyond the image's own
/// end. Nothing may be placed in that range, or the decompressor overwrites it.
fn kernel_footprint_end(loaded: &KernelLoaderResult) -> u64 {
    let decompressed_end = loaded
        .setup_header
        .filter(|h| h.version >= BOOT_PROTOCOL_INIT_SIZE)
        .map_or(0, |h| h.pref_address.saturating_add(u64::from(h.init_size)));
    loaded.kernel_end.max(decompressed_end)
}

/// Places the initrd page-aligned at the top of low memory; returns its (address, size).
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let read_error = |source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|_| BootError::WriteGuestMemory {
            what: "initrd",
            gpa: addr,
        })?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemoryMapTooLong {
            entries: map.len(),
            max: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: u32::try_from(map.len()).unwrap_or(0),
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| BootError::WriteGuestMemory {
                what: "pvh module list",
                gpa: PVH_MODLIST_START,
            })?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, e) in map.iter().enumerate() {
        let gpa = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        };
        mem.write_obj(entry, GuestAddress(gpa))
            .map_err(|_| BootError::WriteGuestMemory {
                what: "pvh memory map",
                gpa,
            })?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::WriteGuestMemory {
            what: "pvh start info",
            gpa: PVH_INFO_START,
        })
}

fn write_boot_params(
    mem: &GuestMemoryMmap,
    map: &[MemoryMapEntry],
    header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or(0);
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = u32::try_from(addr).unwrap_or(0);
        params.hdr.ramdisk_size = u32::try_from(size).unwrap_or(0);
    }
    if map.len() > params.e820_table.len() {
        return Err(BootError::MemoryMapTooLong {
            entries: map.len(),
            max: params.e820_table.len(),
        });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = u8::try_from(map.len()).unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::WriteGuestMemory {
            what: "boot_params",
            gpa: ZERO_PAGE_START,
        })
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSR values every vCPU starts with: syscall MSRs cleared, fast strings on, write-back as
/// the default memory type. The TSC is left alone: the hypervisor starts the TSCs of one VM in
/// step, and writing each vCPU's TSC from its own thread at slightly different times makes the
/// guest find them unsynchronized.
pub fn boot_msrs() -> Vec<MsrEntry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| MsrEntry { index, data })
    .collect()
}

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 always reads as one.
const RFLAGS_RESERVED: u64 = 0x2;

/// The special registers for `entry`: flat segments from the boot GDT, and long mode with the
/// identity tables for the 64-bit protocol.
pub fn special_registers(entry: &EntryPoint) -> SpecialRegisters {
    let long_mode = matches!(entry, EntryPoint::Linux64 { .. });
    let [_, code, data, tss] = gdt::boot_gdt(long_mode);
    let code = gdt::segment_from_entry(code, gdt::CODE_SELECTOR);
    let data = gdt::segment_from_entry(data, gdt::DATA_SELECTOR);
    let mut sregs = SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: gdt::segment_from_entry(tss, gdt::TSS_SELECTOR),
        ldt: gdt::segment_from_entry(0, 0),
        gdt: DescriptorTable {
            base: GDT_START,
            limit: 4 * 8 - 1,
        },
        idt: DescriptorTable {
            base: IDT_START,
            limit: 7,
        },
        cr0: CR0_PE | CR0_ET,
        cr3: 0,
        cr4: 0,
        efer: 0,
    };
    if long_mode {
        sregs.cr0 |= CR0_PG;
        sregs.cr3 = paging::cr3();
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    }
    sregs
}

/// The general registers for `entry`.
pub fn general_registers(entry: &EntryPoint) -> GeneralRegisters {
    match *entry {
        EntryPoint::Pvh { entry } => GeneralRegisters {
            rip: entry,
            rbx: PVH_INFO_START,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        EntryPoint::Linux64 { entry } => GeneralRegisters {
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
    }
}

/// The complete first state of vCPU `index` of `count`. Application processors get the same
/// registers, which KVM and real hardware ignore until the boot CPU sends them INIT/SIPI.
pub fn vcpu_setup(
    entry: &EntryPoint,
    supported_cpuid: &[CpuidEntry],
    index: u8,
    count: u8,
    tsc_khz: Option<u32>,
) -> VcpuSetup {
    VcpuSetup {
        general: general_registers(entry),
        special: special_registers(entry),
        cpuid: cpuid::filter(supported_cpuid, index, count, tsc_khz),
        msrs: boot_msrs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_special_registers_pvh_is_flat_protected_mode_without_paging() {
        let s = special_registers(&EntryPoint::Pvh { entry: 0x100_0000 });
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!((s.cr4, s.efer), (0, 0));
        assert!(s.cs.db && !s.cs.l);
        assert_eq!((s.cs.base, s.cs.limit), (0, 0xffff_ffff));
        assert_eq!(s.tr.limit, 0x67);
        let g = general_registers(&EntryPoint::Pvh { entry: 0x100_0000 });
        assert_eq!((g.rip, g.rbx, g.rflags), (0x100_0000, PVH_INFO_START, 2));
    }

    #[test]
    fn test_special_registers_linux64_enables_long_mode() {
        let s = special_registers(&EntryPoint::Linux64 { entry: 0x100_0200 });
        assert_eq!(s.cr0 & (CR0_PG | CR0_PE), CR0_PG | CR0_PE);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert!(s.cs.l && !s.cs.db);
        let g = general_registers(&EntryPoint::Linux64 { entry: 0x100_0200 });
        assert_eq!((g.rsi, g.rsp), (ZERO_PAGE_START, BOOT_STACK_POINTER));
    }

    #[test]
    fn test_boot_msrs_enable_writeback_mtrr_default() {
        let msrs = boot_msrs();
        assert!(msrs.contains(&MsrEntry {
            index: MSR_MTRR_DEF_TYPE,
            data: 0x806
        }));
        assert!(msrs.contains(&MsrEntry {
            index: MSR_IA32_MISC_ENABLE,
            data: 1
        }));
    }

    fn guest_memory(size: u64) -> GuestMemoryMmap {
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(size)
            .into_iter()
            .map(|(a, s)| (a, usize::try_from(s).unwrap()))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).unwrap()
    }

    #[test]
    fn test_write_pvh_info_points_at_memmap_and_initrd() {
        let mem = guest_memory(64 << 20);
        let map = layout::memory_map(64 << 20);
        write_pvh_info(&mem, &map, Some((0x300_0000, 0x1234))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries as usize, map.len());
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
        let second: hvm_memmap_table_entry =
            mem.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((second.addr, second.type_), (HIMEM_START, layout::E820_RAM));
    }

    #[test]
    fn test_write_boot_params_fills_e820_and_cmdline() {
        let mem = guest_memory(64 << 20);
        let map = layout::memory_map(64 << 20);
        write_boot_params(&mem, &map, None, 10, None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(params.e820_entries as usize, map.len());
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(
            { params.hdr.cmd_line_ptr },
            u32::try_from(CMDLINE_START).unwrap()
        );
        assert_eq!({ params.e820_table[1].addr }, HIMEM_START);
    }

    #[test]
    fn test_load_initrd_places_it_page_aligned_below_limit() {
        let mem = guest_memory(64 << 20);
        let dir = std::env::temp_dir().join(format!("squib-initrd-{}", std::process::id()));
        std::fs::write(&dir, vec![0x5au8; 5000]).unwrap();
        let (addr, size) = load_initrd(&mem, &dir, 0x200_0000, 64 << 20).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + size <= 64 << 20);
        let mut back = vec![0u8; 5000];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert!(back.iter().all(|b| *b == 0x5a));
    }

    fn bzimage_result(version: u16, pref_address: u64, init_size: u32) -> KernelLoaderResult {
        let header = linux_loader::loader::bootparam::setup_header {
            version,
            pref_address,
            init_size,
            xloadflags: XLF_KERNEL_64,
            ..Default::default()
        };
        KernelLoaderResult {
            kernel_load: GuestAddress(HIMEM_START),
            kernel_end: HIMEM_START + 0x2c_0000,
            setup_header: Some(header),
            ..Default::default()
        }
    }

    #[test]
    fn test_kernel_footprint_of_bzimage_covers_its_decompressed_kernel() {
        // The guest kernel's bzImage: 2.8 MiB compressed at 1 MiB, decompressed at 16 MiB.
        let loaded = bzimage_result(0x020f, 0x100_0000, 0x1a0_0000);
        assert_eq!(kernel_footprint_end(&loaded), 0x100_0000 + 0x1a0_0000);
    }

    #[test]
    fn test_kernel_footprint_ignores_init_size_of_old_boot_protocol() {
        let loaded = bzimage_result(0x0209, 0x100_0000, 0x1a0_0000);
        assert_eq!(kernel_footprint_end(&loaded), HIMEM_START + 0x2c_0000);
    }

    #[test]
    fn test_kernel_footprint_of_elf_is_its_segments_end() {
        let loaded = KernelLoaderResult {
            kernel_load: GuestAddress(0x100_0000),
            kernel_end: 0x1e0_0000,
            ..Default::default()
        };
        assert_eq!(kernel_footprint_end(&loaded), 0x1e0_0000);
    }

    /// A bzImage reduced to what the loader reads: a one-sector setup with the boot protocol
    /// header, then 8 KiB standing in for the compressed kernel.
    fn fake_bzimage(xloadflags: u16, init_size: u32) -> Vec<u8> {
        let mut image = vec![0u8; 1024 + 8192];
        let mut put = |offset: usize, bytes: &[u8]| {
            image[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0x1f1, &[1]); // setup_sects
        put(0x1fe, &KERNEL_BOOT_FLAG_MAGIC.to_le_bytes());
        put(0x202, &KERNEL_HDR_MAGIC.to_le_bytes());
        put(0x206, &0x020fu16.to_le_bytes()); // version 2.15
        put(0x211, &[1]); // loadflags: LOADED_HIGH
        put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(0x236, &xloadflags.to_le_bytes());
        put(0x258, &0x100_0000u64.to_le_bytes()); // pref_address
        put(0x260, &init_size.to_le_bytes());
        image
    }

    fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("squib-{name}-{}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn test_load_boot_images_enters_bzimage_at_64bit_entry_with_boot_params() {
        let mem = guest_memory(128 << 20);
        let kernel = temp_file("bz-ok", &fake_bzimage(XLF_KERNEL_64, 0x1a0_0000));
        let initrd = temp_file("bz-ok-initrd", &[0x5a; 4096]);
        let images = BootImages {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0",
        };
        let entry = load_boot_images(&mem, 128 << 20, 1, &images);
        std::fs::remove_file(&kernel).unwrap();
        std::fs::remove_file(&initrd).unwrap();
        assert_eq!(
            entry.unwrap(),
            EntryPoint::Linux64 {
                entry: HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET
            }
        );
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ params.hdr.code32_start }, 0x10_0000);
        assert_eq!({ params.hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ params.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ params.hdr.cmdline_size }, 14);
        assert_eq!({ params.hdr.ramdisk_size }, 4096);
        let ramdisk = u64::from(params.hdr.ramdisk_image);
        assert!(ramdisk >= 0x100_0000 + 0x1a0_0000, "{ramdisk:#x}");
        assert_eq!(
            usize::from(params.e820_entries),
            layout::memory_map(128 << 20).len()
        );
        let mut first = [0u8; 2];
        mem.read_slice(&mut first, GuestAddress(HIMEM_START))
            .unwrap();
        assert_eq!(
            first,
            [0, 0],
            "the image after its setup sectors is at 1 MiB"
        );
    }

    #[test]
    fn test_load_boot_images_keeps_initrd_out_of_bzimage_decompression_area() {
        // 48 MiB of RAM: an 8 MiB initrd at the top would start at 40 MiB, inside the 26 MiB
        // the decompressor needs from 16 MiB.
        let mem = guest_memory(48 << 20);
        let kernel = temp_file("bz-overlap", &fake_bzimage(XLF_KERNEL_64, 0x1a0_0000));
        let initrd = temp_file("bz-overlap-initrd", &vec![0u8; 8 << 20]);
        let images = BootImages {
            kernel: &kernel,
            initrd: Some(&initrd),
            cmdline: "console=ttyS0",
        };
        let result = load_boot_images(&mem, 48 << 20, 1, &images);
        std::fs::remove_file(&kernel).unwrap();
        std::fs::remove_file(&initrd).unwrap();
        assert!(
            matches!(result, Err(BootError::InitrdTooLarge { size, .. }) if size == 8 << 20),
            "{result:?}"
        );
    }

    #[test]
    fn test_load_boot_images_refuses_bzimage_without_64bit_entry() {
        let mem = guest_memory(64 << 20);
        let kernel = temp_file("bz-32", &fake_bzimage(0, 0x1a0_0000));
        let images = BootImages {
            kernel: &kernel,
            initrd: None,
            cmdline: "",
        };
        let result = load_boot_images(&mem, 64 << 20, 1, &images);
        std::fs::remove_file(&kernel).unwrap();
        let err = result.unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err:?}");
        assert!(err.to_string().contains("64-bit entry"), "{err}");
    }

    #[test]
    fn test_load_initrd_refuses_overlap_with_kernel() {
        let mem = guest_memory(64 << 20);
        let path = std::env::temp_dir().join(format!("squib-initrd-big-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let err = load_initrd(&mem, &path, (64 << 20) - 4096, 64 << 20).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::InitrdTooLarge { size: 8192, .. }));
    }
}
