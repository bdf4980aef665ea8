//! Store tests that look at the on-disk format itself (they locate root slots and the
//! manifest): a newer version, a corrupt superblock or manifest is refused and left untouched,
//! and a torn newest root falls back to the previous generation.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;

use common::*;

use crate::format::Root;
use crate::{KvError, KvStore, PageShape, StoreOptions};

fn root_of(bytes: &[u8], slot: usize) -> Option<Root> {
    Root::decode(&bytes[4096 * (1 + slot)..4096 * (2 + slot)])
        .ok()
        .flatten()
}

#[test]
fn unknown_version_and_corrupt_manifest_are_refused_untouched() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut refs = HashMap::new();
    {
        let mut store = KvStore::create(&path, &cfg(s, 8 << 20)).unwrap();
        append_all(
            &mut store,
            refs.entry(4).or_insert_with(|| RefSeq::new(3)),
            4,
            100,
        )
        .unwrap();
        store.persist(4).unwrap();
    }
    let pristine = std::fs::read(&path).unwrap();

    // Unknown superblock version.
    let mut v = pristine.clone();
    v[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &v).unwrap();
    let e = KvStore::open(&path, &StoreOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(
            e,
            KvError::UnsupportedVersion {
                found: 99,
                supported: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("version 99"), "{e}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        v,
        "refused store was modified"
    );

    // Corrupt superblock.
    let mut c = pristine.clone();
    c[30] ^= 0xff;
    std::fs::write(&path, &c).unwrap();
    let e = KvStore::open(&path, &StoreOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, KvError::CorruptHeader { .. }), "{e}");

    // Corrupt manifest: flip a byte inside the manifest the newest root points at.
    let root = [root_of(&pristine, 0), root_of(&pristine, 1)]
        .into_iter()
        .flatten()
        .max_by_key(|r| r.generation)
        .unwrap();
    assert!(root.generation >= 1 && root.manifest_len > 0);
    let moff = 65536 + root.manifest.start as usize * 24576;
    let mut m = pristine.clone();
    m[moff + root.manifest_len as usize / 2] ^= 0x20;
    std::fs::write(&path, &m).unwrap();
    let e = KvStore::open(&path, &StoreOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, KvError::ManifestCorrupt { .. }), "{e}");
    assert!(e.to_string().contains("manifest"), "{e}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        m,
        "refused store was modified"
    );
    let e = KvStore::open_or_create(&path, &cfg(s, 8 << 20))
        .err()
        .unwrap();
    assert!(matches!(e, KvError::ManifestCorrupt { .. }), "{e}");

    // Nothing else was lost: with the byte restored, everything is back.
    std::fs::write(&path, &pristine).unwrap();
    let store = KvStore::open(&path, &StoreOptions::default()).unwrap();
    check_all(&store, &refs).unwrap();
    drop(store);

    // Another shape is refused, file untouched.
    let other = PageShape { head_dim: 128, ..s };
    let e = KvStore::open_or_create(&path, &cfg(other, 8 << 20))
        .err()
        .unwrap();
    assert!(matches!(e, KvError::ShapeMismatch { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), pristine);
}

#[test]
fn torn_newest_root_falls_back_to_previous_generation() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut refs = HashMap::new();
    let before_second;
    {
        let mut store = KvStore::create(&path, &cfg(s, 8 << 20)).unwrap();
        append_all(
            &mut store,
            refs.entry(1).or_insert_with(|| RefSeq::new(3)),
            1,
            50,
        )
        .unwrap();
        store.persist(1).unwrap();
        before_second = refs.clone();
        append_all(
            &mut store,
            refs.entry(2).or_insert_with(|| RefSeq::new(3)),
            2,
            60,
        )
        .unwrap();
        store.persist(2).unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let newest = (0..2)
        .max_by_key(|&i| root_of(&bytes, i).map_or(0, |r| r.generation))
        .unwrap();
    bytes[4096 * (1 + newest) + 20] ^= 1; // tear it
    std::fs::write(&path, &bytes).unwrap();
    let store = KvStore::open(&path, &StoreOptions::default()).unwrap();
    check_all(&store, &before_second).unwrap();
}
