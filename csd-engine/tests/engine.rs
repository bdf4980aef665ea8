//! The near-data attention engine on a real O_DIRECT file: exact attention against a plain
//! reference, `sparse` with an unlimited budget against `full`, sparse decode within its
//! budget, and errors that stay with their own request. (The page selection's guarantees are
//! a property test inside the crate, `engine::select`.)

mod common;
mod engine_support;

use csd_engine::device::Fault;
use csd_engine::{AttendReq, AttentionMode, EngineConfig, KvError};
use engine_support::*;

/// Tolerance against the f64 reference: the kernel rounds each softmax weight to f16 before
/// p·v (as llama.cpp does); a weight in [0.5, 1) whose f32 and f64 values round to
/// neighbouring f16s moves the output by one f16 ulp there, 2^-11 ≈ 4.9e-4.
const TOL: f32 = 1e-3;

#[test]
fn full_mode_matches_reference_attention_through_prefill_and_decode() {
    full_mode_matches_reference(false);
}

#[test]
fn full_mode_with_merged_partials_matches_reference_attention() {
    full_mode_matches_reference(true);
}

fn full_mode_matches_reference(merge_partials: bool) {
    // A cache of 16 block groups: decode steps mix cache hits with reads of new pages.
    let cfg = EngineConfig {
        cache_bytes: 16 * 3 * 2 * 32 * 64 * 2,
        merge_partials,
        ..EngineConfig::default()
    };
    let mut f = engine(cfg, 64 << 20);
    let d = data(300, 7);
    f.engine.open(1, AttentionMode::Full, 1000).unwrap();
    // Two prefill chunks: the second attends over pages written by the first.
    for (a, b) in [(0usize, 150usize), (150, 260)] {
        append(&mut f.engine, 1, &d, a, b);
        for layer in 0..2 {
            let out = attend_one(&mut f.engine, layer, 1, rows(&d.q, Q_DIM, a, b), a).unwrap();
            for t in [a, (a + b) / 2, b - 1] {
                let want = reference(&d, t, rows(&d.q, Q_DIM, t, t + 1));
                let got = rows(&out, Q_DIM, t - a, t - a + 1);
                assert!(
                    max_diff(got, &want) < TOL,
                    "prefill pos {t}: {}",
                    max_diff(got, &want)
                );
            }
        }
    }
    for t in 260..300 {
        append(&mut f.engine, 1, &d, t, t + 1);
        for layer in 0..2 {
            let q = rows(&d.q, Q_DIM, t, t + 1);
            let got = attend_one(&mut f.engine, layer, 1, q, t).unwrap();
            let want = reference(&d, t, q);
            assert!(
                max_diff(&got, &want) < TOL,
                "decode pos {t}: {}",
                max_diff(&got, &want)
            );
        }
    }
    let s = f.engine.seq_stats(1).unwrap();
    assert!(s.cache_hits > 0 && s.cache_hits < s.cache_lookups, "{s:?}");
    assert!(s.device_bytes_read > 0);
    assert_eq!(f.engine.seq_policy_stats(1).unwrap().decode_steps, 40);
    // Boundary traffic: K/V/q of appends, q and outputs of attends, as f32.
    assert!(s.boundary_bytes > 0);
}

#[test]
fn sparse_with_an_unlimited_budget_equals_full() {
    sparse_equals_full(EngineConfig::unlimited(), true);
}

/// With every layer dense, a tight sparse policy still reads everything: equal to `full`.
#[test]
fn sparse_with_every_layer_dense_equals_full() {
    let cfg = EngineConfig {
        dense_layers: 2,
        ..EngineConfig::default()
    };
    sparse_equals_full(cfg, false);
}

