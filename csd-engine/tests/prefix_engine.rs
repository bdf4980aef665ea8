//! The prefix cache through the engine: a sequence opened on cached pages attends exactly
//! as the sequence that wrote them; a cached page that fails its checksum when borrowed is
//! dropped with the pages after it and the sequence starts on the pages before it; the
//! store's budget refuses a reservation before anything is written; a sharer keeps its pages
//! through a clear of the cache.

mod common;
mod engine_support;

use csd_engine::device::Fault;
use csd_engine::{AttentionMode, Engine, EngineConfig, KvError};
use engine_support::*;

fn keys(n_tokens: usize, salt: u32) -> Vec<csd_engine::BlockKey> {
    let tokens: Vec<u32> = (0..n_tokens as u32).map(|t| t * 7 + salt).collect();
    csd_engine::prefix_keys(&[1u8; 32], &tokens, 32)
}

/// Open `seq` on what is cached of `keys`, then append `d` from there up to `n` tokens.
fn open_and_fill(
    e: &mut Engine,
    seq: u64,
    keys: &[csd_engine::BlockKey],
    d: &Data,
    n: usize,
) -> usize {
    let held = e.open_shared(seq, AttentionMode::Full, 8192, keys).unwrap();
    e.reserve(seq, n).unwrap();
    append(e, seq, d, held, n);
    held
}

#[test]
fn a_shared_prefix_attends_exactly_like_its_writer() {
    let mut f = engine(EngineConfig::default(), 64 << 20);
    let e = &mut f.engine;
    e.bind_model([1u8; 32]).unwrap();
    let d = data(300, 11);
    let k = keys(300, 0);
    assert_eq!(open_and_fill(e, 1, &k, &d, 300), 0, "nothing cached yet");
    assert_eq!(e.publish(1, &k).unwrap(), 9, "300 tokens hold 9 full pages");
    // A second sequence with the same 300 tokens starts on the 9 pages.
    assert_eq!(open_and_fill(e, 2, &k, &d, 300), 9 * 32);
    for pos in [0, 100, 287, 299] {
        let q = &d.q[pos * Q_DIM..(pos + 1) * Q_DIM];
        for layer in 0..2 {
            let a = attend_one(e, layer, 1, q, pos).unwrap();
            let b = attend_one(e, layer, 2, q, pos).unwrap();
            assert_eq!(a, b, "layer {layer} pos {pos}: sharer differs from writer");
        }
    }
    let (s, _, _) = e.prefix_stats();
    assert_eq!(s.pages, 9);
    assert_eq!(s.shared_pages, 9, "{s:?}");
    e.reclaim(1).unwrap();
    // Clearing the cache while sequence 2 reads the pages: they stay its own.
    assert_eq!(e.clear_prefix_cache().unwrap(), 9);
    let q = &d.q[299 * Q_DIM..300 * Q_DIM];
    let want = reference(&d, 299, q);
    let got = attend_one(e, 0, 2, q, 299).unwrap();
    assert!(max_diff(&got, &want) < 2e-3, "{}", max_diff(&got, &want));
    e.reclaim(2).unwrap();
    let (s, cap, free) = e.prefix_stats();
    assert_eq!(s.pages, 0);
    assert!(free > cap / 2, "pages leaked: {free} of {cap} free");
}

#[test]
fn a_cached_page_that_fails_its_checksum_is_dropped_not_served() {
    let mut f = engine(EngineConfig::default(), 64 << 20);
    let e = &mut f.engine;
    e.bind_model([1u8; 32]).unwrap();
    let d = data(200, 12);
    let k = keys(200, 1);
    open_and_fill(e, 1, &k, &d, 200);
    e.publish(1, &k).unwrap();
    e.reclaim(1).unwrap();
    // The next read (the borrower's first layer) comes back with a bit flipped.
    f.dev.arm(Fault::BitFlip);
    let held = f
        .engine
        .open_shared(2, AttentionMode::Full, 4096, &k)
        .unwrap();
    let (s, _, _) = f.engine.prefix_stats();
    assert!(s.dropped_at_recovery > 0, "{s:?}");
    assert!(
        held < 6 * 32,
        "the corrupt page or one before it was served: {held}"
    );
    assert_eq!(s.pages as usize, held / 32, "{s:?}");
    // The sequence goes on from what it was given and attends correctly.
    f.engine.reserve(2, 200).unwrap();
    append(&mut f.engine, 2, &d, held, 200);
    let q = &d.q[199 * Q_DIM..200 * Q_DIM];
    let got = attend_one(&mut f.engine, 1, 2, q, 199).unwrap();
    let want = reference(&d, 199, q);
    assert!(max_diff(&got, &want) < 2e-3, "{}", max_diff(&got, &want));
}

#[test]
fn the_budget_refuses_a_reservation_that_cannot_fit_and_evicts_for_one_that_can() {
    // 8 MiB: 339 block groups, so about 169 pages of both layers in all.
    let mut f = engine(EngineConfig::default(), 8 << 20);
    let e = &mut f.engine;
    e.bind_model([1u8; 32]).unwrap();
    let d = data(600, 13);
    let k = keys(600, 2);
    open_and_fill(e, 1, &k, &d, 600);
    e.publish(1, &k).unwrap();
    e.reclaim(1).unwrap();
    let (before, _, _) = e.prefix_stats();
    assert_eq!(before.pages, 18);
    // Far too big: refused at once, nothing evicted.
    e.open(2, AttentionMode::Full, 1 << 20).unwrap();
    let err = e.reserve(2, 100_000).unwrap_err();
    assert!(matches!(err, KvError::StoreBudget { .. }), "{err}");
    assert!(err.to_string().contains("budget"), "{err}");
    assert_eq!(
        e.prefix_stats().0.pages,
        18,
        "a doomed reservation evicted pages"
    );
    e.reclaim(2).unwrap();
    // Fits only once cached pages go: they are evicted, oldest leaves first.
    let d2 = plain_data(5000, 14);
    let k2 = keys(5000, 3);
    assert_eq!(open_and_fill(e, 3, &k2, &d2, 5000), 0);
    let (after, _, _) = e.prefix_stats();
    assert!(after.evicted_pages > 0 && after.pages < 18, "{after:?}");
    // What is left of the cache is a prefix of the old chain (leaves went first).
    let left = e.cached_prefix(&k);
    assert_eq!(left as u64, after.pages, "{after:?}");
}
