//! A seeded fault-injecting decorator around any [`BlockDevice`].
//!
//! Faults are drawn per request from a seeded ChaCha8 generator (same seed and same requests,
//! same faults), or
//! armed one at a time with [`FaultyDevice::arm`] for targeted tests. Silent faults (bit
//! flips, short reads that leave garbage, misdirected writes) return success, exactly as a
//! misbehaving drive would; the layer above has to catch them.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{BlockDevice, DevError, DevStats, IoMode, ReadReq, WriteReq};

/// One kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The read fails with EIO.
    ReadError,
    /// The read "succeeds" but only the first part of the buffer holds data; the rest is
    /// garbage.
    ShortRead,
    /// The read succeeds with one bit flipped.
    BitFlip,
    /// The write fails with EIO.
    WriteError,
    /// The write lands at another offset and reports success.
    MisdirectedWrite,
    /// The write fails with ENOSPC.
    NoSpace,
    /// The operation is delayed.
    Latency(Duration),
    /// The read panics, as a bug in a read path would (armed only, never drawn).
    ReadPanic,
    /// The write panics, as a bug in a write path would (armed only, never drawn).
    WritePanic,
}

/// Per-request fault probabilities (0.0..=1.0) and the generator seed.
#[derive(Clone, Copy, Debug, Default)]
pub struct FaultConfig {
    /// Seed of the fault generator.
    pub seed: u64,
    /// Probability that a read fails with EIO.
    pub read_error: f64,
    /// Probability of a silent short read.
    pub short_read: f64,
    /// Probability of a silent bit flip in a read.
    pub bit_flip: f64,
    /// Probability that a write fails with EIO.
    pub write_error: f64,
    /// Probability of a silently misdirected write.
    pub misdirected_write: f64,
    /// Probability that a write fails with ENOSPC.
    pub no_space: f64,
    /// How long a delayed operation waits.
    pub latency: Duration,
    /// Probability that an operation is delayed by `latency`.
    pub latency_prob: f64,
    /// Where a misdirected write lands: this many bytes further on (wrapping, block aligned).
    /// Zero means half the device.
    pub misdirect_shift: u64,
}

/// How many faults of each kind were injected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Reads failed with EIO.
    pub read_errors: u64,
    /// Silent short reads.
    pub short_reads: u64,
    /// Silent bit flips.
    pub bit_flips: u64,
    /// Writes failed with EIO.
    pub write_errors: u64,
    /// Silently misdirected writes.
    pub misdirected_writes: u64,
    /// Writes failed with ENOSPC.
    pub no_space: u64,
    /// Delayed operations.
    pub delays: u64,
}

#[derive(Default)]
struct Counters {
    read_errors: AtomicU64,
    short_reads: AtomicU64,
    bit_flips: AtomicU64,
    write_errors: AtomicU64,
    misdirected_writes: AtomicU64,
    no_space: AtomicU64,
    delays: AtomicU64,
}

/// A [`BlockDevice`] that injects faults into the requests it passes to `inner`.
pub struct FaultyDevice<D> {
    inner: D,
    cfg: FaultConfig,
    rng: Mutex<ChaCha8Rng>,
    armed: Mutex<VecDeque<Fault>>,
    enabled: AtomicBool,
    counts: Counters,
}

impl<D: BlockDevice> FaultyDevice<D> {
    /// Wrap `inner`, drawing random faults as `cfg` says.
    pub fn new(inner: D, cfg: FaultConfig) -> FaultyDevice<D> {
        FaultyDevice {
            inner,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(cfg.seed)),
            cfg,
            armed: Mutex::new(VecDeque::new()),
            enabled: AtomicBool::new(true),
            counts: Counters::default(),
        }
    }

    /// Inject `fault` into the next request it applies to (reads or writes), in arming order.
    pub fn arm(&self, fault: Fault) {
        self.armed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(fault);
    }

    /// Turn random faults on or off (armed faults still fire).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::SeqCst);
    }

    /// Faults injected so far.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counts;
        let l = |a: &AtomicU64| a.load(Ordering::SeqCst);
        FaultCounts {
            read_errors: l(&c.read_errors),
            short_reads: l(&c.short_reads),
            bit_flips: l(&c.bit_flips),
            write_errors: l(&c.write_errors),
            misdirected_writes: l(&c.misdirected_writes),
            no_space: l(&c.no_space),
            delays: l(&c.delays),
        }
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// A uniform draw from `0..n` (`n > 0`).
    fn below(&self, n: usize) -> usize {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        rng.random_range(0..n)
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0 && self.enabled.load(Ordering::SeqCst) && {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.random::<f64>() <= p
        }
    }

    fn take_armed(&self, for_write: bool) -> Option<Fault> {
        let mut a = self.armed.lock().unwrap_or_else(|p| p.into_inner());
        let applies = |f: &Fault| match f {
            Fault::ReadError | Fault::ShortRead | Fault::BitFlip | Fault::ReadPanic => !for_write,
            Fault::WriteError | Fault::MisdirectedWrite | Fault::NoSpace | Fault::WritePanic => {
                for_write
            }
            Fault::Latency(_) => true,
        };
        let i = a.iter().position(applies)?;
        a.remove(i)
    }

    fn pick_read(&self) -> Option<Fault> {
        if let Some(f) = self.take_armed(false) {
            return Some(f);
        }
        let c = &self.cfg;
        if self.chance(c.read_error) {
            Some(Fault::ReadError)
        } else if self.chance(c.short_read) {
            Some(Fault::ShortRead)
        } else if self.chance(c.bit_flip) {
            Some(Fault::BitFlip)
        } else if self.chance(c.latency_prob) {
            Some(Fault::Latency(c.latency))
        } else {
            None
        }
    }

    fn pick_write(&self) -> Option<Fault> {
        if let Some(f) = self.take_armed(true) {
            return Some(f);
        }
        let c = &self.cfg;
        if self.chance(c.no_space) {
            Some(Fault::NoSpace)
        } else if self.chance(c.write_error) {
            Some(Fault::WriteError)
        } else if self.chance(c.misdirected_write) {
            Some(Fault::MisdirectedWrite)
        } else if self.chance(c.latency_prob) {
            Some(Fault::Latency(c.latency))
        } else {
            None
        }
    }

    fn delay(&self, d: Duration) {
        self.counts.delays.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(d);
    }
}

