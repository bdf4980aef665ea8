//! The fallback device: positional reads and writes (pread/pwrite), one request at a time,
//! with or without O_DIRECT. Unaligned caller buffers go through an aligned bounce buffer when
//! the file is open for direct I/O.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{check_req, BlockDevice, DevError, DevStats, IoEngine, IoMode, ReadReq, WriteReq};
use crate::sys::AlignedBuf;

/// The fallback [`BlockDevice`]: pread/pwrite on one file, one request at a time.
pub struct PreadDevice {
    file: Arc<File>,
    len: u64,
    align: usize,
    direct: bool,
    stats: DevStats,
}

impl PreadDevice {
    /// A device of `len` bytes over `file` (opened with O_DIRECT when `direct`), taking
    /// requests in multiples of `align` bytes.
    pub fn new(file: Arc<File>, len: u64, align: usize, direct: bool) -> PreadDevice {
        PreadDevice {
            file,
            len,
            align,
            direct,
            stats: DevStats::default(),
        }
    }

    fn needs_bounce(&self, ptr: *const u8) -> bool {
        self.direct && (ptr as usize) % self.align.max(512) != 0
    }
}

fn io_err(offset: u64, source: std::io::Error) -> DevError {
    DevError::Io { offset, source }
}

impl BlockDevice for PreadDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn block_size(&self) -> usize {
        self.align
    }

    fn mode(&self) -> IoMode {
        IoMode {
            engine: IoEngine::Psync,
            direct: self.direct,
        }
    }

    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError> {
        for r in reqs.iter() {
            check_req(r.offset, r.buf.len(), self.align, self.len)?;
        }
        for r in reqs.iter_mut() {
            let t0 = Instant::now();
            if self.needs_bounce(r.buf.as_ptr()) {
                let mut b = AlignedBuf::new(r.buf.len(), self.align.max(4096));
                self.file
                    .read_exact_at(b.as_mut_slice(), r.offset)
                    .map_err(|e| io_err(r.offset, e))?;
                r.buf.copy_from_slice(b.as_slice());
            } else {
                self.file
                    .read_exact_at(r.buf, r.offset)
                    .map_err(|e| io_err(r.offset, e))?;
            }
            self.stats.record_read(r.buf.len(), t0.elapsed());
        }
        Ok(())
    }

    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError> {
        for r in reqs {
            check_req(r.offset, r.buf.len(), self.align, self.len)?;
        }
        for r in reqs {
            let t0 = Instant::now();
            if self.needs_bounce(r.buf.as_ptr()) {
                let mut b = AlignedBuf::new(r.buf.len(), self.align.max(4096));
                b.as_mut_slice().copy_from_slice(r.buf);
                self.file
                    .write_all_at(b.as_slice(), r.offset)
                    .map_err(|e| io_err(r.offset, e))?;
            } else {
                self.file
                    .write_all_at(r.buf, r.offset)
                    .map_err(|e| io_err(r.offset, e))?;
            }
            self.stats.record_write(r.buf.len(), t0.elapsed());
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), DevError> {
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        self.file.sync_data().map_err(|e| io_err(0, e))
    }

    fn stats(&self) -> &DevStats {
        &self.stats
    }
}
