//! OpenAI requests turned into the gRPC `GenerateRequest` that the [`Gateway`] takes, so
//! that both interfaces share one validation, one admission and one scheduler. Fields that
//! only the HTTP API has are checked here, each error naming the OpenAI field.
//!
//! [`Gateway`]: crate::server::gateway::Gateway

use super::error::ApiError;
use super::types::{
    ChatRequest, CompletionRequest, Content, InstinferOptions, Message, OneOrMany, PromptInput,
    Unsupported,
};
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::generate_request::Prompt;

/// Most alternatives per token the completions API's `logprobs` may ask for (OpenAI's limit).
const MAX_COMPLETION_LOGPROBS: u32 = 5;
/// Most alternatives per token the chat API's `top_logprobs` may ask for (OpenAI's limit).
const MAX_CHAT_TOP_LOGPROBS: u32 = 20;

/// A request ready for the gateway, and how to answer it.
#[derive(Debug)]
pub struct Plan {
    /// What the scheduler runs; its `request_id` is the response's `id`.
    pub request: pb::GenerateRequest,
    /// Answer with server-sent events.
    pub stream: bool,
    /// In a stream, send the usage in a last chunk.
    pub include_usage: bool,
    /// Log-probabilities asked for: the alternatives per token.
    pub logprobs: Option<u32>,
    /// The end user's id, for the log.
    pub user: Option<String>,
}

/// The fields that chat and completions requests share.
struct Shared<'a> {
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<OneOrMany>,
    n: Option<u32>,
    instinfer: Option<InstinferOptions>,
    unsupported: &'a Unsupported,
}

/// A fresh request id with `prefix` (`chatcmpl` or `cmpl`).
pub fn request_id(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        rand::random::<u64>(),
        rand::random::<u32>()
    )
}

/// `model` must name the served model when it is given.
pub fn check_model(requested: Option<&str>, served: &str) -> Result<(), ApiError> {
    match requested {
        Some(m) if m != served => Err(ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "model {m:?} is not served here; this server serves {served:?} (GET /v1/models)"
            ),
        )
        .with_param("model")),
        _ => Ok(()),
    }
}

impl ApiError {
    fn with_param(mut self, param: &str) -> Self {
        self.body.param = Some(param.to_string());
        self
    }
}

/// A chat completions request as a gRPC request.
pub fn chat(req: ChatRequest) -> Result<Plan, ApiError> {
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "needs logprobs set to true",
            ))
        }
        (false, _) => None,
        (true, n) => {
            let n = n.unwrap_or(0);
            if n > MAX_CHAT_TOP_LOGPROBS {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("{n} is over the limit of {MAX_CHAT_TOP_LOGPROBS}"),
                ));
            }
            Some(n)
        }
    };
    let messages = chat_messages(req.messages)?;
    let mut request = shared(Shared {
        max_tokens: req.max_tokens,
        max_completion_tokens: req.max_completion_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        n: req.n,
        instinfer: req.instinfer,
        unsupported: &req.unsupported,
    })?;
    request.prompt = Some(Prompt::Chat(pb::ChatPrompt {
        messages,
        add_generation_prompt: Some(true),
    }));
    request.logprobs = logprobs;
    request.request_id = request_id("chatcmpl");
    Ok(Plan {
        request,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        logprobs,
        user: req.user,
    })
}

/// A completions request as a gRPC request.
pub fn completion(req: CompletionRequest) -> Result<Plan, ApiError> {
    if req.echo {
        return Err(ApiError::invalid("echo", "is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "is not supported"));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid(
            "best_of",
            "only best_of = 1 is supported",
        ));
    }
    if let Some(n) = req.logprobs {
        if n > MAX_COMPLETION_LOGPROBS {
            return Err(ApiError::invalid(
                "logprobs",
                format!("{n} is over the limit of {MAX_COMPLETION_LOGPROBS}"),
            ));
        }
    }
    let prompt = completion_prompt(req.prompt)?;
    let mut request = shared(Shared {
        max_tokens: req.max_tokens,
        max_completion_tokens: req.max_completion_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        n: req.n,
        instinfer: req.instinfer,
        unsupported: &req.unsupported,
    })?;
    request.prompt = Some(prompt);
    request.logprobs = req.logprobs;
    request.request_id = request_id("cmpl");
    Ok(Plan {
        request,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        logprobs: req.logprobs,
        user: req.user,
    })
}

