//! Shared by the engine's integration tests: a store on a real O_DIRECT file behind the
//! fault injector, deterministic K/V/q data, a plain f64 reference of attention, and small
//! helpers to append and attend.
#![allow(dead_code)]

use std::sync::Arc;

use super::common::disk_tempdir;
use csd_engine::device::{open_path, BlockDevice, FaultConfig, FaultyDevice, OpenDeviceOptions};
use csd_engine::{
    AttendReq, Engine, EngineConfig, KvError, KvShape, KvStore, PageShape, StoreOptions,
};
use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const SHAPE: PageShape = PageShape {
    layers: 2,
    kv_heads: 3,
    head_dim: 64,
    block_tokens: 32,
};
pub const Q_HEADS: usize = 9;
pub const KV_SHAPE: KvShape = KvShape {
    layers: 2,
    q_heads: Q_HEADS,
    kv_heads: 3,
    head_dim: 64,
};
pub const KV_DIM: usize = 3 * 64;
pub const Q_DIM: usize = Q_HEADS * 64;

/// Seeded pseudo-random values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub struct Fixture {
    pub _dir: tempfile::TempDir,
    pub dev: Arc<FaultyDevice<Box<dyn BlockDevice>>>,
    pub engine: Engine,
}

pub fn engine(cfg: EngineConfig, store_bytes: u64) -> Fixture {
    engine_with_faults(cfg, store_bytes, FaultConfig::default())
}

/// An engine whose device draws `faults` (turn them on and off with `dev.set_enabled`).
pub fn engine_with_faults(cfg: EngineConfig, store_bytes: u64, faults: FaultConfig) -> Fixture {
    let dir = disk_tempdir();
    let opts = OpenDeviceOptions {
        create: true,
        ..Default::default()
    };
    let dev = open_path(&dir.path().join("kv.store"), Some(store_bytes), &opts).unwrap();
    assert!(dev.mode().direct, "the test needs O_DIRECT");
    let dev = Arc::new(FaultyDevice::new(dev, faults));
    let store =
        KvStore::format_device(Box::new(dev.clone()), SHAPE, StoreOptions::default()).unwrap();
    Fixture {
        _dir: dir,
        dev,
        engine: Engine::new(store, KV_SHAPE, cfg).unwrap(),
    }
}

/// One sequence's data: K, V and q rows for every position.
pub struct Data {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub q: Vec<f32>,
}

pub fn data(tokens: usize, seed: u64) -> Data {
    let mut d = plain_data(tokens, seed);
    // A few strongly matching keys, so attention is peaked as in real models.
    for (i, x) in d.k.iter_mut().enumerate() {
        if (i / KV_DIM) % 37 == 5 {
            *x *= 4.0;
        }
    }
    d
}

pub fn plain_data(tokens: usize, seed: u64) -> Data {
    let k = values(tokens * KV_DIM, seed);
    Data {
        k,
        v: values(tokens * KV_DIM, seed + 1),
        q: values(tokens * Q_DIM, seed + 2)
            .iter()
            .map(|x| x * 3.0)
            .collect(),
    }
}

/// Softmax attention in f64 over the f16-rounded keys and values `0..=pos`.
/// The query is rounded to f16 too, as the kernel (like llama.cpp) does before its dots.
pub fn reference(d: &Data, pos: usize, q: &[f32]) -> Vec<f32> {
    let r = |x: f32| f16::from_f32(x).to_f64();
    let mut out = vec![0.0f32; Q_DIM];
    for head in 0..Q_HEADS {
        let kvh = head / 3;
        let qh = &q[head * 64..(head + 1) * 64];
        let scores: Vec<f64> = (0..=pos)
            .map(|t| {
                let k = &d.k[t * KV_DIM + kvh * 64..t * KV_DIM + (kvh + 1) * 64];
                qh.iter().zip(k).map(|(&a, &b)| r(a) * r(b)).sum::<f64>() / 8.0
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let total: f64 = w.iter().sum();
        for (t, wt) in w.iter().enumerate() {
            // Weights reach p·v rounded to f16, as in the kernel and llama.cpp.
            let p = r((wt / total) as f32);
            let v = &d.v[t * KV_DIM + kvh * 64..t * KV_DIM + (kvh + 1) * 64];
            for (o, &x) in out[head * 64..(head + 1) * 64].iter_mut().zip(v) {
                *o += (p * r(x)) as f32;
            }
        }
    }
    out
}

pub fn rows(x: &[f32], dim: usize, a: usize, b: usize) -> &[f32] {
    &x[a * dim..b * dim]
}

/// Append tokens `a..b` of `d` to every layer of `seq`.
pub fn append(e: &mut Engine, seq: u64, d: &Data, a: usize, b: usize) {
    for layer in 0..SHAPE.layers as usize {
        e.append(
            seq,
            layer,
            rows(&d.k, KV_DIM, a, b),
            rows(&d.v, KV_DIM, a, b),
            rows(&d.q, Q_DIM, a, b),
        )
        .unwrap();
    }
}

pub fn attend_one(
    e: &mut Engine,
    layer: usize,
    seq: u64,
    q: &[f32],
    pos: usize,
) -> Result<Vec<f32>, KvError> {
    let mut out = vec![0.0f32; q.len()];
    let mut items = [AttendReq {
        seq,
        q,
        first_pos: pos,
        out: &mut out,
    }];
    e.attend(layer, &mut items).pop().unwrap()?;
    Ok(out)
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
