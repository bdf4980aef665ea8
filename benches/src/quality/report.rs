//! What a run prints and writes: the set-up lines, the summary tables (passkey scores,
//! agreement, per-layer figures), the work done, and the JSON result file.

use super::agreement::AgreementRun;
use super::corpus::{file_name, Corpus};
use super::options::Options;
use super::passkey::{needle, PasskeyLength, PasskeyTrial, PASSKEY_INTRO, PASSKEY_QUESTION};
use super::session::Work;
use super::stats::{LayerAgg, LayerReport};
use super::variants::Variant;
use csd_engine::EngineConfig;
use instinfer_runtime::fetch;
use instinfer_runtime::kv::PAGE_BYTES;
use instinfer_runtime::model::ModelConfig;
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;

/// Per length, each policy's counters summed over that length's runs.
pub type LayerAggs = Vec<(usize, LayerAgg)>;

/// What a run measures with and on.
pub struct Setup<'a> {
    /// The flags.
    pub opts: &'a Options,
    /// Worker threads.
    pub threads: usize,
    /// The model file.
    pub model_path: &'a Path,
    /// The model's shape.
    pub model: &'a ModelConfig,
    /// The text.
    pub corpus: &'a Corpus,
    /// How the stores do their I/O.
    pub io_mode: String,
    /// Tokens per KV page.
    pub block_tokens: u32,
    /// The sparse policies.
    pub variants: &'a [Variant],
}

/// What a run measured.
#[derive(Default)]
pub struct Measured {
    /// Every passkey prompt.
    pub passkey_trials: Vec<PasskeyTrial>,
    /// Passkey scores per length (empty when skipped).
    pub passkey_lengths: Vec<PasskeyLength>,
    /// Per policy: its passkey runs' counters.
    pub passkey_agg: Vec<LayerAggs>,
    /// Every agreement prompt.
    pub agree_runs: Vec<AgreementRun>,
    /// Per policy: its agreement runs' counters.
    pub agree_agg: Vec<LayerAggs>,
}

/// The console lines of the set-up: model, text, stores and policies.
pub fn print_setup(s: &Setup<'_>) {
    println!(
        "quality-bench: model {} ({} layers, context {}), threads {}",
        file_name(s.model_path),
        s.model.n_layers,
        s.model.context_len,
        s.threads
    );
    println!(
        "text: {} files ({}), {} words, {} tokens in {} sentences",
        s.corpus.sources.len(),
        s.corpus.sources.join(" "),
        s.corpus.words,
        s.corpus.tokens,
        s.corpus.units.len()
    );
    println!(
        "stores: {}.{{ref,v1..}} ({}), {} tokens per page",
        s.opts.store.display(),
        s.io_mode,
        s.block_tokens,
    );
    for v in s.variants {
        println!("sparse policy {:?}: {:?}", v.name, v.cfg);
    }
}

/// One policy's agreement over the runs of one length or of all.
#[derive(Serialize)]
pub struct AgreementTotal {
    variant: String,
    matches: usize,
    steps: usize,
    agreement: f64,
    matching_prefixes: Vec<usize>,
}

/// The agreement of every policy at one length (`None`: all lengths).
#[derive(Serialize)]
pub struct AgreementRow {
    length: Option<usize>,
    sparse: Vec<AgreementTotal>,
}

/// Agreement per length of `lengths`, then over all of them.
fn agreement_rows(runs: &[AgreementRun], lengths: &[usize], names: &[String]) -> Vec<AgreementRow> {
    let lengths = lengths.iter().map(|&l| Some(l)).chain([None]);
    lengths
        .map(|l| {
            let r: Vec<&AgreementRun> = runs
                .iter()
                .filter(|r| l.is_none_or(|l| r.length == l))
                .collect();
            let steps: usize = r.iter().map(|r| r.steps).sum();
            let sparse = names
                .iter()
                .enumerate()
                .map(|(v, name)| {
                    let matches: usize = r.iter().map(|r| r.sparse[v].matches).sum();
                    AgreementTotal {
                        variant: name.clone(),
                        matches,
                        steps,
                        agreement: matches as f64 / steps.max(1) as f64,
                        matching_prefixes: r.iter().map(|r| r.sparse[v].matching_prefix).collect(),
                    }
                })
                .collect();
            AgreementRow { length: l, sparse }
        })
        .collect()
}

