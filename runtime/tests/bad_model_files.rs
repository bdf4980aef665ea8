//! Loading bad model files gives errors that name the problem, never a panic.

mod common;

use common::GgufBuilder;
use instinfer_runtime::model::Model;
use std::io::Write;

fn load_bytes(bytes: &[u8]) -> String {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    Model::load(f.path()).unwrap_err().to_string()
}

#[test]
fn a_missing_file_is_named() {
    let err = Model::load(std::path::Path::new("/nonexistent/model.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot open model file") && err.contains("/nonexistent/model.gguf"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_gguf_is_rejected() {
    let err = load_bytes(b"PK\x03\x04 this is a zip, not a model");
    assert!(err.contains("not a GGUF file"), "{err}");
    let err = load_bytes(b"");
    assert!(err.contains("not a GGUF file"), "{err}");
}

#[test]
fn a_truncated_model_names_what_is_cut_off() {
    let real = std::fs::read(common::model_path()).unwrap();
    // Cut inside the metadata, and inside the tensor data.
    for cut in [1000, real.len() - 1000] {
        let err = load_bytes(&real[..cut]);
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
    let err = load_bytes(&real[..real.len() - 1000]);
    assert!(err.contains("tensor '"), "names the tensor: {err}");
}

#[test]
fn an_unsupported_tensor_type_names_the_tensor_and_type() {
    // Type 16 is IQ2_XXS, which this runtime has no kernel for.
    let bytes = GgufBuilder::new()
        .string("general.architecture", "llama")
        .tensor("blk.0.attn_q.weight", &[256, 4], 16, 256)
        .build();
    let err = load_bytes(&bytes);
    assert!(
        err.contains("blk.0.attn_q.weight") && err.contains("unsupported type"),
        "{err}"
    );
    let bytes = GgufBuilder::new().tensor("weird", &[32], 9999, 64).build();
    let err = load_bytes(&bytes);
    assert!(err.contains("weird") && err.contains("9999"), "{err}");
}

#[test]
fn an_unknown_architecture_or_missing_key_is_named() {
    let bytes = GgufBuilder::new()
        .string("general.architecture", "mamba")
        .build();
    let err = load_bytes(&bytes);
    assert!(
        err.contains("architecture 'mamba' is not supported"),
        "{err}"
    );
    let bytes = GgufBuilder::new()
        .string("general.architecture", "llama")
        .build();
    let err = load_bytes(&bytes);
    assert!(
        err.contains("llama.block_count") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_is_named() {
    let bytes = GgufBuilder::new()
        .string("general.architecture", "llama")
        .u32("llama.block_count", 1)
        .u32("llama.embedding_length", 64)
        .u32("llama.feed_forward_length", 128)
        .u32("llama.attention.head_count", 2)
        .build();
    // No vocabulary either: the first missing piece is reported.
    let err = load_bytes(&bytes);
    assert!(
        err.contains("tokenizer.ggml.tokens") && err.contains("missing"),
        "{err}"
    );
}

/// Found by the GGUF fuzz target: a header whose counts and sizes overflow, or whose
/// block_count no file could back, is refused with an error instead of an overflow panic or
/// an allocation that aborts the process.
#[test]
fn absurd_counts_and_sizes_are_refused_not_allocated() {
    let bytes = GgufBuilder::new()
        .string("general.architecture", "llama")
        .u32("llama.block_count", u32::MAX)
        .u32("llama.embedding_length", 64)
        .u32("llama.feed_forward_length", 128)
        .u32("llama.attention.head_count", 2)
        .strings("tokenizer.ggml.tokens", &["a", "b", "c", "d"])
        .tensor("token_embd.weight", &[64, 4], 0, 64 * 4 * 4)
        .build();
    let err = load_bytes(&bytes);
    assert!(
        err.contains("block_count 4294967295") && err.contains("tensors"),
        "{err}"
    );
    // A tensor whose rows overflow the address range.
    let bytes = GgufBuilder::new()
        .tensor("huge", &[u64::MAX / 2 + 1, 2], 0, 64)
        .build();
    let err = load_bytes(&bytes);
    assert!(err.contains("huge"), "{err}");
}
