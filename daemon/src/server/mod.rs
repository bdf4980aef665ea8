//! The gRPC daemon: `instinfer.v1.Inference` on tokio + tonic, with a scheduler thread that
//! batches every running sequence into one forward pass per step (see [`scheduler`]),
//! `grpc.health.v1.Health`, server reflection, Prometheus metrics over HTTP, optional TLS
//! and bearer-token authentication, and a graceful drain on shutdown.
//!
//! [`start`] binds the ports and returns a [`ServerHandle`]; the `instinferd` binary adds
//! configuration, logging, signals and systemd notifications around it.

pub mod client;
pub mod error;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod gateway;
mod http;
pub mod kv_backend;
mod listener;
pub mod metrics;
mod scheduler;
mod service;

use crate::config::Config;
use error::ServeError;
use gateway::{Gateway, Limits, ModeSupport};
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_server::InferenceServer;
use instinfer_runtime::kv::KvError;
use instinfer_runtime::kv::{AttentionMode, KvPool, SeqId};
use instinfer_runtime::{LoadError, LoadedModel};
use kv_backend::KvPlacement;
use metrics::{Metrics, Outcome};
use scheduler::{Command, Scheduler};
use service::{Admission, AdmissionLock, BearerAuth, InferenceService, Principal};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, ServerTlsConfig};

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The model file could not be made ready to run (weights, tokenizer or chat template).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The KV backend could not be built.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// A listening socket could not be bound (or its address read).
    #[error("cannot listen for {what} on {addr}: {source}")]
    Bind {
        /// Which listener: `gRPC`, `HTTP` or `metrics`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be read or used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The reflection service could not be built.
    #[error("server reflection: {0}")]
    Reflection(String),
    /// A thread or thread pool could not be started.
    #[error("starting the {what}: {source}")]
    Spawn {
        /// What was being started.
        what: &'static str,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The gRPC server failed or stopped on its own.
    #[error("the gRPC server failed: {0}")]
    Serve(String),
}

/// State shared by the service tasks and the scheduler thread.
pub(crate) struct Shared {
    pub metrics: Arc<Metrics>,
    admission: AdmissionLock,
    max_concurrent: usize,
    max_queued: usize,
    active: AtomicUsize,
    kv_sequences: AtomicUsize,
    draining: AtomicBool,
    /// Set when the shutdown begins: health reports it before `draining` refuses requests.
    not_serving: AtomicBool,
    /// Set when the scheduler thread has ended (drained, or failed).
    scheduler_stopped: AtomicBool,
    started: Instant,
    /// Milliseconds since `started` at the scheduler's last loop turn.
    heartbeat_ms: AtomicU64,
}

impl Shared {
    fn admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take a place in the server for `request_id`, or refuse it when the sequence slots
    /// and the queue are full or the id is in use.
    pub fn register(&self, owner: Principal, request_id: &str) -> Result<SeqId, ServeError> {
        let mut a = self.admission();
        let id = (owner, request_id.to_string());
        if a.ids.contains_key(&id) {
            return Err(ServeError::DuplicateRequestId(request_id.to_string()));
        }
        if a.in_system >= self.max_concurrent + self.max_queued {
            let (c, q) = (self.max_concurrent, self.max_queued);
            return Err(ServeError::QueueFull(if q == 0 {
                format!(
                    "all {c} sequence slots are busy (max_concurrent_sequences = {c}) and queueing is off (max_queued_requests = 0)"
                )
            } else {
                format!(
                    "the request queue is full (max_queued_requests = {q}) and all {c} sequence slots are busy"
                )
            }));
        }
        a.in_system += 1;
        a.next_key += 1;
        let key = a.next_key;
        a.ids.insert(id, key);
        let in_system = a.in_system;
        drop(a);
        self.refresh_queued(in_system);
        Ok(key)
    }

    /// The request has left the server (finished, refused or gone).
    pub fn unregister(&self, owner: Principal, request_id: &str) {
        let mut a = self.admission();
        if a.ids.remove(&(owner, request_id.to_string())).is_some() {
            a.in_system -= 1;
        }
        let in_system = a.in_system;
        drop(a);
        self.refresh_queued(in_system);
    }

    pub fn lookup(&self, owner: Principal, request_id: &str) -> Option<SeqId> {
        self.admission()
            .ids
            .get(&(owner, request_id.to_string()))
            .copied()
    }

    fn refresh_queued(&self, in_system: usize) {
        let active = self.active.load(Ordering::Acquire);
        self.metrics
            .queued_requests
            .set(in_system.saturating_sub(active) as i64);
    }

    pub fn set_active(&self, n: usize) {
        self.active.store(n, Ordering::Release);
        self.metrics.active_sequences.set(n as i64);
        let in_system = self.admission().in_system;
        self.refresh_queued(in_system);
    }

    pub fn kv_opened(&self) {
        let n = self.kv_sequences.fetch_add(1, Ordering::AcqRel) + 1;
        self.metrics.kv_sequences.set(n as i64);
    }

    pub fn kv_released(&self) {
        let n = self.kv_sequences.fetch_sub(1, Ordering::AcqRel) - 1;
        self.metrics.kv_sequences.set(n as i64);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Whether the shutdown has begun: health reports it at once, while new requests are
    /// still taken during the drain notice.
    pub fn is_shutting_down(&self) -> bool {
        self.not_serving.load(Ordering::Acquire)
    }

    pub fn scheduler_stopped(&self) -> bool {
        self.scheduler_stopped.load(Ordering::Acquire)
    }

    pub fn beat(&self) {
        self.heartbeat_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Release);
    }

    fn heartbeat_age(&self) -> Duration {
        let now = self.started.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.heartbeat_ms.load(Ordering::Acquire)))
    }

    pub fn stats(&self) -> pb::Stats {
        let m = &self.metrics;
        let p = m.last_prefix();
        let active = self.active.load(Ordering::Acquire);
        let in_system = self.admission().in_system;
        pb::Stats {
            active_sequences: active as u32,
            queued_requests: in_system.saturating_sub(active) as u32,
            kv_sequences: self.kv_sequences.load(Ordering::Acquire) as u32,
            requests_stop: m.requests(Outcome::Stop),
            requests_length: m.requests(Outcome::Length),
            requests_aborted: m.requests(Outcome::Aborted),
            requests_error: m.requests(Outcome::Error),
            requests_cancelled: m.requests(Outcome::Cancelled),
            requests_rejected: m.requests(Outcome::Rejected),
            prompt_tokens_total: m.prompt_tokens.get(),
            generated_tokens_total: m.generated_tokens.get(),
            kv_device_bytes_read: m.kv_read_bytes.get(),
            kv_device_bytes_written: m.kv_written_bytes.get(),
            kv_cache_lookups: m.kv_cache_lookups.get(),
            kv_cache_hits: m.kv_cache_hits.get(),
            scheduler_steps: m.scheduler_steps.get(),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            prefix_lookup_tokens: p.lookup_tokens,
            prefix_hit_tokens: p.hit_tokens,
            prefix_pages: p.cache.pages,
            prefix_bytes: p.cache.bytes,
            prefix_evicted_pages: p.cache.evicted_pages,
            prefix_dropped_at_recovery: p.cache.dropped_at_recovery,
            kv_store_bytes_used: p.store_bytes.saturating_sub(p.store_free_bytes),
            kv_store_bytes_total: p.store_bytes,
        }
    }
}

