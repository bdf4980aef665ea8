//! Sliding-window layers (Gemma 3's local layers) kept in RAM rings, beside a pool or cache
//! that holds only the layers attending over the whole context.
//!
//! A local layer's query at position `p` sees the keys at `p - window + 1 ..= p`, so a
//! sequence needs only the last `window - 1` tokens of each local layer between steps. Those
//! stay in RAM (about 1 MiB per layer per sequence for Gemma 3 270M) and never reach flash:
//! the store holds the global layers alone, a sixth of the model's KV bytes per token.
//! [`WindowedPool`] wraps any [`KvPool`] (RAM or the storage engine) and [`WindowedCache`]
//! any [`KvCache`]; the forward pass checks that its pool keeps the model's window.

use super::ram_cache::HeadRows;
use super::{AttendReq, CacheUse, KvCache, KvPool, PrefixCacheStats};
use crate::model::SlidingWindow;
use csd_engine::{AttentionMode, EngineStats, KvError, KvShape, SeqId};
use instinfer_kernels::attention::{attend, AttnScratch, KvSegment, ReduceOrder};
use rayon::prelude::*;
use std::collections::HashMap;

/// Query rows below which a prefill chunk's window attention stays on the calling thread.
const PARALLEL_MIN_ROWS: usize = 16;

/// Where a layer's KV lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// In ring `i` of the sequence.
    Local(usize),
    /// In layer `i` of the wrapped pool or cache.
    Global(usize),
}

/// The layer map shared by every sequence of a model.
#[derive(Debug)]
struct Layout {
    shape: KvShape,
    window: usize,
    slots: Vec<Slot>,
    locals: usize,
}

impl Layout {
    fn new(shape: KvShape, sliding: &SlidingWindow) -> Self {
        let (mut locals, mut globals) = (0, 0);
        let slots = (0..shape.layers)
            .map(|l| {
                if sliding.is_local(l) {
                    locals += 1;
                    Slot::Local(locals - 1)
                } else {
                    globals += 1;
                    Slot::Global(globals - 1)
                }
            })
            .collect();
        Self {
            shape,
            window: sliding.window,
            slots,
            locals,
        }
    }

    fn slot(&self, layer: usize) -> Result<Slot, KvError> {
        self.slots.get(layer).copied().ok_or_else(|| {
            KvError::BadInput(format!(
                "layer {layer} of a model with {} layers",
                self.slots.len()
            ))
        })
    }
}

/// One local layer of one sequence: rows for positions `first..end`, per kv head.
struct Ring {
    heads: Vec<HeadRows>,
    first: usize,
    end: usize,
}

/// Buffers one query row's window attention reuses across its kv heads and rows.
#[derive(Default)]
struct RowScratch {
    attn: AttnScratch,
    lse: Vec<f32>,
    qpos: Vec<usize>,
}

/// The local layers of one sequence.
struct Rings {
    rings: Vec<Ring>,
}

impl Rings {
    fn new(layout: &Layout) -> Self {
        let rings = (0..layout.locals)
            .map(|_| Ring {
                heads: (0..layout.shape.kv_heads)
                    .map(|_| HeadRows::default())
                    .collect(),
                first: 0,
                end: 0,
            })
            .collect();
        Self { rings }
    }

    /// Tokens every local layer holds (as positions: older ones may have been dropped).
    fn len(&self) -> Option<usize> {
        self.rings.iter().map(|r| r.end).min()
    }

    /// Append `n` tokens' K/V (`n × kv_dim`) to ring `i` of `layer`, dropping rows that no
    /// later query can see.
    fn append(
        &mut self,
        layout: &Layout,
        layer: usize,
        i: usize,
        k: &[f32],
        v: &[f32],
        capacity: usize,
    ) -> Result<(), KvError> {
        let s = layout.shape;
        let ring = &mut self.rings[i];
        let n = s.check_append(layer, k, v, ring.end, capacity)?;
        // The next query is at `end`; it sees from `end + 1 - window`. Rows before that go,
        // in batches of a window so the move is paid once per window of tokens.
        let keep_from = (ring.end + 1).saturating_sub(layout.window);
        if keep_from >= ring.first + layout.window {
            let drop = (keep_from - ring.first) * s.head_dim;
            for h in &mut ring.heads {
                h.k.drain(..drop);
                h.v.drain(..drop);
            }
            ring.first = keep_from;
        }
        for (h, rows) in ring.heads.iter_mut().enumerate() {
            rows.push_tokens(s, h, k, v, n);
        }
        ring.end += n;
        Ok(())
    }

