//! The one place the binaries (the daemon, the CLI and the benchmarks) start logging. The
//! libraries only emit `tracing` events and spans; a binary calls one of these once, at start.
//! Logs go to stderr, so a tool's own output on stdout stays clean.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// The environment variable command-line tools read their log filter from.
pub const LOG_ENV: &str = "INSTINFER_LOG";

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLines {
    /// One human-readable line per event.
    Human,
    /// One JSON object per line, with the current span's fields (a request id, for one).
    Json,
}

/// Log events that pass `filter` (tracing's EnvFilter syntax, e.g. `info` or
/// `instinfer=debug`; an invalid filter falls back to `info`), in `lines` format. Colours
/// only on a terminal (never in journald or a file), and never with `NO_COLOR` set.
pub fn init(filter: &str, lines: LogLines) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour_wanted())
        .with_writer(std::io::stderr);
    // A second call (tests that start several servers) keeps the first subscriber.
    let _ = match lines {
        LogLines::Human => fmt.try_init(),
        LogLines::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// Whether log lines may carry ANSI colour codes: stderr is a terminal and `NO_COLOR` is
/// unset (<https://no-color.org>).
fn colour_wanted() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Human-readable logs filtered by `$INSTINFER_LOG`, or by `default` when it is unset: the
/// set-up of the command-line tools.
pub fn init_from_env(default: &str) {
    let filter = std::env::var(LOG_ENV).unwrap_or_else(|_| default.to_string());
    init(&filter, LogLines::Human);
}

/// Whether `filter` is a valid log filter; `Err` says why not.
pub fn check_filter(filter: &str) -> Result<(), String> {
    EnvFilter::try_new(filter)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