fn sparse_equals_full(cfg: EngineConfig, counts_selection: bool) {
    let mut f = engine(cfg, 128 << 20);
    let d = data(700, 11);
    f.engine.open(1, AttentionMode::Full, 1000).unwrap();
    f.engine.open(2, AttentionMode::Sparse, 1000).unwrap();
    append(&mut f.engine, 1, &d, 0, 660);
    append(&mut f.engine, 2, &d, 0, 660);
    for t in 660..700 {
        append(&mut f.engine, 1, &d, t, t + 1);
        append(&mut f.engine, 2, &d, t, t + 1);
        // Let the writer settle, so both sequences split pages between flash and the RAM
        // stage the same way; then the results are bit-identical.
        f.engine.with_store(|_| ());
        for layer in 0..2 {
            let q = rows(&d.q, Q_DIM, t, t + 1);
            let (mut o1, mut o2) = (vec![0.0; Q_DIM], vec![0.0; Q_DIM]);
            let mut items = [
                AttendReq {
                    seq: 1,
                    q,
                    first_pos: t,
                    out: &mut o1,
                },
                AttendReq {
                    seq: 2,
                    q,
                    first_pos: t,
                    out: &mut o2,
                },
            ];
            for r in f.engine.attend(layer, &mut items) {
                r.unwrap();
            }
            assert_eq!(o1, o2, "pos {t} layer {layer}");
            // A batch (items computed on the pool as their pages arrive) equals one item alone.
            let alone = attend_one(&mut f.engine, layer, 1, q, t).unwrap();
            assert_eq!(alone, o1, "pos {t} layer {layer}: batch vs alone");
        }
    }
    let s = f.engine.seq_policy_stats(2).unwrap();
    if counts_selection {
        // Every candidate was selected.
        assert_eq!(s.selected_blocks, s.candidate_blocks);
    } else {
        // Dense layers select nothing: they attend every block.
        assert!(s.selected_blocks.iter().all(|&x| x == 0), "{s:?}");
        assert!(s.attended_blocks.iter().all(|&x| x > 0), "{s:?}");
    }
}

#[test]
fn sparse_reads_fewer_pages_within_the_step_budget_and_stays_close() {
    let layers = SHAPE.layers as usize;
    let cfg = EngineConfig {
        cache_bytes: 0,
        min_blocks: 2,
        max_blocks: 8,
        step_budget_blocks: 2 * layers + 6,
        target_mass: 0.9,
        ..EngineConfig::default()
    };
    let mut f = engine(cfg, 128 << 20);
    let mut d = plain_data(1600, 5);
    // Decode queries share one direction per query head; the keys of block 20 point the same
    // way, so most of the attention mass sits there, far from the sinks and the recent window.
    let dir = values(Q_DIM, 77);
    for t in 1580..1600 {
        d.q[t * Q_DIM..(t + 1) * Q_DIM].copy_from_slice(&dir);
    }
    for t in 640..672 {
        for kvh in 0..3 {
            for i in 0..64 {
                let mean_q = (0..3).map(|j| dir[(kvh * 3 + j) * 64 + i]).sum::<f32>() / 3.0;
                d.k[t * KV_DIM + kvh * 64 + i] = 12.0 * mean_q;
            }
        }
    }
    f.engine.open(3, AttentionMode::Sparse, 2000).unwrap();
    append(&mut f.engine, 3, &d, 0, 1580);
    let mut worst = 0.0f32;
    for t in 1580..1600 {
        append(&mut f.engine, 3, &d, t, t + 1);
        for layer in 0..layers {
            let q = rows(&d.q, Q_DIM, t, t + 1);
            let got = attend_one(&mut f.engine, layer, 3, q, t).unwrap();
            worst = worst.max(max_diff(&got, &reference(&d, t, q)));
        }
    }
    let s = f.engine.seq_policy_stats(3).unwrap();
    assert!(
        s.max_step_selected as usize <= cfg.step_budget_blocks,
        "{s:?}"
    );
    let selected: u64 = s.selected_blocks.iter().sum();
    let candidates: u64 = s.candidate_blocks.iter().sum();
    assert!(
        selected * 3 < candidates,
        "selected {selected} of {candidates}"
    );
    // The planted block was found: the outputs are close to exact attention.
    assert!(worst < 0.02, "worst difference {worst}");
}

