//! Shared helpers for the csd-engine tests (the integration tests, and the crate's unit
//! tests that look at the on-disk format, which include this file).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use csd_engine::{KvStore, LayerRead, PageShape, StoreConfig, StoreOptions};
use half::f16;

/// The small page shape the store tests use: 3 layers, 3 kv heads, head_dim 64, 32 tokens
/// per page.
pub fn shape() -> PageShape {
    PageShape {
        layers: 3,
        kv_heads: 3,
        head_dim: 64,
        block_tokens: 32,
    }
}

/// A store of `shape` and `capacity` bytes with default options.
pub fn cfg(shape: PageShape, capacity: u64) -> StoreConfig {
    StoreConfig {
        shape,
        capacity,
        options: StoreOptions::default(),
    }
}

/// A temp dir on the real disk (under the target dir), so O_DIRECT is exercised: cargo's
/// scratch dir for integration tests, or the test binary's own folder for unit tests.
pub fn disk_tempdir() -> tempfile::TempDir {
    let base = match option_env!("CARGO_TARGET_TMPDIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::current_exe()
            .expect("test binary path")
            .parent()
            .expect("test binary folder")
            .to_path_buf(),
    };
    tempfile::Builder::new()
        .prefix("kvstore-test")
        .tempdir_in(base)
        .expect("temp dir")
}

/// A 64-bit hash (splitmix64's finaliser): test data is a function of its coordinates, so
/// any token can be regenerated on its own. A hash, not a random stream.
fn hash64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Deterministic K/V values for tokens `from..from+n` of (seq, layer), token-major.
pub fn kv_data(
    shape: &PageShape,
    seq: u64,
    layer: u32,
    from: usize,
    n: usize,
) -> (Vec<f16>, Vec<f16>) {
    let row = shape.token_elems();
    let mut k = Vec::with_capacity(n * row);
    let mut v = Vec::with_capacity(n * row);
    for tok in from..from + n {
        let base = hash64(seq.wrapping_mul(1_000_003) ^ ((layer as u64) << 40) ^ tok as u64);
        for e in 0..row {
            let h = hash64(base ^ e as u64);
            k.push(f16::from_bits(h as u16));
            v.push(f16::from_bits((h >> 16) as u16));
        }
    }
    (k, v)
}

/// The expected contents of one sequence: per layer, token-major K and V.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RefSeq {
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
}

impl RefSeq {
    pub fn new(layers: usize) -> RefSeq {
        RefSeq {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
        }
    }
    pub fn tokens(&self, shape: &PageShape, layer: usize) -> usize {
        self.k[layer].len() / shape.token_elems()
    }
}

fn bits(x: &[f16]) -> Vec<u16> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Rows of `head` for tokens `a..b` out of token-major data.
pub fn head_rows(shape: &PageShape, data: &[f16], head: usize, a: usize, b: usize) -> Vec<u16> {
    let (h, d) = (shape.kv_heads as usize, shape.head_dim as usize);
    let mut out = Vec::with_capacity((b - a) * d);
    for tok in a..b {
        let at = (tok * h + head) * d;
        out.extend(data[at..at + d].iter().map(|x| x.to_bits()));
    }
    out
}

/// Check every byte of a read (blocks and tail) against the reference.
pub fn check_read(
    shape: &PageShape,
    r: &RefSeq,
    layer: usize,
    got: &LayerRead,
) -> Result<(), String> {
    let t = shape.block_tokens as usize;
    let total = r.tokens(shape, layer);
    for (i, &b) in got.blocks().iter().enumerate() {
        let (a, e) = (b as usize * t, (b as usize + 1) * t);
        if e > total {
            return Err(format!("block {b} beyond {total} tokens"));
        }
        if got.first_pos(i) != a {
            return Err(format!("block {b} first_pos {}", got.first_pos(i)));
        }
        for head in 0..shape.kv_heads as usize {
            if bits(got.keys(i, head)) != head_rows(shape, &r.k[layer], head, a, e) {
                return Err(format!("layer {layer} block {b} head {head}: K differs"));
            }
            if bits(got.values(i, head)) != head_rows(shape, &r.v[layer], head, a, e) {
                return Err(format!("layer {layer} block {b} head {head}: V differs"));
            }
        }
    }
    let tail_from = total / t * t;
    if got.tail_tokens() != total - tail_from || got.tail_first_pos() != tail_from {
        return Err(format!(
            "layer {layer}: tail {} tokens at {}, expected {} at {tail_from}",
            got.tail_tokens(),
            got.tail_first_pos(),
            total - tail_from
        ));
    }
    for head in 0..shape.kv_heads as usize {
        if bits(got.tail_keys(head)) != head_rows(shape, &r.k[layer], head, tail_from, total)
            || bits(got.tail_values(head)) != head_rows(shape, &r.v[layer], head, tail_from, total)
        {
            return Err(format!("layer {layer} head {head}: tail differs"));
        }
    }
    Ok(())
}

/// Read every layer of every reference sequence in full and compare.
pub fn check_all(store: &KvStore, refs: &HashMap<u64, RefSeq>) -> Result<(), String> {
    let shape = store.shape();
    let mut got: Vec<u64> = refs.keys().copied().collect();
    got.sort_unstable();
    if store.sequences() != got {
        return Err(format!(
            "store has sequences {:?}, expected {:?}",
            store.sequences(),
            got
        ));
    }
    let mut out = LayerRead::new();
    for (&seq, r) in refs {
        for layer in 0..shape.layers {
            store
                .read_layer(seq, layer, &mut out)
                .map_err(|e| format!("seq {seq}: {e}"))?;
            if out.len() != r.tokens(&shape, layer as usize) / shape.block_tokens as usize {
                return Err(format!("seq {seq} layer {layer}: {} blocks", out.len()));
            }
            check_read(&shape, r, layer as usize, &out).map_err(|e| format!("seq {seq}: {e}"))?;
        }
    }
    Ok(())
}

/// Append `n` deterministic tokens to every layer of `seq`, mirroring into `r`.
pub fn append_all(
    store: &mut KvStore,
    r: &mut RefSeq,
    seq: u64,
    n: usize,
) -> Result<(), csd_engine::KvError> {
    let shape = store.shape();
    for layer in 0..shape.layers {
        let from = r.tokens(&shape, layer as usize);
        let (k, v) = kv_data(&shape, seq, layer, from, n);
        store.append(seq, layer, &k, &v)?;
        r.k[layer as usize].extend_from_slice(&k);
        r.v[layer as usize].extend_from_slice(&v);
    }
    Ok(())
}
