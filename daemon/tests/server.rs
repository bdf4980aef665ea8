//! The gRPC server, started for real on loopback with the real default model: streaming
//! against the in-process generation, continuous batching, Abort, client disconnects,
//! invalid fields, limits, authentication, health, reflection, TLS and the CLI client.

mod server_support;

use instinfer_proto::v1 as pb;
use instinfer_proto::v1::inference_client::InferenceClient;
use server_support::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn assert_same(label: &str, got: &Streamed, want: &instinfer_runtime::generate::GenerateOutput) {
    assert_eq!(got.ids, want.ids, "{label}: token ids");
    assert_eq!(got.text, want.text, "{label}: text");
    let reason = match want.finish {
        instinfer_runtime::generate::FinishReason::Stop => pb::FinishReason::Stop,
        instinfer_runtime::generate::FinishReason::Length => pb::FinishReason::Length,
        instinfer_runtime::generate::FinishReason::Aborted => pb::FinishReason::Aborted,
    };
    assert_eq!(got.reason(), reason, "{label}: finish reason");
    assert_eq!(got.after_finish, 0, "{label}: messages after the finish");
    let u = got.usage();
    assert_eq!(u.prompt_tokens as usize, want.prompt_tokens, "{label}");
    assert_eq!(u.generated_tokens as usize, want.ids.len(), "{label}");
    assert!(u.time_to_first_token_ms > 0.0, "{label}: {u:?}");
    if want.ids.len() > 1 {
        assert!(u.decode_tokens_per_second > 0.0, "{label}: {u:?}");
    }
    assert_eq!(u.kv_bytes_read, 0, "{label}: the KV cache is in RAM");
}

/// Text, token and chat prompts (one with a stop string), streamed at the same time so they
/// share batched steps, give exactly the tokens and text of the in-process greedy loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_equals_in_process_greedy() {
    let h = start(&config(|_| {})).await;
    let mut c = client(&h).await;
    let l = loaded();

    let text_prompt = "The capital of France is";
    let story = encode("Once upon a time, in a small village,");
    let chat_text = l
        .chat
        .as_ref()
        .expect("the default model has a chat template")
        .render(
            &[instinfer_runtime::chat::ChatMessage::user(
                "Name three uses of flash storage.",
            )],
            true,
        )
        .unwrap();

    let a = text_request(text_prompt, 24);
    let mut b = token_request(story.clone(), 40);
    b.stop = vec![".".into()];
    let mut cc = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "Name three uses of flash storage.".into(),
            }],
            add_generation_prompt: None,
        })),
        max_tokens: Some(20),
        ..Default::default()
    };
    cc.request_id = "chat-1".into();
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (ra, rb, rc) = tokio::join!(
        generate(&mut c, a),
        generate(&mut c1, b),
        generate(&mut c2, cc)
    );

    let want_a = in_process(encode(text_prompt), 24, &[], false, 512);
    let want_b = in_process(story, 40, &["."], false, 512);
    let want_c = in_process(encode(&chat_text), 20, &[], false, 512);
    assert_same("text prompt", &ra, &want_a);
    assert_same("token prompt with a stop string", &rb, &want_b);
    assert_same("chat prompt", &rc, &want_c);
    assert_eq!(
        rb.reason(),
        pb::FinishReason::Stop,
        "the stop string ends it"
    );
    assert!(
        !rb.text.contains('.'),
        "the stop string is not sent: {:?}",
        rb.text
    );
    assert_eq!(
        rc.request_id, "chat-1",
        "the client's request id comes back"
    );
    assert!(ra.request_id.starts_with("req-"), "{}", ra.request_id);

    let s = stats(&mut c).await;
    assert_eq!(s.requests_length + s.requests_stop, 3, "{s:?}");
    assert_eq!(
        s.generated_tokens_total as usize,
        ra.ids.len() + rb.ids.len() + rc.ids.len()
    );
    assert_eq!(
        (s.active_sequences, s.queued_requests, s.kv_sequences),
        (0, 0, 0)
    );
    h.shutdown().await.unwrap();
}

