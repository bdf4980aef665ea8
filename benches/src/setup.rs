//! What the model benchmarks (`decode-bench`, `quality-bench`) set up before they measure:
//! their worker threads, the model and its tokenizer, and a progress bar.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use instinfer_runtime::fetch;
use instinfer_runtime::model::Model;
use instinfer_runtime::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// The worker thread count: `flag` (a `--threads` value) if given, else one per core.
pub fn thread_count(flag: Option<usize>) -> usize {
    flag.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Runs `f` on a worker of a new rayon pool of `threads` workers, where the model runtime's
/// and the engine's parallel work then runs (`decode-bench`, like the `instinfer` CLI).
pub fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the thread pool")?
        .install(f)
}

/// Gives rayon's global pool `threads` workers: parallel work started from the calling thread
/// (which stays outside the pool) runs there (`quality-bench`). Call it before anything uses
/// rayon.
pub fn size_global_pool(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("starting the thread pool")
}

/// A model loaded for a benchmark, with its tokenizer and the file it came from.
pub struct LoadedModel {
    /// The GGUF file.
    pub path: PathBuf,
    /// The model.
    pub model: Model,
    /// The tokenizer built from the model's GGUF metadata.
    pub tokenizer: Tokenizer,
}

/// Loads `explicit`, else the default model (fetched on first use), and builds its tokenizer.
pub fn load_model(explicit: Option<&Path>) -> Result<LoadedModel> {
    let path = fetch::resolve_model(explicit).context("locating the model")?;
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let tokenizer = Tokenizer::from_gguf(model.gguf()).context("building the tokenizer")?;
    Ok(LoadedModel {
        path,
        model,
        tokenizer,
    })
}

/// A progress bar of `len` steps on stderr, drawn with the indicatif `template` and `=> `
/// as the bar's characters.
pub fn progress_bar(len: u64, template: &str) -> Result<ProgressBar> {
    let pb = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    pb.set_style(
        ProgressStyle::with_template(template)
            .context("progress bar template")?
            .progress_chars("=> "),
    );
    Ok(pb)
}
