//! KV for many sequences at once: what a batched forward step talks to.
//!
//! A [`KvPool`] owns the KV of every running sequence, keyed by a [`SeqKey`] the caller
//! chooses. The forward pass appends each layer's K/V and asks for attention outputs for a
//! batch of (sequence, query rows); it never reads KV bytes itself. [`RamKvPool`] keeps each
//! sequence in a [`RamKvCache`]; the storage engine's pool keeps them on flash and attends
//! next to the data. [`OneCache`] lets a single [`KvCache`] stand in as a pool of one.

use super::kv_cache::{KvCache, KvError, KvShape, RamKvCache};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The caller's name for a sequence in a pool.
pub type SeqKey = u64;

/// How decode attention reads a sequence's KV (DESIGN §5).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AttentionMode {
    /// Exact attention over every page, through the storage engine.
    #[default]
    Full,
    /// Baseline: read each layer's whole KV into host memory with large sequential reads,
    /// attend there.
    Flexgen,
    /// Sinks + recent window + the pages the retrieval policy selects.
    Sparse,
}

impl AttentionMode {
    pub const ALL: [AttentionMode; 3] = [
        AttentionMode::Full,
        AttentionMode::Flexgen,
        AttentionMode::Sparse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AttentionMode::Full => "full",
            AttentionMode::Flexgen => "flexgen",
            AttentionMode::Sparse => "sparse",
        }
    }
}

impl fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttentionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(AttentionMode::Full),
            "flexgen" => Ok(AttentionMode::Flexgen),
            "sparse" => Ok(AttentionMode::Sparse),
            other => Err(format!(
                "unknown attention mode {other:?} (expected full, flexgen or sparse)"
            )),
        }
    }
}

/// One sequence's share of a batched attention call for one layer.
pub struct AttendItem<'a> {
    pub seq: SeqKey,
    /// `n × heads·head_dim` queries at positions `first_pos..first_pos+n`.
    pub q: &'a [f32],
    pub first_pos: usize,
    /// `n × heads·head_dim` outputs.
    pub out: &'a mut [f32],
}

/// Totals a pool has counted since it was made (all zero for pools in RAM).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes read from the storage device.
    pub device_bytes_read: u64,
    /// Bytes written to the storage device.
    pub device_bytes_written: u64,
    /// Bytes that crossed the engine's command boundary (q and k/v down, outputs up).
    pub boundary_bytes: u64,
    /// Page lookups in the engine's RAM page cache, and how many hit.
    pub cache_lookups: u64,
    pub cache_hits: u64,
}

/// KV of many sequences. Every method names the sequence it acts on; an error concerns that
/// sequence only and leaves the others as they were.
pub trait KvPool: Send {
    fn shape(&self) -> KvShape;
    /// Start an empty sequence `seq` that may grow to `capacity` tokens.
    fn open(&mut self, seq: SeqKey, mode: AttentionMode, capacity: usize) -> Result<(), KvError>;
    /// Drop a sequence and free its KV at once. Unknown keys are ignored.
    fn release(&mut self, seq: SeqKey);
    /// Tokens held by `seq` (all layers), or an error naming the unknown sequence.
    fn len(&self, seq: SeqKey) -> Result<usize, KvError>;
    /// Most tokens `seq` may hold.
    fn capacity(&self, seq: SeqKey) -> Result<usize, KvError>;
    /// Store K/V (`n × kv_heads·head_dim`, RoPE applied) of `n` new tokens of `seq` for
    /// `layer`. `q` holds the same tokens' queries (`n × heads·head_dim`), which an engine may
    /// fold into its activation statistics.
    fn append(
        &mut self,
        seq: SeqKey,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError>;
    /// Attention of `layer` for every item, causally masked over what each sequence holds.
    /// Returns one result per item, in order.
    fn attend(&mut self, layer: usize, items: &mut [AttendItem<'_>]) -> Vec<Result<(), KvError>>;
    /// Forget everything of `seq` after its first `len` tokens.
    fn truncate(&mut self, seq: SeqKey, len: usize);
    /// Counters since the pool was made.
    fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    /// Counters for one sequence since it was opened.
    fn seq_stats(&self, _seq: SeqKey) -> PoolStats {
        PoolStats::default()
    }
}

fn unknown(seq: SeqKey) -> KvError {
    KvError::UnknownSeq(seq)
}

/// Sequences in RAM. Attention modes other than `full` need the storage engine and are
/// refused with a message saying so.
pub struct RamKvPool {
    shape: KvShape,
    seqs: HashMap<SeqKey, RamKvCache>,
}

impl RamKvPool {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            seqs: HashMap::new(),
        }
    }

    /// Sequences held.
    pub fn active(&self) -> usize {
        self.seqs.len()
    }

    fn get(&mut self, seq: SeqKey) -> Result<&mut RamKvCache, KvError> {
        self.seqs.get_mut(&seq).ok_or_else(|| unknown(seq))
    }
}

impl KvPool for RamKvPool {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn open(&mut self, seq: SeqKey, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        if mode != AttentionMode::Full {
            return Err(KvError::Unsupported(format!(
                "attention mode {mode} needs the KV cache on flash (start with a KV store)"
            )));
        }
        if self.seqs.contains_key(&seq) {
            return Err(KvError::Engine(format!("sequence {seq} is already open")));
        }
        self.seqs.insert(seq, RamKvCache::new(self.shape, capacity));
        Ok(())
    }

