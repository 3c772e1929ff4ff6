//! virtio-blk (virtio 1.2, section 5.2): a file-backed disk, read-only or read-write.
//!
//! One request queue. A request is a 16-byte header (type, reserved, sector), data buffers and a
//! one-byte status the device writes last. Reads and writes go straight between guest memory
//! and the backing file at the request's offset, one `preadv`/`pwritev` for all of a request's
//! buffers (a system call per page-sized buffer made reads slow). Anything the driver gets
//! wrong about a request (a range past the end of the disk, a length that is not a multiple of
//! 512, a write to a read-only disk) is answered with `VIRTIO_BLK_S_IOERR`; an unknown request
//! type with `VIRTIO_BLK_S_UNSUPP`. The capacity is the file size rounded down to 512 bytes.
//!
//! Known limitation: one queue, served synchronously by one worker thread, and no discard or
//! write-zeroes; a guest doing parallel I/O waits on each request in turn. Multiqueue needs a
//! worker (or an I/O submission ring) per queue.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::chain::{Chain, Direction, file_io_vectored};
use super::worker::{DeviceQueue, Popped, Worker, is_ready, poll_fds, readable};
use super::{
    ActivateContext, ActivateError, COMMON_FEATURES, DEVICE_TYPE_BLOCK, LogLimiter,
    VIRTIO_RING_F_EVENT_IDX, VirtioDevice, guest_warn, read_config_bytes,
};
use crate::WakeEvent;

/// Feature: `size_max` in the configuration bounds each buffer.
const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
/// Feature: `seg_max` in the configuration bounds buffers per request.
const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// Feature: the disk is read-only.
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device honours flush requests.
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Sector size of the virtio-blk protocol, whatever the backing file's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device ID answer to `VIRTIO_BLK_T_GET_ID`.
pub const DEVICE_ID_LEN: usize = 20;
const HEADER_LEN: u32 = 16;
const QUEUE_SIZE: u16 = 256;
/// Data buffers per request we advertise (the header and the status take two descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Largest single data buffer we advertise.
const SIZE_MAX: u32 = 1 << 20;
const NAME: &str = "block";

