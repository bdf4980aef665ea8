//! quality-bench: does `sparse` decode attention keep the model's answers? (issue 4)
//!
//! Passkey retrieval, greedy agreement with `full`, and per-layer attention-mass recall of
//! one or more sparse policies, every sequence's KV on flash; see
//! [`instinfer_benches::quality`] for what is measured and how.
//!
//! ```text
//! cargo run --release -p instinfer-benches --bin quality-bench -- --out bench-results/quality.json
//! quality-bench --variant step_budget_blocks=960 --variant score=mean-key
//! ```

use anyhow::Result;
use clap::Parser;
use instinfer_benches::{quality, setup};

#[derive(Parser, Debug)]
#[command(
    name = "quality-bench",
    version,
    about = "Passkey retrieval, greedy agreement and attention-mass recall of sparse vs full attention"
)]
struct Cli {
    #[command(flatten)]
    options: quality::Options,
}

fn main() {
    instinfer_runtime::logging::init_from_env("warn");
    let cli = Cli::parse();
    if let Err(e) = start(&cli.options) {
        eprintln!("quality-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs the measurements with --threads workers in rayon's global pool.
fn start(opts: &quality::Options) -> Result<()> {
    let threads = opts.thread_count()?;
    setup::size_global_pool(threads)?;
    quality::run(opts, threads)
}
