//! A generation's messages turned into OpenAI's answers: one JSON object, or a stream of
//! server-sent events of chunks that ends with `data: [DONE]`.

use super::error::ApiError;
use super::types::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatLogprobs,
    ChatTokenLogprob, Completion, CompletionChoice, CompletionLogprobs, Delta, PromptTokensDetails,
    ResponseExtras, TopLogprob, Usage,
};
use crate::server::gateway::GenerateStream;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use futures_util::Stream;
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::generate_response::Event as GenEvent;
use instinfer_runtime::tokenizer::Tokenizer;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// Which API answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// What every answer of one request repeats.
#[derive(Clone)]
pub struct Answer {
    /// Chat or completions.
    pub api: Api,
    /// The request's id.
    pub id: String,
    /// Unix seconds when the request arrived.
    pub created: u64,
    /// The model's id.
    pub model: Arc<str>,
    /// Log-probabilities asked for.
    pub logprobs: Option<u32>,
    /// Send the usage in a last chunk of a stream.
    pub include_usage: bool,
    /// Decodes token ids for the log-probabilities.
    pub tokenizer: Arc<dyn TokenText>,
}

/// A token's text and bytes, for log-probability entries.
pub trait TokenText: Send + Sync {
    /// The bytes the token stands for.
    fn bytes(&self, id: u32) -> Vec<u8>;
}

/// [`TokenText`] from the model's tokenizer.
pub struct ModelTokens(pub Arc<instinfer_runtime::LoadedModel>);

impl TokenText for ModelTokens {
    fn bytes(&self, id: u32) -> Vec<u8> {
        let t: &Tokenizer = &self.0.tokenizer;
        t.token_piece(id, true).to_vec()
    }
}

/// OpenAI's finish reason (`stop` or `length`) for a generation that ended normally, or
/// the error to answer with. An aborted generation (the drain's grace period ran out, or
/// an `Abort` call) is a 503, which clients retry: it did not finish.
fn finish_reason(f: &pb::Finished) -> Result<&'static str, ApiError> {
    match pb::FinishReason::try_from(f.reason) {
        Ok(pb::FinishReason::Stop) => Ok("stop"),
        Ok(pb::FinishReason::Length) => Ok("length"),
        Ok(pb::FinishReason::Aborted) => {
            let generated = f.usage.as_ref().map_or(0, |u| u.generated_tokens);
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable",
                Some("aborted"),
                format!(
                    "the generation was aborted after {generated} tokens: {}",
                    f.message
                ),
            ))
        }
        _ => {
            let (status, kind) = match tonic::Code::from_i32(f.error_code) {
                tonic::Code::ResourceExhausted => {
                    (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
                }
                tonic::Code::Unavailable => {
                    (StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
                }
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error")
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            };
            Err(ApiError::new(
                status,
                kind,
                Some("generation_failed"),
                format!("the generation failed: {}", f.message),
            ))
        }
    }
}

fn usage(u: &pb::Usage) -> Usage {
    Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.generated_tokens,
        total_tokens: u.prompt_tokens + u.generated_tokens,
        prompt_tokens_details: PromptTokensDetails {
            cached_tokens: u.cached_tokens,
        },
    }
}

