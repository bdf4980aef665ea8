//! The storage engine's tunables as one set of settings: the `instinfer` CLI and the
//! benchmarks flatten them into their flags, and `instinferd`'s configuration takes them as
//! flags, `INSTINFER_*` variables and an `[engine]` table of its TOML file. There is one
//! mapping onto [`EngineConfig`]; a setting left out keeps the engine's default.

use csd_engine::{EngineConfig, PageScore};

/// Settings of the engine's page cache and sparse retrieval policy.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineArgs {
    /// The engine's RAM page cache budget in bytes [default: 64 MiB].
    #[arg(long, global = true, env = "INSTINFER_PAGE_CACHE_BYTES")]
    pub page_cache_bytes: Option<u64>,
    /// Sparse: share of each layer's estimated attention mass to cover [default: 0.97].
    #[arg(long, global = true, env = "INSTINFER_TARGET_MASS")]
    pub target_mass: Option<f32>,
    /// Sparse: most selected blocks per layer and step [default: 96].
    #[arg(long, global = true, env = "INSTINFER_MAX_BLOCKS")]
    pub max_blocks: Option<usize>,
    /// Sparse: fewest selected blocks per layer and step [default: 2].
    #[arg(long, global = true, env = "INSTINFER_MIN_BLOCKS")]
    pub min_blocks: Option<usize>,
    /// Sparse: selected blocks per decode step of one sequence, over all layers [default: 720].
    #[arg(long, global = true, env = "INSTINFER_STEP_BUDGET_BLOCKS")]
    pub step_budget_blocks: Option<usize>,
    /// Sparse: blocks at the start of a sequence always attended [default: 2].
    #[arg(long, global = true, env = "INSTINFER_SINK_BLOCKS")]
    pub sink_blocks: Option<usize>,
    /// Sparse: most recent full blocks always attended [default: 2].
    #[arg(long, global = true, env = "INSTINFER_RECENT_BLOCKS")]
    pub recent_blocks: Option<usize>,
    /// Sparse: weight of the prefill probe blended into the query, 0..=1 [default: 0].
    #[arg(long, global = true, env = "INSTINFER_PROBE_BLEND")]
    pub probe_blend: Option<f32>,
    /// Sparse: how pages are scored: quest, mean-key or sketch [default: sketch].
    #[arg(long, global = true, env = "INSTINFER_SCORE")]
    #[serde(default, deserialize_with = "page_score")]
    pub score: Option<PageScore>,
    /// Sparse, key sketches: candidate pages each query head shortlists by mean-key score
    /// for token-level scoring, 0 to sketch-score every candidate [default: 64].
    #[arg(long, global = true, env = "INSTINFER_SCORE_SHORTLIST_BLOCKS")]
    pub score_shortlist_blocks: Option<usize>,
    /// Sparse: key ranges per block for bounds and sketches [default: 1].
    #[arg(long, global = true, env = "INSTINFER_QUEST_RUNS")]
    pub quest_runs: Option<usize>,
    /// Sparse: estimate the skipped pages' share of attention from their summaries
    /// [default: true].
    #[arg(long, global = true, env = "INSTINFER_ESTIMATE_SKIPPED")]
    pub estimate_skipped: Option<bool>,
    /// Full and flexgen decode: layers whose page reads are queued ahead of their
    /// attention, 0 to turn read-ahead off [default: 2].
    #[arg(long, global = true, env = "INSTINFER_READAHEAD_LAYERS")]
    pub readahead_layers: Option<usize>,
    /// Most bytes the read-ahead holds or has in flight [default: 512 MiB].
    #[arg(long, global = true, env = "INSTINFER_READAHEAD_BYTES")]
    pub readahead_bytes: Option<u64>,
    /// Threads serving the engine's page reads [default: 2].
    #[arg(long, global = true, env = "INSTINFER_READER_THREADS")]
    pub reader_threads: Option<usize>,
    /// Prefill: most bytes of a sequence's prompt K/V kept in RAM until its first decode
    /// step, so prompt chunks need not read back the pages written before them
    /// [default: 1 GiB].
    #[arg(long, global = true, env = "INSTINFER_PREFILL_STAGE_BYTES")]
    pub prefill_stage_bytes: Option<u64>,
}

