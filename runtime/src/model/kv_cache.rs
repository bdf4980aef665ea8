//! The KV cache seen by the forward pass. The model runtime only appends K/V and asks for
//! attention outputs; it never reads KV bytes itself, so the storage engine can implement
//! this trait with KV on flash. [`RamKvCache`] keeps everything in memory (f16).

use csd_engine::engine::compute::{attend_partial, Heads};
use half::f16;
use instinfer_kernels::attention::KvSegment;

/// Errors from a KV cache.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("KV cache full: {needed} tokens needed, capacity is {capacity}")]
    Full { needed: usize, capacity: usize },
    #[error("KV cache shape mismatch: {0}")]
    Shape(String),
    /// The storage engine refused (its message names the sequence, layer or page).
    #[error("{0}")]
    Engine(String),
    #[error("unknown sequence {0} (never opened, or already released)")]
    UnknownSeq(u64),
    #[error("{0}")]
    Unsupported(String),
}

/// Shape of the K/V a cache holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Check an `append` of `k`/`v` to `layer` holding `held` of at most `capacity` tokens;
    /// returns the number of tokens being appended.
    pub fn check_append(
        &self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        held: usize,
        capacity: usize,
    ) -> Result<usize, KvError> {
        let kv_dim = self.n_kv_heads * self.head_dim;
        if layer >= self.n_layers || k.len() != v.len() || !k.len().is_multiple_of(kv_dim) {
            return Err(KvError::Shape(format!(
                "append to layer {layer} with {} K and {} V values",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / kv_dim;
        if held + n > capacity {
            return Err(KvError::Full {
                needed: held + n,
                capacity,
            });
        }
        Ok(n)
    }

    /// Check an `attend` on `layer` with queries `q` into `out`.
    pub fn check_attend(&self, layer: usize, q: &[f32], out: &[f32]) -> Result<(), KvError> {
        if layer >= self.n_layers
            || !q.len().is_multiple_of(self.n_heads * self.head_dim)
            || out.len() != q.len()
        {
            return Err(KvError::Shape(format!(
                "attend on layer {layer} with {} query values",
                q.len()
            )));
        }
        Ok(())
    }
}

/// One sequence's KV cache.
pub trait KvCache: Send {
    /// The shape of the K/V held.
    fn shape(&self) -> KvShape;
    /// Tokens whose K/V all layers hold.
    fn len(&self) -> usize;
    /// Whether no token is stored.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Most tokens this cache can hold.
    fn capacity(&self) -> usize;
    /// Store K and V (`n × kv_heads·head_dim` each, RoPE already applied) of `n` new tokens
    /// for `layer`.
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError>;
    /// Attention for `n` queries (`n × heads·head_dim`) at positions `first_pos..first_pos+n`
    /// over everything appended for `layer`, causally masked. Writes `n × heads·head_dim`.
    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError>;
    /// Forget everything after the first `len` tokens (all layers).
    fn truncate(&mut self, len: usize);
}

struct HeadRows {
    k: Vec<f16>,
    v: Vec<f16>,
}

/// A KV cache in RAM: per layer and kv head, K and V rows in f16.
pub struct RamKvCache {
    shape: KvShape,
    capacity: usize,
    layers: Vec<Vec<HeadRows>>,
    lens: Vec<usize>,
}

impl RamKvCache {
    pub fn new(shape: KvShape, capacity: usize) -> Self {
        let layers = (0..shape.n_layers)
            .map(|_| {
                (0..shape.n_kv_heads)
                    .map(|_| HeadRows {
                        k: Vec::new(),
                        v: Vec::new(),
                    })
                    .collect()
            })
            .collect();
        Self {
            shape,
            capacity,
            layers,
            lens: vec![0; shape.n_layers],
        }
    }
}

impl KvCache for RamKvCache {
    fn shape(&self) -> KvShape {
        self.shape
    }

    fn len(&self) -> usize {
        self.lens.iter().copied().min().unwrap_or(0)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        let s = self.shape;
        let kv_dim = s.n_kv_heads * s.head_dim;
        let held = self.lens.get(layer).copied().unwrap_or(0);
        let n = s.check_append(layer, k, v, held, self.capacity)?;
        for (h, rows) in self.layers[layer].iter_mut().enumerate() {
            for t in 0..n {
                let src = t * kv_dim + h * s.head_dim..t * kv_dim + (h + 1) * s.head_dim;
                rows.k
                    .extend(k[src.clone()].iter().map(|&x| f16::from_f32(x)));
                rows.v.extend(v[src].iter().map(|&x| f16::from_f32(x)));
            }
        }
        self.lens[layer] = held + n;
        Ok(())
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        let s = self.shape;
        s.check_attend(layer, q, out)?;
        let heads = &self.layers[layer];
        let segments: Vec<Vec<KvSegment>> = heads
            .iter()
            .map(|r| {
                vec![KvSegment {
                    keys: &r.k,
                    values: &r.v,
                    first_pos: 0,
                }]
            })
            .collect();
        attend_heads(s, q, first_pos, &segments, out);
        Ok(())
    }

    fn truncate(&mut self, len: usize) {
        let kv_row = self.shape.head_dim;
        for (layer, heads) in self.layers.iter_mut().enumerate() {
            for rows in heads.iter_mut() {
                rows.k.truncate(len * kv_row);
                rows.v.truncate(len * kv_row);
            }
            self.lens[layer] = self.lens[layer].min(len);
        }
    }
}

/// Attention for `n` queries (`n × heads·head_dim`, positions `first_pos..`) of one layer,
/// given each kv head's keys and values as segments in position order: the storage
/// engine's attention (query tiles per kv head sharing each widened K/V block, in parallel
/// when there is enough work), so RAM and flash give the same bits.
pub fn attend_heads(
    s: KvShape,
    q: &[f32],
    first_pos: usize,
    segments: &[Vec<KvSegment>],
    out: &mut [f32],
) {
    let hd = Heads {
        q_heads: s.n_heads,
        kv_heads: s.n_kv_heads,
        head_dim: s.head_dim,
    };
    let mut lse = vec![0.0f32; q.len() / s.head_dim];
    attend_partial(hd, q, first_pos, segments, out, &mut lse);
}
