//! chaosbench: 32 streams against a real `instinferd` under injected read errors and bit
//! flips, hostile clients and one SIGKILL with restart; every token received is checked
//! against a fault-free run of the same requests. See `instinfer_benches::chaos`.

use anyhow::{Context, Result};
use clap::Parser;
use instinfer_benches::chaos::{hostile, report, streams};
use instinfer_benches::daemon::{free_local_addr, Daemon, DaemonConfig};
use instinfer_benches::{files, plot};
use instinfer_proto::v1 as pb;
use instinfer_runtime::fetch;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "chaosbench",
    about = "instinferd under storage faults, hostile clients and a SIGKILL: what the clients got"
)]
struct Cli {
    /// The instinferd binary [default: the one next to this executable].
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// GGUF model [default: SmolLM2-135M-Instruct, fetched on first use].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent well-behaved streams.
    #[arg(long, default_value_t = 32)]
    streams: usize,
    /// Length of the chaos phase in seconds.
    #[arg(long, default_value_t = 90)]
    duration_s: u64,
    /// When in the chaos phase the daemon is killed with SIGKILL and restarted, in seconds.
    #[arg(long, default_value_t = 40)]
    kill_at_s: u64,
    /// Tokens per request (greedy, EOS ignored).
    #[arg(long, default_value_t = 24)]
    max_tokens: u32,
    /// Distinct prompts (each run in the full, flexgen and sparse modes).
    #[arg(long, default_value_t = 4)]
    prompts: usize,
    /// Words per prompt (about 1.3 tokens each).
    #[arg(long, default_value_t = 150)]
    words: usize,
    /// Probability that a KV store read fails with EIO.
    #[arg(long, default_value_t = 1e-4)]
    read_error: f64,
    /// Probability that a KV store read returns with a bit flipped.
    #[arg(long, default_value_t = 1e-4)]
    bit_flip: f64,
    /// Seed of the daemon's fault generator.
    #[arg(long, default_value_t = 7)]
    fault_seed: u64,
    /// Slowloris connections held open at once.
    #[arg(long, default_value_t = 64)]
    slowloris: usize,
    /// Streams the reset flood opens and resets.
    #[arg(long, default_value_t = 10_000)]
    resets: usize,
    /// Clients sending oversized prompts, and each prompt's size in bytes.
    #[arg(long, default_value_t = 4)]
    oversized_clients: usize,
    #[arg(long, default_value_t = 3 << 20)]
    oversized_bytes: usize,
    /// The daemon's compute threads [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Folder the KV store is made in.
    #[arg(long, default_value = "/var/tmp")]
    store_dir: PathBuf,
    /// Folder of report.json, report.md, timeline.png and the daemon's logs.
    #[arg(long, default_value = "target/chaosbench")]
    out: PathBuf,
}