/// The summary after the measurements: policies, passkey scores, agreement, per-layer
/// figures. Returns the agreement table's rows (none when agreement was skipped).
pub fn print_summary(s: &Setup<'_>, m: &Measured, elapsed: f64) -> Vec<AgreementRow> {
    let names: Vec<String> = s.variants.iter().map(|v| v.name.clone()).collect();
    println!("\n== quality-bench summary ({elapsed:.0} s) ==");
    for (v, name) in names.iter().enumerate() {
        println!("[{}] {name}", v + 1);
    }
    if !m.passkey_lengths.is_empty() {
        print_passkey(s.opts, names.len(), &m.passkey_lengths);
    }
    let mut rows = Vec::new();
    if !m.agree_runs.is_empty() {
        rows = agreement_rows(&m.agree_runs, &s.opts.agree_lengths, &names);
        print_agreement(s.opts, &rows);
    }
    for (v, name) in names.iter().enumerate() {
        print_layers(
            &format!("[{}] {name}, agreement runs", v + 1),
            &m.agree_agg[v],
            true,
        );
        print_layers(
            &format!("[{}] {name}, passkey runs", v + 1),
            &m.passkey_agg[v],
            false,
        );
    }
    rows
}

/// The passkey table: per length, full's and each of `policies` policies' correct answers.
fn print_passkey(opts: &Options, policies: usize, lengths: &[PasskeyLength]) {
    println!(
        "\npasskey retrieval, correct/trials (depths {:?} %, {} trials per depth; same = sparse answer identical to full's):",
        opts.depths, opts.trials
    );
    print!("  length | full ");
    for v in 0..policies {
        print!("| [{}] correct, same ", v + 1);
    }
    println!();
    for p in lengths {
        print!("  {:>6} | {:>2}/{:<2}", p.length, p.full_correct, p.trials);
        for s in &p.sparse {
            print!(
                " |     {:>2}/{:<2}  {:>2}/{:<2}",
                s.correct, p.trials, s.same_answer, p.trials
            );
        }
        println!();
    }
}

/// The agreement table: per length and over all, each policy's matches (and, per length,
/// each prompt's matching prefix).
fn print_agreement(opts: &Options, rows: &[AgreementRow]) {
    println!(
        "\ngreedy agreement with full, teacher-forced ({} decode steps per prompt), and matching prefix per prompt:",
        opts.agree_tokens
    );
    for row in rows {
        print!(
            "  {:>6}",
            row.length
                .map(|l| l.to_string())
                .unwrap_or_else(|| "all".into())
        );
        for (v, t) in row.sparse.iter().enumerate() {
            print!(
                " | [{}] {:>3}/{:<3} = {:.3}",
                v + 1,
                t.matches,
                t.steps,
                t.agreement
            );
            if row.length.is_some() {
                print!(" {:?}", t.matching_prefixes);
            }
        }
        println!();
    }
}

/// One policy's per-layer figures, per length: with `table`, a table of every layer, then a
/// line per length.
fn print_layers(title: &str, agg: &[(usize, LayerAgg)], table: bool) {
    let reports: Vec<(usize, LayerReport)> = agg
        .iter()
        .filter(|(_, a)| a.runs > 0)
        .map(|(l, a)| (*l, a.report()))
        .collect();
    if reports.is_empty() {
        return;
    }
    println!("\n{title}");
    if table {
        print_layer_table(&reports);
    }
    let opt = |x: Option<f64>| x.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
    for (l, r) in &reports {
        println!(
            "{l:>5} tokens: mean recall {} (oracle at the same page count {}), lowest layer {}; selected per layer {:.1} (layer {}) .. {:.1} (layer {}), cv {:.2} -> counts {} across layers; most selected in one step {}",
            opt(r.mean_recall),
            opt(r.mean_oracle_recall),
            opt(r.min_layer_recall),
            r.selected_spread.min,
            r.selected_spread.min_layer,
            r.selected_spread.max,
            r.selected_spread.max_layer,
            r.selected_spread.cv,
            if r.counts_vary_across_layers { "vary" } else { "do NOT vary" },
            r.max_step_selected,
        );
    }
}

/// Per layer (rows) and length (columns): recall (oracle), pages attended, selected and
/// candidates per step.
fn print_layer_table(reports: &[(usize, LayerReport)]) {
    println!(
        "per layer, mean over decode steps: recall (oracle) | pages attended | selected / candidates"
    );
    print!("layer");
    for (l, _) in reports {
        print!(" | {:>26}", format!("{l} tokens"));
    }
    println!();
    for layer in 0..reports[0].1.recall.len() {
        print!("{layer:>5}");
        for (_, r) in reports {
            let rc = r.recall[layer]
                .zip(r.oracle_recall[layer])
                .map(|(x, o)| format!("{x:.3} ({o:.3})"))
                .unwrap_or_else(|| "  -  ".into());
            print!(
                " | {rc} {:>6.1} {:>5.1}/{:>5.1}",
                r.attended_per_step[layer],
                r.selected_per_step[layer],
                r.candidates_per_step[layer]
            );
        }
        println!();
    }
}

