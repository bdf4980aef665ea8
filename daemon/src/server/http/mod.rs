//! The OpenAI-compatible HTTP API, a second door into the same scheduler as gRPC:
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` and `GET /health`,
//! on axum over hyper (HTTP/1.1 and HTTP/2, TLS with the gRPC server's certificate when
//! one is configured). Requests become gRPC `GenerateRequest`s ([`convert`]) and go
//! through the [`Gateway`]: the same validation, limits, admission, metrics (with
//! `interface="http"`) and drain as gRPC.

pub(crate) mod body;
pub(crate) mod convert;
mod error;
mod respond;
mod types;

use super::gateway::Gateway;
use super::metrics::{Interface, Outcome};
use super::service::{BearerAuth, Principal};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use respond::{Answer, Api, ModelTokens};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use types::{ModelCard, ModelList};

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct HttpState {
    pub gateway: Arc<Gateway>,
    pub auth: BearerAuth,
    /// The id requests name in `model`: the model file's name without `.gguf`.
    pub model_id: Arc<str>,
    /// Unix seconds when the server started.
    pub created: u64,
    pub body: body::BodyLimits,
}

impl HttpState {
    /// The state for `gateway`, serving the model file named `model_file`.
    pub fn new(
        gateway: Arc<Gateway>,
        auth: BearerAuth,
        model_file: &str,
        body: body::BodyLimits,
    ) -> Self {
        let id = model_file.strip_suffix(".gguf").unwrap_or(model_file);
        HttpState {
            gateway,
            auth,
            model_id: Arc::from(id),
            created: unix_now(),
            body,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The API's routes. Everything under `/v1` needs the bearer token when one is configured;
/// `/health` does not (as the gRPC health service).
pub(crate) fn router(state: HttpState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn require_token(State(st): State<HttpState>, req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match st.auth.verify(header) {
        Ok(who) => {
            let mut req = req;
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        Err(why) => {
            if req.method() == axum::http::Method::POST {
                st.gateway
                    .shared
                    .metrics
                    .request(Interface::Http, Outcome::Rejected);
            }
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                Some("invalid_api_key"),
                why,
            )
            .into_response()
        }
    }
}

async fn not_found(req: Request) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        format!(
            "no route for {} {} (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health)",
            req.method(),
            req.uri().path()
        ),
    )
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        Some("method_not_allowed"),
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
    .into_response()
}

/// 200 while serving, 503 while draining or when the scheduler has stopped.
async fn health(State(st): State<HttpState>) -> Response {
    let shared = &st.gateway.shared;
    let (status, word) = if shared.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if shared.scheduler_stopped() {
        (StatusCode::SERVICE_UNAVAILABLE, "not_serving")
    } else {
        (StatusCode::OK, "serving")
    };
    (status, Json(serde_json::json!({ "status": word }))).into_response()
}

fn card(st: &HttpState) -> ModelCard {
    ModelCard {
        id: st.model_id.to_string(),
        object: "model",
        created: st.created,
        owned_by: "instinfer",
        max_model_len: st.gateway.loaded.model.config.context_len as u32,
    }
}

async fn models(State(st): State<HttpState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&st)],
    })
}

async fn model(State(st): State<HttpState>, Path(id): Path<String>) -> Response {
    match convert::check_model(Some(&id), &st.model_id) {
        Ok(()) => Json(card(&st)).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn chat(State(st): State<HttpState>, req: Request) -> Response {
    let arrival = Instant::now();
    let who = sender(&req);
    let plan = body::read_json(req, st.body)
        .await
        .and_then(|r: types::ChatRequest| {
            convert::check_model(r.model.as_deref(), &st.model_id)?;
            convert::chat(r)
        });
    generate(st, plan, Api::Chat, arrival, who).await
}

async fn completions(State(st): State<HttpState>, req: Request) -> Response {
    let arrival = Instant::now();
    let who = sender(&req);
    let plan = body::read_json(req, st.body)
        .await
        .and_then(|r: types::CompletionRequest| {
            convert::check_model(r.model.as_deref(), &st.model_id)?;
            convert::completion(r)
        });
    generate(st, plan, Api::Completions, arrival, who).await
}

/// Who sent `req`, as the token check marked it.
fn sender(req: &Request) -> Principal {
    req.extensions()
        .get::<Principal>()
        .copied()
        .unwrap_or_default()
}

/// How much of a request's `user` field goes into the log.
const MAX_LOGGED_USER_CHARS: usize = 128;

/// Run a checked request through the gateway and answer it as `api` does.
async fn generate(
    st: HttpState,
    plan: Result<convert::Plan, ApiError>,
    api: Api,
    arrival: Instant,
    who: Principal,
) -> Response {
    let metrics = &st.gateway.shared.metrics;
    let plan = match plan {
        Ok(p) => p,
        Err(e) => {
            metrics.request(Interface::Http, Outcome::Rejected);
            tracing::info!(status = e.status.as_u16(), error = %e.body.message, "HTTP request refused");
            return e.into_response();
        }
    };
    if let Some(user) = &plan.user {
        // Debug-quoted and cut short: the client chose it.
        let user: String = user.chars().take(MAX_LOGGED_USER_CHARS).collect();
        tracing::info!(request_id = %plan.request.request_id, user = ?user, "HTTP request");
    }
    let answer = Answer {
        api,
        id: plan.request.request_id.clone(),
        created: unix_now(),
        model: st.model_id.clone(),
        logprobs: plan.logprobs,
        include_usage: plan.include_usage,
        tokenizer: Arc::new(ModelTokens(st.gateway.loaded.clone())),
    };
    // The gateway counts and logs its own refusals.
    let gen = match st
        .gateway
        .generate(plan.request, Interface::Http, arrival, who)
        .await
    {
        Ok(g) => g,
        Err(e) => return ApiError::from_serve(e).into_response(),
    };
    if plan.stream {
        answer.stream(gen)
    } else {
        answer.whole(gen).await
    }
}

/// TLS for the HTTP API, from the same PEM files as gRPC's.
pub(crate) fn tls_acceptor(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate chain: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("the private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
