//! Helpers for the daemon's integration tests: the real default model, real servers on
//! loopback (ephemeral ports), a tonic client, and the in-process generation to compare with.
#![allow(dead_code)]

use instinfer::config::{Config, ConfigLayer, KvCache};
use instinfer::server::{self, ServerHandle};
use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use instinfer_runtime::generate::{GenerateOutput, GenerateRequest, Generator};
use instinfer_runtime::LoadedModel;
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub mod process;

#[path = "../../../runtime/tests/common/mod.rs"]
mod common;
/// The default model file (fetched with pip into the cache on first use).
pub use common::model_path;

/// The default model, loaded once per test binary.
pub fn loaded() -> Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL
        .get_or_init(|| Arc::new(LoadedModel::load(&model_path()).expect("load the model")))
        .clone()
}

/// Loopback, ephemeral ports, two compute threads, the KV cache in RAM (a test that wants
/// flash sets `kv_cache` and a small store in a temporary folder); `f` adjusts the rest.
pub fn config(f: impl FnOnce(&mut ConfigLayer)) -> Config {
    let mut l = ConfigLayer {
        grpc_addr: Some("127.0.0.1:0".parse().unwrap()),
        http_addr: Some("127.0.0.1:0".parse().unwrap()),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        threads: Some(2),
        shutdown_grace_ms: Some(2_000),
        kv_cache: Some(KvCache::Ram),
        ..Default::default()
    };
    f(&mut l);
    Config::resolve(l).expect("valid test config")
}

pub async fn start(config: &Config) -> ServerHandle {
    server::start(config, loaded())
        .await
        .expect("start the server")
}

pub async fn client(h: &ServerHandle) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{}", h.grpc_addr()))
        .await
        .expect("connect")
}

pub fn text_request(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(prompt.into())),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

pub fn token_request(ids: Vec<u32>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Tokens(pb::TokenPrompt {
            ids,
        })),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

/// A whole stream.
#[derive(Debug, Default)]
pub struct Streamed {
    pub request_id: String,
    pub ids: Vec<u32>,
    pub text: String,
    pub finished: Option<pb::Finished>,
    /// Messages after the finish message (there must be none).
    pub after_finish: usize,
}

impl Streamed {
    pub fn reason(&self) -> pb::FinishReason {
        let f = self
            .finished
            .as_ref()
            .expect("the stream has a finish message");
        pb::FinishReason::try_from(f.reason).expect("known finish reason")
    }
    pub fn usage(&self) -> pb::Usage {
        self.finished.as_ref().and_then(|f| f.usage).expect("usage")
    }
}

/// Read a stream to its end.
pub async fn collect(mut s: tonic::Streaming<pb::GenerateResponse>) -> Streamed {
    let mut out = Streamed::default();
    while let Some(msg) = s.message().await.expect("stream message") {
        out.request_id = msg.request_id;
        if out.finished.is_some() {
            out.after_finish += 1;
        }
        match msg.event.expect("an event") {
            pb::generate_response::Event::Token(t) => {
                out.ids.push(t.id);
                out.text.push_str(&t.text);
            }
            pb::generate_response::Event::Finished(f) => {
                out.text.push_str(&f.text);
                out.finished = Some(f);
            }
        }
    }
    out
}

pub async fn generate(c: &mut InferenceClient<Channel>, req: pb::GenerateRequest) -> Streamed {
    collect(c.generate(req).await.expect("generate").into_inner()).await
}

/// The status of a Generate call that must fail before streaming.
pub async fn refused(c: &mut InferenceClient<Channel>, req: pb::GenerateRequest) -> tonic::Status {
    match c.generate(req).await {
        Ok(s) => {
            let got = collect(s.into_inner()).await;
            panic!("expected an error status, got a stream: {got:?}")
        }
        Err(status) => status,
    }
}

/// The in-process generation (RAM KV cache) of `prompt` with `prefill_chunk`.
pub fn in_process(
    prompt: Vec<u32>,
    max_tokens: usize,
    stop: &[&str],
    ignore_eos: bool,
    prefill_chunk: usize,
) -> GenerateOutput {
    let l = loaded();
    let mut generator = Generator::new(&l.model, &l.tokenizer);
    generator.prefill_chunk = prefill_chunk;
    let mut req = GenerateRequest::new(prompt, max_tokens);
    req.stop = stop.iter().map(|s| s.to_string()).collect();
    req.ignore_eos = ignore_eos;
    let mut cache = l.model.new_ram_cache();
    generator
        .generate(&mut cache, &req, |_, _| ControlFlow::Continue(()))
        .expect("in-process generation")
}

pub fn encode(text: &str) -> Vec<u32> {
    loaded().tokenizer.encode(text, true).expect("tokenize")
}

pub async fn stats(c: &mut InferenceClient<Channel>) -> pb::Stats {
    c.get_stats(pb::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
}

/// Poll GetStats until `pred` holds (or fail after `timeout`).
pub async fn wait_for_stats(
    c: &mut InferenceClient<Channel>,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&pb::Stats) -> bool,
) -> pb::Stats {
    let t = Instant::now();
    loop {
        let s = stats(c).await;
        if pred(&s) {
            return s;
        }
        assert!(t.elapsed() < timeout, "timed out waiting for {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET `path` from the metrics endpoint; returns the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).expect("utf-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// The value of the sample `name` (with its labels, as printed) in a Prometheus text page.
pub fn metric(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{page}"))
}
