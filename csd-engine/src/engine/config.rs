//! Tunables of the near-data attention engine: the RAM page cache and the sparse retrieval
//! policy (docs/ARCHITECTURE.md, "The storage engine"). Validated before the engine starts.

use crate::error::KvError;

/// How decode attention reads a sequence's KV (docs/ARCHITECTURE.md, "Attention modes").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AttentionMode {
    /// Every page, through the page cache; exact.
    #[default]
    Full,
    /// Baseline: the whole layer with large sequential reads, no cache; exact.
    Flexgen,
    /// Sinks + recent window + the pages the policy selects.
    Sparse,
}

impl AttentionMode {
    /// Every mode, in the order the CLI and the docs list them.
    pub const ALL: [AttentionMode; 3] = [
        AttentionMode::Full,
        AttentionMode::Flexgen,
        AttentionMode::Sparse,
    ];

    /// The mode's name in flags, config and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            AttentionMode::Full => "full",
            AttentionMode::Flexgen => "flexgen",
            AttentionMode::Sparse => "sparse",
        }
    }
}

impl std::fmt::Display for AttentionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for AttentionMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(AttentionMode::Full),
            "flexgen" => Ok(AttentionMode::Flexgen),
            "sparse" => Ok(AttentionMode::Sparse),
            other => Err(format!(
                "unknown attention mode {other:?} (expected full, flexgen or sparse)"
            )),
        }
    }
}

/// How candidate pages are scored against the probe query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PageScore {
    /// Quest's upper bound: Σ_i max(p_i·min_i, p_i·max_i) over the page's keys.
    Quest,
    /// Dot product with the page's mean key (a representative key).
    MeanKey,
    /// The page's attention mass under the probe, summed over its tokens' scores against
    /// 4-bit key sketches kept in RAM (coded against the Quest runs' extremes).
    #[default]
    Sketch,
}

impl PageScore {
    /// The score's name in flags and configuration (what [`str::parse`] reads back).
    pub fn as_str(self) -> &'static str {
        match self {
            PageScore::Quest => "quest",
            PageScore::MeanKey => "mean-key",
            PageScore::Sketch => "sketch",
        }
    }
}

impl std::fmt::Display for PageScore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PageScore {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().replace('_', "-").as_str() {
            "quest" => Ok(PageScore::Quest),
            "mean-key" | "meankey" => Ok(PageScore::MeanKey),
            "sketch" => Ok(PageScore::Sketch),
            other => Err(format!(
                "unknown page score {other:?} (expected quest, mean-key or sketch)"
            )),
        }
    }
}

