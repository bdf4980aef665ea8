//! Every `unsafe` block of the crate lives in this module, each with the invariant it relies
//! on. Everything exported from here is a safe interface; the module itself is private, and
//! only [`AlignedBuf`] (at the crate root) and the types [`crate::rawio`] hands out reach the
//! public API:
//!
//! * [`AlignedBuf`]: an owned, zero-initialised heap buffer with a chosen power-of-two
//!   alignment (what O_DIRECT needs).
//! * [`Ring`]: an io_uring instance bound to one file that owns its I/O buffers. The kernel
//!   only ever reads or writes memory owned by the ring, a buffer handed to the kernel cannot be
//!   touched until its completion has been reaped, and if the ring breaks with I/O still in
//!   flight the buffers are leaked rather than freed.
//! * Device probing ([`probe_file`]), preallocation ([`preallocate`]) and f16 views of bytes.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::ptr::NonNull;
use std::sync::Arc;

use half::f16;
use io_uring::{opcode, squeue, types, IoUring};

#[cfg(target_endian = "big")]
compile_error!(
    "csd-engine stores little-endian f16 and reinterprets it in place; big-endian hosts are not supported"
);

// ---------------------------------------------------------------------------------------------
// Aligned buffers
// ---------------------------------------------------------------------------------------------

/// An owned, zero-initialised, aligned heap buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); no interior mutability.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only hand out `&[u8]`, which is `Sync`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two). Panics only if
    /// `align` is not a power of two (a programming error) and aborts on allocation failure,
    /// like `Vec`.
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        // Never allocate zero bytes (undefined for the global allocator).
        let size = len.max(1).next_multiple_of(align);
        let layout = Layout::from_size_align(size, align).expect("buffer size overflows isize");
        // SAFETY: `layout` has a non-zero size (at least `align` bytes).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// Visible length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the visible length is zero.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Alignment of the allocation in bytes.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// Capacity of the allocation (a multiple of the alignment, at least `len`).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The visible bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size() >= len` initialised (zeroed at allocation)
        // bytes that we own; the shared borrow of `self` prevents mutation for the lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The visible bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of `self` makes this the only
        // reference to the memory for its lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Change the visible length within the existing capacity (contents are kept; bytes
    /// beyond the old length hold whatever was written there before, initially zero).
    /// Returns false (and changes nothing) if `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.layout.size() {
            return false;
        }
        self.len = len;
        true
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed only here.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// f16 views
// ---------------------------------------------------------------------------------------------

/// View little-endian f16 bytes as `f16` values without copying. `None` if `bytes` is not
/// 2-byte aligned or has an odd length.
pub(crate) fn bytes_as_f16(bytes: &[u8]) -> Option<&[f16]> {
    if bytes.len() % 2 != 0 || bytes.as_ptr().align_offset(std::mem::align_of::<f16>()) != 0 {
        return None;
    }
    // SAFETY: `f16` is `repr(transparent)` over `u16` (size 2, align 2), every bit pattern is a
    // valid `f16`, the pointer is 2-aligned (checked above) and the length covers exactly
    // `bytes.len()` bytes of the borrowed slice; the host is little-endian (compile-time check
    // above), matching the on-disk byte order.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f16>(), bytes.len() / 2) })
}

/// View `f16` values as their little-endian bytes without copying.
pub(crate) fn f16_as_bytes(values: &[f16]) -> &[u8] {
    // SAFETY: any initialised memory may be read as bytes; `u8` has alignment 1 and the length
    // is exactly the byte size of `values`; the host is little-endian (compile-time check).
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

// ---------------------------------------------------------------------------------------------
// Device probing and preallocation
// ---------------------------------------------------------------------------------------------

/// What the kernel tells us about a store file or block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileProbe {
    /// Whether it is a block device (else a regular file).
    pub is_block_device: bool,
    /// Logical block size: the O_DIRECT offset/length granularity (512 or 4096 typically).
    pub logical_block: u32,
    /// Memory alignment O_DIRECT needs for user buffers.
    pub mem_align: u32,
    /// Size in bytes (file length, or the block device's capacity).
    pub size: u64,
}

const BLKSSZGET: libc::c_ulong = 0x1268; // _IO(0x12, 104)
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272; // _IOR(0x12, 114, size_t)

