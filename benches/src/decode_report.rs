//! Results of `decode-bench`: per-configuration figures, the summary table, the JSON file,
//! PNG plots, and the llama.cpp reference run.

use anyhow::{bail, Context, Result};
use csd_engine::{AttendProfile, EngineConfig, EngineStats, PolicyStats};
use hdrhistogram::Histogram;
use instinfer_runtime::kv::AttentionMode;
use instinfer_runtime::model::Model;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

use crate::machine::Machine;
use crate::plot::{Line, Stack};

/// Where one decode step's time went, in milliseconds (per step of all sequences).
#[derive(Clone, Copy, Debug, Default)]
pub struct StepTimes {
    /// Everything outside the engine's attend: the model's dense layers, sampling.
    pub dense_ms: f64,
    /// Sparse page scoring and selection.
    pub select_ms: f64,
    /// Estimates of the pages sparse skipped.
    pub estimate_ms: f64,
    /// The engine's thread waiting for reads with nothing else to do.
    pub read_wait_ms: f64,
    /// Attention over the pages, planning and the page cache.
    pub attention_ms: f64,
}

impl StepTimes {
    /// The split of `steps` steps that took `seconds` in all, given what attend reported.
    pub fn new(steps: usize, seconds: f64, p: &AttendProfile) -> StepTimes {
        let n = steps.max(1) as f64;
        let ms = |ns: u64| ns as f64 / 1e6 / n;
        StepTimes {
            dense_ms: (seconds * 1e3 / n - ms(p.total_ns)).max(0.0),
            select_ms: ms(p.select_ns),
            estimate_ms: ms(p.estimate_ns),
            read_wait_ms: ms(p.read_wait_ns),
            attention_ms: ms(p.compute_ns()),
        }
    }

    /// (name, milliseconds) of each part, in the order the reports stack them.
    pub fn parts(&self) -> [(&'static str, f64); 5] {
        [
            ("dense", self.dense_ms),
            ("scoring", self.select_ms),
            ("estimate", self.estimate_ms),
            ("I/O wait", self.read_wait_ms),
            ("attention", self.attention_ms),
        ]
    }
}

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
    /// Device read bandwidth while decoding: device bytes per token × tok/s.
    pub read_bytes_per_s: f64,
    /// Where a step's time went.
    pub times: StepTimes,
    /// Layer reads queued ahead, and those used, per step.
    pub readahead: (f64, f64),
}

impl ConfigResult {
    /// The figures of `steps` timed steps over `seconds`: step times in `hist` (µs), the
    /// engine's traffic and policy counters of those steps and where its attends spent
    /// their time in `stats`.
    pub fn new(
        context: usize,
        seqs: usize,
        mode: AttentionMode,
        steps: usize,
        seconds: f64,
        hist: &Histogram<u64>,
        (s, p, profile): &(EngineStats, PolicyStats, AttendProfile),
    ) -> Self {
        let tokens = (steps * seqs).max(1) as f64;
        let per_step = p.decode_steps.max(1) as f64;
        let device_bytes_per_token = s.device_bytes_read as f64 / tokens;
        let tok_per_s = tokens / seconds;
        let n = steps.max(1) as f64;
        ConfigResult {
            context,
            seqs,
            mode,
            steps,
            seconds,
            tok_per_s,
            p50_ms: hist.value_at_quantile(0.5) as f64 / 1e3,
            p99_ms: hist.value_at_quantile(0.99) as f64 / 1e3,
            device_bytes_per_token,
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
            read_bytes_per_s: device_bytes_per_token * tok_per_s,
            times: StepTimes::new(steps, seconds, profile),
            readahead: (
                profile.readahead_queued as f64 / n,
                profile.readahead_used as f64 / n,
            ),
        }
    }

