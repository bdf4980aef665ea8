//! The storage engine's tunables as command-line flags: one definition that the `instinfer`
//! CLI and the benchmarks flatten into their own arguments, and one mapping onto
//! [`EngineConfig`]. A flag left out keeps the engine's default.

use csd_engine::{EngineConfig, PageScore};

/// Flags for the engine's page cache and sparse retrieval policy.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct EngineArgs {
    /// The engine's RAM page cache budget in bytes [default: 64 MiB].
    #[arg(long, global = true)]
    pub page_cache_bytes: Option<u64>,
    /// Sparse: share of each layer's estimated attention mass to cover [default: 0.97].
    #[arg(long, global = true)]
    pub target_mass: Option<f32>,
    /// Sparse: most selected blocks per layer and step [default: 96].
    #[arg(long, global = true)]
    pub max_blocks: Option<usize>,
    /// Sparse: fewest selected blocks per layer and step [default: 2].
    #[arg(long, global = true)]
    pub min_blocks: Option<usize>,
    /// Sparse: selected blocks per decode step of one sequence, over all layers [default: 720].
    #[arg(long, global = true)]
    pub step_budget_blocks: Option<usize>,
    /// Sparse: blocks at the start of a sequence always attended [default: 2].
    #[arg(long, global = true)]
    pub sink_blocks: Option<usize>,
    /// Sparse: most recent full blocks always attended [default: 2].
    #[arg(long, global = true)]
    pub recent_blocks: Option<usize>,
    /// Sparse: weight of the prefill probe blended into the query, 0..=1 [default: 0].
    #[arg(long, global = true)]
    pub probe_blend: Option<f32>,
    /// Sparse: how pages are scored: quest, mean-key or sketch [default: sketch].
    #[arg(long, global = true)]
    pub score: Option<PageScore>,
    /// Sparse: key ranges per block for bounds and sketches [default: 1].
    #[arg(long, global = true)]
    pub quest_runs: Option<usize>,
    /// Sparse: estimate the skipped pages' share of attention from their summaries
    /// [default: true].
    #[arg(long, global = true)]
    pub estimate_skipped: Option<bool>,
}

impl EngineArgs {
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
            quest_runs: self.quest_runs.unwrap_or(base.quest_runs),
            estimate_skipped: self.estimate_skipped.unwrap_or(base.estimate_skipped),
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
