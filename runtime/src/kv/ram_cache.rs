//! One sequence's KV in RAM: per layer and kv head, K and V rows in f16.

use super::KvCache;
use csd_engine::{KvError, KvShape};
use half::f16;
use instinfer_kernels::attention::KvSegment;
use instinfer_kernels::multi_head::attend_partial;

/// One kv head's K and V rows, f16 (also the rows of a sliding-window ring, `super::window`).
#[derive(Default)]
pub(super) struct HeadRows {
    pub(super) k: Vec<f16>,
    pub(super) v: Vec<f16>,
}

impl HeadRows {
    /// Append head `h`'s rows of `n` tokens' K and V (`n × kv_heads·head_dim` each, f32),
    /// rounded to f16.
    pub(super) fn push_tokens(&mut self, s: KvShape, h: usize, k: &[f32], v: &[f32], n: usize) {
        let kv_dim = s.kv_dim();
        for t in 0..n {
            let src = t * kv_dim + h * s.head_dim..t * kv_dim + (h + 1) * s.head_dim;
            self.k
                .extend(k[src.clone()].iter().map(|&x| f16::from_f32(x)));
            self.v.extend(v[src].iter().map(|&x| f16::from_f32(x)));
        }
    }
}

/// A KV cache in RAM: per layer and kv head, K and V rows in f16.
pub struct RamKvCache {
    shape: KvShape,
    capacity: usize,
    layers: Vec<Vec<HeadRows>>,
    lens: Vec<usize>,
}

impl RamKvCache {
    /// An empty cache for KV of `shape` that holds up to `capacity` tokens.
    pub fn new(shape: KvShape, capacity: usize) -> Self {
        let layers = (0..shape.layers)
            .map(|_| (0..shape.kv_heads).map(|_| HeadRows::default()).collect())
            .collect();
        Self {
            shape,
            capacity,
            layers,
            lens: vec![0; shape.layers],
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
        let held = self.lens.get(layer).copied().unwrap_or(0);
        let n = s.check_append(layer, k, v, held, self.capacity)?;
        for (h, rows) in self.layers[layer].iter_mut().enumerate() {
            rows.push_tokens(s, h, k, v, n);
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
/// given each kv head's keys and values as segments in position order. The storage engine
/// attends with the same kernel, so RAM and flash give the same bits.
fn attend_heads(
    s: KvShape,
    q: &[f32],
    first_pos: usize,
    segments: &[Vec<KvSegment>],
    out: &mut [f32],
) {
    let mut lse = vec![0.0f32; q.len() / s.head_dim];
    attend_partial(s.heads(), q, first_pos, segments, out, &mut lse);
}
