//! The `instinfer.v1.Inference` gRPC service, over the [`Gateway`] that every interface
//! shares, and the bearer-token check in front of it.

use super::error::ServeError;
use super::gateway::{check_request_id, Gateway, GenerateStream};
use super::metrics::Interface;
use super::scheduler::Command;
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_server::Inference;
use instinfer_runtime::kv::SeqId;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

pub(crate) struct InferenceService {
    pub gateway: Arc<Gateway>,
    pub info: pb::ModelInfo,
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let arrival = Instant::now();
        let who = principal(&request);
        let stream = self
            .gateway
            .generate(request.into_inner(), Interface::Grpc, arrival, who)
            .await?;
        Ok(Response::new(stream))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let who = principal(&request);
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(ServeError::invalid("request_id", "is empty").to_status());
        }
        check_request_id(&id).map_err(|e| e.to_status())?;
        // Only the sender's own requests: another client's id is "not found".
        let found = self.gateway.abort(who, &id);
        tracing::info!(request_id = %id, found, "abort");
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn get_stats(
        &self,
        _request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        Ok(Response::new(self.gateway.shared.stats()))
    }

    async fn clear_cache(
        &self,
        _request: Request<pb::ClearCacheRequest>,
    ) -> Result<Response<pb::ClearCacheResponse>, Status> {
        let (tx, rx) = oneshot::channel();
        if self.gateway.commands.send(Command::ClearCache(tx)).is_err() {
            return Err(ServeError::SchedulerGone.to_status());
        }
        let pages_dropped = rx
            .await
            .map_err(|_| ServeError::SchedulerGone.to_status())?
            .map_err(|e| e.to_status())?;
        tracing::info!(pages_dropped, "prefix cache cleared");
        Ok(Response::new(pb::ClearCacheResponse { pages_dropped }))
    }
}

/// Who sent a request: the index of its bearer token among the configured ones, or
/// `None` when authentication is off. Request ids are scoped to it: a client can see (as
/// ALREADY_EXISTS) and abort only the requests sent with its own token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct Principal(pub Option<u16>);

/// The bearer-token check in front of the Inference service: `authorization: Bearer <t>`,
/// with one of the configured tokens.
#[derive(Clone)]
pub(crate) struct BearerAuth {
    /// The tokens; empty turns the check off.
    pub tokens: Arc<[Arc<str>]>,
}

impl BearerAuth {
    /// Pass a gRPC request with a valid token, marked with its [`Principal`].
    #[allow(clippy::result_large_err)]
    pub fn check(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.verify(given) {
            Ok(who) => {
                req.extensions_mut().insert(who);
                Ok(req)
            }
            Err(why) => Err(Status::unauthenticated(why)),
        }
    }

    /// Check the value of an `authorization` header (if the request had one): who sent it,
    /// or the reason for refusing it.
    pub fn verify(&self, header: Option<&str>) -> Result<Principal, &'static str> {
        if self.tokens.is_empty() {
            return Ok(Principal(None));
        }
        let Some(given) = header.and_then(|v| v.strip_prefix("Bearer ")) else {
            return Err("this server requires an `authorization: Bearer <token>` header");
        };
        // Every token is compared, so the time does not tell which one matched.
        let mut found = None;
        for (i, t) in self.tokens.iter().enumerate() {
            if constant_time_eq(given.as_bytes(), t.as_bytes()) {
                found = Some(i as u16);
            }
        }
        found
            .map(|i| Principal(Some(i)))
            .ok_or("the bearer token is not valid")
    }
}

/// The sender of a gRPC request, as the auth check marked it.
fn principal<T>(req: &Request<T>) -> Principal {
    req.extensions()
        .get::<Principal>()
        .copied()
        .unwrap_or_default()
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Request ids of running and queued requests, and how many requests are in the server.
#[derive(Default)]
pub(crate) struct Admission {
    pub ids: std::collections::HashMap<(Principal, String), SeqId>,
    pub in_system: usize,
    pub next_key: SeqId,
}

pub(crate) type AdmissionLock = Mutex<Admission>;
