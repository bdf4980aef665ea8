//! prefix-bench: the daemon's persistent prefix cache, measured through its gRPC API.
//!
//! Starts `instinferd` on a temporary store, asks questions about one long document cold
//! (cache off), warm (cache on, after ClearCache) and after a restart on the same store, then
//! holds a multi-turn chat with and without the cache; reports time to first token, the
//! speedup, prompt tokens saved, bytes written and whether every output matched its uncached
//! counterpart (`--out`: report.json, report.md, ttft.png, instinferd.log).
//!
//!   cargo build --release --bin instinferd --bin prefix-bench
//!   target/release/prefix-bench                 # ~8K-token document, 16 questions, 8 chat turns
//!   target/release/prefix-bench --smoke         # 600 tokens, 3 questions, 2 turns

use anyhow::{Context, Result};
use clap::Parser;
use instinfer_benches::files;
use instinfer_benches::prefix::document::DEFAULT_DOCUMENT;
use instinfer_benches::prefix::plot::ttft_chart;
use instinfer_benches::prefix::run::{self, Options};
use instinfer_runtime::fetch;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "prefix-bench",
    about = "Prefix cache of instinferd: TTFT cold, warm and after a restart; identical output"
)]
struct Cli {
    /// The instinferd binary [default: the one next to this executable].
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// GGUF model, for the daemon and the tokenizer [default: SmolLM2-135M-Instruct,
    /// fetched on first use].
    #[arg(long)]
    model: Option<PathBuf>,
    /// The document the questions are about [default: benches/data/gpl-3.0.txt].
    #[arg(long)]
    document: Option<PathBuf>,
    /// Most tokens of the document used (cut at a line end).
    #[arg(long, default_value_t = 8000)]
    doc_tokens: usize,
    /// Questions asked in the warm and restart phases (at most 16).
    #[arg(long, default_value_t = 16)]
    questions: usize,
    /// Questions asked cold (the first ones) [default: --questions].
    #[arg(long)]
    cold_questions: Option<usize>,
    /// Turns of the chat phases.
    #[arg(long, default_value_t = 8)]
    chat_turns: usize,
    /// Most document tokens in the chat's system message (fewer if the model's context
    /// cannot hold them with every turn). Each uncached turn prefills all of them again.
    #[arg(long, default_value_t = 2048)]
    chat_doc_tokens: usize,
    /// Most tokens generated per request (greedy; end-of-generation stops it earlier).
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Quick run: a 600-token document, 3 questions, 2 chat turns.
    #[arg(long)]
    smoke: bool,
    /// Folder the temporary store folder is made in.
    #[arg(long, default_value = "/var/tmp")]
    store_dir: PathBuf,
    /// Size of the daemon's KV store file.
    #[arg(long, default_value_t = 4 << 30)]
    kv_store_bytes: u64,
    /// Keep the store folder at the end.
    #[arg(long)]
    keep_store: bool,
    /// The daemon's compute threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// The daemon's log filter (its log goes to OUT/instinferd.log).
    #[arg(long, default_value = "info")]
    daemon_log_level: String,
    /// Seconds to wait for the daemon to answer after each start.
    #[arg(long, default_value_t = 600)]
    ready_timeout_s: u64,
    /// Folder of report.json, report.md, ttft.png and instinferd.log.
    #[arg(long, default_value = "target/prefix-bench")]
    out: PathBuf,
}

fn main() -> Result<()> {
    instinfer_runtime::logging::init_from_env("prefix_bench=info,instinfer_benches=info,warn");
    let cli = Cli::parse();
    let daemon = match cli.daemon {
        Some(p) => p,
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("instinferd"),
    };
    let model = fetch::resolve_model(cli.model.as_deref()).context("locating the model")?;
    let (doc_tokens, questions, chat_turns) = if cli.smoke {
        (600, 3, 2)
    } else {
        (cli.doc_tokens, cli.questions, cli.chat_turns)
    };
    let opts = Options {
        daemon,
        model,
        document: cli.document.unwrap_or_else(|| DEFAULT_DOCUMENT.into()),
        doc_tokens,
        questions,
        cold_questions: cli.cold_questions.unwrap_or(questions).min(questions),
        chat_turns,
        chat_doc_tokens: cli.chat_doc_tokens,
        max_tokens: cli.max_tokens,
        store_dir: cli.store_dir,
        store_bytes: cli.kv_store_bytes,
        threads: cli.threads,
        daemon_log_level: cli.daemon_log_level,
        ready_timeout: Duration::from_secs(cli.ready_timeout_s),
        out: cli.out.clone(),
        keep_store: cli.keep_store,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let run = run::run(opts)?;
    files::write_json(&cli.out.join("report.json"), &run.to_json())?;
    let md = run.to_markdown();
    let md_path = cli.out.join("report.md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let png = cli.out.join("ttft.png");
    if let Err(e) = ttft_chart(
        &png,
        "prefix-bench: time to first token per request",
        &run.phases,
    ) {
        tracing::warn!(error = %format!("{e:#}"), "no chart");
    }
    print!("{md}");
    tracing::info!(out = %cli.out.display(), "report written");
    Ok(())
}
