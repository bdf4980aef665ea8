//! Raw direct I/O for storage benchmarks (`kvbench`): a file opened for O_DIRECT, and
//! io_uring queues that own their aligned (optionally registered) buffers, on which a caller
//! queues reads and writes at explicit offsets and reaps their completions.
//!
//! This is the same ring the store's [`UringDevice`](crate::device::UringDevice) runs on,
//! without the store: no chunking, no copies, no retries. A buffer handed to the kernel
//! belongs to it until its completion is reaped; the queue refuses to touch it before, and a
//! queue dropped with I/O in flight waits for it (or, if the kernel cannot be waited on,
//! leaks the buffers rather than freeing memory the kernel may still write).
//!
//! ```no_run
//! use csd_engine::rawio::{QueueOptions, RawFile};
//!
//! let file = RawFile::open("/mnt/nvme/bench".as_ref(), true)?;
//! let probe = file.probe()?;
//! let opts = QueueOptions::new(8, 4096, probe.mem_align.max(4096) as usize);
//! let mut queue = file.queue(&opts)?;
//! queue.push_read(0, 4096, 0, 7)?;
//! queue.submit_and_wait(1)?;
//! let mut done = Vec::new();
//! queue.reap(&mut done);
//! assert_eq!(done[0].tag, 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::sys::{Ring, RingOptions};

pub use crate::sys::{Completion, FileProbe, RingError};

/// A file (or block device) opened for reading and writing, with or without O_DIRECT. Share
/// it by reference between threads; each thread makes its own [`RawQueue`].
#[derive(Debug)]
pub struct RawFile {
    file: Arc<File>,
}

impl RawFile {
    /// Open an existing `path` read-write, with O_DIRECT when `direct`.
    pub fn open(path: &Path, direct: bool) -> io::Result<RawFile> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        Ok(RawFile {
            file: Arc::new(o.open(path)?),
        })
    }

    /// What the kernel says about the file's direct-I/O geometry and size.
    pub fn probe(&self) -> io::Result<FileProbe> {
        crate::sys::probe_file(&self.file)
    }

    /// The open file, for plain positional I/O (`FileExt::read_exact_at`/`write_all_at`).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A new io_uring queue on this file.
    pub fn queue(&self, opts: &QueueOptions) -> io::Result<RawQueue> {
        RawQueue::new(self, opts)
    }
}

/// How a [`RawQueue`] is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueOptions {
    /// Submission queue entries (rounded up to a power of two).
    pub depth: u32,
    /// Buffers the queue owns (at most 65535): the most operations in flight at once.
    pub buffers: usize,
    /// Bytes per buffer: the largest single operation.
    pub buf_size: usize,
    /// Buffer alignment in bytes (a power of two; O_DIRECT needs the device's memory
    /// alignment).
    pub align: usize,
    /// Try to register the buffers with the kernel (fixed buffers, fio's `fixedbufs`).
    pub register_buffers: bool,
    /// Try to register the file with the kernel (fio's `registerfiles`).
    pub register_file: bool,
    /// Only the thread that first submits ever uses the queue: lets the kernel run
    /// completion work in that thread's waits. Do not set it for a queue shared between
    /// threads.
    pub single_issuer: bool,
}

impl QueueOptions {
    /// `depth` entries and as many buffers of `buf_size` bytes aligned to `align`, buffers
    /// and file registered, single issuer.
    pub fn new(depth: u32, buf_size: usize, align: usize) -> QueueOptions {
        QueueOptions {
            depth,
            buffers: depth as usize,
            buf_size,
            align,
            register_buffers: true,
            register_file: true,
            single_issuer: true,
        }
    }
}

/// An io_uring queue on one [`RawFile`] with a pool of aligned buffers it owns. Buffers are
/// named by index (`0..buffer_count()`); each operation uses one buffer, which returns to
/// the caller when its [`Completion`] is reaped. Not `Sync`: one thread drives a queue.
pub struct RawQueue {
    ring: Ring,
}

impl RawQueue {
    fn new(file: &RawFile, opts: &QueueOptions) -> io::Result<RawQueue> {
        let ring_opts = RingOptions {
            register_buffers: opts.register_buffers,
            register_file: opts.register_file,
            single_issuer: opts.single_issuer,
        };
        let ring = Ring::with_options(
            file.file.clone(),
            opts.depth,
            opts.buffers,
            opts.buf_size,
            opts.align,
            ring_opts,
        )?;
        Ok(RawQueue { ring })
    }

