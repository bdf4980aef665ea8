//! `quality-bench`: does `sparse` decode attention keep the model's answers? (issue 4)
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
//! batch.
//!
//! The parts: [`Options`] (the flags), `variants` (the policies), `corpus` (text and prompt
//! frames), `engines` (the engines as one KV pool), `session` (sequences and work counters),
//! `passkey` and `agreement` (the measurements), `stats` (per-layer figures) and `report`
//! (console tables and the JSON file).

mod agreement;
mod corpus;
mod engines;
mod options;
mod passkey;
mod report;
mod session;
mod stats;
mod variants;

pub use options::Options;

use crate::setup::{self, LoadedModel};
use anyhow::{ensure, Context, Result};
use corpus::Corpus;
use engines::Engines;
use instinfer_runtime::chat::ChatTemplate;
use instinfer_runtime::kv::PAGE_BYTES;
use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use report::{Measured, Setup};
use session::Session;
use std::time::Instant;
use variants::Variant;

/// The template of the progress bar, counting prefill tokens.
const PROGRESS: &str = "{elapsed_precise} [{bar:30}] {pos}/{len} prefill tokens, eta {eta} {msg}";

/// Runs the measurements `opts` asks for, prints them and writes the JSON result file;
/// `threads` is the rayon worker count, for the record.
pub fn run(opts: &Options, threads: usize) -> Result<()> {
    let started = Instant::now();
    opts.check()?;
    let variants = variants::variants(opts)?;
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    let LoadedModel {
        path: model_path,
        model,
        tokenizer: tok,
    } = setup::load_model(opts.model.as_deref())?;
    ensure!(
        model.config.sliding.is_none(),
        "quality-bench clones prefilled sequences between engines, which do not hold a \
         sliding-window model's local layers ({}); it runs only models without them",
        model.config.arch.name()
    );
    let template = ChatTemplate::from_gguf(model.gguf())
        .context("reading the chat template")?
        .context("the model has no chat template")?;
    let ctx = model.config.context_len;
    for l in opts.all_lengths() {
        ensure!(
            l <= ctx,
            "length {l} exceeds the model's context of {ctx} tokens"
        );
    }
    let corpus = Corpus::load(&corpus::text_files(&opts.text)?, &tok)?;
    let longest = opts.all_lengths().max().unwrap_or(0);
    ensure!(
        corpus.tokens >= longest,
        "the text has {} tokens, fewer than the longest prompt ({longest}); pass more --text",
        corpus.tokens
    );

    let shape = model.kv_shape();
    let eng = Engines::create(
        &opts.store,
        opts.store_bytes,
        shape,
        &engine_configs(&variants),
    )?;
    let setup = Setup {
        opts,
        threads,
        model_path: &model_path,
        model: &model.config,
        corpus: &corpus,
        io_mode: eng.io_mode(),
        block_tokens: shape.page_shape(PAGE_BYTES).block_tokens,
        variants: &variants,
    };
    report::print_setup(&setup);

    let pb = setup::progress_bar(planned_prefill(opts), PROGRESS)?;
    let mut s = Session::new(&model, &tok, eng, variants.len(), opts.prefill_chunk, pb);
    let inputs = Inputs {
        opts,
        corpus: &corpus,
        template: &template,
        names: &names,
    };
    let measured = measure(&mut s, &inputs)?;
    s.pb.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();

    let agreement = report::print_summary(&setup, &measured, elapsed);
    let bytes = s.eng.device_bytes();
    report::print_work(&s.work, bytes, s.eng.pools().len());
    let result = report::result_json(&setup, &measured, &agreement, &s.work, bytes, elapsed);
    crate::files::write_json(&opts.out, &result)?;
    println!("result: {}", opts.out.display());

    if !opts.keep_store {
        s.eng.remove_stores()?;
    }
    Ok(())
}

/// The engines' configs: the reference engine runs the base policy's, engine `v + 1` policy
/// `v`'s.
fn engine_configs(variants: &[Variant]) -> Vec<csd_engine::EngineConfig> {
    variants[..1]
        .iter()
        .chain(variants)
        .map(|v| v.cfg)
        .collect()
}

/// Prefill tokens the measurements will run, roughly, for the progress bar.
fn planned_prefill(opts: &Options) -> u64 {
    let depth_fracs: f64 = opts.depths.iter().map(|&d| 1.0 - d as f64 / 100.0).sum();
    let mut planned = 0u64;
    if !opts.skip_passkey {
        planned += opts
            .lengths
            .iter()
            .map(|&l| ((1.0 + depth_fracs) * l as f64) as u64 * opts.trials as u64)
            .sum::<u64>();
    }
    if !opts.skip_agreement {
        planned +=
            opts.agree_lengths.iter().map(|&l| l as u64).sum::<u64>() * opts.agree_prompts as u64;
    }
    planned
}

/// What both measurements draw on.
struct Inputs<'c> {
    /// The flags.
    opts: &'c Options,
    /// The text.
    corpus: &'c Corpus,
    /// The model's chat template, for the prompt frames.
    template: &'c ChatTemplate,
    /// The sparse policies' names.
    names: &'c [String],
}

/// Passkey retrieval, then greedy agreement, each unless skipped. Their prompts come from
/// separate random streams of --seed, so --skip-passkey leaves the agreement prompts as they
/// were.
fn measure(s: &mut Session<'_>, inp: &Inputs<'_>) -> Result<Measured> {
    let (opts, names) = (inp.opts, inp.names);
    let mut rng = ChaCha12Rng::seed_from_u64(opts.seed);
    let mut agree_rng = ChaCha12Rng::seed_from_u64(opts.seed ^ 0xa9e3_3b1d_5c7f_0e21);
    let mut m = Measured {
        passkey_agg: vec![Vec::new(); names.len()],
        agree_agg: vec![Vec::new(); names.len()],
        ..Measured::default()
    };
    if !opts.skip_passkey {
        m.passkey_trials = passkey::passkey(s, inp, &mut rng, &mut m.passkey_agg)?;
        m.passkey_lengths = passkey::summary(&m.passkey_trials, &opts.lengths, names);
    }
    if !opts.skip_agreement {
        m.agree_runs = agreement::agreement(s, inp, &mut agree_rng, &mut m.agree_agg)?;
    }
    Ok(m)
}