/// The sequence key used to ask the pool which attention modes it takes.
const PROBE_KEY: SeqId = SeqId::MAX;

/// Which attention modes `pool` accepts (opening and releasing a probe sequence).
fn probe_modes(pool: &mut dyn KvPool) -> ModeSupport {
    AttentionMode::ALL
        .iter()
        .map(|&mode| {
            let r = pool.open(PROBE_KEY, mode, 1);
            if r.is_ok() {
                pool.release(PROBE_KEY);
            }
            (mode, r)
        })
        .collect()
}

fn proto_mode(m: AttentionMode) -> pb::AttentionMode {
    match m {
        AttentionMode::Full => pb::AttentionMode::Full,
        AttentionMode::Flexgen => pb::AttentionMode::Flexgen,
        AttentionMode::Sparse => pb::AttentionMode::Sparse,
    }
}

fn model_info(loaded: &LoadedModel, placement: KvPlacement, modes: &ModeSupport) -> pb::ModelInfo {
    let c = &loaded.model.config;
    pb::ModelInfo {
        architecture: c.arch.name().to_string(),
        layers: c.n_layers as u32,
        heads: c.n_heads as u32,
        kv_heads: c.n_kv_heads as u32,
        head_dim: c.head_dim as u32,
        embedding_dim: c.dim as u32,
        context_length: c.context_len as u32,
        vocab_size: c.vocab_size as u32,
        quantization: loaded.model.weights.main_type().to_string(),
        kv_bytes_per_token: loaded.model.stored_kv_shape().bytes_per_token(),
        model_file: loaded
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        kv_store: placement.as_str().to_string(),
        attention_modes: modes
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(m, _)| proto_mode(*m) as i32)
            .collect(),
        chat_template: loaded.chat.is_some(),
    }
}

