//! Continuous batching on a dedicated thread.
//!
//! Each step runs one batched forward pass over: one decode token of every running sequence
//! that has finished its prompt, plus at most `prefill_chunk_tokens` prompt tokens of the
//! sequences still prefilling, oldest first (a long prompt takes one chunk per step; several
//! short prompts that arrive together share one). New requests join the batch as soon as a
//! sequence slot is free, and running streams keep getting a token every step while a long
//! prompt is prefilled. Sampling, text decoding and stop strings run per sequence after the
//! step.
//!
//! The async side talks to the scheduler through [`Command`]s; the scheduler answers each
//! request on its own channel of stream messages.

use super::error::ServeError;
use super::metrics::{Interface, Outcome};
use super::service::Principal;
use super::Shared;
use instinfer_proto::v1::{
    generate_response::Event, FinishReason, Finished, GenerateResponse, Token, TokenLogprob, Usage,
};
use instinfer_runtime::generate::StopFilter;
use instinfer_runtime::kv::{AttentionMode, CacheUse, KvPool, SeqId};
use instinfer_runtime::model::{Logits, SeqChunk, Workspace};
use instinfer_runtime::sampling::{logprobs, Sampler, SamplingParams, TokenLogprobs};
use instinfer_runtime::tokenizer::StreamDecoder;
use instinfer_runtime::LoadedModel;
use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// A request, validated and tokenized, waiting for a sequence slot.
pub(crate) struct Job {
    pub key: SeqId,
    /// Who sent it: its request id is theirs.
    pub owner: Principal,
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub mode: AttentionMode,
    /// What the request may do with the prefix cache.
    pub cache: CacheUse,
    /// Send each token's log-probability and this many alternatives'.
    pub logprobs: Option<usize>,
    /// The door the request came in by (for the metrics).
    pub interface: Interface,
    /// The scheduler's own job, not a client's: prefill a finished request's prompt and
    /// reply so that the reply's pages join the prefix cache as a prefill writes them. It
    /// streams nothing, counts in no metric and ends when its prefill does.
    pub refill: bool,
    /// When the server received the request.
    pub arrival: Instant,
    pub span: tracing::Span,
    /// The stream's messages; closed when the client goes away.
    pub events: mpsc::UnboundedSender<GenerateResponse>,
    /// Answered once the sequence has a slot and its KV is open (or could not be opened).
    pub admitted: Option<oneshot::Sender<Result<(), ServeError>>>,
}

/// What the async side asks of the scheduler.
pub(crate) enum Command {
    Submit(Box<Job>),
    /// The client went away: drop the sequence, send nothing.
    Cancel(SeqId),
    /// An Abort call: end the sequence with FINISH_REASON_ABORTED.
    Abort(SeqId),
    /// Stop when everything has finished, aborting what is left after `grace`.
    Drain {
        grace: Duration,
    },
    /// Empty the prefix cache; answers with the pages dropped.
    ClearCache(oneshot::Sender<Result<u64, ServeError>>),
}

/// How a sequence ended.
struct End {
    reason: FinishReason,
    message: String,
    error_code: i32,
    /// A stop string was found: the held-back text is dropped, not flushed.
    stop_string: bool,
}

impl End {
    fn new(reason: FinishReason) -> Self {
        End {
            reason,
            message: String::new(),
            error_code: 0,
            stop_string: false,
        }
    }
    fn aborted(message: impl Into<String>) -> Self {
        End {
            message: message.into(),
            ..End::new(FinishReason::Aborted)
        }
    }
    /// The end of a request that `e` failed; the client gets [`ServeError::public_message`],
    /// the log the whole error.
    fn error(e: ServeError) -> Self {
        if e.public_message() != e.to_string() {
            tracing::warn!(error = %e, "request failed");
        }
        End {
            message: e.public_message(),
            error_code: e.code() as i32,
            ..End::new(FinishReason::Error)
        }
    }
}

