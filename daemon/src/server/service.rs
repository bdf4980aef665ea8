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
        let stream = self
            .gateway
            .generate(request.into_inner(), Interface::Grpc, arrival)
            .await?;
        Ok(Response::new(stream))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(ServeError::invalid("request_id", "is empty").to_status());
        }
        check_request_id(&id).map_err(|e| e.to_status())?;
        let found = self.gateway.abort(&id);
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

/// The bearer-token check in front of the Inference service: `authorization: Bearer <t>`.
#[derive(Clone)]
pub(crate) struct BearerAuth {
    pub token: Option<Arc<str>>,
}

impl BearerAuth {
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.verify(given) {
            Ok(()) => Ok(req),
            Err(why) => Err(Status::unauthenticated(why)),
        }
    }

    /// Check the value of an `authorization` header (if the request had one); the reason
    /// for refusing it otherwise.
    pub fn verify(&self, header: Option<&str>) -> Result<(), &'static str> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        match header.and_then(|v| v.strip_prefix("Bearer ")) {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
            Some(_) => Err("the bearer token is not valid"),
            None => Err("this server requires an `authorization: Bearer <token>` header"),
        }
    }
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
    pub ids: std::collections::HashMap<String, SeqId>,
    pub in_system: usize,
    pub next_key: SeqId,
}

pub(crate) type AdmissionLock = Mutex<Admission>;