    /// Whether the kernel accepted the buffers as fixed (registered) buffers.
    #[inline]
    pub fn registered_buffers(&self) -> bool {
        self.ring.registered_buffers()
    }

    /// Number of buffers.
    #[inline]
    pub fn buffer_count(&self) -> usize {
        self.ring.buffer_count()
    }

    /// Buffer `i` for reading, unless it is out of range or the kernel owns it.
    #[inline]
    pub fn buffer(&self, i: u16) -> Option<&[u8]> {
        self.ring.buf(i)
    }

    /// Buffer `i` for writing (e.g. the data of the next write), unless it is out of range
    /// or the kernel owns it.
    #[inline]
    pub fn buffer_mut(&mut self, i: u16) -> Option<&mut [u8]> {
        self.ring.buf_mut(i)
    }

    /// Queue a read of `len` bytes at `offset` into buffer `buf`; `tag` (below 2^48) comes
    /// back in its completion. The buffer belongs to the kernel until then.
    #[inline]
    pub fn push_read(
        &mut self,
        buf: u16,
        len: usize,
        offset: u64,
        tag: u64,
    ) -> Result<(), RingError> {
        self.ring.push_read(buf, len, offset, tag)
    }

    /// Queue a write of the first `len` bytes of buffer `buf` at `offset`; as
    /// [`RawQueue::push_read`] otherwise.
    #[inline]
    pub fn push_write(
        &mut self,
        buf: u16,
        len: usize,
        offset: u64,
        tag: u64,
    ) -> Result<(), RingError> {
        self.ring.push_write(buf, len, offset, tag)
    }

    /// Operations queued or in flight whose completions have not been reaped.
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Submit everything queued and wait until at least `want` completions (at most the
    /// operations in flight) can be reaped. Returns the number submitted; 0 under completion
    /// queue pressure (reap, then call again). Any other failure breaks the queue.
    #[inline]
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        self.ring.submit_and_wait(want)
    }

    /// Move every available completion into `out` (appending), handing its buffer back.
    /// Returns how many were reaped.
    #[inline]
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        self.ring.reap(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn writes_then_reads_back_through_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raw");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        // Buffered: the temp dir may be on a filesystem without O_DIRECT.
        let file = RawFile::open(&path, false).unwrap();
        let probe = file.probe().unwrap();
        assert!(!probe.is_block_device);
        assert_eq!(probe.size, 1 << 16);
        let mut q = file.queue(&QueueOptions::new(4, 4096, 4096)).unwrap();
        assert_eq!(q.buffer_count(), 4);
        for b in 0..4u16 {
            q.buffer_mut(b).unwrap().fill(b as u8 + 1);
            q.push_write(b, 4096, b as u64 * 8192, 100 + b as u64)
                .unwrap();
            // The kernel owns it now.
            assert!(q.buffer(b).is_none());
            assert!(matches!(
                q.push_read(b, 4096, 0, 0),
                Err(RingError::BufferBusy(_))
            ));
        }
        assert!(matches!(
            q.push_read(4, 4096, 0, 0),
            Err(RingError::BufferBusy(4))
        ));
        let mut done = Vec::new();
        while q.in_flight() > 0 {
            q.submit_and_wait(1).unwrap();
            q.reap(&mut done);
        }
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, vec![100, 101, 102, 103]);
        assert!(done.iter().all(|c| c.result == 4096));
        let mut page = vec![0u8; 4096];
        file.file().read_exact_at(&mut page, 3 * 8192).unwrap();
        assert!(page.iter().all(|&x| x == 4));

        done.clear();
        q.push_read(0, 4096, 2 * 8192, 9).unwrap();
        assert!(matches!(
            q.push_read(0, 8192, 0, 0),
            Err(RingError::BufferBusy(0))
        ));
        assert!(matches!(
            q.push_read(1, 8192, 0, 0),
            Err(RingError::TooLong { .. })
        ));
        q.submit_and_wait(1).unwrap();
        assert_eq!(q.reap(&mut done), 1);
        assert_eq!((done[0].tag, done[0].buf, done[0].result), (9, 0, 4096));
        assert!(q.buffer(0).unwrap().iter().all(|&x| x == 3));
    }
}