fn chat_messages(messages: Vec<Message>) -> Result<Vec<pb::ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "is empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "user" | "assistant" => m.role,
            // OpenAI's newer name for system instructions.
            "developer" => "system".to_string(),
            other => {
                return Err(ApiError::invalid(
                    &format!("messages[{i}].role"),
                    format!("{other:?} is not supported (system, developer, user or assistant)"),
                ))
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut texts = Vec::with_capacity(parts.len());
                for (j, p) in parts.into_iter().enumerate() {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => texts.push(t),
                        ("text", None) => {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content[{j}].text"),
                                "is missing",
                            ))
                        }
                        (kind, _) => {
                            return Err(ApiError::invalid(
                                &format!("messages[{i}].content[{j}].type"),
                                format!("{kind:?} parts are not supported; this model reads text"),
                            ))
                        }
                    }
                }
                texts.join("\n")
            }
        };
        out.push(pb::ChatMessage { role, content });
    }
    Ok(out)
}

fn completion_prompt(p: PromptInput) -> Result<Prompt, ApiError> {
    let one = |n: usize| {
        ApiError::invalid(
            "prompt",
            format!("a list of {n} prompts; this server takes one prompt per request"),
        )
    };
    match p {
        PromptInput::Text(t) => Ok(Prompt::Text(t)),
        PromptInput::Tokens(ids) => token_prompt(ids),
        PromptInput::Texts(mut v) if v.len() == 1 => Ok(Prompt::Text(v.remove(0))),
        PromptInput::Texts(v) => Err(one(v.len())),
        PromptInput::TokenLists(mut v) if v.len() == 1 => token_prompt(v.remove(0)),
        PromptInput::TokenLists(v) => Err(one(v.len())),
    }
}

fn token_prompt(ids: Vec<i64>) -> Result<Prompt, ApiError> {
    let mut out = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        let id = u32::try_from(id).map_err(|_| {
            ApiError::invalid(
                "prompt",
                format!("token id {id} at index {i} is not a token id"),
            )
        })?;
        out.push(id);
    }
    if out.is_empty() {
        return Err(ApiError::invalid("prompt", "is an empty list of token ids"));
    }
    Ok(Prompt::Tokens(pb::TokenPrompt { ids: out }))
}

fn check_unsupported(u: &Unsupported) -> Result<(), ApiError> {
    let unsupported =
        |field: &str| ApiError::invalid(field, "is not supported by this server (leave it unset)");
    if u.frequency_penalty.is_some_and(|v| v != 0.0) {
        return Err(unsupported("frequency_penalty"));
    }
    if u.presence_penalty.is_some_and(|v| v != 0.0) {
        return Err(unsupported("presence_penalty"));
    }
    if u.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("logit_bias"));
    }
    if u.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("tools"));
    }
    if u.functions.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("functions"));
    }
    match &u.response_format {
        None | Some(serde_json::Value::Null) => {}
        Some(f) if f.get("type").and_then(|t| t.as_str()) == Some("text") => {}
        Some(_) => return Err(unsupported("response_format")),
    }
    Ok(())
}

