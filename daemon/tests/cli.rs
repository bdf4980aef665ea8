//! The `instinfer` binary as a user runs it: real process, real model, exit codes and
//! messages for bad input.

#[path = "../../runtime/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

fn instinfer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_instinfer"))
        .args([
            "--model",
            common::model_path().to_str().unwrap(),
            "--threads",
            "2",
        ])
        .args(args)
        .output()
        .expect("run instinfer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A bad input fails cleanly: non-zero exit, a message naming `needle`, no panic.
fn fails_with(args: &[&str], needle: &str) {
    let o = instinfer(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} should fail");
    assert!(
        err.contains(needle),
        "{args:?}: stderr lacks {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
}

#[test]
fn tokenize_prints_llama_cpp_ids() {
    let o = instinfer(&["--json", "tokenize", "Hello, world!"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ids"], serde_json::json!([19556, 28, 905, 17]));
}

#[test]
fn greedy_generation_reproduces_llama_cpp_text() {
    let fx = common::fixture();
    let g = &fx["greedy"][0];
    let o = instinfer(&[
        "--json",
        "generate",
        "--max-tokens",
        "32",
        g["prompt"].as_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ids"], g["generated_ids"]);
    assert_eq!(v["text"], g["generated_text"]);
    assert_eq!(v["finish_reason"], "length");
}

#[test]
fn chat_generation_stops_at_end_of_turn() {
    let fx = common::fixture();
    let g = &fx["greedy"][1];
    let o = instinfer(&[
        "--json",
        "generate",
        "--chat",
        "--max-tokens",
        "64",
        "List three primary colors.",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["prompt_ids"], g["prompt_ids"]);
    // llama.cpp lists the end-of-turn token (<|im_end|>, id 2) it stopped on; we stop on it
    // without emitting it.
    let mut want = common::ids(&g["generated_ids"]);
    assert_eq!(want.pop(), Some(2));
    assert_eq!(v["ids"], serde_json::json!(want));
    assert_eq!(v["text"], g["generated_text"]);
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn stop_strings_end_generation_and_are_not_printed() {
    let o = instinfer(&[
        "--json",
        "generate",
        "--max-tokens",
        "32",
        "--stop",
        "United",
        "The capital of France is",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["text"], " Paris.\n\nThe ");
    assert_eq!(v["finish_reason"], "stop");
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = [
        "--json",
        "generate",
        "--max-tokens",
        "12",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--seed",
        "7",
        "Once upon a time",
    ];
    let a = instinfer(&args);
    let b = instinfer(&args);
    assert!(a.status.success(), "{}", stderr(&a));
    let (va, vb): (serde_json::Value, serde_json::Value) = (
        serde_json::from_slice(&a.stdout).unwrap(),
        serde_json::from_slice(&b.stdout).unwrap(),
    );
    assert_eq!(va["ids"], vb["ids"]);
    assert_eq!(va["ids"].as_array().unwrap().len(), 12);
}

#[test]
fn logits_prints_top_k_per_position() {
    let o = instinfer(&["--json", "logits", "--top", "3", "--ids", "504,3575,282"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["top"].as_array().unwrap().len(), 3);
}

#[test]
fn invalid_sampling_values_are_rejected() {
    fails_with(&["generate", "--temperature", "-1", "hi"], "temperature");
    fails_with(&["generate", "--top-p", "0", "hi"], "top_p");
    fails_with(&["generate", "--top-p", "1.5", "hi"], "top_p");
    fails_with(&["generate", "--max-tokens", "0", "hi"], "max-tokens");
    fails_with(&["--threads", "0", "tokenize", "hi"], "threads");
}

#[test]
fn a_prompt_longer_than_the_context_is_rejected_with_both_numbers() {
    let long = "word ".repeat(9000);
    fails_with(&["generate", &long], "the context holds 8192");
}

#[test]
fn bad_model_paths_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_instinfer"))
        .args(["--model", "/nonexistent/x.gguf", "tokenize", "hi"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("/nonexistent/x.gguf"), "{}", stderr(&o));
    let not_gguf = dir.path().join("notes.txt");
    std::fs::write(&not_gguf, "hello").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_instinfer"))
        .args(["--model", not_gguf.to_str().unwrap(), "tokenize", "hi"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not a GGUF file"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn generation_with_the_kv_cache_on_flash_prints_the_same_tokens() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = dir.path().join("kv.store");
    let args = [
        "--json",
        "generate",
        "--max-tokens",
        "40",
        "Once upon a time, in a small village by the sea,",
    ];
    let ram = instinfer(&args);
    // Twice in full mode (the second run reopens the store the first one created), then in
    // the baseline and sparse modes: 53 tokens fit in two pages, so every mode attends to
    // everything and gives the same tokens.
    for mode in ["full", "full", "flexgen", "sparse"] {
        let mut flash_args = vec!["--kv-store", store.to_str().unwrap(), "--attention", mode];
        flash_args.extend(args);
        let flash = instinfer(&flash_args);
        assert!(flash.status.success(), "{}", stderr(&flash));
        let (a, b): (serde_json::Value, serde_json::Value) = (
            serde_json::from_slice(&ram.stdout).unwrap(),
            serde_json::from_slice(&flash.stdout).unwrap(),
        );
        assert_eq!(a["ids"], b["ids"], "mode {mode}");
    }
    assert!(store.exists());
    fails_with(
        &["--attention", "sparse", "generate", "hi"],
        "needs the KV cache on flash",
    );
    fails_with(
        &["--attention", "dense", "generate", "hi"],
        "unknown attention mode",
    );
    fails_with(
        &["--kv-store", dir.path().to_str().unwrap(), "generate", "hi"],
        "is a directory",
    );
}
