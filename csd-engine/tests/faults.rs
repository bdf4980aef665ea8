//! Fault injection: every injected fault yields an error or a detected checksum mismatch,
//! never wrong data, and other sequences keep working.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use csd_engine::device::{
    open_path, BlockDevice, Fault, FaultConfig, FaultyDevice, OpenDeviceOptions,
};
use csd_engine::{KvError, KvStore, LayerRead, PageShape, StoreOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPE: PageShape = PageShape {
    layers: 2,
    kv_heads: 3,
    head_dim: 64,
    block_tokens: 32,
};

fn faulty_store(
    cfg: FaultConfig,
) -> (
    tempfile::TempDir,
    Arc<FaultyDevice<Box<dyn BlockDevice>>>,
    KvStore,
) {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let opts = OpenDeviceOptions {
        create: true,
        ..Default::default()
    };
    let dev = open_path(&path, Some(32 << 20), &opts).unwrap();
    assert!(dev.mode().direct);
    let faulty = Arc::new(FaultyDevice::new(dev, cfg));
    let store =
        KvStore::format_device(Box::new(faulty.clone()), SHAPE, StoreOptions::default()).unwrap();
    (dir, faulty, store)
}

#[test]
fn each_armed_fault_is_caught() {
    // Misdirected writes land 16 MiB further on: free space, far from the live pages.
    let cfg = FaultConfig {
        seed: 1,
        misdirect_shift: 16 << 20,
        ..Default::default()
    };
    let (_dir, dev, mut store) = faulty_store(cfg);
    let mut refs: HashMap<u64, RefSeq> = HashMap::new();
    append_all(
        &mut store,
        refs.entry(1).or_insert_with(|| RefSeq::new(2)),
        1,
        100,
    )
    .unwrap();
    append_all(
        &mut store,
        refs.entry(2).or_insert_with(|| RefSeq::new(2)),
        2,
        130,
    )
    .unwrap();
    let mut out = LayerRead::new();

    // Read error.
    dev.arm(Fault::ReadError);
    let e = store.read_layer(1, 0, &mut out).unwrap_err();
    assert!(matches!(e, KvError::Io { .. }), "{e}");
    assert!(out.is_empty());

    // Bit flip: detected, named.
    dev.arm(Fault::BitFlip);
    let e = store.read_layer(1, 1, &mut out).unwrap_err();
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
    assert!(e.to_string().contains("sequence 1 layer 1 block"), "{e}");
    assert_eq!(store.counters().checksum_failures, 1);

    // Short read that leaves garbage: detected.
    dev.arm(Fault::ShortRead);
    let e = store.read_blocks(2, 0, &[1, 2], &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            KvError::ChecksumMismatch {
                seq: 2,
                layer: 0,
                ..
            }
        ),
        "{e}"
    );

    // Write error and ENOSPC: the append fails, nothing changes, a retry works.
    for f in [Fault::WriteError, Fault::NoSpace] {
        dev.arm(f);
        let before = store.info(1).unwrap();
        let (k, v) = kv_data(&SHAPE, 1, 0, 100, 40);
        let e = store.append(1, 0, &k, &v).unwrap_err();
        match (&e, f) {
            (KvError::Io { source, .. }, Fault::NoSpace) => assert!(source.is_no_space(), "{e}"),
            (KvError::Io { .. }, Fault::WriteError) => {}
            _ => panic!("unexpected {e}"),
        }
        assert_eq!(store.info(1).unwrap(), before);
    }
    append_all(&mut store, refs.get_mut(&1).unwrap(), 1, 40).unwrap();
    check_all(&store, &refs).unwrap();

    // Latency: slower, still correct.
    dev.arm(Fault::Latency(Duration::from_millis(30)));
    let t0 = Instant::now();
    store.read_layer(2, 1, &mut out).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(30));
    check_read(&SHAPE, &refs[&2], 1, &out).unwrap();

    // Misdirected write: the append "succeeds", the page is not where the index says; the
    // read of that block is refused, the rest of the sequence and other sequences are fine.
    let r3 = refs.entry(3).or_insert_with(|| RefSeq::new(2));
    dev.arm(Fault::MisdirectedWrite);
    append_all(&mut store, r3, 3, 64).unwrap(); // layer 0's write is misdirected
    let e = store.read_blocks(3, 0, &[0, 1], &mut out).unwrap_err();
    assert!(
        matches!(
            e,
            KvError::ChecksumMismatch {
                seq: 3,
                layer: 0,
                block: 0,
                ..
            }
        ),
        "{e}"
    );
    store.read_layer(3, 1, &mut out).unwrap();
    check_read(&SHAPE, &refs[&3], 1, &out).unwrap();
    store.reclaim(3).unwrap();
    refs.remove(&3);
    check_all(&store, &refs).unwrap();

    let c = dev.counts();
    assert_eq!(
        (
            c.read_errors,
            c.bit_flips,
            c.short_reads,
            c.write_errors,
            c.no_space,
            c.misdirected_writes,
            c.delays
        ),
        (1, 1, 1, 1, 1, 1, 1)
    );
}

