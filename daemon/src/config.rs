//! Configuration of the `instinferd` daemon: one struct, filled from a TOML file, then
//! `INSTINFER_*` environment variables, then command-line flags (each overriding the one
//! before). Unknown keys in the file are rejected and every value is checked by
//! [`Config::resolve`] before anything binds a port or loads a model.
//!
//! The KV cache is on flash unless `kv_cache = "ram"`: in `kv_store_path`, by default
//! [`KV_STORE_FILE`] in the [`state_directory`], sized [`default_kv_store_bytes`] of the free
//! space there unless `kv_store_bytes` is set. Both are resolved here, so `--check-config`
//! shows them; nothing is created until the server starts.

mod connections;
mod faults;

pub use connections::{ConnectionArgs, ConnectionLimits};
use csd_engine::EngineConfig;
pub use faults::{FaultArgs, FaultInjection};
use instinfer_runtime::kv::EngineArgs;
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Errors in the daemon's configuration. Each names the key (or file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The TOML file does not parse, has an unknown key, or a value of the wrong type.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, on one line.
        message: String,
    },
    /// A value is out of range, inconsistent with another, or names an unreadable file.
    #[error("config key {key}: {message}")]
    Invalid {
        /// The key at fault.
        key: &'static str,
        /// What is wrong with its value.
        message: String,
    },
    /// `kv_store_bytes` is unset and the filesystem that would hold the KV store has too
    /// little free space for even the smallest default store.
    #[error(
        "no room for the KV store in {}: {available_bytes} bytes ({}) are free there, but the \
         default store takes half of the free space and at least {MIN_KV_STORE_BYTES} bytes \
         ({}), so it needs {} bytes ({}) free; free some space, or set kv_store_path (another \
         folder), kv_store_bytes (a size) or kv_cache = \"ram\"",
        dir.display(),
        human_bytes(*available_bytes),
        human_bytes(MIN_KV_STORE_BYTES),
        2 * MIN_KV_STORE_BYTES,
        human_bytes(2 * MIN_KV_STORE_BYTES)
    )]
    NoRoomForKvStore {
        /// The folder the store would be in.
        dir: PathBuf,
        /// Free bytes there (for unprivileged users), plus the size of an existing store
        /// file, which would be reused.
        available_bytes: u64,
    },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// How log lines are written (to stderr).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Where the KV cache lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum KvCache {
    /// In a csd-engine store file on flash: `kv_store_path`, by default `kv.store` in the
    /// state directory.
    #[default]
    Flash,
    /// In RAM; `kv_store_path` and `kv_store_bytes` must not be set.
    Ram,
}

impl KvCache {
    /// The value's name in the file, the flag and the environment.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCache::Flash => "flash",
            KvCache::Ram => "ram",
        }
    }
}

/// One layer of configuration: every key optional. The TOML file, the environment and the
/// command line each give one; [`ConfigLayer::over`] stacks them.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// GGUF model file, or a known model's name ("smollm2-135m", "gemma3-270m"), fetched
    /// into the cache [default: SmolLM2-135M-Instruct Q4_1].
    #[arg(long, env = "INSTINFER_MODEL")]
    pub model: Option<PathBuf>,
    /// Context length served, in tokens [default: the length the model was trained for].
    /// Past the trained length needs allow_untrained_context.
    #[arg(long, env = "INSTINFER_CONTEXT_TOKENS")]
    pub context_tokens: Option<usize>,
    /// Let context_tokens exceed the model's trained context (RoPE then runs past what the
    /// model learned; a warning is logged) [default: false].
    #[arg(long, env = "INSTINFER_ALLOW_UNTRAINED_CONTEXT", num_args = 0..=1, default_missing_value = "true")]
    pub allow_untrained_context: Option<bool>,
    /// Threads for model compute [default: all cores].
    #[arg(long, env = "INSTINFER_THREADS")]
    pub threads: Option<usize>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "INSTINFER_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// OpenAI-compatible HTTP API listen address, or "off" [default: 127.0.0.1:8000].
    #[arg(long, env = "INSTINFER_HTTP_ADDR")]
    pub http_addr: Option<ListenAddr>,
    /// Prometheus metrics (HTTP) listen address [default: 127.0.0.1:9464].
    #[arg(long, env = "INSTINFER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Sequences generating at once; more requests wait in the queue [default: 32].
    #[arg(long, env = "INSTINFER_MAX_CONCURRENT_SEQUENCES")]
    pub max_concurrent_sequences: Option<usize>,
    /// Requests that may wait for a sequence slot; more are refused [default: 64].
    #[arg(long, env = "INSTINFER_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,
    /// Longest prompt accepted, in tokens [default: 8192].
    #[arg(long, env = "INSTINFER_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest max_tokens a request may ask for [default: 4096].
    #[arg(long, env = "INSTINFER_MAX_TOKENS_LIMIT")]
    pub max_tokens_limit: Option<usize>,
    /// max_tokens of a request that does not set it [default: 256].
    #[arg(long, env = "INSTINFER_DEFAULT_MAX_TOKENS")]
    pub default_max_tokens: Option<usize>,
    /// Prompt tokens prefilled per scheduler step, next to one decode token of every
    /// running sequence [default: 256].
    #[arg(long, env = "INSTINFER_PREFILL_CHUNK_TOKENS")]
    pub prefill_chunk_tokens: Option<usize>,
    /// Largest request message accepted [default: 4194304].
    #[arg(long, env = "INSTINFER_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// On SIGTERM, how long running streams may go on before they are aborted
    /// [default: 30000].
    #[arg(long, env = "INSTINFER_SHUTDOWN_GRACE_MS")]
    pub shutdown_grace_ms: Option<u64>,
    /// On SIGTERM, how long health reports NOT_SERVING (and 503) while requests are still
    /// taken, so that load balancers notice, before the listeners close [default: 0].
    #[arg(long, env = "INSTINFER_DRAIN_NOTICE_MS")]
    pub drain_notice_ms: Option<u64>,
    /// TLS certificate chain (PEM); with tls_key_path, serve gRPC over TLS.
    #[arg(long, env = "INSTINFER_TLS_CERT_PATH")]
    pub tls_cert_path: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "INSTINFER_TLS_KEY_PATH")]
    pub tls_key_path: Option<PathBuf>,
    /// Require `authorization: Bearer <token>` on every Inference call (prefer
    /// bearer_token_path or the environment over a flag, which other users can see).
    #[arg(long, env = "INSTINFER_BEARER_TOKEN", hide_env_values = true)]
    pub bearer_token: Option<String>,
    /// File holding the bearer token, or several, one per line, one per client (blank
    /// lines and `#` comments are skipped).
    #[arg(long, env = "INSTINFER_BEARER_TOKEN_PATH")]
    pub bearer_token_path: Option<PathBuf>,
    /// Log line format [default: human].
    #[arg(long, env = "INSTINFER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, tracing EnvFilter syntax (e.g. "info", "instinfer=debug") [default: info].
    #[arg(long, env = "INSTINFER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Where the KV cache lives: "flash" (a csd-engine store file at kv_store_path) or
    /// "ram" [default: flash].
    #[arg(long, env = "INSTINFER_KV_CACHE", value_enum)]
    pub kv_cache: Option<KvCache>,
    /// The csd-engine store file of the KV cache on flash [default: kv.store in
    /// $STATE_DIRECTORY, else in $XDG_STATE_HOME/instinfer, else in ~/.local/state/instinfer].
    #[arg(long, env = "INSTINFER_KV_STORE_PATH")]
    pub kv_store_path: Option<PathBuf>,
    /// Size of a KV store file created at kv_store_path; an existing store keeps its size
    /// [default: 16 GiB, at most half of the free space where the file lives, at least 64 MiB].
    #[arg(long, env = "INSTINFER_KV_STORE_BYTES")]
    pub kv_store_bytes: Option<u64>,
    /// With kv_cache = "ram": RAM the running sequences' KV may hold in all; a request whose
    /// KV (prompt plus max_tokens) does not fit is refused at admission with
    /// RESOURCE_EXHAUSTED [default: half of the machine's memory].
    #[arg(long, env = "INSTINFER_KV_RAM_BYTES")]
    pub kv_ram_bytes: Option<u64>,
    /// The storage engine's page cache and sparse policy (the `[engine]` table of the file),
    /// for the KV cache on flash [default: the engine's].
    #[command(flatten)]
    #[serde(default)]
    pub engine: EngineArgs,
    /// Limits on client connections (the `[connections]` table of the file)
    /// [default: see each].
    #[command(flatten)]
    #[serde(default)]
    pub connections: ConnectionArgs,
    /// Faults injected into the KV store's reads, for chaos testing only (the
    /// `[fault_injection]` table of the file) [default: off].
    #[command(flatten)]
    #[serde(default)]
    pub fault_injection: FaultArgs,
}

