//! Read-ahead in `full` and `flexgen` decode: the reads of the next layers are queued before
//! their attend. The outputs must be the very bits of an engine without read-ahead, across
//! blocks that fill up while a read-ahead is in flight, in batches and alone; a sequence
//! reclaimed with read-aheads in flight must never lend them to a new sequence of the same
//! id; and a read-ahead that fails or comes back corrupt fails that one attend with the
//! right error, never a wrong output. Prompt chunks, the other reads of a long prompt, attend
//! in RAM within their stage budget.

mod common;
mod engine_support;

use csd_engine::device::FaultConfig;
use csd_engine::{AttendReq, AttentionMode, Engine, EngineConfig, KvError};
use engine_support::*;

const TOL: f32 = 1e-3;

fn config(readahead_layers: usize, cache_bytes: u64) -> EngineConfig {
    EngineConfig {
        readahead_layers,
        cache_bytes,
        ..EngineConfig::default()
    }
}

/// Per layer, each item's result and output.
type StepResults = Vec<Vec<Result<Vec<f32>, KvError>>>;

/// Attend every layer of one decode step of `seqs` (all at position `t`) in one batch,
/// returning each item's result and output per layer.
fn step_batch(e: &mut Engine, seqs: &[u64], d: &Data, t: usize) -> StepResults {
    let q = rows(&d.q, Q_DIM, t, t + 1);
    let mut per_layer = Vec::new();
    for layer in 0..SHAPE.layers as usize {
        let mut outs = vec![vec![0.0f32; Q_DIM]; seqs.len()];
        let mut items: Vec<AttendReq<'_>> = seqs
            .iter()
            .zip(outs.iter_mut())
            .map(|(&seq, out)| AttendReq {
                seq,
                q,
                first_pos: t,
                out,
            })
            .collect();
        let results = e.attend(layer, &mut items);
        drop(items);
        per_layer.push(
            results
                .into_iter()
                .zip(outs)
                .map(|(r, o)| r.map(|()| o))
                .collect(),
        );
    }
    per_layer
}

/// One decode step of `seqs` at position `t`: append its token to every sequence, attend
/// every layer in one batch. Returns the reference output and each layer's results.
fn decode_step(e: &mut Engine, seqs: &[u64], d: &Data, t: usize) -> (Vec<f32>, StepResults) {
    for &s in seqs {
        append(e, s, d, t, t + 1);
    }
    let want = reference(d, t, rows(&d.q, Q_DIM, t, t + 1));
    (want, step_batch(e, seqs, d, t))
}

#[test]
fn read_ahead_gives_the_same_bits_as_reading_at_attend() {
    for mode in [AttentionMode::Flexgen, AttentionMode::Full] {
        for batch in [1usize, 3] {
            // A small cache in `full` mode: read-aheads leave the cached pages to it.
            let cache = if mode == AttentionMode::Full {
                8 * 3 * 8192
            } else {
                0
            };
            let mut with = engine(config(2, cache), 64 << 20);
            let mut without = engine(config(0, cache), 64 << 20);
            let d = data(340, 11);
            let seqs: Vec<u64> = (1..=batch as u64).collect();
            for f in [&mut with, &mut without] {
                for &s in &seqs {
                    f.engine.open(s, mode, 1000).unwrap();
                    append(&mut f.engine, s, &d, 0, 250);
                }
            }
            // Decode across the block boundaries at 256, 288 and 320: blocks fill up while
            // read-aheads of them are in flight.
            for t in 250..340 {
                let mut outs = Vec::new();
                let mut want = Vec::new();
                for f in [&mut with, &mut without] {
                    let (w, layers) = decode_step(&mut f.engine, &seqs, &d, t);
                    (want, _) = (w, outs.push(layers));
                }
                for (layer, (ahead, plain)) in outs[0].iter().zip(&outs[1]).enumerate() {
                    for (i, (a, b)) in ahead.iter().zip(plain).enumerate() {
                        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                        assert_eq!(a, b, "{mode} batch {batch} pos {t} layer {layer} item {i}");
                        assert!(max_diff(a, &want) < TOL, "{mode} pos {t}");
                    }
                }
            }
            let p = with.engine.attend_profile();
            let attends = 90 * SHAPE.layers as u64;
            // Every attend but the first step's first layer found its read-ahead.
            assert!(p.readahead_used * 10 >= attends * 9, "{mode}: {p:?}");
            assert!(p.readahead_queued >= p.readahead_used, "{p:?}");
            assert_eq!(without.engine.attend_profile().readahead_queued, 0);
            // Flexgen: the same pages came off the device, but those a step found still
            // staged because their block filled after its read-ahead was queued. (`full`
            // looks fewer pages up in the cache, so its admission differs.)
            for &s in seqs.iter().filter(|_| mode == AttentionMode::Flexgen) {
                let a = with.engine.seq_stats(s).unwrap().device_bytes_read;
                let b = without.engine.seq_stats(s).unwrap().device_bytes_read;
                assert!(
                    a <= b && a * 100 >= b * 95,
                    "{mode} seq {s}: {a} against {b}"
                );
            }
        }
    }
}