#[test]
fn random_faults_never_yield_wrong_data() {
    let cfg = FaultConfig {
        seed: 0xfeed,
        read_error: 0.04,
        short_read: 0.04,
        bit_flip: 0.06,
        write_error: 0.04,
        no_space: 0.03,
        misdirected_write: 0.03,
        ..Default::default()
    };
    let (_dir, dev, mut store) = faulty_store(cfg);
    let mut refs: HashMap<u64, RefSeq> = HashMap::new();
    let mut out = LayerRead::new();
    let (mut ok_reads, mut failed_reads, mut failed_appends, mut mismatches) = (0, 0, 0, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(12345);
    for step in 0..600 {
        let seq = rng.random_range(0..5u64);
        let layer = rng.random_range(0..2u32);
        match rng.random_range(0..3) {
            0 => {
                let r = refs.entry(seq).or_insert_with(|| RefSeq::new(2));
                let from = r.tokens(&SHAPE, layer as usize);
                let n = rng.random_range(1..=70usize);
                let (k, v) = kv_data(&SHAPE, seq, layer, from, n);
                match store.append(seq, layer, &k, &v) {
                    Ok(()) => {
                        r.k[layer as usize].extend_from_slice(&k);
                        r.v[layer as usize].extend_from_slice(&v);
                    }
                    Err(KvError::Io { .. }) => {
                        failed_appends += 1;
                        // Nothing changed: the store still agrees with the reference.
                        let held = store.info(seq).map_or(0, |i| i.tokens[layer as usize]);
                        assert_eq!(
                            held, from,
                            "step {step}: failed append changed the sequence"
                        );
                    }
                    Err(e) => panic!("step {step}: unexpected {e}"),
                }
                if store.info(seq).is_none() {
                    refs.remove(&seq);
                }
            }
            1 => {
                let Some(r) = refs.get(&seq) else { continue };
                match store.read_layer(seq, layer, &mut out) {
                    Ok(()) => {
                        check_read(&SHAPE, r, layer as usize, &out)
                            .unwrap_or_else(|e| panic!("step {step}: WRONG DATA {e}"));
                        ok_reads += 1;
                    }
                    Err(KvError::ChecksumMismatch {
                        seq: s, layer: l, ..
                    }) => {
                        assert_eq!((s, l), (seq, layer));
                        mismatches += 1;
                        failed_reads += 1;
                    }
                    Err(KvError::Io { .. }) => failed_reads += 1,
                    Err(e) => panic!("step {step}: unexpected {e}"),
                }
            }
            _ => {
                let Some(r) = refs.get(&seq) else { continue };
                let full = (r.tokens(&SHAPE, layer as usize) / 32) as u32;
                if full == 0 {
                    continue;
                }
                let pick: Vec<u32> = (0..4).map(|_| rng.random_range(0..full)).collect();
                match store.read_blocks(seq, layer, &pick, &mut out) {
                    Ok(()) => {
                        check_read(&SHAPE, r, layer as usize, &out)
                            .unwrap_or_else(|e| panic!("step {step}: WRONG DATA {e}"));
                        ok_reads += 1;
                    }
                    Err(KvError::ChecksumMismatch { .. }) => {
                        mismatches += 1;
                        failed_reads += 1;
                    }
                    Err(KvError::Io { .. }) => failed_reads += 1,
                    Err(e) => panic!("step {step}: unexpected {e}"),
                }
            }
        }
        if step % 150 == 149 {
            // Sequences end and new ones start; reclaim works despite the faults.
            if let Some(&s) = refs.keys().next() {
                store.reclaim(s).unwrap();
                refs.remove(&s);
            }
        }
    }
    let c = dev.counts();
    assert!(
        c.bit_flips + c.short_reads > 0 && c.read_errors > 0 && c.write_errors + c.no_space > 0,
        "{c:?}"
    );
    assert!(
        ok_reads > 50 && failed_reads > 5 && failed_appends > 5 && mismatches > 0,
        "ok {ok_reads} failed {failed_reads} appends {failed_appends} mismatches {mismatches}"
    );
    assert_eq!(store.counters().checksum_failures, mismatches);
}
