//! The generation loop: chunked prefill, then decode with sampling, streaming text out,
//! stopping on end-of-generation tokens, stop strings, the token limit or the context end.

use crate::kv::{KvCache, KvPool, OneCache, SeqId, ONE_CACHE_SEQ};
use crate::model::{Logits, Model, ModelError, SeqChunk, Workspace};
use crate::sampling::{Sampler, SamplingError, SamplingParams};
use crate::tokenizer::Tokenizer;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

/// Errors that end a generation request.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The request has no prompt tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The tokens already held plus the prompt do not fit the context.
    #[error("the prompt has {prompt} tokens but the context holds {context}")]
    PromptTooLong {
        /// Tokens already held plus the prompt's.
        prompt: usize,
        /// Tokens the sequence may hold: the model's context length or the cache's capacity,
        /// whichever is smaller.
        context: usize,
    },
    /// `max_tokens` is 0.
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    /// One of the stop strings is empty.
    #[error("stop strings must not be empty")]
    EmptyStop,
    /// The sampling parameters are invalid.
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    /// The forward pass or the KV cache failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The caller asked to stop.
    Aborted,
}

impl FinishReason {
    /// The reason's lowercase name: `stop`, `length` or `aborted`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Aborted => "aborted",
        }
    }
}

/// One generation request, already tokenized.
#[derive(Clone, Debug)]
pub struct GenerateRequest {
    /// The prompt's token ids; must not be empty.
    pub prompt: Vec<u32>,
    /// How to pick each next token.
    pub sampling: SamplingParams,
    /// The most tokens to generate; at least 1.
    pub max_tokens: usize,
    /// Strings that end generation when the output contains one; the stop string and anything
    /// after it are left out of the text. None may be empty.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
}

impl GenerateRequest {
    /// A request for `prompt` with at most `max_tokens` tokens, default sampling, no stop
    /// strings.
    pub fn new(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// What a finished generation produced, with timings.
#[derive(Clone, Debug)]
pub struct GenerateOutput {
    /// The generated token ids. An end-of-generation token that ended the run is not included.
    pub ids: Vec<u32>,
    /// The generated text, without a stop string that ended it.
    pub text: String,
    /// Why generation ended.
    pub finish: FinishReason,
    /// Number of prompt tokens.
    pub prompt_tokens: usize,
    /// Wall time of the prefill.
    pub prefill_time: Duration,
    /// Wall time from the end of the prefill to the end of generation.
    pub decode_time: Duration,
    /// Wall time from the start of the prefill to the first sampled token.
    pub time_to_first_token: Duration,
}

impl GenerateOutput {
    /// Decode throughput: tokens after the first, per second of decode time.
    pub fn decode_tokens_per_sec(&self) -> f64 {
        let n = self.ids.len().saturating_sub(1);
        if n == 0 || self.decode_time.is_zero() {
            0.0
        } else {
            n as f64 / self.decode_time.as_secs_f64()
        }
    }
}

/// Text held back while it could still turn into a stop string.
pub struct StopFilter<'a> {
    /// The stop strings.
    pub stops: &'a [String],
    /// Text held back so far.
    pub pending: String,
}

impl<'a> StopFilter<'a> {
    /// Add `text`; returns (text safe to emit, whether a stop string was completed).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The text still held back, released at the end of a generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Runs generations for one model and tokenizer.
pub struct Generator<'a> {
    /// The model to run.
    pub model: &'a Model,
    /// Its tokenizer, for end-of-generation tokens and decoding.
    pub tokenizer: &'a Tokenizer,
    /// Tokens per prefill chunk.
    pub prefill_chunk: usize,
}

impl<'a> Generator<'a> {
    /// A generator with prefill chunks of 512 tokens.
    pub fn new(model: &'a Model, tokenizer: &'a Tokenizer) -> Self {
        Self {
            model,
            tokenizer,
            prefill_chunk: 512,
        }
    }

    /// Check a request before any work is done.
    pub fn validate(
        &self,
        req: &GenerateRequest,
        cache: &dyn KvCache,
    ) -> Result<(), GenerateError> {
        self.validate_at(req, cache.len(), cache.capacity())
    }

    /// Check a request for a sequence holding `held` of at most `capacity` tokens.
    pub fn validate_at(
        &self,
        req: &GenerateRequest,
        held: usize,
        capacity: usize,
    ) -> Result<(), GenerateError> {
        if req.prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if req.max_tokens == 0 {
            return Err(GenerateError::ZeroMaxTokens);
        }
        if req.stop.iter().any(String::is_empty) {
            return Err(GenerateError::EmptyStop);
        }
        req.sampling.validate()?;
        let context = self.model.config.context_len.min(capacity);
        if held + req.prompt.len() > context {
            return Err(GenerateError::PromptTooLong {
                prompt: held + req.prompt.len(),
                context,
            });
        }
        Ok(())
    }

