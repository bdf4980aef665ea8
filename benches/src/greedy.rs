//! Running the model over a KV pool the way the benchmarks do: a prompt prefilled in chunks,
//! then batched decode steps that feed each sequence one token and take the argmax of its
//! logits (greedy decoding).

use anyhow::{ensure, Context, Result};
use instinfer_kernels::ops::argmax;
use instinfer_runtime::kv::{KvPool, SeqId};
use instinfer_runtime::model::{Logits, Model, SeqChunk, Workspace};

/// A model with its scratch space, running prefills and greedy decode steps.
pub struct Greedy<'m> {
    model: &'m Model,
    ws: Workspace,
}

impl<'m> Greedy<'m> {
    /// Runs `model` with a fresh workspace.
    pub fn new(model: &'m Model) -> Self {
        Greedy {
            model,
            ws: Workspace::default(),
        }
    }

    /// The model this runs.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Prefills `tokens` into `seq`, `chunk` tokens per forward pass, calling `progress` with
    /// each pass's token count. With `next`, the last pass also computes the last position's
    /// logits and their greedy next token is returned; without, no logits are computed.
    pub fn prefill(
        &mut self,
        pool: &mut dyn KvPool,
        seq: SeqId,
        tokens: &[u32],
        chunk: usize,
        next: bool,
        mut progress: impl FnMut(usize),
    ) -> Result<Option<u32>> {
        ensure!(!tokens.is_empty(), "empty prefill");
        let n_chunks = tokens.len().div_ceil(chunk);
        let vocab = self.model.config.vocab_size;
        let mut token = None;
        for (i, part) in tokens.chunks(chunk).enumerate() {
            let logits = if next && i + 1 == n_chunks {
                Logits::Last
            } else {
                Logits::None
            };
            let c = SeqChunk {
                seq,
                tokens: part,
                logits,
            };
            let rows = self
                .model
                .forward_batch(pool, &[c], &mut self.ws)
                .pop()
                .context("no result for the prefill chunk")?
                .with_context(|| format!("prefill of sequence {seq}"))?;
            if logits == Logits::Last {
                let row = rows.end - 1;
                token = Some(greedy_token(
                    &self.ws.logits[row * vocab..(row + 1) * vocab],
                ));
            }
            progress(part.len());
        }
        Ok(token)
    }

    /// One decode step for every `(sequence, token)` of `items`, in one batch: each
    /// sequence's greedy next token.
    pub fn step(&mut self, pool: &mut dyn KvPool, items: &[(SeqId, u32)]) -> Result<Vec<u32>> {
        let chunks: Vec<SeqChunk<'_>> = items
            .iter()
            .map(|(seq, t)| SeqChunk {
                seq: *seq,
                tokens: std::slice::from_ref(t),
                logits: Logits::Last,
            })
            .collect();
        let vocab = self.model.config.vocab_size;
        let results = self.model.forward_batch(pool, &chunks, &mut self.ws);
        let mut out = Vec::with_capacity(items.len());
        for ((seq, _), r) in items.iter().zip(results) {
            let r = r.with_context(|| format!("decode step of sequence {seq}"))?;
            out.push(greedy_token(
                &self.ws.logits[r.start * vocab..(r.start + 1) * vocab],
            ));
        }
        Ok(out)
    }
}

/// The index of a logits row's largest value (the first of equals).
fn greedy_token(row: &[f32]) -> u32 {
    argmax(row).unwrap_or(0) as u32
}
