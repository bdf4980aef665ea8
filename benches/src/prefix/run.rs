//! One run of the benchmark: start the daemon on a fresh store, ask the questions cold, warm
//! and after a restart, hold the chat with and without the cache, stop the daemon.

use super::client::{Client, Generated};
use super::document::{self, Document, QUESTIONS};
use super::record::{Phase, PhaseRecord, RequestRecord};
use super::report::Run;
use crate::daemon::{free_local_addr, recovered_from_log, Daemon, DaemonConfig};
use crate::machine::{self, Machine};
use crate::setup;
use anyhow::{bail, Context, Result};
use indicatif::ProgressBar;
use instinfer_proto::v1 as pb;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to run, and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `instinferd` binary.
    pub daemon: PathBuf,
    /// The GGUF model.
    pub model: PathBuf,
    /// The document's file.
    pub document: PathBuf,
    /// Most tokens of the document used.
    pub doc_tokens: usize,
    /// Questions asked in the warm and restart phases.
    pub questions: usize,
    /// Of those, how many the cold phase asks (the first ones).
    pub cold_questions: usize,
    /// Turns of the chat phases.
    pub chat_turns: usize,
    /// Most tokens of the document in the chat's system message (fewer if the context
    /// could not hold every turn).
    pub chat_doc_tokens: usize,
    /// Most tokens generated per request.
    pub max_tokens: u32,
    /// Folder the store's temporary folder is made in.
    pub store_dir: PathBuf,
    /// Size of the store file.
    pub store_bytes: u64,
    /// The daemon's compute threads.
    pub threads: Option<usize>,
    /// The daemon's log filter.
    pub daemon_log_level: String,
    /// How long to wait for the daemon to answer after a start.
    pub ready_timeout: Duration,
    /// Folder of the report, the chart and the daemon's log.
    pub out: PathBuf,
    /// Leave the store file in place at the end.
    pub keep_store: bool,
    /// The command line, for the report.
    pub command: String,
}

/// How long the daemon may take to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// State across the phases.
struct Bench {
    opts: Options,
    cfg: DaemonConfig,
    daemon: Option<Daemon>,
    client: Option<Client>,
    pb: ProgressBar,
    exits: Vec<String>,
}

impl Bench {
    /// Start the daemon; returns the model's description and the seconds until it answered.
    fn start(&mut self) -> Result<(pb::ModelInfo, f64)> {
        let t = Instant::now();
        let mut d = Daemon::spawn(&self.cfg)?;
        let (client, info) =
            Client::wait_ready(self.cfg.grpc_addr, &mut d, self.opts.ready_timeout)?;
        self.daemon = Some(d);
        self.client = Some(client);
        Ok((info, t.elapsed().as_secs_f64()))
    }

    /// SIGTERM the daemon and wait for it.
    fn stop(&mut self) -> Result<()> {
        self.client = None;
        if let Some(d) = self.daemon.take() {
            let status = d.stop(STOP_GRACE)?;
            self.exits.push(status.to_string());
            if !status.success() {
                tracing::warn!(%status, "instinferd did not exit cleanly on SIGTERM");
            }
        }
        Ok(())
    }

    fn client(&mut self) -> Result<&mut Client> {
        self.client.as_mut().context("the daemon is not running")
    }

    /// Run one request of `phase`.
    fn ask(
        &mut self,
        phase: Phase,
        index: usize,
        question: usize,
        prompt: pb::generate_request::Prompt,
    ) -> Result<RequestRecord> {
        self.pb
            .set_message(format!("{} {}", phase.name(), index + 1));
        let req = document::request(
            prompt,
            self.opts.max_tokens,
            phase.cache(),
            format!("prefix-bench-{}-{}", phase.name(), index + 1),
        );
        let g: Generated = self
            .client()?
            .generate(req)
            .with_context(|| format!("{} request {}", phase.name(), index + 1))?;
        let r = RequestRecord::new(phase, index, question, g);
        tracing::debug!(
            phase = phase.name(),
            index,
            prompt_tokens = r.prompt_tokens,
            cached_tokens = r.cached_tokens,
            ttft_ms = r.ttft_ms,
            "request done"
        );
        self.pb.inc(1);
        Ok(r)
    }