/// While a long prompt is prefilled chunk by chunk, a running stream keeps receiving a
/// token every step; both results still equal the in-process ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefill_chunks_interleave_with_running_decode() {
    const CHUNK: usize = 16;
    let h = start(&config(|l| l.prefill_chunk_tokens = Some(CHUNK))).await;
    let mut c = client(&h).await;
    let a_prompt = encode("Here is a list of colours:");
    let mut a = token_request(a_prompt.clone(), 96);
    a.ignore_eos = true;
    // A prompt of 26 chunks.
    let long: Vec<u32> = encode(include_str!("../../README.md"))
        .into_iter()
        .take(26 * CHUNK)
        .collect();
    assert_eq!(long.len(), 26 * CHUNK);

    let a_tokens = Arc::new(AtomicUsize::new(0));
    let mut a_stream = c.generate(a).await.unwrap().into_inner();
    let counter = a_tokens.clone();
    let a_task = tokio::spawn(async move {
        let mut out = Streamed::default();
        while let Some(msg) = a_stream.message().await.unwrap() {
            match msg.event.unwrap() {
                pb::generate_response::Event::Token(t) => {
                    out.ids.push(t.id);
                    out.text.push_str(&t.text);
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                pb::generate_response::Event::Finished(f) => {
                    out.text.push_str(&f.text);
                    out.finished = Some(f);
                }
            }
        }
        out
    });
    while a_tokens.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let before = a_tokens.load(Ordering::SeqCst);
    let mut b_stream = c
        .generate(token_request(long.clone(), 6))
        .await
        .unwrap()
        .into_inner();
    let first = b_stream
        .message()
        .await
        .unwrap()
        .expect("B's first message");
    let during = a_tokens.load(Ordering::SeqCst) - before;
    assert!(
        during >= 20,
        "the running stream got only {during} tokens while 26 prefill chunks ran"
    );
    let mut rb = collect(b_stream).await;
    if let Some(pb::generate_response::Event::Token(t)) = first.event {
        rb.ids.insert(0, t.id);
        rb.text.insert_str(0, &t.text);
    }
    let ra = a_task.await.unwrap();
    assert_same(
        "running stream",
        &ra,
        &in_process(a_prompt, 96, &[], true, 512),
    );
    assert_same(
        "chunked prompt",
        &rb,
        &in_process(long, 6, &[], false, CHUNK),
    );
    h.shutdown().await.unwrap();
}