/// Probe the direct-I/O geometry of an open file or block device.
pub(crate) fn probe_file(file: &File) -> io::Result<FileProbe> {
    let meta = file.metadata()?;
    let fd = file.as_raw_fd();
    if meta.file_type().is_block_device() {
        let mut lbs: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one `int` through the pointer, which points to a live local.
        let rc = unsafe { libc::ioctl(fd, BLKSSZGET as _, &mut lbs as *mut libc::c_int) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one `u64` through the pointer, which points to a live local.
        let rc = unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let lbs = u32::try_from(lbs).unwrap_or(512).max(512);
        return Ok(FileProbe {
            is_block_device: true,
            logical_block: lbs,
            mem_align: lbs,
            size,
        });
    }
    // Regular file: ask statx for the direct-I/O alignment (Linux 6.1+); older kernels or
    // filesystems that do not report it fall back to the filesystem block size.
    let (mut logical, mut mem_align) = (0u32, 0u32);
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `fd` is open for the duration of the call, `empty` is a NUL-terminated string
    // (AT_EMPTY_PATH makes the kernel use `fd` itself) and `stx` is a live, writable struct.
    let rc = unsafe {
        libc::statx(
            fd,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        logical = stx.stx_dio_offset_align;
        mem_align = stx.stx_dio_mem_align;
    }
    if logical == 0 {
        use std::os::unix::fs::MetadataExt;
        logical = u32::try_from(meta.blksize())
            .unwrap_or(4096)
            .clamp(512, 65536);
    }
    let mem_align = mem_align.max(logical).max(512);
    Ok(FileProbe {
        is_block_device: false,
        logical_block: logical,
        mem_align,
        size: meta.len(),
    })
}

/// Whether the file lives on a memory filesystem (tmpfs/ramfs), where "direct" I/O would
/// still be page-cache I/O.
pub(crate) fn on_memory_fs(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: `statfs` is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration of the call and `st` is a live, writable struct.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    rc == 0 && matches!(st.f_type as i64, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Allocate `len` bytes of backing store for a regular file (no-op if already that long and
/// allocated). Falls back to extending the length when the filesystem has no fallocate.
/// Bytes an unprivileged user may still allocate on the filesystem that holds `dir`.
pub(crate) fn available_bytes(dir: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `statvfs` is plain old data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is a valid, writable
    // statvfs the kernel fills.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

pub(crate) fn preallocate(file: &File, len: u64) -> io::Result<()> {
    let off_len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "store size too large"))?;
    // SAFETY: plain syscall on an open descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, off_len) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
            if file.metadata()?.len() < len {
                file.set_len(len)?;
            }
            Ok(())
        }
        _ => Err(err),
    }
}

// ---------------------------------------------------------------------------------------------
// io_uring
// ---------------------------------------------------------------------------------------------

/// One reaped completion.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// The ring buffer the operation used; readable again now.
    pub buf: u16,
    /// Bytes transferred, or a negated errno.
    pub result: i32,
}

/// Errors from queueing an operation on an io_uring queue (a [`crate::rawio::RawQueue`], or
/// the rings of the store's io_uring device).
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The buffer index is out of range, or the buffer is in flight.
    #[error("ring buffer {0} does not exist or is still owned by the kernel")]
    BufferBusy(u16),
    /// The request is longer than its buffer (or its tag does not fit in 48 bits).
    #[error("request of {len} bytes exceeds the ring buffer size {cap}")]
    TooLong {
        /// Bytes asked for.
        len: usize,
        /// Bytes the buffer holds.
        cap: usize,
    },
    /// An earlier wait failed; the ring takes no more work.
    #[error("io_uring is broken after an earlier failure; buffers with I/O in flight were leaked")]
    Broken,
    /// The kernel refused a submission.
    #[error("io_uring submit failed: {0}")]
    Submit(#[source] io::Error),
}

/// How a [`Ring`] is set up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RingOptions {
    /// Try to register the buffers with the kernel (fixed buffers).
    pub register_buffers: bool,
    /// Try to register the file (fixed file).
    pub register_file: bool,
    /// The ring is only ever used by the thread that first submits on it: lets the kernel
    /// run completion work in that thread's waits (IORING_SETUP_SINGLE_ISSUER |
    /// DEFER_TASKRUN). Do not set it for a ring shared between threads.
    pub single_issuer: bool,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            register_buffers: true,
            register_file: true,
            single_issuer: false,
        }
    }
}

/// An io_uring bound to one file, with a pool of aligned buffers it owns (registered with the
/// kernel as fixed buffers when allowed). Not `Sync`; wrap it in a `Mutex` to share.
pub(crate) struct Ring {
    // Field order matters: the ring is dropped (and closed) before the buffers are freed.
    ring: IoUring,
    file: Arc<File>,
    fixed_file: bool,
    registered: bool,
    bufs: Vec<AlignedBuf>,
    busy: Vec<bool>,
    in_flight: usize,
    broken: bool,
    /// Fault injection: the next submission fails as the kernel's refusal would.
    fail_next_submit: bool,
}

