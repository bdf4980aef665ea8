//! loadbench: load on a running instinferd through its gRPC API and, with `--http`, through
//! its OpenAI-compatible HTTP API in the same run.
//!
//! Per interface: first one stream alone, then `--streams` concurrent streams of
//! `--max-tokens` tokens each (end-of-generation ignored, so every stream runs to its
//! length), one connection per stream, all started together. Reports aggregate tok/s against
//! the single stream and time-to-first-token percentiles under load, and fails if any stream
//! errors or comes back short. With `--http`, the interfaces take turns for `--rounds`
//! rounds (gRPC first in odd rounds, HTTP first in even ones) and the report gives HTTP's
//! figures as ratios of gRPC's.
//!
//! With `--scaling 8,32` it instead runs one gRPC phase per concurrency level and, with
//! `--llamacpp MODEL.gguf`, llama.cpp's own batched decode (one `llama_batch` per step, through
//! the repository's llama-cpp-python script) at 1 and the same levels, in the same run; `--plot`
//! draws both aggregates against concurrency.
//!
//!   instinferd &                      # the server under test
//!   loadbench --server 127.0.0.1:50051 --http 127.0.0.1:8000 --streams 32 --max-tokens 128
//!   loadbench --scaling 8,32 --llamacpp MODEL.gguf --plot scaling.png

use anyhow::{bail, Context, Result};
use clap::Parser;
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadbench",
    version,
    about = "Concurrent Generate streams against instinferd"
)]
struct Cli {
    /// Server address (host:port or http://host:port).
    #[arg(long, default_value = "127.0.0.1:50051")]
    server: String,
    /// Concurrent streams in the load phase.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Prompt of every stream (stream i gets " (i)" appended so prompts differ).
    #[arg(long, default_value = "Write a short story about a lighthouse keeper")]
    prompt: String,
    /// Bearer token, if the server wants one.
    #[arg(long, env = "INSTINFER_SERVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// The server's OpenAI-compatible HTTP API (host:port): run the same load over it too.
    #[arg(long)]
    http: Option<String>,
    /// With --http: rounds of gRPC and HTTP load, alternating which goes first.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Concurrency levels (comma-separated): one gRPC phase each instead of the --streams run.
    #[arg(long, value_delimiter = ',')]
    scaling: Vec<usize>,
    /// With --scaling: this GGUF (the server's model) through llama.cpp's batched decode too.
    #[arg(long, value_name = "MODEL")]
    llamacpp: Option<std::path::PathBuf>,
    /// Threads for llama.cpp (the server's --threads).
    #[arg(long, default_value_t = 2)]
    llamacpp_threads: usize,
    /// With --scaling: write a PNG of aggregate tok/s against concurrency here.
    #[arg(long, value_name = "PATH")]
    plot: Option<std::path::PathBuf>,
}

/// The door a stream goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interface {
    Grpc,
    Http,
}

impl Interface {
    fn name(self) -> &'static str {
        match self {
            Interface::Grpc => "grpc",
            Interface::Http => "http",
        }
    }
}

/// What one stream measured, on the client's clock.
#[derive(Debug)]
struct StreamResult {
    tokens: usize,
    ttft: Duration,
    total: Duration,
    server_ttft_ms: f64,
    server_decode_tps: f64,
    /// Client-side gaps between consecutive tokens (ms).
    gaps_ms: Vec<f64>,
}

fn uri(server: &str) -> String {
    if server.contains("://") {
        server.to_string()
    } else {
        format!("http://{server}")
    }
}

async fn connect(cli: &Cli) -> Result<InferenceClient<Channel>> {
    InferenceClient::connect(uri(&cli.server))
        .await
        .with_context(|| format!("connecting to {}", cli.server))
}

fn request<T>(cli: &Cli, msg: T) -> Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = &cli.token {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().context("bearer token")?,
        );
    }
    Ok(r)
}