/// Abort ends a running stream with ABORTED and frees its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_mid_stream() {
    let h = start(&config(|_| {})).await;
    let mut c = client(&h).await;
    let mut req = text_request("Count from one to one hundred:", 500);
    req.ignore_eos = true;
    req.request_id = "to-abort".into();
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut got = 0;
    while got < 3 {
        let m = stream.message().await.unwrap().unwrap();
        assert!(matches!(
            m.event,
            Some(pb::generate_response::Event::Token(_))
        ));
        got += 1;
    }
    let r = c
        .abort(pb::AbortRequest {
            request_id: "to-abort".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.found);
    let rest = collect(stream).await;
    assert_eq!(rest.reason(), pb::FinishReason::Aborted);
    let f = rest.finished.as_ref().unwrap();
    assert!(f.message.contains("Abort"), "{}", f.message);
    let generated = rest.usage().generated_tokens;
    assert!((3..500).contains(&generated), "{generated}");
    let s = wait_for_stats(&mut c, WAIT, "the sequence to be freed", |s| {
        s.kv_sequences == 0 && s.active_sequences == 0
    })
    .await;
    assert_eq!(s.requests_aborted, 1, "{s:?}");

    // An id nobody uses, and an empty one.
    let r = c
        .abort(pb::AbortRequest {
            request_id: "to-abort".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.found, "finished requests are not found");
    let e = c
        .abort(pb::AbortRequest {
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("request_id"), "{}", e.message());
    h.shutdown().await.unwrap();
}

/// A client that goes away mid-stream frees its sequence at once; GetStats and the
/// metrics endpoint both show it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_frees_the_sequence() {
    let h = start(&config(|_| {})).await;
    let mut watcher = client(&h).await;
    {
        // Its own connection, closed when dropped.
        let mut c = client(&h).await;
        let mut req = text_request("Write a long story about a dragon.", 1000);
        req.ignore_eos = true;
        let mut stream = c.generate(req).await.unwrap().into_inner();
        for _ in 0..2 {
            stream.message().await.unwrap().unwrap();
        }
        let s = stats(&mut watcher).await;
        assert_eq!((s.active_sequences, s.kv_sequences), (1, 1), "{s:?}");
    }
    let s = wait_for_stats(&mut watcher, WAIT, "the sequence to be freed", |s| {
        s.kv_sequences == 0 && s.active_sequences == 0
    })
    .await;
    assert_eq!(s.requests_cancelled, 1, "{s:?}");
    assert!(s.generated_tokens_total < 1000, "{s:?}");
    let page = http_get(h.metrics_addr(), "/metrics").await;
    assert_eq!(
        metric(
            &page,
            "instinfer_requests_total{interface=\"grpc\",outcome=\"cancelled\"}"
        ),
        1.0
    );
    assert_eq!(metric(&page, "instinfer_active_sequences"), 0.0);
    assert_eq!(metric(&page, "instinfer_kv_sequences"), 0.0);
    assert!(metric(&page, "instinfer_generated_tokens_total") >= 2.0);
    assert!(
        metric(
            &page,
            "instinfer_time_to_first_token_seconds_count{interface=\"grpc\"}"
        ) >= 1.0
    );
    assert!(metric(&page, "instinfer_time_per_output_token_seconds_count") >= 1.0);
    assert_eq!(metric(&page, "instinfer_kv_device_read_bytes_total"), 0.0);
    h.shutdown().await.unwrap();
}

/// Every invalid field gives INVALID_ARGUMENT with a message naming it; a prompt longer
/// than the context names both numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_fields_are_named() {
    let h = start(&config(|_| {})).await;
    let mut c = client(&h).await;
    let vocab = loaded().model.config.vocab_size as u32;
    let context = loaded().model.config.context_len;
    let base = || text_request("Hello", 4);
    let sampling = |f: fn(&mut pb::SamplingParams)| {
        let mut r = base();
        let mut s = pb::SamplingParams::default();
        f(&mut s);
        r.sampling = Some(s);
        r
    };
    let chat = |messages: Vec<pb::ChatMessage>| pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
            messages,
            add_generation_prompt: None,
        })),
        ..base()
    };
    let cases: Vec<(&str, pb::GenerateRequest, Vec<String>)> = vec![
        (
            "no prompt",
            pb::GenerateRequest {
                prompt: None,
                ..base()
            },
            vec!["prompt".into()],
        ),
        (
            "empty text",
            text_request("", 4),
            vec!["prompt.text".into()],
        ),
        (
            "empty ids",
            token_request(vec![], 4),
            vec!["prompt.tokens.ids".into()],
        ),
        (
            "id outside the vocabulary",
            token_request(vec![1, 2, vocab], 4),
            vec!["prompt.tokens.ids[2]".into(), vocab.to_string()],
        ),
        (
            "no messages",
            chat(vec![]),
            vec!["prompt.chat.messages".into()],
        ),
        (
            "empty role",
            chat(vec![pb::ChatMessage {
                role: String::new(),
                content: "hi".into(),
            }]),
            vec!["prompt.chat.messages[0].role".into()],
        ),
        (
            "negative temperature",
            sampling(|s| s.temperature = Some(-1.0)),
            vec!["sampling".into(), "temperature".into()],
        ),
        (
            "NaN temperature",
            sampling(|s| s.temperature = Some(f32::NAN)),
            vec!["temperature".into()],
        ),
        (
            "top_p 0",
            sampling(|s| s.top_p = Some(0.0)),
            vec!["top_p".into()],
        ),
        (
            "top_p 1.5",
            sampling(|s| s.top_p = Some(1.5)),
            vec!["top_p".into()],
        ),
        (
            "max_tokens 0",
            text_request("Hello", 0),
            vec!["max_tokens".into()],
        ),
        (
            "empty stop string",
            pb::GenerateRequest {
                stop: vec!["x".into(), String::new()],
                ..base()
            },
            vec!["stop[1]".into()],
        ),
        (
            "unknown attention mode",
            pb::GenerateRequest {
                attention: 99,
                ..base()
            },
            vec!["attention".into(), "99".into()],
        ),
        (
            "sparse attention with the KV cache in RAM",
            pb::GenerateRequest {
                attention: pb::AttentionMode::Sparse as i32,
                ..base()
            },
            vec!["attention".into(), "sparse".into(), "flash".into()],
        ),
        (
            "request id with a space",
            pb::GenerateRequest {
                request_id: "a b".into(),
                ..base()
            },
            vec!["request_id".into()],
        ),
        (
            "prompt longer than the context",
            token_request(vec![1; context + 1], 4),
            vec![
                (context + 1).to_string(),
                context.to_string(),
                "context".into(),
            ],
        ),
    ];
    for (label, req, needles) in cases {
        let e = refused(&mut c, req).await;
        assert_eq!(e.code(), Code::InvalidArgument, "{label}: {e:?}");
        for n in needles {
            assert!(
                e.message().contains(&n),
                "{label}: {n:?} not in {:?}",
                e.message()
            );
        }
    }
    let s = stats(&mut c).await;
    assert_eq!(s.requests_rejected, 16, "{s:?}");
    assert_eq!((s.kv_sequences, s.prompt_tokens_total), (0, 0), "{s:?}");
    h.shutdown().await.unwrap();
}

