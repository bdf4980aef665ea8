//! Seed inputs for every target: valid requests of each interface, a complete tiny model,
//! token ids and text, and valid store structures. `fuzz-seeds` writes them into `corpus/`.

use instinfer_proto::v1 as pb;
use instinfer_proto::v1::generate_request::Prompt;
use prost::Message;

/// `(target, name, bytes)` for every seed.
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, bytes) in requests() {
        out.push(("request", name.to_string(), bytes));
    }
    out.push(("gguf", "tiny-llama".into(), crate::tiny_gguf::tiny_llama()));
    for (name, bytes) in tokenizer() {
        out.push(("tokenizer", name.to_string(), bytes));
    }
    for (name, bytes) in csd_engine::fuzzing::seeds() {
        out.push(("store", name.to_string(), bytes));
    }
    out
}

fn grpc(req: pb::GenerateRequest) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend(req.encode_to_vec());
    b
}

fn requests() -> Vec<(&'static str, Vec<u8>)> {
    let chat = pb::ChatPrompt {
        messages: vec![
            pb::ChatMessage {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            pb::ChatMessage {
                role: "user".into(),
                content: "What is 2+2? <|im_start|>system".into(),
            },
        ],
        add_generation_prompt: Some(true),
    };
    let sampling = pb::SamplingParams {
        temperature: Some(0.7),
        top_k: Some(40),
        top_p: Some(0.9),
        seed: Some(7),
    };
    let mut v = vec![
        (
            "grpc-text",
            grpc(pb::GenerateRequest {
                prompt: Some(Prompt::Text("The capital of France is".into())),
                max_tokens: Some(16),
                stop: vec!["\n".into()],
                ..Default::default()
            }),
        ),
        (
            "grpc-tokens",
            grpc(pb::GenerateRequest {
                prompt: Some(Prompt::Tokens(pb::TokenPrompt {
                    ids: vec![1, 504, 3575, 282],
                })),
                sampling: Some(sampling),
                logprobs: Some(3),
                attention: pb::AttentionMode::Sparse as i32,
                ..Default::default()
            }),
        ),
        (
            "grpc-chat",
            grpc(pb::GenerateRequest {
                prompt: Some(Prompt::Chat(chat)),
                request_id: "req-1".into(),
                cache: pb::CacheMode::UseOnly as i32,
                ..Default::default()
            }),
        ),
    ];
    let json = |which: u8, body: serde_json::Value| {
        let mut b = vec![which];
        b.extend(serde_json::to_vec(&body).expect("JSON"));
        b
    };
    v.push((
        "http-chat",
        json(
            1,
            serde_json::json!({
                "model": "smollm2",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi <|im_end|>"}]}
                ],
                "max_tokens": 8, "temperature": 0.5, "top_p": 0.9, "seed": 3,
                "stop": ["\n", "END"], "stream": true,
                "stream_options": {"include_usage": true},
                "logprobs": true, "top_logprobs": 2,
                "instinfer": {"attention": "flexgen", "cache": "off"}
            }),
        ),
    ));
    v.push((
        "http-completion",
        json(
            2,
            serde_json::json!({
                "prompt": "Once upon a time", "max_tokens": 8, "logprobs": 2,
                "stop": "\n", "echo": false, "n": 1
            }),
        ),
    ));
    v.push((
        "http-completion-tokens",
        json(
            2,
            serde_json::json!({"prompt": [1, 504, 3575], "max_tokens": 4}),
        ),
    ));
    v
}

fn tokenizer() -> Vec<(&'static str, Vec<u8>)> {
    let ids = |ids: &[u32]| {
        ids.iter()
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>()
    };
    vec![
        ("ids-words", ids(&[1, 504, 3575, 282, 4649, 314, 2])),
        // A multi-byte character split over byte-level tokens, and ids past the vocabulary.
        ("ids-split-utf8", ids(&[134, 244, 245, 49160, 49200])),
        (
            "text-mixed",
            "Héllo  wörld\t\n🚀 <|im_start|>user\n42"
                .as_bytes()
                .to_vec(),
        ),
        (
            "text-invalid-utf8",
            vec![0xe6, b'x', 0x80, 0xf0, 0x9f, 0x9a, b' ', 0xff],
        ),
    ]
}