/// A page score from its name (`quest`, `mean-key` or `sketch`), as in the flags.
fn page_score<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<PageScore>, D::Error> {
    let name = <String as serde::Deserialize>::deserialize(d)?;
    name.parse().map(Some).map_err(serde::de::Error::custom)
}

impl EngineArgs {
    /// These settings where given, `below`'s elsewhere (configuration layers stack this way).
    pub fn over(self, below: EngineArgs) -> EngineArgs {
        EngineArgs {
            page_cache_bytes: self.page_cache_bytes.or(below.page_cache_bytes),
            target_mass: self.target_mass.or(below.target_mass),
            max_blocks: self.max_blocks.or(below.max_blocks),
            min_blocks: self.min_blocks.or(below.min_blocks),
            step_budget_blocks: self.step_budget_blocks.or(below.step_budget_blocks),
            sink_blocks: self.sink_blocks.or(below.sink_blocks),
            recent_blocks: self.recent_blocks.or(below.recent_blocks),
            probe_blend: self.probe_blend.or(below.probe_blend),
            score: self.score.or(below.score),
            score_shortlist_blocks: self.score_shortlist_blocks.or(below.score_shortlist_blocks),
            quest_runs: self.quest_runs.or(below.quest_runs),
            estimate_skipped: self.estimate_skipped.or(below.estimate_skipped),
            readahead_layers: self.readahead_layers.or(below.readahead_layers),
            readahead_bytes: self.readahead_bytes.or(below.readahead_bytes),
            reader_threads: self.reader_threads.or(below.reader_threads),
            prefill_stage_bytes: self.prefill_stage_bytes.or(below.prefill_stage_bytes),
        }
    }

    /// The engine's defaults with every flag that was given applied.
    pub fn engine_config(&self) -> EngineConfig {
        self.apply(EngineConfig::default())
    }

    /// `base` with every flag that was given applied.
    pub fn apply(&self, base: EngineConfig) -> EngineConfig {
        EngineConfig {
            cache_bytes: self.page_cache_bytes.unwrap_or(base.cache_bytes),
            target_mass: self.target_mass.unwrap_or(base.target_mass),
            max_blocks: self.max_blocks.unwrap_or(base.max_blocks),
            min_blocks: self.min_blocks.unwrap_or(base.min_blocks),
            step_budget_blocks: self.step_budget_blocks.unwrap_or(base.step_budget_blocks),
            sink_blocks: self.sink_blocks.unwrap_or(base.sink_blocks),
            recent_blocks: self.recent_blocks.unwrap_or(base.recent_blocks),
            probe_blend: self.probe_blend.unwrap_or(base.probe_blend),
            score: self.score.unwrap_or(base.score),
            score_shortlist_blocks: self
                .score_shortlist_blocks
                .unwrap_or(base.score_shortlist_blocks),
            quest_runs: self.quest_runs.unwrap_or(base.quest_runs),
            estimate_skipped: self.estimate_skipped.unwrap_or(base.estimate_skipped),
            readahead_layers: self.readahead_layers.unwrap_or(base.readahead_layers),
            readahead_bytes: self.readahead_bytes.unwrap_or(base.readahead_bytes),
            reader_threads: self.reader_threads.unwrap_or(base.reader_threads),
            prefill_stage_bytes: self.prefill_stage_bytes.unwrap_or(base.prefill_stage_bytes),
            ..base
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn no_flags_keep_the_engine_defaults_and_flags_override_them() {
        let none = Cli::parse_from(["x"]).engine.engine_config();
        assert_eq!(none, EngineConfig::default());
        let some = Cli::parse_from([
            "x",
            "--page-cache-bytes",
            "1024",
            "--max-blocks",
            "7",
            "--score",
            "quest",
        ])
        .engine
        .engine_config();
        assert_eq!(some.cache_bytes, 1024);
        assert_eq!(some.max_blocks, 7);
        assert_eq!(some.score, PageScore::Quest);
        assert_eq!(some.target_mass, EngineConfig::default().target_mass);
    }
}
