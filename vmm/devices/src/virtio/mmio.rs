//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2), modern devices only.
//!
//! [`MmioTransport`] is a [`BusDevice`] covering one 4 KiB page: the register file at offsets
//! below 0x100 and the device's configuration space from 0x100. It runs the device status state
//! machine (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, with a write of 0 resetting everything),
//! refuses FEATURES_OK unless the driver accepted `VIRTIO_F_VERSION_1` and only offered bits,
//! records queue layouts, and on DRIVER_OK hands them to the device. A QueueNotify write only
//! signals the queue's [`WakeEvent`]: the device's worker does the work, never the vCPU thread.
//!
//! Known limitation: a device reset (status 0) stops the worker synchronously on the vCPU
//! thread, so it waits for the request in progress (e.g. a block flush) to finish.

use std::sync::Arc;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{
    ActivateContext, ActiveQueue, IrqStatus, LogLimiter, VIRTIO_F_VERSION_1, VirtioDevice,
    guest_warn, status,
};
use crate::{BusDevice, InterruptLine, WakeEvent};

/// Size of the MMIO window of one device.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;

/// "virt" in little endian, the value of the MagicValue register.
const MAGIC: u32 = 0x7472_6976;
/// The modern (virtio 1.x) transport version.
const VERSION: u32 = 2;
/// VendorID register value: "SQIB".
const VENDOR_ID: u32 = 0x4249_5153;
/// The largest split queue (virtio 1.2, 2.7).
const MAX_QUEUE_SIZE: u16 = 32768;

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// A device that cannot be put behind the transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declares a queue size that is zero, not a power of two or too large.
    #[error("device {device} declares queue {index} with invalid maximum size {size}")]
    QueueMaxSize {
        /// The device name.
        device: &'static str,
        /// The queue index.
        index: usize,
        /// The declared size.
        size: u16,
    },
    /// The device declares no queue at all.
    #[error("device {device} declares no queues")]
    NoQueues {
        /// The device name.
        device: &'static str,
    },
    /// Creating a queue's wake-up event failed.
    #[error("creating the notify event of device {device} failed")]
    NotifyEvent {
        /// The device name.
        device: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device does not offer `VIRTIO_F_VERSION_1`; legacy devices are not supported.
    #[error("device {device} does not offer VIRTIO_F_VERSION_1 (features {features:#x})")]
    NotModern {
        /// The device name.
        device: &'static str,
        /// Its feature bits.
        features: u64,
    },
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueRegs {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

impl QueueRegs {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// One virtio device behind a virtio-mmio register page.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqStatus>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    notify: Vec<Arc<WakeEvent>>,
    activated: bool,
    config_generation: u32,
    shm_sel: u32,
    limiter: LogLimiter,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device", &self.device.name())
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts `device` behind a register page; it will use `mem` and raise interrupts on `line`.
    ///
    /// # Errors
    ///
    /// [`MmioError`] when the device's queue sizes or features are unusable, or a notify event
    /// cannot be created.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        line: Arc<dyn InterruptLine>,
    ) -> Result<Self, MmioError> {
        let name = device.name();
        let features = device.avail_features();
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(MmioError::NotModern {
                device: name,
                features,
            });
        }
        let sizes = device.queue_max_sizes();
        if sizes.is_empty() {
            return Err(MmioError::NoQueues { device: name });
        }
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notify = Vec::with_capacity(sizes.len());
        for (index, &size) in sizes.iter().enumerate() {
            if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
                return Err(MmioError::QueueMaxSize {
                    device: name,
                    index,
                    size,
                });
            }
            queues.push(QueueRegs::new(size));
            let ev = WakeEvent::new().map_err(|source| MmioError::NotifyEvent {
                device: name,
                source,
            })?;
            notify.push(Arc::new(ev));
        }
        Ok(Self {
            device,
            mem,
            irq: Arc::new(IrqStatus::new(line)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            notify,
            activated: false,
            config_generation: 0,
            shm_sel: 0,
            limiter: LogLimiter::new(Duration::from_secs(5)),
        })
    }

    /// The virtio device type behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.irq.needs_reset() {
            s |= status::DEVICE_NEEDS_RESET;
        }
        s
    }

    /// Whether the device is running (DRIVER_OK accepted and queues handed over).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max_size);
        }
        for ev in &self.notify {
            // A stale notification would only cause a harmless extra queue scan.
            let _ = ev.drain();
        }
        self.irq.clear();
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|i| self.queues.get_mut(i))
    }

    fn queue_writable(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let features = self.device.avail_features();
                match self.device_features_sel {
                    0 => (features & 0xffff_ffff) as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.irq.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: a length of -1 says the selected one does not exist.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH => u32::MAX,
            reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => 0,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    offset,
                    "read of an unknown virtio-mmio register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
                    guest_warn!(
                        self.limiter,
                        device = self.device.name(),
                        status = self.status,
                        "driver features written outside negotiation"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => set_low(&mut self.acked_features, v),
                    1 => set_high(&mut self.acked_features, v),
                    // Feature bits beyond 63 do not exist; a driver accepting them would fail
                    // FEATURES_OK, so remember that it tried.
                    _ if v != 0 => self.acked_features |= 1 << 63,
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => self.notify_queue(v),
            reg::INTERRUPT_ACK => self.irq.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => self.shm_sel = v,
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => self.write_queue_reg(offset, v),
            _ => {
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    offset,
                    "write to an unknown or read-only virtio-mmio register"
                );
            }
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let writable = self.queue_writable();
        let name = self.device.name();
        let sel = self.queue_sel;
        let Some(q) = self.selected_queue() else {
            guest_warn!(
                self.limiter,
                device = name,
                queue = sel,
                "queue register written for a queue that does not exist"
            );
            return;
        };
        // virtio 1.2, 4.2.3.2: queue registers are written between FEATURES_OK and DRIVER_OK,
        // and only while the queue is not ready.
        if !writable || (q.ready && offset != reg::QUEUE_READY) {
            guest_warn!(
                self.limiter,
                device = name,
                offset,
                "queue register written outside queue setup"
            );
            return;
        }
        match offset {
            reg::QUEUE_NUM => q.size = u16::try_from(v).unwrap_or(0),
            reg::QUEUE_READY => q.ready = v == 1,
            reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
            reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
            reg::QUEUE_DRIVER_LOW => set_low(&mut q.driver, v),
            reg::QUEUE_DRIVER_HIGH => set_high(&mut q.driver, v),
            reg::QUEUE_DEVICE_LOW => set_low(&mut q.device, v),
            reg::QUEUE_DEVICE_HIGH => set_high(&mut q.device, v),
            _ => {}
        }
    }

    fn notify_queue(&mut self, index: u32) {
        if !self.activated {
            guest_warn!(
                self.limiter,
                device = self.device.name(),
                queue = index,
                "queue notified before DRIVER_OK"
            );
            return;
        }
        let ev = usize::try_from(index).ok().and_then(|i| self.notify.get(i));
        match ev {
            Some(ev) => {
                if let Err(error) = ev.signal() {
                    tracing::error!(
                        device = self.device.name(),
                        %error,
                        "waking a device worker failed"
                    );
                }
            }
            None => {
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    queue = index,
                    "notify for a queue that does not exist"
                );
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & status::FAILED != 0 {
            // The driver gave up; keep the bit until it resets the device.
            self.status |= status::FAILED;
            return;
        }
        // DEVICE_NEEDS_RESET belongs to the device; a driver echoing it back changes nothing.
        let v = v & !status::DEVICE_NEEDS_RESET;
        if v & old != old {
            guest_warn!(
                self.limiter,
                device = self.device.name(),
                old,
                new = v,
                "driver cleared device status bits without a reset"
            );
            return;
        }
        let added = v & !old;
        let base = status::ACKNOWLEDGE | status::DRIVER;
        match added {
            0 => {}
            status::ACKNOWLEDGE if old == 0 => self.status = v,
            status::DRIVER if old == status::ACKNOWLEDGE => self.status = v,
            status::FEATURES_OK if old == base => {
                if self.features_acceptable() {
                    self.status = v;
                } else {
                    // virtio 1.2, 2.2.2 / 3.1.1: the device leaves FEATURES_OK clear and the
                    // driver sees negotiation failed when it reads the status back.
                    guest_warn!(
                        self.limiter,
                        device = self.device.name(),
                        acked = self.acked_features,
                        "refusing FEATURES_OK"
                    );
                }
            }
            status::DRIVER_OK if old == base | status::FEATURES_OK => {
                self.status = v;
                self.activate();
            }
            _ => {
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    old,
                    new = v,
                    "invalid device status transition"
                );
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let avail = self.device.avail_features();
        self.acked_features & VIRTIO_F_VERSION_1 != 0 && self.acked_features & !avail == 0
    }

    fn build_queue(&self, regs: &QueueRegs) -> Option<Queue> {
        if !regs.ready || regs.size == 0 || !regs.size.is_power_of_two() {
            return None;
        }
        let mut q = Queue::new(regs.max_size).ok()?;
        q.try_set_size(regs.size).ok()?;
        q.try_set_desc_table_address(vm_memory::GuestAddress(regs.desc))
            .ok()?;
        q.try_set_avail_ring_address(vm_memory::GuestAddress(regs.driver))
            .ok()?;
        q.try_set_used_ring_address(vm_memory::GuestAddress(regs.device))
            .ok()?;
        q.set_ready(true);
        q.is_valid(&self.mem).then_some(q)
    }

    fn activate(&mut self) {
        let name = self.device.name();
        let mut active = Vec::with_capacity(self.queues.len());
        for (index, (regs, notify)) in self.queues.iter().zip(&self.notify).enumerate() {
            match self.build_queue(regs) {
                Some(queue) => active.push(ActiveQueue {
                    queue,
                    notify: notify.clone(),
                }),
                None => {
                    guest_warn!(
                        self.limiter,
                        device = name,
                        queue = index,
                        size = regs.size,
                        desc = regs.desc,
                        "queue not ready or its rings lie outside guest memory"
                    );
                    self.irq.mark_needs_reset();
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: active,
            irq: self.irq.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                tracing::debug!(
                    device = name,
                    features = self.acked_features,
                    "virtio device activated"
                );
            }
            Err(error) => {
                tracing::error!(device = name, %error, "activating virtio device failed");
                self.irq.mark_needs_reset();
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        let value = self.read_reg(offset);
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(out) if offset.is_multiple_of(4) => *out = value.to_le_bytes(),
            _ => {
                data.fill(0);
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    offset,
                    len = data.len(),
                    "misaligned or non-32-bit virtio-mmio register read"
                );
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER == 0 {
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    offset,
                    "configuration written before DRIVER"
                );
                return;
            }
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(bytes))
            }
            _ => {
                guest_warn!(
                    self.limiter,
                    device = self.device.name(),
                    offset,
                    len = data.len(),
                    "misaligned or non-32-bit virtio-mmio register write"
                );
            }
        }
    }
}

#[cfg(test)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "test addresses fit in 32 bits"
)]
mod tests {
    use super::*;
    use crate::virtio::testing::{CountingLine, MockQueue, test_memory};
    use crate::virtio::{ActivateError, COMMON_FEATURES};
    use parking_lot::Mutex;