impl Answer {
    fn chat_logprob(&self, t: &pb::Token) -> Option<ChatTokenLogprob> {
        self.logprobs?;
        let bytes = self.tokenizer.bytes(t.id);
        Some(ChatTokenLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob: t.logprob.unwrap_or(f32::NEG_INFINITY),
            bytes,
            top_logprobs: t
                .top_logprobs
                .iter()
                .map(|a| {
                    let bytes = self.tokenizer.bytes(a.id);
                    TopLogprob {
                        token: String::from_utf8_lossy(&bytes).into_owned(),
                        logprob: a.logprob,
                        bytes,
                    }
                })
                .collect(),
        })
    }

    /// Add `t` to the legacy log-probabilities, at `offset` characters into the text sent
    /// (the text of tokens whose bytes end mid-character, or that may start a stop string,
    /// goes out later, so offsets follow the text, not the tokens).
    fn completion_logprob(&self, t: &pb::Token, into: &mut CompletionLogprobs, offset: usize) {
        if self.logprobs.is_none() {
            return;
        }
        let text = String::from_utf8_lossy(&self.tokenizer.bytes(t.id)).into_owned();
        into.text_offset.push(offset);
        into.tokens.push(text);
        into.token_logprobs
            .push(t.logprob.unwrap_or(f32::NEG_INFINITY));
        let mut top = serde_json::Map::new();
        for a in &t.top_logprobs {
            let s = String::from_utf8_lossy(&self.tokenizer.bytes(a.id)).into_owned();
            top.entry(s).or_insert_with(|| serde_json::json!(a.logprob));
        }
        into.top_logprobs.push(top);
    }

    /// Wait for the whole generation and answer with one JSON object.
    pub async fn whole(self, mut gen: GenerateStream) -> Response {
        let mut text = String::new();
        let mut chat_lp = ChatLogprobs::default();
        let mut comp_lp = CompletionLogprobs::default();
        let mut offset = 0;
        loop {
            let msg = match gen.next_event().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => return ApiError::from_serve(e).into_response(),
                None => {
                    return ApiError::from_serve(crate::server::error::ServeError::SchedulerGone)
                        .into_response()
                }
            };
            match msg.event {
                Some(GenEvent::Token(t)) => {
                    match self.api {
                        Api::Chat => chat_lp.content.extend(self.chat_logprob(&t)),
                        Api::Completions => self.completion_logprob(&t, &mut comp_lp, offset),
                    }
                    text.push_str(&t.text);
                    offset += t.text.chars().count();
                }
                Some(GenEvent::Finished(f)) => {
                    text.push_str(&f.text);
                    let reason = match finish_reason(&f) {
                        Ok(r) => r,
                        Err(e) => return e.into_response(),
                    };
                    let usage = usage(&f.usage.unwrap_or_default());
                    let extras = ResponseExtras { seed: f.seed };
                    return self.whole_body(text, reason, usage, extras, chat_lp, comp_lp);
                }
                None => {}
            }
        }
    }

    fn whole_body(
        &self,
        text: String,
        reason: &'static str,
        usage: Usage,
        extras: ResponseExtras,
        chat_lp: ChatLogprobs,
        comp_lp: CompletionLogprobs,
    ) -> Response {
        let with_lp = self.logprobs.is_some();
        match self.api {
            Api::Chat => Json(ChatCompletion {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.to_string(),
                choices: vec![ChatChoice {
                    index: 0,
                    message: AssistantMessage {
                        role: "assistant",
                        content: text,
                    },
                    logprobs: with_lp.then_some(chat_lp),
                    finish_reason: reason,
                }],
                usage,
                instinfer: extras,
            })
            .into_response(),
            Api::Completions => Json(Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.to_string(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs: with_lp.then_some(comp_lp),
                    finish_reason: Some(reason),
                }],
                usage: Some(Some(usage)),
                instinfer: Some(extras),
            })
            .into_response(),
        }
    }

    /// Answer with server-sent events, one chunk per token (tokens whose text is held back
    /// send a chunk only with log-probabilities). Dropping the stream, as hyper does when
    /// the client goes away, cancels the generation.
    pub fn stream(self, gen: GenerateStream) -> Response {
        let mut st = SseState {
            answer: self,
            gen,
            queue: VecDeque::new(),
            offset: 0,
            finished: false,
        };
        if st.answer.api == Api::Chat {
            let first = st.answer.chat_chunk(
                Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                None,
                None,
            );
            st.queue.push_back(first);
        }
        let events = futures_util::stream::unfold(st, |mut st| async move {
            loop {
                if let Some(ev) = st.queue.pop_front() {
                    return Some((Ok::<_, Infallible>(ev), st));
                }
                if st.finished {
                    return None;
                }
                st.next().await;
            }
        });
        sse(events)
    }

    /// A chat chunk; `finish` (the reason, and the extras) only in the last of the choice.
    fn chat_chunk(
        &self,
        delta: Delta,
        logprobs: Option<ChatLogprobs>,
        finish: Option<(&'static str, ResponseExtras)>,
    ) -> Event {
        json_event(&ChatChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.to_string(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason: finish.map(|f| f.0),
            }],
            usage: self.include_usage.then_some(None),
            instinfer: finish.map(|f| f.1),
        })
    }

    /// A completion chunk; `finish` (the reason, and the extras) only in the last.
    fn completion_chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish: Option<(&'static str, ResponseExtras)>,
    ) -> Event {
        json_event(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.to_string(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs,
                finish_reason: finish.map(|f| f.0),
            }],
            usage: self.include_usage.then_some(None),
            instinfer: finish.map(|f| f.1),
        })
    }

    fn usage_chunk(&self, usage: Usage) -> Event {
        match self.api {
            Api::Chat => json_event(&ChatChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.to_string(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
                instinfer: None,
            }),
            Api::Completions => json_event(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.to_string(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
                instinfer: None,
            }),
        }
    }

    /// A chunk of new text (and the log-probabilities of the token that made it).
    fn text_chunk(&self, t: Option<&pb::Token>, text: String, offset: &mut usize) -> Event {
        match self.api {
            Api::Chat => self.chat_chunk(
                Delta {
                    role: None,
                    content: Some(text),
                },
                t.and_then(|t| self.chat_logprob(t))
                    .map(|e| ChatLogprobs { content: vec![e] }),
                None,
            ),
            Api::Completions => {
                let lp = t.filter(|_| self.logprobs.is_some()).map(|t| {
                    let mut lp = CompletionLogprobs::default();
                    self.completion_logprob(t, &mut lp, *offset);
                    lp
                });
                *offset += text.chars().count();
                self.completion_chunk(text, lp, None)
            }
        }
    }
}