/// Past each configured limit: RESOURCE_EXHAUSTED naming the limit. Oversized messages are
/// refused by the transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_give_resource_exhausted() {
    let h = start(&config(|l| {
        l.max_concurrent_sequences = Some(1);
        l.max_queued_requests = Some(0);
        l.max_prompt_tokens = Some(16);
        l.max_tokens_limit = Some(1000);
        l.default_max_tokens = Some(8);
        l.max_request_bytes = Some(4096);
    }))
    .await;
    let mut c = client(&h).await;
    let e = refused(&mut c, token_request(vec![1; 17], 4)).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("17") && e.message().contains("max_prompt_tokens"),
        "{e:?}"
    );
    let e = refused(&mut c, text_request("Hello", 1001)).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_tokens_limit"), "{e:?}");
    let e = refused(&mut c, text_request(&"x".repeat(5000), 4)).await;
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("4096"), "{e:?}");

    // One slot, no queue: a second request while one runs is refused.
    let mut long = text_request("Tell me a story.", 1000);
    long.ignore_eos = true;
    long.request_id = "long".into();
    let mut running = c.generate(long).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    let e = refused(&mut c, text_request("Hello", 4)).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("max_concurrent_sequences = 1"),
        "{e:?}"
    );
    let abort = pb::AbortRequest {
        request_id: "long".into(),
    };
    assert!(c.abort(abort.clone()).await.unwrap().into_inner().found);
    assert_eq!(collect(running).await.reason(), pb::FinishReason::Aborted);
    // The slot is free again once the stream has ended.
    let ok = generate(&mut c, text_request("Hello", 2)).await;
    assert!(ok.finished.is_some());
    h.shutdown().await.unwrap();

    // One slot, one queued: the third request is refused; the queued one runs after.
    let h = start(&config(|l| {
        l.max_concurrent_sequences = Some(1);
        l.max_queued_requests = Some(1);
    }))
    .await;
    let mut c = client(&h).await;
    let mut slow = text_request("Tell me a story.", 1000);
    slow.ignore_eos = true;
    slow.request_id = "long".into();
    let mut running = c.generate(slow).await.unwrap().into_inner();
    running.message().await.unwrap().unwrap();
    let mut c2 = c.clone();
    let queued = tokio::spawn(async move { generate(&mut c2, text_request("Hi", 2)).await });
    wait_for_stats(&mut c, WAIT, "one queued request", |s| {
        s.queued_requests == 1 && s.active_sequences == 1
    })
    .await;
    let e = refused(&mut c, text_request("Hello", 2)).await;
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_queued_requests = 1"), "{e:?}");
    assert!(c.abort(abort).await.unwrap().into_inner().found);
    assert_eq!(collect(running).await.reason(), pb::FinishReason::Aborted);
    let q = queued.await.unwrap();
    assert!(q.finished.is_some(), "{q:?}");
    assert!(q.usage().queue_ms > 0.0);
    let s = stats(&mut c).await;
    assert_eq!(s.requests_rejected, 1, "{s:?}");
    h.shutdown().await.unwrap();
}

