//! The forward pass of a Llama-family block stack over a batch of sequences: each brings a
//! chunk of tokens (a prefill chunk or one decode token). The dense products run once over all
//! rows of the batch; attention goes to the [`KvPool`] as one call per layer for the whole batch.

use super::weights::MatW;
use super::{Model, ModelError};
use crate::kv::{AttendReq, KvCache, KvPool, OneCache, SeqId, ONE_CACHE_SEQ};
use instinfer_kernels::matmul::{matmul_quantized_many, QuantizedActs};
use instinfer_kernels::ops::{add_assign, geglu, rms_norm, swiglu};
use instinfer_kernels::team::{with_team, Team};
use instinfer_kernels::GgmlType;
use std::ops::Range;

/// Which positions of a chunk need logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token (generation).
    Last,
    /// Every token (teacher forcing, scoring).
    All,
    /// None (a prefill chunk that is not the last).
    None,
}

/// Buffers reused across forward calls.
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    acts: QuantizedActs,
    norm_tmp: Vec<f32>,
    acts_ty: Option<GgmlType>,
    transposed: Vec<f32>,
    gathered: Vec<f32>,
    /// Logits of the rows asked for, `rows × vocab`, sequences in batch order.
    pub logits: Vec<f32>,
}

impl Workspace {
    /// Multiply `input` (`n` rows) by every matrix of `jobs`, writing each product to its
    /// output buffer. Matrices that share an activation type share one quantization of the
    /// input, and a single token runs them in one parallel region.
    fn matmuls<'w>(
        &mut self,
        file: &'w [u8],
        input: Input,
        n: usize,
        jobs: &[(&'w MatW, Output)],
        team: Option<&Team<'_, 'w>>,
    ) {
        let mut i = 0;
        while i < jobs.len() {
            let vt = jobs[i].0.ty.vec_dot_type();
            let group_end = jobs[i..]
                .iter()
                .position(|(w, _)| w.ty.vec_dot_type() != vt)
                .map_or(jobs.len(), |p| i + p);
            let group = &jobs[i..group_end];
            let cols = group[0].0.cols;
            if self.acts_ty != Some(vt) {
                let x = match input {
                    Input::H => &self.h,
                    Input::Attn => &self.attn,
                    Input::Gate => &self.gate,
                };
                match team {
                    Some(team) => team.quantize(vt, &x[..cols]),
                    None => self.acts.quantize(vt, &x[..n * cols], n, cols),
                }
                .expect("activation row length checked at load");
                self.acts_ty = Some(vt);
            }
            let mut outs: Vec<Vec<f32>> = group
                .iter()
                .map(|(w, o)| {
                    let mut v = std::mem::take(self.output(*o));
                    v.resize(n * w.rows, 0.0);
                    v
                })
                .collect();
            {
                let mut pairs: Vec<_> = group
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|((w, _), v)| (w.view(file), v.as_mut_slice()))
                    .collect();
                match team {
                    Some(team) => team.matmul_many(&mut pairs),
                    None => matmul_quantized_many(&mut pairs, &self.acts, &mut self.transposed),
                }
                .expect("matrix validated at load");
            }
            for ((_, o), v) in group.iter().zip(outs) {
                *self.output(*o) = v;
            }
            i = group_end;
        }
    }

    fn output(&mut self, o: Output) -> &mut Vec<f32> {
        match o {
            Output::Q => &mut self.q,
            Output::K => &mut self.k,
            Output::V => &mut self.v,
            Output::Proj => &mut self.proj,
            Output::Gate => &mut self.gate,
            Output::Up => &mut self.up,
            Output::Logits => &mut self.logits,
        }
    }

    /// The input buffer changed: the cached quantization is stale.
    fn invalidate(&mut self) {
        self.acts_ty = None;
    }
}

#[derive(Clone, Copy)]
enum Input {
    H,
    Attn,
    Gate,
}

#[derive(Clone, Copy)]
enum Output {
    Q,
    K,
    V,
    Proj,
    Gate,
    Up,
    Logits,
}

