//! KV store behaviour on a real file: round trips, layout/coalescing, persistence, capacity,
//! engines and modes, and bad input.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use csd_engine::device::{EngineChoice, OpenDeviceOptions};
use csd_engine::{IoEngine, KvError, KvStore, LayerRead, PageShape, StoreOptions};

/// Whether this process holds `path` open with O_DIRECT (from /proc/self/fdinfo).
fn open_with_o_direct(path: &Path) -> bool {
    const O_DIRECT: u32 = 0o40000; // x86_64 and aarch64
    let want = std::fs::canonicalize(path).unwrap();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .any(|fd| {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                return false;
            };
            if target != want {
                return false;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|flags| flags & O_DIRECT != 0)
        })
}

#[test]
fn io_uring_direct_round_trip_sparse_and_decode() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut store = KvStore::create(&path, &cfg(s, 64 << 20)).unwrap();
    let mode = store.mode();
    assert!(mode.direct, "real disk must run O_DIRECT, got {mode}");
    assert_eq!(mode.engine, IoEngine::IoUring, "got {mode}");
    assert!(
        open_with_o_direct(&path),
        "the store file is not open with O_DIRECT"
    );

    let mut refs: HashMap<u64, RefSeq> = HashMap::new();
    let a = refs.entry(1).or_insert_with(|| RefSeq::new(3));
    append_all(&mut store, a, 1, 200).unwrap(); // prefill: 6 full blocks + 8 tail tokens
    let b = refs.entry(2).or_insert_with(|| RefSeq::new(3));
    append_all(&mut store, b, 2, 70).unwrap();
    for _ in 0..40 {
        // decode: one token at a time, crossing a page boundary
        append_all(&mut store, refs.get_mut(&1).unwrap(), 1, 1).unwrap();
    }
    check_all(&store, &refs).unwrap();
    assert_eq!(store.info(1).unwrap().tokens, vec![240; 3]);
    assert_eq!(store.full_blocks(1, 2).unwrap(), 7);

    // A sparse page set: blocks 0,1,2 and 5,6 coalesce into two requests.
    let before = store.counters();
    let mut out = LayerRead::new();
    store
        .read_blocks(1, 1, &[6, 0, 2, 1, 5, 2], &mut out)
        .unwrap();
    assert_eq!(out.blocks(), &[0, 1, 2, 5, 6]);
    check_read(&s, &refs[&1], 1, &out).unwrap();
    let after = store.counters();
    assert_eq!(after.read_ios - before.read_ios, 2);
    assert_eq!(after.reads_coalesced - before.reads_coalesced, 3);
    assert_eq!(after.pages_read - before.pages_read, 5 * 3);
    assert_eq!(after.bytes_read - before.bytes_read, 5 * 3 * 8192);
    assert_eq!(after.checksum_failures, 0);

    // Segments are zero-copy views for attention: blocks then the tail.
    let segs = out.segments(2);
    assert_eq!(segs.len(), 6);
    assert_eq!(segs[3].first_pos, 5 * 32);
    assert_eq!(segs[5].first_pos, 224);
    assert_eq!(segs[5].keys.len(), 16 * 64);

    // Out-of-range block: clear error, nothing returned.
    let e = store.read_blocks(1, 1, &[7], &mut out).unwrap_err();
    assert!(matches!(e, KvError::BadInput(_)), "{e}");
    assert!(out.is_empty());
    assert!(!store.device().stats().read_latency().is_empty());
}

#[test]
fn whole_layer_scan_is_one_request_per_extent() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut store = KvStore::create(&path, &cfg(s, 64 << 20)).unwrap();
    let mut out = LayerRead::new();
    // Prefill of known length: reserve, then chunks interleaved across layers as a forward
    // pass does. Every layer is one extent, so a layer scan is one sequential read.
    let mut r = RefSeq::new(3);
    store.reserve(9, 1000).unwrap();
    for _ in 0..4 {
        append_all(&mut store, &mut r, 9, 250).unwrap();
    }
    for layer in 0..3 {
        assert_eq!(store.layer_extents(9, layer).unwrap(), 1);
        let before = store.counters();
        store.read_layer(9, layer, &mut out).unwrap();
        let after = store.counters();
        assert_eq!(out.len(), 31);
        assert_eq!(
            after.read_ios - before.read_ios,
            1,
            "layer {layer} scan took several requests"
        );
        assert_eq!(after.reads_coalesced - before.reads_coalesced, 30);
        check_read(&s, &r, layer as usize, &out).unwrap();
    }
    // Without a reservation, layers grow geometrically: few extents, one request each.
    let mut r2 = RefSeq::new(3);
    for _ in 0..16 {
        append_all(&mut store, &mut r2, 10, 250).unwrap();
    }
    for layer in 0..3 {
        let n = store.layer_extents(10, layer).unwrap();
        assert!(n <= 5, "{n} extents for 125 blocks");
        let before = store.counters();
        store.read_layer(10, layer, &mut out).unwrap();
        assert_eq!(store.counters().read_ios - before.read_ios, n as u64);
        check_read(&s, &r2, layer as usize, &out).unwrap();
    }
}

