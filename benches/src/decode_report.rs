//! Results of `decode-bench`: per-configuration figures, the summary table, the JSON file,
//! PNG plots, and the llama.cpp reference run.

use anyhow::{bail, Context, Result};
use csd_engine::{EngineConfig, EngineStats, PolicyStats};
use hdrhistogram::Histogram;
use instinfer_runtime::kv::AttentionMode;
use instinfer_runtime::model::Model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One (context, sequences, mode) measurement.
#[derive(Clone, Debug)]
pub struct ConfigResult {
    /// Context length in tokens.
    pub context: usize,
    /// Sequences decoding side by side, one batch per step.
    pub seqs: usize,
    /// The attention mode measured.
    pub mode: AttentionMode,
    /// Decode steps timed (after the warm-up).
    pub steps: usize,
    /// Wall time of the timed steps.
    pub seconds: f64,
    /// Tokens generated per second, over all sequences.
    pub tok_per_s: f64,
    /// Median step time in milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile step time in milliseconds.
    pub p99_ms: f64,
    /// Bytes read from the device per generated token.
    pub device_bytes_per_token: f64,
    /// Bytes crossing the engine's command interface (K/V/q in, attention out) per
    /// generated token.
    pub boundary_bytes_per_token: f64,
    /// Share of page cache lookups that hit (0 when there were none).
    pub cache_hit_rate: f64,
    /// Per layer: blocks attended per token (sinks, selected, recent window on flash).
    pub pages_per_layer: Vec<f64>,
}

impl ConfigResult {
    /// The figures of `steps` timed steps over `seconds`: step times in `hist` (µs), the
    /// engine's traffic and policy counters of those steps in `stats`.
    pub fn new(
        context: usize,
        seqs: usize,
        mode: AttentionMode,
        steps: usize,
        seconds: f64,
        hist: &Histogram<u64>,
        (s, p): &(EngineStats, PolicyStats),
    ) -> Self {
        let tokens = (steps * seqs).max(1) as f64;
        let per_step = p.decode_steps.max(1) as f64;
        ConfigResult {
            context,
            seqs,
            mode,
            steps,
            seconds,
            tok_per_s: tokens / seconds,
            p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
            device_bytes_per_token: s.device_bytes_read as f64 / tokens,
            boundary_bytes_per_token: s.boundary_bytes as f64 / tokens,
            cache_hit_rate: if s.cache_lookups == 0 {
                0.0
            } else {
                s.cache_hits as f64 / s.cache_lookups as f64
            },
            pages_per_layer: p
                .attended_blocks
                .iter()
                .map(|&b| b as f64 / per_step)
                .collect(),
        }
    }

    /// One line of the figures, for the console.
    pub fn line(&self) -> String {
        format!(
            "{:>7} ctx {:>2} seq {:>7}: {:>8.2} tok/s  p50 {:>8.1} ms  p99 {:>8.1} ms  dev {:>10.0} B/tok  boundary {:>7.0} B/tok  hit {:>5.1}%  pages/layer {:>6.1}",
            self.context,
            self.seqs,
            self.mode.as_str(),
            self.tok_per_s,
            self.p50_ms,
            self.p99_ms,
            self.device_bytes_per_token,
            self.boundary_bytes_per_token,
            self.cache_hit_rate * 100.0,
            mean(&self.pages_per_layer),
        )
    }

