//! Entry points for the fuzz targets (feature `fuzzing`, off by default; not part of the
//! API). They feed the store's on-disk decoders the way opening a store does, so that a fuzzer
//! reaches them from bytes: the whole open path over a device image, and each decoder alone.
//!
//! Every structure on disk carries a CRC-32C, which random mutation almost never gets right.
//! An input whose first byte has [`SEAL`] set has its checksums recomputed after mutation, so
//! the fuzzer also explores what lies behind them (what a store written by a buggy build, or
//! a checksum collision, would hold).

use std::sync::OnceLock;

use half::f16;

use crate::device::{BlockDevice, MemDevice, ReadReq};
use crate::format::{self, Root, Superblock};
use crate::layout::PageShape;
use crate::prefix::{prefix_keys, BlockKey};
use crate::store::journal::{self, Op};
use crate::store::{KvStore, StoreOptions};

/// First-byte flag: recompute the checksums of what the input describes before decoding.
pub const SEAL: u8 = 0x80;

/// The kinds of input, chosen by the first byte (low bits).
const IMAGE: u8 = 0;
const MANIFEST: u8 = 1;
const JOURNAL: u8 = 2;
const OPS: u8 = 3;
const KINDS: u8 = 4;

/// The template store's page shape: small, so that an image is a few hundred KiB.
const SHAPE: PageShape = PageShape {
    layers: 2,
    kv_heads: 2,
    head_dim: 16,
    block_tokens: 16,
};
/// The template store's size in bytes.
const TEMPLATE_BYTES: usize = 1 << 20;
/// Page alignment of the template (the store's minimum).
const PA: usize = 4096;

/// Run one fuzz input. Never panics on any input unless the code under test does.
pub fn store_bytes(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let seal = first & SEAL != 0;
    match (first & !SEAL) % KINDS {
        IMAGE => image(rest, seal),
        MANIFEST => manifest(rest, seal),
        JOURNAL => journal_replay(rest, seal),
        OPS => {
            let _ = journal::decode_ops(rest);
        }
        _ => unreachable!("kind is taken modulo KINDS"),
    }
}

/// A store with a persisted sequence (a manifest) and cached prefix pages (a journal),
/// written through the store's own API; its device bytes are the template that image inputs
/// patch.
fn template() -> &'static [u8] {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dev = MemDevice::new(TEMPLATE_BYTES);
        let mut store = KvStore::format_device(Box::new(dev), SHAPE, StoreOptions::default())
            .expect("format the template store");
        let row = (SHAPE.kv_heads * SHAPE.head_dim) as usize;
        let data = |n: usize, salt: usize| -> Vec<f16> {
            (0..n * row)
                .map(|i| f16::from_f32(((i * 7 + salt) % 61) as f32 / 61.0 - 0.5))
                .collect()
        };
        for layer in 0..SHAPE.layers {
            let (k, v) = (data(40, layer as usize), data(40, 99 + layer as usize));
            store.append(1, layer, &k, &v).expect("append");
        }
        store.persist(1).expect("persist");
        store.bind_model([7; 32]).expect("bind");
        let tokens: Vec<u32> = (0..48).collect();
        for layer in 0..SHAPE.layers {
            let (k, v) = (data(48, 3 + layer as usize), data(48, 5 + layer as usize));
            store.append(2, layer, &k, &v).expect("append");
        }
        let keys = prefix_keys(&[7; 32], &tokens, SHAPE.block_tokens as usize);
        store.publish(2, &keys).expect("publish");
        snapshot(store.device())
    })
}

fn snapshot(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut bytes = vec![0u8; dev.len() as usize];
    dev.read_at(&mut [ReadReq {
        offset: 0,
        buf: &mut bytes,
    }])
    .expect("read the template back");
    bytes
}

/// Patches to the template image: records of a 3-byte little-endian offset, a length byte
/// and that many bytes. Then, if sealed, every checksum the header and the manifest carry is
/// recomputed; then the store is opened, and a store that opens is read back.
fn image(patches: &[u8], seal: bool) {
    let mut img = template().to_vec();
    let mut p = patches;
    while p.len() >= 4 {
        let at = u32::from_le_bytes([p[0], p[1], p[2], 0]) as usize % img.len();
        let n = (p[3] as usize).min(p.len() - 4);
        let end = (at + n).min(img.len());
        img[at..end].copy_from_slice(&p[4..4 + (end - at)]);
        p = &p[4 + n..];
    }
    if seal {
        seal_image(&mut img);
    }
    let dev = MemDevice::new(img.len());
    dev.poke(0, &img);
    if let Ok(store) = KvStore::open_device(Box::new(dev), StoreOptions::default()) {
        exercise(&store);
    }
}

