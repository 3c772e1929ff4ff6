//! Facts about the host the controller checks requests against: its memory size and its CPU
//! architecture. Both sit behind small seams so tests can pretend to be another host.

use std::fmt::Debug;

/// Why the host's memory size could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostMemoryError {
    /// Reading the source failed.
    #[error("reading the host memory size from {source_name} failed: {detail}")]
    Read {
        /// Where the size was read from.
        source_name: &'static str,
        /// The I/O or process error.
        detail: String,
    },
    /// The source did not contain a size.
    #[error("{source_name} holds no total memory size")]
    Missing {
        /// Where the size was read from.
        source_name: &'static str,
    },
}

/// Reports the host's total memory.
pub trait HostMemory: Send + Sync + Debug {
    /// Total host memory in MiB.
    ///
    /// # Errors
    /// A [`HostMemoryError`] if the size cannot be determined.
    fn total_mib(&self) -> Result<u64, HostMemoryError>;
}

/// The real host: `/proc/meminfo` on Linux, `sysctl hw.memsize` on macOS.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemHostMemory;

impl HostMemory for SystemHostMemory {
    #[cfg(target_os = "macos")]
    fn total_mib(&self) -> Result<u64, HostMemoryError> {
        const SOURCE: &str = "sysctl -n hw.memsize";
        let output = std::process::Command::new("sysctl")
            .args(["-n", "hw.memsize"])
            .output()
            .map_err(|e| HostMemoryError::Read {
                source_name: SOURCE,
                detail: e.to_string(),
            })?;
        let bytes: u64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .map_err(|_| HostMemoryError::Missing {
                source_name: SOURCE,
            })?;
        Ok(bytes / (1024 * 1024))
    }

    #[cfg(not(target_os = "macos"))]
    fn total_mib(&self) -> Result<u64, HostMemoryError> {
        const SOURCE: &str = "/proc/meminfo";
        let text = std::fs::read_to_string(SOURCE).map_err(|e| HostMemoryError::Read {
            source_name: SOURCE,
            detail: e.to_string(),
        })?;
        parse_meminfo_total_mib(&text).ok_or(HostMemoryError::Missing {
            source_name: SOURCE,
        })
    }
}

/// Extracts `MemTotal` (in kB) from `/proc/meminfo` text, as MiB.
pub fn parse_meminfo_total_mib(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value / 1024),
        Some(_) => None,
    }
}

/// A host memory size fixed in advance, for tests and for callers that already know it.
#[derive(Debug, Clone, Copy)]
pub struct FixedHostMemory(pub u64);

impl HostMemory for FixedHostMemory {
    fn total_mib(&self) -> Result<u64, HostMemoryError> {
        Ok(self.0)
    }
}

/// The CPU architecture the controller enforces architecture-specific rules for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// x86_64.
    X86_64,
    /// aarch64.
    Aarch64,
}

impl Arch {
    /// The architecture this binary was built for.
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Self::Aarch64
        } else {
            Self::X86_64
        }
    }

    /// Its usual name.
    pub fn name(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64",
            Self::Aarch64 => "aarch64",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_meminfo_reads_memtotal_in_mib() {
        let text = "MemFree:  100 kB\nMemTotal:       24576000 kB\nBuffers: 1 kB\n";
        assert_eq!(parse_meminfo_total_mib(text), Some(24_000));
        assert_eq!(parse_meminfo_total_mib("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total_mib("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn test_system_host_memory_reports_a_size() {
        assert!(SystemHostMemory.total_mib().unwrap() > 0);
    }
}
