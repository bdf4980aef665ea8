//! One run's sequences: opened in every engine, prefilled once, split into the exact
//! reference and one sparse copy per policy, decoded side by side; with the progress bar and
//! the work counters.

use super::engines::Engines;
use crate::greedy::Greedy;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use instinfer_runtime::kv::{AttentionMode, KvPool, SeqId};
use instinfer_runtime::model::Model;
use instinfer_runtime::tokenizer::Tokenizer;
use std::time::Instant;

/// Prefill and decode work done, and the time it took.
#[derive(Clone, Copy, Default)]
pub struct Work {
    /// Tokens prefilled.
    pub prefill_tokens: usize,
    /// Seconds spent prefilling.
    pub prefill_secs: f64,
    /// Batched decode steps.
    pub decode_steps: usize,
    /// Seconds spent in decode steps.
    pub decode_secs: f64,
}

/// The model, the engines and the sequences of one run.
pub struct Session<'a> {
    greedy: Greedy<'a>,
    /// The tokenizer.
    pub tok: &'a Tokenizer,
    /// The engines the sequences live in.
    pub eng: Engines,
    /// Sparse policies; policy `v` lives in engine `v + 1`.
    variants: usize,
    next_seq: SeqId,
    chunk: usize,
    /// Prefill progress, on stderr.
    pub pb: ProgressBar,
    /// The work done so far.
    pub work: Work,
}

impl<'a> Session<'a> {
    /// A session of `model` over `eng`, whose engines after the first run `variants` sparse
    /// policies; prompts are prefilled `chunk` tokens at a time, counted on `pb`.
    pub fn new(
        model: &'a Model,
        tok: &'a Tokenizer,
        eng: Engines,
        variants: usize,
        chunk: usize,
        pb: ProgressBar,
    ) -> Self {
        Session {
            greedy: Greedy::new(model),
            tok,
            eng,
            variants,
            next_seq: 0,
            chunk,
            pb,
            work: Work::default(),
        }
    }

    /// A result line on stdout, around the progress bar (shown or not).
    pub fn say(&self, line: String) {
        self.pb.suspend(|| println!("{line}"));
    }

    fn fresh(&mut self) -> SeqId {
        self.next_seq += 1;
        self.next_seq
    }

    /// A new exact sequence held by every engine.
    pub fn open_all(&mut self) -> Result<SeqId> {
        let seq = self.fresh();
        let ctx = self.greedy.model().config.context_len;
        self.eng
            .open(seq, AttentionMode::Full, ctx)
            .with_context(|| format!("opening sequence {seq}"))?;
        Ok(seq)
    }

    /// A copy of `src` (held by every engine) held by every engine.
    pub fn branch(&mut self, src: SeqId) -> Result<SeqId> {
        let dst = self.fresh();
        self.eng.clone_all(src, dst, AttentionMode::Full)?;
        Ok(dst)
    }

    /// Turn a prefilled prompt `seq` (held by every engine) into the decode set: `seq` itself
    /// as the exact reference (reference engine only), and one sparse copy per policy.
    pub fn split(&mut self, seq: SeqId) -> Result<Vec<SeqId>> {
        let mut set = vec![seq];
        for v in 0..self.variants {
            let dst = self.fresh();
            self.eng
                .clone_into(seq, dst, v + 1, AttentionMode::Sparse)?;
            set.push(dst);
        }
        self.eng.narrow(seq, 0);
        Ok(set)
    }

    /// Drops `seq` from the engines holding it.
    pub fn release(&mut self, seq: SeqId) {
        self.eng.release(seq);
    }

    /// Prefill `tokens` into `seq` in chunks; returns the last position's argmax.
    pub fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<u32> {
        let t0 = Instant::now();
        let pb = &self.pb;
        let next = self
            .greedy
            .prefill(&mut self.eng, seq, tokens, self.chunk, true, |n| {
                pb.inc(n as u64)
            })?
            .unwrap_or_default();
        self.work.prefill_tokens += tokens.len();
        self.work.prefill_secs += t0.elapsed().as_secs_f64();
        Ok(next)
    }

    /// One decode step for several sequences in one batch; the argmax of each.
    pub fn step(&mut self, items: &[(SeqId, u32)]) -> Result<Vec<u32>> {
        let t0 = Instant::now();
        let out = self.greedy.step(&mut self.eng, items)?;
        self.work.decode_steps += 1;
        self.work.decode_secs += t0.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Generate up to `max` tokens from `first` on every sequence of `seqs` side by side
    /// (greedy; each stops at an end-of-generation token). Returns each one's ids.
    pub fn answers(&mut self, seqs: &[SeqId], first: u32, max: usize) -> Result<Vec<Vec<u32>>> {
        let n = seqs.len();
        let mut outs = vec![Vec::new(); n];
        let mut live = vec![true; n];
        let mut next = vec![first; n];
        loop {
            for i in 0..n {
                if live[i] {
                    if self.tok.is_eog(next[i]) {
                        live[i] = false;
                    } else {
                        outs[i].push(next[i]);
                        live[i] = outs[i].len() < max;
                    }
                }
            }
            let idx: Vec<usize> = (0..n).filter(|&i| live[i]).collect();
            if idx.is_empty() {
                return Ok(outs);
            }
            let items: Vec<(SeqId, u32)> = idx.iter().map(|&i| (seqs[i], next[i])).collect();
            let got = self.step(&items)?;
            for (&i, t) in idx.iter().zip(got) {
                next[i] = t;
            }
        }
    }
}
