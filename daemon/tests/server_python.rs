//! A client nobody here wrote: Python's grpcio, with stubs that grpcio-tools generates from
//! the .proto file at test time, talks to the real server (daemon/tests/python/grpc_client.py);
//! and the official `openai` package talks to its HTTP API (daemon/tests/python/openai_client.py).
//!
//! The Python interpreter is `$INSTINFER_TEST_PYTHON` or `python3`; it needs grpcio,
//! grpcio-tools, grpcio-health-checking and grpcio-reflection (scripts/test.sh installs them
//! in a venv).

mod server_support;

use server_support::*;
use std::path::Path;
use std::process::Command;

fn python() -> String {
    std::env::var("INSTINFER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_streams_checks_health_and_reads_model_info() {
    let py = python();
    let probe = Command::new(&py)
        .args([
            "-c",
            "import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2, grpc_reflection.v1alpha",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    assert!(
        probe.status.success(),
        "{py} lacks grpcio, grpcio-tools, grpcio-health-checking or grpcio-reflection ({}); run scripts/test.sh, which installs them, or set INSTINFER_TEST_PYTHON to a Python that has them",
        String::from_utf8_lossy(&probe.stderr).trim()
    );

    let h = start(&config(|_| {})).await;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("tests/python/grpc_client.py");
    let proto_root = manifest.join("../proto");
    let prompt = "The capital of France is";
    let addr = h.grpc_addr().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .args(["--addr", &addr, "--prompt", prompt, "--max-tokens", "20"])
            .arg("--proto-root")
            .arg(proto_root)
            .output()
            .expect("run the Python client")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "Python client failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    assert_eq!(v["health"][""], "SERVING", "{v}");
    assert_eq!(v["health"]["instinfer.v1.Inference"], "SERVING", "{v}");
    assert_eq!(
        v["reflected_methods"],
        serde_json::json!([
            "Abort",
            "ClearCache",
            "Generate",
            "GetModelInfo",
            "GetStats"
        ]),
        "{v}"
    );
    let cfg = &loaded().model.config;
    assert_eq!(v["model"]["architecture"], "llama");
    assert_eq!(v["model"]["layers"], cfg.n_layers);
    assert_eq!(v["model"]["context_length"], cfg.context_len);
    assert_eq!(v["model"]["kv_bytes_per_token"], 23_040);
    assert_eq!(v["model"]["quantization"], "Q4_1");

    let want = in_process(encode(prompt), 20, &[], false, 512);
    assert_eq!(v["ids"], serde_json::json!(want.ids), "{v}");
    assert_eq!(v["text"], want.text, "{v}");
    assert_eq!(v["finish_reason"], "FINISH_REASON_LENGTH");
    assert_eq!(v["generated_tokens"], want.ids.len());
    assert_eq!(v["prompt_tokens"], want.prompt_tokens);
    assert_eq!(v["request_ids"], serde_json::json!(["python-client"]));
    assert_eq!(v["requests_length"], 1);
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_sees_cached_tokens_and_the_cache_choice() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let h = start(&config(|l| {
        l.kv_cache = Some(instinfer::config::KvCache::Flash);
        l.kv_store_path = Some(dir.path().join("kv.store"));
        l.kv_store_bytes = Some(128 << 20);
    }))
    .await;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("tests/python/prefix_client.py");
    let proto_root = manifest.join("../proto");
    let prompt = "Flash keeps the pages of keys and values, and the drive reads only the pages that matter. ".repeat(8);
    let private =
        "A private note that must not stay on the disk after this request ends. ".repeat(8);
    let addr = h.grpc_addr().to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .args(["--addr", &addr, "--prompt", &prompt, "--private", &private])
            .arg("--proto-root")
            .arg(proto_root)
            .output()
            .expect("run the Python client")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "Python client failed:\n{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let prompt_tokens = v["first"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 64, "{v}");
    assert_eq!(v["first"]["cached_tokens"], 0, "{v}");
    assert_eq!(
        v["second"]["cached_tokens"].as_u64().unwrap(),
        (prompt_tokens - 2) / 32 * 32,
        "{v}"
    );
    assert_eq!(v["first"]["ids"], v["second"]["ids"], "{v}");
    assert_eq!(v["private_off"]["cached_tokens"], 0, "{v}");
    assert_eq!(v["private_use_only"]["cached_tokens"], 0, "{v}");
    assert_eq!(v["private_off"]["ids"], v["private_use_only"]["ids"], "{v}");
    assert!(
        v["pages_dropped"].as_u64().unwrap() >= prompt_tokens / 32,
        "{v}"
    );
    assert_eq!(v["after_clear"]["cached_tokens"], 0, "{v}");
    h.shutdown().await.unwrap();
}

/// The official `openai` package, unchanged, against the HTTP API
/// (daemon/tests/python/openai_client.py): streaming chat with usage, a completion, stop,
/// seed, logprobs, 8 concurrent streams and a 429 beside them, a client that goes away, and
/// every error status with OpenAI's error object. The KV cache is on flash, small enough
/// that a request for 4000 tokens gets 507.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_openai_client_against_the_http_api() {
    let py = python();
    let probe = Command::new(&py)
        .args(["-c", "import openai, httpx"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {py}: {e}"));
    assert!(
        probe.status.success(),
        "{py} lacks the openai package ({}); run scripts/test.sh, which installs it, or set INSTINFER_TEST_PYTHON to a Python that has it",
        String::from_utf8_lossy(&probe.stderr).trim()
    );
    let dir = tempfile::tempdir().unwrap();
    let h = start(&config(|l| {
        l.kv_cache = Some(instinfer::config::KvCache::Flash);
        l.kv_store_path = Some(dir.path().join("kv.store"));
        // About 3,300 tokens of KV: room for 8 streams of 160 tokens, not for one of 4000.
        l.kv_store_bytes = Some(80 << 20);
        l.max_concurrent_sequences = Some(8);
        l.max_queued_requests = Some(0);
        l.max_request_bytes = Some(64 << 10);
        l.bearer_token = Some("py-token".into());
    }))
    .await;
    let model_id = model_id();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client.py");
    let prompt = "The capital of France is";
    let base = format!("http://{}/v1", h.http_addr().unwrap());
    let metrics = format!("http://{}", h.metrics_addr());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script)
            .args(["--base-url", &base, "--metrics", &metrics])
            .args([
                "--token", "py-token", "--model", &model_id, "--prompt", prompt,
            ])
            .output()
            .expect("run the Python client")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "Python openai client failed:\n{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let want = in_process(encode(prompt), 20, &[], false, 256);
    assert_eq!(v["completion_text"], want.text, "{v}");
    assert_eq!(v["completion_usage"]["completion_tokens"], want.ids.len());
    assert_eq!(v["completion_usage"]["prompt_tokens"], want.prompt_tokens);
    assert!(
        v["chat_stream_usage"]["prompt_tokens_details"]["cached_tokens"].is_u64(),
        "{v}"
    );
    assert!(
        v["rate_limited"]
            .as_str()
            .unwrap()
            .contains("max_queued_requests"),
        "{v}"
    );
    assert!(v["store_full"].as_str().unwrap().contains("KV"), "{v}");
    h.shutdown().await.unwrap();
}

/// The model id the HTTP API serves: the model file's name without `.gguf`.
fn model_id() -> String {
    let name = model_path();
    let name = name.file_name().unwrap().to_str().unwrap();
    name.strip_suffix(".gguf").unwrap_or(name).to_string()
}
