//! The production device: io_uring, O_DIRECT, a pool of registered buffers per ring, deep
//! queues and batched submission.
//!
//! A batch is split into chunks of at most the ring buffer size; up to `depth` chunks are in
//! flight at once and each completion immediately refills the queue. Data moves between the
//! caller's slices and the ring-owned buffers by copy, so the kernel never holds a pointer
//! into caller memory and no error path can return while the kernel may still write into a
//! borrowed buffer.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Instant;

use super::pread::PreadDevice;
use super::{check_req, BlockDevice, DevError, DevStats, IoEngine, IoMode, ReadReq, WriteReq};
use crate::sys::{Completion, Ring, RingError};

/// Ring geometry.
#[derive(Clone, Copy, Debug)]
pub struct UringOptions {
    /// Operations in flight per ring (= buffers per ring).
    pub depth: u32,
    /// Bytes per ring buffer (largest single operation).
    pub buf_size: usize,
    /// Rings, so that several threads can do I/O at once.
    pub rings: usize,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            depth: 64,
            buf_size: 256 * 1024,
            rings: 2,
        }
    }
}

/// The production [`BlockDevice`]: io_uring rings over one file, normally O_DIRECT (see the
/// module documentation).
pub struct UringDevice {
    rings: Vec<Mutex<Ring>>,
    file: Arc<File>,
    len: u64,
    align: usize,
    direct: bool,
    buf_size: usize,
    stats: DevStats,
    /// Plain pread/pwrite on the same file, used once a ring has failed.
    fallback: PreadDevice,
    failed_over: AtomicBool,
}

impl UringDevice {
    /// An io_uring device of `len` bytes over `file` (opened with O_DIRECT when `direct`),
    /// taking requests in multiples of `align` bytes. Fails if the kernel refuses io_uring.
    pub fn new(
        file: Arc<File>,
        len: u64,
        align: usize,
        direct: bool,
        opts: &UringOptions,
    ) -> io::Result<UringDevice> {
        let buf_size = opts.buf_size.max(align).next_multiple_of(align);
        let mut rings = Vec::new();
        for _ in 0..opts.rings.max(1) {
            let r = Ring::new(
                file.clone(),
                opts.depth,
                opts.depth as usize,
                buf_size,
                align.max(4096),
            )?;
            rings.push(Mutex::new(r));
        }
        Ok(UringDevice {
            rings,
            fallback: PreadDevice::new(file.clone(), len, align, direct),
            failed_over: AtomicBool::new(false),
            file,
            len,
            align,
            direct,
            buf_size,
            stats: DevStats::default(),
        })
    }

    /// Whether the kernel accepted the buffers as fixed (registered) buffers.
    pub fn registered_buffers(&self) -> bool {
        self.rings
            .first()
            .and_then(|r| r.lock().ok())
            .is_some_and(|r| r.registered_buffers())
    }

    /// Fault injection for tests: the next submission on every ring fails as a kernel
    /// refusal would, breaking the ring.
    pub fn fail_next_submits(&self) {
        for r in &self.rings {
            r.lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail_next_submit();
        }
    }

    /// Whether the device has left io_uring for pread/pwrite after a ring failed.
    pub fn failed_over(&self) -> bool {
        self.failed_over.load(Ordering::Acquire)
    }