async fn one_stream(cli: &Cli, iface: Interface, i: usize) -> Result<StreamResult> {
    match iface {
        Interface::Grpc => one_grpc_stream(cli, i).await,
        Interface::Http => one_http_stream(cli, i).await,
    }
}

/// One streamed completion through the HTTP API (`/v1/completions`, greedy as gRPC's
/// default), its server-sent events read with eventsource-stream. Tokens are counted from
/// the usage chunk (a token whose text is held back sends no chunk).
async fn one_http_stream(cli: &Cli, i: usize) -> Result<StreamResult> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let addr = cli.http.as_deref().context("--http is not set")?;
    let url = format!("{}/v1/completions", uri(addr));
    let body = serde_json::json!({
        "prompt": format!("{} ({i})", cli.prompt),
        "max_tokens": cli.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "instinfer": {"ignore_eos": true},
    });
    // A client (and so a connection) per stream, as the gRPC side has.
    let mut req = reqwest::Client::new().post(&url).json(&body);
    if let Some(t) = &cli.token {
        req = req.bearer_auth(t);
    }
    let sent = Instant::now();
    let resp = req
        .send()
        .await
        .with_context(|| format!("stream {i}: POST {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        bail!("stream {i}: HTTP {status}: {text}");
    }
    let mut events = resp.bytes_stream().eventsource();
    let (mut ttft, mut tokens, mut reason) = (None, None, None);
    let mut gaps = Gaps::default();
    while let Some(ev) = events.next().await {
        let ev = ev.with_context(|| format!("stream {i}: reading the event stream"))?;
        if ev.data == "[DONE]" {
            let tokens: usize = tokens.with_context(|| format!("stream {i}: no usage chunk"))?;
            if reason.as_deref() != Some("length") || tokens != cli.max_tokens as usize {
                bail!(
                    "stream {i}: finished {reason:?} after {tokens} of {} tokens",
                    cli.max_tokens
                );
            }
            return Ok(StreamResult {
                tokens,
                ttft: ttft.unwrap_or_default(),
                total: sent.elapsed(),
                // The HTTP API reports no server-side timings.
                server_ttft_ms: f64::NAN,
                server_decode_tps: f64::NAN,
                gaps_ms: gaps.ms,
            });
        }
        let v: serde_json::Value = serde_json::from_str(&ev.data)
            .with_context(|| format!("stream {i}: a chunk that is not JSON: {}", ev.data))?;
        if let Some(e) = v.get("error") {
            bail!("stream {i}: {e}");
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
        let choice = &v["choices"][0];
        if choice["text"].as_str().is_some_and(|t| !t.is_empty()) {
            ttft.get_or_insert_with(|| sent.elapsed());
            gaps.token();
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = Some(r.to_string());
        }
    }
    bail!("stream {i}: the event stream ended without [DONE]")
}

async fn one_grpc_stream(cli: &Cli, i: usize) -> Result<StreamResult> {
    let mut client = connect(cli).await?;
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(format!(
            "{} ({i})",
            cli.prompt
        ))),
        max_tokens: Some(cli.max_tokens),
        ignore_eos: true,
        request_id: format!("loadbench-{i}-{}", std::process::id()),
        ..Default::default()
    };
    let sent = Instant::now();
    let mut stream = client
        .generate(request(cli, req)?)
        .await
        .with_context(|| format!("stream {i}: Generate"))?
        .into_inner();
    let (mut tokens, mut ttft) = (0usize, None);
    let mut gaps = Gaps::default();
    while let Some(msg) = stream
        .message()
        .await
        .with_context(|| format!("stream {i}"))?
    {
        match msg.event {
            Some(pb::generate_response::Event::Token(_)) => {
                tokens += 1;
                ttft.get_or_insert_with(|| sent.elapsed());
                gaps.token();
            }
            Some(pb::generate_response::Event::Finished(f)) => {
                let reason =
                    pb::FinishReason::try_from(f.reason).unwrap_or(pb::FinishReason::Unspecified);
                if reason != pb::FinishReason::Length || tokens != cli.max_tokens as usize {
                    bail!(
                        "stream {i}: finished {reason:?} after {tokens} of {} tokens: {}",
                        cli.max_tokens,
                        f.message
                    );
                }
                let usage = f.usage.unwrap_or_default();
                return Ok(StreamResult {
                    tokens,
                    ttft: ttft.unwrap_or_default(),
                    total: sent.elapsed(),
                    server_ttft_ms: usage.time_to_first_token_ms,
                    server_decode_tps: usage.decode_tokens_per_second,
                    gaps_ms: gaps.ms,
                });
            }
            None => {}
        }
    }
    bail!("stream {i}: ended without a finish message")
}

