//! Prometheus metrics of the daemon, and the HTTP endpoint that serves them.

use instinfer_runtime::kv::{EngineStats, PrefixCacheStats};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::sync::Mutex;

/// How a Generate request ended (the `outcome` label of `instinfer_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Ended by an end-of-generation token or a stop string.
    Stop,
    /// Reached its `max_tokens` or the end of the context.
    Length,
    /// Stopped by an Abort call or by the shutdown grace period running out.
    Aborted,
    /// Ended with an error.
    Error,
    /// The client went away before the end.
    Cancelled,
    /// Refused before it started (invalid, or over a limit).
    Rejected,
}

impl Outcome {
    /// Every outcome, each once.
    pub const ALL: [Outcome; 6] = [
        Outcome::Stop,
        Outcome::Length,
        Outcome::Aborted,
        Outcome::Error,
        Outcome::Cancelled,
        Outcome::Rejected,
    ];

    /// The outcome's `outcome` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Aborted => "aborted",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
            Outcome::Rejected => "rejected",
        }
    }
}

/// Which door a request came in by (the `interface` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interface {
    /// The gRPC `instinfer.v1.Inference` service.
    Grpc,
    /// The OpenAI-compatible HTTP API.
    Http,
}

impl Interface {
    /// Every interface, each once.
    pub const ALL: [Interface; 2] = [Interface::Grpc, Interface::Http];

    /// The interface's `interface` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Interface::Grpc => "grpc",
            Interface::Http => "http",
        }
    }
}

type Labels = Vec<(String, String)>;

type TtftFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// 1 ms .. ~33 s
fn ttft_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    /// Seconds from receiving a request to its first token, queueing included, by interface
    /// (`instinfer_time_to_first_token_seconds`).
    ttft: TtftFamily,
    /// Prompt tokens of admitted requests (`instinfer_prompt_tokens_total`).
    pub prompt_tokens: Counter,
    /// Tokens generated and streamed (`instinfer_generated_tokens_total`).
    pub generated_tokens: Counter,
    /// Seconds between consecutive tokens of a sequence
    /// (`instinfer_time_per_output_token_seconds`).
    pub tpot: Histogram,
    /// Sequences in each batched forward step (`instinfer_batch_sequences`).
    pub batch_sequences: Histogram,
    /// Sequences holding a slot, prefilling or decoding (`instinfer_active_sequences`).
    pub active_sequences: Gauge,
    /// Requests waiting for a sequence slot (`instinfer_queued_requests`).
    pub queued_requests: Gauge,
    /// Sequences whose KV the pool holds (`instinfer_kv_sequences`).
    pub kv_sequences: Gauge,
    /// Batched forward steps run (`instinfer_scheduler_steps_total`).
    pub scheduler_steps: Counter,
    /// KV bytes read from the storage device (`instinfer_kv_device_read_bytes_total`); fed by
    /// [`Metrics::pool_stats`].
    pub kv_read_bytes: Counter,
    /// KV bytes written to the storage device (`instinfer_kv_device_written_bytes_total`); fed
    /// by [`Metrics::pool_stats`].
    pub kv_written_bytes: Counter,
    /// Bytes across the KV engine's command boundary (`instinfer_kv_boundary_bytes_total`);
    /// fed by [`Metrics::pool_stats`].
    pub kv_boundary_bytes: Counter,
    /// Page lookups in the KV engine's RAM page cache (`instinfer_kv_cache_lookups_total`);
    /// fed by [`Metrics::pool_stats`].
    pub kv_cache_lookups: Counter,
    /// Those lookups that hit (`instinfer_kv_cache_hits_total`); fed by
    /// [`Metrics::pool_stats`].
    pub kv_cache_hits: Counter,
    /// KV pages read back that failed their checksum (`instinfer_kv_checksum_failures_total`);
    /// fed by [`Metrics::pool_stats`].
    pub kv_checksum_failures: Counter,
    /// Times the KV store's device left a failed io_uring for pread/pwrite
    /// (`instinfer_kv_ring_failovers_total`); fed by [`Metrics::pool_stats`].
    pub kv_ring_failovers: Counter,
    /// The pool's counters as last folded into the KV counters.
    last_pool: Mutex<EngineStats>,
    /// Prefix cache: prompt tokens looked up (`instinfer_prefix_lookup_tokens_total`), found
    /// (`instinfer_prefix_hit_tokens_total`), pages evicted
    /// (`instinfer_prefix_evicted_pages_total`) and entries dropped at recovery
    /// (`instinfer_prefix_dropped_at_recovery_total`); fed by [`Metrics::prefix_stats`].
    prefix_lookup_tokens: Counter,
    prefix_hit_tokens: Counter,
    prefix_evicted_pages: Counter,
    prefix_dropped: Counter,
    /// Pages the prefix cache holds (`instinfer_prefix_pages`), and the KV store's bytes
    /// allocated and in all (`instinfer_kv_store_used_bytes`, `instinfer_kv_store_capacity_bytes`).
    prefix_pages: Gauge,
    store_used_bytes: Gauge,
    store_capacity_bytes: Gauge,
    /// The prefix cache's figures as last folded in.
    last_prefix: Mutex<PrefixCacheStats>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn request_labels(i: Interface, o: Outcome) -> Labels {
    vec![
        ("interface".to_string(), i.as_str().to_string()),
        ("outcome".to_string(), o.as_str().to_string()),
    ]
}

