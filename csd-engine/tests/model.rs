//! Model-based property test: random append / read / reclaim / persist / reopen sequences
//! against an in-memory reference, comparing every byte of every read.

mod common;

use std::collections::HashMap;

use common::*;
use csd_engine::device::MemDevice;
use csd_engine::{BlockDevice, KvError, KvStore, LayerRead, PageShape, StoreConfig, StoreOptions};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Append {
        seq: u64,
        layer: u32,
        n: usize,
    },
    AppendAll {
        seq: u64,
        n: usize,
    },
    ReadLayer {
        seq: u64,
        layer: u32,
    },
    ReadSome {
        seq: u64,
        layer: u32,
        pick: Vec<u32>,
    },
    Reclaim {
        seq: u64,
    },
    Persist {
        seq: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let seq = 0u64..4;
    let layer = 0u32..2;
    prop_oneof![
        4 => (seq.clone(), layer.clone(), 1usize..40).prop_map(|(seq, layer, n)| Op::Append { seq, layer, n }),
        3 => (seq.clone(), 1usize..30).prop_map(|(seq, n)| Op::AppendAll { seq, n }),
        3 => (seq.clone(), layer.clone()).prop_map(|(seq, layer)| Op::ReadLayer { seq, layer }),
        3 => (seq.clone(), layer.clone(), proptest::collection::vec(0u32..64, 0..12))
            .prop_map(|(seq, layer, pick)| Op::ReadSome { seq, layer, pick }),
        1 => seq.clone().prop_map(|seq| Op::Reclaim { seq }),
        2 => seq.prop_map(|seq| Op::Persist { seq }),
        1 => Just(Op::Reopen),
    ]
}

const SHAPE: PageShape = PageShape {
    layers: 2,
    kv_heads: 2,
    head_dim: 8,
    block_tokens: 4,
};

struct Model {
    live: HashMap<u64, RefSeq>,
    persisted: HashMap<u64, RefSeq>,
}