    /// Run `prompts` (question index, prompt) as `phase`, with the server's counters around.
    fn phase(
        &mut self,
        phase: Phase,
        prompts: impl IntoIterator<Item = (usize, pb::generate_request::Prompt)>,
    ) -> Result<PhaseRecord> {
        let mut rec = PhaseRecord::new(phase);
        let before = self.client()?.stats()?;
        let t = Instant::now();
        for (i, (q, prompt)) in prompts.into_iter().enumerate() {
            let r = self.ask(phase, i, q, prompt)?;
            rec.requests.push(r);
        }
        rec.wall_s = t.elapsed().as_secs_f64();
        let after = self.client()?.stats()?;
        rec.counters(&before, &after);
        let summary = format!(
            "{}: {} requests in {:.1} s, TTFT {}, device bytes written {}",
            phase.name(),
            rec.requests.len(),
            rec.wall_s,
            rec.ttfts()
                .iter()
                .map(|t| format!("{t:.0}"))
                .collect::<Vec<_>>()
                .join(" "),
            rec.device_bytes_written
        );
        self.pb.suspend(|| tracing::info!("{summary}"));
        Ok(rec)
    }
}

/// A store folder of this process's own under `dir`.
fn store_folder(opts: &Options) -> Result<PathBuf> {
    let dir = opts
        .store_dir
        .join(format!("prefix-bench-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Run every phase; the store folder is removed at the end unless `keep_store`.
pub fn run(opts: Options) -> Result<Run> {
    if opts.questions == 0 || opts.questions > QUESTIONS.len() {
        bail!("--questions must be 1..={}", QUESTIONS.len());
    }
    if opts.cold_questions > opts.questions {
        bail!("--cold-questions must not exceed --questions");
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let dir = store_folder(&opts)?;
    let result = run_in(&opts, &dir);
    if !opts.keep_store {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove the store folder");
        }
    }
    result
}

fn run_in(opts: &Options, dir: &std::path::Path) -> Result<Run> {
    let started = utc_now();
    let store = dir.join("kv.store");
    let machine = Machine::describe(&store);
    let tok = document::load_tokenizer(&opts.model)?;
    let doc = Document::load(&opts.document, &tok, opts.doc_tokens)?;
    if doc.file_tokens < opts.doc_tokens {
        tracing::info!(
            file_tokens = doc.file_tokens,
            doc_tokens = opts.doc_tokens,
            "the document is shorter than --doc-tokens: all of it is used"
        );
    }
    let log = opts.out.join("instinferd.log");
    let _ = std::fs::remove_file(&log);
    let cfg = DaemonConfig {
        binary: opts.daemon.clone(),
        model: opts.model.clone(),
        store: store.clone(),
        store_bytes: opts.store_bytes,
        threads: opts.threads,
        grpc_addr: free_local_addr()?,
        metrics_addr: free_local_addr()?,
        http_addr: None,
        extra_args: Vec::new(),
        log,
        log_level: opts.daemon_log_level.clone(),
    };
    let total = opts.cold_questions + 2 * opts.questions + 2 * opts.chat_turns;
    let pb = setup::progress_bar(
        total as u64,
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
    )?;
    let mut b = Bench {
        opts: opts.clone(),
        cfg,
        daemon: None,
        client: None,
        pb,
        exits: Vec::new(),
    };
    b.pb.set_message("starting instinferd");
    let (info, first_ready_s) = b.start()?;
    let context = info.context_length as usize;
    let per_turn = opts.max_tokens as usize + 64;
    let chat_tokens = opts
        .chat_doc_tokens
        .min(doc.tokens)
        .min(context.saturating_sub(opts.chat_turns * per_turn + 64));
    let chat_doc = Document::load(&opts.document, &tok, chat_tokens)?;
    // Page the model in before anything is timed (cache off: nothing is stored).
    b.pb.set_message("warm-up");
    b.client()?
        .generate(document::request(
            pb::generate_request::Prompt::Text("The capital of France is".into()),
            2,
            pb::CacheMode::Off,
            "prefix-bench-warm-up".into(),
        ))
        .context("warm-up request")?;

    let questions =
        |n: usize| (0..n).map(|q| (q, document::question_prompt(&doc.text, QUESTIONS[q])));
    let mut phases = Vec::new();
    let mut cold = b.phase(Phase::Cold, questions(opts.cold_questions))?;
    cold.daemon_ready_s = Some(first_ready_s);
    phases.push(cold);

    b.pb.set_message("ClearCache");
    let cleared = b.client()?.clear_cache()?;
    let mut warm = b.phase(Phase::Warm, questions(opts.questions))?;
    warm.cleared_pages = Some(cleared);
    phases.push(warm);

    b.pb.set_message("restarting instinferd");
    b.stop()?;
    let (_, ready_s) = b.start()?;
    let at_start = b.client()?.stats()?.prefix_pages;
    let mut restart = b.phase(Phase::Restart, questions(opts.questions))?;
    restart.daemon_ready_s = Some(ready_s);
    restart.prefix_pages_at_start = Some(at_start);
    restart.recovered_in_log = recovered_from_log(&b.cfg.log);
    phases.push(restart);

    let system = document::chat_system(&chat_doc.text);
    let mut replies: Vec<String> = Vec::new();
    let mut chat = PhaseRecord::new(Phase::ChatCached);
    let before = b.client()?.stats()?;
    let t = Instant::now();
    for turn in 0..opts.chat_turns {
        let prompt = document::chat_prompt(&system, &replies, turn);
        let r = b.ask(Phase::ChatCached, turn, turn, prompt)?;
        replies.push(r.text.clone());
        chat.requests.push(r);
    }
    chat.wall_s = t.elapsed().as_secs_f64();
    let after = b.client()?.stats()?;
    chat.counters(&before, &after);
    phases.push(chat);
    let prompts: Vec<_> = (0..opts.chat_turns)
        .map(|turn| (turn, document::chat_prompt(&system, &replies, turn)))
        .collect();
    phases.push(b.phase(Phase::ChatUncached, prompts)?);

    b.pb.set_message("stopping instinferd");
    b.stop()?;
    b.pb.finish_and_clear();

    Ok(Run {
        command: opts.command.clone(),
        started,
        machine,
        load_after: machine::load_average(),
        model: json!({
            "file": info.model_file,
            "architecture": info.architecture,
            "layers": info.layers,
            "quantization": info.quantization,
            "kv_bytes_per_token": info.kv_bytes_per_token,
            "context_length": info.context_length,
            "kv_store": info.kv_store,
            "description": format!(
                "{} ({}, {} layers, {}, {} KV bytes per token, context {})",
                info.model_file, info.architecture, info.layers, info.quantization,
                info.kv_bytes_per_token, info.context_length
            ),
        }),
        document: json!({
            "path": doc.path,
            "tokens": doc.tokens,
            "file_tokens": doc.file_tokens,
            "chars": doc.text.len(),
            "chat_tokens": chat_doc.tokens,
        }),
        settings: json!({
            "questions": opts.questions,
            "cold_questions": opts.cold_questions,
            "chat_turns": opts.chat_turns,
            "max_tokens": opts.max_tokens,
            "kv_store_bytes": opts.store_bytes,
            "threads": opts.threads,
            "store": store,
        }),
        phases,
        daemon_exits: b.exits.clone(),
    })
}

/// The current time, UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