/// What a daemon does with a store it opened: list and restore its sequences, read their
/// pages (each checked against its checksum), and look up the prefix cache.
fn exercise(store: &KvStore) {
    for seq in store.sequences() {
        if store.restore(seq).is_ok() {
            for layer in 0..store.shape().layers {
                let mut out = crate::read::LayerRead::default();
                let _ = store.read_layer(seq, layer, &mut out);
            }
        }
    }
    let tokens: Vec<u32> = (0..48).collect();
    let keys: Vec<BlockKey> = prefix_keys(&[7; 32], &tokens, SHAPE.block_tokens as usize);
    let _ = store.cached_prefix(&keys);
    let _ = store.prefix_stats();
}

/// Recompute the superblock's and both root slots' checksums, and the manifest's that the
/// newest valid root points at (its extent clamped to the image).
fn seal_image(img: &mut [u8]) {
    reseal(&mut img[..PA], format::SUPER_LEN);
    for slot in 0..2 {
        reseal(&mut img[PA * (1 + slot)..PA * (2 + slot)], format::ROOT_LEN);
    }
    let Ok(sb) = Superblock::decode(&img[..PA]) else {
        return;
    };
    let newest = (0..2)
        .filter_map(|slot| {
            Root::decode(&img[PA * (1 + slot)..PA * (2 + slot)])
                .ok()
                .flatten()
        })
        .max_by_key(|r| r.generation);
    let Some(root) = newest else { return };
    let start = sb
        .data_offset
        .saturating_add(root.manifest.start.saturating_mul(sb.unit_bytes));
    let end = start.saturating_add(root.manifest_len);
    if root.manifest_len >= 4 && end <= img.len() as u64 {
        let m = &mut img[start as usize..end as usize];
        let body = m.len() - 4;
        let c = format::crc(&m[..body]);
        m[body..].copy_from_slice(&c.to_le_bytes());
    }
}

/// Write the CRC-32C of `b[..len]` after it.
fn reseal(b: &mut [u8], len: usize) {
    let c = format::crc(&b[..len]);
    b[len..len + 4].copy_from_slice(&c.to_le_bytes());
}

/// A manifest alone, checked against the template's shape; its store id is taken from the
/// input itself, so that the decoder gets past that check.
fn manifest(bytes: &[u8], seal: bool) {
    let mut m = bytes.to_vec();
    if seal && m.len() >= 4 {
        let body = m.len() - 4;
        let c = format::crc(&m[..body]);
        m[body..].copy_from_slice(&c.to_le_bytes());
    }
    let store_id = m
        .get(16..24)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    if let Ok((_, _, index)) = format::decode_manifest(&m, store_id, &SHAPE, 64) {
        let _ = journal::decode_ops(index);
    }
}

/// A journal extent alone, replayed for the store id and generation its first batch names.
fn journal_replay(bytes: &[u8], seal: bool) {
    let mut j = bytes.to_vec();
    if seal {
        journal::seal_batches(&mut j, PA);
    }
    let id = |at: usize| {
        j.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .unwrap_or(0)
    };
    let (store_id, generation) = (id(16), id(24));
    let _ = journal::replay(&j, store_id, generation, PA);
}

/// Valid inputs of every kind, to start a corpus from: the template image unpatched (sealed
/// and not), its manifest, a journal of two batches, and one batch's records.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![
        ("image", vec![IMAGE]),
        ("image-sealed", vec![IMAGE | SEAL, 0, 0, 0, 0]),
    ];
    let img = template();
    if let Ok(sb) = Superblock::decode(&img[..PA]) {
        let root = (0..2)
            .filter_map(|s| {
                Root::decode(&img[PA * (1 + s)..PA * (2 + s)])
                    .ok()
                    .flatten()
            })
            .max_by_key(|r| r.generation);
        if let Some(r) = root {
            let start = (sb.data_offset + r.manifest.start * sb.unit_bytes) as usize;
            let mut m = vec![MANIFEST];
            m.extend_from_slice(&img[start..start + r.manifest_len as usize]);
            out.push(("manifest", m));
        }
    }
    let ops = vec![
        Op::Bind { model: [7; 32] },
        Op::Insert {
            key: BlockKey([1; 16]),
            parent: None,
            units: vec![3, 4],
            crcs: vec![1, 2, 3, 4],
        },
        Op::Remove {
            key: BlockKey([1; 16]),
        },
        Op::Clear,
    ];
    let mut j = vec![JOURNAL];
    j.extend(journal::encode_batch(9, 1, 0, &ops[..2], PA));
    j.extend(journal::encode_batch(9, 1, 1, &ops[2..], PA));
    out.push(("journal", j));
    let mut o = vec![OPS];
    o.extend(journal::encode_ops(&ops));
    out.push(("ops", o));
    out
}
