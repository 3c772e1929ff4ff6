//! Descriptor chains turned into checked segment lists, and I/O between them and host fds.
//!
//! A split-ring descriptor chain is guest-written data: indices, addresses, lengths and flags may
//! all be hostile. [`walk_chain`] follows it itself (rather than trusting an iterator that stops
//! silently) and fails with a [`ChainError`] on a loop, an index out of the table, a nested or
//! malformed indirect table, a readable descriptor after a writable one, a buffer outside guest
//! memory or a total length that overflows. What it returns, a [`Chain`], only describes memory
//! that exists, so devices can copy to and from it without further checks.
//!
//! The I/O helpers move bytes between guest buffers and host fds with `pread`/`pwrite`/`recv`/
//! `send` straight on the mapped guest pages: no bounce buffer on the data path.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// Descriptor flag: the chain continues at `next`.
const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of further descriptors.
const DESC_F_INDIRECT: u16 = 4;
/// Size of one split-ring descriptor in bytes.
const DESC_SIZE: u64 = 16;
/// The largest indirect table we follow, in descriptors (virtio 1.2, 2.7.5.3.1 bounds it by the
/// queue size for a conforming driver; this is a hard cap on what we read regardless).
const MAX_INDIRECT_DESCS: u32 = 1024;

/// Why a descriptor chain was rejected.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// A descriptor index points outside its table.
    #[error("descriptor index {index} is outside a table of {size} entries")]
    IndexOutOfRange {
        /// The offending index.
        index: u16,
        /// Entries in the table.
        size: u32,
    },
    /// The chain is longer than the table, i.e. it loops, or longer than the device allows.
    #[error("descriptor chain longer than {max} descriptors (loop?)")]
    TooLong {
        /// The limit that was exceeded.
        max: u32,
    },
    /// The descriptor table itself cannot be read.
    #[error("descriptor table entry at {gpa:#x} is not in guest memory")]
    TableUnreadable {
        /// Guest physical address of the entry.
        gpa: u64,
    },
    /// An indirect descriptor is malformed (nested, inside a chain, bad length).
    #[error("invalid indirect descriptor table at {gpa:#x} of {len} bytes")]
    BadIndirect {
        /// Guest physical address of the table.
        gpa: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {gpa:#x}+{len:#x} is outside guest memory")]
    BufferOutOfRange {
        /// Guest physical address of the buffer.
        gpa: u64,
        /// Its length in bytes.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one (virtio 1.2, 2.7.4.2).
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// The buffers add up to more than 4 GiB (virtio 1.2, 2.7.5.2).
    #[error("descriptor chain longer than 4 GiB in total")]
    TotalOverflow,
}

/// One contiguous guest buffer, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub gpa: GuestAddress,
    /// Length in bytes, never zero.
    pub len: u32,
}

/// An ordered list of guest buffers read (or written) as one byte stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segments {
    segs: Vec<Segment>,
    total: u32,
}

/// A walked descriptor chain: its head index and its readable then writable buffers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor, to return in the used ring.
    pub head: u16,
    /// Buffers the device reads, in order.
    pub readable: Segments,
    /// Buffers the device writes, in order.
    pub writable: Segments,
}

#[derive(Clone, Copy)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn read_desc(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    index: u16,
) -> Result<RawDesc, ChainError> {
    let gpa = table
        .checked_add(u64::from(index) * DESC_SIZE)
        .ok_or(ChainError::TableUnreadable { gpa: u64::MAX })?;
    let mut raw = [0u8; 16];
    mem.read_slice(&mut raw, gpa)
        .map_err(|_| ChainError::TableUnreadable {
            gpa: gpa.raw_value(),
        })?;
    let [
        a0,
        a1,
        a2,
        a3,
        a4,
        a5,
        a6,
        a7,
        l0,
        l1,
        l2,
        l3,
        f0,
        f1,
        n0,
        n1,
    ] = raw;
    Ok(RawDesc {
        addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
        len: u32::from_le_bytes([l0, l1, l2, l3]),
        flags: u16::from_le_bytes([f0, f1]),
        next: u16::from_le_bytes([n0, n1]),
    })
}