fn shared(s: Shared<'_>) -> Result<pb::GenerateRequest, ApiError> {
    check_unsupported(s.unsupported)?;
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    let (max_tokens, max_field) = match (s.max_completion_tokens, s.max_tokens) {
        (Some(n), _) => (Some(n), "max_completion_tokens"),
        (None, n) => (n, "max_tokens"),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(max_field, "must be at least 1"));
    }
    // OpenAI's default temperature is 1.
    let temperature = s.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(ApiError::invalid(
            "temperature",
            format!("must be a finite number >= 0, got {temperature}"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("must be in (0, 1], got {top_p}"),
        ));
    }
    let opts = s.instinfer.unwrap_or_default();
    let attention = match opts.attention.as_deref() {
        None | Some("full") => pb::AttentionMode::Full,
        Some("flexgen") => pb::AttentionMode::Flexgen,
        Some("sparse") => pb::AttentionMode::Sparse,
        Some(other) => {
            return Err(ApiError::invalid(
                "instinfer.attention",
                format!("{other:?} is not an attention mode (full, flexgen or sparse)"),
            ))
        }
    };
    let cache = match opts.cache.as_deref() {
        None | Some("use_and_store") => pb::CacheMode::UseAndStore,
        Some("use_only") => pb::CacheMode::UseOnly,
        Some("off") => pb::CacheMode::Off,
        Some(other) => {
            return Err(ApiError::invalid(
                "instinfer.cache",
                format!("{other:?} is not a cache mode (use_and_store, use_only or off)"),
            ))
        }
    };
    Ok(pb::GenerateRequest {
        sampling: Some(pb::SamplingParams {
            temperature: Some(temperature),
            top_k: opts.top_k,
            top_p: Some(top_p),
            // Without a seed the gateway draws one per request (OpenAI's behaviour).
            seed: s.seed.map(|v| v as u64),
        }),
        max_tokens,
        stop: s.stop.map(OneOrMany::into_vec).unwrap_or_default(),
        attention: attention as i32,
        ignore_eos: opts.ignore_eos,
        cache: cache as i32,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_json(v: serde_json::Value) -> Result<Plan, ApiError> {
        chat(serde_json::from_value(v).expect("a chat request"))
    }

    #[test]
    fn chat_requests_map_onto_generate() {
        let p = chat_json(serde_json::json!({
            "model": "m",
            "messages": [{"role": "developer", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0,
            "stop": "x", "seed": -1, "logprobs": true, "top_logprobs": 3,
            "stream": true, "stream_options": {"include_usage": true},
            "instinfer": {"attention": "sparse", "cache": "off"}
        }))
        .unwrap();
        let r = &p.request;
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.stop, vec!["x"]);
        assert_eq!(r.logprobs, Some(3));
        assert_eq!(r.attention, pb::AttentionMode::Sparse as i32);
        assert_eq!(r.cache, pb::CacheMode::Off as i32);
        let s = r.sampling.as_ref().unwrap();
        assert_eq!((s.temperature, s.seed), (Some(0.0), Some(u64::MAX)));
        let Some(Prompt::Chat(c)) = &r.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(c.messages[0].role, "system");
        assert_eq!(c.messages[1].content, "hi");
        assert!(p.stream && p.include_usage);
        assert!(r.request_id.starts_with("chatcmpl-"));
    }

    #[test]
    fn bad_fields_are_named() {
        let base = || serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        let field = |patch: serde_json::Value| {
            let mut v = base();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            chat_json(v).unwrap_err().body.param.unwrap()
        };
        assert_eq!(field(serde_json::json!({"n": 2})), "n");
        assert_eq!(field(serde_json::json!({"temperature": -1})), "temperature");
        assert_eq!(field(serde_json::json!({"top_p": 0})), "top_p");
        assert_eq!(field(serde_json::json!({"max_tokens": 0})), "max_tokens");
        assert_eq!(
            field(serde_json::json!({"top_logprobs": 2})),
            "top_logprobs"
        );
        assert_eq!(
            field(serde_json::json!({"logprobs": true, "top_logprobs": 21})),
            "top_logprobs"
        );
        assert_eq!(
            field(serde_json::json!({"presence_penalty": 1.0})),
            "presence_penalty"
        );
        assert_eq!(
            field(serde_json::json!({"instinfer": {"attention": "fast"}})),
            "instinfer.attention"
        );
        assert_eq!(
            field(serde_json::json!({"messages": [{"role": "tool", "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(field(serde_json::json!({"messages": []})), "messages");
        let c = |v: serde_json::Value| completion(serde_json::from_value(v).unwrap());
        let e = c(serde_json::json!({"prompt": ["a", "b"]})).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("prompt"));
        let e = c(serde_json::json!({"prompt": "a", "logprobs": 6})).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("logprobs"));
        let e = c(serde_json::json!({"prompt": [1, -2]})).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("prompt"));
        let ok = c(serde_json::json!({"prompt": [[1, 2]], "logprobs": 2})).unwrap();
        assert!(matches!(ok.request.prompt, Some(Prompt::Tokens(ref t)) if t.ids == [1, 2]));
        assert!(check_model(Some("other"), "m").unwrap_err().status == 404);
        assert!(check_model(None, "m").is_ok() && check_model(Some("m"), "m").is_ok());
    }
}