/// With a bearer token configured, Inference calls without it (or with a wrong one) are
/// UNAUTHENTICATED; health stays open for probes and answers SERVING; reflection lists the
/// services for a client with the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_health_and_reflection() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let h = start(&config(|l| l.bearer_token = Some("t0ken".into()))).await;
    let url = format!("http://{}", h.grpc_addr());
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = InferenceClient::new(channel.clone());
    let e = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let e = c.generate(text_request("Hi", 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let with = |token: &str| {
        let mut r = tonic::Request::new(pb::GetModelInfoRequest {});
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    let e = c.get_model_info(with("wrong")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let info = c.get_model_info(with("t0ken")).await.unwrap().into_inner();
    assert_eq!(info.architecture, "llama");

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "instinfer.v1.Inference"] {
        let r = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }

    let mut refl = ServerReflectionClient::new(channel);
    let mut req = tonic::Request::new(tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    req.metadata_mut()
        .insert("authorization", "Bearer t0ken".parse().unwrap());
    let mut answers = refl.server_reflection_info(req).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"instinfer.v1.Inference"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    h.shutdown().await.unwrap();
}

/// GetModelInfo describes the loaded model; over TLS (rustls) with a client that trusts the
/// server's certificate. A plain-text client cannot talk to the TLS port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_info_over_tls() {
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
    let port = h.grpc_addr().port();

    let plain = InferenceClient::connect(format!("http://127.0.0.1:{port}")).await;
    if let Ok(mut plain) = plain {
        assert!(plain
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .is_err());
    }

    let target = instinfer::server::client::Target {
        addr: format!("https://localhost:{port}"),
        bearer_token: None,
        ca_cert_path: Some(cert_path),
        connect_wait: Duration::ZERO,
    };
    let mut c = target.connect().await.expect("TLS connect");
    let info = c
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let cfg = &loaded().model.config;
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.layers as usize, cfg.n_layers);
    assert_eq!(info.heads as usize, cfg.n_heads);
    assert_eq!(info.kv_heads as usize, cfg.n_kv_heads);
    assert_eq!(info.context_length as usize, cfg.context_len);
    assert_eq!(info.vocab_size as usize, cfg.vocab_size);
    assert_eq!(info.quantization, "Q4_1");
    // 2 (K, V) × 30 layers × 3 kv heads × 64 dims × 2 bytes (f16).
    assert_eq!(info.kv_bytes_per_token, 23_040);
    assert_eq!(info.kv_store, "ram");
    assert_eq!(info.attention_modes, vec![pb::AttentionMode::Full as i32]);
    assert!(info.chat_template);
    assert_eq!(info.model_file, "SmolLM2-135M-Instruct.Q4_1.gguf");
    let r = generate(&mut c, text_request("The capital of France is", 8)).await;
    assert_same(
        "over TLS",
        &r,
        &in_process(encode("The capital of France is"), 8, &[], false, 512),
    );
    h.shutdown().await.unwrap();
}

/// `instinfer generate --server` streams from the daemon and prints what the in-process
/// generation prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_generate_streams_from_the_server() {
    let h = start(&config(|l| l.bearer_token = Some("cli-token".into()))).await;
    let addr = h.grpc_addr().to_string();
    let run = |args: Vec<String>| {
        std::process::Command::new(env!("CARGO_BIN_EXE_instinfer"))
            .args(args)
            .output()
            .expect("run instinfer")
    };
    let (a1, a2) = (addr.clone(), addr.clone());
    let out = tokio::task::spawn_blocking(move || {
        run(vec![
            "--json".into(),
            "generate".into(),
            "--server".into(),
            a1,
            "--server-token".into(),
            "cli-token".into(),
            "--max-tokens".into(),
            "16".into(),
            "The capital of France is".into(),
        ])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = in_process(encode("The capital of France is"), 16, &[], false, 512);
    assert_eq!(v["ids"], serde_json::json!(want.ids));
    assert_eq!(v["text"], want.text);
    assert_eq!(v["finish_reason"], "length");

    // Without the token: a clear error and exit code 1.
    let out = tokio::task::spawn_blocking(move || {
        run(vec!["generate".into(), "--server".into(), a2, "Hi".into()])
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("Unauthenticated"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    h.shutdown().await.unwrap();
}
