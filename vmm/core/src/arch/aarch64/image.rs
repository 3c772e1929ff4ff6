//! The arm64 Linux `Image` header (the kernel's `Documentation/arch/arm64/booting.rst`): where
//! the kernel wants to be loaded and how much memory it occupies.
//!
//! The 64-byte header sits at the start of the raw `Image` file:
//!
//! | offset | field                                   |
//! |--------|-----------------------------------------|
//! | 0x00   | code0, code1 (branch to the real entry) |
//! | 0x08   | text_offset: load offset from a 2 MiB aligned base, little-endian |
//! | 0x10   | image_size: bytes the kernel occupies once running (bss included) |
//! | 0x18   | flags                                    |
//! | 0x38   | magic `"ARM\x64"`                        |

/// Length of the header.
pub const HEADER_LEN: usize = 64;
/// The magic number at 0x38, little-endian "ARM\x64".
pub const MAGIC: u32 = 0x644d_5241;
/// text_offset kernels before Linux 3.17 used; they also report image_size 0.
pub const LEGACY_TEXT_OFFSET: u64 = 0x8_0000;
/// The alignment of the base the kernel is placed from.
pub const BASE_ALIGN: u64 = 2 << 20;

/// Why a file is not a loadable arm64 kernel image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Shorter than the header.
    #[error("kernel image is {len} bytes, shorter than the {HEADER_LEN}-byte arm64 header")]
    TooShort {
        /// The length found.
        len: usize,
    },
    /// No arm64 magic: not a raw `Image` (perhaps compressed, or an ELF `vmlinux`).
    #[error("kernel image magic is {found:#010x}, not {MAGIC:#010x} (\"ARM\\x64\")")]
    BadMagic {
        /// The value at offset 0x38.
        found: u32,
    },
    /// The kernel is built big-endian.
    #[error("kernel image flags {flags:#x} ask for a big-endian kernel, which squib does not boot")]
    BigEndian {
        /// The header's flags.
        flags: u64,
    },
    /// text_offset does not fit below the next 2 MiB boundary.
    #[error("kernel image text_offset {text_offset:#x} is not below 2 MiB")]
    TextOffset {
        /// The header's text_offset.
        text_offset: u64,
    },
}

/// The kernel's page size (flags bits 1-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSize {
    /// Not stated.
    Unspecified,
    /// 4 KiB.
    Size4K,
    /// 16 KiB.
    Size16K,
    /// 64 KiB.
    Size64K,
}

/// Where the kernel may sit in physical memory (flags bit 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The 2 MiB aligned base should be as close as possible to the start of DRAM.
    NearDramBase,
    /// Anywhere in physical memory.
    Anywhere,
}

/// The parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset of the load address from a 2 MiB aligned base.
    pub text_offset: u64,
    /// Memory the kernel occupies from its load address, bss included; `None` when the header
    /// does not say (kernels before 3.17), in which case the file length is all that is known.
    pub image_size: Option<u64>,
    /// The kernel's page size.
    pub page_size: PageSize,
    /// Where it may be placed.
    pub placement: Placement,
}

fn le_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    if let Some(src) = bytes.get(offset..offset + 8) {
        word.copy_from_slice(src);
    }
    u64::from_le_bytes(word)
}

fn le_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut word = [0u8; 4];
    if let Some(src) = bytes.get(offset..offset + 4) {
        word.copy_from_slice(src);
    }
    u32::from_le_bytes(word)
}

impl ImageHeader {
    /// Parses the header at the start of `image` (at least [`HEADER_LEN`] bytes).
    ///
    /// # Errors
    ///
    /// [`ImageError`] naming what does not fit.
    pub fn parse(image: &[u8]) -> Result<Self, ImageError> {
        if image.len() < HEADER_LEN {
            return Err(ImageError::TooShort { len: image.len() });
        }
        let magic = le_u32(image, 0x38);
        if magic != MAGIC {
            return Err(ImageError::BadMagic { found: magic });
        }
        let text_offset = le_u64(image, 0x08);
        let image_size = le_u64(image, 0x10);
        let flags = le_u64(image, 0x18);
        if flags & 1 != 0 {
            return Err(ImageError::BigEndian { flags });
        }
        let (text_offset, image_size) = if image_size == 0 {
            (LEGACY_TEXT_OFFSET, None)
        } else {
            (text_offset, Some(image_size))
        };
        if text_offset >= BASE_ALIGN {
            return Err(ImageError::TextOffset { text_offset });
        }
        let page_size = match (flags >> 1) & 0x3 {
            1 => PageSize::Size4K,
            2 => PageSize::Size16K,
            3 => PageSize::Size64K,
            _ => PageSize::Unspecified,
        };
        let placement = if flags & (1 << 3) != 0 {
            Placement::Anywhere
        } else {
            Placement::NearDramBase
        };
        Ok(Self {
            text_offset,
            image_size,
            page_size,
            placement,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A header as a 6.x defconfig kernel has it, with the given fields.
    pub(crate) fn header(text_offset: u64, image_size: u64, flags: u64) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // b +0x40
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[0x38..0x3c].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn test_image_header_parses_modern_kernel() {
        let parsed = ImageHeader::parse(&header(0, 0x2a1_0000, 0b1010)).unwrap();
        assert_eq!(
            parsed,
            ImageHeader {
                text_offset: 0,
                image_size: Some(0x2a1_0000),
                page_size: PageSize::Size4K,
                placement: Placement::Anywhere,
            }
        );
        let parsed = ImageHeader::parse(&header(0x8_0000, 0x100_0000, 0b0110)).unwrap();
        assert_eq!(parsed.page_size, PageSize::Size64K);
        assert_eq!(parsed.placement, Placement::NearDramBase);
        assert_eq!(parsed.text_offset, 0x8_0000);
    }

    #[test]
    fn test_image_header_legacy_kernel_gets_default_text_offset() {
        let parsed = ImageHeader::parse(&header(0x1234, 0, 0)).unwrap();
        assert_eq!(parsed.text_offset, LEGACY_TEXT_OFFSET);
        assert_eq!(parsed.image_size, None);
        assert_eq!(parsed.page_size, PageSize::Unspecified);
    }

    #[test]
    fn test_image_header_rejects_bad_input() {
        assert_eq!(
            ImageHeader::parse(&[0; 10]),
            Err(ImageError::TooShort { len: 10 })
        );
        let mut elf = header(0, 0x1000, 0);
        elf[0x38..0x3c].copy_from_slice(b"\x7fELF");
        assert_eq!(
            ImageHeader::parse(&elf),
            Err(ImageError::BadMagic { found: 0x464c_457f })
        );
        assert_eq!(
            ImageHeader::parse(&header(0, 0x1000, 1)),
            Err(ImageError::BigEndian { flags: 1 })
        );
        assert_eq!(
            ImageHeader::parse(&header(0x20_0000, 0x1000, 0)),
            Err(ImageError::TextOffset {
                text_offset: 0x20_0000
            })
        );
        let message = ImageHeader::parse(&elf).unwrap_err().to_string();
        assert!(message.contains("0x464c457f"), "{message}");
    }
}