/// A sequence holding a slot.
struct Seq<'t> {
    job: Job,
    decoder: StreamDecoder<'t>,
    sampler: Sampler,
    /// Text held back by the stop filter.
    held: String,
    /// Prompt tokens already run (or taken from the prefix cache).
    prefilled: usize,
    /// Prompt tokens that came from the prefix cache.
    cached: usize,
    /// Tokens generated so far, first to last.
    output: Vec<u32>,
    /// The last sampled token, fed to the next step.
    next: u32,
    generated: usize,
    capacity: usize,
    admitted_at: Instant,
    first_token_at: Option<Instant>,
    last_token_at: Instant,
    /// Set when the sequence has ended; it leaves the batch after the step.
    end: Option<End>,
    /// The client is gone: release without sending anything.
    cancelled: bool,
}

impl Seq<'_> {
    fn decoding(&self) -> bool {
        self.prefilled == self.job.prompt.len()
    }
}

/// The scheduler: owns the KV pool and runs every forward pass.
pub(crate) struct Scheduler {
    pub loaded: Arc<LoadedModel>,
    pub pool: Box<dyn KvPool>,
    pub shared: Arc<Shared>,
    pub commands: Receiver<Command>,
    pub max_concurrent: usize,
    pub prefill_chunk: usize,
    /// Refill jobs made so far (their keys follow [`REFILL_KEYS`]).
    pub next_refill_key: SeqId,
    /// Forward passes run so far.
    pub steps: u64,
    /// Panics planted by the `[fault_injection]` table (tests and drills only).
    pub planted: PlantedPanics,
}

/// Panics planted at given scheduler steps (counted from 1), for fault tests.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PlantedPanics {
    /// The forward pass of this step panics (caught: the step's sequences fail).
    pub forward_at_step: Option<u64>,
    /// The scheduler panics at this step (not caught: the daemon stops).
    pub scheduler_at_step: Option<u64>,
}

/// The message a panic carried.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// How long an idle scheduler waits for a command before it beats its heart again.
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// How long the scheduler must have been idle before it runs a refill job.
const REFILL_IDLE: Duration = Duration::from_millis(200);

/// Most refill jobs kept waiting for an idle moment.
const MAX_REFILLS: usize = 64;

/// Sequence keys of refill jobs start here (client requests count up from 1).
const REFILL_KEYS: SeqId = 1 << 62;

struct State<'t> {
    waiting: VecDeque<Job>,
    running: Vec<Seq<'t>>,
    /// Set by [`Command::Drain`]: abort what is left at this instant, then stop.
    deadline: Option<(Instant, Duration)>,
    /// Refill jobs, run only once the scheduler has been idle for [`REFILL_IDLE`], so that
    /// they never hold up a client's request (the oldest are dropped past [`MAX_REFILLS`]).
    refills: VecDeque<Job>,
}

