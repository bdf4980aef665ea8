//! The JSON bodies of the OpenAI-compatible API, as serde types: what the endpoints accept
//! and what they send back. Unknown request fields are ignored, as OpenAI's own server
//! and vLLM do, except the ones that would change the output and that this server does not
//! implement ([`Unsupported`]): those are refused with a 400 naming them.

use serde::{Deserialize, Serialize};

/// A string, or a list of them (`stop`).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The strings, in order.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk, before `[DONE]`, carrying the request's usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// instinfer's own knobs, in the `instinfer` field of a request (the OpenAI Python client
/// sends them with `extra_body={"instinfer": {...}}`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstinferOptions {
    /// `full`, `flexgen` or `sparse` (the server's default: full).
    pub attention: Option<String>,
    /// `use_and_store`, `use_only` or `off` (the server's default: use_and_store).
    pub cache: Option<String>,
    /// Keep only the k most likely tokens when sampling; 0 keeps all.
    pub top_k: Option<u32>,
    /// Keep generating past end-of-generation tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

/// Request fields of OpenAI's API that change the output but that this server does not
/// implement; a request that sets one to anything but its neutral value is refused.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Unsupported {
    /// Penalties on repeated tokens.
    pub frequency_penalty: Option<f64>,
    /// Penalties on present tokens.
    pub presence_penalty: Option<f64>,
    /// Biases added to chosen tokens' logits.
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// Tool definitions.
    pub tools: Option<Vec<serde_json::Value>>,
    /// Legacy function definitions.
    pub functions: Option<Vec<serde_json::Value>>,
    /// A required output format.
    pub response_format: Option<serde_json::Value>,
}

/// The content of a chat message: a string, or a list of parts of which only `text` parts
/// are supported.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (other types, such as images, are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The part's text.
    pub text: Option<String>,
}

/// One chat message.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or `developer`, taken as `system`).
    pub role: String,
    /// The message's text; null or absent is empty.
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    /// The model's id (see `GET /v1/models`).
    pub model: Option<String>,
    /// The conversation so far.
    pub messages: Vec<Message>,
    /// Most tokens to generate (deprecated by OpenAI for `max_completion_tokens`).
    pub max_tokens: Option<u32>,
    /// Most tokens to generate.
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 (greedy) or more; OpenAI's default is 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1].
    pub top_p: Option<f32>,
    /// Seed of the sampler; the same seed gives the same text.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Options of the stream.
    pub stream_options: Option<StreamOptions>,
    /// Choices to generate; only 1 is supported.
    pub n: Option<u32>,
    /// Return the chosen tokens' log-probabilities.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs`, the most likely alternatives per token (0 to 20).
    pub top_logprobs: Option<u32>,
    /// The end user's id, logged.
    pub user: Option<String>,
    /// instinfer's own knobs.
    pub instinfer: Option<InstinferOptions>,
    /// Fields refused unless neutral.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// A completion's prompt: text, or token ids (or a list holding one of either).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<i64>),
    /// A list of texts (one supported).
    Texts(Vec<String>),
    /// A list of token-id lists (one supported).
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    /// The model's id (see `GET /v1/models`).
    pub model: Option<String>,
    /// The prompt.
    pub prompt: PromptInput,
    /// Most tokens to generate.
    pub max_tokens: Option<u32>,
    /// Also accepted here, for clients that send the chat API's name.
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature, 0 (greedy) or more; OpenAI's default is 1.
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1].
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<OneOrMany>,
    /// Stream server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Options of the stream.
    pub stream_options: Option<StreamOptions>,
    /// Choices to generate; only 1 is supported.
    pub n: Option<u32>,
    /// Return log-probabilities of the chosen tokens and this many alternatives (0 to 5).
    pub logprobs: Option<u32>,
    /// Echo the prompt back (not supported).
    #[serde(default)]
    pub echo: bool,
    /// Text after the completion (not supported).
    pub suffix: Option<String>,
    /// Candidates to pick the best of (only 1 is supported).
    pub best_of: Option<u32>,
    /// The end user's id, logged.
    pub user: Option<String>,
    /// instinfer's own knobs.
    pub instinfer: Option<InstinferOptions>,
    /// Fields refused unless neutral.
    #[serde(flatten)]
    pub unsupported: Unsupported,
}

/// `usage.prompt_tokens_details`.
#[derive(Clone, Debug, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens taken from the prefix cache instead of being prefilled.
    pub cached_tokens: u32,
}