/// Wait until the daemon at `grpc` answers GetModelInfo; an error if it exits first.
async fn ready(grpc: SocketAddr, daemon: &mut Daemon, limit: Duration) -> Result<Instant> {
    let t = Instant::now();
    let mut client = streams::channel(grpc)?;
    loop {
        daemon.check_alive()?;
        if client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .is_ok()
        {
            return Ok(Instant::now());
        }
        anyhow::ensure!(
            t.elapsed() < limit,
            "instinferd did not answer within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    instinfer_runtime::logging::init_from_env("chaosbench=info,instinfer_benches=info,warn");
    let cli = Cli::parse();
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    let store_dir = tempfile_dir(&cli.store_dir)?;
    let daemon = match &cli.daemon {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("instinferd"),
    };
    let mut cfg = DaemonConfig {
        binary: daemon,
        model: fetch::resolve_model(cli.model.as_deref()).context("locating the model")?,
        store: store_dir.join("kv.store"),
        store_bytes: 1 << 30,
        threads: cli.threads,
        grpc_addr: free_local_addr()?,
        metrics_addr: free_local_addr()?,
        http_addr: Some(free_local_addr()?),
        extra_args: [
            // Every page read goes to the device, where the faults are.
            "--page-cache-bytes=0",
            "--request-read-timeout-ms=5000",
            "--max-concurrent-sequences=32",
            "--max-queued-requests=64",
        ]
        .map(String::from)
        .to_vec(),
        log: cli.out.join("instinferd-reference.log"),
        log_level: "info".into(),
    };
    let limit = Duration::from_secs(300);
    let jobs = Arc::new(streams::jobs(cli.prompts, cli.words));

    tracing::info!(jobs = jobs.len(), "reference run, without faults");
    let mut d = Daemon::spawn(&cfg)?;
    ready(cfg.grpc_addr, &mut d, limit).await?;
    let (refs, unstable) = streams::reference(cfg.grpc_addr, &jobs, cli.max_tokens).await?;
    d.stop(Duration::from_secs(30))?;

    cfg.log = cli.out.join("instinferd-chaos.log");
    let _ = std::fs::remove_file(&cfg.log);
    cfg.extra_args.extend([
        format!("--read-error-probability={}", cli.read_error),
        format!("--bit-flip-probability={}", cli.bit_flip),
        format!("--fault-seed={}", cli.fault_seed),
    ]);
    let mut d = Daemon::spawn(&cfg)?;
    ready(cfg.grpc_addr, &mut d, limit).await?;
    tracing::info!(
        streams = cli.streams,
        seconds = cli.duration_s,
        "chaos phase"
    );
    let start = Instant::now();
    let deadline = start + Duration::from_secs(cli.duration_s);
    let tally = Arc::new(Mutex::new(streams::Tally::default()));
    let http = cfg.http_addr.context("the HTTP API is on")?;
    let work = tokio::spawn(streams::workers(
        cfg.grpc_addr,
        jobs.clone(),
        cli.streams,
        cli.max_tokens,
        deadline,
        tally.clone(),
    ));
    let slow = tokio::spawn(hostile::slowloris(
        http,
        cli.slowloris,
        Duration::from_secs(1),
        deadline,
    ));
    let flood = tokio::spawn(hostile::reset_flood(cfg.grpc_addr, cli.resets, deadline));
    let big = tokio::spawn(hostile::oversized(
        cfg.grpc_addr,
        cli.oversized_clients,
        cli.oversized_bytes,
        deadline,
    ));

    tokio::time::sleep_until((start + Duration::from_secs(cli.kill_at_s)).into()).await;
    let kill = Instant::now();
    d.kill()?;
    tracing::info!("SIGKILL sent; restarting");
    let mut d = Daemon::spawn(&cfg)?;
    let back = ready(cfg.grpc_addr, &mut d, limit).await?;
    tracing::info!(
        seconds = back.duration_since(kill).as_secs_f64(),
        "serving again"
    );

    work.await.context("the stream workers")??;
    let mut r = {
        let t = tally.lock().unwrap_or_else(|p| p.into_inner());
        let r = report::classify(&t, &refs, &unstable, cli.max_tokens as usize, (kill, back));
        let png = cli.out.join("timeline.png");
        if let Err(e) = plot::register_font().and_then(|()| {
            plot::lines(
                &png,
                "chaosbench: calls and tokens over the run",
                ("seconds", "per second"),
                &report::timeline(&t, start),
                Some((
                    kill.duration_since(start).as_secs_f64(),
                    "SIGKILL + restart",
                )),
            )
        }) {
            tracing::warn!(error = %format!("{e:#}"), "no chart");
        }
        r
    };
    r.slowloris = slow.await?;
    r.reset_flood = flood.await?;
    r.oversized = big.await?;
    r.oversized.settle(kill, back);
    d.stop(Duration::from_secs(60))?;
    let log = std::fs::read_to_string(&cfg.log).unwrap_or_default();
    r.daemon_panics = log.lines().filter(|l| l.contains("panicked")).count();
    let _ = std::fs::remove_dir_all(&store_dir);

    files::write_json(&cli.out.join("report.json"), &serde_json::to_value(&r)?)?;
    let md = r.markdown();
    std::fs::write(cli.out.join("report.md"), &md)?;
    print!("{md}");
    Ok(())
}

/// A fresh folder under `base` for this run's store.
fn tempfile_dir(base: &std::path::Path) -> Result<PathBuf> {
    let dir = base.join(format!("chaosbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