    /// Leave io_uring for good after `e` broke a ring: logged once, and counted.
    fn fail_over(&self, e: &DevError) {
        if !self.failed_over.swap(true, Ordering::AcqRel) {
            self.stats.ring_failovers.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                error = %e,
                "io_uring failed; this device goes on with pread/pwrite (slower, still O_DIRECT)"
            );
        }
    }

    /// The ring's result, unless it broke the ring: then the device fails over, and `None`
    /// says to redo the batch through pread/pwrite.
    fn unless_ring_failed(&self, r: Result<(), DevError>) -> Option<Result<(), DevError>> {
        match r {
            Err(e @ DevError::Ring(_)) => {
                self.fail_over(&e);
                None
            }
            other => Some(other),
        }
    }

    /// The file the rings are bound to.
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    fn with_ring<T>(
        &self,
        f: impl FnOnce(&mut Ring) -> Result<T, DevError>,
    ) -> Result<T, DevError> {
        for r in &self.rings {
            match r.try_lock() {
                Ok(mut g) => return f(&mut g),
                Err(TryLockError::WouldBlock) => continue,
                Err(TryLockError::Poisoned(p)) => return f(&mut p.into_inner()),
            }
        }
        let mut g = self.rings[0].lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

/// One chunk of a batch: which request, where in it, where on disk.
#[derive(Clone, Copy)]
struct Chunk {
    req: usize,
    at: usize,
    offset: u64,
    len: usize,
}

fn split(reqs: impl Iterator<Item = (u64, usize)>, max: usize) -> Vec<Chunk> {
    let mut v = Vec::new();
    for (req, (offset, len)) in reqs.enumerate() {
        let mut at = 0;
        while at < len {
            let n = (len - at).min(max);
            v.push(Chunk {
                req,
                at,
                offset: offset + at as u64,
                len: n,
            });
            at += n;
        }
    }
    v
}

fn ring_err(e: RingError) -> DevError {
    match e {
        RingError::Submit(e) => DevError::Ring(e),
        other => DevError::Ring(io::Error::other(other.to_string())),
    }
}

impl BlockDevice for UringDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn block_size(&self) -> usize {
        self.align
    }

    fn mode(&self) -> IoMode {
        IoMode {
            engine: IoEngine::IoUring,
            direct: self.direct,
        }
    }

    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError> {
        for r in reqs.iter() {
            check_req(r.offset, r.buf.len(), self.align, self.len)?;
        }
        if !self.failed_over() {
            let mut work = split(reqs.iter().map(|r| (r.offset, r.buf.len())), self.buf_size);
            let r = self.with_ring(|ring| {
                run(
                    ring,
                    &mut work,
                    false,
                    &self.stats,
                    |c, data| {
                        reqs[c.req].buf[c.at..c.at + data.len()].copy_from_slice(data);
                    },
                    |_, _| {},
                )
            });
            if let Some(r) = self.unless_ring_failed(r) {
                return r;
            }
        }
        // Reads are idempotent: the whole batch again, through pread.
        let t0 = Instant::now();
        self.fallback.read_at(reqs)?;
        let bytes = reqs.iter().map(|r| r.buf.len()).sum();
        self.stats.record_read(bytes, t0.elapsed());
        Ok(())
    }

    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError> {
        for r in reqs {
            check_req(r.offset, r.buf.len(), self.align, self.len)?;
        }
        if !self.failed_over() {
            let mut work = split(reqs.iter().map(|r| (r.offset, r.buf.len())), self.buf_size);
            let r = self.with_ring(|ring| {
                run(
                    ring,
                    &mut work,
                    true,
                    &self.stats,
                    |_, _| {},
                    |c, buf| {
                        buf[..c.len].copy_from_slice(&reqs[c.req].buf[c.at..c.at + c.len]);
                    },
                )
            });
            if let Some(r) = self.unless_ring_failed(r) {
                return r;
            }
        }
        // The same bytes at the same offsets again (a part may have landed already).
        let t0 = Instant::now();
        self.fallback.write_at(reqs)?;
        let bytes = reqs.iter().map(|r| r.buf.len()).sum();
        self.stats.record_write(bytes, t0.elapsed());
        Ok(())
    }

    fn sync(&self) -> Result<(), DevError> {
        self.stats
            .syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.file
            .sync_data()
            .map_err(|source| DevError::Io { offset: 0, source })
    }

    fn stats(&self) -> &DevStats {
        &self.stats
    }
}

/// Drive `work` through `ring`, keeping it full. `deliver` receives read data of a completed
/// chunk; `fill` writes a chunk's data into its ring buffer before a write is queued. Always
/// waits for every queued operation before returning, error or not.
fn run(
    ring: &mut Ring,
    work: &mut Vec<Chunk>,
    write: bool,
    stats: &DevStats,
    mut deliver: impl FnMut(Chunk, &[u8]),
    mut fill: impl FnMut(Chunk, &mut [u8]),
) -> Result<(), DevError> {
    if ring.is_broken() {
        return Err(DevError::Ring(io::Error::other(
            "io_uring is broken after an earlier failure",
        )));
    }
    let nbufs = ring.buffer_count();
    // Per buffer: the chunk it serves and when it was queued.
    let mut slot: Vec<Option<(Chunk, Instant)>> = vec![None; nbufs];
    let mut free: Vec<u16> = (0..nbufs as u16).rev().collect();
    let mut next = 0usize;
    let mut first_err: Option<DevError> = None;
    let mut done = Vec::with_capacity(nbufs);
    loop {
        // Queue as much as buffers allow, unless an error stopped new work.
        while first_err.is_none() && next < work.len() {
            let Some(b) = free.pop() else { break };
            let c = work[next];
            let pushed = if write {
                let buf = ring.buf_mut(b).expect("free buffer is not in flight");
                fill(c, buf);
                ring.push_write(b, c.len, c.offset, b as u64)
            } else {
                ring.push_read(b, c.len, c.offset, b as u64)
            };
            match pushed {
                Ok(()) => {
                    slot[usize::from(b)] = Some((c, Instant::now()));
                    next += 1;
                }
                Err(e) => {
                    free.push(b);
                    first_err = Some(ring_err(e));
                }
            }
        }
        if ring.in_flight() == 0 {
            break;
        }
        if let Err(e) = ring.submit_and_wait(1) {
            // The ring is now broken; its buffers are never freed while owned by the kernel.
            return Err(first_err.unwrap_or(DevError::Ring(e)));
        }
        done.clear();
        ring.reap(&mut done);
        for &Completion { buf, result, .. } in &done {
            let Some((c, t0)) = slot[usize::from(buf)].take() else {
                continue;
            };
            free.push(buf);
            if result < 0 {
                first_err.get_or_insert(DevError::Io {
                    offset: c.offset,
                    source: io::Error::from_raw_os_error(-result),
                });
                continue;
            }
            let got = result as usize;
            if write {
                stats.record_write(got, t0.elapsed());
            } else {
                stats.record_read(got, t0.elapsed());
                let data = ring.buf(buf).expect("reaped buffer is free");
                deliver(Chunk { len: got, ..c }, &data[..got]);
            }
            if got < c.len {
                // A short transfer: retry the rest if it is still aligned, else fail.
                let rest = Chunk {
                    req: c.req,
                    at: c.at + got,
                    offset: c.offset + got as u64,
                    len: c.len - got,
                };
                if got == 0 {
                    first_err.get_or_insert(DevError::Short {
                        offset: c.offset,
                        wanted: c.len,
                        got,
                    });
                } else {
                    // Requeued; a write refills its buffer from the caller's slice.
                    work.push(rest);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
