//! The model with its KV cache in the storage engine (csd-engine, io_uring O_DIRECT on a
//! real file): `full` gives the RAM cache's logits and llama.cpp's tokens, `sparse` with an
//! unlimited budget gives `full`'s, batched decode equals one-by-one decode, and a full store
//! fails only the sequence that hit it.

mod common;

use csd_engine::{EngineConfig, IoEngine};
use instinfer_runtime::kv::{AttentionMode, EnginePool, KvPool, RamKvPool};
use instinfer_runtime::model::{Logits, Model, SeqChunk, Workspace};

/// The model's KV in a new `capacity`-byte store in `dir`, through the one setup function
/// the daemon, the CLI and the benchmarks use; the store must run on io_uring with O_DIRECT.
fn pool(dir: &std::path::Path, model: &Model, capacity: u64, cfg: EngineConfig) -> EnginePool {
    let pool = EnginePool::create(&dir.join("kv.store"), capacity, model.kv_shape(), cfg)
        .expect("create the KV store");
    let mode = pool.engine_ref().with_store(|s| s.mode());
    assert_eq!(
        mode.engine,
        IoEngine::IoUring,
        "expected io_uring, got {mode}"
    );
    assert!(mode.direct, "expected O_DIRECT, got {mode}");
    pool
}

fn scratch_dir() -> tempfile::TempDir {
    // Inside the target directory: a real filesystem, so O_DIRECT is exercised.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn step(
    model: &Model,
    pool: &mut dyn KvPool,
    seq: u64,
    tokens: &[u32],
    ws: &mut Workspace,
    logits: Logits,
) {
    let chunk = SeqChunk {
        seq,
        tokens,
        logits,
    };
    model
        .forward_batch(pool, &[chunk], ws)
        .pop()
        .unwrap()
        .unwrap();
}

/// Greedy decode of `n` tokens for each sequence, all in one batch per step.
fn greedy_batch(
    model: &Model,
    pool: &mut dyn KvPool,
    prompts: &[Vec<u32>],
    n: usize,
) -> Vec<Vec<u32>> {
    let vocab = model.config.vocab_size;
    let mut ws = Workspace::default();
    let mut next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        pool.open(i as u64, AttentionMode::Full, model.config.context_len)
            .ok();
        step(model, pool, i as u64, p, &mut ws, Logits::Last);
        next.push(instinfer_kernels::ops::argmax(&ws.logits).unwrap() as u32);
    }
    let mut out: Vec<Vec<u32>> = prompts.iter().map(|_| Vec::new()).collect();
    for _ in 0..n {
        for (o, &t) in out.iter_mut().zip(&next) {
            o.push(t);
        }
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let chunks: Vec<SeqChunk> = toks
            .iter()
            .enumerate()
            .map(|(i, t)| SeqChunk {
                seq: i as u64,
                tokens: t,
                logits: Logits::Last,
            })
            .collect();
        let rows = model.forward_batch(pool, &chunks, &mut ws);
        for (i, r) in rows.into_iter().enumerate() {
            let r = r.unwrap();
            let row = &ws.logits[r.start * vocab..r.end * vocab];
            next[i] = instinfer_kernels::ops::argmax(row).unwrap() as u32;
        }
    }
    out
}

#[test]
fn full_through_the_engine_gives_the_ram_cache_logits() {
    let model = Model::load(&common::model_path()).unwrap();
    let ids = common::ids(&common::fixture()["teacher_forced"][0]["ids"]);
    // The same schedule on both: two prompt chunks (the second reads pages the first
    // wrote), then single tokens.
    let run = |pool: &mut dyn KvPool| {
        pool.open(1, AttentionMode::Full, 4096).unwrap();
        let mut ws = Workspace::default();
        step(&model, pool, 1, &ids[..100], &mut ws, Logits::None);
        step(&model, pool, 1, &ids[100..200], &mut ws, Logits::All);
        let mut logits = ws.logits.clone();
        for t in 200..ids.len() {
            step(&model, pool, 1, &ids[t..t + 1], &mut ws, Logits::Last);
            logits.extend_from_slice(&ws.logits);
        }
        logits
    };
    let want = run(&mut RamKvPool::new(model.kv_shape()));
    let dir = scratch_dir();
    let mut pool = pool(dir.path(), &model, 256 << 20, EngineConfig::default());
    let got = run(&mut pool);
    assert_eq!(got.len(), want.len());
    // Pages come back in position order and the kernel's lanes follow the key index, so
    // the engine's attention is bit-identical to the RAM cache's.
    let same = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    assert_eq!(same, want.len(), "logits differ from the RAM pool's");
    let s = pool.stats();
    assert!(s.device_bytes_read > 0 && s.boundary_bytes > 0, "{s:?}");
}

