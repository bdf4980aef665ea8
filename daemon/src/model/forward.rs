//! The forward pass of a Llama-family block stack over a chunk of tokens of one sequence.

use super::kv_cache::KvCache;
use super::weights::MatW;
use super::{Model, ModelError};
use instinfer_kernels::matmul::{matmul_quantized_many, QuantizedActs};
use instinfer_kernels::ops::{add_assign, rms_norm, swiglu};
use instinfer_kernels::team::{with_team, Team};
use instinfer_kernels::GgmlType;

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
    acts_ty: Option<GgmlType>,
    transposed: Vec<f32>,
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
        jobs: &[(&MatW, Output)],
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

impl Model {
    /// Run `tokens` (at positions `cache.len()..`) through the model, appending their K/V to
    /// `cache`. The logits asked for are left in `ws.logits` (`rows × vocab`).
    pub fn forward(
        &self,
        cache: &mut dyn KvCache,
        tokens: &[u32],
        ws: &mut Workspace,
        logits: Logits,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let n = tokens.len();
        let pos0 = cache.len();
        if pos0 + n > c.context_len.min(cache.capacity()) {
            return Err(ModelError::ContextFull {
                needed: pos0 + n,
                context: c.context_len.min(cache.capacity()),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::BadToken {
                id,
                vocab: c.vocab_size,
            });
        }
        let file = self.file.file_bytes();
        let w = &self.weights;
        ws.x.resize(n * c.dim, 0.0);
        for (t, row) in tokens.iter().zip(ws.x.chunks_exact_mut(c.dim)) {
            w.token_embd.dequantize_row(file, *t as usize, row);
        }
        // A single token's products are small: a spinning team splits them with less
        // hand-off cost than the rayon pool (see kernels::team).
        let helpers = rayon::current_num_threads().saturating_sub(1);
        if n == 1 && helpers > 0 {
            with_team(helpers, |team| {
                self.stack(cache, n, pos0, ws, file, logits, Some(team))
            })
        } else {
            self.stack(cache, n, pos0, ws, file, logits, None)
        }
    }

    /// The block stack and the LM head.
    #[allow(clippy::too_many_arguments)]
    fn stack<'w>(
        &self,
        cache: &mut dyn KvCache,
        n: usize,
        pos0: usize,
        ws: &mut Workspace,
        file: &'w [u8],
        logits: Logits,
        team: Option<&Team<'_, 'w>>,
    ) -> Result<(), ModelError> {
        let (c, w) = (&self.config, &self.weights);
        let result = self.blocks(cache, n, pos0, ws, file, team);
        if result.is_err() {
            // Leave the cache as it was before this chunk.
            cache.truncate(pos0);
        }
        result?;
        let rows = match logits {
            Logits::None => return Ok(()),
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let xs = &ws.x[rows.start * c.dim..rows.end * c.dim];
        norm_rows(xs, &w.output_norm, c.rms_eps, &mut ws.h);
        ws.invalidate();
        ws.matmuls(
            file,
            Input::H,
            rows.len(),
            &[(&w.output, Output::Logits)],
            team,
        );
        Ok(())
    }

    fn blocks<'w>(
        &self,
        cache: &mut dyn KvCache,
        n: usize,
        pos0: usize,
        ws: &mut Workspace,
        file: &'w [u8],
        team: Option<&Team<'_, 'w>>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        for (li, l) in self.weights.layers.iter().enumerate() {
            norm_rows(&ws.x, &l.attn_norm, c.rms_eps, &mut ws.h);
            ws.invalidate();
            ws.matmuls(
                file,
                Input::H,
                n,
                &[(&l.wq, Output::Q), (&l.wk, Output::K), (&l.wv, Output::V)],
                team,
            );
            add_bias(&mut ws.q, l.bq.as_ref());
            add_bias(&mut ws.k, l.bk.as_ref());
            add_bias(&mut ws.v, l.bv.as_ref());
            for t in 0..n {
                self.rope.apply(
                    &mut ws.q[t * c.q_dim()..(t + 1) * c.q_dim()],
                    c.head_dim,
                    pos0 + t,
                );
                self.rope.apply(
                    &mut ws.k[t * c.kv_dim()..(t + 1) * c.kv_dim()],
                    c.head_dim,
                    pos0 + t,
                );
            }
            cache.append(li, &ws.k, &ws.v)?;
            ws.attn.resize(n * c.q_dim(), 0.0);
            cache.attend(li, &ws.q, pos0, &mut ws.attn)?;
            ws.invalidate();
            ws.matmuls(file, Input::Attn, n, &[(&l.wo, Output::Proj)], team);
            add_assign(&mut ws.x, &ws.proj);

            norm_rows(&ws.x, &l.ffn_norm, c.rms_eps, &mut ws.h);
            ws.invalidate();
            ws.matmuls(
                file,
                Input::H,
                n,
                &[(&l.w_gate, Output::Gate), (&l.w_up, Output::Up)],
                team,
            );
            swiglu(&mut ws.gate, &ws.up);
            ws.invalidate();
            ws.matmuls(file, Input::Gate, n, &[(&l.w_down, Output::Proj)], team);
            add_assign(&mut ws.x, &ws.proj);
        }
        Ok(())
    }
}
