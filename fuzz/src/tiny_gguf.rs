//! A complete, tiny llama model as GGUF bytes (one layer, width 16, two heads of 8, a byte-level vocabulary
//! of 256 + 4 tokens, f32 weights, a chat template): a seed that the loader accepts whole,
//! so that the fuzzer starts from a file that reaches every stage of loading.

use instinfer_runtime::tokenizer::bytes::byte_to_char;

/// One metadata value.
enum Kv {
    Str(String),
    U32(u32),
    F32(f32),
    Bool(bool),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_kv(out: &mut Vec<u8>, key: &str, v: &Kv) {
    put_str(out, key);
    match v {
        Kv::Str(s) => {
            out.extend(8u32.to_le_bytes());
            put_str(out, s);
        }
        Kv::U32(x) => {
            out.extend(4u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Kv::F32(x) => {
            out.extend(6u32.to_le_bytes());
            out.extend(x.to_le_bytes());
        }
        Kv::Bool(x) => {
            out.extend(7u32.to_le_bytes());
            out.push(*x as u8);
        }
        Kv::Strs(xs) => {
            out.extend(9u32.to_le_bytes());
            out.extend(8u32.to_le_bytes());
            out.extend((xs.len() as u64).to_le_bytes());
            for x in xs {
                put_str(out, x);
            }
        }
        Kv::I32s(xs) => {
            out.extend(9u32.to_le_bytes());
            out.extend(5u32.to_le_bytes());
            out.extend((xs.len() as u64).to_le_bytes());
            for x in xs {
                out.extend(x.to_le_bytes());
            }
        }
    }
}

/// The model's bytes.
pub fn tiny_llama() -> Vec<u8> {
    let (dim, ffn, kv_dim) = (16u64, 32u64, 8u64);
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    let space = byte_to_char(b' ');
    tokens.push(format!("{space}t"));
    tokens.push("he".into());
    tokens.push("<|im_start|>".into());
    tokens.push("<|im_end|>".into());
    let vocab = tokens.len() as u64;
    let mut types = vec![1i32; tokens.len()];
    let n = types.len();
    types[n - 2..].fill(3);
    let meta = [
        ("general.architecture", Kv::Str("llama".into())),
        ("llama.block_count", Kv::U32(1)),
        ("llama.embedding_length", Kv::U32(dim as u32)),
        ("llama.feed_forward_length", Kv::U32(ffn as u32)),
        ("llama.attention.head_count", Kv::U32(2)),
        ("llama.attention.head_count_kv", Kv::U32(1)),
        ("llama.context_length", Kv::U32(64)),
        ("llama.rope.freq_base", Kv::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Kv::F32(1e-5)),
        ("tokenizer.ggml.model", Kv::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Kv::Str("smollm".into())),
        ("tokenizer.ggml.tokens", Kv::Strs(tokens)),
        ("tokenizer.ggml.token_type", Kv::I32s(types)),
        (
            "tokenizer.ggml.merges",
            Kv::Strs(vec![format!("{space} t"), "h e".into()]),
        ),
        ("tokenizer.ggml.bos_token_id", Kv::U32(vocab as u32 - 2)),
        ("tokenizer.ggml.eos_token_id", Kv::U32(vocab as u32 - 1)),
        ("tokenizer.ggml.add_bos_token", Kv::Bool(false)),
        (
            "tokenizer.chat_template",
            Kv::Str(
                "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
                 {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                    .into(),
            ),
        ),
    ];
    let mut tensors: Vec<(String, Vec<u64>)> = vec![
        ("token_embd.weight".into(), vec![dim, vocab]),
        ("output_norm.weight".into(), vec![dim]),
    ];
    for (name, dims) in [
        ("attn_norm.weight", vec![dim]),
        ("attn_q.weight", vec![dim, dim]),
        ("attn_k.weight", vec![dim, kv_dim]),
        ("attn_v.weight", vec![dim, kv_dim]),
        ("attn_output.weight", vec![dim, dim]),
        ("ffn_norm.weight", vec![dim]),
        ("ffn_gate.weight", vec![dim, ffn]),
        ("ffn_up.weight", vec![dim, ffn]),
        ("ffn_down.weight", vec![ffn, dim]),
    ] {
        tensors.push((format!("blk.0.{name}"), dims));
    }

    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_kv(&mut out, k, v);
    }
    let mut data = Vec::new();
    for (i, (name, dims)) in tensors.iter().enumerate() {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes()); // F32
        out.extend((data.len() as u64).to_le_bytes());
        let n: u64 = dims.iter().product();
        for j in 0..n {
            let x = ((j as f32 + i as f32) * 0.37).sin() * 0.1;
            data.extend(x.to_le_bytes());
        }
        data.resize(data.len().div_ceil(32) * 32, 0);
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend(data);
    out
}
