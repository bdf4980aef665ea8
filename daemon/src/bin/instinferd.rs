//! `instinferd`: the instinfer gRPC daemon.
//!
//! Configuration comes from a TOML file (`--config`), `INSTINFER_*` environment variables
//! and flags, in rising order of precedence; it is checked before anything binds. Under
//! systemd (`Type=notify`) the daemon sends `READY=1` once the model is loaded and the ports
//! are bound, pings the watchdog while the scheduler is alive, and on SIGTERM drains: no new
//! requests, running streams get the grace period, then are aborted; exit code 0.

use anyhow::{Context, Result};
use clap::Parser;
use instinfer::config::{Config, ConfigLayer, LogFormat};
use instinfer::server;
use instinfer_runtime::fetch;
use instinfer_runtime::logging::{self, LogLines};
use instinfer_runtime::LoadedModel;
use sd_notify::NotifyState;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "instinferd",
    version,
    about = "instinfer gRPC inference daemon",
    after_help = "Every flag is also a key of the TOML file (with underscores) and an INSTINFER_* environment variable; flags override the environment, which overrides the file."
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "INSTINFER_CONFIG")]
    config: Option<PathBuf>,
    /// Check the configuration, print the result as JSON and exit.
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    layer: ConfigLayer,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(cli.config.as_deref(), cli.layer) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("instinferd: error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check_config {
        println!(
            "{}",
            serde_json::to_string_pretty(&config.to_json()).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    log_panics();
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            let _ = sd_notify::notify(&[NotifyState::Status(&format!("failed: {e:#}"))]);
            ExitCode::FAILURE
        }
    }
}

/// Panics (bugs) go to the log with their thread, place and backtrace, wherever they are
/// caught: an engine thread fails only the request at hand, and the scheduler's end stops
/// the server.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            panic = %info,
            backtrace = %backtrace,
            "a thread panicked"
        );
    }));
}

fn init_logging(config: &Config) {
    // The filter was checked with the rest of the configuration.
    let lines = match config.log_format {
        LogFormat::Human => LogLines::Human,
        LogFormat::Json => LogLines::Json,
    };
    logging::init(&config.log_level, lines);
}

fn run(config: Config) -> Result<()> {
    tracing::info!(config = %config.to_json(), "starting");
    let path = fetch::resolve_model(config.model.as_deref()).context("locating the model")?;
    let mut loaded =
        LoadedModel::load(&path).with_context(|| format!("loading {}", path.display()))?;
    if let Some(tokens) = config.context_tokens {
        loaded
            .model
            .set_context(tokens, config.allow_untrained_context)
            .context("context_tokens")?;
    }
    let loaded = Arc::new(loaded);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("instinferd-io")
        .build()
        .context("starting the async runtime")?
        .block_on(serve(config, loaded))
}

async fn serve(config: Config, loaded: Arc<LoadedModel>) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut handle = server::start(&config, loaded).await?;
    let status = format!(
        "serving gRPC on {} HTTP on {} and metrics on {}",
        handle.grpc_addr(),
        handle
            .http_addr()
            .map_or("off".to_string(), |a| a.to_string()),
        handle.metrics_addr()
    );
    let notifier = Notifier::start(sd_notify::watchdog_enabled(), handle.heartbeat())?;
    notifier.send(Notice::Ready(status));
    let signal = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        r = handle.wait() => {
            r?;
            anyhow::bail!("the server stopped by itself");
        }
    };
    tracing::info!(
        signal,
        grace_ms = config.shutdown_grace_ms,
        "shutting down: no new requests; running streams may finish within the grace period"
    );
    notifier.send(Notice::Stopping);
    handle.begin_shutdown();
    handle.wait().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// A message for the service manager.
enum Notice {
    /// Started: READY=1 with a status line.
    Ready(String),
    /// Draining: STOPPING=1.
    Stopping,
}

/// Talks to systemd (`NOTIFY_SOCKET`) from a thread of its own, so that a slow reader never
/// blocks the async runtime, and pings the watchdog at half its interval while the scheduler
/// thread keeps going round its loop: a stuck scheduler stops the pings and systemd
/// restarts the service.
struct Notifier {
    tx: std::sync::mpsc::Sender<Notice>,
}

impl Notifier {
    fn start(
        watchdog: Option<Duration>,
        heartbeat_age: impl Fn() -> Duration + Send + 'static,
    ) -> Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Notice>();
        if let Some(interval) = watchdog {
            tracing::info!(
                interval_ms = interval.as_millis() as u64,
                "systemd watchdog enabled"
            );
        }
        std::thread::Builder::new()
            .name("instinferd-notify".into())
            .spawn(move || {
                let period = watchdog.map_or(Duration::from_secs(3600), |i| i / 2);
                let mut last_ping = std::time::Instant::now();
                loop {
                    let wait = period.saturating_sub(last_ping.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(notice) => {
                            let r = match &notice {
                                Notice::Ready(status) => sd_notify::notify(&[
                                    NotifyState::Ready,
                                    NotifyState::Status(status),
                                ]),
                                Notice::Stopping => sd_notify::notify(&[
                                    NotifyState::Stopping,
                                    NotifyState::Status("draining running streams"),
                                ]),
                            };
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "could not notify the service manager");
                            }
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    let Some(interval) = watchdog else { continue };
                    if last_ping.elapsed() < period {
                        continue;
                    }
                    last_ping = std::time::Instant::now();
                    let age = heartbeat_age();
                    if age < interval {
                        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                    } else {
                        tracing::warn!(
                            age_ms = age.as_millis() as u64,
                            "the scheduler has not turned for longer than the watchdog interval"
                        );
                    }
                }
            })
            .context("starting the notification thread")?;
        Ok(Self { tx })
    }

    fn send(&self, notice: Notice) {
        let _ = self.tx.send(notice);
    }
}