fn add_bias(x: &mut [f32], bias: Option<&Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            add_assign(row, b);
        }
    }
}

fn norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    for (xr, or) in x.chunks_exact(w.len()).zip(out.chunks_exact_mut(w.len())) {
        rms_norm(xr, w, eps, or);
    }
}

/// RMSNorm of every `w.len()`-wide row of `x` in place (Gemma's per-head Q/K norms and its
/// norms after attention and after the feed-forward block).
fn norm_in_place(x: &mut [f32], w: &[f32], eps: f32, tmp: &mut Vec<f32>) {
    tmp.resize(w.len(), 0.0);
    for row in x.chunks_exact_mut(w.len()) {
        rms_norm(row, w, eps, tmp);
        row.copy_from_slice(tmp);
    }
}

impl Model {
    /// Run `tokens` (at positions `cache.len()..`) through the model, appending their K/V to
    /// `cache`. The logits asked for are left in `ws.logits` (`rows × vocab`). On error the
    /// cache is left as it was before the call.
    pub fn forward(
        &self,
        cache: &mut dyn KvCache,
        tokens: &[u32],
        ws: &mut Workspace,
        logits: Logits,
    ) -> Result<(), ModelError> {
        let chunk = SeqChunk {
            seq: ONE_CACHE_SEQ,
            tokens,
            logits,
        };
        let mut pool = OneCache(cache);
        let mut results = self.forward_batch(&mut pool, &[chunk], ws);
        results.pop().expect("one result per chunk").map(|_| ())
    }

    /// One step for a batch of sequences of `pool`: each chunk's tokens go at positions
    /// `pool.len(seq)..` of its sequence and their K/V are appended there. Returns, per chunk,
    /// the rows of `ws.logits` holding its logits, or the error that ended that chunk; a
    /// failed chunk leaves its sequence as it was and the others go on.
    pub fn forward_batch(
        &self,
        pool: &mut dyn KvPool,
        chunks: &[SeqChunk<'_>],
        ws: &mut Workspace,
    ) -> Vec<Result<Range<usize>, ModelError>> {
        let c = &self.config;
        let mut parts = Vec::with_capacity(chunks.len());
        let mut rows = 0;
        for ch in chunks {
            let checked = self.check_chunk(pool, ch);
            let n = ch.tokens.len();
            let (pos0, error) = match checked {
                Ok(pos0) => (pos0, None),
                Err(e) => (0, Some(e)),
            };
            let row0 = rows;
            if error.is_none() {
                rows += n;
            }
            parts.push(Part {
                seq: ch.seq,
                rows: row0..row0 + if error.is_none() { n } else { 0 },
                pos0,
                error,
            });
        }
        let file = self.file.file_bytes();
        ws.logits.clear();
        for (p, ch) in parts.iter().zip(chunks).filter(|(p, _)| p.live()) {
            ws.x.resize(rows * c.dim, 0.0);
            let x = &mut ws.x[p.rows.start * c.dim..p.rows.end * c.dim];
            for (t, row) in ch.tokens.iter().zip(x.chunks_exact_mut(c.dim)) {
                self.weights
                    .token_embd
                    .dequantize_row(file, *t as usize, row);
                if c.arch.is_gemma() {
                    let scale = (c.dim as f32).sqrt();
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            }
        }
        // A single token's products are small: a spinning team splits them with less
        // hand-off cost than the rayon pool (see kernels::team).
        let helpers = rayon::current_num_threads().saturating_sub(1);
        let wanted = if rows == 1 && helpers > 0 {
            with_team(helpers, |team| {
                self.blocks(pool, &mut parts, rows, ws, file, Some(team));
                self.head(&parts, chunks, ws, file, Some(team))
            })
        } else {
            if rows > 0 {
                self.blocks(pool, &mut parts, rows, ws, file, None);
            }
            self.head(&parts, chunks, ws, file, None)
        };
        parts
            .into_iter()
            .zip(wanted)
            .map(|(p, w)| match p.error {
                Some(e) => Err(e),
                None => Ok(w),
            })
            .collect()
    }

    /// Where `ch` starts in its sequence, after checking that the pool keeps this model's
    /// sliding window, and that the chunk fits and names real tokens.
    fn check_chunk(&self, pool: &dyn KvPool, ch: &SeqChunk<'_>) -> Result<usize, ModelError> {
        let c = &self.config;
        let window = c.sliding.as_ref().map(|s| s.window);
        if pool.sliding_window() != window {
            return Err(ModelError::WindowMismatch {
                model: window,
                pool: pool.sliding_window(),
            });
        }
        let pos0 = pool.len(ch.seq)?;
        let context = c.context_len.min(pool.capacity(ch.seq)?);
        let n = ch.tokens.len();
        if n == 0 {
            return Err(ModelError::EmptyChunk { seq: ch.seq });
        }
        if pos0 + n > context {
            return Err(ModelError::ContextFull {
                needed: pos0 + n,
                context,
            });
        }
        if let Some(&id) = ch.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::BadToken {
                id,
                vocab: c.vocab_size,
            });
        }
        Ok(pos0)
    }