macro_rules! stack {
    ($top:expr, $below:expr, $($field:ident),* $(,)?) => {
        ConfigLayer {
            $($field: $top.$field.or($below.$field),)*
            engine: $top.engine.over($below.engine),
            connections: $top.connections.over($below.connections),
            fault_injection: $top.fault_injection.over($below.fault_injection),
        }
    };
}

impl ConfigLayer {
    /// Parse a TOML file's text; unknown keys and values of the wrong type are errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    /// Read and parse a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// This layer's values where set, `below`'s elsewhere.
    pub fn over(self, below: ConfigLayer) -> ConfigLayer {
        stack!(
            self,
            below,
            model,
            context_tokens,
            allow_untrained_context,
            threads,
            grpc_addr,
            http_addr,
            metrics_addr,
            max_concurrent_sequences,
            max_queued_requests,
            max_prompt_tokens,
            max_tokens_limit,
            default_max_tokens,
            prefill_chunk_tokens,
            max_request_bytes,
            shutdown_grace_ms,
            drain_notice_ms,
            tls_cert_path,
            tls_key_path,
            bearer_token,
            bearer_token_path,
            log_format,
            log_level,
            kv_cache,
            kv_store_path,
            kv_store_bytes,
            kv_ram_bytes,
        )
    }
}

/// A listen address, or `off` for a listener that is not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ListenAddr {
    /// Do not listen.
    Off,
    /// Listen here.
    At(SocketAddr),
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("off") {
            return Ok(ListenAddr::Off);
        }
        s.parse()
            .map(ListenAddr::At)
            .map_err(|e| format!("{s:?} is neither an address (host:port) nor \"off\": {e}"))
    }
}

impl TryFrom<String> for ListenAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself; keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where the TLS certificate chain and private key are; both were readable when the
/// configuration was resolved, and are read when the server starts.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert_path: PathBuf,
    /// Private key (PEM).
    pub key_path: PathBuf,
}