/// A running server. Dropping it shuts the server down as [`ServerHandle::shutdown`] does,
/// without waiting.
pub struct ServerHandle {
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    metrics_addr: SocketAddr,
    trigger: Option<oneshot::Sender<()>>,
    supervisor: tokio::task::JoinHandle<Result<(), ServerError>>,
    shared: Arc<Shared>,
}

impl ServerHandle {
    /// The address gRPC listens on (with the real port when 0 was asked for).
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The address the OpenAI-compatible HTTP API listens on (with the real port when 0 was
    /// asked for); `None` when it is off.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The address the metrics endpoint listens on (with the real port when 0 was asked for).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// A function giving the time since the scheduler last went round its loop (for the
    /// systemd watchdog).
    pub fn heartbeat(&self) -> impl Fn() -> Duration + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || shared.heartbeat_age()
    }

    /// Stop accepting requests, let running ones finish within the grace period, then abort
    /// what is left. Returns at once; [`ServerHandle::wait`] waits for the end.
    pub fn begin_shutdown(&mut self) {
        if let Some(t) = self.trigger.take() {
            let _ = t.send(());
        }
    }

    /// Wait until the server has stopped (call it once: after it returns the handle is
    /// spent).
    pub async fn wait(&mut self) -> Result<(), ServerError> {
        match (&mut self.supervisor).await {
            Ok(r) => r,
            Err(e) => Err(ServerError::Serve(format!(
                "the supervisor task failed: {e}"
            ))),
        }
    }

    /// [`ServerHandle::begin_shutdown`], then [`ServerHandle::wait`].
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.begin_shutdown();
        self.wait().await
    }
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<tokio::net::TcpListener, ServerError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })
}

fn read_pem(p: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(p).map_err(|e| ServerError::Tls(format!("reading {}: {e}", p.display())))
}

fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, ServerError> {
    let Some(t) = &config.tls else {
        return Ok(None);
    };
    let identity = Identity::from_pem(read_pem(&t.cert_path)?, read_pem(&t.key_path)?);
    Ok(Some(ServerTlsConfig::new().identity(identity)))
}

/// Log a loud warning for each listener on a non-loopback address without TLS or without a
/// bearer token: anyone who can reach it can run (or read) generations.
fn warn_if_exposed(config: &Config) {
    let missing = match (config.tls.is_some(), !config.bearer_tokens.is_empty()) {
        (true, true) => return,
        (false, false) => "neither TLS nor a bearer token",
        (false, true) => "no TLS (the bearer token and prompts cross the network in clear)",
        (true, false) => "no bearer token (any client that can connect may generate)",
    };
    let listeners = [("gRPC", Some(config.grpc_addr)), ("HTTP", config.http_addr)];
    for (what, addr) in listeners {
        if let Some(addr) = addr.filter(|a| !a.ip().is_loopback()) {
            tracing::warn!(
                listener = what,
                %addr,
                "!!! {what} listens on {addr}, beyond this host, with {missing}; set \
                 tls_cert_path/tls_key_path and bearer_token_path, or listen on 127.0.0.1 !!!"
            );
        }
    }
}