    /// Prefill the prompt into `cache` in chunks; leaves the last position's logits in `ws`.
    pub fn prefill(
        &self,
        cache: &mut dyn KvCache,
        prompt: &[u32],
        ws: &mut Workspace,
    ) -> Result<(), ModelError> {
        self.prefill_seq(&mut OneCache(cache), ONE_CACHE_SEQ, prompt, ws)
    }

    /// Prefill `prompt` into sequence `seq` of `pool` in chunks; leaves the last position's
    /// logits in `ws`.
    pub fn prefill_seq(
        &self,
        pool: &mut dyn KvPool,
        seq: SeqId,
        prompt: &[u32],
        ws: &mut Workspace,
    ) -> Result<(), ModelError> {
        let chunk = self.prefill_chunk.max(1);
        let n_chunks = prompt.len().div_ceil(chunk);
        for (i, part) in prompt.chunks(chunk).enumerate() {
            let logits = if i + 1 == n_chunks {
                Logits::Last
            } else {
                Logits::None
            };
            self.step(pool, seq, part, ws, logits)?;
        }
        Ok(())
    }

    /// One forward step of one sequence.
    fn step(
        &self,
        pool: &mut dyn KvPool,
        seq: SeqId,
        tokens: &[u32],
        ws: &mut Workspace,
        logits: Logits,
    ) -> Result<(), ModelError> {
        let chunk = SeqChunk {
            seq,
            tokens,
            logits,
        };
        let mut r = self.model.forward_batch(pool, &[chunk], ws);
        r.pop().expect("one result per chunk").map(|_| ())
    }

    /// Generate for `req`, calling `on_token(id, text)` for every token (text may be empty
    /// while a character or a possible stop string is incomplete). Returning
    /// `ControlFlow::Break` stops with [`FinishReason::Aborted`].
    pub fn generate(
        &self,
        cache: &mut dyn KvCache,
        req: &GenerateRequest,
        on_token: impl FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<GenerateOutput, GenerateError> {
        self.generate_seq(&mut OneCache(cache), ONE_CACHE_SEQ, req, on_token)
    }

    /// [`Generator::generate`] on sequence `seq` (already open) of `pool`.
    pub fn generate_seq(
        &self,
        pool: &mut dyn KvPool,
        seq: SeqId,
        req: &GenerateRequest,
        mut on_token: impl FnMut(u32, &str) -> ControlFlow<()>,
    ) -> Result<GenerateOutput, GenerateError> {
        let (held, capacity) = (
            pool.len(seq).map_err(ModelError::from)?,
            pool.capacity(seq).map_err(ModelError::from)?,
        );
        self.validate_at(req, held, capacity)?;
        let mut sampler = Sampler::new(req.sampling.clone())?;
        let mut ws = Workspace::default();
        let start = Instant::now();
        self.prefill_seq(pool, seq, &req.prompt, &mut ws)?;
        let prefill_time = start.elapsed();
        let context = self.model.config.context_len.min(capacity);
        let mut decoder = self.tokenizer.stream_decoder();
        let mut stops = StopFilter {
            stops: &req.stop,
            pending: String::new(),
        };
        let (mut ids, mut text) = (Vec::new(), String::new());
        let mut ttft = Duration::ZERO;
        let decode_start = Instant::now();
        let mut hit_stop_string = false;
        let finish = loop {
            let id = sampler.sample(&ws.logits);
            if ids.is_empty() {
                ttft = start.elapsed();
            }
            if !req.ignore_eos && self.tokenizer.is_eog(id) {
                break FinishReason::Stop;
            }
            ids.push(id);
            let (piece, stopped) = stops.push(&decoder.push(id));
            text.push_str(&piece);
            if stopped {
                hit_stop_string = true;
                let _ = on_token(id, &piece);
                break FinishReason::Stop;
            }
            if on_token(id, &piece).is_break() {
                break FinishReason::Aborted;
            }
            if ids.len() >= req.max_tokens || pool.len(seq).map_err(ModelError::from)? >= context {
                break FinishReason::Length;
            }
            self.step(pool, seq, &[id], &mut ws, Logits::Last)?;
        };
        if !hit_stop_string {
            let (tail, _) = stops.push(&decoder.finish());
            let rest = tail + &stops.finish();
            text.push_str(&rest);
            if !rest.is_empty() {
                let _ = on_token(*ids.last().unwrap_or(&0), &rest);
            }
        }
        Ok(GenerateOutput {
            ids,
            text,
            finish,
            prompt_tokens: req.prompt.len(),
            prefill_time,
            decode_time: decode_start.elapsed(),
            time_to_first_token: ttft,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    #[test]
    fn stop_strings_are_held_back_until_decided() {
        let stops = vec!["</end>".to_string()];
        let mut f = StopFilter {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(f.push("hello <"), ("hello ".to_string(), false));
        assert_eq!(f.push("/en"), (String::new(), false));
        assert_eq!(f.push("d> tail"), (String::new(), true));
        let mut f = StopFilter {
            stops: &stops,
            pending: String::new(),
        };
        assert_eq!(f.push("a </x"), ("a </x".to_string(), false));
        assert_eq!(f.push("ü<"), ("ü".to_string(), false));
        assert_eq!(f.finish(), "<");
    }
}
