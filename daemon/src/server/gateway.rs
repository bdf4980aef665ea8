//! The way into the scheduler shared by the gRPC service and the HTTP API: request
//! validation, tokenization, admission, and the stream of a generation's messages that frees
//! its sequence when the client goes away.

use super::error::ServeError;
use super::metrics::{Interface, Outcome};
use super::scheduler::{Command, Job};
use super::service::Principal;
use super::Shared;
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::generate_request::Prompt;
use instinfer_runtime::chat::ChatMessage;
use instinfer_runtime::kv::{AttentionMode, CacheUse, KvError, SeqId};
use instinfer_runtime::sampling::SamplingParams;
use instinfer_runtime::LoadedModel;
use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::Stream;
use tonic::Status;
use tracing::Instrument;

/// Most stop strings per request, and the longest one in bytes.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// Longest request id.
const MAX_REQUEST_ID_CHARS: usize = 128;
/// Most alternatives a request may ask log-probabilities of, per token.
pub(crate) const MAX_TOP_LOGPROBS: usize = 20;

/// Request limits from the configuration.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub max_prompt_tokens: usize,
    pub max_tokens_limit: usize,
    pub default_max_tokens: usize,
}

impl Limits {
    /// The limits `config` sets.
    pub fn of(config: &crate::config::Config) -> Self {
        Limits {
            max_prompt_tokens: config.max_prompt_tokens,
            max_tokens_limit: config.max_tokens_limit,
            default_max_tokens: config.default_max_tokens,
        }
    }
}

/// Attention modes and whether the pool takes them (the pool's refusal otherwise).
pub(crate) type ModeSupport = Vec<(AttentionMode, Result<(), KvError>)>;

/// A request after validation and tokenization.
pub(crate) struct Prepared {
    pub(crate) prompt: Vec<u32>,
    sampling: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
    ignore_eos: bool,
    mode: AttentionMode,
    cache: CacheUse,
    logprobs: Option<usize>,
}

/// The request's use of the prefix cache.
fn cache_use(value: i32) -> Result<CacheUse, ServeError> {
    match pb::CacheMode::try_from(value) {
        Ok(pb::CacheMode::Unspecified | pb::CacheMode::UseAndStore) => Ok(CacheUse::UseAndStore),
        Ok(pb::CacheMode::UseOnly) => Ok(CacheUse::UseOnly),
        Ok(pb::CacheMode::Off) => Ok(CacheUse::Off),
        Err(_) => Err(ServeError::invalid(
            "cache",
            format!("unknown cache mode {value}"),
        )),
    }
}

pub(crate) fn check_request_id(id: &str) -> Result<(), ServeError> {
    if id.chars().count() > MAX_REQUEST_ID_CHARS || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ServeError::invalid(
            "request_id",
            format!(
                "must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters without spaces"
            ),
        ));
    }
    Ok(())
}

fn attention_mode(value: i32, modes: &ModeSupport) -> Result<AttentionMode, ServeError> {
    let mode = match pb::AttentionMode::try_from(value) {
        Ok(pb::AttentionMode::Unspecified) | Ok(pb::AttentionMode::Full) => AttentionMode::Full,
        Ok(pb::AttentionMode::Flexgen) => AttentionMode::Flexgen,
        Ok(pb::AttentionMode::Sparse) => AttentionMode::Sparse,
        Err(_) => {
            return Err(ServeError::invalid(
                "attention",
                format!("unknown attention mode {value}"),
            ))
        }
    };
    match modes.iter().find(|(m, _)| *m == mode) {
        Some((_, Ok(()))) => Ok(mode),
        Some((_, Err(why))) => Err(ServeError::invalid(
            "attention",
            format!("mode {mode} is not available on this server: {why}"),
        )),
        None => Err(ServeError::invalid(
            "attention",
            format!("mode {mode} is not available on this server"),
        )),
    }
}

/// Refuse a prompt of `bytes` bytes of text that cannot be under `max_prompt_tokens`
/// however it tokenizes, before spending time on tokenizing it.
fn surely_too_long(
    loaded: &LoadedModel,
    limits: &Limits,
    bytes: usize,
    field: &'static str,
) -> Result<(), ServeError> {
    let at_least = loaded.tokenizer.min_tokens(bytes);
    if at_least > limits.max_prompt_tokens {
        return Err(ServeError::OverLimit {
            field,
            message: format!(
                "the prompt has at least {at_least} tokens ({bytes} bytes of text), over the server's limit of {} (max_prompt_tokens)",
                limits.max_prompt_tokens
            ),
        });
    }
    Ok(())
}