#[test]
fn a_reclaimed_sequence_never_lends_its_read_ahead_to_a_new_one() {
    let mut f = engine(config(2, 0), 64 << 20);
    let old = data(300, 1);
    let new = data(300, 2);
    f.engine.open(7, AttentionMode::Flexgen, 1000).unwrap();
    append(&mut f.engine, 7, &old, 0, 299);
    append(&mut f.engine, 7, &old, 299, 300);
    // Every block on flash (a read-ahead covers the blocks confirmed when it is queued).
    f.engine.with_store(|_| ());
    // Layer 0 queues the read-ahead of layer 1; the sequence ends before layer 1.
    let q = rows(&old.q, Q_DIM, 299, 300);
    attend_one(&mut f.engine, 0, 7, q, 299).unwrap();
    assert!(f.engine.attend_profile().readahead_queued > 0);
    f.engine.reclaim(7).unwrap();
    f.engine.open(7, AttentionMode::Flexgen, 1000).unwrap();
    append(&mut f.engine, 7, &new, 0, 300);
    for layer in 0..SHAPE.layers as usize {
        let q = rows(&new.q, Q_DIM, 299, 300);
        let got = attend_one(&mut f.engine, layer, 7, q, 299).unwrap();
        assert!(
            max_diff(&got, &reference(&new, 299, q)) < TOL,
            "layer {layer}"
        );
    }
    // Switching to sparse drops the read-aheads queued in flexgen.
    f.engine.set_mode(7, AttentionMode::Sparse).unwrap();
    let q = rows(&new.q, Q_DIM, 299, 300);
    attend_one(&mut f.engine, 0, 7, q, 299).unwrap();
}

#[test]
fn a_failed_or_corrupt_read_ahead_fails_only_its_attend() {
    let faults = FaultConfig {
        seed: 5,
        read_error: 0.15,
        bit_flip: 0.15,
        ..FaultConfig::default()
    };
    let mut f = engine_with_faults(config(2, 0), 64 << 20, faults);
    f.dev.set_enabled(false);
    let d = data(332, 4);
    let seqs = [1u64, 2];
    for &s in &seqs {
        f.engine.open(s, AttentionMode::Flexgen, 1000).unwrap();
        append(&mut f.engine, s, &d, 0, 250);
    }
    f.dev.set_enabled(true);
    let (mut io, mut checksum, mut ok) = (0, 0, 0);
    for t in 250..330 {
        let (want, layers) = decode_step(&mut f.engine, &seqs, &d, t);
        for layer in layers {
            for r in layer {
                match r {
                    Ok(out) => {
                        assert!(max_diff(&out, &want) < TOL, "a wrong output at {t}");
                        ok += 1;
                    }
                    Err(KvError::ChecksumMismatch { .. }) => checksum += 1,
                    Err(KvError::Io { .. }) => io += 1,
                    Err(e) => panic!("unexpected error at {t}: {e}"),
                }
            }
        }
    }
    let c = f.dev.counts();
    assert!(
        io > 0 && checksum > 0 && ok > 0,
        "io {io}, checksum {checksum}, ok {ok}, {c:?}"
    );
    // A failed read changes nothing stored. With the faults off, the first step may still
    // meet a read-ahead queued while they were on; the next is exact again.
    f.dev.set_enabled(false);
    for t in [330, 331] {
        let (want, layers) = decode_step(&mut f.engine, &seqs, &d, t);
        for layer in layers {
            for r in layer {
                match r {
                    Ok(out) => assert!(max_diff(&out, &want) < TOL),
                    Err(e) => assert!(t == 330, "step {t} after the faults: {e}"),
                }
            }
        }
    }
}

/// Prompt chunks attend to the chunks before them in RAM (within `prefill_stage_bytes`):
/// a chunked prefill reads nothing back from the device, and gives the same bits as one
/// that reads every page back (`prefill_stage_bytes = 0`). Decode then reads from flash.
#[test]
fn a_chunked_prefill_attends_in_ram_within_its_stage_budget() {
    let mut staged = engine(config(2, 0), 64 << 20);
    let mut read_back = engine(
        EngineConfig {
            prefill_stage_bytes: 0,
            ..config(2, 0)
        },
        64 << 20,
    );
    let d = data(401, 9);
    let mut outs = Vec::new();
    for f in [&mut staged, &mut read_back] {
        f.engine.open(1, AttentionMode::Full, 1000).unwrap();
        let mut got = Vec::new();
        for (a, b) in [(0usize, 128usize), (128, 256), (256, 400)] {
            append(&mut f.engine, 1, &d, a, b);
            // Let the writer put the earlier chunks on flash, as a slow prompt would.
            f.engine.with_store(|_| ());
            for layer in 0..SHAPE.layers as usize {
                got.push(attend_one(&mut f.engine, layer, 1, rows(&d.q, Q_DIM, a, b), a).unwrap());
            }
        }
        outs.push(got);
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(staged.engine.seq_stats(1).unwrap().device_bytes_read, 0);
    assert!(read_back.engine.seq_stats(1).unwrap().device_bytes_read > 0);
    // The first decode step drops the staged prompt and reads its pages.
    append(&mut staged.engine, 1, &d, 400, 401);
    staged.engine.with_store(|_| ());
    let q = rows(&d.q, Q_DIM, 400, 401);
    let got = attend_one(&mut staged.engine, 0, 1, q, 400).unwrap();
    assert!(max_diff(&got, &reference(&d, 400, q)) < TOL);
    assert!(staged.engine.seq_stats(1).unwrap().device_bytes_read > 0);
}
