//! The flags of `quality-bench` and their checks.

use anyhow::{bail, ensure, Result};
use instinfer_runtime::kv::EngineArgs;
use std::path::PathBuf;

/// What to measure and how: every flag of `quality-bench`.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// GGUF model; default: the cached SmolLM2-135M-Instruct.
    #[arg(long, env = "INSTINFER_MODEL")]
    pub model: Option<PathBuf>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Text file or directory of text files to draw the long context from (repeatable).
    /// Default: every file in /usr/share/common-licenses.
    #[arg(long)]
    pub text: Vec<PathBuf>,
    /// KV store files are this path with ".ref", ".v1", ".v2", ... appended (created,
    /// overwritten, removed at the end unless --keep-store). Put them on a real disk: the
    /// store uses O_DIRECT.
    #[arg(long, default_value = "bench-results/quality-kv.store")]
    pub store: PathBuf,
    /// Size of each store file.
    #[arg(long, default_value_t = 2 << 30)]
    pub store_bytes: u64,
    /// Keep the KV store files after the run.
    #[arg(long)]
    pub keep_store: bool,
    /// JSON result file.
    #[arg(long, default_value = "bench-results/quality.json")]
    pub out: PathBuf,
    /// Seed of the keys and text offsets.
    #[arg(long, default_value_t = 4)]
    pub seed: u64,
    /// Total passkey lengths in tokens (prompt plus answer budget).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub lengths: Vec<usize>,
    /// Needle depths in percent of the text.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    pub depths: Vec<u32>,
    /// Passkey trials (text offsets) per length; each depth of a trial gets its own key.
    #[arg(long, default_value_t = 2)]
    pub trials: usize,
    /// Passkey answer budget in tokens.
    #[arg(long, default_value_t = 12)]
    pub answer_tokens: usize,
    /// Text put at the start of the assistant's answer in passkey prompts (empty: none).
    #[arg(long, default_value = "")]
    pub answer_prefix: String,
    /// Total agreement lengths in tokens (prompt plus generated tokens).
    #[arg(long, value_delimiter = ',', default_value = "2048,4096,8192")]
    pub agree_lengths: Vec<usize>,
    /// Agreement prompts per length (alternately "summarize" and "continue").
    #[arg(long, default_value_t = 2)]
    pub agree_prompts: usize,
    /// Decode steps compared per agreement prompt.
    #[arg(long, default_value_t = 64)]
    pub agree_tokens: usize,
    /// Do not run the passkey retrieval measurement.
    #[arg(long)]
    pub skip_passkey: bool,
    /// Do not run the greedy agreement measurement.
    #[arg(long)]
    pub skip_agreement: bool,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
    /// Free-form label stored in the JSON.
    #[arg(long, default_value = "")]
    pub label: String,
    /// The sparse policy is measured with the settings below ("base"); each --variant adds
    /// another policy, measured on the same prompts in the same run: comma-separated
    /// overrides of the base, e.g. "step_budget_blocks=960,target_mass=0.95" or
    /// "score=mean-key" (keys: target_mass, min_blocks, max_blocks, step_budget_blocks,
    /// sink_blocks, recent_blocks, probe_blend, score, page_cache_bytes, estimate_skipped,
    /// head_top_blocks, quest_runs, dense_layers).
    #[arg(long)]
    pub variant: Vec<String>,
    /// The base sparse policy's engine settings, the page cache (of each engine) included;
    /// the engine's defaults unless given.
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Do not measure attention-mass recall (it reads every page a sparse step skipped).
    #[arg(long)]
    pub no_recall: bool,
}

impl Options {
    /// The worker thread count: --threads (at least 1), else one per core.
    pub fn thread_count(&self) -> Result<usize> {
        if self.threads == Some(0) {
            bail!("--threads must be at least 1");
        }
        Ok(crate::setup::thread_count(self.threads))
    }

    /// Refuses flag values the measurements cannot run with (what the model and the text
    /// allow is checked once they are loaded).
    pub fn check(&self) -> Result<()> {
        ensure!(self.prefill_chunk > 0, "--prefill-chunk must be at least 1");
        ensure!(
            self.trials > 0 || self.skip_passkey,
            "--trials must be at least 1"
        );
        ensure!(self.agree_tokens > 0, "--agree-tokens must be at least 1");
        ensure!(self.answer_tokens > 0, "--answer-tokens must be at least 1");
        ensure!(
            self.depths.iter().all(|&d| d <= 100),
            "--depths are percentages (0..=100)"
        );
        Ok(())
    }

    /// Every prompt length asked for: the passkey lengths, then the agreement lengths.
    pub fn all_lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.lengths.iter().chain(&self.agree_lengths).copied()
    }
}
