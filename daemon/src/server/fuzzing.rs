//! Entry points for the fuzz targets (feature `fuzzing`, off by default; not an API): a
//! request's bytes as a client sends them, through the same decoding, validation, chat
//! rendering and tokenization as the gRPC service and the HTTP API, up to the point where
//! admission would queue the request. No scheduler runs.

use super::gateway::{prepare, Limits, ModeSupport};
use super::http::{body, convert};
use crate::config::{Config, ConfigLayer, KvCache};
use instinfer_proto::v1 as pb;
use instinfer_runtime::kv::AttentionMode;
use instinfer_runtime::LoadedModel;
use prost::Message;
use std::sync::Arc;
pub use tonic::Code;

/// Which interface the bytes came in through.
#[derive(Clone, Copy, Debug)]
pub enum Interface {
    /// gRPC `Generate`: a protobuf `GenerateRequest`.
    Grpc,
    /// `POST /v1/chat/completions`: a JSON body.
    Chat,
    /// `POST /v1/completions`: a JSON body.
    Completion,
}

/// How a request ended: accepted with this many prompt tokens, or refused with a status.
#[derive(Debug)]
pub enum Verdict {
    /// Valid: it would be queued with this many prompt tokens.
    Accepted(usize),
    /// Refused with this gRPC code (for HTTP, the code its status stands for) and message.
    Refused(Code, String),
    /// Not a protobuf message at all: tonic refuses it before the service sees it.
    Undecodable(String),
}

/// The gRPC code an HTTP error status stands for.
fn http_code(status: u16) -> Code {
    match status {
        400 | 404 | 405 => Code::InvalidArgument,
        413 | 429 | 507 => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

/// Validates requests for one model with the daemon's default limits.
pub struct Validator {
    loaded: Arc<LoadedModel>,
    limits: Limits,
    modes: ModeSupport,
}

impl Validator {
    /// A validator for `loaded` with the limits of the daemon's default configuration (KV
    /// cache in RAM, so that resolving it needs no state directory) and every attention mode
    /// available.
    pub fn new(loaded: Arc<LoadedModel>) -> Self {
        let config = Config::resolve(ConfigLayer {
            kv_cache: Some(KvCache::Ram),
            ..ConfigLayer::default()
        })
        .expect("the default configuration is valid");
        Validator {
            loaded,
            limits: Limits::of(&config),
            modes: [
                AttentionMode::Full,
                AttentionMode::Flexgen,
                AttentionMode::Sparse,
            ]
            .into_iter()
            .map(|m| (m, Ok(())))
            .collect(),
        }
    }

    /// The longest prompt accepted, in tokens.
    pub fn max_prompt_tokens(&self) -> usize {
        self.limits.max_prompt_tokens
    }

    /// Decode and validate `bytes` as a request through `interface`.
    pub fn check(&self, interface: Interface, bytes: &[u8]) -> Verdict {
        let request = match interface {
            Interface::Grpc => match pb::GenerateRequest::decode(bytes) {
                Ok(r) => r,
                Err(e) => return Verdict::Undecodable(e.to_string()),
            },
            Interface::Chat => match body::parse(bytes).and_then(convert::chat) {
                Ok(plan) => plan.request,
                Err(e) => return Verdict::Refused(http_code(e.status.as_u16()), e.body.message),
            },
            Interface::Completion => match body::parse(bytes).and_then(convert::completion) {
                Ok(plan) => plan.request,
                Err(e) => return Verdict::Refused(http_code(e.status.as_u16()), e.body.message),
            },
        };
        match prepare(&self.loaded, &self.limits, &self.modes, request) {
            Ok(p) => Verdict::Accepted(p.prompt.len()),
            Err(e) => Verdict::Refused(e.code(), e.public_message()),
        }
    }
}
