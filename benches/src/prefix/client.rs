//! A blocking gRPC client of the daemon under test (the generated tonic client on a
//! single-threaded runtime of its own), and one Generate call's outcome.

use crate::daemon::Daemon;
use anyhow::{bail, Context, Result};
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// A connection to the daemon.
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: InferenceClient<Channel>,
}

/// What one Generate stream returned.
#[derive(Clone, Debug)]
pub struct Generated {
    /// The streamed token ids, in order.
    pub ids: Vec<u32>,
    /// All text: the tokens' text and the finish message's.
    pub text: String,
    /// Why it ended.
    pub reason: pb::FinishReason,
    /// The server's usage figures.
    pub usage: pb::Usage,
    /// From sending the request to the first token, on the client's clock.
    pub client_ttft_ms: f64,
    /// From sending the request to the end of the stream.
    pub wall_ms: f64,
}

impl Client {
    /// Connect to the daemon at `addr`, retrying (while `daemon` runs) until it answers
    /// GetModelInfo or `timeout` passes. Returns the client and the model's description.
    pub fn wait_ready(
        addr: SocketAddr,
        daemon: &mut Daemon,
        timeout: Duration,
    ) -> Result<(Client, pb::ModelInfo)> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let uri = format!("http://{addr}");
        let deadline = Instant::now() + timeout;
        loop {
            daemon.check_alive()?;
            let attempt = rt.block_on(async {
                let mut c = InferenceClient::connect(uri.clone()).await?;
                let info = c.get_model_info(pb::GetModelInfoRequest {}).await?;
                anyhow::Ok((c, info.into_inner()))
            });
            match attempt {
                Ok((inner, info)) => return Ok((Client { rt, inner }, info)),
                Err(e) if Instant::now() >= deadline => {
                    return Err(e).with_context(|| {
                        format!(
                            "instinferd did not answer on {addr} within {} s",
                            timeout.as_secs()
                        )
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// The server's counters.
    pub fn stats(&mut self) -> Result<pb::Stats> {
        let inner = &mut self.inner;
        self.rt
            .block_on(inner.get_stats(pb::GetStatsRequest {}))
            .map(|r| r.into_inner())
            .context("GetStats")
    }

    /// Empty the prefix cache; returns the pages dropped.
    pub fn clear_cache(&mut self) -> Result<u64> {
        let inner = &mut self.inner;
        self.rt
            .block_on(inner.clear_cache(pb::ClearCacheRequest {}))
            .map(|r| r.into_inner().pages_dropped)
            .context("ClearCache")
    }

    /// Run one generation to its end; an error if the stream fails or ends with ERROR or
    /// ABORTED.
    pub fn generate(&mut self, req: pb::GenerateRequest) -> Result<Generated> {
        let inner = &mut self.inner;
        self.rt.block_on(async {
            let sent = Instant::now();
            let mut stream = inner.generate(req).await.context("Generate")?.into_inner();
            let (mut ids, mut text, mut first) = (Vec::new(), String::new(), None);
            while let Some(msg) = stream.message().await.context("Generate stream")? {
                match msg.event {
                    Some(pb::generate_response::Event::Token(t)) => {
                        first.get_or_insert_with(|| sent.elapsed());
                        ids.push(t.id);
                        text.push_str(&t.text);
                    }
                    Some(pb::generate_response::Event::Finished(f)) => {
                        text.push_str(&f.text);
                        let reason = pb::FinishReason::try_from(f.reason)
                            .unwrap_or(pb::FinishReason::Unspecified);
                        if matches!(
                            reason,
                            pb::FinishReason::Error
                                | pb::FinishReason::Aborted
                                | pb::FinishReason::Unspecified
                        ) {
                            bail!("request {} ended {reason:?}: {}", msg.request_id, f.message);
                        }
                        return Ok(Generated {
                            ids,
                            text,
                            reason,
                            usage: f.usage.unwrap_or_default(),
                            client_ttft_ms: first.unwrap_or_default().as_secs_f64() * 1e3,
                            wall_ms: sent.elapsed().as_secs_f64() * 1e3,
                        });
                    }
                    None => {}
                }
            }
            bail!("the stream ended without its finish message")
        })
    }
}