/// The longest role name a chat message may have.
const MAX_ROLE_CHARS: usize = 32;

/// A role is a short name (`system`, `user`, `assistant`, `tool`, ...) of letters, digits,
/// `_` and `-`: the template writes it beside its control tokens, so it may hold no
/// markup of its own.
fn check_role(role: &str) -> Result<(), String> {
    if role.is_empty() {
        return Err("is empty".into());
    }
    if role.len() > MAX_ROLE_CHARS
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(format!(
            "must be a name of at most {MAX_ROLE_CHARS} letters, digits, '_' or '-' (such as user or assistant)"
        ));
    }
    Ok(())
}

/// Check every field of `req` and tokenize its prompt. Runs on a blocking thread: rendering
/// and tokenizing a long prompt takes a while.
pub(crate) fn prepare(
    loaded: &LoadedModel,
    limits: &Limits,
    modes: &ModeSupport,
    req: pb::GenerateRequest,
) -> Result<Prepared, ServeError> {
    let s = req.sampling.unwrap_or_default();
    let sampling = SamplingParams {
        temperature: s.temperature.unwrap_or(0.0),
        top_k: s.top_k.unwrap_or(0) as usize,
        top_p: s.top_p.unwrap_or(1.0),
        // Without a seed, each request samples differently; Finished.seed reports the draw
        // (63 bits, so that it can go back through the HTTP API's signed `seed` too).
        seed: s.seed.unwrap_or_else(|| rand::random::<u64>() >> 1),
    };
    sampling
        .validate()
        .map_err(|e| ServeError::invalid("sampling", e.to_string()))?;
    let max_tokens = match req.max_tokens {
        None => limits.default_max_tokens,
        Some(0) => return Err(ServeError::invalid("max_tokens", "must be at least 1")),
        Some(n) => n as usize,
    };
    if max_tokens > limits.max_tokens_limit {
        return Err(ServeError::OverLimit {
            field: "max_tokens",
            message: format!(
                "max_tokens {max_tokens} is over the server's limit of {} (max_tokens_limit)",
                limits.max_tokens_limit
            ),
        });
    }
    if req.stop.len() > MAX_STOP_STRINGS {
        return Err(ServeError::invalid(
            "stop",
            format!(
                "{} stop strings, at most {MAX_STOP_STRINGS} are allowed",
                req.stop.len()
            ),
        ));
    }
    for (i, s) in req.stop.iter().enumerate() {
        if s.is_empty() {
            return Err(ServeError::invalid(format!("stop[{i}]"), "is empty"));
        }
        if s.len() > MAX_STOP_BYTES {
            return Err(ServeError::invalid(
                format!("stop[{i}]"),
                format!(
                    "is {} bytes long, at most {MAX_STOP_BYTES} are allowed",
                    s.len()
                ),
            ));
        }
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(n) if n as usize > MAX_TOP_LOGPROBS => {
            return Err(ServeError::invalid(
                "logprobs",
                format!("{n} alternatives asked for, at most {MAX_TOP_LOGPROBS} are allowed"),
            ))
        }
        Some(n) => Some(n as usize),
    };
    let mode = attention_mode(req.attention, modes)?;
    let cache = cache_use(req.cache)?;
    let vocab = loaded.model.config.vocab_size;
    let prompt_field = match &req.prompt {
        Some(Prompt::Chat(_)) => "prompt.chat",
        _ => "prompt",
    };
    let prompt = match req.prompt {
        None => {
            return Err(ServeError::invalid(
                "prompt",
                "is missing: set one of text, tokens or chat",
            ))
        }
        Some(Prompt::Text(text)) => {
            if text.is_empty() {
                return Err(ServeError::invalid("prompt.text", "is empty"));
            }
            surely_too_long(loaded, limits, text.len(), "prompt")?;
            loaded
                .tokenizer
                .encode(&text, true)
                .map_err(|e| ServeError::invalid("prompt.text", e.to_string()))?
        }
        Some(Prompt::Tokens(t)) => {
            if t.ids.is_empty() {
                return Err(ServeError::invalid("prompt.tokens.ids", "is empty"));
            }
            if let Some((i, id)) = t
                .ids
                .iter()
                .enumerate()
                .find(|(_, &id)| id as usize >= vocab)
            {
                return Err(ServeError::invalid(
                    format!("prompt.tokens.ids[{i}]"),
                    format!("token id {id} is outside the vocabulary of {vocab} tokens"),
                ));
            }
            t.ids
        }
        Some(Prompt::Chat(chat)) => {
            if chat.messages.is_empty() {
                return Err(ServeError::invalid("prompt.chat.messages", "is empty"));
            }
            let bytes = chat.messages.iter().map(|m| m.content.len()).sum();
            surely_too_long(loaded, limits, bytes, "prompt.chat")?;
            let mut messages = Vec::with_capacity(chat.messages.len());
            for (i, m) in chat.messages.into_iter().enumerate() {
                if let Err(why) = check_role(&m.role) {
                    return Err(ServeError::invalid(
                        format!("prompt.chat.messages[{i}].role"),
                        why,
                    ));
                }
                messages.push(ChatMessage::new(m.role, m.content));
            }
            let Some(template) = &loaded.chat else {
                return Err(ServeError::invalid(
                    "prompt.chat",
                    "the model has no chat template; send text or tokens instead",
                ));
            };
            // Messages are plain text: only the template's own markers are control tokens.
            let pieces = template
                .render_pieces(&messages, chat.add_generation_prompt.unwrap_or(true))
                .map_err(|e| ServeError::invalid("prompt.chat", e.to_string()))?;
            loaded
                .tokenizer
                .encode_pieces(&pieces)
                .map_err(|e| ServeError::invalid("prompt.chat", e.to_string()))?
        }
    };
    if prompt.is_empty() {
        return Err(ServeError::invalid("prompt", "tokenizes to no tokens"));
    }
    let context = loaded.model.config.context_len;
    if prompt.len() > context {
        return Err(ServeError::invalid(
            "prompt",
            format!(
                "the prompt has {} tokens but the model's context holds {context}",
                prompt.len()
            ),
        ));
    }
    if prompt.len() > limits.max_prompt_tokens {
        return Err(ServeError::OverLimit {
            field: prompt_field,
            message: format!(
                "the prompt has {} tokens, over the server's limit of {} (max_prompt_tokens)",
                prompt.len(),
                limits.max_prompt_tokens
            ),
        });
    }
    Ok(Prepared {
        prompt,
        sampling,
        max_tokens,
        stop: req.stop,
        ignore_eos: req.ignore_eos,
        mode,
        cache,
        logprobs,
    })
}

