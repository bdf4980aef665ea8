//! loadbench: load on a running instinferd through its gRPC API.
//!
//! First one stream alone, then `--streams` concurrent Generate streams of `--max-tokens`
//! tokens each (end-of-generation ignored, so every stream runs to its length), one
//! connection per stream, all started together. Reports aggregate tok/s against the single
//! stream and time-to-first-token percentiles under load, and fails if any stream errors or
//! comes back short.
//!
//!   instinferd &                      # the server under test
//!   loadbench --server 127.0.0.1:50051 --streams 32 --max-tokens 128

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
}

/// What one stream measured, on the client's clock.
#[derive(Debug)]
struct StreamResult {
    tokens: usize,
    ttft: Duration,
    total: Duration,
    server_ttft_ms: f64,
    server_decode_tps: f64,
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

async fn one_stream(cli: &Cli, i: usize) -> Result<StreamResult> {
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
    while let Some(msg) = stream
        .message()
        .await
        .with_context(|| format!("stream {i}"))?
    {
        match msg.event {
            Some(pb::generate_response::Event::Token(_)) => {
                tokens += 1;
                ttft.get_or_insert_with(|| sent.elapsed());
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
                });
            }
            None => {}
        }
    }
    bail!("stream {i}: ended without a finish message")
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if cli.streams == 0 || cli.max_tokens == 0 {
        bail!("--streams and --max-tokens must be at least 1");
    }
    let mut client = connect(&cli).await?;
    let info = client
        .get_model_info(request(&cli, pb::GetModelInfoRequest {})?)
        .await
        .context("GetModelInfo")?
        .into_inner();

    // Warm-up, then one stream alone.
    let warm = Cli {
        max_tokens: 8,
        ..cli.clone()
    };
    one_stream(&warm, usize::MAX).await.context("warm-up")?;
    let single = one_stream(&cli, 0).await.context("single stream")?;
    let single_tps = single.tokens as f64 / single.total.as_secs_f64();

    // All streams at once.
    let start = Instant::now();
    let cli = std::sync::Arc::new(cli);
    let tasks: Vec<_> = (0..cli.streams)
        .map(|i| {
            let cli = cli.clone();
            tokio::spawn(async move { one_stream(&cli, i + 1).await })
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
    let aggregate_tps = tokens as f64 / wall.as_secs_f64();
    let mut ttft: Vec<f64> = results.iter().map(|r| ms(r.ttft)).collect();
    ttft.sort_by(f64::total_cmp);
    let mut server_ttft: Vec<f64> = results.iter().map(|r| r.server_ttft_ms).collect();
    server_ttft.sort_by(f64::total_cmp);
    let mut per_stream: Vec<f64> = results.iter().map(|r| r.server_decode_tps).collect();
    per_stream.sort_by(f64::total_cmp);
    let stats = client
        .get_stats(request(&cli, pb::GetStatsRequest {})?)
        .await
        .context("GetStats")?
        .into_inner();

    let report = serde_json::json!({
        "model": format!("{} {} layers {}", info.model_file, info.layers, info.quantization),
        "streams": cli.streams,
        "max_tokens": cli.max_tokens,
        "completed": results.len(),
        "errors": errors.len(),
        "single_stream_tok_per_s": single_tps,
        "single_stream_ttft_ms": ms(single.ttft),
        "aggregate_tok_per_s": aggregate_tps,
        "speedup": aggregate_tps / single_tps,
        "wall_s": wall.as_secs_f64(),
        "ttft_ms_p50": percentile(&ttft, 50.0),
        "ttft_ms_p99": percentile(&ttft, 99.0),
        "server_ttft_ms_p50": percentile(&server_ttft, 50.0),
        "server_ttft_ms_p99": percentile(&server_ttft, 99.0),
        "per_stream_decode_tok_per_s_p50": percentile(&per_stream, 50.0),
        "server_scheduler_steps": stats.scheduler_steps,
    });
    if cli.json {
        println!("{report}");
    } else {
        println!("model: {}", report["model"].as_str().unwrap_or_default());
        println!(
            "single stream: {single_tps:.1} tok/s ({} tokens, TTFT {:.0} ms)",
            single.tokens,
            ms(single.ttft)
        );
        println!(
            "{} streams x {} tokens: {}/{} completed, {} errors, {:.2} s",
            cli.streams,
            cli.max_tokens,
            results.len(),
            cli.streams,
            errors.len(),
            wall.as_secs_f64()
        );
        println!(
            "aggregate: {aggregate_tps:.1} tok/s = {:.2}x the single stream",
            aggregate_tps / single_tps
        );
        println!(
            "TTFT under load (client): p50 {:.0} ms, p99 {:.0} ms; (server) p50 {:.0} ms, p99 {:.0} ms",
            percentile(&ttft, 50.0),
            percentile(&ttft, 99.0),
            percentile(&server_ttft, 50.0),
            percentile(&server_ttft, 99.0)
        );
        println!(
            "per-stream decode under load: p50 {:.1} tok/s",
            percentile(&per_stream, 50.0)
        );
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!("{} of {} streams failed", errors.len(), cli.streams);
    }
    Ok(())
}