    fn release(&mut self, seq: SeqKey) {
        self.seqs.remove(&seq);
    }

    fn len(&self, seq: SeqKey) -> Result<usize, KvError> {
        self.seqs
            .get(&seq)
            .map(|c| c.len())
            .ok_or_else(|| unknown(seq))
    }

    fn capacity(&self, seq: SeqKey) -> Result<usize, KvError> {
        self.seqs
            .get(&seq)
            .map(|c| c.capacity())
            .ok_or_else(|| unknown(seq))
    }

    fn append(
        &mut self,
        seq: SeqKey,
        layer: usize,
        k: &[f32],
        v: &[f32],
        _q: &[f32],
    ) -> Result<(), KvError> {
        self.get(seq)?.append(layer, k, v)
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendItem<'_>]) -> Vec<Result<(), KvError>> {
        items
            .iter_mut()
            .map(|it| self.get(it.seq)?.attend(layer, it.q, it.first_pos, it.out))
            .collect()
    }

    fn truncate(&mut self, seq: SeqKey, len: usize) {
        if let Some(c) = self.seqs.get_mut(&seq) {
            c.truncate(len);
        }
    }
}

/// One [`KvCache`] seen as a pool holding the single sequence 0.
pub struct OneCache<'c>(pub &'c mut dyn KvCache);

/// The key [`OneCache`] answers to.
pub const ONE_CACHE_SEQ: SeqKey = 0;

impl OneCache<'_> {
    fn check(&self, seq: SeqKey) -> Result<(), KvError> {
        if seq == ONE_CACHE_SEQ {
            Ok(())
        } else {
            Err(unknown(seq))
        }
    }
}

impl KvPool for OneCache<'_> {
    fn shape(&self) -> KvShape {
        self.0.shape()
    }

    fn open(&mut self, seq: SeqKey, _: AttentionMode, _: usize) -> Result<(), KvError> {
        Err(KvError::Engine(format!(
            "a single KV cache cannot open sequence {seq}"
        )))
    }

    fn release(&mut self, _seq: SeqKey) {}

    fn len(&self, seq: SeqKey) -> Result<usize, KvError> {
        self.check(seq)?;
        Ok(self.0.len())
    }

    fn capacity(&self, seq: SeqKey) -> Result<usize, KvError> {
        self.check(seq)?;
        Ok(self.0.capacity())
    }

    fn append(
        &mut self,
        seq: SeqKey,
        layer: usize,
        k: &[f32],
        v: &[f32],
        _q: &[f32],
    ) -> Result<(), KvError> {
        self.check(seq)?;
        self.0.append(layer, k, v)
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendItem<'_>]) -> Vec<Result<(), KvError>> {
        items
            .iter_mut()
            .map(|it| {
                self.check(it.seq)?;
                self.0.attend(layer, it.q, it.first_pos, it.out)
            })
            .collect()
    }

    fn truncate(&mut self, seq: SeqKey, len: usize) {
        if seq == ONE_CACHE_SEQ {
            self.0.truncate(len);
        }
    }
}