/// Inter-token gaps of one stream, on the client's clock.
#[derive(Default)]
struct Gaps {
    last: Option<Instant>,
    ms: Vec<f64>,
}

impl Gaps {
    /// A token (or a chunk with text) arrived now.
    fn token(&mut self) {
        let now = Instant::now();
        if let Some(last) = self.last.replace(now) {
            self.ms.push(ms(now - last));
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What one interface measured in one round.
#[derive(Debug)]
struct Phase {
    iface: Interface,
    streams: usize,
    single_tps: f64,
    single_ttft_ms: f64,
    aggregate_tps: f64,
    wall_s: f64,
    completed: usize,
    errors: Vec<String>,
    ttft_ms: Vec<f64>,
    server_ttft_ms: Vec<f64>,
    per_stream_tps: Vec<f64>,
    /// Every inter-token gap of every stream under load, sorted (ms).
    itl_ms: Vec<f64>,
}

impl Phase {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "interface": self.iface.name(),
            "completed": self.completed,
            "errors": self.errors.len(),
            "single_stream_tok_per_s": self.single_tps,
            "single_stream_ttft_ms": self.single_ttft_ms,
            "aggregate_tok_per_s": self.aggregate_tps,
            "speedup": self.aggregate_tps / self.single_tps,
            "wall_s": self.wall_s,
            "streams": self.streams,
            "ttft_ms_p50": percentile(&self.ttft_ms, 50.0),
            "ttft_ms_p99": percentile(&self.ttft_ms, 99.0),
            "server_ttft_ms_p50": percentile(&self.server_ttft_ms, 50.0),
            "server_ttft_ms_p99": percentile(&self.server_ttft_ms, 99.0),
            "per_stream_decode_tok_per_s_p50": percentile(&self.per_stream_tps, 50.0),
            "inter_token_ms_p50": percentile(&self.itl_ms, 50.0),
            "inter_token_ms_p99": percentile(&self.itl_ms, 99.0),
        })
    }

    fn print(&self, cli: &Cli) {
        let name = self.iface.name();
        println!(
            "[{name}] single stream: {:.1} tok/s (TTFT {:.0} ms)",
            self.single_tps, self.single_ttft_ms
        );
        println!(
            "[{name}] {} streams x {} tokens: {}/{} completed, {} errors, {:.2} s",
            self.streams,
            cli.max_tokens,
            self.completed,
            self.streams,
            self.errors.len(),
            self.wall_s
        );
        println!(
            "[{name}] aggregate: {:.1} tok/s = {:.2}x the single stream",
            self.aggregate_tps,
            self.aggregate_tps / self.single_tps
        );
        println!(
            "[{name}] TTFT under load (client): p50 {:.0} ms, p99 {:.0} ms; inter-token p50 {:.1} ms, p99 {:.1} ms",
            percentile(&self.ttft_ms, 50.0),
            percentile(&self.ttft_ms, 99.0),
            percentile(&self.itl_ms, 50.0),
            percentile(&self.itl_ms, 99.0)
        );
        if self.iface == Interface::Grpc {
            println!(
                "[{name}] TTFT under load (server): p50 {:.0} ms, p99 {:.0} ms; per-stream decode p50 {:.1} tok/s",
                percentile(&self.server_ttft_ms, 50.0),
                percentile(&self.server_ttft_ms, 99.0),
                percentile(&self.per_stream_tps, 50.0)
            );
        }
    }
}