    /// The block stack over all `rows` of the batch. A part whose append or attention fails
    /// is marked, rolled back to where it started, and carried along on zeros.
    fn blocks<'w>(
        &'w self,
        pool: &mut dyn KvPool,
        parts: &mut [Part],
        rows: usize,
        ws: &mut Workspace,
        file: &'w [u8],
        team: Option<&Team<'_, 'w>>,
    ) {
        let c = &self.config;
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        for (li, l) in self.weights.layers.iter().enumerate() {
            norm_rows(&ws.x, &l.attn_norm, c.rms_eps, &mut ws.h);
            ws.invalidate();
            ws.matmuls(
                file,
                Input::H,
                rows,
                &[(&l.wq, Output::Q), (&l.wk, Output::K), (&l.wv, Output::V)],
                team,
            );
            add_bias(&mut ws.q, l.bq.as_ref());
            add_bias(&mut ws.k, l.bk.as_ref());
            add_bias(&mut ws.v, l.bv.as_ref());
            if let Some(g) = &l.gemma {
                norm_in_place(
                    &mut ws.q[..rows * qd],
                    &g.q_norm,
                    c.rms_eps,
                    &mut ws.norm_tmp,
                );
                norm_in_place(
                    &mut ws.k[..rows * kvd],
                    &g.k_norm,
                    c.rms_eps,
                    &mut ws.norm_tmp,
                );
            }
            let rope = self.rope_for(li);
            for p in parts.iter().filter(|p| !p.rows.is_empty()) {
                for (i, r) in p.rows.clone().enumerate() {
                    let pos = p.pos0 + i;
                    rope.apply(&mut ws.q[r * qd..(r + 1) * qd], c.head_dim, pos);
                    rope.apply(&mut ws.k[r * kvd..(r + 1) * kvd], c.head_dim, pos);
                }
            }
            for p in parts.iter_mut().filter(|p| p.live()) {
                let (r, kv) = (p.rows.clone(), p.rows.start * kvd..p.rows.end * kvd);
                let q = &ws.q[r.start * qd..r.end * qd];
                if let Err(e) = pool.append(p.seq, li, &ws.k[kv.clone()], &ws.v[kv], q) {
                    p.fail(pool, e.into());
                }
            }
            ws.attn.clear();
            ws.attn.resize(rows * qd, 0.0);
            let results = {
                let mut items = Vec::with_capacity(parts.len());
                let mut rest: &mut [f32] = &mut ws.attn;
                let mut at = 0;
                for p in parts.iter().filter(|p| p.live()) {
                    let skip = std::mem::take(&mut rest);
                    let (_, tail) = skip.split_at_mut((p.rows.start - at) * qd);
                    let (out, tail) = tail.split_at_mut(p.rows.len() * qd);
                    rest = tail;
                    at = p.rows.end;
                    items.push(AttendReq {
                        seq: p.seq,
                        q: &ws.q[p.rows.start * qd..p.rows.end * qd],
                        first_pos: p.pos0,
                        out,
                    });
                }
                pool.attend(li, &mut items)
            };
            let live: Vec<usize> = (0..parts.len()).filter(|&i| parts[i].live()).collect();
            for (i, r) in live.into_iter().zip(results) {
                if let Err(e) = r {
                    let p = &mut parts[i];
                    ws.attn[p.rows.start * qd..p.rows.end * qd].fill(0.0);
                    p.fail(pool, e.into());
                }
            }
            ws.invalidate();
            ws.matmuls(file, Input::Attn, rows, &[(&l.wo, Output::Proj)], team);
            if let Some(g) = &l.gemma {
                norm_in_place(&mut ws.proj, &g.post_attn_norm, c.rms_eps, &mut ws.norm_tmp);
            }
            add_assign(&mut ws.x, &ws.proj);

            norm_rows(&ws.x, &l.ffn_norm, c.rms_eps, &mut ws.h);
            ws.invalidate();
            ws.matmuls(
                file,
                Input::H,
                rows,
                &[(&l.w_gate, Output::Gate), (&l.w_up, Output::Up)],
                team,
            );
            if l.gemma.is_some() {
                geglu(&mut ws.gate, &ws.up);
            } else {
                swiglu(&mut ws.gate, &ws.up);
            }
            ws.invalidate();
            ws.matmuls(file, Input::Gate, rows, &[(&l.w_down, Output::Proj)], team);
            if let Some(g) = &l.gemma {
                norm_in_place(&mut ws.proj, &g.post_ffn_norm, c.rms_eps, &mut ws.norm_tmp);
            }
            add_assign(&mut ws.x, &ws.proj);
        }
    }

    /// The LM head over the rows each live part asked for; returns each part's rows of
    /// `ws.logits` (empty for failed parts and for `Logits::None`).
    fn head<'w>(
        &'w self,
        parts: &[Part],
        chunks: &[SeqChunk<'_>],
        ws: &mut Workspace,
        file: &'w [u8],
        team: Option<&Team<'_, 'w>>,
    ) -> Vec<Range<usize>> {
        let (c, w) = (&self.config, &self.weights);
        ws.gathered.clear();
        let mut out = Vec::with_capacity(parts.len());
        let mut n = 0;
        for (p, ch) in parts.iter().zip(chunks) {
            let want = match (p.live(), ch.logits) {
                (false, _) | (_, Logits::None) => 0..0,
                (true, Logits::Last) => p.rows.end - 1..p.rows.end,
                (true, Logits::All) => p.rows.clone(),
            };
            ws.gathered
                .extend_from_slice(&ws.x[want.start * c.dim..want.end * c.dim]);
            out.push(n..n + want.len());
            n += want.len();
        }
        if n > 0 {
            norm_rows(&ws.gathered, &w.output_norm, c.rms_eps, &mut ws.h);
            ws.invalidate();
            ws.matmuls(file, Input::H, n, &[(&w.output, Output::Logits)], team);
        }
        out
    }
}

/// One sequence's chunk in a batched forward step.
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    /// The sequence the tokens extend.
    pub seq: SeqId,
    /// The tokens, placed at positions `len(seq)..`; must not be empty.
    pub tokens: &'a [u32],
    /// Which of the chunk's positions need logits.
    pub logits: Logits,
}

/// A chunk's place in the batch while it runs.
struct Part {
    seq: SeqId,
    /// Its rows of the batch (empty when it was refused before running).
    rows: Range<usize>,
    pos0: usize,
    error: Option<ModelError>,
}

impl Part {
    fn live(&self) -> bool {
        self.error.is_none() && !self.rows.is_empty()
    }

    /// Record the error that ends this part and leave its sequence as it was.
    fn fail(&mut self, pool: &mut dyn KvPool, e: ModelError) {
        pool.truncate(self.seq, self.pos0);
        self.error = Some(e);
    }
}