/// Tells the scheduler to drop the sequence when the request's future or stream is dropped
/// before the generation finished (the client went away).
struct CancelOnDrop {
    key: SeqId,
    commands: Sender<Command>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.commands.send(Command::Cancel(self.key));
        }
    }
}

/// The messages of one generation, in order, ending with its `Finished` message. Dropping
/// it before that message cancels the generation and frees its KV.
pub struct GenerateStream {
    rx: mpsc::UnboundedReceiver<pb::GenerateResponse>,
    guard: CancelOnDrop,
    done: bool,
}

impl GenerateStream {
    /// The next message; `None` after the `Finished` one, an error if the scheduler stopped
    /// without sending it.
    pub fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<pb::GenerateResponse, ServeError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(msg)) => {
                if matches!(msg.event, Some(pb::generate_response::Event::Finished(_))) {
                    self.done = true;
                    self.guard.armed = false;
                }
                Poll::Ready(Some(Ok(msg)))
            }
            Poll::Ready(None) => {
                // The scheduler dropped the sequence without a last message: it stopped.
                self.done = true;
                self.guard.armed = false;
                Poll::Ready(Some(Err(ServeError::SchedulerGone)))
            }
        }
    }

    /// [`GenerateStream::poll_event`] as a future.
    pub async fn next_event(&mut self) -> Option<Result<pb::GenerateResponse, ServeError>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }
}

impl Stream for GenerateStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.poll_event(cx)
            .map(|o| o.map(|r| r.map_err(|e| e.to_status())))
    }
}

/// The one way into the scheduler, for every interface: it checks and tokenizes a request,
/// counts and logs a refusal, and hands the request to the scheduler.
pub(crate) struct Gateway {
    pub loaded: Arc<LoadedModel>,
    pub shared: Arc<Shared>,
    /// `std::sync::mpsc::Sender` is `Sync`, so one sender serves every task.
    pub commands: Sender<Command>,
    pub limits: Limits,
    pub modes: Arc<ModeSupport>,
    /// Requests being checked and tokenized at once (on blocking threads); the others wait
    /// here, holding their place in the queue, so that a flood of long prompts cannot take
    /// every core from the running streams.
    pub preparing: Arc<tokio::sync::Semaphore>,
}