#[test]
fn persist_reopen_restores_only_persisted() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut refs: HashMap<u64, RefSeq> = HashMap::new();
    {
        let mut store = KvStore::create(&path, &cfg(s, 32 << 20)).unwrap();
        for seq in [10u64, 11, 12] {
            let r = refs.entry(seq).or_insert_with(|| RefSeq::new(3));
            append_all(&mut store, r, seq, 45 + seq as usize).unwrap();
        }
        store.persist(10).unwrap();
        store.persist(12).unwrap();
        // Appends after persist are not part of the persisted state.
        let mut extra = refs[&12].clone();
        append_all(&mut store, &mut extra, 12, 50).unwrap();
        store.persist(11).unwrap();
        store.reclaim(11).unwrap(); // a persisted sequence that ends is gone for good
        refs.remove(&11);
        assert!(matches!(
            store.persist(99),
            Err(KvError::UnknownSequence(99))
        ));
    }
    let store = KvStore::open(&path, &StoreOptions::default()).unwrap();
    check_all(&store, &refs).unwrap();
    assert!(store.restore(10).unwrap().persisted);
    assert!(matches!(
        store.restore(11),
        Err(KvError::UnknownSequence(11))
    ));
    drop(store);
    // Reopen again and continue: the restored sequence keeps growing correctly.
    let mut store = KvStore::open_or_create(&path, &cfg(s, 32 << 20)).unwrap();
    append_all(&mut store, refs.get_mut(&10).unwrap(), 10, 77).unwrap();
    check_all(&store, &refs).unwrap();
}

#[test]
fn store_full_fails_only_that_sequence() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    // Header + 20 block groups of 24 KiB.
    let mut store = KvStore::create(&path, &cfg(s, 65536 + 20 * 24576)).unwrap();
    let mut b = RefSeq::new(3);
    append_all(&mut store, &mut b, 2, 40).unwrap(); // 1 block per layer + tail
    let mut a = RefSeq::new(3);
    let mut err = None;
    for _ in 0..20 {
        if let Err(e) = append_all(&mut store, &mut a, 1, 32) {
            err = Some(e);
            break;
        }
    }
    let e = err.expect("store never filled");
    assert!(matches!(e, KvError::StoreFull { seq: 1, .. }), "{e}");
    assert!(e.to_string().contains("KV store full"), "{e}");
    // Sequence 2 is untouched and can still take decode tokens into its tail.
    let mut refs = HashMap::new();
    refs.insert(2u64, b);
    append_all(&mut store, refs.get_mut(&2).unwrap(), 2, 3).unwrap();
    store.reclaim(1).unwrap();
    check_all(&store, &refs).unwrap();
    // After the reclaim there is room again.
    let mut c = RefSeq::new(3);
    append_all(&mut store, &mut c, 3, 64).unwrap();
}

#[test]
fn psync_engine_direct_round_trip() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = PageShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 128,
        block_tokens: 16,
    };
    let mut c = cfg(s, 8 << 20);
    c.options.device.engine = EngineChoice::Psync;
    let mut store = KvStore::create(&path, &c).unwrap();
    assert_eq!(store.mode().engine, IoEngine::Psync);
    assert!(store.mode().direct);
    let mut refs = HashMap::new();
    append_all(
        &mut store,
        refs.entry(5).or_insert_with(|| RefSeq::new(2)),
        5,
        100,
    )
    .unwrap();
    store.persist(5).unwrap();
    check_all(&store, &refs).unwrap();
    drop(store);
    let store = KvStore::open(&path, &c.options).unwrap();
    check_all(&store, &refs).unwrap();
}

/// A temp dir on a memory filesystem (tmpfs or ramfs): under /dev/shm where that is one,
/// else under the first other such mount that takes a new folder. Fails the test (rather
/// than skipping it) when the machine has none.
fn memory_fs_tempdir() -> tempfile::TempDir {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    let mut candidates: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip(1);
            let (at, fs) = (w.next()?, w.next()?);
            matches!(fs, "tmpfs" | "ramfs").then_some(at)
        })
        .collect();
    candidates.sort_by_key(|&at| at != "/dev/shm");
    for at in &candidates {
        if let Ok(d) = tempfile::tempdir_in(at) {
            return d;
        }
    }
    panic!(
        "this test needs a writable tmpfs or ramfs mount (such as /dev/shm); found none \
         among {candidates:?}"
    );
}