/// The daemon's configuration, complete and checked.
#[derive(Clone, Debug)]
pub struct Config {
    /// GGUF model file or known model name; `None` means the default model.
    pub model: Option<PathBuf>,
    /// Context length served, in tokens; `None` means the model's trained length.
    pub context_tokens: Option<usize>,
    /// Whether `context_tokens` may exceed the model's trained context.
    pub allow_untrained_context: bool,
    /// Threads for model compute.
    pub threads: usize,
    /// Address the gRPC service listens on (port 0: any free port).
    pub grpc_addr: SocketAddr,
    /// Address the OpenAI-compatible HTTP API listens on; `None` when it is off. Differs
    /// from the other listeners' unless it uses port 0.
    pub http_addr: Option<SocketAddr>,
    /// Address the Prometheus metrics endpoint (HTTP) listens on; differs from `grpc_addr`
    /// unless that uses port 0.
    pub metrics_addr: SocketAddr,
    /// Sequences generating at once; at least 1.
    pub max_concurrent_sequences: usize,
    /// Requests that may wait for a sequence slot beyond those running; 0 turns queueing off.
    pub max_queued_requests: usize,
    /// Longest prompt accepted, in tokens; at least 1.
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask for; at least 1.
    pub max_tokens_limit: usize,
    /// `max_tokens` of a request that does not set it; at least 1 and at most
    /// `max_tokens_limit`.
    pub default_max_tokens: usize,
    /// Prompt tokens prefilled per scheduler step; at least 1.
    pub prefill_chunk_tokens: usize,
    /// Largest request message accepted, in bytes (1024 to 64 MiB).
    pub max_request_bytes: usize,
    /// On shutdown, how long (in milliseconds) running streams may go on before they are
    /// aborted.
    pub shutdown_grace_ms: u64,
    /// On shutdown, how long (in milliseconds) health says NOT_SERVING while requests are
    /// still taken, before the listeners close and the grace period starts.
    pub drain_notice_ms: u64,
    /// Serve gRPC over TLS with these files; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// The tokens Inference and reflection calls may carry as `authorization: Bearer
    /// <token>`, one per client (request ids are scoped to the token that sent them: a
    /// client can see and abort only its own); empty turns authentication off. Visible
    /// ASCII only.
    pub bearer_tokens: Vec<Secret>,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax; checked to parse.
    pub log_level: String,
    /// Where the KV cache lives.
    pub kv_cache: KvCache,
    /// The csd-engine store file of the KV cache: `Some` exactly when `kv_cache` is
    /// [`KvCache::Flash`]: the configured path, or [`KV_STORE_FILE`] in the state directory
    /// ([`state_directory`]).
    pub kv_store_path: Option<PathBuf>,
    /// Size in bytes of a KV store created at `kv_store_path` (an existing store is reused at
    /// its own size): the configured value (at least 1), or [`default_kv_store_bytes`] of the
    /// free space there. 0 when `kv_cache` is [`KvCache::Ram`].
    pub kv_store_bytes: u64,
    /// With the KV cache in RAM: the bytes its sequences may hold in all; 0 on flash.
    pub kv_ram_bytes: u64,
    /// The storage engine's page cache and sparse policy for the KV cache on flash.
    pub engine: EngineConfig,
    /// Limits on client connections.
    pub connections: ConnectionLimits,
    /// Faults injected into the KV store's reads (chaos testing only); `None`: off.
    pub fault_injection: Option<FaultInjection>,
}

/// gRPC listen address used when none is configured.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// HTTP API listen address used when none is configured.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8000";
/// Metrics listen address used when none is configured.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Largest accepted request message (64 MiB): beyond it a request is a mistake or an attack.
const MAX_REQUEST_BYTES_CEILING: usize = 64 << 20;

/// Longest drain notice (5 minutes): beyond it a stop would outlast any unit's timeout.
const MAX_DRAIN_NOTICE_MS: u64 = 300_000;

/// File name of the default KV store, in the state directory.
pub const KV_STORE_FILE: &str = "kv.store";
/// Size of a KV store created when `kv_store_bytes` is unset (16 GiB), unless half of the
/// free space is less.
pub const DEFAULT_KV_STORE_BYTES: u64 = 16 << 30;
/// Smallest store the default size may come to (64 MiB, about 2,900 tokens of the default
/// model's KV): with less than twice this free, start-up fails instead.
pub const MIN_KV_STORE_BYTES: u64 = 64 << 20;

/// `v`, or `default`, refused when it is zero.
fn at_least_one<T: Copy + Default + PartialEq>(
    key: &'static str,
    v: Option<T>,
    default: T,
) -> Result<T, ConfigError> {
    match v.unwrap_or(default) {
        n if n == T::default() => Err(invalid(key, "must be at least 1")),
        n => Ok(n),
    }
}

impl Config {
    /// Stack `cli` (flags and `INSTINFER_*` variables, as parsed by clap) over the TOML file
    /// at `file`, if any, and check the result.
    pub fn load(file: Option<&Path>, cli: ConfigLayer) -> Result<Config, ConfigError> {
        let base = match file {
            Some(path) => ConfigLayer::from_file(path)?,
            None => ConfigLayer::default(),
        };
        Config::resolve(cli.over(base))
    }

    /// Fill in defaults and check every value. Files named by the configuration (TLS
    /// material, the token file) must be readable. The default KV store is placed by this
    /// process's environment ([`StateEnv::from_process`]).
    pub fn resolve(l: ConfigLayer) -> Result<Config, ConfigError> {
        Config::resolve_in(l, &StateEnv::from_process())
    }