fn interface_labels(i: Interface) -> Labels {
    vec![("interface".to_string(), i.as_str().to_string())]
}

impl Metrics {
    /// All metrics registered under the `instinfer_` prefix, at zero; every request outcome is
    /// exported from the start.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("instinfer");
        let requests = Family::<Labels, Counter>::default();
        for i in Interface::ALL {
            // Every interface and outcome shows from the start, at 0.
            for o in Outcome::ALL {
                drop(requests.get_or_create(&request_labels(i, o)));
            }
        }
        r.register(
            "requests",
            "Generate requests by interface and by how they ended",
            requests.clone(),
        );
        let prompt_tokens = Counter::default();
        r.register(
            "prompt_tokens",
            "Prompt tokens of admitted requests",
            prompt_tokens.clone(),
        );
        let generated_tokens = Counter::default();
        r.register(
            "generated_tokens",
            "Tokens generated and streamed",
            generated_tokens.clone(),
        );
        let ttft = TtftFamily::new_with_constructor(ttft_histogram);
        for i in Interface::ALL {
            drop(ttft.get_or_create(&interface_labels(i)));
        }
        r.register_with_unit(
            "time_to_first_token",
            "From receiving a request to its first token, queueing included",
            Unit::Seconds,
            ttft.clone(),
        );
        // 0.5 ms .. ~4 s
        let tpot = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        r.register_with_unit(
            "time_per_output_token",
            "Time between consecutive tokens of a sequence",
            Unit::Seconds,
            tpot.clone(),
        );
        let batch_sequences = Histogram::new(exponential_buckets(1.0, 2.0, 9));
        r.register(
            "batch_sequences",
            "Sequences in one batched forward step",
            batch_sequences.clone(),
        );
        let active_sequences = Gauge::default();
        r.register(
            "active_sequences",
            "Sequences holding a slot (prefilling or decoding)",
            active_sequences.clone(),
        );
        let queued_requests = Gauge::default();
        r.register(
            "queued_requests",
            "Requests waiting for a sequence slot",
            queued_requests.clone(),
        );
        let kv_sequences = Gauge::default();
        r.register(
            "kv_sequences",
            "Sequences whose KV cache the pool holds",
            kv_sequences.clone(),
        );
        let scheduler_steps = Counter::default();
        r.register(
            "scheduler_steps",
            "Batched forward steps",
            scheduler_steps.clone(),
        );
        let kv_read_bytes = Counter::default();
        r.register_with_unit(
            "kv_device_read",
            "KV bytes read from the storage device",
            Unit::Bytes,
            kv_read_bytes.clone(),
        );
        let kv_written_bytes = Counter::default();
        r.register_with_unit(
            "kv_device_written",
            "KV bytes written to the storage device",
            Unit::Bytes,
            kv_written_bytes.clone(),
        );
        let kv_boundary_bytes = Counter::default();
        r.register_with_unit(
            "kv_boundary",
            "Bytes across the KV engine's command boundary",
            Unit::Bytes,
            kv_boundary_bytes.clone(),
        );
        let kv_cache_lookups = Counter::default();
        r.register(
            "kv_cache_lookups",
            "Page lookups in the KV engine's RAM page cache",
            kv_cache_lookups.clone(),
        );
        let kv_cache_hits = Counter::default();
        r.register(
            "kv_cache_hits",
            "Page lookups in the KV engine's RAM page cache that hit",
            kv_cache_hits.clone(),
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let kv_checksum_failures = counter(
            &mut r,
            "kv_checksum_failures",
            "KV pages read back from flash that failed their checksum",
        );
        let kv_ring_failovers = counter(
            &mut r,
            "kv_ring_failovers",
            "Times the KV store's device left a failed io_uring for pread/pwrite",
        );
        let prefix_lookup_tokens = counter(
            &mut r,
            "prefix_lookup_tokens",
            "Prompt tokens looked up in the prefix cache",
        );
        let prefix_hit_tokens = counter(
            &mut r,
            "prefix_hit_tokens",
            "Prompt tokens found in the prefix cache (not prefilled again)",
        );
        let prefix_evicted_pages = counter(
            &mut r,
            "prefix_evicted_pages",
            "Prefix cache pages evicted to make room",
        );
        let prefix_dropped = counter(
            &mut r,
            "prefix_dropped_at_recovery",
            "Prefix cache entries dropped at recovery or for a failed checksum",
        );
        let prefix_pages = Gauge::default();
        r.register(
            "prefix_pages",
            "Pages (a block of tokens, every layer) the prefix cache holds",
            prefix_pages.clone(),
        );
        let store_used_bytes = Gauge::default();
        r.register_with_unit(
            "kv_store_used",
            "Bytes of the KV store's data area allocated",
            Unit::Bytes,
            store_used_bytes.clone(),
        );
        let store_capacity_bytes = Gauge::default();
        r.register_with_unit(
            "kv_store_capacity",
            "Bytes of the KV store's data area",
            Unit::Bytes,
            store_capacity_bytes.clone(),
        );
        Self {
            registry: r,
            requests,
            prompt_tokens,
            generated_tokens,
            ttft,
            tpot,
            batch_sequences,
            active_sequences,
            queued_requests,
            kv_sequences,
            scheduler_steps,
            kv_read_bytes,
            kv_written_bytes,
            kv_boundary_bytes,
            kv_cache_lookups,
            kv_cache_hits,
            kv_checksum_failures,
            kv_ring_failovers,
            last_pool: Mutex::new(EngineStats::default()),
            prefix_lookup_tokens,
            prefix_hit_tokens,
            prefix_evicted_pages,
            prefix_dropped,
            prefix_pages,
            store_used_bytes,
            store_capacity_bytes,
            last_prefix: Mutex::new(PrefixCacheStats::default()),
        }
    }