    /// A device recording activations and resets.
    struct Probe {
        log: Arc<Mutex<Vec<String>>>,
        config: [u8; 8],
        fail_activate: bool,
    }

    impl VirtioDevice for Probe {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "probe"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn avail_features(&self) -> u64 {
            COMMON_FEATURES | 1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&self.config, offset, data);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.config[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            if self.fail_activate {
                return Err(ActivateError::QueueCount {
                    device: "probe",
                    expected: 9,
                    actual: ctx.queues.len(),
                });
            }
            self.log.lock().push(format!(
                "activate {} {:#x}",
                ctx.queues.len(),
                ctx.acked_features
            ));
            ctx.irq.signal_used();
            Ok(())
        }
        fn reset(&mut self) {
            self.log.lock().push("reset".into());
        }
    }

    fn probe(fail: bool) -> (MmioTransport, Arc<Mutex<Vec<String>>>, Arc<CountingLine>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let line = Arc::new(CountingLine::default());
        let dev = Probe {
            log: log.clone(),
            config: *b"abcdefgh",
            fail_activate: fail,
        };
        let t = MmioTransport::new(Box::new(dev), test_memory(), line.clone()).unwrap();
        (t, log, line)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        wr(t, reg::STATUS, status::ACKNOWLEDGE);
        wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, reg::DRIVER_FEATURES_SEL, 0);
        wr(t, reg::DRIVER_FEATURES, features as u32);
        wr(t, reg::DRIVER_FEATURES_SEL, 1);
        wr(t, reg::DRIVER_FEATURES, (features >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(t, reg::STATUS, s);
        rd(t, reg::STATUS) & status::FEATURES_OK != 0
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, q: &MockQueue<'_>) {
        wr(t, reg::QUEUE_SEL, index);
        wr(t, reg::QUEUE_NUM, u32::from(q.size()));
        wr(t, reg::QUEUE_DESC_LOW, q.desc_table().0 as u32);
        wr(t, reg::QUEUE_DESC_HIGH, 0);
        wr(t, reg::QUEUE_DRIVER_LOW, q.avail_addr().0 as u32);
        wr(t, reg::QUEUE_DEVICE_LOW, q.used_addr().0 as u32);
        wr(t, reg::QUEUE_READY, 1);
    }

    #[test]
    fn test_mmio_identifies_modern_device() {
        let (mut t, _, _) = probe(false);
        assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, reg::VERSION), 2);
        assert_eq!(rd(&mut t, reg::DEVICE_ID), 42);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 1);
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), (1 << 29) | (1 << 3));
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(rd(&mut t, reg::DEVICE_FEATURES), 0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 8);
        wr(&mut t, reg::QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(rd(&mut t, reg::SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn test_mmio_refuses_features_ok_without_version_1() {
        let (mut t, _, _) = probe(false);
        assert!(!negotiate(&mut t, 1 << 3));
        // DRIVER_OK cannot follow a refused negotiation.
        wr(&mut t, reg::STATUS, 0xf);
        assert_eq!(
            rd(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
    }

    #[test]
    fn test_mmio_refuses_features_not_offered() {
        let (mut t, _, _) = probe(false);
        assert!(!negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 4));
        wr(&mut t, reg::STATUS, 0);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 3));
    }

    #[test]
    fn test_mmio_status_must_progress_in_order() {
        let (mut t, _, _) = probe(false);
        wr(&mut t, reg::STATUS, status::DRIVER);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER_OK);
        assert_eq!(rd(&mut t, reg::STATUS), status::ACKNOWLEDGE);
        // Features cannot be written before DRIVER.
        wr(&mut t, reg::DRIVER_FEATURES, 0xffff_ffff);
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::STATUS, 0xb);
        assert_eq!(rd(&mut t, reg::STATUS), 0xb);
        // Clearing a bit without a reset is refused.
        wr(&mut t, reg::STATUS, 0x3);
        assert_eq!(rd(&mut t, reg::STATUS), 0xb);
    }

    #[test]
    fn test_mmio_activates_and_resets() {
        let (mut t, log, line) = probe(false);
        let mem = t.mem.clone();
        let q0 = MockQueue::at(&mem, 0x1000, 16);
        let q1 = MockQueue::at(&mem, 0x8000, 8);
        // Notify before activation is ignored.
        wr(&mut t, reg::QUEUE_NOTIFY, 0);
        assert!(negotiate(&mut t, COMMON_FEATURES));
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 1);
        wr(&mut t, reg::STATUS, 0xf);
        assert!(t.is_activated());
        assert_eq!(rd(&mut t, reg::STATUS), 0xf);
        assert_eq!(log.lock().as_slice(), ["activate 2 0x120000000"]);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 1);
        assert_eq!(line.count.load(std::sync::atomic::Ordering::SeqCst), 1);
        wr(&mut t, reg::INTERRUPT_ACK, 1);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);
        // Queue registers are frozen after DRIVER_OK.
        wr(&mut t, reg::QUEUE_NUM, 2);
        wr(&mut t, reg::QUEUE_NOTIFY, 1);
        assert!(t.notify[1].drain().unwrap());
        wr(&mut t, reg::QUEUE_NOTIFY, 5);

        wr(&mut t, reg::STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(log.lock().last().unwrap(), "reset");
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        wr(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, reg::QUEUE_READY), 0);
        assert!(negotiate(&mut t, COMMON_FEATURES));
        assert_eq!(t.acked_features, COMMON_FEATURES);
    }

    #[test]
    fn test_mmio_needs_reset_when_queue_outside_memory() {
        let (mut t, log, line) = probe(false);
        let mem = t.mem.clone();
        let q0 = MockQueue::at(&mem, 0x1000, 16);
        assert!(negotiate(&mut t, COMMON_FEATURES));
        setup_queue(&mut t, 0, &q0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        wr(&mut t, reg::QUEUE_NUM, 8);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0);
        wr(&mut t, reg::QUEUE_DESC_HIGH, 0x10);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::STATUS, 0xf);
        assert!(!t.is_activated());
        assert!(log.lock().is_empty());
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(line.count.load(std::sync::atomic::Ordering::SeqCst), 1);
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn test_mmio_needs_reset_when_activation_fails() {
        let (mut t, _, _) = probe(true);
        let mem = t.mem.clone();
        let q0 = MockQueue::at(&mem, 0x1000, 16);
        let q1 = MockQueue::at(&mem, 0x8000, 8);
        assert!(negotiate(&mut t, COMMON_FEATURES));
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        wr(&mut t, reg::STATUS, 0xf);
        assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn test_mmio_rejects_bad_queue_size() {
        let (mut t, _, _) = probe(false);
        let mem = t.mem.clone();
        let q0 = MockQueue::at(&mem, 0x1000, 16);
        let q1 = MockQueue::at(&mem, 0x8000, 8);
        assert!(negotiate(&mut t, COMMON_FEATURES));
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        wr(&mut t, reg::QUEUE_SEL, 1);
        // Ready queues cannot be resized; reset readiness first.
        wr(&mut t, reg::QUEUE_READY, 0);
        wr(&mut t, reg::QUEUE_NUM, 6);
        wr(&mut t, reg::QUEUE_READY, 1);
        wr(&mut t, reg::STATUS, 0xf);
        assert!(!t.is_activated());
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn test_mmio_config_space_and_odd_accesses() {
        let (mut t, _, _) = probe(false);
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(&b, b"cd");
        let mut b = [0u8; 4];
        t.read(0x106, &mut b);
        assert_eq!(&b, b"gh\0\0");
        // Config writes before DRIVER are ignored.
        t.write(0x100, b"Z");
        t.read(0x100, &mut b);
        assert_eq!(&b, b"abcd");
        wr(&mut t, reg::STATUS, 1);
        wr(&mut t, reg::STATUS, 3);
        t.write(0x100, b"Z");
        t.read(0x100, &mut b);
        assert_eq!(&b, b"Zbcd");
        // Non-32-bit register accesses read zero and change nothing.
        let mut one = [0xffu8; 1];
        t.read(reg::MAGIC, &mut one);
        assert_eq!(one, [0]);
        t.write(reg::STATUS, &[0]);
        assert_eq!(rd(&mut t, reg::STATUS), 3);
        t.read(reg::MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(rd(&mut t, 0x0f0), 0);
    }

    #[test]
    fn test_mmio_survives_random_register_traffic() {
        use crate::virtio::testing::XorShift;
        let line = Arc::new(CountingLine::default());
        let mut t =
            MmioTransport::new(Box::new(crate::virtio::Rng::new()), test_memory(), line).unwrap();
        let mut rng = XorShift(0x5eed_1234_abcd_0001);
        let offsets = [
            reg::DEVICE_FEATURES_SEL,
            reg::DRIVER_FEATURES,
            reg::DRIVER_FEATURES_SEL,
            reg::QUEUE_SEL,
            reg::QUEUE_NUM,
            reg::QUEUE_READY,
            reg::QUEUE_NOTIFY,
            reg::INTERRUPT_ACK,
            reg::STATUS,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
        ];
        let statuses = [0, 1, 3, 0xb, 0xf, 0x80, 0x4f];
        for _ in 0..50_000 {
            let off = match rng.below(4) {
                0 => rng.below(0x1000),
                _ => offsets[rng.below(offsets.len() as u64) as usize],
            };
            let v = match (off, rng.below(3)) {
                (reg::STATUS, 0 | 1) => statuses[rng.below(statuses.len() as u64) as usize],
                (reg::QUEUE_NUM, 0) => 1 << rng.below(10),
                (reg::QUEUE_DESC_LOW | reg::QUEUE_DRIVER_LOW | reg::QUEUE_DEVICE_LOW, 0) => {
                    (rng.below(MEM_SIZE_PAGES) << 12) as u32
                }
                (reg::QUEUE_DESC_HIGH | reg::QUEUE_DRIVER_HIGH | reg::QUEUE_DEVICE_HIGH, 0) => 0,
                (reg::DRIVER_FEATURES, 0) => 1,
                _ => rng.next() as u32,
            };
            let len = [1usize, 2, 4, 8][rng.below(4) as usize];
            let bytes = u64::from(v).to_le_bytes();
            if rng.below(2) == 0 {
                t.write(off, &bytes[..len]);
            } else {
                let mut b = [0u8; 8];
                t.read(off, &mut b[..len]);
            }
        }
        wr(&mut t, reg::STATUS, 0);
        assert_eq!(rd(&mut t, reg::STATUS), 0);
        assert!(!t.is_activated());
        assert_eq!(rd(&mut t, reg::MAGIC), MAGIC);
    }

    const MEM_SIZE_PAGES: u64 = crate::virtio::testing::MEM_SIZE >> 12;
}