    /// [`Config::resolve`], with the default KV store placed by `env`.
    pub fn resolve_in(l: ConfigLayer, env: &StateEnv) -> Result<Config, ConfigError> {
        let threads = match l.threads {
            Some(0) => return Err(invalid("threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };
        let grpc_addr = l
            .grpc_addr
            .unwrap_or_else(|| DEFAULT_GRPC_ADDR.parse().expect("valid default"));
        let metrics_addr = l
            .metrics_addr
            .unwrap_or_else(|| DEFAULT_METRICS_ADDR.parse().expect("valid default"));
        if grpc_addr.port() != 0 && grpc_addr == metrics_addr {
            return Err(invalid(
                "metrics_addr",
                format!("{metrics_addr} is also grpc_addr"),
            ));
        }
        let http_addr = match l.http_addr {
            None => Some(DEFAULT_HTTP_ADDR.parse().expect("valid default")),
            Some(ListenAddr::Off) => None,
            Some(ListenAddr::At(a)) => Some(a),
        };
        if let Some(h) = http_addr.filter(|h| h.port() != 0) {
            for (other, key) in [(grpc_addr, "grpc_addr"), (metrics_addr, "metrics_addr")] {
                if h == other {
                    return Err(invalid("http_addr", format!("{h} is also {key}")));
                }
            }
        }
        let max_concurrent_sequences =
            at_least_one("max_concurrent_sequences", l.max_concurrent_sequences, 32)?;
        let max_queued_requests = l.max_queued_requests.unwrap_or(64);
        let max_prompt_tokens = at_least_one("max_prompt_tokens", l.max_prompt_tokens, 8192)?;
        let max_tokens_limit = at_least_one("max_tokens_limit", l.max_tokens_limit, 4096)?;
        let default_max_tokens = at_least_one(
            "default_max_tokens",
            l.default_max_tokens,
            256.min(max_tokens_limit),
        )?;
        if default_max_tokens > max_tokens_limit {
            return Err(invalid(
                "default_max_tokens",
                format!("{default_max_tokens} exceeds max_tokens_limit ({max_tokens_limit})"),
            ));
        }
        let prefill_chunk_tokens =
            at_least_one("prefill_chunk_tokens", l.prefill_chunk_tokens, 256)?;
        let max_request_bytes = l.max_request_bytes.unwrap_or(4 << 20);
        if !(1024..=MAX_REQUEST_BYTES_CEILING).contains(&max_request_bytes) {
            return Err(invalid(
                "max_request_bytes",
                format!("{max_request_bytes} is outside 1024..={MAX_REQUEST_BYTES_CEILING}"),
            ));
        }
        let shutdown_grace_ms = l.shutdown_grace_ms.unwrap_or(30_000);
        let drain_notice_ms = l.drain_notice_ms.unwrap_or(0);
        if drain_notice_ms > MAX_DRAIN_NOTICE_MS {
            return Err(invalid(
                "drain_notice_ms",
                format!("{drain_notice_ms} is over {MAX_DRAIN_NOTICE_MS} (5 minutes)"),
            ));
        }
        let connections = l.connections.resolve()?;
        let fault_injection = l.fault_injection.resolve()?;
        let tls = match (l.tls_cert_path, l.tls_key_path) {
            (None, None) => None,
            (Some(cert_path), Some(key_path)) => {
                readable("tls_cert_path", &cert_path)?;
                readable("tls_key_path", &key_path)?;
                Some(TlsFiles {
                    cert_path,
                    key_path,
                })
            }
            (Some(_), None) => {
                return Err(invalid("tls_key_path", "is required with tls_cert_path"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls_cert_path", "is required with tls_key_path"))
            }
        };
        let bearer_tokens = match (l.bearer_token, l.bearer_token_path) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "bearer_token",
                    "set either bearer_token or bearer_token_path, not both",
                ))
            }
            (Some(t), None) => vec![check_token("bearer_token", t)?],
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid("bearer_token_path", format!("{}: {e}", path.display()))
                })?;
                token_file(&text)?
            }
            (None, None) => Vec::new(),
        };
        let log_level = l.log_level.unwrap_or_else(|| "info".into());
        if let Err(e) = instinfer_runtime::logging::check_filter(&log_level) {
            return Err(invalid("log_level", format!("{log_level:?}: {e}")));
        }
        let engine = l.engine.engine_config();
        // The step budget is checked against the model's layer count when the engine starts;
        // every other value is checked here, before anything is opened.
        engine.validate(1).map_err(|e| match e {
            csd_engine::KvError::BadInput(m) => invalid("engine", m),
            other => invalid("engine", other.to_string()),
        })?;
        if let Some(p) = &l.model {
            if p.as_os_str().is_empty() {
                return Err(invalid("model", "is an empty path"));
            }
        }
        if l.context_tokens == Some(0) {
            return Err(invalid("context_tokens", "must be at least 1"));
        }
        // Last: the default store's place and size depend on the machine, not only on the
        // keys, and every key-only mistake should be reported before them.
        let kv_cache = l.kv_cache.unwrap_or_default();
        let (kv_store_path, kv_store_bytes) =
            resolve_kv_store(kv_cache, l.kv_store_path, l.kv_store_bytes, env)?;
        let kv_ram_bytes = resolve_kv_ram(kv_cache, l.kv_ram_bytes)?;
        Ok(Config {
            model: l.model,
            context_tokens: l.context_tokens,
            allow_untrained_context: l.allow_untrained_context.unwrap_or(false),
            threads,
            grpc_addr,
            http_addr,
            metrics_addr,
            max_concurrent_sequences,
            max_queued_requests,
            max_prompt_tokens,
            max_tokens_limit,
            default_max_tokens,
            prefill_chunk_tokens,
            max_request_bytes,
            shutdown_grace_ms,
            drain_notice_ms,
            tls,
            bearer_tokens,
            log_format: l.log_format.unwrap_or_default(),
            log_level,
            kv_cache,
            kv_store_path,
            kv_store_bytes,
            kv_ram_bytes,
            engine,
            connections,
            fault_injection,
        })
    }

    /// The configuration as JSON, the bearer token replaced by whether one is set.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "model": self.model,
            "threads": self.threads,
            "grpc_addr": self.grpc_addr.to_string(),
            "http_addr": self.http_addr.map_or("off".to_string(), |a| a.to_string()),
            "metrics_addr": self.metrics_addr.to_string(),
            "max_concurrent_sequences": self.max_concurrent_sequences,
            "max_queued_requests": self.max_queued_requests,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_tokens_limit": self.max_tokens_limit,
            "default_max_tokens": self.default_max_tokens,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "max_request_bytes": self.max_request_bytes,
            "shutdown_grace_ms": self.shutdown_grace_ms,
            "drain_notice_ms": self.drain_notice_ms,
            "tls_cert_path": self.tls.as_ref().map(|t| &t.cert_path),
            "tls_key_path": self.tls.as_ref().map(|t| &t.key_path),
            "bearer_token_set": !self.bearer_tokens.is_empty(),
            "bearer_tokens": self.bearer_tokens.len(),
            "log_format": self.log_format,
            "log_level": self.log_level,
            "kv_cache": self.kv_cache,
            "kv_store_path": self.kv_store_path,
            "kv_store_bytes": self.kv_store_path.as_ref().map(|_| self.kv_store_bytes),
            "kv_ram_bytes": (self.kv_cache == KvCache::Ram).then_some(self.kv_ram_bytes),
            "engine": {
                "page_cache_bytes": self.engine.cache_bytes,
                "target_mass": self.engine.target_mass,
                "max_blocks": self.engine.max_blocks,
                "min_blocks": self.engine.min_blocks,
                "step_budget_blocks": self.engine.step_budget_blocks,
                "sink_blocks": self.engine.sink_blocks,
                "recent_blocks": self.engine.recent_blocks,
                "probe_blend": self.engine.probe_blend,
                "score": self.engine.score.as_str(),
                "score_shortlist_blocks": self.engine.score_shortlist_blocks,
                "quest_runs": self.engine.quest_runs,
                "estimate_skipped": self.engine.estimate_skipped,
                "readahead_layers": self.engine.readahead_layers,
                "readahead_bytes": self.engine.readahead_bytes,
                "reader_threads": self.engine.reader_threads,
                "prefill_stage_bytes": self.engine.prefill_stage_bytes,
            },
            "connections": self.connections,
            "fault_injection": self.fault_injection,
        });
        // Set apart: one more key in the macro above passes its recursion limit.
        v["context_tokens"] = serde_json::json!(self.context_tokens);
        v["allow_untrained_context"] = serde_json::json!(self.allow_untrained_context);
        v
    }
}