impl Scheduler {
    /// Run until drained (or until every command sender is gone).
    pub fn run(mut self) {
        let loaded = self.loaded.clone();
        let tok = &loaded.tokenizer;
        let mut st = State {
            waiting: VecDeque::new(),
            running: Vec::new(),
            deadline: None,
            refills: VecDeque::new(),
        };
        let mut ws = Workspace::default();
        // What the prefix cache recovered shows in GetStats and the metrics from the start.
        self.publish_prefix();
        loop {
            self.shared.beat();
            let idle = st.running.is_empty() && st.waiting.is_empty();
            if idle && st.deadline.is_some() {
                break;
            }
            // Commands: wait for one when idle, else take what has arrived.
            let mut disconnected = false;
            if idle {
                let wait = if st.refills.is_empty() {
                    IDLE_WAIT
                } else {
                    REFILL_IDLE
                };
                match self.commands.recv_timeout(wait) {
                    Ok(c) => self.command(c, &mut st),
                    Err(RecvTimeoutError::Timeout) => {
                        if let Some(job) = st.refills.pop_front() {
                            st.waiting.push_back(job);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => disconnected = true,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(c) => self.command(c, &mut st),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if disconnected && st.deadline.is_none() {
                st.deadline = Some((Instant::now(), Duration::ZERO));
            }
            if let Some((at, grace)) = st.deadline {
                if Instant::now() >= at {
                    let msg = format!(
                        "the server is shutting down and the grace period of {} ms ran out",
                        grace.as_millis()
                    );
                    self.abort_all(&mut st, &msg);
                }
            }
            self.admit(&mut st, tok);
            self.step(&mut st, &mut ws, tok);
            self.retire(&mut st);
            self.publish(&st);
        }
        self.publish(&st);
        tracing::info!("scheduler stopped");
    }

    fn command<'t>(&mut self, c: Command, st: &mut State<'t>) {
        match c {
            Command::Submit(job) => st.waiting.push_back(*job),
            Command::Cancel(key) => {
                if let Some(s) = st.running.iter_mut().find(|s| s.job.key == key) {
                    s.cancelled = true;
                } else if let Some(i) = st.waiting.iter().position(|j| j.key == key) {
                    let job = st.waiting.remove(i).expect("index from position");
                    self.drop_waiting(job, None);
                }
            }
            Command::Abort(key) => {
                let msg = "aborted by an Abort call";
                if let Some(s) = st.running.iter_mut().find(|s| s.job.key == key) {
                    if s.end.is_none() {
                        s.end = Some(End::aborted(msg));
                    }
                } else if let Some(i) = st.waiting.iter().position(|j| j.key == key) {
                    let job = st.waiting.remove(i).expect("index from position");
                    self.drop_waiting(job, Some(msg));
                }
            }
            Command::Drain { grace } => {
                tracing::info!(
                    grace_ms = grace.as_millis() as u64,
                    running = st.running.len(),
                    waiting = st.waiting.len(),
                    "draining"
                );
                st.deadline = Some((Instant::now() + grace, grace));
            }
            Command::ClearCache(reply) => {
                // Replies of requests from before the clear stay out of the cache too.
                st.refills.clear();
                let r = self.pool.clear_prefix_cache().map_err(ServeError::Kv);
                self.publish_prefix();
                let _ = reply.send(r);
            }
        }
    }

    /// Fold the prefix cache's figures into the metrics (after it changed).
    fn publish_prefix(&self) {
        if let Some(p) = self.pool.prefix_stats() {
            self.shared.metrics.prefix_stats(p);
        }
    }

    /// End a request that never got a slot: with a final ABORTED message (`abort`), or
    /// silently when its client has gone.
    fn drop_waiting(&self, mut job: Job, abort: Option<&str>) {
        if job.refill {
            return;
        }
        let _span = job.span.clone().entered();
        self.shared.unregister(job.owner, &job.request_id);
        match abort {
            Some(msg) => {
                if let Some(tx) = job.admitted.take() {
                    let _ = tx.send(Ok(()));
                }
                let usage = Usage {
                    prompt_tokens: job.prompt.len() as u32,
                    queue_ms: ms(job.arrival.elapsed()),
                    ..Default::default()
                };
                let _ = job.events.send(finished_message(
                    &job,
                    End::aborted(msg),
                    String::new(),
                    usage,
                ));
                self.shared.metrics.request(job.interface, Outcome::Aborted);
                tracing::info!(reason = "aborted", detail = msg, "finished while queued");
            }
            None => {
                self.shared
                    .metrics
                    .request(job.interface, Outcome::Cancelled);
                tracing::info!("client went away while queued");
            }
        }
    }

    fn abort_all(&mut self, st: &mut State<'_>, msg: &str) {
        for s in st.running.iter_mut().filter(|s| s.end.is_none()) {
            s.end = Some(End::aborted(msg));
        }
        while let Some(job) = st.waiting.pop_front() {
            self.drop_waiting(job, Some(msg));
        }
    }

    /// Give free slots to waiting requests, oldest first, opening their KV.
    fn admit<'t>(&mut self, st: &mut State<'t>, tok: &'t instinfer_runtime::tokenizer::Tokenizer) {
        let context = self.loaded.model.config.context_len;
        while st.running.len() < self.max_concurrent {
            let Some(mut job) = st.waiting.pop_front() else {
                break;
            };
            if job.events.is_closed() && !job.refill {
                self.drop_waiting(job, None);
                continue;
            }
            let _span = job.span.clone().entered();
            let capacity = context.min(job.prompt.len() + job.max_tokens);
            let opened = self
                .pool
                .open_cached(job.key, job.mode, capacity, &job.prompt, job.cache);
            self.publish_prefix();
            let cached = match opened {
                Ok(n) => n,
                Err(e) => {
                    let e = ServeError::Kv(e);
                    tracing::warn!(error = %e, "could not open the sequence's KV");
                    // The gateway counts the refusal.
                    self.shared.unregister(job.owner, &job.request_id);
                    if let Some(tx) = job.admitted.take() {
                        let _ = tx.send(Err(e));
                    }
                    continue;
                }
            };
            self.shared.kv_opened();
            let answered = job
                .admitted
                .take()
                .map(|tx| tx.send(Ok(())).is_ok())
                .unwrap_or(job.refill);
            let sampler = match Sampler::new(job.sampling.clone()) {
                Ok(s) => s,
                Err(e) => {
                    // Checked on admission already; kept as an error, not a panic.
                    let e = ServeError::invalid("sampling", e.to_string());

                    self.pool.release(job.key);
                    self.shared.kv_released();
                    self.shared.unregister(job.owner, &job.request_id);
                    self.shared.metrics.request(job.interface, Outcome::Error);
                    let _ = job.events.send(finished_message(
                        &job,
                        End::error(e),
                        String::new(),
                        Usage::default(),
                    ));
                    continue;
                }
            };
            if !job.refill {
                self.shared
                    .metrics
                    .prompt_tokens
                    .inc_by(job.prompt.len() as u64);
            }
            let now = Instant::now();
            tracing::debug!(
                queue_ms = ms(now - job.arrival),
                capacity,
                cached_tokens = cached,
                "admitted"
            );
            drop(_span);
            st.running.push(Seq {
                job,
                decoder: tok.stream_decoder(),
                sampler,
                held: String::new(),
                prefilled: cached,
                cached,
                output: Vec::new(),
                next: 0,
                generated: 0,
                capacity,
                admitted_at: now,
                first_token_at: None,
                last_token_at: now,
                end: None,
                cancelled: !answered,
            });
        }
    }

    /// One batched forward pass and the sampling that follows it.
    fn step<'t>(
        &mut self,
        st: &mut State<'t>,
        ws: &mut Workspace,
        tok: &'t instinfer_runtime::tokenizer::Tokenizer,
    ) {
        for s in st.running.iter_mut() {
            if s.job.events.is_closed() && !s.job.refill {
                s.cancelled = true;
            }
        }
        // (index into running, tokens in the chunk, whether it yields a token)
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        let mut chunks: Vec<SeqChunk<'_>> = Vec::new();
        for (i, s) in st.running.iter().enumerate() {
            if s.decoding() && s.end.is_none() && !s.cancelled {
                chunks.push(SeqChunk {
                    seq: s.job.key,
                    tokens: std::slice::from_ref(&s.next),
                    logits: Logits::Last,
                });
                plan.push((i, 1, true));
            }
        }
        // Prompt tokens, oldest sequence first, up to one chunk's worth per step.
        let mut budget = self.prefill_chunk;
        for (i, s) in st.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if s.decoding() || s.end.is_some() || s.cancelled {
                continue;
            }
            let Some(end) = chunk_end(s.prefilled, s.job.prompt.len(), budget, self.prefill_chunk)
            else {
                break;
            };
            let last = end == s.job.prompt.len();
            let yields = last && !s.job.refill;
            chunks.push(SeqChunk {
                seq: s.job.key,
                tokens: &s.job.prompt[s.prefilled..end],
                logits: if yields { Logits::Last } else { Logits::None },
            });
            plan.push((i, end - s.prefilled, yields));
            budget -= end - s.prefilled;
        }
        if chunks.is_empty() {
            return;
        }
        let metrics = &self.shared.metrics;
        metrics.batch_sequences.observe(chunks.len() as f64);
        self.steps += 1;
        let step = self.steps;
        if self.planted.scheduler_at_step == Some(step) {
            panic!("planted scheduler panic at step {step} ([fault_injection])");
        }
        let plant = self.planted.forward_at_step == Some(step);
        let (model, pool) = (&self.loaded.model, self.pool.as_mut());
        // A panic in the forward pass (a kernel or runtime bug) fails the sequences of this
        // step, whose KV it may have left half-written, and no others: the scheduler goes on.
        let forward = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if plant {
                panic!("planted panic in the forward pass at step {step} ([fault_injection])");
            }
            model.forward_batch(pool, &chunks, ws)
        }));
        drop(chunks);
        let results = match forward {
            Ok(results) => results,
            Err(payload) => {
                let why = panic_message(payload.as_ref());
                tracing::error!(step, sequences = plan.len(), panic = %why, "the forward pass panicked; its sequences fail");
                for (i, _, _) in plan {
                    st.running[i].end = Some(End::error(ServeError::Internal(format!(
                        "the forward pass failed ({why}); the request was dropped"
                    ))));
                }
                return;
            }
        };
        metrics.scheduler_steps.inc();
        metrics.pool_stats(self.pool.stats());
        let vocab = self.loaded.model.config.vocab_size;
        for ((i, n, yields), result) in plan.into_iter().zip(results) {
            let s = &mut st.running[i];
            let rows = match result {
                Ok(rows) => rows,
                Err(e) => {
                    s.end = Some(End::error(ServeError::Model(e)));
                    continue;
                }
            };
            if !s.decoding() {
                s.prefilled += n;
                if s.decoding() && s.job.cache.writes() {
                    // The prompt's pages join the prefix cache as soon as they are all
                    // written, so requests that arrive while this one decodes share them.
                    if let Err(e) = self.pool.publish(s.job.key, &s.job.prompt) {
                        tracing::warn!(error = %e, "adding the prompt to the prefix cache failed");
                    }
                }
                if s.decoding() && s.job.refill {
                    s.end = Some(End::new(FinishReason::Stop));
                }
            }
            if !yields {
                continue;
            }
            let Some(row) = ws.logits.get(rows.start * vocab..(rows.start + 1) * vocab) else {
                s.end = Some(End::error(ServeError::Internal(
                    "the model returned no logits for the sequence".into(),
                )));
                continue;
            };
            let id = s.sampler.sample(row);
            let lp = s.job.logprobs.map(|top| logprobs(row, id, top));
            let len = self.pool.len(s.job.key).unwrap_or(s.capacity);
            self.token(s, id, lp, len, tok);
        }
    }

    /// Handle one sampled token of `s` (with its log-probabilities, if the request asked),
    /// whose KV holds `len` tokens.
    fn token(
        &self,
        s: &mut Seq<'_>,
        id: u32,
        lp: Option<TokenLogprobs>,
        len: usize,
        tok: &instinfer_runtime::tokenizer::Tokenizer,
    ) {
        let metrics = &self.shared.metrics;
        let now = Instant::now();
        match s.first_token_at {
            None => {
                s.first_token_at = Some(now);
                metrics.observe_ttft(s.job.interface, (now - s.job.arrival).as_secs_f64());
            }
            Some(_) => metrics.tpot.observe((now - s.last_token_at).as_secs_f64()),
        }
        s.last_token_at = now;
        if !s.job.ignore_eos && tok.is_eog(id) {
            s.end = Some(End::new(FinishReason::Stop));
            return;
        }
        s.generated += 1;
        s.output.push(id);
        metrics.generated_tokens.inc();
        let piece = s.decoder.push(id);
        let (text, stopped) = {
            let mut f = StopFilter {
                stops: &s.job.stop,
                pending: std::mem::take(&mut s.held),
            };
            let out = f.push(&piece);
            s.held = f.pending;
            out
        };
        let msg = GenerateResponse {
            request_id: s.job.request_id.clone(),
            event: Some(Event::Token(Token {
                id,
                text,
                logprob: lp.as_ref().map(|l| l.logprob),
                top_logprobs: lp
                    .map(|l| {
                        l.top
                            .into_iter()
                            .map(|(id, logprob)| TokenLogprob { id, logprob })
                            .collect()
                    })
                    .unwrap_or_default(),
            })),
        };
        if s.job.events.send(msg).is_err() {
            s.cancelled = true;
            return;
        }
        if stopped {
            s.end = Some(End {
                stop_string: true,
                ..End::new(FinishReason::Stop)
            });
        } else if s.generated >= s.job.max_tokens || len >= s.capacity {
            s.end = Some(End::new(FinishReason::Length));
        } else {
            s.next = id;
        }
    }

    /// Take ended and cancelled sequences out of the batch, free their KV and send their
    /// last message.
    fn retire(&mut self, st: &mut State<'_>) {
        let mut i = 0;
        while i < st.running.len() {
            let s = &st.running[i];
            if s.end.is_none() && !s.cancelled {
                i += 1;
                continue;
            }
            let s = st.running.remove(i);
            if let Some(job) = self.finish(s) {
                if st.refills.len() == MAX_REFILLS {
                    st.refills.pop_front();
                }
                st.refills.push_back(job);
            }
        }
    }

    /// End a sequence: free its KV, send its last message, count it. Returns the job that
    /// puts its reply into the prefix cache, if there is one to run.
    fn finish(&mut self, mut s: Seq<'_>) -> Option<Job> {
        let _span = s.job.span.clone().entered();
        let key = s.job.key;
        let kv = self.pool.seq_stats(key);
        let refill = self.refill_job(&s);
        self.pool.release(key);
        self.publish_prefix();
        if s.job.refill {
            self.shared.kv_released();
            return None;
        }
        self.shared.kv_released();
        self.shared.unregister(s.job.owner, &s.job.request_id);
        let metrics = &self.shared.metrics;
        if s.cancelled && s.end.is_none() {
            metrics.request(s.job.interface, Outcome::Cancelled);
            tracing::info!(
                generated_tokens = s.generated,
                "client went away; sequence released"
            );
            return refill;
        }
        let end = s.end.take().unwrap_or_else(|| End::new(FinishReason::Stop));
        let rest = if end.stop_string {
            String::new()
        } else {
            let tail = s.decoder.finish();
            let mut f = StopFilter {
                stops: &s.job.stop,
                pending: std::mem::take(&mut s.held),
            };
            let (out, _) = f.push(&tail);
            out + &f.finish()
        };
        let decode_tps = match s.first_token_at {
            Some(first) if s.generated > 1 => {
                let secs = (s.last_token_at - first).as_secs_f64();
                if secs > 0.0 {
                    (s.generated - 1) as f64 / secs
                } else {
                    0.0
                }
            }
            _ => 0.0,
        };
        let usage = Usage {
            prompt_tokens: s.job.prompt.len() as u32,
            generated_tokens: s.generated as u32,
            time_to_first_token_ms: s.first_token_at.map_or(0.0, |t| ms(t - s.job.arrival)),
            decode_tokens_per_second: decode_tps,
            queue_ms: ms(s.admitted_at - s.job.arrival),
            kv_bytes_read: kv.device_bytes_read,
            kv_bytes_written: kv.device_bytes_written,
            cached_tokens: s.cached as u32,
        };
        let outcome = match end.reason {
            FinishReason::Stop => Outcome::Stop,
            FinishReason::Length => Outcome::Length,
            FinishReason::Aborted => Outcome::Aborted,
            FinishReason::Error | FinishReason::Unspecified => Outcome::Error,
        };
        metrics.request(s.job.interface, outcome);
        let reason = reason_name(end.reason);
        if end.reason == FinishReason::Error {
            tracing::warn!(reason, error = %end.message, generated_tokens = s.generated, "finished");
        } else {
            tracing::info!(
                reason,
                detail = %end.message,
                prompt_tokens = usage.prompt_tokens,
                generated_tokens = usage.generated_tokens,
                ttft_ms = usage.time_to_first_token_ms,
                decode_tok_per_s = usage.decode_tokens_per_second,
                "finished"
            );
        }
        let _ = s
            .job
            .events
            .send(finished_message(&s.job, end, rest, usage));
        refill
    }

    /// The job that puts a finished request's reply into the prefix cache, so that the next
    /// turn of a conversation starts on it: a prefill of the prompt and the reply (the prompt
    /// comes from the cache, so only the reply runs). The reply's own pages are not cached as
    /// they are: decode steps sum in another order than a prefill (and a sparse step's K/V
    /// depend on the pages it chose to read), so a later prompt that starts on them would
    /// not give, token for token, what it gives uncached.
    fn refill_job(&mut self, s: &Seq<'_>) -> Option<Job> {
        let failed = s
            .end
            .as_ref()
            .is_some_and(|e| e.reason == FinishReason::Error);
        let t = self.pool.cache_page_tokens();
        if t == 0 {
            return None;
        }
        let total = s.job.prompt.len() + s.output.len();
        let new_page = total / t > s.job.prompt.len() / t;
        if s.job.refill
            || !s.job.cache.writes()
            || failed
            || !s.decoding()
            || !new_page
            || self.shared.is_draining()
        {
            return None;
        }
        let mut tokens = Vec::with_capacity(total);
        tokens.extend_from_slice(&s.job.prompt);
        tokens.extend_from_slice(&s.output);
        let context = self.loaded.model.config.context_len;
        if tokens.len() > context {
            return None;
        }
        self.next_refill_key += 1;
        let (events, _) = mpsc::unbounded_channel();
        Some(Job {
            key: REFILL_KEYS + self.next_refill_key,
            owner: s.job.owner,
            request_id: format!("{}/reply-to-cache", s.job.request_id),
            prompt: tokens,
            sampling: SamplingParams::default(),
            max_tokens: 0,
            stop: Vec::new(),
            ignore_eos: true,
            mode: AttentionMode::Full,
            cache: CacheUse::UseAndStore,
            logprobs: None,
            interface: s.job.interface,
            refill: true,
            arrival: Instant::now(),
            span: s.job.span.clone(),
            events,
            admitted: None,
        })
    }

    /// Gauges for GetStats and the metrics endpoint.
    fn publish(&self, st: &State<'_>) {
        self.shared.set_active(st.running.len());
    }
}