impl Ring {
    /// A ring of `depth` entries for `file` with `nbufs` buffers of `buf_size` bytes, aligned
    /// to `align`. Fails if the kernel refuses io_uring (ENOSYS, EPERM under seccomp, ...).
    pub fn new(
        file: Arc<File>,
        depth: u32,
        nbufs: usize,
        buf_size: usize,
        align: usize,
    ) -> io::Result<Ring> {
        Ring::with_options(file, depth, nbufs, buf_size, align, RingOptions::default())
    }

    /// As [`Ring::new`], with explicit [`RingOptions`].
    pub fn with_options(
        file: Arc<File>,
        depth: u32,
        nbufs: usize,
        buf_size: usize,
        align: usize,
        opts: RingOptions,
    ) -> io::Result<Ring> {
        let nbufs = nbufs.clamp(1, u16::MAX as usize);
        let entries = depth.max(1).next_power_of_two();
        // Cooperative task running (5.19+) saves an interrupt per completion batch; a ring
        // used by one thread only can also defer completion work to its own waits (6.1+).
        // Older kernels refuse the flags: fall back to a plain ring.
        let mut b = IoUring::builder();
        b.setup_coop_taskrun();
        if opts.single_issuer {
            b.setup_single_issuer().setup_defer_taskrun();
        }
        let ring = match b.build(entries) {
            Ok(r) => r,
            Err(_) => IoUring::new(entries)?,
        };
        let mut bufs: Vec<AlignedBuf> = (0..nbufs)
            .map(|_| AlignedBuf::new(buf_size, align))
            .collect();
        let iovecs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.capacity(),
            })
            .collect();
        // SAFETY: every iovec describes a live allocation owned by `bufs`, which the `Ring`
        // keeps (never reallocating or freeing it) until after `ring` is dropped, which
        // unregisters the buffers. Fixed-buffer operations are only issued with the index of a
        // buffer in this table.
        let registered =
            opts.register_buffers && unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        let fixed_file =
            opts.register_file && ring.submitter().register_files(&[file.as_raw_fd()]).is_ok();
        Ok(Ring {
            ring,
            file,
            fixed_file,
            registered,
            busy: vec![false; bufs.len()],
            bufs,
            in_flight: 0,
            broken: false,
            fail_next_submit: false,
        })
    }

    /// Whether the buffers are registered (fixed buffers: no per-I/O page pinning).
    pub fn registered_buffers(&self) -> bool {
        self.registered
    }

    /// Number of buffers.
    pub fn buffer_count(&self) -> usize {
        self.bufs.len()
    }

    /// Operations queued or in flight whose completions have not been reaped.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether an earlier wait failed (the ring takes no more work).
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Fault injection for tests: make the next submission fail as a kernel refusal does
    /// (the ring is broken from then on).
    pub fn fail_next_submit(&mut self) {
        self.fail_next_submit = true;
    }

    /// Buffer `i` for reading, unless the kernel owns it.
    pub fn buf(&self, i: u16) -> Option<&[u8]> {
        let i = usize::from(i);
        (i < self.bufs.len() && !self.busy[i]).then(|| self.bufs[i].as_slice())
    }

    /// Buffer `i` for writing, unless the kernel owns it.
    pub fn buf_mut(&mut self, i: u16) -> Option<&mut [u8]> {
        let i = usize::from(i);
        (i < self.bufs.len() && !self.busy[i]).then(|| self.bufs[i].as_mut_slice())
    }

    /// Queue a read of `len` bytes at `offset` into buffer `buf`. The buffer belongs to the
    /// kernel until its completion is reaped.
    pub fn push_read(
        &mut self,
        buf: u16,
        len: usize,
        offset: u64,
        tag: u64,
    ) -> Result<(), RingError> {
        self.push(false, buf, len, offset, tag)
    }

    /// Queue a write of the first `len` bytes of buffer `buf` at `offset`.
    pub fn push_write(
        &mut self,
        buf: u16,
        len: usize,
        offset: u64,
        tag: u64,
    ) -> Result<(), RingError> {
        self.push(true, buf, len, offset, tag)
    }

    fn push(
        &mut self,
        write: bool,
        buf: u16,
        len: usize,
        offset: u64,
        tag: u64,
    ) -> Result<(), RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let i = usize::from(buf);
        if i >= self.bufs.len() || self.busy[i] {
            return Err(RingError::BufferBusy(buf));
        }
        let cap = self.bufs[i].len();
        if len > cap || len > u32::MAX as usize {
            return Err(RingError::TooLong { len, cap });
        }
        if tag >> 48 != 0 {
            // Tags share user_data with the buffer index; callers use small tags.
            return Err(RingError::TooLong {
                len: tag as usize,
                cap: 1 << 48,
            });
        }
        let ptr = self.bufs[i].as_mut_ptr();
        let user_data = (tag << 16) | u64::from(buf);
        let entry = self
            .build(write, ptr, len as u32, buf, offset)
            .user_data(user_data);
        // SAFETY: the entry points into buffer `i`, owned by this ring and not in use by the
        // kernel (checked above); it is marked busy before returning so nothing else can touch
        // or free it until its completion is reaped, and the buffers outlive the ring. The
        // file descriptor (or fixed-file slot 0) stays open via `self.file`.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // Submission queue full: hand the queued entries to the kernel and retry once.
            self.ring.submit().map_err(RingError::Submit)?;
            // SAFETY: as above; the entry is unchanged.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| RingError::Submit(io::Error::other("submission queue full")))?;
        }
        self.busy[i] = true;
        self.in_flight += 1;
        Ok(())
    }

    fn build(&self, write: bool, ptr: *mut u8, len: u32, buf: u16, offset: u64) -> squeue::Entry {
        macro_rules! op {
            ($fd:expr) => {
                match (write, self.registered) {
                    (false, true) => opcode::ReadFixed::new($fd, ptr, len, buf)
                        .offset(offset)
                        .build(),
                    (false, false) => opcode::Read::new($fd, ptr, len).offset(offset).build(),
                    (true, true) => opcode::WriteFixed::new($fd, ptr, len, buf)
                        .offset(offset)
                        .build(),
                    (true, false) => opcode::Write::new($fd, ptr, len).offset(offset).build(),
                }
            };
        }
        if self.fixed_file {
            op!(types::Fixed(0))
        } else {
            op!(types::Fd(self.file.as_raw_fd()))
        }
    }

    /// Submit queued entries and wait until at least `want` completions are available
    /// (retrying on EINTR). An error other than EINTR/EAGAIN/EBUSY marks the ring broken.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other("io_uring is broken"));
        }
        let want = want.min(self.in_flight);
        if std::mem::take(&mut self.fail_next_submit) {
            // As a refused submission: the ring is broken; the queued entries never reach
            // the kernel, so no buffer is in its hands.
            self.broken = true;
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EBUSY)) => {
                    // Completion queue pressure: the caller reaps and calls again.
                    return Ok(0);
                }
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            }
        }
    }

    /// Move every available completion into `out`, releasing its buffer.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut n = 0;
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            let buf = (ud & 0xffff) as u16;
            let i = usize::from(buf);
            if i < self.busy.len() && self.busy[i] {
                self.busy[i] = false;
                self.in_flight -= 1;
            }
            out.push(Completion {
                tag: ud >> 16,
                buf,
                result: cqe.result(),
            });
            n += 1;
        }
        n
    }

    /// Wait for every operation in flight, discarding the results. Returns false (and marks
    /// the ring broken) if the kernel could not be waited on.
    pub fn drain(&mut self) -> bool {
        let mut sink = Vec::new();
        while self.in_flight > 0 {
            if self.broken || self.submit_and_wait(1).is_err() {
                return false;
            }
            sink.clear();
            self.reap(&mut sink);
        }
        true
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if !self.drain() {
            // The kernel may still write into buffers it owns: never free them. Leaking a
            // bounded pool on an unrecoverable ring failure is the only sound choice.
            for b in std::mem::take(&mut self.bufs) {
                std::mem::forget(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_alignment_and_len() {
        let mut b = AlignedBuf::new(5000, 4096);
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert_eq!(b.len(), 5000);
        assert_eq!(b.capacity(), 8192);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[4999] = 7;
        assert!(b.set_len(8192));
        assert_eq!(b.as_slice()[4999], 7);
        assert!(!b.set_len(8193));
        let z = AlignedBuf::new(0, 512);
        assert!(z.is_empty());
    }

    #[test]
    fn f16_views_round_trip() {
        let v = [f16::from_f32(1.5), f16::from_f32(-2.0)];
        let b = f16_as_bytes(&v);
        assert_eq!(b, &[0x00, 0x3e, 0x00, 0xc0]);
        let buf = AlignedBuf::new(4, 64);
        assert_eq!(bytes_as_f16(buf.as_slice()).unwrap().len(), 2);
        assert!(bytes_as_f16(&buf.as_slice()[1..3]).is_none());
    }
}
