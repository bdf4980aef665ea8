//! The well-behaved load: requests (prompt × attention mode) with greedy decoding, their
//! reference tokens from a run without faults, and the stream workers of the chaos phase
//! that check every token received against that reference.

use anyhow::{Context, Result};
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

/// One request of the workload.
#[derive(Clone, Debug)]
pub struct Job {
    /// The prompt (long enough to fill several KV pages).
    pub prompt: String,
    /// The attention mode.
    pub mode: pb::AttentionMode,
}

/// The workload: `prompts` distinct prompts of about `words` words, each in every attention
/// mode.
pub fn jobs(prompts: usize, words: usize) -> Vec<Job> {
    const TEXT: &str = "The lighthouse keeper climbed the stairs at dusk, counted the ships \
        on the horizon, wrote the weather in the log, trimmed the wick and watched the beam \
        sweep over the rocks while the tide came in across the sand.";
    let base: Vec<&str> = TEXT.split_whitespace().collect();
    let modes = [
        pb::AttentionMode::Full,
        pb::AttentionMode::Flexgen,
        pb::AttentionMode::Sparse,
    ];
    let mut out = Vec::new();
    for p in 0..prompts {
        let mut words_out = vec![format!("Log book {p}, entry {}:", p * 7 + 3)];
        words_out.extend((0..words).map(|i| base[(i + p * 5) % base.len()].to_string()));
        words_out.push("Summarize the entry.".into());
        let prompt = words_out.join(" ");
        for &mode in &modes {
            out.push(Job {
                prompt: prompt.clone(),
                mode,
            });
        }
    }
    out
}

/// How one Generate call ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The token ids received, in order.
    pub ids: Vec<u32>,
    /// `None`: finished normally; else the status code and message of the failure (a gRPC
    /// status, or a Finished message with an error code).
    pub error: Option<(Code, String)>,
    /// When the call started.
    pub started: Instant,
    /// When its first token arrived.
    pub first_token: Option<Instant>,
    /// When the call ended.
    pub ended: Instant,
}

/// Run `job` once on `client`: greedy, `max_tokens` tokens, EOS ignored.
pub async fn generate(
    client: &mut InferenceClient<tonic::transport::Channel>,
    job: &Job,
    max_tokens: u32,
) -> Outcome {
    let started = Instant::now();
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(job.prompt.clone())),
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        attention: job.mode as i32,
        ..Default::default()
    };
    let mut ids = Vec::new();
    let mut first_token = None;
    let error = match client.generate(req).await {
        Err(s) => Some((s.code(), s.message().to_string())),
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match stream.message().await {
                    Err(s) => break Some((s.code(), s.message().to_string())),
                    Ok(None) => {
                        break Some((Code::Unknown, "stream ended without Finished".into()))
                    }
                    Ok(Some(msg)) => match msg.event {
                        Some(pb::generate_response::Event::Token(t)) => {
                            first_token.get_or_insert_with(Instant::now);
                            ids.push(t.id)
                        }
                        Some(pb::generate_response::Event::Finished(f)) => {
                            break match pb::FinishReason::try_from(f.reason) {
                                Ok(pb::FinishReason::Error) | Ok(pb::FinishReason::Aborted) => {
                                    Some((Code::from_i32(f.error_code), f.message))
                                }
                                _ => None,
                            }
                        }
                        None => {}
                    },
                }
            }
        }
    };
    Outcome {
        ids,
        error,
        started,
        first_token,
        ended: Instant::now(),
    }
}

/// Connect to the daemon (lazily: a call while it is down fails with UNAVAILABLE, and the
/// channel reconnects once it is back).
pub fn channel(grpc: SocketAddr) -> Result<InferenceClient<tonic::transport::Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    Ok(InferenceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

/// The reference tokens of every job: each run twice, a few at a time, on a daemon without
/// faults (the second run, a prefix-cache hit, must agree with the first). Returns the
/// tokens and the jobs whose two runs disagreed.
pub async fn reference(
    grpc: SocketAddr,
    jobs: &[Job],
    max_tokens: u32,
) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let mut client = channel(grpc)?;
    let mut refs = Vec::with_capacity(jobs.len());
    let mut unstable = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let a = generate(&mut client, job, max_tokens).await;
        if let Some((code, msg)) = &a.error {
            anyhow::bail!("reference job {i} failed without faults: {code:?} {msg}");
        }
        let b = generate(&mut client, job, max_tokens).await;
        if b.error.is_some() || b.ids != a.ids {
            unstable.push(i);
        }
        refs.push(a.ids);
    }
    Ok((refs, unstable))
}

/// Everything the stream workers saw.
#[derive(Default)]
pub struct Tally {
    /// Every call's job index and outcome.
    pub calls: Vec<(usize, Outcome)>,
}

/// `streams` workers that run jobs back to back until `deadline`, each call's outcome
/// recorded in `tally`. Calls that fail while the daemon is down are retried after a pause.
pub async fn workers(
    grpc: SocketAddr,
    jobs: Arc<Vec<Job>>,
    streams: usize,
    max_tokens: u32,
    deadline: Instant,
    tally: Arc<Mutex<Tally>>,
) -> Result<()> {
    let mut handles = Vec::new();
    for w in 0..streams {
        let (jobs, tally) = (jobs.clone(), tally.clone());
        let mut client = channel(grpc).context("a worker's channel")?;
        handles.push(tokio::spawn(async move {
            let mut round = 0;
            while Instant::now() < deadline {
                let j = (w * 7 + round) % jobs.len();
                round += 1;
                let out = generate(&mut client, &jobs[j], max_tokens).await;
                let down = matches!(&out.error, Some((Code::Unavailable, _)));
                tally
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .calls
                    .push((j, out));
                if down {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.context("a stream worker panicked")?;
    }
    Ok(())
}