#[test]
fn errors_stay_with_their_own_request() {
    // No read-ahead: each fault below hits the read of the attend that follows it (faults
    // in read-ahead are tests/readahead.rs).
    let cfg = EngineConfig {
        cache_bytes: 0,
        readahead_layers: 0,
        ..EngineConfig::default()
    };
    let mut f = engine(cfg, 64 << 20);
    let d = data(200, 3);
    for seq in [1, 2] {
        f.engine.open(seq, AttentionMode::Full, 1000).unwrap();
        append(&mut f.engine, seq, &d, 0, 200);
    }
    let q = rows(&d.q, Q_DIM, 199, 200);
    let want = reference(&d, 199, q);

    // An unknown sequence in a batch fails alone.
    let (mut o1, mut o2) = (vec![0.0; Q_DIM], vec![0.0; Q_DIM]);
    let mut items = [
        AttendReq {
            seq: 99,
            q,
            first_pos: 199,
            out: &mut o1,
        },
        AttendReq {
            seq: 1,
            q,
            first_pos: 199,
            out: &mut o2,
        },
    ];
    let r = f.engine.attend(0, &mut items);
    assert!(
        matches!(r[0], Err(KvError::UnknownSequence(99))),
        "{:?}",
        r[0]
    );
    assert!(r[1].is_ok());
    assert!(max_diff(&o2, &want) < TOL);

    // A checksum failure fails that item, names the page, and leaves the data intact.
    f.engine.with_store(|_| ());
    f.dev.arm(Fault::BitFlip);
    let (mut o1, mut o2) = (vec![0.0; Q_DIM], vec![0.0; Q_DIM]);
    let mut items = [
        AttendReq {
            seq: 1,
            q,
            first_pos: 199,
            out: &mut o1,
        },
        AttendReq {
            seq: 2,
            q,
            first_pos: 199,
            out: &mut o2,
        },
    ];
    let r = f.engine.attend(1, &mut items);
    let e = r[0].as_ref().unwrap_err();
    assert!(
        matches!(
            e,
            KvError::ChecksumMismatch {
                seq: 1,
                layer: 1,
                ..
            }
        ),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("checksum mismatch in sequence 1 layer 1"),
        "{e}"
    );
    assert!(r[1].is_ok());
    assert!(max_diff(&o2, &want) < TOL);
    // The next read of the same pages is clean again.
    assert!(max_diff(&attend_one(&mut f.engine, 1, 1, q, 199).unwrap(), &want) < TOL);

    // A reclaimed sequence is unknown; the other is untouched.
    f.engine.reclaim(1).unwrap();
    assert!(matches!(
        attend_one(&mut f.engine, 0, 1, q, 199),
        Err(KvError::UnknownSequence(1))
    ));
    assert!(matches!(
        f.engine.append(1, 0, &d.k[..KV_DIM], &d.v[..KV_DIM], &[]),
        Err(KvError::UnknownSequence(1))
    ));
    assert!(max_diff(&attend_one(&mut f.engine, 0, 2, q, 199).unwrap(), &want) < TOL);
}

#[test]
fn a_full_store_fails_only_the_sequence_that_hit_it() {
    // Room for a few hundred tokens only.
    let mut f = engine(EngineConfig::default(), 2 << 20);
    let d = data(2112, 9);
    f.engine.open(1, AttentionMode::Full, 4000).unwrap();
    append(&mut f.engine, 1, &d, 0, 64);
    f.engine.open(2, AttentionMode::Full, 4000).unwrap();
    // Sequence 2 grows until the store is full; the error names the cause.
    let mut err = None;
    for (a, b) in (64..2000).step_by(64).map(|a| (a, a + 64)) {
        let mut failed = false;
        for layer in 0..2 {
            if let Err(e) = f.engine.append(
                2,
                layer,
                rows(&d.k, KV_DIM, a, b),
                rows(&d.v, KV_DIM, a, b),
                &[],
            ) {
                err = Some(e);
                failed = true;
                break;
            }
        }
        if failed {
            break;
        }
        // Let the writer land this step's pages, so that a write that found the store full
        // fails the next append rather than one after the loop has ended.
        f.engine.with_store(|_| ());
        // Sequence 2 holds rows 64..b at positions 0..b-64.
        if let Err(e) = attend_one(&mut f.engine, 0, 2, rows(&d.q, Q_DIM, b - 1, b), b - 65) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("the store filled up");
    assert!(e.to_string().contains("KV store full"), "{e}");
    // Sequence 1 still attends exactly.
    let q = rows(&d.q, Q_DIM, 63, 64);
    let got = attend_one(&mut f.engine, 0, 1, q, 63).unwrap();
    assert!(max_diff(&got, &reference(&d, 63, q)) < TOL);
    // Releasing sequence 2 frees its room.
    f.engine.reclaim(2).unwrap();
    f.engine.open(3, AttentionMode::Full, 4000).unwrap();
    append(&mut f.engine, 3, &d, 0, 256);
}

/// Run `f`; if it has not returned within `limit`, fail the whole test binary (a hang
/// would otherwise stall the run forever).
fn within<T>(limit: std::time::Duration, what: &'static str, f: impl FnOnce() -> T) -> T {
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            eprintln!("{what} did not return within {limit:?}: it hangs");
            std::process::exit(1);
        }
    });
    let out = f();
    let _ = done_tx.send(());
    out
}

