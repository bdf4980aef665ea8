//! Limits on client connections (the `[connections]` table): HTTP/2 stream and reset
//! limits, keepalive pings, and read timeouts, for gRPC, the HTTP API and the metrics
//! endpoint. Each has a safe default: hostile peers (reset floods, slowloris clients, many
//! idle connections) cost bounded memory and never stop well-behaved clients.

use super::{at_least_one, invalid, ConfigError};
use serde::Deserialize;
use std::time::Duration;

/// One layer of the `[connections]` table: every key optional.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConnectionArgs {
    /// HTTP/2: streams a client may have open at once on one connection (advertised in
    /// SETTINGS) [default: 256].
    #[arg(long, env = "INSTINFER_HTTP2_MAX_CONCURRENT_STREAMS")]
    pub http2_max_concurrent_streams: Option<u32>,
    /// HTTP/2: streams a client may reset before the server has accepted them, per
    /// connection, before it is sent GOAWAY (rapid-reset floods) [default: 20].
    #[arg(long, env = "INSTINFER_HTTP2_MAX_PENDING_RESET_STREAMS")]
    pub http2_max_pending_reset_streams: Option<usize>,
    /// HTTP/2: streams the server may reset for a client's protocol errors, per connection,
    /// before it is sent GOAWAY [default: 1024].
    #[arg(long, env = "INSTINFER_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS")]
    pub http2_max_local_error_reset_streams: Option<usize>,
    /// HTTP/2: largest header list a client may send, in bytes [default: 16384].
    #[arg(long, env = "INSTINFER_HTTP2_MAX_HEADER_LIST_BYTES")]
    pub http2_max_header_list_bytes: Option<u32>,
    /// HTTP/2: ping an idle connection this often, and close it when the ping goes
    /// unanswered (0 turns pings off) [default: 30000].
    #[arg(long, env = "INSTINFER_HTTP2_KEEPALIVE_INTERVAL_MS")]
    pub http2_keepalive_interval_ms: Option<u64>,
    /// HTTP/2: how long a keepalive ping may go unanswered [default: 10000].
    #[arg(long, env = "INSTINFER_HTTP2_KEEPALIVE_TIMEOUT_MS")]
    pub http2_keepalive_timeout_ms: Option<u64>,
    /// HTTP/1 (the HTTP API and metrics): how long a client may take to send a request's
    /// headers, and the HTTP API a request's body [default: 30000].
    #[arg(long, env = "INSTINFER_REQUEST_READ_TIMEOUT_MS")]
    pub request_read_timeout_ms: Option<u64>,
    /// Open connections at most on the HTTP API, and on the metrics endpoint; past it new
    /// ones wait in the kernel's backlog [default: 1024].
    #[arg(long, env = "INSTINFER_MAX_HTTP_CONNECTIONS")]
    pub max_http_connections: Option<usize>,
}

impl ConnectionArgs {
    /// This layer's values where set, `below`'s elsewhere.
    pub fn over(self, below: ConnectionArgs) -> ConnectionArgs {
        ConnectionArgs {
            http2_max_concurrent_streams: self
                .http2_max_concurrent_streams
                .or(below.http2_max_concurrent_streams),
            http2_max_pending_reset_streams: self
                .http2_max_pending_reset_streams
                .or(below.http2_max_pending_reset_streams),
            http2_max_local_error_reset_streams: self
                .http2_max_local_error_reset_streams
                .or(below.http2_max_local_error_reset_streams),
            http2_max_header_list_bytes: self
                .http2_max_header_list_bytes
                .or(below.http2_max_header_list_bytes),
            http2_keepalive_interval_ms: self
                .http2_keepalive_interval_ms
                .or(below.http2_keepalive_interval_ms),
            http2_keepalive_timeout_ms: self
                .http2_keepalive_timeout_ms
                .or(below.http2_keepalive_timeout_ms),
            request_read_timeout_ms: self
                .request_read_timeout_ms
                .or(below.request_read_timeout_ms),
            max_http_connections: self.max_http_connections.or(below.max_http_connections),
        }
    }