/// Follows the chain starting at `head` in the descriptor table at `table` of `queue_size`
/// entries, accepting at most `max_descs` buffers in total.
///
/// # Errors
///
/// A [`ChainError`] naming the first thing wrong with the chain; nothing is read from the
/// buffers themselves.
pub fn walk_chain(
    mem: &GuestMemoryMmap,
    table: GuestAddress,
    queue_size: u16,
    head: u16,
    max_descs: u32,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        readable: Segments::default(),
        writable: Segments::default(),
    };
    let mut cur_table = table;
    let mut cur_size = u32::from(queue_size);
    let mut index = head;
    let mut in_indirect = false;
    // Loop guard: a chain can visit each entry of its table at most once.
    let mut steps_left = cur_size;
    let mut descs = 0u32;
    loop {
        if u32::from(index) >= cur_size {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: cur_size,
            });
        }
        if steps_left == 0 {
            return Err(ChainError::TooLong { max: cur_size });
        }
        steps_left -= 1;
        let desc = read_desc(mem, cur_table, index)?;
        if desc.flags & DESC_F_INDIRECT != 0 {
            // virtio 1.2, 2.7.5.3.1: no nested tables, and INDIRECT and NEXT are exclusive.
            let bad = ChainError::BadIndirect {
                gpa: desc.addr,
                len: desc.len,
            };
            if in_indirect || desc.flags & DESC_F_NEXT != 0 || desc.len == 0 {
                return Err(bad);
            }
            if u64::from(desc.len) % DESC_SIZE != 0 {
                return Err(bad);
            }
            let entries =
                u32::try_from(u64::from(desc.len) / DESC_SIZE).map_err(|_| bad.clone())?;
            if entries > MAX_INDIRECT_DESCS {
                return Err(bad);
            }
            if !mem.check_range(GuestAddress(desc.addr), desc.len as usize) {
                return Err(bad);
            }
            cur_table = GuestAddress(desc.addr);
            cur_size = entries;
            steps_left = entries;
            index = 0;
            in_indirect = true;
            continue;
        }
        descs += 1;
        if descs > max_descs {
            return Err(ChainError::TooLong { max: max_descs });
        }
        if desc.len > 0 {
            // usize is at least 32 bits on every supported host.
            if !mem.check_range(GuestAddress(desc.addr), desc.len as usize) {
                return Err(ChainError::BufferOutOfRange {
                    gpa: desc.addr,
                    len: desc.len,
                });
            }
            let seg = Segment {
                gpa: GuestAddress(desc.addr),
                len: desc.len,
            };
            if desc.flags & DESC_F_WRITE != 0 {
                chain.writable.push(seg)?;
            } else {
                if !chain.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable.push(seg)?;
            }
            chain
                .readable
                .total
                .checked_add(chain.writable.total)
                .ok_or(ChainError::TotalOverflow)?;
        }
        if desc.flags & DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next;
    }
}

impl Segments {
    /// Builds a list from segments already known to be inside guest memory (tests and callers
    /// that checked the ranges).
    ///
    /// # Errors
    ///
    /// [`ChainError::TotalOverflow`] when the lengths add up to more than `u32::MAX`.
    pub fn from_segments(segs: &[Segment]) -> Result<Self, ChainError> {
        let mut out = Self::default();
        for seg in segs {
            out.push(*seg)?;
        }
        Ok(out)
    }

    fn push(&mut self, seg: Segment) -> Result<(), ChainError> {
        self.total = self
            .total
            .checked_add(seg.len)
            .ok_or(ChainError::TotalOverflow)?;
        self.segs.push(seg);
        Ok(())
    }

