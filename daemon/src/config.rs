//! Configuration of the `instinferd` daemon: one struct, filled from a TOML file, then
//! `INSTINFER_*` environment variables, then command-line flags (each overriding the one
//! before). Unknown keys in the file are rejected and every value is checked by
//! [`Config::resolve`] before anything binds a port or loads a model.

use csd_engine::EngineConfig;
use instinfer_runtime::kv::EngineArgs;
use serde::{Deserialize, Serialize};
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

/// One layer of configuration: every key optional. The TOML file, the environment and the
/// command line each give one; [`ConfigLayer::over`] stacks them.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ConfigLayer {
    /// GGUF model file [default: SmolLM2-135M-Instruct Q4_1, fetched into the cache].
    #[arg(long, env = "INSTINFER_MODEL")]
    pub model: Option<PathBuf>,
    /// Threads for model compute [default: all cores].
    #[arg(long, env = "INSTINFER_THREADS")]
    pub threads: Option<usize>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "INSTINFER_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
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
    /// File holding the bearer token (surrounding whitespace is ignored).
    #[arg(long, env = "INSTINFER_BEARER_TOKEN_PATH")]
    pub bearer_token_path: Option<PathBuf>,
    /// Log line format [default: human].
    #[arg(long, env = "INSTINFER_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, tracing EnvFilter syntax (e.g. "info", "instinfer=debug") [default: info].
    #[arg(long, env = "INSTINFER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Keep the KV cache on flash in this csd-engine store file instead of RAM.
    #[arg(long, env = "INSTINFER_KV_STORE_PATH")]
    pub kv_store_path: Option<PathBuf>,
    /// Size of a KV store file created at kv_store_path [default: 1073741824].
    #[arg(long, env = "INSTINFER_KV_STORE_BYTES")]
    pub kv_store_bytes: Option<u64>,
    /// The storage engine's page cache and sparse policy (the `[engine]` table of the file),
    /// for a KV store at kv_store_path [default: the engine's].
    #[command(flatten)]
    #[serde(default)]
    pub engine: EngineArgs,
}