/// The environment variables that place the default KV store.
#[derive(Clone, Debug, Default)]
pub struct StateEnv {
    /// `$STATE_DIRECTORY` (set by systemd for `StateDirectory=`; colon-separated paths).
    pub state_directory: Option<std::ffi::OsString>,
    /// `$XDG_STATE_HOME`.
    pub xdg_state_home: Option<std::ffi::OsString>,
    /// The user's home directory.
    pub home: Option<PathBuf>,
}

impl StateEnv {
    /// This process's environment.
    pub fn from_process() -> Self {
        StateEnv {
            state_directory: std::env::var_os("STATE_DIRECTORY"),
            xdg_state_home: std::env::var_os("XDG_STATE_HOME"),
            home: dirs::home_dir(),
        }
    }
}

/// The folder of the default KV store: the first path of `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`), else `$XDG_STATE_HOME/instinfer`, else `~/.local/state/instinfer`.
/// Empty and relative values count as unset, as the XDG base directory specification says.
/// `None` when none of them is set.
pub fn state_directory(env: &StateEnv) -> Option<PathBuf> {
    let absolute = |p: &OsStr| {
        let p = Path::new(p);
        p.is_absolute().then(|| p.to_path_buf())
    };
    let from_systemd = env.state_directory.as_deref().and_then(|v| {
        use std::os::unix::ffi::OsStrExt;
        // Several directories are separated by colons; the first is ours.
        let first = v.as_bytes().split(|&b| b == b':').next()?;
        absolute(OsStr::from_bytes(first))
    });
    from_systemd
        .or_else(|| {
            let xdg = env.xdg_state_home.as_deref().and_then(absolute)?;
            Some(xdg.join("instinfer"))
        })
        .or_else(|| {
            let home = env.home.as_deref().filter(|h| h.is_absolute())?;
            Some(home.join(".local/state/instinfer"))
        })
}

/// RAM budget of a KV cache in RAM when `kv_ram_bytes` is unset and the machine's memory
/// cannot be read (8 GiB).
const FALLBACK_KV_RAM_BYTES: u64 = 8 << 30;

/// `kv_ram_bytes`: only with `kv_cache = "ram"` (0 otherwise); by default half of the
/// machine's memory (`MemTotal` in /proc/meminfo).
fn resolve_kv_ram(kv_cache: KvCache, bytes: Option<u64>) -> Result<u64, ConfigError> {
    match (kv_cache, bytes) {
        (KvCache::Flash, Some(_)) => Err(invalid(
            "kv_ram_bytes",
            "is set, but the KV cache is on flash: remove kv_ram_bytes, or set kv_cache = \"ram\"",
        )),
        (KvCache::Flash, None) => Ok(0),
        (KvCache::Ram, Some(0)) => Err(invalid("kv_ram_bytes", "must be at least 1")),
        (KvCache::Ram, Some(n)) => Ok(n),
        (KvCache::Ram, None) => Ok(mem_total_bytes().map_or(FALLBACK_KV_RAM_BYTES, |m| m / 2)),
    }
}

/// The machine's memory, from /proc/meminfo.
fn mem_total_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The size of a KV store created in `dir` when `kv_store_bytes` is unset, given the bytes
/// `available_bytes` there (free space plus an existing store file's size, see
/// [`available_bytes`]): [`DEFAULT_KV_STORE_BYTES`], at most half of `available_bytes`,
/// rounded down to a whole MiB. Less than [`MIN_KV_STORE_BYTES`] is an error naming the
/// folder and the free space.
pub fn default_kv_store_bytes(dir: &Path, available_bytes: u64) -> Result<u64, ConfigError> {
    const MIB: u64 = 1 << 20;
    let bytes = DEFAULT_KV_STORE_BYTES.min(available_bytes / 2) / MIB * MIB;
    if bytes < MIN_KV_STORE_BYTES {
        return Err(ConfigError::NoRoomForKvStore {
            dir: dir.to_path_buf(),
            available_bytes,
        });
    }
    Ok(bytes)
}

/// The bytes a KV store at `path` may use: the free space (for unprivileged users) of the
/// filesystem that holds, or would hold, it, plus the size of the file if it already exists,
/// since it is reused. Folders that do not exist yet are measured at their nearest existing
/// parent.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let own = match std::fs::metadata(path) {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let mut dir = path.parent().unwrap_or(Path::new("."));
    if dir.as_os_str().is_empty() {
        dir = Path::new(".");
    }
    while !dir.exists() {
        match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => dir = p,
            _ => {
                dir = Path::new(".");
                break;
            }
        }
    }
    Ok(free_bytes(dir)?.saturating_add(own))
}

/// Bytes free for unprivileged users on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    csd_engine::device::available_bytes(dir)
}

