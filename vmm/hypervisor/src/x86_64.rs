//! Backend-neutral x86_64 vCPU state: what the boot code computes and a backend loads.
//!
//! The boot code in `squib-core` fills a [`VcpuSetup`] (general and special registers, CPUID,
//! MSRs); each backend translates it into its own register interface. Field meanings follow the
//! Intel SDM (segment descriptor bits, control registers).

/// A segment register with its hidden descriptor cache, as the CPU holds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (already scaled when `granularity` is set).
    pub limit: u32,
    /// Selector value.
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    /// Present bit.
    pub present: bool,
    /// Descriptor privilege level (0..=3).
    pub dpl: u8,
    /// Default operation size (D/B): 32-bit when set.
    pub db: bool,
    /// Code or data segment when set, system segment otherwise.
    pub s: bool,
    /// 64-bit code segment.
    pub l: bool,
    /// Granularity: limit counted in 4 KiB units.
    pub g: bool,
    /// Available-for-software bit.
    pub avl: bool,
    /// The segment is unusable (null selector loaded).
    pub unusable: bool,
}

/// A descriptor table register (GDTR or IDTR).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes (size - 1).
    pub limit: u16,
}

/// The special registers boot code sets: segments, descriptor tables, control registers, EFER.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    /// Code segment.
    pub cs: Segment,
    /// Data segment.
    pub ds: Segment,
    /// Extra segment.
    pub es: Segment,
    /// FS.
    pub fs: Segment,
    /// GS.
    pub gs: Segment,
    /// Stack segment.
    pub ss: Segment,
    /// Task register.
    pub tr: Segment,
    /// Local descriptor table register.
    pub ldt: Segment,
    /// Global descriptor table register.
    pub gdt: DescriptorTable,
    /// Interrupt descriptor table register.
    pub idt: DescriptorTable,
    /// CR0.
    pub cr0: u64,
    /// CR3 (page table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// The general-purpose registers, instruction pointer and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[expect(
    missing_docs,
    reason = "the fields are the architectural registers of the same name"
)]
pub struct GeneralRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// One CPUID leaf (and sub-leaf) as the guest will see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input); meaningful when `index_significant`.
    pub index: u32,
    /// Whether the sub-leaf selects a different result.
    pub index_significant: bool,
    /// EAX output.
    pub eax: u32,
    /// EBX output.
    pub ebx: u32,
    /// ECX output.
    pub ecx: u32,
    /// EDX output.
    pub edx: u32,
}

/// One model-specific register value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsrEntry {
    /// MSR index.
    pub index: u32,
    /// Value.
    pub data: u64,
}

/// Everything a vCPU needs before its first run on x86_64.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuSetup {
    /// General-purpose registers, RIP and RFLAGS.
    pub general: GeneralRegisters,
    /// Segments, descriptor tables, control registers.
    pub special: SpecialRegisters,
    /// The CPUID table for this vCPU (APIC id and topology already filled in).
    pub cpuid: Vec<CpuidEntry>,
    /// MSRs to write.
    pub msrs: Vec<MsrEntry>,
}

/// What a crash report shows of a vCPU: where it was executing, its stack, and the state that
/// decides how it translated addresses and took faults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultRegisters {
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// The code segment's selector (its low two bits are the privilege level).
    pub cs: u16,
    /// CR0 (protection and paging enables).
    pub cr0: u64,
    /// CR2: the linear address of the last page fault.
    pub cr2: u64,
    /// CR3 (page table root).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER (long mode enable and active).
    pub efer: u64,
    /// The interrupt descriptor table the fault was delivered through.
    pub idt: DescriptorTable,
}