macro_rules! stack {
    ($top:expr, $below:expr, $($field:ident),* $(,)?) => {
        ConfigLayer {
            $($field: $top.$field.or($below.$field),)*
            engine: $top.engine.over($below.engine),
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
            threads,
            grpc_addr,
            metrics_addr,
            max_concurrent_sequences,
            max_queued_requests,
            max_prompt_tokens,
            max_tokens_limit,
            default_max_tokens,
            prefill_chunk_tokens,
            max_request_bytes,
            shutdown_grace_ms,
            tls_cert_path,
            tls_key_path,
            bearer_token,
            bearer_token_path,
            log_format,
            log_level,
            kv_store_path,
            kv_store_bytes,
        )
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
    /// GGUF model file; `None` means the default model.
    pub model: Option<PathBuf>,
    /// Threads for model compute.
    pub threads: usize,
    /// Address the gRPC service listens on (port 0: any free port).
    pub grpc_addr: SocketAddr,
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
    /// Serve gRPC over TLS with these files; `None` serves plaintext.
    pub tls: Option<TlsFiles>,
    /// The token Inference and reflection calls must carry as `authorization: Bearer <token>`;
    /// `None` turns authentication off. Visible ASCII only.
    pub bearer_token: Option<Secret>,
    /// How log lines are written.
    pub log_format: LogFormat,
    /// Log filter in tracing's EnvFilter syntax; checked to parse.
    pub log_level: String,
    /// Keep the KV cache in the csd-engine store at this path instead of RAM.
    pub kv_store_path: Option<PathBuf>,
    /// Size in bytes of a KV store created at `kv_store_path`; at least 1.
    pub kv_store_bytes: u64,
    /// The storage engine's page cache and sparse policy for a KV store at `kv_store_path`.
    pub engine: EngineConfig,
}

/// gRPC listen address used when none is configured.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// Metrics listen address used when none is configured.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Largest accepted request message (64 MiB): beyond it a request is a mistake or an attack.
const MAX_REQUEST_BYTES_CEILING: usize = 64 << 20;

impl Default for Config {
    fn default() -> Self {
        Config::resolve(ConfigLayer::default()).expect("the defaults are valid")
    }
}

fn at_least_one(key: &'static str, v: Option<usize>, default: usize) -> Result<usize, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(invalid(key, "must be at least 1")),
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
    /// material, the token file) must be readable.
    pub fn resolve(l: ConfigLayer) -> Result<Config, ConfigError> {
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
        let bearer_token = match (l.bearer_token, l.bearer_token_path) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "bearer_token",
                    "set either bearer_token or bearer_token_path, not both",
                ))
            }
            (Some(t), None) => Some(check_token("bearer_token", t)?),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid("bearer_token_path", format!("{}: {e}", path.display()))
                })?;
                Some(check_token("bearer_token_path", text.trim().to_string())?)
            }
            (None, None) => None,
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
        let kv_store_bytes = l.kv_store_bytes.unwrap_or(1 << 30);
        if kv_store_bytes == 0 {
            return Err(invalid("kv_store_bytes", "must be at least 1"));
        }
        if let Some(p) = &l.model {
            if p.as_os_str().is_empty() {
                return Err(invalid("model", "is an empty path"));
            }
        }
        Ok(Config {
            model: l.model,
            threads,
            grpc_addr,
            metrics_addr,
            max_concurrent_sequences,
            max_queued_requests,
            max_prompt_tokens,
            max_tokens_limit,
            default_max_tokens,
            prefill_chunk_tokens,
            max_request_bytes,
            shutdown_grace_ms,
            tls,
            bearer_token,
            log_format: l.log_format.unwrap_or_default(),
            log_level,
            kv_store_path: l.kv_store_path,
            kv_store_bytes,
            engine,
        })
    }

    /// The configuration as JSON, the bearer token replaced by whether one is set.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model": self.model,
            "threads": self.threads,
            "grpc_addr": self.grpc_addr.to_string(),
            "metrics_addr": self.metrics_addr.to_string(),
            "max_concurrent_sequences": self.max_concurrent_sequences,
            "max_queued_requests": self.max_queued_requests,
            "max_prompt_tokens": self.max_prompt_tokens,
            "max_tokens_limit": self.max_tokens_limit,
            "default_max_tokens": self.default_max_tokens,
            "prefill_chunk_tokens": self.prefill_chunk_tokens,
            "max_request_bytes": self.max_request_bytes,
            "shutdown_grace_ms": self.shutdown_grace_ms,
            "tls_cert_path": self.tls.as_ref().map(|t| &t.cert_path),
            "tls_key_path": self.tls.as_ref().map(|t| &t.key_path),
            "bearer_token_set": self.bearer_token.is_some(),
            "log_format": self.log_format,
            "log_level": self.log_level,
            "kv_store_path": self.kv_store_path,
            "kv_store_bytes": self.kv_store_bytes,
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
                "quest_runs": self.engine.quest_runs,
                "estimate_skipped": self.engine.estimate_skipped,
            },
        })
    }
}

fn readable(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| invalid(key, format!("{}: {e}", path.display())))
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

    #[test]
    fn defaults_listen_on_loopback() {
        let c = Config::default();
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
        assert!(c.tls.is_none() && c.bearer_token.is_none());
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
        let c = Config::resolve(cli.over(file)).unwrap();
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
        assert_eq!(Config::default().engine, d);
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
        let e = Config::resolve(bad).unwrap_err().to_string();
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
        let c = Config::resolve(top.over(file)).unwrap();
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
        ];
        for (toml, key) in cases {
            let e = Config::resolve(layer(toml).unwrap()).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { key: k, .. } if *k == key),
                "{toml}: {e}"
            );
        }
    }

    #[test]
    fn the_token_is_never_printed() {
        let c = Config::resolve(layer("bearer_token = \"s3cret\"").unwrap()).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.to_json().to_string().contains("s3cret"));
        assert_eq!(c.bearer_token.unwrap().expose(), "s3cret");
    }
}