    /// One line of the figures, for the console.
    pub fn line(&self) -> String {
        let t = &self.times;
        format!(
            "{:>7} ctx {:>2} seq {:>7}: {:>8.2} tok/s  p50 {:>8.1} ms  p99 {:>8.1} ms  dev {:>10.0} B/tok  {:>5.2} GB/s  boundary {:>7.0} B/tok  hit {:>5.1}%  pages/layer {:>6.1}  step ms: dense {:.1} scoring {:.1} estimate {:.1} io-wait {:.1} attention {:.1}",
            self.context,
            self.seqs,
            self.mode.as_str(),
            self.tok_per_s,
            self.p50_ms,
            self.p99_ms,
            self.device_bytes_per_token,
            self.read_bytes_per_s / 1e9,
            self.boundary_bytes_per_token,
            self.cache_hit_rate * 100.0,
            mean(&self.pages_per_layer),
            t.dense_ms,
            t.select_ms,
            t.estimate_ms,
            t.read_wait_ms,
            t.attention_ms,
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
            "read_bytes_per_s": self.read_bytes_per_s,
            "step_ms": {
                "dense": self.times.dense_ms, "scoring": self.times.select_ms,
                "estimate": self.times.estimate_ms, "io_wait": self.times.read_wait_ms,
                "attention": self.times.attention_ms,
            },
            "readahead_per_step": { "queued": self.readahead.0, "used": self.readahead.1 },
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

/// Prefill of one context with the KV going to flash against the same prefill in RAM.
#[derive(Clone, Copy, Debug)]
pub struct PrefillCompare {
    /// Prompt tokens.
    pub context: usize,
    /// Tok/s with the KV in the RAM pool.
    pub ram_tok_per_s: f64,
    /// Tok/s with the KV going to the engine's store.
    pub flash_tok_per_s: f64,
}

/// fio's sequential read bandwidth around the decode runs.
#[derive(Clone, Debug, Default)]
pub struct FioReads {
    /// The job, as a command line.
    pub job: String,
    /// Bytes/s before the decode runs.
    pub before: Option<f64>,
    /// Bytes/s after them.
    pub after: Option<f64>,
}

impl FioReads {
    /// The lower of the two measurements (the drive's speed the run can count on).
    pub fn bytes_per_s(&self) -> Option<f64> {
        match (self.before, self.after) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Everything one run measured.
pub struct Report {
    /// The set-up: model shape, threads, I/O mode, SIMD level, engine settings.
    pub header: Value,
    /// The machine: CPU, SIMD level, the store's disk.
    pub machine: Machine,
    /// KV bytes per token of the model.
    pub kv_per_token: u64,
    /// One entry per (context, sequences, mode).
    pub results: Vec<ConfigResult>,
    /// Per context: seconds its prefill took (0 when restored from the store).
    pub prefill_seconds: Vec<(usize, f64)>,
    /// Prefill to flash against prefill in RAM.
    pub prefill: Vec<PrefillCompare>,
    /// Per context: llama.cpp's decode tok/s with its KV in RAM.
    pub llamacpp: Vec<(usize, f64)>,
    /// fio on the store's filesystem.
    pub fio: FioReads,
}

impl Report {
    /// An empty report of a run of `model` with engine settings `cfg` on `threads` threads,
    /// store I/O mode `io` and `kv_per_token` bytes of KV per token, on `machine`.
    pub fn new(
        model: &Model,
        cfg: &EngineConfig,
        threads: usize,
        io: &str,
        kv_per_token: u64,
        machine: Machine,
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
                    "score_shortlist_blocks": cfg.score_shortlist_blocks,
                    "dense_layers": cfg.dense_layers, "estimate_skipped": cfg.estimate_skipped,
                    "readahead_layers": cfg.readahead_layers,
                    "readahead_bytes": cfg.readahead_bytes, "reader_threads": cfg.reader_threads,
                    "prefill_stage_bytes": cfg.prefill_stage_bytes,
                },
            }),
            machine,
            kv_per_token,
            results: Vec::new(),
            prefill_seconds: Vec::new(),
            prefill: Vec::new(),
            llamacpp: Vec::new(),
            fio: FioReads::default(),
        }
    }

    /// A report read back from its JSON file (to plot it again): the results, llama.cpp's
    /// figures, fio's and the machine.
    pub fn from_json(v: &Value) -> Result<Report> {
        let num = |x: &Value, k: &str| x[k].as_f64().with_context(|| format!("no {k}"));
        let kv_per_token = v["setup"]["kv_bytes_per_token"]
            .as_u64()
            .context("no setup.kv_bytes_per_token")?;
        let machine: Machine =
            serde_json::from_value(v["machine"].clone()).context("the machine")?;
        let mut results = Vec::new();
        for r in v["results"].as_array().context("no results")? {
            let mode: AttentionMode = r["mode"]
                .as_str()
                .context("no mode")?
                .parse()
                .map_err(anyhow::Error::msg)?;
            let ms = |k: &str| r["step_ms"][k].as_f64().unwrap_or(0.0);
            results.push(ConfigResult {
                context: num(r, "context")? as usize,
                seqs: num(r, "sequences")? as usize,
                mode,
                steps: num(r, "steps")? as usize,
                seconds: num(r, "seconds")?,
                tok_per_s: num(r, "tok_per_s")?,
                p50_ms: num(r, "step_ms_p50")?,
                p99_ms: num(r, "step_ms_p99")?,
                device_bytes_per_token: num(r, "device_bytes_per_token")?,
                boundary_bytes_per_token: num(r, "boundary_bytes_per_token")?,
                cache_hit_rate: num(r, "cache_hit_rate")?,
                pages_per_layer: serde_json::from_value(r["pages_per_layer"].clone())?,
                read_bytes_per_s: num(r, "read_bytes_per_s")?,
                times: StepTimes {
                    dense_ms: ms("dense"),
                    select_ms: ms("scoring"),
                    estimate_ms: ms("estimate"),
                    read_wait_ms: ms("io_wait"),
                    attention_ms: ms("attention"),
                },
                readahead: (
                    r["readahead_per_step"]["queued"].as_f64().unwrap_or(0.0),
                    r["readahead_per_step"]["used"].as_f64().unwrap_or(0.0),
                ),
            });
        }
        let pairs = |k: &str| -> Result<Vec<(usize, f64)>> {
            let mut out = Vec::new();
            for x in v[k].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                out.push((num(x, "context")? as usize, num(x, x_key(k))?));
            }
            Ok(out)
        };
        fn x_key(k: &str) -> &'static str {
            if k == "prefill_seconds" {
                "seconds"
            } else {
                "tok_per_s"
            }
        }
        let fio = &v["fio_seq_read"];
        Ok(Report {
            header: v["setup"].clone(),
            machine,
            kv_per_token,
            results,
            prefill_seconds: pairs("prefill_seconds")?,
            prefill: Vec::new(),
            llamacpp: pairs("llamacpp_ram_decode")?,
            fio: FioReads {
                job: fio["job"].as_str().unwrap_or_default().to_string(),
                before: fio["before_bytes_per_s"].as_f64(),
                after: fio["after_bytes_per_s"].as_f64(),
            },
        })
    }

    fn find(&self, ctx: usize, seqs: usize, mode: AttentionMode) -> Option<&ConfigResult> {
        self.results
            .iter()
            .find(|r| r.context == ctx && r.seqs == seqs && r.mode == mode)
    }

    /// Tok/s of a flexgen that reads at fio's bandwidth at `ctx` (the drive's limit).
    fn disk_bound(&self, ctx: usize) -> Option<f64> {
        let per_token = ctx as f64 * self.kv_per_token as f64;
        self.fio.bytes_per_s().map(|bw| bw / per_token)
    }

    /// sparse against flexgen (tok/s and device bytes per token) and against a flexgen at
    /// the drive's limit, per (context, sequences).
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
                    "speedup_vs_disk_bound_flexgen": self.disk_bound(r.context).map(|d| r.tok_per_s / d),
                    "device_bytes_fraction_of_flexgen": r.device_bytes_per_token / f.device_bytes_per_token.max(1.0),
                }));
            }
        }
        out
    }

    /// Per flexgen and full row: its read bandwidth against fio's.
    fn disk_use(&self) -> Vec<Value> {
        let fio = self.fio.bytes_per_s();
        self.results
            .iter()
            .filter(|r| r.mode != AttentionMode::Sparse)
            .map(|r| {
                json!({
                    "context": r.context, "sequences": r.seqs, "mode": r.mode.as_str(),
                    "read_bytes_per_s": r.read_bytes_per_s,
                    "fraction_of_fio": fio.map(|f| r.read_bytes_per_s / f),
                })
            })
            .collect()
    }

    /// Prints the set-up, every result, the baselines' use of the drive, sparse against
    /// flexgen and against llama.cpp, and prefill to flash against RAM.
    pub fn print_summary(&self) {
        let m = &self.machine;
        println!(
            "decode-bench on {} ({} CPUs, {}), store on {} ({}, {})",
            m.cpu_model, m.cpus, m.simd, m.store_device, m.store_fs, m.store_mount
        );
        println!("setup: {}", self.header);
        for r in &self.results {
            println!("{}", r.line());
        }
        match self.fio.bytes_per_s() {
            Some(bw) => println!(
                "fio sequential read ({}): {:.2} GB/s before, {:.2} GB/s after; the lower, {:.2} GB/s, is the drive's limit",
                self.fio.job,
                self.fio.before.unwrap_or(0.0) / 1e9,
                self.fio.after.unwrap_or(0.0) / 1e9,
                bw / 1e9
            ),
            None => println!("fio: not measured"),
        }
        for v in self.disk_use() {
            let frac = v["fraction_of_fio"].as_f64();
            println!(
                "{:>7} at {:>6} ctx, {} seq: reads {:.2} GB/s{}",
                v["mode"].as_str().unwrap_or(""),
                v["context"],
                v["sequences"],
                v["read_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e9,
                frac.map_or(String::new(), |f| format!(", {f:.2} of fio"))
            );
        }
        for v in self.ratios() {
            let disk = v["speedup_vs_disk_bound_flexgen"].as_f64();
            println!(
                "sparse vs flexgen at {:>6} ctx, {} seq: {:.1}x tok/s{}, {:.4} of the device bytes",
                v["context"],
                v["sequences"],
                v["speedup_vs_flexgen"].as_f64().unwrap_or(0.0),
                disk.map_or(String::new(), |d| format!(
                    " ({d:.1}x a flexgen at fio's speed)"
                )),
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
        for p in &self.prefill {
            println!(
                "prefill of {} tokens: {:.1} tok/s with the KV in RAM, {:.1} tok/s with it going to flash ({:.2}x)",
                p.context,
                p.ram_tok_per_s,
                p.flash_tok_per_s,
                p.flash_tok_per_s / p.ram_tok_per_s
            );
        }
    }

    /// Writes the report as pretty JSON to `path` (its folder created if missing).
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let v = json!({
            "machine": self.machine,
            "setup": self.header,
            "fio_seq_read": {
                "job": self.fio.job, "before_bytes_per_s": self.fio.before,
                "after_bytes_per_s": self.fio.after, "used_bytes_per_s": self.fio.bytes_per_s(),
            },
            "prefill_seconds": self.prefill_seconds.iter().map(|(c, s)| json!({"context": c, "seconds": s})).collect::<Vec<_>>(),
            "prefill_flash_vs_ram": self.prefill.iter().map(|p| json!({
                "context": p.context, "ram_tok_per_s": p.ram_tok_per_s,
                "flash_tok_per_s": p.flash_tok_per_s,
            })).collect::<Vec<_>>(),
            "results": self.results.iter().map(ConfigResult::to_json).collect::<Vec<_>>(),
            "baseline_disk_use": self.disk_use(),
            "sparse_vs_flexgen": self.ratios(),
            "llamacpp_ram_decode": self.llamacpp.iter().map(|(c, t)| json!({"context": c, "tok_per_s": t})).collect::<Vec<_>>(),
        });
        crate::files::write_json(path, &v)
    }

    /// The lines of one figure against context: one per mode and sequence count.
    fn mode_lines(&self, f: &dyn Fn(&ConfigResult) -> f64) -> Vec<Line> {
        let mut seqs: Vec<usize> = self.results.iter().map(|r| r.seqs).collect();
        seqs.sort_unstable();
        seqs.dedup();
        let mut lines = Vec::new();
        for mode in AttentionMode::ALL {
            for &n in &seqs {
                let points: Vec<(f64, f64)> = self
                    .results
                    .iter()
                    .filter(|r| r.mode == mode && r.seqs == n)
                    .map(|r| (r.context as f64, f(r)))
                    .collect();
                if !points.is_empty() {
                    lines.push(Line::solid(format!("{} x{}", mode.as_str(), n), points));
                }
            }
        }
        lines
    }

    /// Tok/s (with llama.cpp and the drive-bound flexgen beside ours) and device bytes per
    /// token against context, sparse pages per layer at the largest context, and each
    /// row's step time split into its parts.
    pub fn plot(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        crate::plot::register_font()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut files = Vec::new();
        let mut contexts: Vec<usize> = self.results.iter().map(|r| r.context).collect();
        contexts.extend(self.llamacpp.iter().map(|l| l.0));
        contexts.sort_unstable();
        contexts.dedup();
        let mut speed = self.mode_lines(&|r| r.tok_per_s);
        if !self.llamacpp.is_empty() {
            let points = self.llamacpp.iter().map(|&(c, t)| (c as f64, t)).collect();
            speed.push(Line::solid("llama.cpp x1, KV in RAM".into(), points));
        }
        if self.fio.bytes_per_s().is_some() {
            let points = contexts
                .iter()
                .filter_map(|&c| Some((c as f64, self.disk_bound(c)?)))
                .collect();
            speed.push(Line::dashed("flexgen at fio's read speed".into(), points));
        }
        let p = dir.join("decode-tok-per-s.png");
        let title = "Decode tok/s (all sequences), KV on flash";
        crate::plot::context_lines(&p, title, "tok/s", &contexts, &speed)?;
        files.push(p);
        let bytes = self.mode_lines(&|r| r.device_bytes_per_token.max(1.0));
        let p = dir.join("decode-device-bytes.png");
        let title = "Device bytes read per token";
        crate::plot::context_lines(&p, title, "bytes/token", &contexts, &bytes)?;
        files.push(p);
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
        if !self.results.is_empty() {
            let p = dir.join("decode-step-breakdown.png");
            // Shares of the step, so that a 9-second flexgen step and a 50 ms sparse one
            // read alike; each label carries the step's milliseconds.
            let bars: Vec<Stack> = self
                .results
                .iter()
                .map(|r| {
                    let parts = r.times.parts();
                    let total: f64 = parts.iter().map(|p| p.1).sum::<f64>().max(1e-9);
                    let mode = match r.mode {
                        AttentionMode::Flexgen => "flex",
                        m => m.as_str(),
                    };
                    Stack {
                        label: format!("{}K x{} {mode}|{total:.0} ms", r.context / 1024, r.seqs),
                        parts: parts.iter().map(|p| 100.0 * p.1 / total).collect(),
                    }
                })
                .collect();
            let names: Vec<&str> = StepTimes::default().parts().iter().map(|p| p.0).collect();
            let title =
                "Where a decode step's time goes (share of the step; its length above the bar)";
            crate::plot::stacked_bars(&p, title, "% of the step", &names, &bars)?;
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