/// Where the KV cache lives and how large a store to create, from the three keys.
fn resolve_kv_store(
    kv_cache: KvCache,
    path: Option<PathBuf>,
    bytes: Option<u64>,
    env: &StateEnv,
) -> Result<(Option<PathBuf>, u64), ConfigError> {
    if kv_cache == KvCache::Ram {
        if let Some(p) = path {
            return Err(invalid(
                "kv_store_path",
                format!(
                    "is set ({}), but kv_cache = \"ram\" keeps the KV cache in RAM: remove \
                     kv_store_path, or set kv_cache = \"flash\"",
                    p.display()
                ),
            ));
        }
        if bytes.is_some() {
            return Err(invalid(
                "kv_store_bytes",
                "is set, but kv_cache = \"ram\" keeps the KV cache in RAM: remove \
                 kv_store_bytes, or set kv_cache = \"flash\"",
            ));
        }
        return Ok((None, 0));
    }
    let path = match path {
        Some(p) if p.as_os_str().is_empty() => {
            return Err(invalid("kv_store_path", "is an empty path"))
        }
        Some(p) => p,
        None => state_directory(env)
            .ok_or_else(|| {
                invalid(
                    "kv_store_path",
                    "is unset and there is no state directory for the default KV store \
                     (STATE_DIRECTORY, XDG_STATE_HOME and HOME are all unset): set \
                     kv_store_path, or kv_cache = \"ram\"",
                )
            })?
            .join(KV_STORE_FILE),
    };
    if path.is_dir() {
        return Err(invalid(
            "kv_store_path",
            format!("{} is a directory, not a file", path.display()),
        ));
    }
    let bytes = match bytes {
        Some(0) => return Err(invalid("kv_store_bytes", "must be at least 1")),
        Some(n) => n,
        // A block device (or anything else that is not a regular file) keeps its own size.
        None if path.exists() && !path.is_file() => DEFAULT_KV_STORE_BYTES,
        None => {
            let available = available_bytes(&path).map_err(|e| {
                invalid(
                    "kv_store_path",
                    format!("cannot measure the free space for {}: {e}", path.display()),
                )
            })?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            default_kv_store_bytes(dir, available)?
        }
    };
    Ok((Some(path), bytes))
}

/// `bytes` for people: "16.0 GiB", "63.9 MiB", "512 bytes".
fn human_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    match UNITS.iter().find(|(_, u)| bytes >= *u) {
        Some((name, u)) => format!("{:.1} {name}", bytes as f64 / *u as f64),
        None => format!("{bytes} bytes"),
    }
}

fn readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))
}

/// The tokens of a token file: one per line; blank lines and `#` comments are skipped.
fn token_file(text: &str) -> Result<Vec<Secret>, ConfigError> {
    let mut tokens: Vec<Secret> = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let t = check_token("bearer_token_path", line.to_string())?;
        if tokens.iter().any(|x| x.expose() == t.expose()) {
            return Err(invalid(
                "bearer_token_path",
                "a token is listed twice (each client needs its own)",
            ));
        }
        tokens.push(t);
    }
    if tokens.is_empty() {
        return Err(invalid("bearer_token_path", "the file holds no token"));
    }
    Ok(tokens)
}