#[test]
fn a_panic_on_an_engine_thread_fails_only_its_request_and_never_hangs() {
    use std::time::Duration;
    let cfg = EngineConfig {
        cache_bytes: 0,
        ..EngineConfig::default()
    };
    let mut f = engine(cfg, 64 << 20);
    let d = data(200, 5);
    for seq in [1, 2] {
        f.engine.open(seq, AttentionMode::Full, 1000).unwrap();
        append(&mut f.engine, seq, &d, 0, 200);
    }
    f.engine.with_store(|_| ());
    let q = rows(&d.q, Q_DIM, 199, 200);
    let want = reference(&d, 199, q);

    // A page read that panics: one item fails with an internal error, the other is exact.
    f.dev.arm(Fault::ReadPanic);
    let (mut o1, mut o2) = (vec![0.0; Q_DIM], vec![0.0; Q_DIM]);
    let mut items = [
        AttendReq {
            seq: 1,
            q,
            first_pos: 199,
            out: &mut o1,
        },
        AttendReq {
            seq: 2,
            q,
            first_pos: 199,
            out: &mut o2,
        },
    ];
    let r = within(Duration::from_secs(60), "attend", || {
        f.engine.attend(0, &mut items)
    });
    let failed: Vec<&KvError> = r.iter().filter_map(|x| x.as_ref().err()).collect();
    assert_eq!(failed.len(), 1, "{r:?}");
    assert!(
        matches!(failed[0], KvError::WorkerPanicked { worker: "reader thread", message } if message.contains("injected panic")),
        "{}",
        failed[0]
    );
    let ok = if r[0].is_ok() { &o1 } else { &o2 };
    assert!(max_diff(ok, &want) < TOL);
    // The reader goes on: both sequences read exactly again.
    for seq in [1, 2] {
        let got = within(Duration::from_secs(60), "attend", || {
            attend_one(&mut f.engine, 0, seq, q, 199)
        });
        assert!(max_diff(&got.unwrap(), &want) < TOL);
    }

    // An append that panics on the writer thread fails its sequence, named as a panic;
    // the writer goes on with the other sequence's appends.
    f.dev.arm(Fault::WritePanic);
    let more = data(264, 5);
    let err = within(Duration::from_secs(60), "append", || {
        // The failure shows at the next append of the sequence (the writer is behind).
        for _ in 0..2 {
            for layer in 0..SHAPE.layers as usize {
                let (k, v) = (
                    rows(&more.k, KV_DIM, 200, 264),
                    rows(&more.v, KV_DIM, 200, 264),
                );
                if let Err(e) = f.engine.append(1, layer, k, v, &[]) {
                    return e;
                }
            }
            f.engine.with_store(|_| ());
        }
        panic!("the panicked append was not reported");
    });
    assert!(err.to_string().contains("panicked"), "{err}");
    append(&mut f.engine, 2, &more, 200, 264);
    f.engine.with_store(|_| ());
    let q = rows(&more.q, Q_DIM, 263, 264);
    let got = within(Duration::from_secs(60), "attend", || {
        attend_one(&mut f.engine, 1, 2, q, 263)
    });
    assert!(max_diff(&got.unwrap(), &reference(&more, 263, q)) < TOL);
}