fn run(
    ops: Vec<Op>,
    dev_bytes: usize,
    opts: StoreOptions,
    file: Option<&std::path::Path>,
) -> Result<(), TestCaseError> {
    let mem = MemDevice::new(dev_bytes);
    let open_new = || -> KvStore {
        match file {
            Some(p) => KvStore::create(
                p,
                &StoreConfig {
                    shape: SHAPE,
                    capacity: dev_bytes as u64,
                    options: opts,
                },
            )
            .unwrap(),
            None => KvStore::format_device(Box::new(mem.clone()), SHAPE, opts).unwrap(),
        }
    };
    let reopen = || -> KvStore {
        match file {
            Some(p) => KvStore::open(p, &opts).unwrap(),
            None => KvStore::open_device(Box::new(mem.clone()), opts).unwrap(),
        }
    };
    let mut store = open_new();
    let mut m = Model {
        live: HashMap::new(),
        persisted: HashMap::new(),
    };
    let mut out = LayerRead::new();
    for op in ops {
        match op {
            Op::Append { seq, layer, n } => {
                let r = m.live.entry(seq).or_insert_with(|| RefSeq::new(2));
                let from = r.tokens(&SHAPE, layer as usize);
                let (k, v) = kv_data(&SHAPE, seq, layer, from, n);
                match store.append(seq, layer, &k, &v) {
                    Ok(()) => {
                        r.k[layer as usize].extend_from_slice(&k);
                        r.v[layer as usize].extend_from_slice(&v);
                    }
                    Err(KvError::StoreFull { seq: s, .. }) => {
                        prop_assert_eq!(s, seq);
                        if r.k.iter().all(|x| x.is_empty()) {
                            m.live.remove(&seq);
                        }
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("append: {e}"))),
                }
            }
            Op::AppendAll { seq, n } => {
                let mut r = m.live.get(&seq).cloned().unwrap_or_else(|| RefSeq::new(2));
                let res = append_all(&mut store, &mut r, seq, n);
                match res {
                    Ok(()) => {
                        m.live.insert(seq, r);
                    }
                    Err(KvError::StoreFull { .. }) => {
                        // Layers before the failing one took their tokens: re-sync the
                        // reference from what the store reports.
                        if let Some(info) = store.info(seq) {
                            let mut fixed = r.clone();
                            for (l, &t) in info.tokens.iter().enumerate() {
                                let e = t * SHAPE.token_elems();
                                fixed.k[l].truncate(e);
                                fixed.v[l].truncate(e);
                            }
                            m.live.insert(seq, fixed);
                        } else {
                            m.live.remove(&seq);
                        }
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("append_all: {e}"))),
                }
            }
            Op::ReadLayer { seq, layer } => {
                match (store.read_layer(seq, layer, &mut out), m.live.get(&seq)) {
                    (Ok(()), Some(r)) => {
                        check_read(&SHAPE, r, layer as usize, &out).map_err(TestCaseError::fail)?
                    }
                    (Err(KvError::UnknownSequence(_)), None) => {}
                    (res, r) => {
                        return Err(TestCaseError::fail(format!(
                            "read_layer {seq}: {res:?} with ref {}",
                            r.is_some()
                        )))
                    }
                }
            }
            Op::ReadSome { seq, layer, pick } => {
                let Some(r) = m.live.get(&seq) else {
                    prop_assert!(store.read_blocks(seq, layer, &pick, &mut out).is_err());
                    continue;
                };
                let full = (r.tokens(&SHAPE, layer as usize) / 4) as u32;
                let pick: Vec<u32> = if full == 0 {
                    vec![]
                } else {
                    pick.iter().map(|p| p % full).collect()
                };
                store
                    .read_blocks(seq, layer, &pick, &mut out)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let mut want = pick.clone();
                want.sort_unstable();
                want.dedup();
                prop_assert_eq!(out.blocks(), &want[..]);
                check_read(&SHAPE, r, layer as usize, &out).map_err(TestCaseError::fail)?;
            }
            Op::Reclaim { seq } => {
                let res = store.reclaim(seq);
                let had = m.live.remove(&seq).is_some();
                prop_assert_eq!(res.is_ok(), had, "reclaim {}: {:?}", seq, res);
                m.persisted.remove(&seq);
            }
            Op::Persist { seq } => match store.persist(seq) {
                Ok(()) => {
                    m.persisted.insert(seq, m.live[&seq].clone());
                }
                Err(KvError::UnknownSequence(_)) => prop_assert!(!m.live.contains_key(&seq)),
                Err(KvError::ManifestNoSpace { .. }) => {}
                Err(e) => return Err(TestCaseError::fail(format!("persist: {e}"))),
            },
            Op::Reopen => {
                drop(store);
                store = reopen();
                m.live = m.persisted.clone();
            }
        }
        // Invariant: allocator and index agree on what is free.
        prop_assert!(store.free_bytes() <= store.capacity_bytes());
    }
    check_all(&store, &m.live).map_err(TestCaseError::fail)?;
    drop(store);
    let store = reopen();
    check_all(&store, &m.persisted).map_err(TestCaseError::fail)?;
    Ok(())
}

/// Case count, scaled by CSD_PROPTEST_SCALE (default 1) for longer soak runs.
fn cases(base: u32) -> u32 {
    let scale: u32 = std::env::var("CSD_PROPTEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base * scale.max(1)
}

fn small_opts() -> StoreOptions {
    StoreOptions {
        min_extent_blocks: 2,
        max_extent_blocks: 8,
        ..Default::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(96), ..ProptestConfig::default() })]

    /// Roomy in-memory device.
    #[test]
    fn model_mem(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops, 4 << 20, small_opts(), None)?;
    }

    /// A tight device: StoreFull, slack trimming and scattered extents get exercised.
    #[test]
    fn model_mem_tight(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops, 65536 + 40 * 8192, small_opts(), None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(12), ..ProptestConfig::default() })]

    /// The same on a real file through io_uring + O_DIRECT.
    #[test]
    fn model_file(ops in proptest::collection::vec(op(), 1..60)) {
        let dir = disk_tempdir();
        run(ops, 4 << 20, small_opts(), Some(&dir.path().join("kv.store")))?;
    }
}

#[test]
fn mem_device_is_shared_between_clones() {
    let a = MemDevice::new(8192);
    let b = a.clone();
    b.write_at(&[csd_engine::device::WriteReq {
        offset: 4096,
        buf: &[7u8; 4096],
    }])
    .unwrap();
    assert_eq!(a.snapshot()[4096], 7);
}
