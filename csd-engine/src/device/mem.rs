//! An in-memory device for tests. Clones share the same bytes, so a store can be dropped and
//! reopened on the "same disk". Requests are held to the same alignment rules as direct I/O.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use super::{check_req, BlockDevice, DevError, DevStats, IoEngine, IoMode, ReadReq, WriteReq};

/// A [`BlockDevice`] in RAM; clones share the bytes.
#[derive(Clone)]
pub struct MemDevice {
    data: Arc<RwLock<Vec<u8>>>,
    align: usize,
    stats: Arc<DevStats>,
}

impl MemDevice {
    /// A zeroed device of `len` bytes with 4096-byte blocks.
    pub fn new(len: usize) -> MemDevice {
        MemDevice::with_block_size(len, 4096)
    }

    /// A zeroed device of `len` bytes taking requests in multiples of `align` bytes.
    pub fn with_block_size(len: usize, align: usize) -> MemDevice {
        MemDevice {
            data: Arc::new(RwLock::new(vec![0; len])),
            align,
            stats: Arc::default(),
        }
    }

    /// A copy of the device contents (for tests).
    pub fn snapshot(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Overwrite raw bytes (for tests that corrupt the "disk").
    pub fn poke(&self, offset: usize, bytes: &[u8]) {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let end = (offset + bytes.len()).min(d.len());
        if offset < end {
            d[offset..end].copy_from_slice(&bytes[..end - offset]);
        }
    }
}

impl BlockDevice for MemDevice {
    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    fn block_size(&self) -> usize {
        self.align
    }

    fn mode(&self) -> IoMode {
        IoMode {
            engine: IoEngine::Memory,
            direct: false,
        }
    }

    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        for r in reqs.iter() {
            check_req(r.offset, r.buf.len(), self.align, d.len() as u64)?;
        }
        for r in reqs.iter_mut() {
            let t0 = Instant::now();
            let o = r.offset as usize;
            r.buf.copy_from_slice(&d[o..o + r.buf.len()]);
            self.stats.record_read(r.buf.len(), t0.elapsed());
        }
        Ok(())
    }

    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError> {
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        for r in reqs {
            check_req(r.offset, r.buf.len(), self.align, d.len() as u64)?;
        }
        for r in reqs {
            let t0 = Instant::now();
            let o = r.offset as usize;
            d[o..o + r.buf.len()].copy_from_slice(r.buf);
            self.stats.record_write(r.buf.len(), t0.elapsed());
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), DevError> {
        self.stats
            .syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn stats(&self) -> &DevStats {
        &self.stats
    }
}