/// Where the next prefill chunk of a prompt of `len` tokens, `done` of them already in,
/// ends, with `budget` of the step's `full` prefill budget left; `None` to wait for the next
/// step. A chunk is not a single token, nor leaves one behind, unless the prompt is one token
/// or `full` is too small to avoid it: a one-token chunk sums its dot products in the decode
/// order, so the same prompt would give other K/V (in the last bits) depending on how it was
/// split, and a prefix-cache hit could differ from a miss.
fn chunk_end(done: usize, len: usize, budget: usize, full: usize) -> Option<usize> {
    let rest = len - done;
    let mut take = budget.min(rest);
    if take < rest && rest - take == 1 {
        take -= 1;
    }
    if take < 2 && rest >= 2 {
        if budget < full {
            return None;
        }
        take = budget.min(rest);
    }
    (take > 0).then_some(done + take)
}

/// "stop", "length", "aborted" or "error", as in the metrics' outcome label.
fn reason_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Aborted => "aborted",
        FinishReason::Error => "error",
        FinishReason::Unspecified => "unspecified",
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn finished_message(job: &Job, end: End, text: String, usage: Usage) -> GenerateResponse {
    GenerateResponse {
        request_id: job.request_id.clone(),
        event: Some(Event::Finished(Finished {
            reason: end.reason as i32,
            text,
            usage: Some(usage),
            message: end.message,
            error_code: end.error_code,
            seed: job.sampling.seed,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_end;

    #[test]
    fn prefill_chunks_never_strand_one_token() {
        // A 257-token prompt in 256-token steps: 255 then 2, not 256 then 1.
        assert_eq!(chunk_end(0, 257, 256, 256), Some(255));
        assert_eq!(chunk_end(255, 257, 256, 256), Some(257));
        // Two tokens of budget left over, three to go: wait for a whole step.
        assert_eq!(chunk_end(10, 13, 2, 256), None);
        assert_eq!(chunk_end(10, 13, 256, 256), Some(13));
        // One token left over in the step: wait.
        assert_eq!(chunk_end(0, 100, 1, 256), None);
        // A one-token prompt is one chunk; a one-token step budget still makes progress.
        assert_eq!(chunk_end(0, 1, 256, 256), Some(1));
        assert_eq!(chunk_end(0, 5, 1, 1), Some(1));
        assert_eq!(chunk_end(3, 5, 2, 2), Some(5));
        // Every prompt is covered in chunks of at least two tokens with a full budget.
        for len in 2..600 {
            let mut done = 0;
            while done < len {
                let end = chunk_end(done, len, 256, 256).expect("a full budget always moves");
                assert!(end - done >= 2, "len {len}: chunk {done}..{end}");
                done = end;
            }
        }
    }
}