/// `usage`.
#[derive(Clone, Debug, Serialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// The sum of both.
    pub total_tokens: u32,
    /// Details of the prompt's tokens.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// One alternative in a chat token's `top_logprobs`.
#[derive(Clone, Debug, Serialize)]
pub struct TopLogprob {
    /// The token's text (bytes that are not UTF-8 on their own are replaced).
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The token's bytes.
    pub bytes: Vec<u8>,
}

/// One generated token in a chat choice's `logprobs.content`.
#[derive(Clone, Debug, Serialize)]
pub struct ChatTokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this step.
    pub top_logprobs: Vec<TopLogprob>,
}

/// A chat choice's `logprobs`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<ChatTokenLogprob>,
}

/// A completion choice's `logprobs` (the legacy format).
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Each generated token's text.
    pub tokens: Vec<String>,
    /// Each generated token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// Each step's most likely tokens, text to log-probability.
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    /// Each token's offset in the completion's text, in characters.
    pub text_offset: Vec<usize>,
}

/// The assistant's message in a non-streamed chat choice.
#[derive(Clone, Debug, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
}

/// A non-streamed chat choice.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChoice {
    /// Always 0 (one choice per request).
    pub index: u32,
    /// The reply.
    pub message: AssistantMessage,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: &'static str,
}

/// A non-streamed chat completion.
#[derive(Clone, Debug, Serialize)]
pub struct ChatCompletion {
    /// The request's id (`chatcmpl-...`), also its `request_id` for gRPC Abort.
    pub id: String,
    /// Always `chat.completion`.
    pub object: &'static str,
    /// Unix time of the request, in seconds.
    pub created: u64,
    /// The model's id.
    pub model: String,
    /// The one choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// instinfer's own fields.
    pub instinfer: ResponseExtras,
}

/// instinfer's own fields in a response (`instinfer`), beside OpenAI's.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ResponseExtras {
    /// The sampling seed used: the request's, or the one the server drew for it. Send it
    /// back as `seed` to get the same text again.
    pub seed: u64,
}

/// The `delta` of a streamed chat chunk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Delta {
    /// `assistant` in the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A streamed chat choice.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0.
    pub index: u32,
    /// What is new.
    pub delta: Delta,
    /// Log-probabilities of the tokens in this chunk, when asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the last chunk of the choice.
    pub finish_reason: Option<&'static str>,
}

/// A chunk of a streamed chat completion.
#[derive(Clone, Debug, Serialize)]
pub struct ChatChunk {
    /// The request's id, the same in every chunk.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time of the request, in seconds.
    pub created: u64,
    /// The model's id.
    pub model: String,
    /// The choice's news; empty in the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the usage chunk (with `stream_options.include_usage`), null before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// instinfer's own fields, in the chunk that carries the finish reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instinfer: Option<ResponseExtras>,
}

/// A completion choice, streamed or not.
#[derive(Clone, Debug, Serialize)]
pub struct CompletionChoice {
    /// Always 0.
    pub index: u32,
    /// The text (all of it, or what is new in a chunk).
    pub text: String,
    /// Log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length` at the end, else null.
    pub finish_reason: Option<&'static str>,
}

/// A completion, or a chunk of a streamed one.
#[derive(Clone, Debug, Serialize)]
pub struct Completion {
    /// The request's id (`cmpl-...`).
    pub id: String,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix time of the request, in seconds.
    pub created: u64,
    /// The model's id.
    pub model: String,
    /// The one choice; empty in the usage chunk of a stream.
    pub choices: Vec<CompletionChoice>,
    /// Token counts: in a non-streamed completion, and in a stream's usage chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// instinfer's own fields: in a non-streamed completion, and in the chunk that carries
    /// the finish reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instinfer: Option<ResponseExtras>,
}

/// One entry of `GET /v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelCard {
    /// The id requests name in `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// When the server started, in Unix seconds.
    pub created: u64,
    /// Always `instinfer`.
    pub owned_by: &'static str,
    /// The model's context length in tokens.
    pub max_model_len: u32,
}

/// `GET /v1/models`.
#[derive(Clone, Debug, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The one model served.
    pub data: Vec<ModelCard>,
}

/// OpenAI's error object.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorBody {
    /// What went wrong, naming the field at fault.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The field at fault, if any.
    pub param: Option<String>,
    /// A short machine-readable code, if any.
    pub code: Option<&'static str>,
}

/// `{"error": {...}}`.
#[derive(Clone, Debug, Serialize)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorBody,
}