/// Start serving `loaded` as `config` says: build the KV pool, bind the gRPC and metrics
/// ports, start the scheduler thread. Must be called inside a tokio runtime.
pub async fn start(config: &Config, loaded: Arc<LoadedModel>) -> Result<ServerHandle, ServerError> {
    warn_if_exposed(config);
    if let Some(f) = &config.fault_injection {
        tracing::warn!(
            faults = ?f,
            "!!! fault injection is ON ([fault_injection]): storage faults and planted panics \
             for testing; never in production !!!"
        );
    }
    let (mut kv_pool, placement) = kv_backend::build_pool(config, &loaded)?;
    let modes = probe_modes(kv_pool.as_mut());
    let tls = tls_config(config)?;
    let http_tls = match (&config.tls, config.http_addr) {
        (Some(t), Some(_)) => Some(
            http::tls_acceptor(&read_pem(&t.cert_path)?, &read_pem(&t.key_path)?)
                .map_err(|e| ServerError::Tls(format!("HTTP API: {e}")))?,
        ),
        _ => None,
    };
    let grpc_listener = bind("gRPC", config.grpc_addr).await?;
    let metrics_listener = bind("metrics", config.metrics_addr).await?;
    let http_listener = match config.http_addr {
        Some(addr) => Some(bind("HTTP", addr).await?),
        None => None,
    };
    let local = |l: &tokio::net::TcpListener, what, addr| {
        l.local_addr()
            .map_err(|source| ServerError::Bind { what, addr, source })
    };
    let grpc_addr = local(&grpc_listener, "gRPC", config.grpc_addr)?;
    let metrics_addr = local(&metrics_listener, "metrics", config.metrics_addr)?;
    let http_addr = match (&http_listener, config.http_addr) {
        (Some(l), Some(addr)) => Some(local(l, "HTTP", addr)?),
        _ => None,
    };

    let metrics = Arc::new(Metrics::new());
    let shared = Arc::new(Shared {
        metrics: metrics.clone(),
        admission: Mutex::new(Admission::default()),
        max_concurrent: config.max_concurrent_sequences,
        max_queued: config.max_queued_requests,
        active: AtomicUsize::new(0),
        kv_sequences: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        not_serving: AtomicBool::new(false),
        scheduler_stopped: AtomicBool::new(false),
        started: Instant::now(),
        heartbeat_ms: AtomicU64::new(0),
    });

    // The scheduler: model compute on its own thread (inside a rayon pool of `threads`),
    // never on the tokio workers.
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<Command>();
    let compute = rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .thread_name(|i| format!("instinfer-compute-{i}"))
        .build()
        .map_err(|e| ServerError::Spawn {
            what: "compute thread pool",
            source: std::io::Error::other(e.to_string()),
        })?;
    let scheduler = Scheduler {
        loaded: loaded.clone(),
        pool: kv_pool,
        shared: shared.clone(),
        commands: cmd_rx,
        max_concurrent: config.max_concurrent_sequences,
        prefill_chunk: config.prefill_chunk_tokens,
        next_refill_key: 0,
        steps: 0,
        planted: scheduler::PlantedPanics {
            forward_at_step: config.fault_injection.and_then(|f| f.forward_panic_at_step),
            scheduler_at_step: config
                .fault_injection
                .and_then(|f| f.scheduler_panic_at_step),
        },
    };
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let sched_shared = shared.clone();
    std::thread::Builder::new()
        .name("instinfer-scheduler".into())
        .spawn(move || {
            let run = std::panic::AssertUnwindSafe(|| compute.install(|| scheduler.run()));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!("the scheduler thread panicked; running requests were dropped");
            }
            sched_shared
                .scheduler_stopped
                .store(true, Ordering::Release);
            let _ = done_tx.send(());
        })
        .map_err(|source| ServerError::Spawn {
            what: "scheduler thread",
            source,
        })?;

    let gateway = Arc::new(Gateway {
        loaded: loaded.clone(),
        shared: shared.clone(),
        commands: cmd_tx.clone(),
        limits: Limits::of(config),
        modes: Arc::new(modes),
        // Half the compute threads (at least one) check and tokenize prompts.
        preparing: Arc::new(tokio::sync::Semaphore::new((config.threads / 2).max(1))),
    });
    let info = model_info(&loaded, placement, &gateway.modes);
    let svc = InferenceService {
        gateway: gateway.clone(),
        info: info.clone(),
    };
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(instinfer_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let auth = BearerAuth {
        tokens: config
            .bearer_tokens
            .iter()
            .map(|t| Arc::from(t.expose()))
            .collect(),
    };
    let http_state = http::HttpState::new(
        gateway.clone(),
        auth.clone(),
        &info.model_file,
        http::body::BodyLimits {
            max_bytes: config.max_request_bytes,
            read_timeout: config.connections.request_read_timeout(),
        },
    );
    let check = move |req| auth.check(req);
    let inference = InferenceServer::new(svc).max_decoding_message_size(config.max_request_bytes);

    let limits = &config.connections;
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.http2_max_pending_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.http2_max_local_error_reset_streams))
        .http2_max_header_list_size(limits.http2_max_header_list_bytes)
        .http2_keepalive_interval(limits.keepalive_interval())
        .http2_keepalive_timeout(Some(limits.keepalive_timeout()));
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(InterceptedService::new(reflection_v1, check.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, check.clone()))
        .add_service(InterceptedService::new(inference, check));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(grpc_listener).map(|conn| {
        conn.inspect(|s| {
            // Tokens are small writes: send each at once.
            let _ = s.set_nodelay(true);
        })
    });
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let grpc_task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stop_rx.await;
    }));
    // The metrics endpoint stops when the supervisor drops its trigger, after the drain.
    let (metrics_stop_tx, metrics_stop_rx) = oneshot::channel::<()>();
    let metrics_task = tokio::spawn(listener::serve(
        "metrics",
        metrics_listener,
        metrics::router(metrics),
        None,
        config.connections,
        metrics_stop_rx,
    ));
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let http_task = http_listener.map(|listener| {
        tokio::spawn(listener::serve(
            "HTTP",
            listener,
            http::router(http_state),
            http_tls,
            config.connections,
            http_stop_rx,
        ))
    });
    tracing::info!(
        %grpc_addr,
        http_addr = %http_addr.map_or("off".to_string(), |a| a.to_string()),
        %metrics_addr,
        tls = config.tls.is_some(),
        auth = !config.bearer_tokens.is_empty(),
        kv = placement.as_str(),
        max_concurrent_sequences = config.max_concurrent_sequences,
        "serving"
    );

    let (trigger_tx, trigger_rx) = oneshot::channel::<()>();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    let notice = Duration::from_millis(config.drain_notice_ms);
    let sup_shared = shared.clone();
    let supervisor = tokio::spawn(async move {
        let mut grpc_task = grpc_task;
        let mut done_rx = done_rx;
        let mut scheduler_done = false;
        // A dropped handle shuts the server down too; so does a scheduler that ends on its
        // own (it panicked): nothing could be served, so the process should exit non-zero
        // and let systemd restart it.
        let early = tokio::select! {
            _ = trigger_rx => None,
            r = &mut grpc_task => Some(match r {
                Ok(Ok(())) => "the gRPC server stopped".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => e.to_string(),
            }),
            _ = &mut done_rx => {
                scheduler_done = true;
                Some("the scheduler thread stopped (it panicked; see the log)".to_string())
            }
        };
        if let Some(why) = &early {
            tracing::error!(error = %why, "serving cannot go on; shutting down");
        }
        // Health says NOT_SERVING first (gRPC health, and 503 on the HTTP API's /health);
        // requests are still taken for the notice period, so that load balancers move
        // away before the listeners close.
        sup_shared.not_serving.store(true, Ordering::Release);
        health
            .set_not_serving::<InferenceServer<InferenceService>>()
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        if early.is_none() && !notice.is_zero() {
            tracing::info!(
                notice_ms = notice.as_millis() as u64,
                "health says NOT_SERVING; still taking requests for the drain notice"
            );
            tokio::time::sleep(notice).await;
        }
        sup_shared.draining.store(true, Ordering::Release);
        // Stop accepting gRPC connections; open streams go on. The HTTP API keeps
        // answering until the scheduler is done: 503 on /health and to new requests, so
        // that load balancers see the drain.
        let _ = stop_tx.send(());
        let _ = cmd_tx.send(Command::Drain { grace });
        drop(cmd_tx);
        // Every running stream has had its last message once the scheduler is done.
        if !scheduler_done {
            let _ = done_rx.await;
        }
        let _ = http_stop_tx.send(());
        if let Some(why) = early {
            if scheduler_done {
                // The streams it was running end with UNAVAILABLE ("the scheduler stopped");
                // give the gRPC server a moment to send those statuses before the exit.
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut grpc_task).await;
            }
            drop(metrics_stop_tx);
            metrics_task.abort();
            if let Some(t) = http_task {
                t.abort();
            }
            return Err(ServerError::Serve(why));
        }
        // Open streams have had their last message; both servers close their connections
        // (each cuts the ones still open after 5 s), at the same time.
        let http_done = async {
            if let Some(t) = http_task {
                let _ = t.await;
            }
        };
        let grpc_done = tokio::time::timeout(Duration::from_secs(5), grpc_task);
        let ((), grpc) = tokio::join!(http_done, grpc_done);
        let result = match grpc {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(ServerError::Serve(e.to_string())),
            Ok(Err(e)) => Err(ServerError::Serve(e.to_string())),
            Err(_) => {
                tracing::warn!("gRPC connections still open 5 s after the drain; closing anyway");
                Ok(())
            }
        };
        drop(metrics_stop_tx);
        metrics_task.abort();
        tracing::info!("server stopped");
        result
    });
    Ok(ServerHandle {
        grpc_addr,
        http_addr,
        metrics_addr,
        trigger: Some(trigger_tx),
        supervisor,
        shared,
    })
}