/// Engine tunables. Counts of pages are block groups (all kv heads of `block_tokens` tokens).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineConfig {
    /// RAM page cache budget; 0 disables the cache.
    pub cache_bytes: u64,
    /// Blocks at the start of a sequence always attended (attention sinks).
    pub sink_blocks: usize,
    /// Most recent full blocks always attended (besides the RAM tail).
    pub recent_blocks: usize,
    /// Fewest selected blocks per layer and step (beyond sinks and recent).
    pub min_blocks: usize,
    /// Most selected blocks per layer and step (beyond sinks and recent).
    pub max_blocks: usize,
    /// Share of a layer's estimated attention mass the selected blocks must cover.
    pub target_mass: f32,
    /// Selected blocks per decode step of one sequence, over all layers.
    pub step_budget_blocks: usize,
    /// Weight of the activation-aware prefill probe blended into the current query (0..=1).
    pub probe_blend: f32,
    /// How candidate pages are scored (key sketches by default; they cost `head_dim / 2`
    /// bytes of RAM per token and kv head).
    pub score: PageScore,
    /// Each query head's best-scoring candidate blocks kept before the mass cut-off (within
    /// the layer's cap), so one retrieval head's sharp block is not outvoted by diffuse heads.
    pub head_top_blocks: usize,
    /// With key sketches: candidate blocks each query head shortlists by mean-key score for
    /// token-level scoring; the others are scored by their mean key (0: every candidate is
    /// sketch-scored). Keeps the sketch work of a step constant in the context.
    pub score_shortlist_blocks: usize,
    /// Key ranges per block: its tokens split into this many runs with their own key
    /// min/max (tighter Quest bounds and finer sketch codes; `2 × runs × head_dim` f16 of
    /// RAM per head and block). One by default: with sketches each extra run also costs a
    /// probe fold per run when scoring (about half again the scoring time per extra run);
    /// Quest scoring wants 4.
    pub quest_runs: usize,
    /// Leading layers that sparse decode attends in full: their heads spread attention over
    /// the whole context, so no page selection holds their mass.
    pub dense_layers: usize,
    /// Also read the pages a sparse step skipped and record which share of the exact softmax
    /// mass the attended pages held (quality measurement only: it costs a full read).
    pub measure_recall: bool,
    /// Sparse decode: add an estimate of the skipped pages' share of attention, computed from
    /// their summaries (mean key and mean value per block) without reading them.
    pub estimate_skipped: bool,
    /// Decode: attend over cached pages and the RAM stage while the other pages are read,
    /// then merge the partial results by log-sum-exp (instead of one softmax after the read).
    pub merge_partials: bool,
    /// Decode in `full` and `flexgen`: layers whose reads are queued ahead of their attend
    /// (the device reads layer l+1.. while layer l computes; 0 turns read-ahead off).
    pub readahead_layers: usize,
    /// Most bytes the read-ahead may hold or have in flight, over all sequences.
    pub readahead_bytes: u64,
    /// Threads serving page reads (one per device ring is enough to keep it busy).
    pub reader_threads: usize,
    /// Prefill: most bytes of a sequence's prompt K/V kept in RAM until its first decode
    /// step, so that prompt chunks attend to the chunks before them without reading them
    /// back from flash (0: every chunk reads the pages written before it).
    pub prefill_stage_bytes: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cache_bytes: 64 << 20,
            sink_blocks: 2,
            recent_blocks: 2,
            min_blocks: 2,
            max_blocks: 96,
            target_mass: 0.97,
            step_budget_blocks: 720,
            probe_blend: 0.0,
            score: PageScore::Sketch,
            head_top_blocks: 2,
            score_shortlist_blocks: 64,
            quest_runs: 1,
            dense_layers: 0,
            measure_recall: false,
            estimate_skipped: true,
            merge_partials: false,
            readahead_layers: 2,
            readahead_bytes: 512 << 20,
            reader_threads: 2,
            prefill_stage_bytes: 1 << 30,
        }
    }
}

impl EngineConfig {
    /// A policy that selects every page: `sparse` then computes exactly what `full` does.
    pub fn unlimited() -> EngineConfig {
        EngineConfig {
            max_blocks: usize::MAX,
            target_mass: 1.0,
            step_budget_blocks: usize::MAX,
            ..EngineConfig::default()
        }
    }

    /// Check the values against each other and against a model of `layers` layers.
    pub fn validate(&self, layers: usize) -> Result<(), KvError> {
        let bad = |m: String| Err(KvError::BadInput(format!("engine config: {m}")));
        if !(self.target_mass > 0.0 && self.target_mass <= 1.0) {
            return bad(format!(
                "target_mass must be in (0, 1], got {}",
                self.target_mass
            ));
        }
        if !(0.0..=1.0).contains(&self.probe_blend) {
            return bad(format!(
                "probe_blend must be in [0, 1], got {}",
                self.probe_blend
            ));
        }
        if !(1..=64).contains(&self.quest_runs) {
            return bad(format!(
                "quest_runs must be in 1..=64, got {}",
                self.quest_runs
            ));
        }
        if !(1..=16).contains(&self.reader_threads) {
            return bad(format!(
                "reader_threads must be in 1..=16, got {}",
                self.reader_threads
            ));
        }
        if self.readahead_layers > 64 {
            return bad(format!(
                "readahead_layers must be at most 64, got {}",
                self.readahead_layers
            ));
        }
        if self.max_blocks < self.min_blocks {
            return bad(format!(
                "max_blocks ({}) is below min_blocks ({})",
                self.max_blocks, self.min_blocks
            ));
        }
        if self.step_budget_blocks < self.min_blocks.saturating_mul(layers) {
            return bad(format!(
                "step_budget_blocks ({}) cannot give each of the {layers} layers its min_blocks ({})",
                self.step_budget_blocks, self.min_blocks
            ));
        }
        Ok(())
    }
}
