//! Test helpers: guest memory, a mock split-queue driver and a counting interrupt line.
//!
//! The mock writes descriptors, the available ring and reads the used ring in a
//! `GuestMemoryMmap` the way a driver would, including hostile values no driver should write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{ActivateContext, ActiveQueue, IrqStatus};
use crate::interrupt::{InterruptError, InterruptLine};
use crate::wake::WakeEvent;

/// Size of the test guest memory.
pub const MEM_SIZE: u64 = 16 << 20;

pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

/// An interrupt line that counts its pulses.
#[derive(Default)]
pub struct CountingLine {
    pub count: AtomicU32,
}

impl InterruptLine for CountingLine {
    fn trigger(&self) -> Result<(), InterruptError> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn set_level(&self, _level: bool) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// A driver-side view of one split queue laid out at `base`: descriptors at `base`, the
/// available ring at `base + 0x1000`, the used ring at `base + 0x2000` (size <= 256).
pub struct MockQueue<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> MockQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, 0x1000, size)
    }

    pub fn at(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        assert!(size <= 256);
        let q = Self {
            mem,
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
        };
        mem.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        q
    }

    pub fn desc_table(&self) -> GuestAddress {
        GuestAddress(self.base)
    }
    pub fn avail_addr(&self) -> GuestAddress {
        GuestAddress(self.base + 0x1000)
    }
    pub fn used_addr(&self) -> GuestAddress {
        GuestAddress(self.base + 0x2000)
    }
    pub fn size(&self) -> u16 {
        self.size
    }
    /// The descriptor index the next `add_chain` starts at.
    pub fn next_head(&self) -> u16 {
        self.next_desc
    }

    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&raw, self.desc_table().unchecked_add(u64::from(index) * 16))
            .unwrap();
    }

    /// Writes a chain of `(addr, len, device_writable)` buffers into free descriptors and makes
    /// it available; returns its head index.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, writable)) in bufs.iter().enumerate() {
            let idx = (self.next_desc + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if last { 0 } else { 1 } | if *writable { 2 } else { 0 };
            self.write_desc(idx, *addr, *len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Puts `head` in the available ring and bumps its index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), self.avail_addr().unchecked_add(4 + slot * 2))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes the available index directly (hostile drivers can write anything).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), self.avail_addr().unchecked_add(2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        u16::from_le(
            self.mem
                .read_obj(self.used_addr().unchecked_add(2))
                .unwrap(),
        )
    }

    /// The `(id, len)` of used ring entry `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self
            .used_addr()
            .unchecked_add(4 + u64::from(i % self.size) * 8);
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits until the used index reaches `n`.
    pub fn wait_used(&self, n: u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() != n {
            assert!(
                Instant::now() < deadline,
                "used index stuck at {} waiting for {n}",
                self.used_idx()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A device-side queue configured for this layout.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        let split = |a: GuestAddress| (Some(a.0 as u32), Some((a.0 >> 32) as u32));
        let (l, h) = split(self.desc_table());
        q.set_desc_table_address(l, h);
        let (l, h) = split(self.avail_addr());
        q.set_avail_ring_address(l, h);
        let (l, h) = split(self.used_addr());
        q.set_used_ring_address(l, h);
        q.set_ready(true);
        q
    }
}

/// Builds an activation context for `queues`, returning it with the notify events and line.
pub fn activate_context(
    mem: &GuestMemoryMmap,
    queues: &[&MockQueue<'_>],
) -> (
    ActivateContext,
    Vec<Arc<WakeEvent>>,
    Arc<CountingLine>,
    Arc<IrqStatus>,
) {
    let line = Arc::new(CountingLine::default());
    let irq = Arc::new(IrqStatus::new(line.clone()));
    let mut active = Vec::new();
    let mut events = Vec::new();
    for q in queues {
        let ev = Arc::new(WakeEvent::new().unwrap());
        events.push(ev.clone());
        active.push(ActiveQueue {
            queue: q.queue(),
            notify: ev,
        });
    }
    let ctx = ActivateContext {
        mem: mem.clone(),
        queues: active,
        irq: irq.clone(),
        acked_features: super::VIRTIO_F_VERSION_1,
    };
    (ctx, events, line, irq)
}

/// A small deterministic xorshift generator for randomized hostile-input tests.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
