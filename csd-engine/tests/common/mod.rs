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

// ---------------------------------------------------------------------------------------------
// Prefix cache helpers: K/V as a function of a token stream.
// ---------------------------------------------------------------------------------------------

/// A 64-bit mix of two values (for deterministic token streams).
pub fn mix(a: u64, b: u64) -> u64 {
    hash64(hash64(a) ^ b.rotate_left(17))
}

/// Deterministic K/V for tokens `from..from+n` of a token stream, token-major, as a model
/// would write it: the values at position `p` depend on every token up to `p` (a running
/// hash), on `p`, the layer and the element. Two streams that agree on their first `m`
/// tokens therefore agree on their first `m` tokens of K/V in every layer, and differ after.
pub fn token_kv(
    shape: &PageShape,
    tokens: &[u32],
    layer: u32,
    from: usize,
    n: usize,
) -> (Vec<f16>, Vec<f16>) {
    let row = shape.token_elems();
    let mut k = Vec::with_capacity(n * row);
    let mut v = Vec::with_capacity(n * row);
    let mut h = 0x7072_6566_6978u64; // "prefix"
    for (p, &t) in tokens[..from + n].iter().enumerate() {
        h = mix(h, t as u64);
        if p < from {
            continue;
        }
        let base = mix(h ^ ((layer as u64) << 48), p as u64);
        for e in 0..row {
            let x = hash64(base ^ e as u64);
            k.push(f16::from_bits(x as u16));
            v.push(f16::from_bits((x >> 16) as u16));
        }
    }
    (k, v)
}

/// The expected contents (every layer) of a sequence holding exactly `tokens`.
pub fn token_ref(shape: &PageShape, tokens: &[u32]) -> RefSeq {
    let mut r = RefSeq::new(shape.layers as usize);
    for layer in 0..shape.layers {
        let (k, v) = token_kv(shape, tokens, layer, 0, tokens.len());
        r.k[layer as usize] = k;
        r.v[layer as usize] = v;
    }
    r
}

/// Append `tokens[held..upto]` to every layer of `seq` (`held`: what the layer holds, per
/// the reference), mirroring into `r`. On error, the layers before the failing one have
/// taken their tokens (and `r` says so).
pub fn append_tokens(
    store: &mut KvStore,
    r: &mut RefSeq,
    seq: u64,
    tokens: &[u32],
    upto: usize,
) -> Result<(), csd_engine::KvError> {
    let shape = store.shape();
    for layer in 0..shape.layers {
        let from = r.tokens(&shape, layer as usize);
        if upto <= from {
            continue;
        }
        let (k, v) = token_kv(&shape, tokens, layer, from, upto - from);
        store.append(seq, layer, &k, &v)?;
        r.k[layer as usize].extend_from_slice(&k);
        r.v[layer as usize].extend_from_slice(&v);
    }
    Ok(())
}

/// Read every layer of `seq` in full and compare it with `r` (blocks and tail).
pub fn check_seq(store: &KvStore, seq: u64, r: &RefSeq) -> Result<(), String> {
    let shape = store.shape();
    let mut out = LayerRead::new();
    for layer in 0..shape.layers {
        store
            .read_layer(seq, layer, &mut out)
            .map_err(|e| format!("seq {seq} layer {layer}: {e}"))?;
        let want = r.tokens(&shape, layer as usize) / shape.block_tokens as usize;
        if out.len() != want {
            return Err(format!(
                "seq {seq} layer {layer}: {} blocks, expected {want}",
                out.len()
            ));
        }
        check_read(&shape, r, layer as usize, &out).map_err(|e| format!("seq {seq}: {e}"))?;
    }
    Ok(())
}