/// The work line: prefill and decode work and time, device bytes `(read, written)` over
/// `engines` engines.
pub fn print_work(w: &Work, (read, written): (u64, u64), engines: usize) {
    let prefill_rate = w.prefill_tokens as f64 / w.prefill_secs.max(1e-9);
    println!(
        "\nwork: {} prefill tokens in {:.0} s ({prefill_rate:.0} tok/s), {} batched decode steps in {:.0} s; device read {:.1} GiB, written {:.1} GiB over {} engines",
        w.prefill_tokens,
        w.prefill_secs,
        w.decode_steps,
        w.decode_secs,
        read as f64 / (1u64 << 30) as f64,
        written as f64 / (1u64 << 30) as f64,
        engines,
    );
}

/// A policy's engine settings in the JSON.
#[derive(Serialize)]
struct PolicyJson {
    cache_bytes: u64,
    sink_blocks: usize,
    recent_blocks: usize,
    min_blocks: usize,
    max_blocks: usize,
    target_mass: f32,
    step_budget_blocks: usize,
    probe_blend: f32,
    score: String,
    measure_recall: bool,
    debug: String,
}

impl From<&EngineConfig> for PolicyJson {
    fn from(c: &EngineConfig) -> Self {
        PolicyJson {
            cache_bytes: c.cache_bytes,
            sink_blocks: c.sink_blocks,
            recent_blocks: c.recent_blocks,
            min_blocks: c.min_blocks,
            max_blocks: c.max_blocks,
            target_mass: c.target_mass,
            step_budget_blocks: c.step_budget_blocks,
            probe_blend: c.probe_blend,
            score: format!("{:?}", c.score),
            measure_recall: c.measure_recall,
            debug: format!("{c:?}"),
        }
    }
}

/// One policy's per-layer figures over all lengths and per length.
fn layer_json(agg: &[(usize, LayerAgg)]) -> Value {
    let mut all = LayerAgg::default();
    let mut per_length = Vec::new();
    for (len, a) in agg.iter().filter(|(_, a)| a.runs > 0) {
        all.merge(a);
        per_length.push(json!({ "length": len, "layers": a.report() }));
    }
    json!({
        "all": (all.runs > 0).then(|| all.report()),
        "per_length": per_length,
    })
}

/// The per-layer figures of every policy, by name.
fn layers_by_variant(variants: &[Variant], agg: &[LayerAggs]) -> Value {
    variants
        .iter()
        .zip(agg)
        .map(|(v, a)| (v.name.clone(), layer_json(a)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// The result file's content.
pub fn result_json(
    s: &Setup<'_>,
    m: &Measured,
    agreement: &[AgreementRow],
    work: &Work,
    (read, written): (u64, u64),
    elapsed: f64,
) -> Value {
    let (opts, c) = (s.opts, s.model);
    let variants: Vec<Value> = s
        .variants
        .iter()
        .map(|v| json!({ "name": v.name, "engine": PolicyJson::from(&v.cfg) }))
        .collect();
    json!({
        "bench": "quality-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "label": opts.label,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "elapsed_s": elapsed,
        "threads": s.threads,
        "model": {
            "file": s.model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": fetch::sha256_file(s.model_path).ok(),
            "layers": c.n_layers, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "context": c.context_len,
        },
        "text": { "files": s.corpus.sources, "words": s.corpus.words,
                   "tokens": s.corpus.tokens, "sentences": s.corpus.units.len() },
        "store": { "io_mode": s.io_mode, "block_tokens": s.block_tokens, "page_bytes": PAGE_BYTES },
        "variants": variants,
        "seed": opts.seed,
        "passkey": {
            "lengths": opts.lengths, "depths_pct": opts.depths, "trials_per_depth": opts.trials,
            "answer_tokens": opts.answer_tokens, "answer_prefix": opts.answer_prefix,
            "intro": PASSKEY_INTRO, "question": PASSKEY_QUESTION, "needle": needle("KEY"),
            "per_length": m.passkey_lengths,
            "trials": m.passkey_trials,
            "sparse_layers": layers_by_variant(s.variants, &m.passkey_agg),
        },
        "agreement": {
            "lengths": opts.agree_lengths, "prompts_per_length": opts.agree_prompts,
            "decode_steps": opts.agree_tokens,
            "per_length": agreement,
            "runs": m.agree_runs,
            "sparse_layers": layers_by_variant(s.variants, &m.agree_agg),
        },
        "work": {
            "prefill_tokens": work.prefill_tokens, "prefill_s": work.prefill_secs,
            "decode_steps": work.decode_steps, "decode_s": work.decode_secs,
            "device_bytes_read": read, "device_bytes_written": written,
        },
    })
}