/// A failure to set up a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("opening block backing file {path} (read_only={read_only}) failed")]
    Open {
        /// The path.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The backing file's size cannot be read.
    #[error("finding the size of block backing file {path} failed")]
    Metadata {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Disk {
    file: File,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; DEVICE_ID_LEN],
}

/// A virtio block device backed by a host file.
#[derive(Debug)]
pub struct Block {
    disk: Arc<Disk>,
    features: u64,
    config: [u8; 24],
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path` as the disk of drive `drive_id`; the drive id (truncated to 20 bytes) is
    /// what the guest reads as the device ID, e.g. `/sys/block/vda/serial`.
    ///
    /// # Errors
    ///
    /// [`BlockError::Open`] or [`BlockError::Metadata`] with the path and OS error.
    pub fn new(drive_id: &str, path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                read_only,
                source,
            })?;
        // Seeking to the end sizes host block devices too, whose metadata length is 0; I/O uses
        // explicit offsets, so the file position does not matter afterwards.
        let len = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Metadata {
                path: path.to_owned(),
                source,
            })?;
        let capacity_bytes = len - len % SECTOR_SIZE;
        let mut id = [0u8; DEVICE_ID_LEN];
        for (dst, src) in id.iter_mut().zip(drive_id.bytes()) {
            *dst = src;
        }
        let mut features =
            COMMON_FEATURES | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH;
        if read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        // Configuration layout (virtio 1.2, 5.2.4): capacity in sectors, size_max, seg_max,
        // geometry (left zero), blk_size.
        let mut config = [0u8; 24];
        let fields: [(usize, &[u8]); 4] = [
            (0, &(capacity_bytes / SECTOR_SIZE).to_le_bytes()),
            (8, &SIZE_MAX.to_le_bytes()),
            (12, &SEG_MAX.to_le_bytes()),
            (20, &512u32.to_le_bytes()),
        ];
        for (at, bytes) in fields {
            if let Some(dst) = config.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        }
        Ok(Self {
            disk: Arc::new(Disk {
                file,
                read_only,
                capacity_bytes,
                id,
            }),
            features,
            config,
            worker: None,
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity_bytes / SECTOR_SIZE
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
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
        let event_idx = ctx.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queue = DeviceQueue::new(active, ctx.irq, event_idx, u32::from(QUEUE_SIZE), NAME);
        let mem = ctx.mem;
        let disk = self.disk.clone();
        let worker = Worker::spawn("virtio-blk", move |stop| {
            let mut w = BlockWorker {
                mem,
                queue,
                disk,
                limiter: LogLimiter::new(std::time::Duration::from_secs(5)),
            };
            w.run(&stop);
        })
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

struct BlockWorker {
    mem: GuestMemoryMmap,
    queue: DeviceQueue,
    disk: Arc<Disk>,
    limiter: LogLimiter,
}

impl BlockWorker {
    fn run(&mut self, stop: &Arc<WakeEvent>) {
        self.process();
        let notify = self.queue.notify.clone();
        loop {
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
                self.process();
            }
        }
    }

    fn process(&mut self) {
        loop {
            self.queue.disable_notification(&self.mem);
            while let Some(popped) = self.queue.pop(&self.mem) {
                let (head, used) = match popped {
                    Popped::Chain(chain) => (chain.head, self.handle(&chain)),
                    Popped::Bad { head, .. } => (head, 0),
                };
                self.queue.add_used(&self.mem, head, used);
            }
            if !self.queue.enable_notification(&self.mem) {
                break;
            }
        }
        self.queue.signal_used(&self.mem);
    }

    /// Serves one request; returns the used length (bytes written to the driver's buffers).
    fn handle(&mut self, chain: &Chain) -> u32 {
        let mut header = [0u8; HEADER_LEN as usize];
        let writable_len = chain.writable.len();
        // The status byte is the last writable byte; without one there is no way to answer.
        let Some(status_at) = writable_len.checked_sub(1) else {
            guest_warn!(self.limiter, device = NAME, "request without a status byte");
            return 0;
        };
        let (status, data_len) =
            if chain.readable.read_bytes(&self.mem, 0, &mut header) != header.len() {
                guest_warn!(
                    self.limiter,
                    device = NAME,
                    "request header shorter than 16 bytes"
                );
                (VIRTIO_BLK_S_IOERR, 0)
            } else {
                let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
                let kind = u32::from_le_bytes([t0, t1, t2, t3]);
                let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
                self.execute(chain, kind, sector, status_at)
            };
        if chain.writable.write_bytes(&self.mem, status_at, &[status]) != 1 {
            return 0;
        }
        data_len.saturating_add(1)
    }

    /// Runs a request; returns its status and how many bytes it wrote to the driver.
    fn execute(&mut self, chain: &Chain, kind: u32, sector: u64, status_at: u32) -> (u8, u32) {
        let Self {
            mem, disk, limiter, ..
        } = self;
        let disk = &**disk;
        let cap = disk.capacity_bytes;
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = status_at;
                let Some(offset) = check_range(limiter, cap, sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let done = chain.writable.slices(mem, 0, len).and_then(|slices| {
                    file_io_vectored(&disk.file, &slices, offset, Direction::FileToGuest)
                });
                match done {
                    Ok(n) if n == len as usize => (VIRTIO_BLK_S_OK, len),
                    Ok(_) | Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_OUT => {
                if disk.read_only {
                    guest_warn!(
                        limiter,
                        device = NAME,
                        sector,
                        "write to a read-only disk refused"
                    );
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = chain.readable.len().saturating_sub(HEADER_LEN);
                let Some(offset) = check_range(limiter, cap, sector, len) else {
                    return (VIRTIO_BLK_S_IOERR, 0);
                };
                let done = chain
                    .readable
                    .slices(mem, HEADER_LEN, len)
                    .and_then(|slices| {
                        file_io_vectored(&disk.file, &slices, offset, Direction::GuestToFile)
                    });
                match done {
                    Ok(n) if n == len as usize => (VIRTIO_BLK_S_OK, 0),
                    Ok(_) | Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if disk.read_only {
                    return (VIRTIO_BLK_S_OK, 0);
                }
                match disk.file.sync_data() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(error) => {
                        tracing::error!(device = NAME, %error, "flushing the backing file failed");
                        (VIRTIO_BLK_S_IOERR, 0)
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                // virtio 1.2, 5.2.6: up to 20 bytes, NUL-padded; a shorter buffer gets a prefix.
                let n = status_at.min(u32::try_from(DEVICE_ID_LEN).unwrap_or(u32::MAX));
                let id = disk.id.get(..n as usize).unwrap_or_default();
                let written = chain.writable.write_bytes(mem, 0, id);
                (VIRTIO_BLK_S_OK, u32::try_from(written).unwrap_or(0))
            }
            _ => {
                guest_warn!(
                    limiter,
                    device = NAME,
                    kind,
                    "unsupported block request type"
                );
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }
}

/// The byte offset of `len` bytes at `sector`, if that range is whole sectors inside a disk of
/// `capacity_bytes`.
fn check_range(
    limiter: &mut LogLimiter,
    capacity_bytes: u64,
    sector: u64,
    len: u32,
) -> Option<u64> {
    let ok = sector
        .checked_mul(SECTOR_SIZE)
        .filter(|_| u64::from(len) % SECTOR_SIZE == 0)
        .filter(|off| {
            off.checked_add(u64::from(len))
                .is_some_and(|end| end <= capacity_bytes)
        });
    if ok.is_none() {
        guest_warn!(
            limiter,
            device = NAME,
            sector,
            len,
            "request outside the disk or not whole sectors"
        );
    }
    ok
}

#[cfg(test)]
#[expect(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "test values are small and positive"
)]
mod tests {
    use super::*;
    use crate::virtio::testing::{MockQueue, activate_context, test_memory};
    use std::io::{Read, Write};
    use vm_memory::{Bytes, GuestAddress};

    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn disk_file(dir: &Path, sectors: u64) -> PathBuf {
        let path = dir.join("disk.img");
        let mut f = File::create(&path).unwrap();
        let data: Vec<u8> = (0..sectors * 512).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        path
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "squib-blk-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
        mem.read_obj(GuestAddress(at)).unwrap()
    }

    struct Fixture {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fixture(sectors: u64) -> Fixture {
        let dir = tempdir();
        let path = disk_file(&dir, sectors);
        Fixture { dir, path }
    }

    #[test]
    fn test_block_config_reports_capacity_and_features() {
        let fx = fixture(8);
        // A trailing partial sector is not part of the disk.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&fx.path)
            .unwrap()
            .write_all(b"xyz")
            .unwrap();
        let blk = Block::new("root", &fx.path, true).unwrap();
        assert_eq!(blk.capacity_sectors(), 8);
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
        assert_ne!(blk.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert_ne!(blk.avail_features() & VIRTIO_BLK_F_FLUSH, 0);
        let rw = Block::new("root", &fx.path, false).unwrap();
        assert_eq!(rw.avail_features() & VIRTIO_BLK_F_RO, 0);
        assert!(matches!(
            Block::new("x", &fx.dir.join("missing"), true),
            Err(BlockError::Open { .. })
        ));
    }

    #[test]
    fn test_block_reads_writes_flushes_and_gets_id() {
        let fx = fixture(16);
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        let mut blk = Block::new("drive-with-a-long-name", &fx.path, false).unwrap();
        let (ctx, events, _line, irq) = activate_context(&mem, &[&q]);
        blk.activate(ctx).unwrap();

        // Read sectors 2..4 into two buffers.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
        q.add_chain(&[
            (HDR, 16, false),
            (DATA, 512, true),
            (DATA + 0x1000, 512, true),
            (STATUS, 1, true),
        ]);
        events[0].signal().unwrap();
        q.wait_used(1);
        assert_eq!(q.used_elem(0).1, 1025);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        let want: Vec<u8> = (3 * 512..4 * 512).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);

        // Write sector 15 (the last), header and data in one readable buffer.
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 15);
        mem.write_slice(&[0xabu8; 512], GuestAddress(HDR + 16))
            .unwrap();
        q.add_chain(&[(HDR, 16 + 512, false), (STATUS, 1, true)]);
        events[0].signal().unwrap();
        q.wait_used(2);
        assert_eq!(q.used_elem(1).1, 1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);
        let mut on_disk = Vec::new();
        File::open(&fx.path)
            .unwrap()
            .read_to_end(&mut on_disk)
            .unwrap();
        assert_eq!(&on_disk[15 * 512..], &[0xab; 512][..]);

        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        q.add_chain(&[(HDR, 16, false), (STATUS, 1, true)]);
        events[0].signal().unwrap();
        q.wait_used(3);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_OK);

        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        events[0].signal().unwrap();
        q.wait_used(4);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"drive-with-a-long-na");
        assert_eq!(q.used_elem(3).1, 21);
        assert!(!irq.needs_reset());
        blk.reset();
    }

    #[test]
    fn test_block_get_id_pads_short_ids_with_zeroes() {
        let fx = fixture(1);
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        let mut blk = Block::new("rootfs", &fx.path, true).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        mem.write_slice(&[0xffu8; 20], GuestAddress(DATA)).unwrap();
        q.add_chain(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        let (ctx, _events, _line, _) = activate_context(&mem, &[&q]);
        blk.activate(ctx).unwrap();
        q.wait_used(1);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"rootfs\0\0\0\0\0\0\0\0\0\0\0\0\0\0");
        blk.reset();
    }

    #[test]
    fn test_block_refuses_writes_when_read_only() {
        let fx = fixture(4);
        let before = std::fs::read(&fx.path).unwrap();
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        let mut blk = Block::new("ro", &fx.path, true).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        q.add_chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        let (ctx, _events, _line, _) = activate_context(&mem, &[&q]);
        blk.activate(ctx).unwrap();
        q.wait_used(1);
        assert_eq!(status(&mem, STATUS), VIRTIO_BLK_S_IOERR);
        assert_eq!(std::fs::read(&fx.path).unwrap(), before);
        blk.reset();
    }

    #[test]
    fn test_block_answers_ioerr_outside_disk_and_unsupp_for_unknown() {
        let fx = fixture(4);
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        let mut blk = Block::new("d", &fx.path, false).unwrap();
        let cases: [(u32, u64, u32, u8); 5] = [
            (VIRTIO_BLK_T_IN, 4, 512, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_IN, 3, 1024, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_IN, u64::MAX / 2, 512, VIRTIO_BLK_S_IOERR),
            (VIRTIO_BLK_T_IN, 0, 100, VIRTIO_BLK_S_IOERR),
            (99, 0, 512, VIRTIO_BLK_S_UNSUPP),
        ];
        let (ctx, events, _line, _) = activate_context(&mem, &[&q]);
        blk.activate(ctx).unwrap();
        for (i, (kind, sector, len, want)) in cases.into_iter().enumerate() {
            let hdr = HDR + 0x100 * i as u64;
            let st = STATUS + i as u64;
            header(&mem, hdr, kind, sector);
            mem.write_obj(0xeeu8, GuestAddress(st)).unwrap();
            q.add_chain(&[(hdr, 16, false), (DATA, len, true), (st, 1, true)]);
            events[0].signal().unwrap();
            q.wait_used(i as u16 + 1);
            assert_eq!(status(&mem, st), want, "case {i}");
            assert_eq!(q.used_elem(i as u16).1, 1, "case {i}");
        }
        blk.reset();
    }

    #[test]
    fn test_block_survives_hostile_chains() {
        let fx = fixture(4);
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        let mut blk = Block::new("d", &fx.path, false).unwrap();
        // No status byte at all.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        q.add_chain(&[(HDR, 16, false)]);
        // Header too short.
        q.add_chain(&[(HDR, 8, false), (STATUS, 1, true)]);
        // Data buffer outside guest memory.
        q.add_chain(&[(HDR, 16, false), (1 << 40, 512, true), (STATUS, 1, true)]);
        // A loop.
        q.write_desc(10, HDR, 16, 1, 11);
        q.write_desc(11, DATA, 512, 1 | 2, 10);
        q.publish(10);
        // Head index beyond the table breaks the queue.
        q.publish(200);
        let (ctx, _events, _line, irq) = activate_context(&mem, &[&q]);
        blk.activate(ctx).unwrap();
        q.wait_used(4);
        assert_eq!(q.used_elem(0).1, 0);
        assert_eq!(q.used_elem(1).1, 1);
        assert_eq!(q.used_elem(2).1, 0);
        assert_eq!(q.used_elem(3).1, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !irq.needs_reset() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        blk.reset();
    }
}