fn check_token(key: &'static str, token: String) -> Result<Secret, ConfigError> {
    if token.is_empty() {
        return Err(invalid(key, "the token is empty"));
    }
    // It travels in an HTTP header: visible ASCII only.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            key,
            "the token may hold only visible ASCII characters (no spaces)",
        ));
    }
    Ok(Secret(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(toml: &str) -> Result<ConfigLayer, ConfigError> {
        ConfigLayer::from_toml(toml, Path::new("test.toml"))
    }

    /// A state directory of its own (kept alive by the returned guard), so that no test
    /// measures or names the real home.
    fn state_env() -> (tempfile::TempDir, StateEnv) {
        let dir = tempfile::tempdir().unwrap();
        let env = StateEnv {
            state_directory: Some(dir.path().as_os_str().to_owned()),
            ..Default::default()
        };
        (dir, env)
    }

    /// Resolve `l` with the default KV store in a temporary state directory.
    fn resolve(l: ConfigLayer) -> Result<Config, ConfigError> {
        let (_dir, env) = state_env();
        Config::resolve_in(l, &env)
    }

    #[test]
    fn defaults_listen_on_loopback() {
        let c = resolve(ConfigLayer::default()).unwrap();
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(c.http_addr.unwrap().to_string(), "127.0.0.1:8000");
        assert!(c.tls.is_none() && c.bearer_tokens.is_empty());
    }

    #[test]
    fn the_http_api_can_be_moved_or_turned_off() {
        let c = resolve(layer("http_addr = \"0.0.0.0:8080\"").unwrap()).unwrap();
        assert_eq!(c.http_addr.unwrap().to_string(), "0.0.0.0:8080");
        let c = resolve(layer("http_addr = \"off\"").unwrap()).unwrap();
        assert_eq!(c.http_addr, None);
        assert_eq!(c.to_json()["http_addr"], "off");
        let e = layer("http_addr = \"nowhere\"").unwrap_err().to_string();
        assert!(e.contains("http_addr") && e.contains("off"), "{e}");
        let e = resolve(layer("http_addr = \"127.0.0.1:50051\"").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("http_addr") && e.contains("grpc_addr"), "{e}");
    }

    #[test]
    fn the_kv_cache_is_on_flash_in_the_state_directory_by_default() {
        let (dir, env) = state_env();
        let c = Config::resolve_in(ConfigLayer::default(), &env).unwrap();
        assert_eq!(c.kv_cache, KvCache::Flash);
        let path = dir.path().join(KV_STORE_FILE);
        assert_eq!(c.kv_store_path.as_deref(), Some(path.as_path()));
        let want = default_kv_store_bytes(dir.path(), available_bytes(&path).unwrap()).unwrap();
        // The free space may move a little between the two measurements.
        assert!(
            c.kv_store_bytes.abs_diff(want) <= 64 << 20,
            "{} vs {want}",
            c.kv_store_bytes
        );
        assert!((MIN_KV_STORE_BYTES..=DEFAULT_KV_STORE_BYTES).contains(&c.kv_store_bytes));
        let j = c.to_json();
        assert_eq!(j["kv_cache"], "flash");
        assert_eq!(j["kv_store_path"], path.to_str().unwrap());
        assert_eq!(j["kv_store_bytes"], c.kv_store_bytes);
        assert!(
            !dir.path().join(KV_STORE_FILE).exists(),
            "resolving creates nothing"
        );

        // An existing store is reused, so its size counts as free: a (sparse) 1 TiB file
        // leaves room for the full default whatever the disk holds.
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(1 << 40).unwrap();
        let c = Config::resolve_in(ConfigLayer::default(), &env).unwrap();
        assert_eq!(c.kv_store_bytes, DEFAULT_KV_STORE_BYTES);
    }

    #[test]
    fn the_state_directory_is_systemds_then_xdgs_then_the_homes() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        let all = StateEnv {
            state_directory: os("/var/lib/instinferd:/var/lib/other"),
            xdg_state_home: os("/xdg/state"),
            home: Some(PathBuf::from("/home/u")),
        };
        assert_eq!(
            state_directory(&all),
            Some(PathBuf::from("/var/lib/instinferd")),
            "STATE_DIRECTORY first, its first path only"
        );
        let no_systemd = StateEnv {
            state_directory: None,
            ..all.clone()
        };
        assert_eq!(
            state_directory(&no_systemd),
            Some(PathBuf::from("/xdg/state/instinfer"))
        );
        let home_only = StateEnv {
            home: Some(PathBuf::from("/home/u")),
            ..Default::default()
        };
        assert_eq!(
            state_directory(&home_only),
            Some(PathBuf::from("/home/u/.local/state/instinfer"))
        );
        // Empty and relative values count as unset.
        let odd = StateEnv {
            state_directory: os(""),
            xdg_state_home: os("relative/state"),
            home: Some(PathBuf::from("/home/u")),
        };
        assert_eq!(
            state_directory(&odd),
            Some(PathBuf::from("/home/u/.local/state/instinfer"))
        );
        assert_eq!(state_directory(&StateEnv::default()), None);
        let e = Config::resolve_in(ConfigLayer::default(), &StateEnv::default()).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    key: "kv_store_path",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("XDG_STATE_HOME"), "{e}");
    }

    #[test]
    fn the_default_size_is_16_gib_at_most_half_the_free_space() {
        let dir = Path::new("/var/lib/instinferd");
        let gib = 1u64 << 30;
        assert_eq!(default_kv_store_bytes(dir, 1 << 40).unwrap(), 16 * gib);
        assert_eq!(default_kv_store_bytes(dir, 32 * gib).unwrap(), 16 * gib);
        assert_eq!(default_kv_store_bytes(dir, 10 * gib).unwrap(), 5 * gib);
        // Rounded down to a whole MiB.
        assert_eq!(
            default_kv_store_bytes(dir, 2 * MIN_KV_STORE_BYTES + 3 * (1 << 20) - 1).unwrap(),
            MIN_KV_STORE_BYTES + (1 << 20)
        );
        assert_eq!(
            default_kv_store_bytes(dir, 2 * MIN_KV_STORE_BYTES).unwrap(),
            MIN_KV_STORE_BYTES
        );
    }

    #[test]
    fn a_disk_too_small_for_the_default_store_is_refused_with_the_numbers() {
        let dir = Path::new("/var/lib/instinferd");
        let free = 2 * MIN_KV_STORE_BYTES - 1;
        let e = default_kv_store_bytes(dir, free).unwrap_err();
        assert!(
            matches!(&e, ConfigError::NoRoomForKvStore { available_bytes, .. } if *available_bytes == free),
            "{e}"
        );
        let msg = e.to_string();
        for needle in [
            "/var/lib/instinferd",
            &free.to_string(),
            &MIN_KV_STORE_BYTES.to_string(),
            &(2 * MIN_KV_STORE_BYTES).to_string(),
            "kv_store_bytes",
            "kv_cache",
        ] {
            assert!(msg.contains(needle), "{needle:?} not in: {msg}");
        }
        assert!(default_kv_store_bytes(dir, 0).is_err());
    }

    #[test]
    fn an_explicit_size_is_used_as_given() {
        let (dir, env) = state_env();
        let l = layer("kv_store_bytes = 1125899906842624").unwrap();
        let c = Config::resolve_in(l, &env).unwrap();
        assert_eq!(c.kv_store_bytes, 1 << 50, "no cap on a configured size");
        let path = dir.path().join("elsewhere/my.store");
        let l = layer(&format!(
            "kv_store_path = {:?}\nkv_store_bytes = 4096",
            path.to_str().unwrap()
        ))
        .unwrap();
        let c = Config::resolve_in(l, &env).unwrap();
        assert_eq!(c.kv_store_path.as_deref(), Some(path.as_path()));
        assert_eq!(c.kv_store_bytes, 4096);
        let e = Config::resolve_in(layer("kv_store_bytes = 0").unwrap(), &env).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    key: "kv_store_bytes",
                    ..
                }
            ),
            "{e}"
        );
        let l = layer(&format!(
            "kv_store_path = {:?}",
            dir.path().to_str().unwrap()
        ))
        .unwrap();
        let e = Config::resolve_in(l, &env).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
    }

    #[test]
    fn ram_is_an_explicit_choice_without_a_store() {
        let (_dir, env) = state_env();
        let c = Config::resolve_in(layer("kv_cache = \"ram\"").unwrap(), &env).unwrap();
        assert_eq!(c.kv_cache, KvCache::Ram);
        assert_eq!(c.kv_store_path, None);
        let j = c.to_json();
        assert_eq!(j["kv_cache"], "ram");
        assert!(
            j["kv_store_path"].is_null() && j["kv_store_bytes"].is_null(),
            "{j}"
        );

        let both = layer("kv_cache = \"ram\"\nkv_store_path = \"/srv/kv.store\"").unwrap();
        let e = Config::resolve_in(both, &env).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    key: "kv_store_path",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("kv_cache"), "{e}");
        let sized = layer("kv_cache = \"ram\"\nkv_store_bytes = 4096").unwrap();
        let e = Config::resolve_in(sized, &env).unwrap_err();
        assert!(
            matches!(
                &e,
                ConfigError::Invalid {
                    key: "kv_store_bytes",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("kv_cache"), "{e}");

        let e = layer("kv_cache = \"disk\"").unwrap_err().to_string();
        assert!(e.contains("kv_cache") || e.contains("disk"), "{e}");

        // It stacks like every other key: a flag over the file's choice.
        let file = layer("kv_cache = \"ram\"").unwrap();
        let cli = ConfigLayer {
            kv_cache: Some(KvCache::Flash),
            ..Default::default()
        };
        let c = Config::resolve_in(cli.over(file), &env).unwrap();
        assert_eq!(c.kv_cache, KvCache::Flash);
        assert!(c.kv_store_path.is_some());
    }

    #[test]
    fn engine_settings_come_from_the_engine_table_and_stack_like_the_rest() {
        let file = layer("[engine]\npage_cache_bytes = 1048576\nscore = \"quest\"\n").unwrap();
        let cli = ConfigLayer {
            engine: EngineArgs {
                page_cache_bytes: Some(4096),
                max_blocks: Some(50),
                ..Default::default()
            },
            ..Default::default()
        };
        let c = resolve(cli.over(file)).unwrap();
        assert_eq!(c.engine.cache_bytes, 4096, "the flag wins over the file");
        assert_eq!(c.engine.max_blocks, 50);
        assert_eq!(
            c.engine.score,
            csd_engine::PageScore::Quest,
            "the file's value stays"
        );
        let d = EngineConfig::default();
        assert_eq!(
            c.engine.target_mass, d.target_mass,
            "unset keys keep the default"
        );
        assert_eq!(resolve(ConfigLayer::default()).unwrap().engine, d);
        assert_eq!(c.to_json()["engine"]["score"], "quest");
    }

    #[test]
    fn bad_engine_settings_are_refused_by_name() {
        let e = layer("[engine]\npage_cache_byte = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("page_cache_byte"), "{e}");
        let e = layer("[engine]\nscore = \"best\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown page score"), "{e}");
        let bad = layer("[engine]\ntarget_mass = 1.5\n").unwrap();
        let e = resolve(bad).unwrap_err().to_string();
        assert!(e.contains("engine") && e.contains("target_mass"), "{e}");
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_rejected_by_name() {
        let e = layer("grpc_adr = \"127.0.0.1:1\"").unwrap_err().to_string();
        assert!(e.contains("grpc_adr"), "{e}");
        let e = layer("max_queued_requests = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_queued_requests"), "{e}");
        let e = layer("grpc_addr = \"not an address\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpc_addr"), "{e}");
    }

    #[test]
    fn upper_layers_override_lower_ones() {
        let file = layer("max_queued_requests = 5\nmax_prompt_tokens = 100").unwrap();
        let top = ConfigLayer {
            max_prompt_tokens: Some(7),
            ..Default::default()
        };
        let c = resolve(top.over(file)).unwrap();
        assert_eq!((c.max_queued_requests, c.max_prompt_tokens), (5, 7));
    }

    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            ("max_concurrent_sequences = 0", "max_concurrent_sequences"),
            ("prefill_chunk_tokens = 0", "prefill_chunk_tokens"),
            ("max_request_bytes = 10", "max_request_bytes"),
            (
                "default_max_tokens = 10\nmax_tokens_limit = 5",
                "default_max_tokens",
            ),
            ("tls_cert_path = \"/nonexistent/cert.pem\"", "tls_key_path"),
            ("bearer_token = \"\"", "bearer_token"),
            ("bearer_token = \"has space\"", "bearer_token"),
            ("log_level = \"[[[\"", "log_level"),
            ("threads = 0", "threads"),
            ("drain_notice_ms = 900000", "drain_notice_ms"),
            (
                "[connections]\nhttp2_max_concurrent_streams = 0",
                "connections.http2_max_concurrent_streams",
            ),
            (
                "[connections]\nhttp2_max_header_list_bytes = 10",
                "connections.http2_max_header_list_bytes",
            ),
            (
                "[connections]\nrequest_read_timeout_ms = 0",
                "connections.request_read_timeout_ms",
            ),
            (
                "[connections]\nmax_http_connections = 0",
                "connections.max_http_connections",
            ),
            ("kv_cache = \"ram\"\nkv_ram_bytes = 0", "kv_ram_bytes"),
            (
                "kv_cache = \"flash\"\nkv_store_path = \"/tmp/x\"\nkv_ram_bytes = 5",
                "kv_ram_bytes",
            ),
            (
                "[fault_injection]\nread_error_probability = 1.5",
                "fault_injection.read_error_probability",
            ),
            (
                "[fault_injection]\nbit_flip_probability = -0.1",
                "fault_injection.bit_flip_probability",
            ),
        ];
        for (toml, key) in cases {
            let e = resolve(layer(toml).unwrap()).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key: k, .. } if *k == key),
                "{toml}: {e}"
            );
        }
    }

    #[test]
    fn connection_limits_come_from_the_table_and_unknown_keys_are_refused() {
        let c = resolve(
            layer(
                "[connections]\nhttp2_max_concurrent_streams = 9\nhttp2_keepalive_interval_ms = 0",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.connections.http2_max_concurrent_streams, 9);
        assert_eq!(c.connections.keepalive_interval(), None);
        assert_eq!(
            c.connections.http2_max_pending_reset_streams,
            ConnectionLimits::default().http2_max_pending_reset_streams
        );
        assert_eq!(
            c.to_json()["connections"]["http2_max_concurrent_streams"],
            9
        );
        assert!(layer("[connections]\nmax_streams = 1").is_err());
    }

    #[test]
    fn a_token_file_lists_one_token_per_client() {
        assert_eq!(
            token_file("# clients\nalpha\n\n  beta  \n")
                .unwrap()
                .iter()
                .map(Secret::expose)
                .collect::<Vec<_>>(),
            ["alpha", "beta"]
        );
        for bad in ["", "# only a comment\n", "alpha\nalpha\n", "has space\n"] {
            let e = token_file(bad).unwrap_err();
            assert!(
                matches!(
                    &e,
                    ConfigError::Invalid {
                        key: "bearer_token_path",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn the_token_is_never_printed() {
        let c = resolve(layer("bearer_token = \"s3cret\"").unwrap()).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.to_json().to_string().contains("s3cret"));
        assert_eq!(c.bearer_tokens[0].expose(), "s3cret");
    }
}
