//! The OpenAI-compatible HTTP API, a second door into the same scheduler as gRPC:
//! `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` and `GET /health`,
//! on axum over hyper (HTTP/1.1 and HTTP/2, TLS with the gRPC server's certificate when
//! one is configured). Requests become gRPC `GenerateRequest`s ([`convert`]) and go
//! through the [`Gateway`]: the same validation, limits, admission, metrics (with
//! `interface="http"`) and drain as gRPC.

mod body;
mod convert;
mod error;
mod respond;
mod types;

use super::gateway::Gateway;
use super::metrics::{Interface, Outcome};
use super::service::BearerAuth;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use respond::{Answer, Api, ModelTokens};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
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
    pub max_request_bytes: usize,
}

impl HttpState {
    /// The state for `gateway`, serving the model file named `model_file`.
    pub fn new(
        gateway: Arc<Gateway>,
        auth: BearerAuth,
        model_file: &str,
        max_request_bytes: usize,
    ) -> Self {
        let id = model_file.strip_suffix(".gguf").unwrap_or(model_file);
        HttpState {
            gateway,
            auth,
            model_id: Arc::from(id),
            created: unix_now(),
            max_request_bytes,
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
        Ok(()) => next.run(req).await,
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
    let (status, word) = if shared.is_draining() {
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
    let plan =
        body::read_json(req, st.max_request_bytes)
            .await
            .and_then(|r: types::ChatRequest| {
                convert::check_model(r.model.as_deref(), &st.model_id)?;
                convert::chat(r)
            });
    generate(st, plan, Api::Chat, arrival).await
}

async fn completions(State(st): State<HttpState>, req: Request) -> Response {
    let arrival = Instant::now();
    let plan =
        body::read_json(req, st.max_request_bytes)
            .await
            .and_then(|r: types::CompletionRequest| {
                convert::check_model(r.model.as_deref(), &st.model_id)?;
                convert::completion(r)
            });
    generate(st, plan, Api::Completions, arrival).await
}

/// How much of a request's `user` field goes into the log.
const MAX_LOGGED_USER_CHARS: usize = 128;

/// Run a checked request through the gateway and answer it as `api` does.
async fn generate(
    st: HttpState,
    plan: Result<convert::Plan, ApiError>,
    api: Api,
    arrival: Instant,
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
        .generate(plan.request, Interface::Http, arrival)
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

/// How long a client may take to send a request's headers (against slowloris clients).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake may take.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at most; past it the listener waits (the kernel's backlog holds new
/// ones) until one closes. Each costs a task and buffers, not a sequence: admission
/// limits sequences.
const MAX_CONNECTIONS: usize = 1024;
/// How long open connections may take to finish after the stop, before they are cut.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `router` on `listener` until `stop` fires, then give open connections
/// [`CLOSE_TIMEOUT`] to finish their requests (a stream ends when the scheduler has drained
/// it) and cut the rest.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut stop: oneshot::Receiver<()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;

    let graceful = GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let accepted = tokio::select! {
            a = accept(&listener, &slots) => a,
            _ = &mut stop => break,
        };
        let Some((tcp, peer, slot)) = accepted else {
            continue;
        };
        let conn = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            service: router.clone(),
            peer,
        };
        let tls = tls.clone();
        conns.spawn(async move {
            conn.run(tcp, tls).await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(CLOSE_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "HTTP connections still open {} s after the drain; closing them",
            CLOSE_TIMEOUT.as_secs()
        );
    }
    conns.shutdown().await;
}

/// The next connection and its slot, or `None` after a failed accept (logged, and
/// retried after a pause, as when the process is out of file descriptors).
async fn accept(
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Option<(
    tokio::net::TcpStream,
    std::net::SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let slot = slots.clone().acquire_owned().await.ok()?;
    match listener.accept().await {
        Ok((tcp, peer)) => {
            // Tokens are small writes: send each at once.
            let _ = tcp.set_nodelay(true);
            Some((tcp, peer, slot))
        }
        Err(e) => {
            tracing::warn!(error = %e, "HTTP listener: accept failed");
            tokio::time::sleep(Duration::from_millis(100)).await;
            None
        }
    }
}

/// One accepted connection, served until it closes or the server stops.
struct Connection {
    builder: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    service: Router,
    peer: std::net::SocketAddr,
}

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let peer = self.peer;
        let result = match tls {
            None => self.serve(tcp).await,
            Some(acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => self.serve(stream).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "HTTP TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "HTTP TLS handshake timed out");
                        return;
                    }
                }
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        }
    }

    async fn serve<IO>(self, io: IO) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::TokioIo;
        use hyper_util::service::TowerToHyperService;
        let service = TowerToHyperService::new(self.service);
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        self.watcher.watch(conn.into_owned()).await
    }
}
