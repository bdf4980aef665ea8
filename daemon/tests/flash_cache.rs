//! The model running with its KV cache on flash (csd-engine, io_uring O_DIRECT on a real
//! file): the same logits and tokens as with the RAM cache, bit for bit, and a full store is
//! a clear error.

mod common;

use csd_engine::{IoEngine, KvShape as StoreShape, KvStore, StoreConfig, StoreOptions};
use instinfer::model::{FlashKvCache, KvCache, Logits, Model, Workspace};

fn store(dir: &std::path::Path, model: &Model, capacity: u64) -> KvStore {
    let c = &model.config;
    let shape = StoreShape::with_page_bytes(
        c.n_layers as u32,
        c.n_kv_heads as u32,
        c.head_dim as u32,
        4096,
    );
    KvStore::create(
        &dir.join("kv.store"),
        &StoreConfig {
            shape,
            capacity,
            options: StoreOptions::default(),
        },
    )
    .expect("create the KV store")
}

fn scratch_dir() -> tempfile::TempDir {
    // Inside the target directory: a real filesystem, so O_DIRECT is exercised.
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

#[test]
fn teacher_forced_logits_on_flash_equal_the_ram_cache_bit_for_bit() {
    let model = Model::load(&common::model_path()).unwrap();
    let ids = common::ids(&common::fixture()["teacher_forced"][0]["ids"]);
    let mut ram = model.new_ram_cache();
    let mut want = Workspace::default();
    model
        .forward(&mut ram, &ids, &mut want, Logits::All)
        .unwrap();

    let dir = scratch_dir();
    let mut kv = store(dir.path(), &model, 256 << 20);
    let mode = kv.mode();
    let mut flash =
        FlashKvCache::new(&mut kv, 1, model.kv_shape(), model.config.context_len).unwrap();
    let mut got = Workspace::default();
    // Two chunks, so the second reads pages the first wrote.
    model
        .forward(&mut flash, &ids[..100], &mut got, Logits::None)
        .unwrap();
    let mut tail = Workspace::default();
    model
        .forward(&mut flash, &ids[100..], &mut tail, Logits::All)
        .unwrap();
    let vocab = model.config.vocab_size;
    let want_tail = &want.logits[100 * vocab..];
    assert_eq!(tail.logits.len(), want_tail.len());
    assert!(
        tail.logits
            .iter()
            .zip(want_tail)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "logits differ from the RAM cache"
    );
    let counters = flash.store().counters();
    assert!(
        counters.bytes_written > 0 && counters.bytes_read > 0,
        "{counters:?}"
    );
    assert_eq!(
        mode.engine,
        IoEngine::IoUring,
        "expected io_uring on a real filesystem, got {mode}"
    );
    assert!(mode.direct, "expected O_DIRECT, got {mode}");
}

#[test]
fn greedy_decode_on_flash_gives_the_same_tokens() {
    let model = Model::load(&common::model_path()).unwrap();
    let g = &common::fixture()["greedy"][3];
    let prompt = common::ids(&g["prompt_ids"]);
    let want = common::ids(&g["generated_ids"]);
    let dir = scratch_dir();
    let mut kv = store(dir.path(), &model, 64 << 20);
    let mut flash =
        FlashKvCache::new(&mut kv, 7, model.kv_shape(), model.config.context_len).unwrap();
    let mut ws = Workspace::default();
    model
        .forward(&mut flash, &prompt, &mut ws, Logits::Last)
        .unwrap();
    let mut got = Vec::new();
    // 32 tokens cross a page boundary (32 tokens per page) during decode.
    for _ in 0..want.len() {
        let next = instinfer_kernels::ops::argmax(&ws.logits).unwrap() as u32;
        got.push(next);
        model
            .forward(&mut flash, &[next], &mut ws, Logits::Last)
            .unwrap();
    }
    assert_eq!(got, want);
}

#[test]
fn a_full_store_fails_the_request_with_a_clear_error() {
    let model = Model::load(&common::model_path()).unwrap();
    let dir = scratch_dir();
    // Room for a few pages of one layer only.
    let mut kv = store(dir.path(), &model, 1 << 20);
    let mut flash =
        FlashKvCache::new(&mut kv, 3, model.kv_shape(), model.config.context_len).unwrap();
    let ids: Vec<u32> = (0..600).map(|i| 100 + i % 50).collect();
    let err = model
        .forward(&mut flash, &ids, &mut Workspace::default(), Logits::Last)
        .unwrap_err();
    assert!(err.to_string().contains("KV store full"), "{err}");
    // The failed step dropped the sequence instead of leaving half of it behind.
    assert_eq!(flash.len(), 0);
}
