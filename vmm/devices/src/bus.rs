//! An address bus mapping non-overlapping ranges to devices.
//!
//! One bus serves MMIO and another port I/O (x86_64). A lookup returns the device and the offset
//! of the access inside its range; the device decides what each offset means. Accesses that hit no
//! device are the caller's to log and ignore (reads return zeroes), as real hardware does.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// A device reachable through a [`Bus`].
///
/// Called on a vCPU thread with the device's lock held: keep these quick and hand longer work
/// (queue processing, host I/O) to the device's own worker.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset` inside the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a guest write of `data` at `offset` inside the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A failure to register a device on a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error("bus range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range in bytes.
        len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range in bytes.
        len: u64,
    },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges, each owned by one device.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by the range's base address.
    ranges: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(base, e)| (*base, e.len)))
            .finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    ///
    /// # Errors
    ///
    /// [`BusError::InvalidRange`] for an empty or wrapping range, [`BusError::Overlap`] when the
    /// range intersects one already registered.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        if let Some((prev_base, prev)) = self.ranges.range(..end).next_back()
            && prev_base.saturating_add(prev.len) > base
        {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, Entry { len, device });
        Ok(())
    }

    /// Finds the device whose range holds `addr`, and the offset of `addr` inside it.
    pub fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let (base, entry) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Dispatches a read; returns `false` (and zeroes `data`) when no device holds `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                device.lock().read(offset, data);
                true
            }
            None => {
                data.fill(0);
                false
            }
        }
    }

    /// Dispatches a write; returns `false` when no device holds `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                device.lock().write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap());
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn test_bus_dispatches_with_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        let mut buf = [0u8; 4];
        assert!(bus.read(0x1010, &mut buf));
        assert_eq!(buf, [0x10; 4]);
        assert!(bus.write(0x10ff, &[7]));
        assert_eq!(dev.lock().writes, vec![(0xff, vec![7])]);
        assert!(!bus.write(0x1100, &[7]));
        assert!(!bus.read(0xfff, &mut buf));
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn test_bus_rejects_overlap_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, dev.clone()).unwrap();
        assert_eq!(
            bus.insert(0x10ff, 1, dev.clone()),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf00, 0x101, dev.clone()),
            Err(BusError::Overlap {
                base: 0xf00,
                len: 0x101
            })
        );
        assert!(bus.insert(0x1100, 0x100, dev.clone()).is_ok());
        assert!(bus.insert(0xf00, 0x100, dev.clone()).is_ok());
        assert_eq!(
            bus.insert(5, 0, dev.clone()),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev),
            Err(BusError::InvalidRange { .. })
        ));
    }
}