struct SseState {
    answer: Answer,
    gen: GenerateStream,
    queue: VecDeque<Event>,
    /// Characters of text sent so far (the legacy log-probabilities' offsets).
    offset: usize,
    finished: bool,
}

impl SseState {
    /// Wait for the generation's next message and queue the events it makes.
    async fn next(&mut self) {
        let a = &self.answer;
        match self.gen.next_event().await {
            Some(Ok(msg)) => match msg.event {
                Some(GenEvent::Token(t)) if !t.text.is_empty() || a.logprobs.is_some() => {
                    let text = t.text.clone();
                    let ev = a.text_chunk(Some(&t), text, &mut self.offset);
                    self.queue.push_back(ev);
                }
                Some(GenEvent::Token(_)) => {}
                Some(GenEvent::Finished(f)) => {
                    if !f.text.is_empty() {
                        let ev = a.text_chunk(None, f.text.clone(), &mut self.offset);
                        self.queue.push_back(ev);
                    }
                    match finish_reason(&f) {
                        Ok(reason) => {
                            let finish = Some((reason, ResponseExtras { seed: f.seed }));
                            let last = match a.api {
                                Api::Chat => a.chat_chunk(Delta::default(), None, finish),
                                Api::Completions => a.completion_chunk(String::new(), None, finish),
                            };
                            self.queue.push_back(last);
                            if a.include_usage {
                                let u = usage(&f.usage.unwrap_or_default());
                                self.queue.push_back(a.usage_chunk(u));
                            }
                        }
                        Err(e) => self.queue.push_back(error_event(&e)),
                    }
                    self.done();
                }
                None => {}
            },
            Some(Err(e)) => {
                self.queue.push_back(error_event(&ApiError::from_serve(e)));
                self.done();
            }
            None => self.done(),
        }
    }

    fn done(&mut self) {
        self.queue.push_back(Event::default().data("[DONE]"));
        self.finished = true;
    }
}

fn json_event<T: serde::Serialize>(v: &T) -> Event {
    Event::default().data(serde_json::to_string(v).unwrap_or_else(|e| {
        format!(r#"{{"error":{{"message":"encoding a chunk: {e}","type":"server_error"}}}}"#)
    }))
}

/// An error in the middle of a stream, after the 200 went out: OpenAI's error object as a
/// data event (the `openai` clients raise it).
fn error_event(e: &ApiError) -> Event {
    Event::default().data(e.json())
}

/// The events as a `text/event-stream` response, with a comment every 15 s while nothing
/// else is sent (a long prefill), so that proxies keep the connection.
fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