/// A warm-up, one stream alone, then every stream at once, through `iface`.
async fn phase(cli: &std::sync::Arc<Cli>, iface: Interface) -> Result<Phase> {
    let warm = Cli {
        max_tokens: 8,
        ..(**cli).clone()
    };
    one_stream(&warm, iface, usize::MAX)
        .await
        .with_context(|| format!("{} warm-up", iface.name()))?;
    let single = one_stream(cli, iface, 0)
        .await
        .with_context(|| format!("{} single stream", iface.name()))?;
    let start = Instant::now();
    let tasks: Vec<_> = (0..cli.streams)
        .map(|i| {
            let cli = cli.clone();
            tokio::spawn(async move { one_stream(&cli, iface, i + 1).await })
        })
        .collect();
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(e) => errors.push(format!("task: {e}")),
        }
    }
    let wall = start.elapsed();
    let tokens: usize = results.iter().map(|r| r.tokens).sum();
    let sorted = |f: &dyn Fn(&StreamResult) -> f64| {
        let mut v: Vec<f64> = results.iter().map(f).filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let mut itl_ms: Vec<f64> = results
        .iter()
        .flat_map(|r| r.gaps_ms.iter().copied())
        .collect();
    itl_ms.sort_by(f64::total_cmp);
    Ok(Phase {
        iface,
        streams: cli.streams,
        itl_ms,
        single_tps: single.tokens as f64 / single.total.as_secs_f64(),
        single_ttft_ms: ms(single.ttft),
        aggregate_tps: tokens as f64 / wall.as_secs_f64(),
        wall_s: wall.as_secs_f64(),
        completed: results.len(),
        ttft_ms: sorted(&|r| ms(r.ttft)),
        server_ttft_ms: sorted(&|r| r.server_ttft_ms),
        per_stream_tps: sorted(&|r| r.server_decode_tps),
        errors,
    })
}

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (n, sum) = v.fold((0usize, 0.0), |(n, s), x| (n + 1, s + x));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.streams == 0 || cli.max_tokens == 0 || cli.rounds == 0 {
        bail!("--streams, --max-tokens and --rounds must be at least 1");
    }
    let mut client = connect(&cli).await?;
    let info = client
        .get_model_info(request(&cli, pb::GetModelInfoRequest {})?)
        .await
        .context("GetModelInfo")?
        .into_inner();
    let cli = std::sync::Arc::new(cli);
    if !cli.scaling.is_empty() {
        return scaling(&cli, &info).await;
    }

    // The interfaces take turns, so that neither always runs on a warmer or quieter machine.
    let mut phases = Vec::new();
    let rounds = if cli.http.is_some() { cli.rounds } else { 1 };
    for round in 0..rounds {
        let order: &[Interface] = match (cli.http.is_some(), round % 2) {
            (false, _) => &[Interface::Grpc],
            (true, 0) => &[Interface::Grpc, Interface::Http],
            (true, _) => &[Interface::Http, Interface::Grpc],
        };
        for &iface in order {
            let p = phase(&cli, iface).await?;
            if !cli.json {
                println!("round {}:", round + 1);
                p.print(&cli);
            }
            phases.push(p);
        }
    }
    let stats = client
        .get_stats(request(&cli, pb::GetStatsRequest {})?)
        .await
        .context("GetStats")?
        .into_inner();

    // Per interface, the mean over rounds; HTTP as a ratio of gRPC.
    let of = |iface: Interface, f: &dyn Fn(&Phase) -> f64| {
        mean(phases.iter().filter(|p| p.iface == iface).map(f))
    };
    let summary = |iface: Interface| {
        serde_json::json!({
            "aggregate_tok_per_s": of(iface, &|p| p.aggregate_tps),
            "single_stream_tok_per_s": of(iface, &|p| p.single_tps),
            "ttft_ms_p50": of(iface, &|p| percentile(&p.ttft_ms, 50.0)),
            "ttft_ms_p99": of(iface, &|p| percentile(&p.ttft_ms, 99.0)),
        })
    };
    let mut report = serde_json::json!({
        "model": format!("{} {} layers {}", info.model_file, info.layers, info.quantization),
        "streams": cli.streams,
        "max_tokens": cli.max_tokens,
        "rounds": rounds,
        "phases": phases.iter().map(Phase::json).collect::<Vec<_>>(),
        "grpc": summary(Interface::Grpc),
        "server_scheduler_steps": stats.scheduler_steps,
    });
    if cli.http.is_some() {
        let g = summary(Interface::Grpc);
        let h = summary(Interface::Http);
        let ratio = |k: &str| h[k].as_f64().unwrap_or(f64::NAN) / g[k].as_f64().unwrap_or(f64::NAN);
        report["http"] = h.clone();
        report["http_over_grpc"] = serde_json::json!({
            "aggregate_tok_per_s": ratio("aggregate_tok_per_s"),
            "single_stream_tok_per_s": ratio("single_stream_tok_per_s"),
            "ttft_ms_p50": ratio("ttft_ms_p50"),
            "ttft_ms_p99": ratio("ttft_ms_p99"),
        });
    }
    if cli.json {
        println!("{report}");
    } else {
        println!("model: {}", report["model"].as_str().unwrap_or_default());
        if let Some(r) = report.get("http_over_grpc") {
            println!(
                "HTTP / gRPC over {rounds} rounds: aggregate {:.3}, single stream {:.3}, TTFT p50 {:.3}, TTFT p99 {:.3}",
                r["aggregate_tok_per_s"].as_f64().unwrap_or(f64::NAN),
                r["single_stream_tok_per_s"].as_f64().unwrap_or(f64::NAN),
                r["ttft_ms_p50"].as_f64().unwrap_or(f64::NAN),
                r["ttft_ms_p99"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
    let failed: Vec<&String> = phases.iter().flat_map(|p| &p.errors).collect();
    if !failed.is_empty() {
        for e in &failed {
            eprintln!("error: {e}");
        }
        bail!("{} streams failed", failed.len());
    }
    Ok(())
}

/// `--scaling`: one gRPC phase per concurrency level, then llama.cpp's batched decode at 1 and
/// the same levels, side by side in one report (and one plot).
async fn scaling(cli: &std::sync::Arc<Cli>, info: &pb::ModelInfo) -> Result<()> {
    if cli.scaling.contains(&0) {
        bail!("--scaling levels must be at least 1");
    }
    let mut ours = Vec::new();
    for &n in &cli.scaling {
        let c = std::sync::Arc::new(Cli {
            streams: n,
            ..(**cli).clone()
        });
        let p = phase(&c, Interface::Grpc).await?;
        if !cli.json {
            p.print(&c);
        }
        if !p.errors.is_empty() {
            bail!("{} of {n} streams failed: {}", p.errors.len(), p.errors[0]);
        }
        ours.push(p);
    }
    let single = mean(ours.iter().map(|p| p.single_tps));
    let llama = match &cli.llamacpp {
        Some(model) => {
            run_llamacpp_batched(model, &cli.scaling, cli.max_tokens, cli.llamacpp_threads)?
        }
        None => Vec::new(),
    };
    let llama_at = |n: usize| {
        llama
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| *v)
            .unwrap_or(f64::NAN)
    };
    let rows: Vec<serde_json::Value> = ours
        .iter()
        .map(|p| {
            serde_json::json!({
                "streams": p.streams,
                "aggregate_tok_per_s": p.aggregate_tps,
                "over_single_stream": p.aggregate_tps / single,
                "llamacpp_aggregate_tok_per_s": llama_at(p.streams),
                "over_llamacpp": p.aggregate_tps / llama_at(p.streams),
                "ttft_ms_p50": percentile(&p.ttft_ms, 50.0),
                "ttft_ms_p99": percentile(&p.ttft_ms, 99.0),
                "inter_token_ms_p99": percentile(&p.itl_ms, 99.0),
            })
        })
        .collect();
    let report = serde_json::json!({
        "model": format!("{} {} layers {}", info.model_file, info.layers, info.quantization),
        "max_tokens": cli.max_tokens,
        "single_stream_tok_per_s": single,
        "llamacpp_single_tok_per_s": llama_at(1),
        "levels": rows,
        "phases": ours.iter().map(Phase::json).collect::<Vec<_>>(),
    });
    if let Some(path) = &cli.plot {
        let mut series = vec![(
            "instinfer (gRPC streams)".to_string(),
            std::iter::once((1.0, single))
                .chain(ours.iter().map(|p| (p.streams as f64, p.aggregate_tps)))
                .collect(),
        )];
        if !llama.is_empty() {
            series.push((
                "llama.cpp (llama_batch)".to_string(),
                llama.iter().map(|&(n, v)| (n as f64, v)).collect(),
            ));
        }
        instinfer_benches::plot::register_font()?;
        instinfer_benches::plot::lines(
            path,
            "Aggregate decode throughput against concurrent sequences",
            ("concurrent sequences", "aggregate tok/s"),
            &series,
            None,
        )?;
    }
    if cli.json {
        println!("{report}");
    } else {
        println!("single stream (mean of the phases): {single:.1} tok/s");
        for r in &rows {
            println!(
                "{:>3} streams: {:.1} tok/s = {:.2}x single; llama.cpp {:.1} tok/s; ours / llama.cpp {:.2}",
                r["streams"],
                r["aggregate_tok_per_s"].as_f64().unwrap_or(f64::NAN),
                r["over_single_stream"].as_f64().unwrap_or(f64::NAN),
                r["llamacpp_aggregate_tok_per_s"].as_f64().unwrap_or(f64::NAN),
                r["over_llamacpp"].as_f64().unwrap_or(f64::NAN),
            );
        }
        if !llama.is_empty() {
            println!("llama.cpp single sequence: {:.1} tok/s", llama_at(1));
        }
    }
    Ok(())
}

/// llama.cpp's aggregate decode tok/s at 1 and each of `levels` sequences, from the
/// repository's llama-cpp-python script (same GGUF, same threads, same prompt).
fn run_llamacpp_batched(
    model: &std::path::Path,
    levels: &[usize],
    gen: u32,
    threads: usize,
) -> Result<Vec<(usize, f64)>> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/llamacpp/bench_llamacpp_batched.py"
    );
    let mut seqs = vec![1];
    seqs.extend(levels.iter().copied().filter(|&n| n != 1));
    let list: Vec<String> = seqs.iter().map(usize::to_string).collect();
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(model)
        .args(["--sequences", &list.join(",")])
        .args([
            "--gen-tokens",
            &gen.to_string(),
            "--threads",
            &threads.to_string(),
        ])
        .output()
        .context("running python3 (is llama-cpp-python installed?)")?;
    if !out.status.success() {
        bail!(
            "llama.cpp batched bench: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("failed")
        );
    }
    let mut got = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).context("llama.cpp batched bench output")?;
        let n = v["sequences"].as_u64().context("no sequences")? as usize;
        let tps = v["aggregate_decode_tok_per_s"]
            .as_f64()
            .context("no aggregate_decode_tok_per_s")?;
        got.push((n, tps));
    }
    Ok(got)
}