    /// Attention of `n` queries (`n × q_dim`, positions `first_pos..`) over ring `i`, each
    /// seeing the window that ends at its own position.
    fn attend(
        &self,
        layout: &Layout,
        i: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        let s = layout.shape;
        let (d, qd, g) = (s.head_dim, s.q_dim(), s.q_heads / s.kv_heads);
        let ring = &self.rings[i];
        let n = q.len() / qd;
        let lowest = (first_pos + 1).saturating_sub(layout.window);
        if lowest < ring.first || first_pos + n > ring.end {
            return Err(KvError::BadInput(format!(
                "window attention at positions {first_pos}..{} needs keys from {lowest}, but the \
                 ring holds {}..{} (the sequence was cut back past its window)",
                first_pos + n,
                ring.first,
                ring.end
            )));
        }
        // Prompt chunks reduce like llama.cpp's batched kernel, single tokens like its
        // vector kernel, as the full-context attention does.
        let order = if n > 1 {
            ReduceOrder::Gemm
        } else {
            ReduceOrder::Gemv
        };
        let scale = 1.0 / (d as f32).sqrt();
        let row = |r: usize, o: &mut [f32], scratch: &mut RowScratch| {
            let pos = first_pos + r;
            let lo = (pos + 1).saturating_sub(layout.window) - ring.first;
            let hi = pos + 1 - ring.first;
            let RowScratch { attn, lse, qpos } = scratch;
            qpos.clear();
            qpos.resize(g, pos);
            lse.resize(g, 0.0);
            for (h, rows) in ring.heads.iter().enumerate() {
                let seg = [KvSegment {
                    keys: &rows.k[lo * d..hi * d],
                    values: &rows.v[lo * d..hi * d],
                    first_pos: ring.first + lo,
                }];
                let heads = h * g * d..(h + 1) * g * d;
                attend(
                    &q[r * qd..(r + 1) * qd][heads.clone()],
                    qpos,
                    &seg,
                    d,
                    scale,
                    order,
                    &mut o[heads],
                    lse,
                    attn,
                );
            }
        };
        if n >= PARALLEL_MIN_ROWS {
            out.par_chunks_mut(qd)
                .enumerate()
                .for_each_init(RowScratch::default, |scr, (r, o)| row(r, o, scr));
        } else {
            let mut scr = RowScratch::default();
            for (r, o) in out.chunks_mut(qd).enumerate() {
                row(r, o, &mut scr);
            }
        }
        Ok(())
    }

    /// Forget every position from `len` on.
    fn truncate(&mut self, layout: &Layout, len: usize) {
        let d = layout.shape.head_dim;
        for ring in &mut self.rings {
            if len >= ring.end {
                continue;
            }
            // Cut back past the rows still held: the window before `len` is gone, and
            // attention over it is refused until the sequence is emptied.
            ring.first = ring.first.min(len);
            let keep = len - ring.first;
            for h in &mut ring.heads {
                h.k.truncate(keep * d);
                h.v.truncate(keep * d);
            }
            ring.end = len;
        }
    }
}

/// A [`KvPool`] for a model with sliding-window layers: `inner` holds the global layers (its
/// shape has only those), and each sequence's local layers live in RAM rings here.
///
/// The prefix cache is not used: a cached prefix would also need each local layer's last
/// window of KV, which the store does not keep, so requests prefill in full.
pub struct WindowedPool<'p> {
    inner: Box<dyn KvPool + 'p>,
    layout: Layout,
    seqs: HashMap<SeqId, Rings>,
}

impl<'p> WindowedPool<'p> {
    /// Wrap `inner` (made for the global layers of `shape`) for a model of `shape` whose
    /// layers `sliding` names attend over a window.
    pub fn new(inner: Box<dyn KvPool + 'p>, shape: KvShape, sliding: SlidingWindow) -> Self {
        Self {
            inner,
            layout: Layout::new(shape, &sliding),
            seqs: HashMap::new(),
        }
    }
}