#[test]
fn tmpfs_falls_back_and_reports_buffered() {
    let dir = memory_fs_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut store = KvStore::create(&path, &cfg(s, 4 << 20)).unwrap();
    assert!(
        !store.mode().direct,
        "tmpfs cannot do O_DIRECT; mode must say so"
    );
    let mut refs = HashMap::new();
    append_all(
        &mut store,
        refs.entry(1).or_insert_with(|| RefSeq::new(3)),
        1,
        90,
    )
    .unwrap();
    check_all(&store, &refs).unwrap();
    // Asking explicitly for io_uring + O_DIRECT is refused rather than silently buffered.
    let mut c = cfg(s, 4 << 20);
    c.options.device = OpenDeviceOptions {
        engine: EngineChoice::IoUring,
        ..Default::default()
    };
    let e = KvStore::create(&dir.path().join("strict.store"), &c)
        .err()
        .expect("must refuse");
    assert!(matches!(e, KvError::Open { .. }), "{e}");
}

#[test]
fn bad_paths_are_clear_errors() {
    let dir = disk_tempdir();
    let s = shape();
    // A directory.
    let e = KvStore::create(dir.path(), &cfg(s, 8 << 20)).err().unwrap();
    assert!(e.to_string().contains("directory"), "{e}");
    let e = KvStore::open_or_create(dir.path(), &cfg(s, 8 << 20))
        .err()
        .unwrap();
    assert!(e.to_string().contains("directory"), "{e}");
    // A path below a regular file.
    let f = dir.path().join("plain");
    std::fs::write(&f, b"x").unwrap();
    let e = KvStore::create(&f.join("kv.store"), &cfg(s, 8 << 20))
        .err()
        .unwrap();
    assert!(matches!(e, KvError::Open { .. }), "{e}");
    // Missing file on open.
    let e = KvStore::open(&dir.path().join("missing"), &StoreOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, KvError::Open { .. }), "{e}");
    // Unwritable: a read-only procfs file refuses writes even to root.
    let e = KvStore::open(Path::new("/proc/version"), &StoreOptions::default())
        .err()
        .unwrap();
    assert!(
        matches!(e, KvError::Open { .. } | KvError::NotAStore { .. }),
        "{e}"
    );
    // Read-only directory, effective only when not root.
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let mut perm = std::fs::metadata(&ro).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o500);
    std::fs::set_permissions(&ro, perm).unwrap();
    if let Err(e) = KvStore::create(&ro.join("kv.store"), &cfg(s, 8 << 20)) {
        assert!(matches!(e, KvError::Open { .. }), "{e}");
    }
    // Too small for one page group: refused before anything is created.
    let small = dir.path().join("small.store");
    let e = KvStore::create(&small, &cfg(s, 65536 + 1000))
        .err()
        .unwrap();
    assert!(matches!(e, KvError::TooSmall { .. }), "{e}");
    assert!(!small.exists());
    // A file that is not a store is neither used nor overwritten.
    let foreign = dir.path().join("foreign");
    let junk: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&foreign, &junk).unwrap();
    let e = KvStore::open_or_create(&foreign, &cfg(s, 8 << 20))
        .err()
        .unwrap();
    assert!(matches!(e, KvError::NotAStore { .. }), "{e}");
    assert_eq!(std::fs::read(&foreign).unwrap(), junk);
}