#[test]
fn greedy_decode_through_the_engine_gives_llamacpp_tokens_in_full_and_unlimited_sparse() {
    let model = Model::load(&common::model_path()).unwrap();
    let g = &common::fixture()["greedy"][3];
    let prompt = common::ids(&g["prompt_ids"]);
    let want = common::ids(&g["generated_ids"]);
    for (mode, cfg) in [
        (AttentionMode::Full, EngineConfig::default()),
        (AttentionMode::Sparse, EngineConfig::unlimited()),
    ] {
        let dir = scratch_dir();
        let mut pool = pool(dir.path(), &model, 64 << 20, cfg);
        pool.open(7, mode, model.config.context_len).unwrap();
        let mut ws = Workspace::default();
        step(&model, &mut pool, 7, &prompt, &mut ws, Logits::Last);
        let mut got = Vec::new();
        // 32 tokens cross a page boundary (32 tokens per page) during decode.
        for _ in 0..want.len() {
            let next = instinfer_kernels::ops::argmax(&ws.logits).unwrap() as u32;
            got.push(next);
            step(&model, &mut pool, 7, &[next], &mut ws, Logits::Last);
        }
        assert_eq!(got, want, "mode {mode}");
    }
}

#[test]
fn batched_decode_equals_one_sequence_at_a_time() {
    let model = Model::load(&common::model_path()).unwrap();
    let fx = common::fixture();
    let greedy = fx["greedy"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = greedy
        .iter()
        .map(|g| common::ids(&g["prompt_ids"]))
        .collect();
    let n = 16;
    // llama.cpp's greedy continuations, one sequence at a time.
    let want: Vec<Vec<u32>> = greedy
        .iter()
        .map(|g| common::ids(&g["generated_ids"])[..n].to_vec())
        .collect();
    let mut ram = RamKvPool::new(model.kv_shape());
    assert_eq!(greedy_batch(&model, &mut ram, &prompts, n), want);
    let dir = scratch_dir();
    let mut pool = pool(dir.path(), &model, 64 << 20, EngineConfig::default());
    assert_eq!(greedy_batch(&model, &mut pool, &prompts, n), want);
}

#[test]
fn a_full_store_fails_only_the_sequence_that_hit_it() {
    let model = Model::load(&common::model_path()).unwrap();
    let dir = scratch_dir();
    // Room for a few hundred tokens.
    let mut pool = pool(dir.path(), &model, 6 << 20, EngineConfig::default());
    let small: Vec<u32> = (0..40).map(|i| 200 + i).collect();
    let big: Vec<u32> = (0..2000).map(|i| 100 + i % 50).collect();
    pool.open(1, AttentionMode::Full, 4096).unwrap();
    pool.open(2, AttentionMode::Full, 4096).unwrap();
    let mut ws = Workspace::default();
    step(&model, &mut pool, 1, &small, &mut ws, Logits::Last);
    let mut err = None;
    for part in big.chunks(256) {
        let chunk = SeqChunk {
            seq: 2,
            tokens: part,
            logits: Logits::Last,
        };
        if let Err(e) = model
            .forward_batch(&mut pool, &[chunk], &mut ws)
            .pop()
            .unwrap()
        {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the store filled up");
    assert!(e.to_string().contains("KV store full"), "{e}");
    // Sequence 1 goes on.
    let chunk = SeqChunk {
        seq: 1,
        tokens: &[300],
        logits: Logits::Last,
    };
    model
        .forward_batch(&mut pool, &[chunk], &mut ws)
        .pop()
        .unwrap()
        .unwrap();
    assert_eq!(pool.len(1).unwrap(), 41);
    // Releasing sequence 2 gives its room back.
    pool.release(2);
    pool.open(3, AttentionMode::Full, 4096).unwrap();
    step(&model, &mut pool, 3, &big[..96], &mut ws, Logits::Last);
}