impl<D: BlockDevice> BlockDevice for FaultyDevice<D> {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn block_size(&self) -> usize {
        self.inner.block_size()
    }

    fn mode(&self) -> IoMode {
        self.inner.mode()
    }

    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError> {
        let faults: Vec<Option<Fault>> = reqs.iter().map(|_| self.pick_read()).collect();
        for (r, f) in reqs.iter().zip(&faults) {
            if *f == Some(Fault::ReadPanic) {
                panic!("injected panic in a read at offset {}", r.offset);
            }
            if *f == Some(Fault::ReadError) {
                self.counts.read_errors.fetch_add(1, Ordering::SeqCst);
                return Err(DevError::Io {
                    offset: r.offset,
                    source: io::Error::from_raw_os_error(libc::EIO),
                });
            }
        }
        self.inner.read_at(reqs)?;
        for (r, f) in reqs.iter_mut().zip(faults) {
            match f {
                Some(Fault::ShortRead) if !r.buf.is_empty() => {
                    self.counts.short_reads.fetch_add(1, Ordering::SeqCst);
                    let keep = self.below(r.buf.len());
                    r.buf[keep..].fill(0xa5);
                }
                Some(Fault::BitFlip) if !r.buf.is_empty() => {
                    self.counts.bit_flips.fetch_add(1, Ordering::SeqCst);
                    let bit = self.below(r.buf.len() * 8);
                    r.buf[bit / 8] ^= 1 << (bit % 8);
                }
                Some(Fault::Latency(d)) => self.delay(d),
                _ => {}
            }
        }
        Ok(())
    }

    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError> {
        for r in reqs {
            match self.pick_write() {
                Some(Fault::WritePanic) => {
                    panic!("injected panic in a write at offset {}", r.offset)
                }
                Some(Fault::NoSpace) => {
                    self.counts.no_space.fetch_add(1, Ordering::SeqCst);
                    return Err(DevError::Io {
                        offset: r.offset,
                        source: io::Error::from_raw_os_error(libc::ENOSPC),
                    });
                }
                Some(Fault::WriteError) => {
                    self.counts.write_errors.fetch_add(1, Ordering::SeqCst);
                    return Err(DevError::Io {
                        offset: r.offset,
                        source: io::Error::from_raw_os_error(libc::EIO),
                    });
                }
                Some(Fault::MisdirectedWrite) => {
                    self.counts
                        .misdirected_writes
                        .fetch_add(1, Ordering::SeqCst);
                    let bs = self.block_size() as u64;
                    let len = self.len();
                    let span = len.saturating_sub(r.buf.len() as u64).max(1);
                    let shift = if self.cfg.misdirect_shift == 0 {
                        len / 2
                    } else {
                        self.cfg.misdirect_shift
                    };
                    let target = ((r.offset + shift) % span) / bs * bs;
                    self.inner.write_at(&[WriteReq {
                        offset: target,
                        buf: r.buf,
                    }])?;
                }
                Some(Fault::Latency(d)) => {
                    self.delay(d);
                    self.inner.write_at(std::slice::from_ref(r))?;
                }
                _ => self.inner.write_at(std::slice::from_ref(r))?,
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), DevError> {
        self.inner.sync()
    }

    fn stats(&self) -> &DevStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::MemDevice;

    /// Faults injected into a fixed request sequence, and what the reads returned.
    fn run(seed: u64) -> (FaultCounts, Vec<u8>) {
        let cfg = FaultConfig {
            seed,
            read_error: 0.1,
            short_read: 0.1,
            bit_flip: 0.2,
            write_error: 0.1,
            misdirected_write: 0.1,
            no_space: 0.1,
            ..Default::default()
        };
        let dev = FaultyDevice::new(MemDevice::new(1 << 20), cfg);
        let data = vec![0x5au8; 4096];
        let mut seen = Vec::new();
        for i in 0..200u64 {
            let offset = (i % 64) * 4096;
            let _ = dev.write_at(&[WriteReq { offset, buf: &data }]);
            let mut buf = vec![0u8; 4096];
            if dev
                .read_at(&mut [ReadReq {
                    offset,
                    buf: &mut buf,
                }])
                .is_ok()
            {
                seen.extend_from_slice(&buf[..64]);
            }
        }
        (dev.counts(), seen)
    }

    #[test]
    fn the_same_seed_injects_the_same_faults() {
        let (c1, d1) = run(7);
        let (c2, d2) = run(7);
        assert_eq!(c1, c2);
        assert_eq!(d1, d2);
        assert!(c1.read_errors > 0 && c1.bit_flips > 0 && c1.misdirected_writes > 0);
        assert_ne!(run(8).0, c1, "another seed, other faults");
    }
}