/// Every state a crash during format can leave (the file sized but blank; the root slots
/// written but no superblock; a torn superblock) is formatted again by `open_or_create`,
/// and the store works; foreign data is still refused (see `bad_paths_are_clear_errors`).
#[test]
fn a_format_cut_short_by_a_crash_is_formatted_again() {
    use std::io::{Seek, SeekFrom, Write};
    let dir = disk_tempdir();
    let s = shape();
    let capacity = 8 << 20;
    let damage = |path: &Path, offset: u64, bytes: &[u8]| {
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    };
    type MakeState<'a> = &'a dyn Fn(&Path);
    let states: [(&str, MakeState); 3] = [
        ("sized, never written", &|p: &Path| {
            std::fs::File::create(p).unwrap().set_len(capacity).unwrap();
        }),
        ("root slots written, no superblock", &|p: &Path| {
            drop(KvStore::create(p, &cfg(s, capacity)).unwrap());
            damage(p, 0, &[0u8; 4096]);
        }),
        ("torn superblock", &|p: &Path| {
            drop(KvStore::create(p, &cfg(s, capacity)).unwrap());
            damage(p, 40, &[0xff; 24]);
        }),
    ];
    for (what, make) in states {
        let path = dir
            .path()
            .join(format!("{}.store", what.replace([' ', ','], "_")));
        make(&path);
        let open = KvStore::open(&path, &StoreOptions::default());
        assert!(
            matches!(
                open,
                Err(KvError::NotAStore { .. } | KvError::CorruptHeader { .. })
            ),
            "{what}: the state should not open as it is"
        );
        let mut store = KvStore::open_or_create(&path, &cfg(s, capacity))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let mut refs = HashMap::new();
        append_all(
            &mut store,
            refs.entry(1).or_insert_with(|| RefSeq::new(3)),
            1,
            40,
        )
        .unwrap();
        check_all(&store, &refs).unwrap();
        drop(store);
        // Formatted for good: it opens as it is now.
        KvStore::open(&path, &StoreOptions::default()).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn bad_append_input_changes_nothing() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let s = shape();
    let mut store = KvStore::create(&path, &cfg(s, 8 << 20)).unwrap();
    let mut refs = HashMap::new();
    append_all(
        &mut store,
        refs.entry(1).or_insert_with(|| RefSeq::new(3)),
        1,
        33,
    )
    .unwrap();
    let (k, v) = kv_data(&s, 1, 0, 0, 2);
    assert!(matches!(
        store.append(1, 3, &k, &v),
        Err(KvError::BadInput(_))
    ));
    assert!(matches!(
        store.append(1, 0, &k[1..], &v[1..]),
        Err(KvError::BadInput(_))
    ));
    assert!(matches!(
        store.append(1, 0, &k, &v[..v.len() - 192]),
        Err(KvError::BadInput(_))
    ));
    assert!(matches!(
        store.append(7, 9, &k, &v),
        Err(KvError::BadInput(_))
    ));
    check_all(&store, &refs).unwrap();
    assert!(matches!(
        store.reclaim(42),
        Err(KvError::UnknownSequence(42))
    ));
    let mut out = LayerRead::new();
    assert!(matches!(
        store.read_layer(1, 5, &mut out),
        Err(KvError::BadInput(_))
    ));
    assert!(matches!(
        store.read_layer(8, 0, &mut out),
        Err(KvError::UnknownSequence(8))
    ));
}

/// A read planned under the lock and run without it: if the sequence is reclaimed and its
/// pages reused meanwhile, the read fails as an unknown sequence, not as a corrupt page,
/// and the checksum counter stays at zero. A sequence that stays put reads fine and
/// counts.
#[test]
fn a_read_whose_sequence_is_reclaimed_midway_is_not_a_checksum_failure() {
    let dir = disk_tempdir();
    let s = shape();
    let mut store = KvStore::create(&dir.path().join("kv.store"), &cfg(s, 64 << 20)).unwrap();
    let mut a = RefSeq::new(3);
    append_all(&mut store, &mut a, 1, 200).unwrap();
    let mut out = LayerRead::new();
    let plan = store.plan_read(1, 0, &[0, 1, 2, 3], &mut out).unwrap();
    // Meanwhile: the sequence goes, and another one takes its pages with other data.
    store.reclaim(1).unwrap();
    let mut b = RefSeq::new(3);
    append_all(&mut store, &mut b, 2, 200).unwrap();
    let io = plan.run(&mut out);
    assert!(io.is_err(), "the pages now hold the other sequence's data");
    let e = store.finish_read(plan, io, &mut out).unwrap_err();
    assert!(matches!(e, KvError::UnknownSequence(1)), "{e}");
    assert!(out.is_empty());
    assert_eq!(store.counters().checksum_failures, 0);
    // The same id back with new data: the plan no longer matches its layout.
    let plan = store.plan_read(2, 0, &[0, 1], &mut out).unwrap();
    store.reclaim(2).unwrap();
    let mut c = RefSeq::new(3);
    append_all(&mut store, &mut c, 2, 100).unwrap();
    let io = plan.run(&mut out);
    if io.is_err() {
        let e = store.finish_read(plan, io, &mut out).unwrap_err();
        assert!(matches!(e, KvError::BadInput(_)), "{e}");
    }
    assert_eq!(store.counters().checksum_failures, 0);
    // Undisturbed, a planned read verifies and counts like read_blocks.
    let before = store.counters().pages_read;
    let plan = store.plan_read(2, 1, &[1, 0], &mut out).unwrap();
    let io = plan.run(&mut out);
    store.finish_read(plan, io, &mut out).unwrap();
    assert_eq!(out.blocks(), &[0, 1]);
    assert_eq!(store.counters().pages_read, before + 2 * 3);
    check_read(&s, &c, 1, &out).unwrap();
}
