//! The OpenAI-compatible HTTP API against a real server on loopback, with a real HTTP
//! client (reqwest): the answers' shapes, greedy text equal to gRPC's, streaming, logprobs,
//! every error status, a client that goes away, and the drain.

mod server_support;

use serde_json::{json, Value};
use server_support::*;
use std::time::{Duration, Instant};

fn url(h: &instinfer::server::ServerHandle, path: &str) -> String {
    format!(
        "http://{}{path}",
        h.http_addr().expect("the HTTP API is on")
    )
}

async fn post(h: &instinfer::server::ServerHandle, path: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(url(h, path))
        .json(&body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    (status, r.json().await.expect("a JSON body"))
}

/// The data of every server-sent event of a streamed answer, in order (`[DONE]` included).
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    let ctype = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let body = resp.text().await.expect("the stream");
    body.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

fn error_of(v: &Value) -> (&str, Option<&str>, &str) {
    let e = &v["error"];
    (
        e["type"].as_str().expect("error.type"),
        e["param"].as_str(),
        e["message"].as_str().expect("error.message"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_greedy_equals_grpc_and_streams_the_same_text() {
    let h = start(&config(|_| {})).await;
    let mut c = client(&h).await;
    let question = "What is the capital of France?";

    let grpc = generate(
        &mut c,
        instinfer_proto::v1::GenerateRequest {
            prompt: Some(instinfer_proto::v1::generate_request::Prompt::Chat(
                instinfer_proto::v1::ChatPrompt {
                    messages: vec![instinfer_proto::v1::ChatMessage {
                        role: "user".into(),
                        content: question.into(),
                    }],
                    add_generation_prompt: None,
                },
            )),
            max_tokens: Some(24),
            ..Default::default()
        },
    )
    .await;

    let (status, models) = {
        let r = reqwest::get(url(&h, "/v1/models")).await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 200);
    let model = models["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(models["object"], "list");

    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 24, "temperature": 0,
    });
    let (status, v) = post(&h, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(
        choice["message"]["content"],
        grpc.text.as_str(),
        "HTTP = gRPC"
    );
    let want_reason = match grpc.reason() {
        instinfer_proto::v1::FinishReason::Stop => "stop",
        _ => "length",
    };
    assert_eq!(choice["finish_reason"], want_reason);
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], grpc.usage().prompt_tokens);
    assert_eq!(u["completion_tokens"], grpc.usage().generated_tokens);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        (grpc.usage().prompt_tokens + grpc.usage().generated_tokens) as u64
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());

    // The same request streamed, with usage at the end.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = reqwest::Client::new()
        .post(url(&h, "/v1/chat/completions"))
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let events = sse_events(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, grpc.text, "streamed = gRPC");
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], want_reason);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(
        usage_chunk["usage"]["completion_tokens"],
        grpc.usage().generated_tokens
    );
    for c in &chunks[..chunks.len() - 1] {
        assert_eq!(c["object"], "chat.completion.chunk");
        let usage = c
            .get("usage")
            .expect("include_usage puts `usage` in every chunk");
        assert!(usage.is_null(), "usage only in the last chunk: {c}");
    }

    // Health, and the requests counted under the HTTP interface.
    let r = reqwest::get(url(&h, "/health")).await.unwrap();
    assert_eq!(r.status(), 200);
    let page = http_get(h.metrics_addr(), "/metrics").await;
    let stopped = |i: &str| {
        metric(
            &page,
            &format!("instinfer_requests_total{{interface=\"{i}\",outcome=\"{want_reason}\"}}"),
        )
    };
    assert_eq!((stopped("grpc"), stopped("http")), (1.0, 2.0));
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_take_token_ids_stop_seed_and_logprobs() {
    let h = start(&config(|_| {})).await;
    let prompt = encode("The capital of France is");

    // Token ids, greedy, with the two most likely tokens at each step.
    let (status, v) = post(
        &h,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    let want = in_process(prompt.clone(), 8, &[], false, 256);
    let choice = &v["choices"][0];
    assert_eq!(choice["text"], want.text.as_str());
    let lp = &choice["logprobs"];
    let lps = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(lps.len(), want.ids.len());
    for (i, l) in lps.iter().enumerate() {
        let l = l.as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert!(
            l <= 0.0 && (l - best).abs() < 1e-6,
            "greedy picks the most likely: {lp}"
        );
        assert!(!top.is_empty() && top.len() <= 2);
    }
    let offsets = lp["text_offset"].as_array().unwrap();
    assert_eq!(offsets[0], 0);

    // Stop strings end the text before them.
    let (_, v) = post(
        &h,
        "/v1/completions",
        json!({"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 16, "temperature": 0, "stop": [" 6"]}),
    )
    .await;
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(!text.contains(" 6"), "{text:?}");

    // The same seed gives the same text at temperature > 0; seeds differ in what they give.
    let sampled = |seed: i64| {
        let h = &h;
        async move {
            let (status, v) = post(
                h,
                "/v1/completions",
                json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.9,
                       "seed": seed, "instinfer": {"ignore_eos": true}}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        }
    };
    let a = sampled(11).await;
    assert_eq!(a, sampled(11).await, "same seed, same text");
    let others = [sampled(12).await, sampled(13).await, sampled(14).await];
    assert!(others.iter().any(|o| *o != a), "seeds change the sample");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_and_eight_concurrent_streams() {
    let h = start(&config(|_| {})).await;
    let (status, v) = post(
        &h,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6,
               "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content.is_empty());
    for t in content {
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(t["token"], top[0]["token"], "greedy takes the first: {t}");
        assert_eq!(t["logprob"], top[0]["logprob"], "{t}");
        assert!(t["bytes"].is_array());
        let lps: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
        assert!(
            lps.windows(2).all(|w| w[0] >= w[1]),
            "most likely first: {t}"
        );
        let mass: f64 = lps.iter().map(|l| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-4 && lps[0] <= 0.0, "probabilities: {t}");
    }

    // Streamed, each chunk carries its token's log-probabilities, the same as above.
    let resp = reqwest::Client::new()
        .post(url(&h, "/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6,
                      "temperature": 0, "logprobs": true, "top_logprobs": 3, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let streamed: Vec<Value> = sse_events(resp)
        .await
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .flat_map(|c| {
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(&streamed, content);

    let streams: Vec<_> = (0..8)
        .map(|i| {
            let u = url(&h, "/v1/chat/completions");
            tokio::spawn(async move {
                let resp = reqwest::Client::new()
                    .post(u)
                    .json(&json!({
                        "messages": [{"role": "user", "content": format!("Tell a story ({i})")}],
                        "max_tokens": 20, "stream": true, "temperature": 0,
                        "stream_options": {"include_usage": true},
                        "instinfer": {"ignore_eos": true}
                    }))
                    .send()
                    .await
                    .unwrap();
                let events = sse_events(resp).await;
                let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
                usage["usage"]["completion_tokens"].as_u64().unwrap()
            })
        })
        .collect();
    for s in streams {
        assert_eq!(s.await.unwrap(), 20);
    }
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_openai_error_object() {
    let h = start(&config(|l| {
        l.max_request_bytes = Some(4096);
        l.max_concurrent_sequences = Some(1);
        l.max_queued_requests = Some(0);
    }))
    .await;
    let chat = |extra: Value| {
        let mut v = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    };

    // Malformed JSON: 400 that says where.
    let r = reqwest::Client::new()
        .post(url(&h, "/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"messages\": [\n  {\"role\": \"user\", \"content\": }]}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    let (kind, _, msg) = error_of(&v);
    assert_eq!(kind, "invalid_request_error");
    assert!(msg.contains("line 2 column"), "{msg}");

    // Bad fields: 400 naming them.
    for (extra, param) in [
        (json!({"n": 3}), "n"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"max_tokens": 0}), "max_tokens"),
        (json!({"stop": ["x", ""]}), "stop"),
        (
            json!({"logprobs": true, "top_logprobs": 50}),
            "top_logprobs",
        ),
        (
            json!({"messages": [{"role": "robot", "content": "x"}]}),
            "messages[0].role",
        ),
        (json!({"messages": "hi"}), "messages"),
        (
            json!({"instinfer": {"attention": "psychic"}}),
            "instinfer.attention",
        ),
    ] {
        let (status, v) = post(&h, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        let (kind, got, msg) = error_of(&v);
        assert_eq!(
            (kind, got),
            ("invalid_request_error", Some(param)),
            "{extra}: {msg}"
        );
    }
    // A limit: max_tokens over max_tokens_limit.
    let (status, v) = post(
        &h,
        "/v1/chat/completions",
        chat(json!({"max_tokens": 100000})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(error_of(&v).2.contains("max_tokens_limit"), "{v}");
    assert_eq!(error_of(&v).1, Some("max_tokens"), "{v}");

    // Unknown model: 404.
    let (status, v) = post(&h, "/v1/chat/completions", chat(json!({"model": "gpt-9"}))).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(error_of(&v).1, Some("model"));

    // Over max_request_bytes: 413.
    let big = "x".repeat(8000);
    let (status, v) = post(
        &h,
        "/v1/completions",
        json!({"prompt": big, "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 413, "{v}");
    assert!(error_of(&v).2.contains("max_request_bytes"), "{v}");

    // Unknown route and wrong method.
    let r = reqwest::get(url(&h, "/v1/nothing")).await.unwrap();
    assert_eq!(r.status(), 404);
    let r = reqwest::get(url(&h, "/v1/completions")).await.unwrap();
    assert_eq!(r.status(), 405);

    // The one slot busy and no queue: 429.
    let long = reqwest::Client::new()
        .post(url(&h, "/v1/completions"))
        .json(
            &json!({"prompt": "Go on:", "max_tokens": 2000, "stream": true,
                      "instinfer": {"ignore_eos": true}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(long.status(), 200);
    let (status, v) = post(
        &h,
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(error_of(&v).0, "rate_limit_error");
    drop(long);
    h.shutdown().await.unwrap();

    // A bearer token: 401 without it, 200 with it; /health needs none.
    let h = start(&config(|l| l.bearer_token = Some("s3cret".into()))).await;
    let (status, v) = post(&h, "/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(error_of(&v).0, "authentication_error");
    let r = reqwest::Client::new()
        .get(url(&h, "/v1/models"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for path in ["/v1/completions", "/v1/models/anything"] {
        let r = if path.ends_with("completions") {
            reqwest::Client::new()
                .post(url(&h, path))
                .json(&json!({"prompt": "hi"}))
                .send()
                .await
        } else {
            reqwest::get(url(&h, path)).await
        }
        .unwrap();
        assert_eq!(r.status(), 401, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_of(&v).0, "authentication_error", "{path}");
    }
    let r = reqwest::Client::new()
        .post(url(&h, "/v1/chat/completions"))
        .bearer_auth("s3cret")
        .json(&chat(json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        reqwest::get(url(&h, "/health")).await.unwrap().status(),
        200
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_kv_store_gives_507() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(&config(|l| {
        l.kv_cache = Some(instinfer::config::KvCache::Flash);
        l.kv_store_path = Some(dir.path().join("kv.store"));
        // 24 MiB: about a thousand tokens of KV, far less than this request reserves.
        l.kv_store_bytes = Some(24 << 20);
    }))
    .await;
    let (status, v) = post(
        &h,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 4000}),
    )
    .await;
    assert_eq!(status, 507, "{v}");
    let (kind, _, msg) = error_of(&v);
    assert_eq!(kind, "insufficient_storage");
    assert!(msg.contains("KV") || msg.contains("store"), "{msg}");
    // A request that fits still runs.
    let (status, v) = post(
        &h,
        "/v1/completions",
        json!({"prompt": "hello", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_sequence() {
    let h = start(&config(|_| {})).await;
    let mut c = client(&h).await;
    let mut resp = reqwest::Client::new()
        .post(url(&h, "/v1/chat/completions"))
        .json(
            &json!({"messages": [{"role": "user", "content": "Write a long essay."}],
                      "max_tokens": 3000, "stream": true, "instinfer": {"ignore_eos": true}}),
        )
        .send()
        .await
        .unwrap();
    // Read a few chunks, then hang up.
    let mut got = 0;
    while got < 3 {
        let chunk = resp.chunk().await.unwrap().expect("more of the stream");
        got += String::from_utf8_lossy(&chunk).matches("data:").count();
    }
    wait_for_stats(&mut c, Duration::from_secs(10), "a running sequence", |s| {
        s.kv_sequences == 1
    })
    .await;
    drop(resp);
    let s = wait_for_stats(&mut c, Duration::from_secs(20), "the KV freed", |s| {
        s.kv_sequences == 0 && s.active_sequences == 0
    })
    .await;
    assert_eq!(s.requests_cancelled, 1, "{s:?}");
    assert!(s.generated_tokens_total < 3000, "{s:?}");
    let page = http_get(h.metrics_addr(), "/metrics").await;
    assert_eq!(
        metric(
            &page,
            "instinfer_requests_total{interface=\"http\",outcome=\"cancelled\"}"
        ),
        1.0
    );
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_shows_on_health_and_refuses_new_requests() {
    let mut h = start(&config(|l| l.shutdown_grace_ms = Some(1500))).await;
    let http = reqwest::Client::new();
    let mut running = http
        .post(url(&h, "/v1/completions"))
        .json(
            &json!({"prompt": "Go on:", "max_tokens": 3000, "stream": true,
                      "instinfer": {"ignore_eos": true}}),
        )
        .send()
        .await
        .unwrap();
    running.chunk().await.unwrap().expect("a first chunk");
    let health_url = url(&h, "/health");
    let chat_url = url(&h, "/v1/chat/completions");
    h.begin_shutdown();
    let t = Instant::now();
    let health = loop {
        let r = http.get(&health_url).send().await.unwrap();
        if r.status() == 503 || t.elapsed() > Duration::from_secs(5) {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health.status(), 503);
    assert_eq!(health.json::<Value>().await.unwrap()["status"], "draining");
    let r = http
        .post(&chat_url)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // The running stream ends when the grace period runs out, with a 503 error event.
    let mut rest = String::new();
    while let Some(c) = running.chunk().await.unwrap() {
        rest.push_str(&String::from_utf8_lossy(&c));
    }
    assert!(rest.contains("\"code\":\"aborted\""), "{rest}");
    assert!(rest.contains("aborted after"), "{rest}");
    assert!(!rest.contains("finish_reason\":\"stop"), "{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    h.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_chunks_before_the_generation_ends() {
    use std::io::BufRead;
    let h = start(&config(|_| {})).await;
    let addr = h.http_addr().unwrap();
    let lines = tokio::task::spawn_blocking(move || {
        let mut child = std::process::Command::new("curl")
            .args([
                "-N",
                "-s",
                "-S",
                "-H",
                "content-type: application/json",
                "-d",
            ])
            .arg(
                json!({"prompt": "Tell me a story:", "max_tokens": 120, "stream": true,
                       "instinfer": {"ignore_eos": true}})
                .to_string(),
            )
            .arg(format!("http://{addr}/v1/completions"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("curl (apt install curl)");
        let start = Instant::now();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let lines: Vec<(Duration, String)> = out
            .lines()
            .map(|l| (start.elapsed(), l.unwrap()))
            .filter(|(_, l)| l.starts_with("data:"))
            .collect();
        assert!(child.wait().unwrap().success());
        lines
    })
    .await
    .unwrap();
    assert!(lines.len() > 100, "{} events", lines.len());
    let (first, _) = lines[0];
    let (last, done) = lines.last().unwrap();
    assert_eq!(done, "data: [DONE]");
    // 120 tokens take far longer than the first one: the chunks came as they were made.
    assert!(
        *last > first * 2 && *last - first > Duration::from_millis(200),
        "first chunk at {first:?}, [DONE] at {last:?}"
    );
    h.shutdown().await.unwrap();
}

/// With TLS configured, the HTTP API speaks HTTPS with the gRPC server's certificate (curl
/// trusting that certificate), and refuses plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_grpc_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let h = start(&config(|l| {
        l.tls_cert_path = Some(cert_path.clone());
        l.tls_key_path = Some(key_path.clone());
    }))
    .await;
    let port = h.http_addr().unwrap().port();
    let out = tokio::task::spawn_blocking(move || {
        let https = std::process::Command::new("curl")
            .args(["-s", "-S", "--fail-with-body", "--cacert"])
            .arg(&cert_path)
            .args(["-H", "content-type: application/json", "-d"])
            .arg(
                json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
                    .to_string(),
            )
            .arg(format!("https://localhost:{port}/v1/completions"))
            .output()
            .expect("curl");
        let plain = std::process::Command::new("curl")
            .args(["-s", "-S", "--max-time", "5"])
            .arg(format!("http://localhost:{port}/health"))
            .output()
            .expect("curl");
        (https, plain)
    })
    .await
    .unwrap();
    let (https, plain) = out;
    assert!(
        https.status.success(),
        "{}",
        String::from_utf8_lossy(&https.stderr)
    );
    let v: Value = serde_json::from_slice(&https.stdout).unwrap();
    let want = in_process(encode("The capital of France is"), 4, &[], false, 256);
    assert_eq!(v["choices"][0]["text"], want.text.as_str(), "{v}");
    assert!(
        !plain.status.success(),
        "plain HTTP must not be served on the TLS port"
    );
    h.shutdown().await.unwrap();
}