impl KvPool for WindowedPool<'_> {
    fn shape(&self) -> KvShape {
        self.layout.shape
    }

    fn sliding_window(&self) -> Option<usize> {
        Some(self.layout.window)
    }

    fn open(&mut self, seq: SeqId, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        self.inner.open(seq, mode, capacity)?;
        self.seqs.insert(seq, Rings::new(&self.layout));
        Ok(())
    }

    fn open_cached(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
        prompt: &[u32],
        _cache: CacheUse,
    ) -> Result<usize, KvError> {
        self.inner
            .open_cached(seq, mode, capacity, prompt, CacheUse::Off)?;
        self.seqs.insert(seq, Rings::new(&self.layout));
        Ok(0)
    }

    fn release(&mut self, seq: SeqId) {
        self.inner.release(seq);
        self.seqs.remove(&seq);
    }

    fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        let inner = self.inner.len(seq)?;
        let rings = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        Ok(rings.len().map_or(inner, |r| r.min(inner)))
    }

    fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        self.inner.capacity(seq)
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        match self.layout.slot(layer)? {
            Slot::Global(g) => self.inner.append(seq, g, k, v, q),
            Slot::Local(i) => {
                let capacity = self.inner.capacity(seq)?;
                let rings = self
                    .seqs
                    .get_mut(&seq)
                    .ok_or(KvError::UnknownSequence(seq))?;
                rings.append(&self.layout, layer, i, k, v, capacity)
            }
        }
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>> {
        match self.layout.slot(layer) {
            Err(e) => items
                .iter()
                .map(|_| Err(KvError::BadInput(e.to_string())))
                .collect(),
            Ok(Slot::Global(g)) => self.inner.attend(g, items),
            Ok(Slot::Local(i)) => items
                .iter_mut()
                .map(|it| {
                    self.layout.shape.check_attend(layer, it.q, it.out)?;
                    let rings = self
                        .seqs
                        .get(&it.seq)
                        .ok_or(KvError::UnknownSequence(it.seq))?;
                    rings.attend(&self.layout, i, it.q, it.first_pos, it.out)
                })
                .collect(),
        }
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        self.inner.truncate(seq, len);
        if let Some(r) = self.seqs.get_mut(&seq) {
            r.truncate(&self.layout, len);
        }
    }

    fn stats(&self) -> EngineStats {
        self.inner.stats()
    }

    fn seq_stats(&self, seq: SeqId) -> EngineStats {
        self.inner.seq_stats(seq)
    }

    fn clear_prefix_cache(&mut self) -> Result<u64, KvError> {
        self.inner.clear_prefix_cache()
    }

    fn prefix_stats(&self) -> Option<PrefixCacheStats> {
        self.inner.prefix_stats()
    }
}

/// A [`KvCache`] for a model with sliding-window layers: `inner` holds the global layers,
/// the local layers live in RAM rings here.
pub struct WindowedCache<C: KvCache> {
    inner: C,
    layout: Layout,
    rings: Rings,
}

impl<C: KvCache> WindowedCache<C> {
    /// Wrap `inner` (made for the global layers of `shape`) for a model of `shape` whose
    /// layers `sliding` names attend over a window.
    pub fn new(inner: C, shape: KvShape, sliding: SlidingWindow) -> Self {
        let layout = Layout::new(shape, &sliding);
        let rings = Rings::new(&layout);
        Self {
            inner,
            layout,
            rings,
        }
    }
}

impl<C: KvCache> KvCache for WindowedCache<C> {
    fn shape(&self) -> KvShape {
        self.layout.shape
    }

    fn sliding_window(&self) -> Option<usize> {
        Some(self.layout.window)
    }

    fn len(&self) -> usize {
        let inner = self.inner.len();
        self.rings.len().map_or(inner, |r| r.min(inner))
    }

    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<(), KvError> {
        match self.layout.slot(layer)? {
            Slot::Global(g) => self.inner.append(g, k, v),
            Slot::Local(i) => {
                let capacity = self.inner.capacity();
                self.rings.append(&self.layout, layer, i, k, v, capacity)
            }
        }
    }

    fn attend(
        &mut self,
        layer: usize,
        q: &[f32],
        first_pos: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        match self.layout.slot(layer)? {
            Slot::Global(g) => self.inner.attend(g, q, first_pos, out),
            Slot::Local(i) => {
                self.layout.shape.check_attend(layer, q, out)?;
                self.rings.attend(&self.layout, i, q, first_pos, out)
            }
        }
    }

    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len);
        self.rings.truncate(&self.layout, len);
    }
}
