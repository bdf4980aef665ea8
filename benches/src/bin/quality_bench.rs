//! quality-bench: does `sparse` decode attention keep the model's answers? (issue 4)
//!
//! Three measurements, every sequence's KV on flash in csd-engine stores:
//! 1. Passkey retrieval: a random 5-digit key hidden at several depths of long real English
//!    text (by default the license texts under /usr/share/common-licenses), the question after
//!    the text, rendered with the model's chat template; greedy answers of `full` and `sparse`.
//! 2. Greedy agreement of `sparse` with `full` over N decode steps on long excerpts followed by
//!    an instruction: `full` generates greedily, its tokens are fed to the `sparse` sequence
//!    (teacher forcing) and every position where sparse's argmax equals full's token counts.
//!    The first mismatch is where a free-running sparse generation would leave full's, so the
//!    matching prefix of the teacher-forced run is the free-running matching prefix.
//! 3. Per layer, for the sparse sequences: the share of the exact softmax mass the attended
//!    pages held (`measure_recall`), and the pages attended / selected / candidates per step.
//!
//! Several sparse policies can be measured in one run (`--variant`): one engine (and store
//! file) holds the exact reference sequences, one engine per policy its sparse sequences.
//! Prefill attention is exact in every mode, so each prompt is prefilled once: its K/V and
//! queries go to every engine (same pages, summaries and activation statistics), its
//! attention comes from the reference engine. Each policy's engine then clones the prompt into
//! a `sparse` sequence, and the reference and all sparse sequences decode side by side in one
//! batch. Passkey prompts of one text window share their prefix up to the needle: a trunk
//! sequence grows through the text and is cloned at each depth.
//!
//! ```text
//! cargo run --release -p instinfer-benches --bin quality-bench -- --out bench-results/quality.json
//! quality-bench --variant step_budget_blocks=960 --variant score=mean-key
//! ```

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use csd_engine::{EngineConfig, PageScore, PolicyStats};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use instinfer_runtime::chat::{ChatMessage, ChatTemplate};
use instinfer_runtime::fetch;
use instinfer_runtime::kv::{
    AttendReq, AttentionMode, EnginePool, KvError, KvPool, KvShape, SeqId, PAGE_BYTES,
};
use instinfer_runtime::model::{Logits, Model, SeqChunk, Workspace};
use instinfer_runtime::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the default text is searched when no --text is given (plain English prose that
/// Debian-family systems ship).
const DEFAULT_TEXT_DIRS: &[&str] = &["/usr/share/common-licenses"];

#[derive(Parser, Debug)]
#[command(
    name = "quality-bench",
    version,
    about = "Passkey retrieval, greedy agreement and attention-mass recall of sparse vs full attention"
)]
struct Cli {
    /// GGUF model; default: the cached SmolLM2-135M-Instruct.
    #[arg(long, env = "INSTINFER_MODEL")]
    model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Text file or directory of text files to draw the long context from (repeatable).
    /// Default: every file in /usr/share/common-licenses.
    #[arg(long)]
    text: Vec<PathBuf>,
    /// KV store files are this path with ".ref", ".v1", ".v2", ... appended (created,
    /// overwritten, removed at the end unless --keep-store). Put them on a real disk: the
    /// store uses O_DIRECT.
    #[arg(long, default_value = "bench-results/quality-kv.store")]
    store: PathBuf,
    /// Size of each store file.
    #[arg(long, default_value_t = 2 << 30)]
    store_bytes: u64,
    #[arg(long)]
    keep_store: bool,
    /// JSON result file.
    #[arg(long, default_value = "bench-results/quality.json")]
    out: PathBuf,
    /// Seed of the keys and text offsets.
    #[arg(long, default_value_t = 4)]
    seed: u64,
    /// Total passkey lengths in tokens (prompt plus answer budget).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    lengths: Vec<usize>,
    /// Needle depths in percent of the text.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    depths: Vec<u32>,
    /// Passkey trials (text offsets) per length; each depth of a trial gets its own key.
    #[arg(long, default_value_t = 2)]
    trials: usize,
    /// Passkey answer budget in tokens.
    #[arg(long, default_value_t = 12)]
    answer_tokens: usize,
    /// Text put at the start of the assistant's answer in passkey prompts (empty: none).
    #[arg(long, default_value = "")]
    answer_prefix: String,
    /// Total agreement lengths in tokens (prompt plus generated tokens).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    agree_lengths: Vec<usize>,
    /// Agreement prompts per length (alternately "summarize" and "continue").
    #[arg(long, default_value_t = 2)]
    agree_prompts: usize,
    /// Decode steps compared per agreement prompt.
    #[arg(long, default_value_t = 64)]
    agree_tokens: usize,
    #[arg(long)]
    skip_passkey: bool,
    #[arg(long)]
    skip_agreement: bool,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Free-form label stored in the JSON.
    #[arg(long, default_value = "")]
    label: String,
    /// The sparse policy is measured with the settings below ("base"); each --variant adds
    /// another policy, measured on the same prompts in the same run: comma-separated
    /// overrides of the base, e.g. "step_budget_blocks=960,target_mass=0.95" or
    /// "score=mean-key" (keys: target_mass, min_blocks, max_blocks, step_budget_blocks,
    /// sink_blocks, recent_blocks, probe_blend, score, page_cache_bytes, estimate_skipped,
    /// head_top_blocks, quest_runs, dense_layers).
    #[arg(long)]
    variant: Vec<String>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// Engine settings of the base sparse policy; each left out keeps csd-engine's default.
#[derive(clap::Args, Debug)]
struct PolicyArgs {
    /// RAM page cache budget in bytes (per engine).
    #[arg(long)]
    page_cache_bytes: Option<u64>,
    /// Share of each layer's estimated attention mass the selected pages must cover.
    #[arg(long)]
    target_mass: Option<f32>,
    /// Fewest selected pages per layer and step.
    #[arg(long)]
    min_blocks: Option<usize>,
    /// Most selected pages per layer and step.
    #[arg(long)]
    max_blocks: Option<usize>,
    /// Selected pages per decode step over all layers.
    #[arg(long)]
    step_budget_blocks: Option<usize>,
    /// Pages at the start always attended.
    #[arg(long)]
    sink_blocks: Option<usize>,
    /// Most recent full pages always attended.
    #[arg(long)]
    recent_blocks: Option<usize>,
    /// Weight of the prefill probe blended into the query (0..=1).
    #[arg(long)]
    probe_blend: Option<f32>,
    /// Page scoring.
    #[arg(long, value_enum)]
    score: Option<ScoreArg>,
    /// Estimate the skipped pages from their summaries (true/false).
    #[arg(long)]
    estimate_skipped: Option<bool>,
    /// Do not measure attention-mass recall (it reads every page a sparse step skipped).
    #[arg(long)]
    no_recall: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScoreArg {
    Quest,
    MeanKey,
    Sketch,
}

impl PolicyArgs {
    fn engine_config(&self) -> EngineConfig {
        let d = EngineConfig::default();
        EngineConfig {
            cache_bytes: self.page_cache_bytes.unwrap_or(d.cache_bytes),
            sink_blocks: self.sink_blocks.unwrap_or(d.sink_blocks),
            recent_blocks: self.recent_blocks.unwrap_or(d.recent_blocks),
            min_blocks: self.min_blocks.unwrap_or(d.min_blocks),
            max_blocks: self.max_blocks.unwrap_or(d.max_blocks),
            target_mass: self.target_mass.unwrap_or(d.target_mass),
            step_budget_blocks: self.step_budget_blocks.unwrap_or(d.step_budget_blocks),
            probe_blend: self.probe_blend.unwrap_or(d.probe_blend),
            score: match self.score {
                None => d.score,
                Some(ScoreArg::Quest) => PageScore::Quest,
                Some(ScoreArg::MeanKey) => PageScore::MeanKey,
                Some(ScoreArg::Sketch) => PageScore::Sketch,
            },
            measure_recall: !self.no_recall,
            estimate_skipped: self.estimate_skipped.unwrap_or(d.estimate_skipped),
            ..d
        }
    }
}

/// A sparse policy under test.
struct Variant {
    name: String,
    cfg: EngineConfig,
}

/// Apply "key=value,key=value" overrides to `base`.
fn parse_variant(spec: &str, base: &EngineConfig) -> Result<Variant> {
    let mut cfg = *base;
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("variant {spec:?}: {item:?} is not key=value"))?;
        let key = key.trim().replace('-', "_");
        let value = value.trim();
        let bad = || format!("variant {spec:?}: bad value {value:?} for {key}");
        match key.as_str() {
            "target_mass" => cfg.target_mass = value.parse().with_context(bad)?,
            "min_blocks" => cfg.min_blocks = value.parse().with_context(bad)?,
            "max_blocks" => cfg.max_blocks = value.parse().with_context(bad)?,
            "step_budget_blocks" => cfg.step_budget_blocks = value.parse().with_context(bad)?,
            "sink_blocks" => cfg.sink_blocks = value.parse().with_context(bad)?,
            "recent_blocks" => cfg.recent_blocks = value.parse().with_context(bad)?,
            "probe_blend" => cfg.probe_blend = value.parse().with_context(bad)?,
            "page_cache_bytes" => cfg.cache_bytes = value.parse().with_context(bad)?,
            "estimate_skipped" => cfg.estimate_skipped = value.parse().with_context(bad)?,
            "head_top_blocks" => cfg.head_top_blocks = value.parse().with_context(bad)?,
            "quest_runs" => cfg.quest_runs = value.parse().with_context(bad)?,
            "dense_layers" => cfg.dense_layers = value.parse().with_context(bad)?,
            "score" => {
                cfg.score = value
                    .parse()
                    .map_err(|e| anyhow::anyhow!("variant {spec:?}: {e}"))?
            }
            other => bail!("variant {spec:?}: unknown setting {other:?}"),
        }
    }
    Ok(Variant {
        name: spec.trim().to_string(),
        cfg,
    })
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("quality-bench: error: {e:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Text
// ---------------------------------------------------------------------------------------------

/// Long text as sentence-sized units of token ids.
struct Corpus {
    /// File names the text came from (names only).
    sources: Vec<String>,
    words: usize,
    units: Vec<Vec<u32>>,
    tokens: usize,
}

/// Files named by --text (directories expanded), or the default search.
fn text_files(given: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let roots: Vec<PathBuf> = if given.is_empty() {
        DEFAULT_TEXT_DIRS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .collect()
    } else {
        given.to_vec()
    };
    if roots.is_empty() {
        bail!(
            "no long English text found (searched {}); pass --text FILE or --text DIR",
            DEFAULT_TEXT_DIRS.join(", ")
        );
    }
    let mut files = Vec::new();
    for r in roots {
        let meta = std::fs::metadata(&r).with_context(|| format!("reading {}", r.display()))?;
        if meta.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&r)
                .with_context(|| format!("listing {}", r.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            entries.sort();
            files.extend(entries);
        } else {
            files.push(r);
        }
    }
    // Links (GPL -> GPL-3) name a text already taken: keep each real file once.
    let mut out: Vec<PathBuf> = Vec::new();
    for f in files {
        let canon =
            std::fs::canonicalize(&f).with_context(|| format!("resolving {}", f.display()))?;
        if !out.contains(&canon) {
            out.push(canon);
        }
    }
    Ok(out)
}

/// Split text into paragraphs (blank-line separated), whitespace collapsed, then into
/// sentences. Each unit carries its leading separator: "\n" before a paragraph, " " before
/// any other sentence.
fn sentence_units(text: &str) -> Vec<String> {
    let mut units = Vec::new();
    let mut para = String::new();
    let flush = |para: &mut String, units: &mut Vec<String>| {
        let joined = para.split_whitespace().collect::<Vec<_>>().join(" ");
        para.clear();
        if joined.is_empty() {
            return;
        }
        let mut first = true;
        let mut start = 0;
        let bytes = joined.as_bytes();
        for i in 0..bytes.len() {
            let end_of_sentence =
                matches!(bytes[i], b'.' | b'?' | b'!' | b';') && bytes.get(i + 1) == Some(&b' ');
            if end_of_sentence || i + 1 == bytes.len() {
                let s = joined[start..=i].trim();
                if !s.is_empty() {
                    units.push(format!("{}{s}", if first { "\n" } else { " " }));
                    first = false;
                }
                start = i + 1;
            }
        }
    };
    for line in text.lines() {
        if line
            .trim_matches(|c: char| c.is_whitespace() || c == '\u{c}')
            .is_empty()
        {
            flush(&mut para, &mut units);
        } else {
            para.push_str(line);
            para.push(' ');
        }
    }
    flush(&mut para, &mut units);
    units
}

impl Corpus {
    fn load(files: &[PathBuf], tok: &Tokenizer) -> Result<Corpus> {
        let mut sources = Vec::new();
        let mut words = 0;
        let mut units = Vec::new();
        let mut tokens = 0;
        for f in files {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            let text = String::from_utf8_lossy(&bytes).replace('\u{c}', "\n");
            words += text.split_whitespace().count();
            for u in sentence_units(&text) {
                let ids = tok
                    .encode_raw(&u, false)
                    .with_context(|| format!("tokenizing text of {}", f.display()))?;
                tokens += ids.len();
                units.push(ids);
            }
            sources.push(
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        ensure!(!units.is_empty(), "the text files hold no text");
        Ok(Corpus {
            sources,
            words,
            units,
            tokens,
        })
    }

    /// Exactly `budget` tokens of consecutive units from unit `start` on (wrapping around);
    /// the last unit is cut to fit.
    fn window(&self, start: usize, budget: usize) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        let mut left = budget;
        let mut i = start % self.units.len();
        while left > 0 {
            let u = &self.units[i];
            let take = u.len().min(left);
            if take > 0 {
                out.push(u[..take].to_vec());
                left -= take;
            }
            i = (i + 1) % self.units.len();
        }
        out
    }
}

/// Prompt parts around the text: `prefix` (chat template opening and intro, BOS as the model
/// wants) and `suffix` (instruction, template closing, assistant opening).
struct Frame {
    prefix: Vec<u32>,
    suffix: Vec<u32>,
}

fn frame(
    tok: &Tokenizer,
    template: &ChatTemplate,
    intro: &str,
    outro: &str,
    answer_prefix: &str,
) -> Result<Frame> {
    const MARK: &str = "QUALITYBENCHTEXTMARK";
    let rendered = template
        .render(&[ChatMessage::user(MARK)], true)
        .context("rendering the chat template")?;
    let (before, after) = rendered
        .split_once(MARK)
        .context("the chat template dropped the message text")?;
    let prefix = tok
        .encode(&format!("{before}{intro}"), true)
        .context("tokenizing the prompt opening")?;
    let suffix = tok
        .encode_raw(&format!("{outro}{after}{answer_prefix}"), true)
        .context("tokenizing the prompt closing")?;
    Ok(Frame { prefix, suffix })
}

// ---------------------------------------------------------------------------------------------
// Engines
// ---------------------------------------------------------------------------------------------

/// Which engines hold a sequence.
#[derive(Clone, Copy, Debug)]
enum Owner {
    /// Every engine (a prompt being prefilled); the reference engine attends.
    All,
    /// One engine.
    One(usize),
}

/// The reference engine (index 0: exact `full` sequences) and one engine per sparse policy,
/// seen by the model as one [`KvPool`]. Appends go to every engine holding the sequence;
/// attention comes from one of them.
struct Engines {
    pools: Vec<EnginePool>,
    owner: HashMap<SeqId, Owner>,
}

impl Engines {
    fn owner(&self, seq: SeqId) -> Result<Owner, KvError> {
        self.owner
            .get(&seq)
            .copied()
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn holders(&self, seq: SeqId) -> Vec<usize> {
        match self.owner.get(&seq) {
            Some(Owner::All) => (0..self.pools.len()).collect(),
            Some(Owner::One(i)) => vec![*i],
            None => Vec::new(),
        }
    }

    /// The engine whose attention a sequence uses.
    fn attender(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(match self.owner(seq)? {
            Owner::All => 0,
            Owner::One(i) => i,
        })
    }

    /// Copy `src` (held by all) to a new `dst` held by all, in `mode`.
    fn clone_all(&mut self, src: SeqId, dst: SeqId, mode: AttentionMode) -> Result<()> {
        for (i, p) in self.pools.iter_mut().enumerate() {
            if let Err(e) = p.engine().clone_seq(src, dst, mode) {
                for q in &mut self.pools[..i] {
                    q.release(dst);
                }
                return Err(e).with_context(|| format!("cloning sequence {src} into {dst}"));
            }
        }
        self.owner.insert(dst, Owner::All);
        Ok(())
    }

    /// Copy engine `i`'s copy of `src` to a new `dst` held by engine `i` only.
    fn clone_into(&mut self, src: SeqId, dst: SeqId, i: usize, mode: AttentionMode) -> Result<()> {
        self.pools[i]
            .engine()
            .clone_seq(src, dst, mode)
            .with_context(|| format!("cloning sequence {src} into {dst} in engine {i}"))?;
        self.owner.insert(dst, Owner::One(i));
        Ok(())
    }

    /// Keep `seq` in engine `i` only.
    fn narrow(&mut self, seq: SeqId, i: usize) {
        for (j, p) in self.pools.iter_mut().enumerate() {
            if j != i {
                p.release(seq);
            }
        }
        self.owner.insert(seq, Owner::One(i));
    }

    fn stats(&self, seq: SeqId) -> Result<PolicyStats> {
        let i = self.attender(seq)?;
        self.pools[i]
            .engine_ref()
            .seq_policy_stats(seq)
            .cloned()
            .with_context(|| format!("no counters for sequence {seq}"))
    }
}

impl KvPool for Engines {
    fn shape(&self) -> KvShape {
        self.pools[0].shape()
    }

    fn open(&mut self, seq: SeqId, mode: AttentionMode, capacity: usize) -> Result<(), KvError> {
        for i in 0..self.pools.len() {
            if let Err(e) = self.pools[i].open(seq, mode, capacity) {
                for p in &mut self.pools[..i] {
                    p.release(seq);
                }
                return Err(e);
            }
        }
        self.owner.insert(seq, Owner::All);
        Ok(())
    }

    fn release(&mut self, seq: SeqId) {
        for i in self.holders(seq) {
            self.pools[i].release(seq);
        }
        self.owner.remove(&seq);
    }

    fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        self.pools[self.attender(seq)?].len(seq)
    }

    fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        self.pools[self.attender(seq)?].capacity(seq)
    }

    fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        let holders = self.holders(seq);
        if holders.is_empty() {
            return Err(KvError::UnknownSequence(seq));
        }
        for i in holders {
            self.pools[i].append(seq, layer, k, v, q)?;
        }
        Ok(())
    }

    fn attend(&mut self, layer: usize, items: &mut [AttendReq<'_>]) -> Vec<Result<(), KvError>> {
        let mut results: Vec<Result<(), KvError>> = (0..items.len()).map(|_| Ok(())).collect();
        let mut groups: Vec<Vec<(usize, AttendReq<'_>)>> =
            (0..self.pools.len()).map(|_| Vec::new()).collect();
        for (idx, it) in items.iter_mut().enumerate() {
            match self.attender(it.seq) {
                Ok(p) => groups[p].push((
                    idx,
                    AttendReq {
                        seq: it.seq,
                        q: it.q,
                        first_pos: it.first_pos,
                        out: &mut *it.out,
                    },
                )),
                Err(e) => results[idx] = Err(e),
            }
        }
        for (p, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            let (idxs, mut batch): (Vec<usize>, Vec<AttendReq<'_>>) = group.into_iter().unzip();
            for (idx, r) in idxs
                .into_iter()
                .zip(self.pools[p].attend(layer, &mut batch))
            {
                results[idx] = r;
            }
        }
        results
    }

    fn truncate(&mut self, seq: SeqId, len: usize) {
        for i in self.holders(seq) {
            self.pools[i].truncate(seq, len);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running sequences
// ---------------------------------------------------------------------------------------------

struct Bench<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    eng: Engines,
    /// Sparse policies; variant `v` lives in engine `v + 1`.
    variants: usize,
    ws: Workspace,
    next_seq: SeqId,
    chunk: usize,
    pb: ProgressBar,
    prefill_tokens: usize,
    prefill_secs: f64,
    decode_steps: usize,
    decode_secs: f64,
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

impl Bench<'_> {
    /// A result line on stdout, around the progress bar (shown or not).
    fn say(&self, line: String) {
        self.pb.suspend(|| println!("{line}"));
    }

    fn fresh(&mut self) -> SeqId {
        self.next_seq += 1;
        self.next_seq
    }

    /// A new exact sequence held by every engine.
    fn open_all(&mut self) -> Result<SeqId> {
        let seq = self.fresh();
        let ctx = self.model.config.context_len;
        self.eng
            .open(seq, AttentionMode::Full, ctx)
            .with_context(|| format!("opening sequence {seq}"))?;
        Ok(seq)
    }

    /// A copy of `src` (held by every engine) held by every engine.
    fn branch(&mut self, src: SeqId) -> Result<SeqId> {
        let dst = self.fresh();
        self.eng.clone_all(src, dst, AttentionMode::Full)?;
        Ok(dst)
    }

    /// Turn a prefilled prompt `seq` (held by every engine) into the decode set: `seq` itself
    /// as the exact reference (reference engine only), and one sparse copy per policy.
    fn split(&mut self, seq: SeqId) -> Result<Vec<SeqId>> {
        let mut set = vec![seq];
        for v in 0..self.variants {
            let dst = self.fresh();
            self.eng
                .clone_into(seq, dst, v + 1, AttentionMode::Sparse)?;
            set.push(dst);
        }
        self.eng.narrow(seq, 0);
        Ok(set)
    }

    fn release(&mut self, seq: SeqId) {
        self.eng.release(seq);
    }

    /// Prefill `tokens` into `seq` in chunks; returns the last position's argmax.
    fn prefill(&mut self, seq: SeqId, tokens: &[u32]) -> Result<u32> {
        ensure!(!tokens.is_empty(), "empty prefill");
        let t0 = Instant::now();
        let n_chunks = tokens.len().div_ceil(self.chunk);
        let vocab = self.model.config.vocab_size;
        let mut last = 0;
        for (i, part) in tokens.chunks(self.chunk).enumerate() {
            let logits = if i + 1 == n_chunks {
                Logits::Last
            } else {
                Logits::None
            };
            let chunk = SeqChunk {
                seq,
                tokens: part,
                logits,
            };
            let r = self
                .model
                .forward_batch(&mut self.eng, &[chunk], &mut self.ws)
                .pop()
                .context("no result for the prefill chunk")?
                .with_context(|| format!("prefill of sequence {seq}"))?;
            if logits == Logits::Last {
                let row = r.end - 1;
                last = argmax(&self.ws.logits[row * vocab..(row + 1) * vocab]);
            }
            self.pb.inc(part.len() as u64);
        }
        self.prefill_tokens += tokens.len();
        self.prefill_secs += t0.elapsed().as_secs_f64();
        Ok(last)
    }

    /// One decode step for several sequences in one batch; the argmax of each.
    fn step(&mut self, items: &[(SeqId, u32)]) -> Result<Vec<u32>> {
        let t0 = Instant::now();
        let chunks: Vec<SeqChunk<'_>> = items
            .iter()
            .map(|(seq, t)| SeqChunk {
                seq: *seq,
                tokens: std::slice::from_ref(t),
                logits: Logits::Last,
            })
            .collect();
        let vocab = self.model.config.vocab_size;
        let results = self
            .model
            .forward_batch(&mut self.eng, &chunks, &mut self.ws);
        let mut out = Vec::with_capacity(items.len());
        for ((seq, _), r) in items.iter().zip(results) {
            let r = r.with_context(|| format!("decode step of sequence {seq}"))?;
            out.push(argmax(
                &self.ws.logits[r.start * vocab..(r.start + 1) * vocab],
            ));
        }
        self.decode_steps += 1;
        self.decode_secs += t0.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// Mean over layers of a run's attention-mass recall.
fn mean_recall(st: &PolicyStats) -> Option<f64> {
    mean_per_layer(&st.recall_sum, &st.recall_count)
}

/// "layer:missed/sharp" for the layers where a head's heaviest block was skipped.
fn sharp_missed(st: &PolicyStats) -> String {
    let parts: Vec<String> = st
        .sharp_heads
        .iter()
        .zip(&st.sharp_missed)
        .enumerate()
        .filter(|(_, (_, &m))| m > 0)
        .map(|(l, (h, m))| format!("{l}:{m}/{h}"))
        .collect();
    format!(
        "{} found quest/mean top1 {}/{} top4 {}/{} top16 {}/{} of {}",
        parts.join(","),
        st.sharp_found[0],
        st.sharp_found[3],
        st.sharp_found[1],
        st.sharp_found[4],
        st.sharp_found[2],
        st.sharp_found[5],
        st.sharp_heads.iter().sum::<u64>()
    )
}

/// Mean over layers of the relative error of the attention output.
fn mean_error(st: &PolicyStats) -> Option<f64> {
    mean_per_layer(&st.output_error_sum, &st.recall_count)
}

/// Mean over layers of the recall an oracle choosing as many pages would reach.
fn mean_oracle(st: &PolicyStats) -> Option<f64> {
    mean_per_layer(&st.oracle_recall_sum, &st.recall_count)
}

/// Per layer, `sum / count` where anything was counted.
fn per_layer(sum: &[f64], count: &[u64]) -> Vec<Option<f64>> {
    sum.iter()
        .zip(count)
        .map(|(&s, &c)| (c > 0).then(|| s / c as f64))
        .collect()
}

/// Mean over the layers where anything was counted of `sum / count`.
fn mean_per_layer(sum: &[f64], count: &[u64]) -> Option<f64> {
    let v: Vec<f64> = per_layer(sum, count).into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

// ---------------------------------------------------------------------------------------------
// Per-layer counters
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct LayerAgg {
    runs: usize,
    steps: u64,
    attended: Vec<u64>,
    selected: Vec<u64>,
    candidates: Vec<u64>,
    recall_sum: Vec<f64>,
    oracle_sum: Vec<f64>,
    recall_count: Vec<u64>,
    max_step_selected: u64,
}

impl LayerAgg {
    fn add(&mut self, s: &PolicyStats) {
        let layers = s.attended_blocks.len();
        if self.attended.is_empty() {
            self.attended = vec![0; layers];
            self.selected = vec![0; layers];
            self.candidates = vec![0; layers];
            self.recall_sum = vec![0.0; layers];
            self.oracle_sum = vec![0.0; layers];
            self.recall_count = vec![0; layers];
        }
        self.runs += 1;
        self.steps += s.decode_steps;
        self.max_step_selected = self.max_step_selected.max(s.max_step_selected);
        for l in 0..layers {
            self.attended[l] += s.attended_blocks[l];
            self.selected[l] += s.selected_blocks[l];
            self.candidates[l] += s.candidate_blocks[l];
            self.recall_sum[l] += s.recall_sum.get(l).copied().unwrap_or(0.0);
            self.oracle_sum[l] += s.oracle_recall_sum.get(l).copied().unwrap_or(0.0);
            self.recall_count[l] += s.recall_count.get(l).copied().unwrap_or(0);
        }
    }

    fn merge(&mut self, o: &LayerAgg) {
        if self.attended.is_empty() {
            *self = o.clone();
            return;
        }
        self.runs += o.runs;
        self.steps += o.steps;
        self.max_step_selected = self.max_step_selected.max(o.max_step_selected);
        for l in 0..self.attended.len().min(o.attended.len()) {
            self.attended[l] += o.attended[l];
            self.selected[l] += o.selected[l];
            self.candidates[l] += o.candidates[l];
            self.recall_sum[l] += o.recall_sum[l];
            self.oracle_sum[l] += o.oracle_sum[l];
            self.recall_count[l] += o.recall_count[l];
        }
    }

    fn report(&self) -> LayerReport {
        let per_step = |v: &[u64]| -> Vec<f64> {
            v.iter()
                .map(|&x| x as f64 / self.steps.max(1) as f64)
                .collect()
        };
        let recall = per_layer(&self.recall_sum, &self.recall_count);
        let oracle = per_layer(&self.oracle_sum, &self.recall_count);
        let mean_recall = mean_per_layer(&self.recall_sum, &self.recall_count);
        let mean_oracle = mean_per_layer(&self.oracle_sum, &self.recall_count);
        let min_recall = recall.iter().flatten().copied().reduce(f64::min);
        let attended = per_step(&self.attended);
        let selected = per_step(&self.selected);
        let candidates = per_step(&self.candidates);
        let spread = |v: &[f64]| -> Spread {
            let (mut lo, mut hi) = (0, 0);
            for i in 0..v.len() {
                if v[i] < v[lo] {
                    lo = i;
                }
                if v[i] > v[hi] {
                    hi = i;
                }
            }
            let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len().max(1) as f64;
            Spread {
                min: v.get(lo).copied().unwrap_or(0.0),
                min_layer: lo,
                max: v.get(hi).copied().unwrap_or(0.0),
                max_layer: hi,
                mean,
                cv: if mean > 0.0 { var.sqrt() / mean } else { 0.0 },
            }
        };
        LayerReport {
            runs: self.runs,
            decode_steps: self.steps,
            mean_recall,
            mean_oracle_recall: mean_oracle,
            min_layer_recall: min_recall,
            selected_spread: spread(&selected),
            attended_spread: spread(&attended),
            counts_vary_across_layers: spread(&selected).max - spread(&selected).min >= 1.0,
            max_step_selected: self.max_step_selected,
            recall,
            oracle_recall: oracle,
            attended_per_step: attended,
            selected_per_step: selected,
            candidates_per_step: candidates,
        }
    }
}

#[derive(Serialize, Clone, Copy)]
struct Spread {
    min: f64,
    min_layer: usize,
    max: f64,
    max_layer: usize,
    mean: f64,
    /// Coefficient of variation over layers.
    cv: f64,
}

#[derive(Serialize)]
struct LayerReport {
    runs: usize,
    decode_steps: u64,
    mean_recall: Option<f64>,
    /// The recall of an oracle choosing as many candidate pages by their exact mass.
    mean_oracle_recall: Option<f64>,
    min_layer_recall: Option<f64>,
    selected_spread: Spread,
    attended_spread: Spread,
    /// Whether the per-layer mean selected pages differ by at least one page between layers.
    counts_vary_across_layers: bool,
    max_step_selected: u64,
    recall: Vec<Option<f64>>,
    oracle_recall: Vec<Option<f64>>,
    attended_per_step: Vec<f64>,
    selected_per_step: Vec<f64>,
    candidates_per_step: Vec<f64>,
}

// ---------------------------------------------------------------------------------------------
// Passkey
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct SparseAnswer {
    variant: String,
    answer: String,
    correct: bool,
    same_as_full: bool,
    /// Mean over layers of this run's attention-mass recall.
    recall: Option<f64>,
    /// What an oracle choosing as many pages by their exact mass would have held.
    oracle_recall: Option<f64>,
    /// Relative error of the attention outputs against exact attention, mean over layers.
    output_error: Option<f64>,
    /// Per layer with any: "layer:missed/sharp" for heads whose heaviest block held >= 20%.
    sharp_missed: String,
}

#[derive(Serialize)]
struct PasskeyTrial {
    length: usize,
    trial: usize,
    depth_pct: u32,
    /// Where the needle actually starts, as a share of the text (sentence boundaries).
    actual_depth: f64,
    text_start_unit: usize,
    key: String,
    prompt_tokens: usize,
    full_answer: String,
    full_correct: bool,
    sparse: Vec<SparseAnswer>,
}

#[derive(Serialize)]
struct VariantScore {
    variant: String,
    correct: usize,
    accuracy: f64,
    /// Trials where the sparse answer is the same text as full's.
    same_answer: usize,
}

#[derive(Serialize)]
struct PasskeyLength {
    length: usize,
    trials: usize,
    full_correct: usize,
    full_accuracy: f64,
    sparse: Vec<VariantScore>,
}

const PASSKEY_INTRO: &str = "There is a pass key hidden inside a lot of irrelevant text below. Find it and memorize it. I will ask you what the pass key is.\n";
const PASSKEY_QUESTION: &str = "\n\nWhat is the pass key? Answer with the five-digit number only.";

fn needle(key: &str) -> String {
    format!(" The pass key is {key}. Remember it. {key} is the pass key.")
}

/// Generate up to `max` tokens from `first` on every sequence of `seqs` side by side
/// (greedy; each stops at an end-of-generation token). Returns each one's ids.
fn answers(b: &mut Bench<'_>, seqs: &[SeqId], first: u32, max: usize) -> Result<Vec<Vec<u32>>> {
    let n = seqs.len();
    let mut outs = vec![Vec::new(); n];
    let mut live = vec![true; n];
    let mut next = vec![first; n];
    loop {
        for i in 0..n {
            if live[i] {
                if b.tok.is_eog(next[i]) {
                    live[i] = false;
                } else {
                    outs[i].push(next[i]);
                    live[i] = outs[i].len() < max;
                }
            }
        }
        let idx: Vec<usize> = (0..n).filter(|&i| live[i]).collect();
        if idx.is_empty() {
            return Ok(outs);
        }
        let items: Vec<(SeqId, u32)> = idx.iter().map(|&i| (seqs[i], next[i])).collect();
        let got = b.step(&items)?;
        for (&i, t) in idx.iter().zip(got) {
            next[i] = t;
        }
    }
}

fn show(s: &str) -> String {
    s.trim().replace('\n', "⏎")
}

fn passkey(
    b: &mut Bench<'_>,
    cli: &Cli,
    corpus: &Corpus,
    frame: &Frame,
    names: &[String],
    rng: &mut StdRng,
    agg: &mut [Vec<(usize, LayerAgg)>],
) -> Result<Vec<PasskeyTrial>> {
    let mut depths = cli.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    let mut out = Vec::new();
    for &length in &cli.lengths {
        let mut laggs = vec![LayerAgg::default(); names.len()];
        for trial in 0..cli.trials {
            let keys: Vec<String> = depths
                .iter()
                .map(|_| rng.random_range(10000u32..=99999).to_string())
                .collect();
            let needles: Vec<Vec<u32>> = keys
                .iter()
                .map(|k| b.tok.encode_raw(&needle(k), false))
                .collect::<Result<_, _>>()
                .context("tokenizing the needle")?;
            let needle_max = needles.iter().map(Vec::len).max().unwrap_or(0);
            let fixed = frame.prefix.len() + frame.suffix.len() + needle_max + cli.answer_tokens;
            ensure!(
                length > fixed + 64,
                "passkey length {length} leaves no room for text ({fixed} tokens of frame, needle and answer)"
            );
            let text_tokens = length - fixed;
            let start = rng.random_range(0..corpus.units.len());
            let window = corpus.window(start, text_tokens);
            // Unit boundaries: cumulative token offsets.
            let mut bounds = vec![0usize];
            for u in &window {
                bounds.push(bounds.last().unwrap() + u.len());
            }
            let insert_at: Vec<usize> = depths
                .iter()
                .map(|&d| {
                    let target = text_tokens as f64 * d as f64 / 100.0;
                    (0..bounds.len())
                        .min_by(|&a, &c| {
                            (bounds[a] as f64 - target)
                                .abs()
                                .total_cmp(&(bounds[c] as f64 - target).abs())
                        })
                        .unwrap_or(0)
                })
                .collect();
            b.pb.set_message(format!("passkey {length} trial {}", trial + 1));
            let trunk = b.open_all()?;
            b.prefill(trunk, &frame.prefix)?;
            let mut trunk_units = 0;
            for (di, &d) in depths.iter().enumerate() {
                let at = insert_at[di];
                let grow: Vec<u32> = window[trunk_units..at].concat();
                if !grow.is_empty() {
                    b.prefill(trunk, &grow)?;
                }
                trunk_units = at;
                let branch = b.branch(trunk)?;
                let mut rest = needles[di].clone();
                rest.extend(window[at..].concat());
                rest.extend_from_slice(&frame.suffix);
                let prompt_tokens = frame.prefix.len() + bounds[at] + rest.len();
                let first = b.prefill(branch, &rest)?;
                let set = b.split(branch)?;
                let ids = answers(b, &set, first, cli.answer_tokens)?;
                let key = &keys[di];
                let texts: Vec<String> = ids.iter().map(|a| b.tok.decode(a)).collect();
                let mut sparse = Vec::new();
                for (v, name) in names.iter().enumerate() {
                    let st = b.eng.stats(set[v + 1])?;
                    laggs[v].add(&st);
                    sparse.push(SparseAnswer {
                        variant: name.clone(),
                        answer: format!("{}{}", cli.answer_prefix, texts[v + 1]),
                        correct: texts[v + 1].contains(key.as_str()),
                        same_as_full: ids[v + 1] == ids[0],
                        recall: mean_recall(&st),
                        oracle_recall: mean_oracle(&st),
                        output_error: mean_error(&st),
                        sharp_missed: sharp_missed(&st),
                    });
                }
                for &s in &set {
                    b.release(s);
                }
                let t = PasskeyTrial {
                    length,
                    trial,
                    depth_pct: d,
                    actual_depth: bounds[at] as f64 / text_tokens as f64,
                    text_start_unit: start,
                    key: key.clone(),
                    prompt_tokens,
                    full_answer: format!("{}{}", cli.answer_prefix, texts[0]),
                    full_correct: texts[0].contains(key.as_str()),
                    sparse,
                };
                let mark = |ok: bool| if ok { "ok  " } else { "MISS" };
                let mut line = format!(
                    "passkey {length:>5} trial {} depth {d:>3}% key {key}: full {} {:?}",
                    trial + 1,
                    mark(t.full_correct),
                    show(&t.full_answer),
                );
                for s in &t.sparse {
                    line.push_str(&format!(
                        " | {} {} {:?}{}",
                        s.variant,
                        mark(s.correct),
                        show(&s.answer),
                        s.recall
                            .zip(s.oracle_recall)
                            .zip(s.output_error)
                            .map(|((r, o), e)| {
                                format!(" recall {r:.3} (oracle {o:.3}) err {e:.3}")
                            })
                            .map(|x| format!("{x} sharp missed {}", s.sharp_missed))
                            .unwrap_or_default()
                    ));
                }
                b.say(line);
                out.push(t);
            }
            b.release(trunk);
        }
        for (v, l) in laggs.into_iter().enumerate() {
            agg[v].push((length, l));
        }
    }
    Ok(out)
}

fn passkey_summary(
    trials: &[PasskeyTrial],
    lengths: &[usize],
    names: &[String],
) -> Vec<PasskeyLength> {
    lengths
        .iter()
        .map(|&length| {
            let t: Vec<&PasskeyTrial> = trials.iter().filter(|t| t.length == length).collect();
            let n = t.len();
            let f = t.iter().filter(|t| t.full_correct).count();
            let sparse = names
                .iter()
                .enumerate()
                .map(|(v, name)| {
                    let c = t.iter().filter(|t| t.sparse[v].correct).count();
                    VariantScore {
                        variant: name.clone(),
                        correct: c,
                        accuracy: c as f64 / n.max(1) as f64,
                        same_answer: t.iter().filter(|t| t.sparse[v].same_as_full).count(),
                    }
                })
                .collect();
            PasskeyLength {
                length,
                trials: n,
                full_correct: f,
                full_accuracy: f as f64 / n.max(1) as f64,
                sparse,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Agreement
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct SparseAgreement {
    variant: String,
    /// Teacher-forced: positions where sparse's argmax equals full's token.
    matches: usize,
    agreement: f64,
    /// Free-running: decode steps before the first mismatch.
    matching_prefix: usize,
    /// Mean over layers of this run's attention-mass recall.
    recall: Option<f64>,
    /// What an oracle choosing as many pages by their exact mass would have held.
    oracle_recall: Option<f64>,
    /// Relative error of the attention outputs against exact attention, mean over layers.
    output_error: Option<f64>,
}

#[derive(Serialize)]
struct AgreementRun {
    length: usize,
    prompt: usize,
    instruction: &'static str,
    text_start_unit: usize,
    prompt_tokens: usize,
    /// Decode steps compared (the first generated token comes from the exact prefill).
    steps: usize,
    /// Position (in full's generated tokens) of its first end-of-generation token, if any.
    full_first_eog: Option<usize>,
    full_text: String,
    sparse: Vec<SparseAgreement>,
}

const AGREE_INSTRUCTIONS: [(&str, &str); 2] = [
    ("summarize", "\n\nSummarize the text above in detail."),
    ("continue", "\n\nContinue the text above."),
];

fn agreement(
    b: &mut Bench<'_>,
    cli: &Cli,
    corpus: &Corpus,
    template: &ChatTemplate,
    names: &[String],
    rng: &mut StdRng,
    agg: &mut [Vec<(usize, LayerAgg)>],
) -> Result<Vec<AgreementRun>> {
    let frames: Vec<Frame> = AGREE_INSTRUCTIONS
        .iter()
        .map(|(_, outro)| frame(b.tok, template, "Read the following text.\n", outro, ""))
        .collect::<Result<_>>()?;
    let n = cli.agree_tokens;
    let mut out = Vec::new();
    for &length in &cli.agree_lengths {
        let mut laggs = vec![LayerAgg::default(); names.len()];
        for p in 0..cli.agree_prompts {
            let which = p % AGREE_INSTRUCTIONS.len();
            let fr = &frames[which];
            let fixed = fr.prefix.len() + fr.suffix.len() + n + 1;
            ensure!(
                length > fixed + 64,
                "agreement length {length} leaves no room for text"
            );
            let start = rng.random_range(0..corpus.units.len());
            let mut prompt = fr.prefix.clone();
            prompt.extend(corpus.window(start, length - fixed).concat());
            prompt.extend_from_slice(&fr.suffix);
            b.pb.set_message(format!("agreement {length} prompt {}", p + 1));
            let full = b.open_all()?;
            let first = b.prefill(full, &prompt)?;
            let set = b.split(full)?;
            let mut full_ids = vec![first];
            let mut matches = vec![0usize; names.len()];
            let mut prefix: Vec<Option<usize>> = vec![None; names.len()];
            for j in 0..n {
                let t = full_ids[j];
                let items: Vec<(SeqId, u32)> = set.iter().map(|&s| (s, t)).collect();
                let got = b.step(&items)?;
                for v in 0..names.len() {
                    if got[v + 1] == got[0] {
                        matches[v] += 1;
                    } else if prefix[v].is_none() {
                        prefix[v] = Some(j);
                    }
                }
                full_ids.push(got[0]);
            }
            let mut sparse = Vec::new();
            for (v, name) in names.iter().enumerate() {
                let st = b.eng.stats(set[v + 1])?;
                laggs[v].add(&st);
                sparse.push(SparseAgreement {
                    variant: name.clone(),
                    matches: matches[v],
                    agreement: matches[v] as f64 / n.max(1) as f64,
                    matching_prefix: prefix[v].unwrap_or(n),
                    recall: mean_recall(&st),
                    oracle_recall: mean_oracle(&st),
                    output_error: mean_error(&st),
                });
            }
            for &s in &set {
                b.release(s);
            }
            let run = AgreementRun {
                length,
                prompt: p,
                instruction: AGREE_INSTRUCTIONS[which].0,
                text_start_unit: start,
                prompt_tokens: prompt.len(),
                steps: n,
                full_first_eog: full_ids.iter().position(|&t| b.tok.is_eog(t)),
                full_text: b.tok.decode(&full_ids),
                sparse,
            };
            let mut line = format!(
                "agreement {length:>5} {:<9} prompt {} tokens:",
                run.instruction, run.prompt_tokens
            );
            for s in &run.sparse {
                line.push_str(&format!(
                    " | {} {}/{} = {:.3}, prefix {}{}",
                    s.variant,
                    s.matches,
                    n,
                    s.agreement,
                    s.matching_prefix,
                    s.recall
                        .zip(s.oracle_recall)
                        .zip(s.output_error)
                        .map(|((r, o), e)| format!(", recall {r:.3} (oracle {o:.3}) err {e:.3}"))
                        .unwrap_or_default()
                ));
            }
            b.say(line);
            out.push(run);
        }
        for (v, l) in laggs.into_iter().enumerate() {
            agg[v].push((length, l));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------------------------

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

fn layer_json(agg: &[(usize, LayerAgg)]) -> serde_json::Value {
    let mut all = LayerAgg::default();
    let mut per_length = Vec::new();
    for (len, a) in agg.iter().filter(|(_, a)| a.runs > 0) {
        all.merge(a);
        per_length.push(serde_json::json!({ "length": len, "layers": a.report() }));
    }
    serde_json::json!({
        "all": (all.runs > 0).then(|| all.report()),
        "per_length": per_length,
    })
}

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
        println!(
            "per layer, mean over decode steps: recall (oracle) | pages attended | selected / candidates"
        );
        print!("layer");
        for (l, _) in &reports {
            print!(" | {:>26}", format!("{l} tokens"));
        }
        println!();
        for layer in 0..reports[0].1.recall.len() {
            print!("{layer:>5}");
            for (_, r) in &reports {
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
    for (l, r) in &reports {
        println!(
            "{l:>5} tokens: mean recall {} (oracle at the same page count {}), lowest layer {}; selected per layer {:.1} (layer {}) .. {:.1} (layer {}), cv {:.2} -> counts {} across layers; most selected in one step {}",
            r.mean_recall.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            r.mean_oracle_recall.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
            r.min_layer_recall.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into()),
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

/// `base` with `suffix` appended to its file name.
fn with_suffix(base: &Path, suffix: &str) -> PathBuf {
    let mut s = base.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn run(cli: Cli) -> Result<()> {
    let started = Instant::now();
    let threads = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    // The model runtime's parallel work runs on rayon's global pool; size it before first use.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    ensure!(cli.prefill_chunk > 0, "--prefill-chunk must be at least 1");
    ensure!(
        cli.trials > 0 || cli.skip_passkey,
        "--trials must be at least 1"
    );
    ensure!(cli.agree_tokens > 0, "--agree-tokens must be at least 1");
    ensure!(cli.answer_tokens > 0, "--answer-tokens must be at least 1");
    ensure!(
        cli.depths.iter().all(|&d| d <= 100),
        "--depths are percentages (0..=100)"
    );

    let base = cli.policy.engine_config();
    let mut variants = vec![Variant {
        name: "base".into(),
        cfg: base,
    }];
    for spec in &cli.variant {
        variants.push(parse_variant(spec, &base)?);
    }
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();

    let model_path = fetch::resolve_model(cli.model.as_deref()).context("locating the model")?;
    let model =
        Model::load(&model_path).with_context(|| format!("loading {}", model_path.display()))?;
    let tok = Tokenizer::from_gguf(model.gguf()).context("building the tokenizer")?;
    let template = ChatTemplate::from_gguf(model.gguf())
        .context("reading the chat template")?
        .context("the model has no chat template")?;
    let c = &model.config;
    let ctx = c.context_len;
    for &l in cli.lengths.iter().chain(&cli.agree_lengths) {
        ensure!(
            l <= ctx,
            "length {l} exceeds the model's context of {ctx} tokens"
        );
    }

    let files = text_files(&cli.text)?;
    let corpus = Corpus::load(&files, &tok)?;
    let longest = cli
        .lengths
        .iter()
        .chain(&cli.agree_lengths)
        .copied()
        .max()
        .unwrap_or(0);
    ensure!(
        corpus.tokens >= longest,
        "the text has {} tokens, fewer than the longest prompt ({longest}); pass more --text",
        corpus.tokens
    );

    let shape = model.kv_shape();
    let block_tokens = shape.page_shape(PAGE_BYTES).block_tokens;
    // Engine 0 holds the exact reference sequences; engine v + 1 runs variant v.
    let mut store_paths = vec![with_suffix(&cli.store, ".ref")];
    store_paths.extend((1..=variants.len()).map(|v| with_suffix(&cli.store, &format!(".v{v}"))));
    let mut pools = Vec::new();
    let mut io_mode = String::new();
    for (i, path) in store_paths.iter().enumerate() {
        let cfg = if i == 0 { base } else { variants[i - 1].cfg };
        let pool = EnginePool::create(path, cli.store_bytes, shape, cfg)
            .with_context(|| format!("creating the KV store {}", path.display()))?;
        io_mode = pool.engine_ref().with_store(|s| s.mode().to_string());
        pools.push(pool);
    }

    println!(
        "quality-bench: model {} ({} layers, context {ctx}), threads {threads}",
        model_path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        c.n_layers
    );
    println!(
        "text: {} files ({}), {} words, {} tokens in {} sentences",
        corpus.sources.len(),
        corpus.sources.join(" "),
        corpus.words,
        corpus.tokens,
        corpus.units.len()
    );
    println!(
        "stores: {}.{{ref,v1..}} ({io_mode}), {} tokens per page",
        cli.store.display(),
        block_tokens,
    );
    for v in &variants {
        println!("sparse policy {:?}: {:?}", v.name, v.cfg);
    }

    // Prefill work planned, for the progress bar.
    let depth_fracs: f64 = cli.depths.iter().map(|&d| 1.0 - d as f64 / 100.0).sum();
    let mut planned = 0u64;
    if !cli.skip_passkey {
        planned += cli
            .lengths
            .iter()
            .map(|&l| ((1.0 + depth_fracs) * l as f64) as u64 * cli.trials as u64)
            .sum::<u64>();
    }
    if !cli.skip_agreement {
        planned +=
            cli.agree_lengths.iter().map(|&l| l as u64).sum::<u64>() * cli.agree_prompts as u64;
    }
    let pb = ProgressBar::with_draw_target(Some(planned), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} prefill tokens, eta {eta} {msg}",
        )
        .context("progress bar template")?
        .progress_chars("=> "),
    );

    let mut b = Bench {
        model: &model,
        tok: &tok,
        eng: Engines {
            pools,
            owner: HashMap::new(),
        },
        variants: variants.len(),
        ws: Workspace::default(),
        next_seq: 0,
        chunk: cli.prefill_chunk,
        pb,
        prefill_tokens: 0,
        prefill_secs: 0.0,
        decode_steps: 0,
        decode_secs: 0.0,
    };
    // Separate streams, so --skip-passkey leaves the agreement prompts as they were.
    let mut rng = StdRng::seed_from_u64(cli.seed);
    let mut agree_rng = StdRng::seed_from_u64(cli.seed ^ 0xa9e3_3b1d_5c7f_0e21);

    let mut passkey_agg = vec![Vec::new(); variants.len()];
    let passkey_trials = if cli.skip_passkey {
        Vec::new()
    } else {
        let fr = frame(
            &tok,
            &template,
            PASSKEY_INTRO,
            PASSKEY_QUESTION,
            &cli.answer_prefix,
        )?;
        passkey(
            &mut b,
            &cli,
            &corpus,
            &fr,
            &names,
            &mut rng,
            &mut passkey_agg,
        )?
    };
    let passkey_lengths = if cli.skip_passkey {
        Vec::new()
    } else {
        passkey_summary(&passkey_trials, &cli.lengths, &names)
    };

    let mut agree_agg = vec![Vec::new(); variants.len()];
    let agree_runs = if cli.skip_agreement {
        Vec::new()
    } else {
        agreement(
            &mut b,
            &cli,
            &corpus,
            &template,
            &names,
            &mut agree_rng,
            &mut agree_agg,
        )?
    };
    b.pb.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();

    // Human summary.
    println!("\n== quality-bench summary ({elapsed:.0} s) ==");
    for (v, name) in names.iter().enumerate() {
        println!("[{}] {name}", v + 1);
    }
    if !passkey_lengths.is_empty() {
        println!(
            "\npasskey retrieval, correct/trials (depths {:?} %, {} trials per depth; same = sparse answer identical to full's):",
            cli.depths, cli.trials
        );
        print!("  length | full ");
        for v in 0..names.len() {
            print!("| [{}] correct, same ", v + 1);
        }
        println!();
        for p in &passkey_lengths {
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
    let mut agreement_summary = Vec::new();
    if !agree_runs.is_empty() {
        println!(
            "\ngreedy agreement with full, teacher-forced ({} decode steps per prompt), and matching prefix per prompt:",
            cli.agree_tokens
        );
        let lengths: Vec<Option<usize>> = cli
            .agree_lengths
            .iter()
            .map(|&l| Some(l))
            .chain([None])
            .collect();
        for l in lengths {
            let r: Vec<&AgreementRun> = agree_runs
                .iter()
                .filter(|r| l.is_none_or(|l| r.length == l))
                .collect();
            let steps: usize = r.iter().map(|r| r.steps).sum();
            print!(
                "  {:>6}",
                l.map(|l| l.to_string()).unwrap_or_else(|| "all".into())
            );
            let mut per_variant = Vec::new();
            for (v, name) in names.iter().enumerate() {
                let m: usize = r.iter().map(|r| r.sparse[v].matches).sum();
                let prefixes: Vec<usize> = r.iter().map(|r| r.sparse[v].matching_prefix).collect();
                let a = m as f64 / steps.max(1) as f64;
                print!(" | [{}] {m:>3}/{steps:<3} = {a:.3}", v + 1);
                if l.is_some() {
                    print!(" {prefixes:?}");
                }
                per_variant.push(serde_json::json!({
                    "variant": name, "matches": m, "steps": steps, "agreement": a,
                    "matching_prefixes": prefixes,
                }));
            }
            println!();
            agreement_summary.push(serde_json::json!({ "length": l, "sparse": per_variant }));
        }
    }
    for (v, name) in names.iter().enumerate() {
        print_layers(
            &format!("[{}] {name}, agreement runs", v + 1),
            &agree_agg[v],
            true,
        );
        print_layers(
            &format!("[{}] {name}, passkey runs", v + 1),
            &passkey_agg[v],
            false,
        );
    }
    let mut read = 0u64;
    let mut written = 0u64;
    for p in &b.eng.pools {
        let t = p.engine_ref().totals();
        read += t.stats.device_bytes_read;
        written += t.stats.device_bytes_written;
    }
    let prefill_rate = b.prefill_tokens as f64 / b.prefill_secs.max(1e-9);
    println!(
        "\nwork: {} prefill tokens in {:.0} s ({prefill_rate:.0} tok/s), {} batched decode steps in {:.0} s; device read {:.1} GiB, written {:.1} GiB over {} engines",
        b.prefill_tokens,
        b.prefill_secs,
        b.decode_steps,
        b.decode_secs,
        read as f64 / (1u64 << 30) as f64,
        written as f64 / (1u64 << 30) as f64,
        b.eng.pools.len(),
    );

    let sha = fetch::sha256_file(&model_path).ok();
    let variants_json: Vec<serde_json::Value> = variants
        .iter()
        .map(|v| serde_json::json!({ "name": v.name, "engine": PolicyJson::from(&v.cfg) }))
        .collect();
    let layers_by_variant = |agg: &[Vec<(usize, LayerAgg)>]| -> serde_json::Value {
        names
            .iter()
            .zip(agg)
            .map(|(n, a)| (n.clone(), layer_json(a)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let result = serde_json::json!({
        "bench": "quality-bench",
        "version": env!("CARGO_PKG_VERSION"),
        "label": cli.label,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "elapsed_s": elapsed,
        "threads": threads,
        "model": {
            "file": model_path.file_name().map(|n| n.to_string_lossy().into_owned()),
            "sha256": sha,
            "layers": c.n_layers, "heads": c.n_heads, "kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim, "context": ctx,
        },
        "text": { "files": corpus.sources, "words": corpus.words, "tokens": corpus.tokens,
                   "sentences": corpus.units.len() },
        "store": { "io_mode": io_mode, "block_tokens": block_tokens, "page_bytes": PAGE_BYTES },
        "variants": variants_json,
        "seed": cli.seed,
        "passkey": {
            "lengths": cli.lengths, "depths_pct": cli.depths, "trials_per_depth": cli.trials,
            "answer_tokens": cli.answer_tokens, "answer_prefix": cli.answer_prefix,
            "intro": PASSKEY_INTRO, "question": PASSKEY_QUESTION, "needle": needle("KEY"),
            "per_length": passkey_lengths,
            "trials": passkey_trials,
            "sparse_layers": layers_by_variant(&passkey_agg),
        },
        "agreement": {
            "lengths": cli.agree_lengths, "prompts_per_length": cli.agree_prompts,
            "decode_steps": cli.agree_tokens,
            "per_length": agreement_summary,
            "runs": agree_runs,
            "sparse_layers": layers_by_variant(&agree_agg),
        },
        "work": {
            "prefill_tokens": b.prefill_tokens, "prefill_s": b.prefill_secs,
            "decode_steps": b.decode_steps, "decode_s": b.decode_secs,
            "device_bytes_read": read, "device_bytes_written": written,
        },
    });
    if let Some(dir) = cli.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&result).context("encoding the result")?;
    std::fs::write(&cli.out, text + "\n")
        .with_context(|| format!("writing {}", cli.out.display()))?;
    println!("result: {}", cli.out.display());

    drop(b);
    if !cli.keep_store {
        for p in &store_paths {
            remove_store(p)?;
        }
    }
    Ok(())
}

fn remove_store(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing the KV store {}", path.display())),
    }
}
