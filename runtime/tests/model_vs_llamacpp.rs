//! The model runtime against llama.cpp's outputs for the same GGUF
//! (`tests/fixtures/reference/smollm2-135m-q4_1.json`).

mod common;

use instinfer_runtime::model::{Logits, Model, Workspace};

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    let model = Model::load(&common::model_path()).unwrap();
    let fx = common::fixture();
    for tf in fx["teacher_forced"].as_array().unwrap() {
        let ids = common::ids(&tf["ids"]);
        let mut cache = model.new_ram_cache();
        let mut ws = Workspace::default();
        model
            .forward(&mut cache, &ids, &mut ws, Logits::All)
            .unwrap();
        let vocab = model.config.vocab_size;
        let mut agree = 0;
        let mut deltas = Vec::new();
        for (p, row) in ws.logits.chunks(vocab).enumerate() {
            let ours = instinfer_kernels::ops::argmax(row).unwrap();
            if ours as u64 == tf["argmax"][p].as_u64().unwrap() {
                agree += 1;
            }
            let top1 = tf["top5_ids"][p][0].as_u64().unwrap() as usize;
            deltas.push((row[top1] as f64 - tf["top5_logits"][p][0].as_f64().unwrap()).abs());
        }
        deltas.sort_by(f64::total_cmp);
        let median = deltas[deltas.len() / 2];
        let share = agree as f64 / ids.len() as f64;
        eprintln!(
            "{}: argmax agreement {agree}/{} , median |Δ| {median:.6}",
            tf["source"],
            ids.len()
        );
        assert!(share >= 0.98, "argmax agreement {share:.3} < 0.98");
        assert!(median <= 0.1, "median |Δ logit| {median} > 0.1");
    }
}

#[test]
fn greedy_continuations_match_llama_cpp() {
    let model = Model::load(&common::model_path()).unwrap();
    let fx = common::fixture();
    let mut identical = 0;
    let cases = fx["greedy"].as_array().unwrap();
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
            let next = instinfer_kernels::ops::argmax(&ws.logits).unwrap() as u32;
            got.push(next);
            model
                .forward(&mut cache, &[next], &mut ws, Logits::Last)
                .unwrap();
        }
        let n = got.len();
        if got == want[..n] {
            identical += 1;
        } else {
            eprintln!(
                "prompt {:?}: ours {got:?} llama.cpp {:?}",
                g["prompt"],
                &want[..n]
            );
        }
    }
    assert!(
        identical >= 3,
        "{identical} of {} greedy prompts identical over 16 tokens",
        cases.len()
    );
}