    /// Fill in the defaults and check every value.
    pub fn resolve(self) -> Result<ConnectionLimits, ConfigError> {
        let d = ConnectionLimits::default();
        let http2_max_header_list_bytes = self
            .http2_max_header_list_bytes
            .unwrap_or(d.http2_max_header_list_bytes);
        if !(1024..=MAX_HEADER_LIST_BYTES_CEILING).contains(&http2_max_header_list_bytes) {
            return Err(invalid(
                "connections.http2_max_header_list_bytes",
                format!(
                    "{http2_max_header_list_bytes} is outside 1024..={MAX_HEADER_LIST_BYTES_CEILING}"
                ),
            ));
        }
        let keepalive_interval_ms = self
            .http2_keepalive_interval_ms
            .unwrap_or(d.http2_keepalive_interval_ms);
        let keepalive_timeout_ms = at_least_one(
            "connections.http2_keepalive_timeout_ms",
            self.http2_keepalive_timeout_ms,
            d.http2_keepalive_timeout_ms,
        )?;
        let request_read_timeout_ms = at_least_one(
            "connections.request_read_timeout_ms",
            self.request_read_timeout_ms,
            d.request_read_timeout_ms,
        )?;
        Ok(ConnectionLimits {
            http2_max_concurrent_streams: at_least_one(
                "connections.http2_max_concurrent_streams",
                self.http2_max_concurrent_streams,
                d.http2_max_concurrent_streams,
            )?,
            http2_max_pending_reset_streams: at_least_one(
                "connections.http2_max_pending_reset_streams",
                self.http2_max_pending_reset_streams,
                d.http2_max_pending_reset_streams,
            )?,
            http2_max_local_error_reset_streams: at_least_one(
                "connections.http2_max_local_error_reset_streams",
                self.http2_max_local_error_reset_streams,
                d.http2_max_local_error_reset_streams,
            )?,
            http2_max_header_list_bytes,
            http2_keepalive_interval_ms: keepalive_interval_ms,
            http2_keepalive_timeout_ms: keepalive_timeout_ms,
            request_read_timeout_ms,
            max_http_connections: at_least_one(
                "connections.max_http_connections",
                self.max_http_connections,
                d.max_http_connections,
            )?,
        })
    }
}

/// Largest header list the configuration may allow (1 MiB).
const MAX_HEADER_LIST_BYTES_CEILING: u32 = 1 << 20;

/// Connection limits, complete and checked (see [`ConnectionArgs`] for each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConnectionLimits {
    /// HTTP/2 streams open at once per connection; at least 1.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before being accepted, per connection, before
    /// GOAWAY; at least 1.
    pub http2_max_pending_reset_streams: usize,
    /// HTTP/2 streams reset by the server for protocol errors, per connection, before
    /// GOAWAY; at least 1.
    pub http2_max_local_error_reset_streams: usize,
    /// Largest HTTP/2 header list, in bytes (1024 to 1 MiB).
    pub http2_max_header_list_bytes: u32,
    /// HTTP/2 keepalive ping interval in milliseconds; 0 is off.
    pub http2_keepalive_interval_ms: u64,
    /// How long a keepalive ping may go unanswered, in milliseconds; at least 1.
    pub http2_keepalive_timeout_ms: u64,
    /// How long an HTTP/1 request's headers (and an HTTP API body) may take to arrive, in
    /// milliseconds; at least 1.
    pub request_read_timeout_ms: u64,
    /// Open connections at most on the HTTP API, and on the metrics endpoint; at least 1.
    pub max_http_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            http2_max_concurrent_streams: 256,
            http2_max_pending_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            http2_max_header_list_bytes: 16 << 10,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            request_read_timeout_ms: 30_000,
            max_http_connections: 1024,
        }
    }
}

impl ConnectionLimits {
    /// The keepalive ping interval; `None` when pings are off.
    pub fn keepalive_interval(&self) -> Option<Duration> {
        (self.http2_keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(self.http2_keepalive_interval_ms))
    }

    /// How long a keepalive ping may go unanswered.
    pub fn keepalive_timeout(&self) -> Duration {
        Duration::from_millis(self.http2_keepalive_timeout_ms)
    }

    /// How long a request's headers, or an HTTP API body, may take to arrive.
    pub fn request_read_timeout(&self) -> Duration {
        Duration::from_millis(self.request_read_timeout_ms)
    }
}