    /// Fold the prefix cache's figures (totals since start) into its series.
    pub fn prefix_stats(&self, now: PrefixCacheStats) {
        let mut last = self.last_prefix.lock().unwrap_or_else(|p| p.into_inner());
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.prefix_lookup_tokens
            .inc_by(d(now.lookup_tokens, last.lookup_tokens));
        self.prefix_hit_tokens
            .inc_by(d(now.hit_tokens, last.hit_tokens));
        self.prefix_evicted_pages
            .inc_by(d(now.cache.evicted_pages, last.cache.evicted_pages));
        self.prefix_dropped.inc_by(d(
            now.cache.dropped_at_recovery,
            last.cache.dropped_at_recovery,
        ));
        self.prefix_pages.set(now.cache.pages as i64);
        self.store_used_bytes
            .set(now.store_bytes.saturating_sub(now.store_free_bytes) as i64);
        self.store_capacity_bytes.set(now.store_bytes as i64);
        *last = now;
    }

    /// The prefix cache's figures as last folded in.
    pub fn last_prefix(&self) -> PrefixCacheStats {
        *self.last_prefix.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count one finished request of interface `i` with outcome `o`.
    pub fn request(&self, i: Interface, o: Outcome) {
        self.requests.get_or_create(&request_labels(i, o)).inc();
    }

    /// Requests counted so far with outcome `o`, over every interface.
    pub fn requests(&self, o: Outcome) -> u64 {
        Interface::ALL
            .iter()
            .map(|&i| self.requests.get_or_create(&request_labels(i, o)).get())
            .sum()
    }

    /// Record a request's time to first token, in seconds.
    pub fn observe_ttft(&self, i: Interface, seconds: f64) {
        self.ttft
            .get_or_create(&interface_labels(i))
            .observe(seconds);
    }

    /// Fold the pool's counters (totals since it was made) into the KV counters.
    pub fn pool_stats(&self, now: EngineStats) {
        let mut last = self.last_pool.lock().unwrap_or_else(|p| p.into_inner());
        let d = |a: u64, b: u64| a.saturating_sub(b);
        self.kv_read_bytes
            .inc_by(d(now.device_bytes_read, last.device_bytes_read));
        self.kv_written_bytes
            .inc_by(d(now.device_bytes_written, last.device_bytes_written));
        self.kv_boundary_bytes
            .inc_by(d(now.boundary_bytes, last.boundary_bytes));
        self.kv_cache_lookups
            .inc_by(d(now.cache_lookups, last.cache_lookups));
        self.kv_cache_hits
            .inc_by(d(now.cache_hits, last.cache_hits));
        self.kv_checksum_failures
            .inc_by(d(now.checksum_failures, last.checksum_failures));
        self.kv_ring_failovers
            .inc_by(d(now.ring_failovers, last.ring_failovers));
        *last = now;
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The metrics endpoint: `GET /metrics` (OpenMetrics text) and `GET /` (a pointer to it);
/// anything else is 404. Served by [`super::listener::serve`], with its connection limits.
pub(crate) fn router(metrics: std::sync::Arc<Metrics>) -> axum::Router {
    use axum::http::{header, StatusCode};
    use axum::routing::get;
    let text =
        |status, ctype: &'static str, body: String| (status, [(header::CONTENT_TYPE, ctype)], body);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || async move {
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.render(),
                )
            }),
        )
        .route(
            "/",
            get(move || async move {
                text(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    "instinferd: metrics at /metrics\n".into(),
                )
            }),
        )
        .fallback(move || async move {
            text(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "not found (metrics are at GET /metrics)\n".into(),
            )
        })
}