    /// Total length in bytes.
    pub fn len(&self) -> u32 {
        self.total
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Calls `f` with the guest memory slices covering `len` bytes from byte `offset` of the list,
    /// in order, until `f` returns less than the slice length or an error. Returns the bytes `f`
    /// reported as done.
    ///
    /// # Errors
    ///
    /// The first error of `f`, unless some bytes were done before it (then the count).
    pub fn for_each_slice<F>(
        &self,
        mem: &GuestMemoryMmap,
        offset: u32,
        len: u32,
        mut f: F,
    ) -> io::Result<usize>
    where
        F: FnMut(&VolatileSlice<'_>) -> io::Result<usize>,
    {
        let mut skip = offset;
        let mut left = len;
        let mut done = 0usize;
        for seg in &self.segs {
            if left == 0 {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let take = (seg.len - skip).min(left);
            let start = seg.gpa.unchecked_add(u64::from(skip));
            skip = 0;
            let slices = mem.get_slices(start, take as usize);
            for slice in slices {
                let slice = slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let want = slice.len();
                match f(&slice) {
                    Ok(n) => {
                        done += n.min(want);
                        if n < want {
                            return Ok(done);
                        }
                    }
                    Err(e) if done > 0 => {
                        let _ = e;
                        return Ok(done);
                    }
                    Err(e) => return Err(e),
                }
            }
            left -= take;
        }
        Ok(done)
    }

    /// The guest memory slices covering `len` bytes from byte `offset` of the list, in order
    /// (fewer bytes when the list is shorter). The same walk as [`Self::for_each_slice`], which
    /// stays a loop of its own: it runs for every vsock packet and builds no list.
    ///
    /// # Errors
    ///
    /// A segment outside guest memory.
    pub fn slices<'m>(
        &self,
        mem: &'m GuestMemoryMmap,
        offset: u32,
        len: u32,
    ) -> io::Result<Vec<VolatileSlice<'m>>> {
        let mut out = Vec::with_capacity(self.segs.len());
        let mut skip = offset;
        let mut left = len;
        for seg in &self.segs {
            if left == 0 {
                break;
            }
            if skip >= seg.len {
                skip -= seg.len;
                continue;
            }
            let take = (seg.len - skip).min(left);
            let start = seg.gpa.unchecked_add(u64::from(skip));
            skip = 0;
            for slice in mem.get_slices(start, take as usize) {
                out.push(slice.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?);
            }
            left -= take;
        }
        Ok(out)
    }

    /// Copies bytes from `src` into the guest buffers starting at byte `offset`; returns how
    /// many fit.
    pub fn write_bytes(&self, mem: &GuestMemoryMmap, offset: u32, src: &[u8]) -> usize {
        let len = u32::try_from(src.len()).unwrap_or(u32::MAX);
        let mut pos = 0usize;
        let res = self.for_each_slice(mem, offset, len, |slice| {
            let part = src.get(pos..).unwrap_or_default();
            slice.copy_from(part);
            let n = slice.len().min(part.len());
            pos += n;
            Ok(n)
        });
        res.unwrap_or(pos)
    }

    /// Copies guest bytes starting at byte `offset` into `dst`; returns how many were there.
    pub fn read_bytes(&self, mem: &GuestMemoryMmap, offset: u32, dst: &mut [u8]) -> usize {
        let len = u32::try_from(dst.len()).unwrap_or(u32::MAX);
        let mut pos = 0usize;
        let res = self.for_each_slice(mem, offset, len, |slice| {
            let part = dst.get_mut(pos..).unwrap_or_default();
            let n = slice.copy_to(part);
            pos += n;
            Ok(n)
        });
        res.unwrap_or(pos)
    }
}

fn cvt(ret: libc::ssize_t) -> io::Result<usize> {
    usize::try_from(ret).map_err(|_| io::Error::last_os_error())
}

/// Reads from `fd` at file `offset` into guest memory, retrying on `EINTR`.
///
/// # Errors
///
/// The OS error of `pread(2)`.
pub fn pread_into(fd: &impl AsRawFd, slice: &VolatileSlice<'_>, offset: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let guard = slice.ptr_guard_mut();
    loop {
        // SAFETY: the pointer and length describe mapped guest memory that `slice` keeps alive
        // for this call; the kernel writes at most `slice.len()` bytes there.
        let ret = unsafe { libc::pread(fd.as_raw_fd(), guard.as_ptr().cast(), slice.len(), off) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Which way [`file_io_vectored`] moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the file into guest memory (`preadv`).
    FileToGuest,
    /// From guest memory to the file (`pwritev`).
    GuestToFile,
}

/// Moves bytes between `fd` at file `offset` and the guest memory `slices`, in order, with as
/// few `preadv`/`pwritev` calls as the kernel allows (one for a whole request, usually,
/// instead of one per page-sized buffer). Retries on `EINTR` and after short transfers; stops
/// early only at end of file. Returns the bytes moved.
///
/// # Errors
///
/// The OS error of `preadv(2)`/`pwritev(2)`; `WriteZero` when a write makes no progress.
pub fn file_io_vectored(
    fd: &impl AsRawFd,
    slices: &[VolatileSlice<'_>],
    offset: u64,
    dir: Direction,
) -> io::Result<usize> {
    // At most this many buffers per call (Linux's UIO_MAXIOV).
    const MAX_IOV: usize = 1024;
    let guards: Vec<_> = slices.iter().map(VolatileSlice::ptr_guard_mut).collect();
    let mut iovs: Vec<libc::iovec> = guards
        .iter()
        .zip(slices)
        .map(|(g, s)| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: s.len(),
        })
        .filter(|iov| iov.iov_len > 0)
        .collect();
    let total: usize = iovs.iter().map(|iov| iov.iov_len).sum();
    let mut done = 0usize;
    let mut first = 0usize;
    while done < total {
        let off = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let batch = iovs.get(first..).unwrap_or_default();
        let count = batch.len().min(MAX_IOV);
        // SAFETY: every iovec describes mapped guest memory that `guards` keeps alive for this
        // call; the kernel reads or writes at most each iovec's length there.
        let ret = unsafe {
            let count = libc::c_int::try_from(count).unwrap_or(libc::c_int::MAX);
            match dir {
                Direction::FileToGuest => libc::preadv(fd.as_raw_fd(), batch.as_ptr(), count, off),
                Direction::GuestToFile => libc::pwritev(fd.as_raw_fd(), batch.as_ptr(), count, off),
            }
        };
        let n = match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(0) if dir == Direction::FileToGuest => break,
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
        };
        done += n;
        // Skip the buffers this call filled and trim the one it stopped inside.
        let mut left = n;
        while left > 0 {
            let Some(iov) = iovs.get_mut(first) else {
                break;
            };
            if left >= iov.iov_len {
                left -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: `left` is less than this iovec's length, so the new base stays
                // inside the same guest memory buffer.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(left).cast() };
                iov.iov_len -= left;
                left = 0;
            }
        }
    }
    Ok(done)
}

/// Writes guest memory to `fd` at file `offset`, retrying on `EINTR`.
///
/// # Errors
///
/// The OS error of `pwrite(2)`.
pub fn pwrite_from(fd: &impl AsRawFd, slice: &VolatileSlice<'_>, offset: u64) -> io::Result<usize> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let guard = slice.ptr_guard();
    loop {
        // SAFETY: the pointer and length describe mapped guest memory that `slice` keeps alive
        // for this call; the kernel only reads it.
        let ret = unsafe { libc::pwrite(fd.as_raw_fd(), guard.as_ptr().cast(), slice.len(), off) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Reads from a (non-blocking) stream fd into guest memory, retrying on `EINTR`.
///
/// # Errors
///
/// The OS error of `read(2)`, `WouldBlock` included.
pub fn read_into(fd: RawFd, slice: &VolatileSlice<'_>) -> io::Result<usize> {
    let guard = slice.ptr_guard_mut();
    loop {
        // SAFETY: the pointer and length describe mapped guest memory that `slice` keeps alive
        // for this call; the kernel writes at most `slice.len()` bytes there.
        let ret = unsafe { libc::read(fd, guard.as_ptr().cast(), slice.len()) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Sends guest memory on a (non-blocking) stream socket without raising `SIGPIPE`, retrying on
/// `EINTR`.
///
/// # Errors
///
/// The OS error of `send(2)`, `WouldBlock` and `BrokenPipe` included.
pub fn send_from(fd: RawFd, slice: &VolatileSlice<'_>) -> io::Result<usize> {
    let guard = slice.ptr_guard();
    send_raw(fd, guard.as_ptr(), slice.len())
}

/// Sends host bytes on a (non-blocking) stream socket without raising `SIGPIPE`.
///
/// # Errors
///
/// The OS error of `send(2)`.
pub fn send_bytes(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    send_raw(fd, buf.as_ptr(), buf.len())
}

#[cfg(target_os = "linux")]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
// macOS has no MSG_NOSIGNAL; sockets there get SO_NOSIGPIPE when they are set up.
#[cfg(not(target_os = "linux"))]
const SEND_FLAGS: libc::c_int = 0;

fn send_raw(fd: RawFd, ptr: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: callers pass a pointer valid for reads of `len` bytes (a live guest slice or a
        // host buffer) for the duration of the call.
        let ret = unsafe { libc::send(fd, ptr.cast(), len, SEND_FLAGS) };
        match cvt(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Reads a little-endian `u16` from guest memory with acquire ordering.
pub(crate) fn load_u16(mem: &GuestMemoryMmap, gpa: GuestAddress) -> Option<u16> {
    mem.load::<u16>(gpa, Ordering::Acquire)
        .ok()
        .map(u16::from_le)
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test values are small")]
mod tests {
    use super::*;
    use crate::virtio::testing::{MockQueue, test_memory};

    fn temp_file(tag: &str, bytes: &[u8]) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("squib-chain-{tag}-{}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    #[test]
    fn test_file_io_vectored_fills_scattered_slices_in_order() {
        let mem = test_memory();
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
        let f = temp_file("read", &data);
        // Three buffers in reverse address order, of odd sizes, read from file offset 100.
        let segs = Segments::from_segments(&[
            Segment {
                gpa: GuestAddress(0x30_0000),
                len: 4096,
            },
            Segment {
                gpa: GuestAddress(0x20_0000),
                len: 1000,
            },
            Segment {
                gpa: GuestAddress(0x10_0000),
                len: 3,
            },
        ])
        .unwrap();
        let slices = segs.slices(&mem, 0, segs.len()).unwrap();
        let n = file_io_vectored(&f, &slices, 100, Direction::FileToGuest).unwrap();
        assert_eq!(n, 5099);
        let mut got = vec![0u8; 5099];
        assert_eq!(segs.read_bytes(&mem, 0, &mut got), 5099);
        assert_eq!(got, &data[100..5199]);
        // From an offset into the list, and past the end of the file: a short count.
        let slices = segs.slices(&mem, 4000, 1099).unwrap();
        let n = file_io_vectored(&f, &slices, 19_500, Direction::FileToGuest).unwrap();
        assert_eq!(n, 500);
    }

    #[test]
    fn test_file_io_vectored_batches_more_buffers_than_one_call_takes() {
        let mem = test_memory();
        // 1500 buffers of 7 bytes, 16 bytes apart: more than the 1024 one call accepts.
        let segs: Vec<Segment> = (0..1500u64)
            .map(|i| Segment {
                gpa: GuestAddress(0x40_0000 + i * 16),
                len: 7,
            })
            .collect();
        let segs = Segments::from_segments(&segs).unwrap();
        let src: Vec<u8> = (0..10_500u32).map(|i| (i % 241) as u8).collect();
        assert_eq!(segs.write_bytes(&mem, 0, &src), 10_500);
        let f = temp_file("write", &[]);
        let slices = segs.slices(&mem, 0, segs.len()).unwrap();
        let n = file_io_vectored(&f, &slices, 3, Direction::GuestToFile).unwrap();
        assert_eq!(n, 10_500);
        let mut on_disk = Vec::new();
        std::io::Read::read_to_end(&mut &f, &mut on_disk).unwrap();
        assert_eq!(on_disk.len(), 10_503);
        assert_eq!(&on_disk[3..], &src[..]);
    }

    #[test]
    fn test_slices_refuses_a_segment_outside_memory() {
        let mem = test_memory();
        let segs = Segments::from_segments(&[Segment {
            gpa: GuestAddress(u64::MAX - 10),
            len: 100,
        }])
        .unwrap();
        assert!(segs.slices(&mem, 0, 100).is_err());
    }

    #[test]
    fn test_walk_chain_splits_readable_and_writable() {
        let mem = test_memory();
        let mut q = MockQueue::new(&mem, 16);
        let head = q.add_chain(&[
            (0x10_0000, 16, false),
            (0x10_1000, 512, true),
            (0x10_2000, 1, true),
        ]);
        let chain = walk_chain(&mem, q.desc_table(), 16, head, 16).unwrap();
        assert_eq!(chain.readable.len(), 16);
        assert_eq!(chain.writable.len(), 513);
    }

    #[test]
    fn test_walk_chain_rejects_loop() {
        let mem = test_memory();
        let q = MockQueue::new(&mem, 8);
        q.write_desc(0, 0x10_0000, 4, DESC_F_NEXT, 1);
        q.write_desc(1, 0x10_0000, 4, DESC_F_NEXT, 0);
        assert_eq!(
            walk_chain(&mem, q.desc_table(), 8, 0, 64),
            Err(ChainError::TooLong { max: 8 })
        );
    }

    #[test]
    fn test_walk_chain_rejects_out_of_range_buffer_and_index() {
        let mem = test_memory();
        let q = MockQueue::new(&mem, 8);
        q.write_desc(0, 0xffff_ffff_ffff_fff0, 0x100, 0, 0);
        assert!(matches!(
            walk_chain(&mem, q.desc_table(), 8, 0, 8),
            Err(ChainError::BufferOutOfRange { .. })
        ));
        // Straddles the end of guest memory.
        q.write_desc(1, crate::virtio::testing::MEM_SIZE - 8, 16, 0, 0);
        assert!(matches!(
            walk_chain(&mem, q.desc_table(), 8, 1, 8),
            Err(ChainError::BufferOutOfRange { .. })
        ));
        q.write_desc(2, 0x10_0000, 4, DESC_F_NEXT, 9);
        assert_eq!(
            walk_chain(&mem, q.desc_table(), 8, 2, 8),
            Err(ChainError::IndexOutOfRange { index: 9, size: 8 })
        );
        assert_eq!(
            walk_chain(&mem, q.desc_table(), 8, 8, 8),
            Err(ChainError::IndexOutOfRange { index: 8, size: 8 })
        );
    }

    #[test]
    fn test_walk_chain_rejects_readable_after_writable_and_overflow() {
        let mem = test_memory();
        let q = MockQueue::new(&mem, 8);
        q.write_desc(0, 0x10_0000, 4, DESC_F_NEXT | DESC_F_WRITE, 1);
        q.write_desc(1, 0x10_0000, 4, 0, 0);
        assert_eq!(
            walk_chain(&mem, q.desc_table(), 8, 0, 8),
            Err(ChainError::ReadableAfterWritable)
        );
        // Two buffers whose lengths overflow u32 (both inside guest memory is impossible, so
        // the range check fires first: either way the chain is refused).
        q.write_desc(2, 0x10_0000, u32::MAX, DESC_F_NEXT, 3);
        q.write_desc(3, 0x10_0000, 2, 0, 0);
        assert!(walk_chain(&mem, q.desc_table(), 8, 2, 8).is_err());
    }

    #[test]
    fn test_walk_chain_skips_zero_length_and_caps_descriptors() {
        let mem = test_memory();
        let q = MockQueue::new(&mem, 8);
        q.write_desc(0, 0x10_0000, 0, DESC_F_NEXT, 1);
        q.write_desc(1, 0x10_0000, 4, DESC_F_NEXT, 2);
        q.write_desc(2, 0x10_0000, 4, 0, 0);
        let chain = walk_chain(&mem, q.desc_table(), 8, 0, 8).unwrap();
        assert_eq!(chain.readable.len(), 8);
        assert_eq!(
            walk_chain(&mem, q.desc_table(), 8, 0, 2),
            Err(ChainError::TooLong { max: 2 })
        );
    }

    #[test]
    fn test_walk_chain_follows_indirect_and_refuses_nesting() {
        let mem = test_memory();
        let q = MockQueue::new(&mem, 8);
        let table = GuestAddress(0x20_0000);
        let write_at = |t: GuestAddress, i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, t.unchecked_add(i * 16)).unwrap();
        };
        write_at(table, 0, 0x10_0000, 16, DESC_F_NEXT, 1);
        write_at(table, 1, 0x10_1000, 32, DESC_F_WRITE, 0);
        q.write_desc(0, table.0, 32, DESC_F_INDIRECT, 0);
        let chain = walk_chain(&mem, q.desc_table(), 8, 0, 8).unwrap();
        assert_eq!((chain.readable.len(), chain.writable.len()), (16, 32));

        write_at(table, 1, table.0, 32, DESC_F_INDIRECT, 0);
        assert!(matches!(
            walk_chain(&mem, q.desc_table(), 8, 0, 8),
            Err(ChainError::BadIndirect { .. })
        ));
        q.write_desc(1, table.0, 31, DESC_F_INDIRECT, 0);
        assert!(matches!(
            walk_chain(&mem, q.desc_table(), 8, 1, 8),
            Err(ChainError::BadIndirect { .. })
        ));
        // An indirect table looping onto itself.
        write_at(table, 0, 0x10_0000, 16, DESC_F_NEXT, 1);
        write_at(table, 1, 0x10_1000, 32, DESC_F_NEXT, 0);
        assert_eq!(
            walk_chain(&mem, q.desc_table(), 8, 0, 8),
            Err(ChainError::TooLong { max: 2 })
        );
    }

    #[test]
    fn test_segments_copy_across_boundaries() {
        let mem = test_memory();
        let segs = Segments::from_segments(&[
            Segment {
                gpa: GuestAddress(0x10_0000),
                len: 3,
            },
            Segment {
                gpa: GuestAddress(0x10_1000),
                len: 5,
            },
        ])
        .unwrap();
        assert_eq!(segs.write_bytes(&mem, 1, b"abcdefghij"), 7);
        let mut out = [0u8; 8];
        assert_eq!(segs.read_bytes(&mem, 0, &mut out), 8);
        assert_eq!(&out[1..], b"abcdefg");
        let mut out = [0u8; 3];
        assert_eq!(segs.read_bytes(&mem, 6, &mut out), 2);
        assert_eq!(&out[..2], b"fg");
    }

    #[test]
    fn test_walk_chain_never_panics_on_random_tables() {
        use crate::virtio::testing::{MEM_SIZE, XorShift};
        let mem = test_memory();
        let q = MockQueue::new(&mem, 64);
        let mut rng = XorShift(0x0dd_ba11_cafe_f00d);
        for _ in 0..2_000 {
            for i in 0..64u16 {
                let addr = match rng.below(4) {
                    0 => rng.next(),
                    _ => rng.below(MEM_SIZE),
                };
                let len = match rng.below(4) {
                    0 => rng.next() as u32,
                    _ => rng.below(0x2000) as u32,
                };
                let flags = rng.below(8) as u16;
                let next = rng.below(80) as u16;
                q.write_desc(i, addr, len, flags, next);
            }
            let head = rng.below(70) as u16;
            let max = rng.below(70) as u32;
            if let Ok(chain) = walk_chain(&mem, q.desc_table(), 64, head, max) {
                for seg in chain.readable.segs.iter().chain(&chain.writable.segs) {
                    assert!(mem.check_range(seg.gpa, seg.len as usize));
                }
                assert!(chain.readable.segs.len() + chain.writable.segs.len() <= max as usize);
            }
        }
    }
}