    fn to_json(&self) -> Value {
        json!({
            "context": self.context, "sequences": self.seqs, "mode": self.mode.as_str(),
            "steps": self.steps, "seconds": self.seconds, "tok_per_s": self.tok_per_s,
            "step_ms_p50": self.p50_ms, "step_ms_p99": self.p99_ms,
            "device_bytes_per_token": self.device_bytes_per_token,
            "boundary_bytes_per_token": self.boundary_bytes_per_token,
            "cache_hit_rate": self.cache_hit_rate,
            "pages_per_layer": self.pages_per_layer,
        })
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Everything one run measured.
pub struct Report {
    /// The set-up: model shape, threads, I/O mode, SIMD level, engine settings.
    pub header: Value,
    /// One entry per (context, sequences, mode).
    pub results: Vec<ConfigResult>,
    /// Per context: seconds its prefill took (0 when restored from the store).
    pub prefill_seconds: Vec<(usize, f64)>,
    /// Per context: llama.cpp's decode tok/s with its KV in RAM.
    pub llamacpp: Vec<(usize, f64)>,
}

impl Report {
    /// An empty report of a run of `model` with engine settings `cfg` on `threads` threads,
    /// store I/O mode `io` and `kv_per_token` bytes of KV per token.
    pub fn new(
        model: &Model,
        cfg: &EngineConfig,
        threads: usize,
        io: &str,
        kv_per_token: u64,
    ) -> Self {
        let c = &model.config;
        Report {
            header: json!({
                "model": { "layers": c.n_layers, "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim },
                "kv_bytes_per_token": kv_per_token,
                "threads": threads,
                "io": io,
                "simd": instinfer_kernels::simd::level_name(),
                "engine": {
                    "page_cache_bytes": cfg.cache_bytes, "sink_blocks": cfg.sink_blocks,
                    "recent_blocks": cfg.recent_blocks, "min_blocks": cfg.min_blocks,
                    "max_blocks": cfg.max_blocks, "target_mass": cfg.target_mass,
                    "step_budget_blocks": cfg.step_budget_blocks, "probe_blend": cfg.probe_blend,
                    "score": format!("{:?}", cfg.score),
                    "head_top_blocks": cfg.head_top_blocks, "quest_runs": cfg.quest_runs,
                    "dense_layers": cfg.dense_layers, "estimate_skipped": cfg.estimate_skipped,
                },
            }),
            results: Vec::new(),
            prefill_seconds: Vec::new(),
            llamacpp: Vec::new(),
        }
    }

    fn find(&self, ctx: usize, seqs: usize, mode: AttentionMode) -> Option<&ConfigResult> {
        self.results
            .iter()
            .find(|r| r.context == ctx && r.seqs == seqs && r.mode == mode)
    }

    /// sparse / flexgen, in tok/s and in device bytes per token, per (context, sequences).
    fn ratios(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for r in self
            .results
            .iter()
            .filter(|r| r.mode == AttentionMode::Sparse)
        {
            if let Some(f) = self.find(r.context, r.seqs, AttentionMode::Flexgen) {
                out.push(json!({
                    "context": r.context, "sequences": r.seqs,
                    "speedup_vs_flexgen": r.tok_per_s / f.tok_per_s,
                    "device_bytes_fraction_of_flexgen": r.device_bytes_per_token / f.device_bytes_per_token.max(1.0),
                }));
            }
        }
        out
    }

    /// Prints the set-up, every result, sparse against flexgen and against llama.cpp.
    pub fn print_summary(&self) {
        println!("decode-bench: {}", self.header);
        for r in &self.results {
            println!("{}", r.line());
        }
        for v in self.ratios() {
            println!(
                "sparse vs flexgen at {:>6} ctx, {} seq: {:.1}x tok/s, {:.4} of the device bytes",
                v["context"],
                v["sequences"],
                v["speedup_vs_flexgen"].as_f64().unwrap_or(0.0),
                v["device_bytes_fraction_of_flexgen"]
                    .as_f64()
                    .unwrap_or(0.0)
            );
        }
        for (ctx, tps) in &self.llamacpp {
            let ours = self
                .find(*ctx, 1, AttentionMode::Sparse)
                .map(|r| r.tok_per_s);
            match ours {
                Some(s) => println!("context {ctx}: llama.cpp (KV in RAM) {tps:.1} tok/s, sparse (KV on flash) {s:.1} tok/s, ratio {:.2}", s / tps),
                None => println!("context {ctx}: llama.cpp (KV in RAM) {tps:.1} tok/s"),
            }
        }
    }

    /// Writes the report as pretty JSON to `path` (its folder created if missing).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let v = json!({
            "setup": self.header,
            "prefill_seconds": self.prefill_seconds.iter().map(|(c, s)| json!({"context": c, "seconds": s})).collect::<Vec<_>>(),
            "results": self.results.iter().map(ConfigResult::to_json).collect::<Vec<_>>(),
            "sparse_vs_flexgen": self.ratios(),
            "llamacpp_ram_decode": self.llamacpp.iter().map(|(c, t)| json!({"context": c, "tok_per_s": t})).collect::<Vec<_>>(),
        });
        crate::files::write_json(path, &v)
    }

    /// Tok/s and device bytes per token against context (one line per mode and sequence
    /// count), and sparse pages per layer at the largest context.
    pub fn plot(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        crate::plot::register_font()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files = Vec::new();
        // A figure of a result, plotted against its context.
        type Figure = dyn Fn(&ConfigResult) -> f64;
        let series = |f: &Figure| {
            let mut s = Vec::new();
            for mode in AttentionMode::ALL {
                let mut seqs: Vec<usize> = self.results.iter().map(|r| r.seqs).collect();
                seqs.sort_unstable();
                seqs.dedup();
                for n in seqs {
                    let pts: Vec<(f64, f64)> = self
                        .results
                        .iter()
                        .filter(|r| r.mode == mode && r.seqs == n)
                        .map(|r| (r.context as f64, f(r)))
                        .collect();
                    if !pts.is_empty() {
                        s.push((format!("{} x{}", mode.as_str(), n), pts));
                    }
                }
            }
            s
        };
        let charts: [(&str, &str, &str, &Figure); 2] = [
            (
                "decode-tok-per-s.png",
                "Decode tok/s (all sequences), KV on flash",
                "tok/s",
                &|r| r.tok_per_s,
            ),
            (
                "decode-device-bytes.png",
                "Device bytes read per token",
                "bytes/token",
                &|r| r.device_bytes_per_token.max(1.0),
            ),
        ];
        for (file, title, y_label, figure) in charts {
            let p = dir.join(file);
            crate::plot::log_lines(&p, title, "context (tokens)", y_label, &series(figure))?;
            files.push(p);
        }
        if let Some(big) = self
            .results
            .iter()
            .filter(|r| r.mode == AttentionMode::Sparse)
            .max_by_key(|r| (r.context, std::cmp::Reverse(r.seqs)))
        {
            let p = dir.join("decode-sparse-pages-per-layer.png");
            let title = format!(
                "sparse: pages attended per layer per token, {} ctx",
                big.context
            );
            crate::plot::bars(&p, &title, "layer", "pages", &big.pages_per_layer)?;
            files.push(p);
        }
        Ok(files)
    }
}

/// llama.cpp's decode tok/s at `ctx` tokens of context with its KV in RAM, through the
/// repository's llama-cpp-python script (same GGUF, same threads).
pub fn run_llamacpp(model: &Path, ctx: usize, threads: usize) -> Result<f64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/llamacpp/bench_llamacpp.py");
    let text = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(model)
        .args(["--prompt-tokens", &ctx.to_string(), "--gen-tokens", "32"])
        .args(["--threads", &threads.to_string(), "--text", text])
        .output()
        .context("running python3 (is llama-cpp-python installed?)")?;
    if !out.status.success() {
        bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("failed")
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("llama.cpp script output")?;
    v["decode_tok_per_s"]
        .as_f64()
        .context("no decode_tok_per_s")
}
