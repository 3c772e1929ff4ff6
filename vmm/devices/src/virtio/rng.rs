//! virtio-rng (virtio 1.2, section 5.4): fills driver buffers with host entropy.
//!
//! One request queue. Each writable buffer is filled from the host's `/dev/urandom` straight into
//! guest memory, at most [`MAX_FILL_BYTES`] per request so one huge request cannot starve the
//! worker; the used length tells the driver how much it got.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::chain::read_into;
use super::worker::{DeviceQueue, Popped, Worker, is_ready, poll_fds, readable};
use super::{
    ActivateContext, ActivateError, COMMON_FEATURES, DEVICE_TYPE_RNG, VIRTIO_RING_F_EVENT_IDX,
    VirtioDevice,
};
use crate::WakeEvent;

/// Queue size of the request queue.
const QUEUE_SIZE: u16 = 256;
/// Upper bound on the bytes served per request.
pub const MAX_FILL_BYTES: u32 = 64 * 1024;
const NAME: &str = "rng";

/// A virtio entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    worker: Option<Worker>,
}

impl Rng {
    /// Creates an entropy device; the host source is opened on activation.
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_RNG
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let actual = ctx.queues.len();
        let Some(active) = ctx.queues.into_iter().next().filter(|_| actual == 1) else {
            return Err(ActivateError::QueueCount {
                device: NAME,
                expected: 1,
                actual,
            });
        };
        let source = File::open("/dev/urandom").map_err(|source| ActivateError::HostResource {
            device: NAME,
            source,
        })?;
        let event_idx = ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queue = DeviceQueue::new(active, ctx.irq, event_idx, u32::from(QUEUE_SIZE), NAME);
        let mem = ctx.mem;
        let worker = Worker::spawn("virtio-rng", move |stop| run(&mem, queue, &source, &stop))
            .map_err(|source| ActivateError::SpawnWorker {
                device: NAME,
                source,
            })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

fn run(mem: &GuestMemoryMmap, mut queue: DeviceQueue, source: &File, stop: &Arc<WakeEvent>) {
    // Buffers made available before the first notify are served too.
    process(mem, &mut queue, source);
    loop {
        let notify = queue.notify.clone();
        let mut fds = [readable(stop.as_fd()), readable(notify.as_fd())];
        if let Err(error) = poll_fds(&mut fds, None) {
            tracing::error!(device = NAME, %error, "poll failed, worker stops");
            return;
        }
        let [stop_fd, notify_fd] = &fds;
        if is_ready(stop_fd) {
            return;
        }
        if is_ready(notify_fd) {
            let _ = notify.drain();
            process(mem, &mut queue, source);
        }
    }
}

fn process(mem: &GuestMemoryMmap, queue: &mut DeviceQueue, source: &File) {
    loop {
        queue.disable_notification(mem);
        while let Some(popped) = queue.pop(mem) {
            match popped {
                Popped::Chain(chain) => {
                    let want = chain.writable.len().min(MAX_FILL_BYTES);
                    let filled = chain
                        .writable
                        .for_each_slice(mem, 0, want, |s| read_into(source.as_raw_fd(), s))
                        .unwrap_or(0);
                    queue.add_used(mem, chain.head, u32::try_from(filled).unwrap_or(0));
                }
                Popped::Bad { head, .. } => queue.add_used(mem, head, 0),
            }
        }
        if !queue.enable_notification(mem) {
            break;
        }
    }
    queue.signal_used(mem);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{MockQueue, activate_context, test_memory};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn test_rng_fills_writable_buffers() {
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        q.add_chain(&[(0x10_0000, 64, true), (0x10_1000, 64, true)]);
        let (ctx, events, line, _) = activate_context(&mem, &[&q]);
        let mut rng = Rng::new();
        rng.activate(ctx).unwrap();
        q.wait_used(1);
        assert_eq!(q.used_elem(0), (0, 128));
        let mut a = [0u8; 64];
        mem.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
        let mut b = [0u8; 64];
        mem.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
        assert_ne!(a, [0; 64]);
        assert_ne!(b, [0; 64]);
        assert_ne!(a, b);
        assert!(line.count.load(std::sync::atomic::Ordering::SeqCst) >= 1);

        // A later request after a notify, and a huge one capped.
        q.add_chain(&[(0x20_0000, 1 << 20, true)]);
        events[0].signal().unwrap();
        q.wait_used(2);
        assert_eq!(q.used_elem(1).1, MAX_FILL_BYTES);
        rng.reset();
    }

    #[test]
    fn test_rng_survives_hostile_chains() {
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        // Out of guest memory, a loop, and a read-only buffer.
        q.add_chain(&[(0xffff_0000_0000, 64, true)]);
        q.write_desc(1, 0x10_0000, 8, 3, 2);
        q.write_desc(2, 0x10_0000, 8, 3, 1);
        q.publish(1);
        let h = q.add_chain(&[(0x10_0000, 0, false)]);
        let _ = h;
        let (ctx, _events, _line, irq) = activate_context(&mem, &[&q]);
        let mut rng = Rng::new();
        rng.activate(ctx).unwrap();
        q.wait_used(3);
        for i in 0..3 {
            assert_eq!(q.used_elem(i).1, 0);
        }
        assert!(!irq.needs_reset());
        rng.reset();
    }

    #[test]
    fn test_rng_marks_needs_reset_when_avail_index_runs_ahead() {
        let mem = test_memory();
        let q = MockQueue::new(&mem, 16);
        q.set_avail_idx(100);
        let (ctx, _events, _line, irq) = activate_context(&mem, &[&q]);
        let mut rng = Rng::new();
        rng.activate(ctx).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !irq.needs_reset() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(irq.status() & crate::virtio::INT_CONFIG_CHANGE, 2);
        rng.reset();
    }
}