impl Gateway {
    /// Start a generation of `req`, received by `interface` at `arrival`: the stream of its
    /// messages once the scheduler has given it a sequence slot and opened its KV.
    pub async fn generate(
        &self,
        req: pb::GenerateRequest,
        interface: Interface,
        arrival: Instant,
        owner: Principal,
    ) -> Result<GenerateStream, ServeError> {
        let request_id = if req.request_id.is_empty() {
            format!("req-{:016x}", rand::random::<u64>())
        } else {
            req.request_id.clone()
        };
        // A bad id is refused before it names a span (it could be megabytes of anything).
        if let Err(e) = check_request_id(&request_id) {
            self.shared.metrics.request(interface, Outcome::Rejected);
            tracing::info!(interface = interface.as_str(), error = %e, "generate request refused");
            return Err(e);
        }
        let span = tracing::info_span!(
            "request",
            request_id = %request_id,
            interface = interface.as_str()
        );
        let result = self
            .start(req, request_id, interface, arrival, owner, span.clone())
            .instrument(span.clone())
            .await;
        if let Err(e) = &result {
            if !matches!(e, ServeError::ShuttingDown) {
                self.shared.metrics.request(interface, Outcome::Rejected);
            }
            span.in_scope(|| tracing::info!(error = %e, "generate request refused"));
        }
        result
    }

    /// Ask the scheduler to abort `owner`'s request named `request_id`; whether it was
    /// found (another client's request with that id is not).
    pub fn abort(&self, owner: Principal, request_id: &str) -> bool {
        match self.shared.lookup(owner, request_id) {
            Some(key) => self.commands.send(Command::Abort(key)).is_ok(),
            None => false,
        }
    }

    /// Check and tokenize `req` on a blocking thread, at most `preparing` at once.
    async fn prepare(&self, req: pb::GenerateRequest) -> Result<Prepared, ServeError> {
        let _permit = self
            .preparing
            .acquire()
            .await
            .map_err(|_| ServeError::ShuttingDown)?;
        let loaded = self.loaded.clone();
        let limits = self.limits.clone();
        let modes = self.modes.clone();
        tokio::task::spawn_blocking(move || prepare(&loaded, &limits, &modes, req))
            .await
            .map_err(|e| ServeError::Internal(format!("request preparation failed: {e}")))?
    }

    async fn start(
        &self,
        req: pb::GenerateRequest,
        request_id: String,
        interface: Interface,
        arrival: Instant,
        owner: Principal,
        span: tracing::Span,
    ) -> Result<GenerateStream, ServeError> {
        if self.shared.is_draining() {
            return Err(ServeError::ShuttingDown);
        }
        // The cheap checks first: a place in the queue (and a free id), then the bounded
        // preparation; a refused request never costs a tokenization.
        let key = self.shared.register(owner, &request_id)?;
        let prepared = match self.prepare(req).await {
            Ok(p) => p,
            Err(e) => {
                self.shared.unregister(owner, &request_id);
                return Err(e);
            }
        };
        tracing::info!(
            prompt_tokens = prepared.prompt.len(),
            max_tokens = prepared.max_tokens,
            attention = %prepared.mode,
            temperature = prepared.sampling.temperature,
            "generate request accepted"
        );
        let (events, rx) = mpsc::unbounded_channel();
        let (admitted_tx, admitted_rx) = oneshot::channel();
        let job = Job {
            key,
            owner,
            request_id: request_id.clone(),
            prompt: prepared.prompt,
            sampling: prepared.sampling,
            max_tokens: prepared.max_tokens,
            stop: prepared.stop,
            ignore_eos: prepared.ignore_eos,
            mode: prepared.mode,
            cache: prepared.cache,
            logprobs: prepared.logprobs,
            interface,
            refill: false,
            arrival,
            span,
            events,
            admitted: Some(admitted_tx),
        };
        if self.commands.send(Command::Submit(Box::new(job))).is_err() {
            self.shared.unregister(owner, &request_id);
            return Err(ServeError::SchedulerGone);
        }
        let mut guard = CancelOnDrop {
            key,
            commands: self.commands.clone(),
            armed: true,
        };
        match admitted_rx.await {
            Ok(Ok(())) => Ok(GenerateStream {
                rx,
                guard,
                done: false,
            }),
            Ok(Err(e)) => {
                guard.armed = false;
                Err(e)
            }
            Err(_) => {
                guard.armed = false;
                Err(ServeError::SchedulerGone)
            }
        }
    }
}
