//! Crash and fault tests of the prefix cache.
//!
//! `prefix_crash_kill_reopen`: a child process (this test binary, re-invoked with the store
//! path in `CSD_PREFIX_CRASH_STORE`) starts sequences on overlapping prefixes, publishes
//! them, ends them, clears the cache now and then and, the store being small, keeps evicting;
//! the parent kills it with SIGKILL at random moments (more than 50 in all), sometimes tears
//! the journal's last batch as a crash in the middle of writing it would, reopens the store
//! and checks that it opens; that every cached page that came back is one the children
//! published and reads back, shared by a new sequence, with valid checksums and exactly the
//! K/V its tokens define; that as many pages came back as the children had cached when they
//! died (give or take the operation in flight); that a torn batch is counted in
//! `dropped_at_recovery`, not an error; and that no unit is lost.
//!
//! `journal_write_failures_*`: on a fault-injecting device, publish, clear, rebind and
//! eviction whose journal records cannot be written return errors (or, for eviction, fail
//! the append that needed the room), never panic, and leave the cache as it was; after a
//! run of random write faults the store reopens and everything recovered is intact.
//!
//! `a_version_1_store_is_refused_untouched`: a store written by format version 1 (before the
//! prefix cache) is refused with `UnsupportedVersion`, byte for byte untouched.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use csd_engine::device::{open_path, Fault, FaultConfig, FaultyDevice, OpenDeviceOptions};
use csd_engine::{prefix_keys, BlockKey, KvError, KvStore, PageShape, StoreConfig, StoreOptions};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPE: PageShape = PageShape {
    layers: 4,
    kv_heads: 2,
    head_dim: 64,
    block_tokens: 32,
};
const BT: usize = 32;
/// Bytes of a block group: 2 kv heads × (4 KiB K + 4 KiB V).
const UNIT: u64 = 16 << 10;
/// 160 block groups after the 64 KiB header: 40 pages of all 4 layers.
const UNITS: u64 = 160;
const CAPACITY: u64 = (64 << 10) + UNITS * UNIT;
const MODEL: [u8; 32] = [0x5c; 32];
const CHILD_ENV: &str = "CSD_PREFIX_CRASH_STORE";
const PHASE_ENV: &str = "CSD_PREFIX_CRASH_PHASE";
/// Sequence ids the parent uses to read cached pages back.
const PROBE: u64 = u64::MAX / 2;

fn opts() -> StoreOptions {
    StoreOptions {
        min_extent_blocks: 2,
        max_extent_blocks: 16,
        ..Default::default()
    }
}

fn config() -> StoreConfig {
    StoreConfig {
        shape: SHAPE,
        capacity: CAPACITY,
        options: opts(),
    }
}

// ---------------------------------------------------------------------------------------------
// Token streams
// ---------------------------------------------------------------------------------------------

/// A sequence's tokens: `prefix` tokens of shared stream `root`, then `suffix` tokens of
/// suffix stream `seed`. Sequences of one root share their first pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Desc {
    root: u8,
    prefix: u16,
    seed: u8,
    suffix: u16,
}

impl Desc {
    fn random(rng: &mut ChaCha8Rng) -> Desc {
        Desc {
            root: rng.random_range(0..4),
            prefix: rng.random_range(0..=224),
            seed: rng.random_range(0..3),
            suffix: rng.random_range(1..=96),
        }
    }

    fn tokens(&self) -> Vec<u32> {
        (0..self.prefix as usize)
            .map(|i| (mix(self.root as u64 + 1, i as u64) % 1000) as u32)
            .chain(
                (0..self.suffix as usize)
                    .map(|i| 1000 + (mix(0x5eed + self.seed as u64, i as u64) % 1000) as u32),
            )
            .collect()
    }

    fn line(&self) -> String {
        format!(
            "{} {} {} {}",
            self.root, self.prefix, self.seed, self.suffix
        )
    }

    fn parse(w: &[&str]) -> Desc {
        Desc {
            root: w[0].parse().unwrap(),
            prefix: w[1].parse().unwrap(),
            seed: w[2].parse().unwrap(),
            suffix: w[3].parse().unwrap(),
        }
    }
}

/// Whether `e` says the store lacks the room a manifest and journal need, in count: a
/// manifest that does not fit is an error, not a bug. (With enough free units a commit must
/// not fail, however they lie: the journal and a one-unit manifest need only a few.)
fn short_of_room(e: &KvError) -> bool {
    matches!(e, KvError::ManifestNoSpace { needed, free } if free < needed)
}

/// Start sequence `id` on the cache with `tokens` and append the rest; `Ok(false)` (and the
/// sequence is gone) when the store has no room for it.
fn start(store: &mut KvStore, id: u64, tokens: &[u32], reserve: bool) -> Result<bool, KvError> {
    let keys = prefix_keys(&MODEL, tokens, BT);
    let k = store.share_prefix(id, &keys)?;
    if k > 0 {
        // The shared pages read back as this sequence's own first pages.
        check_seq(store, id, &token_ref(&SHAPE, &tokens[..k * BT]))
            .unwrap_or_else(|e| panic!("shared prefix of {id}: {e}"));
    }
    let mut r = token_ref(&SHAPE, &tokens[..k * BT]);
    let res = if reserve {
        store.reserve(id, tokens.len())
    } else {
        Ok(())
    };
    match res.and_then(|_| append_tokens(store, &mut r, id, tokens, tokens.len())) {
        Ok(()) => {
            check_seq(store, id, &r).unwrap_or_else(|e| panic!("sequence {id}: {e}"));
            Ok(true)
        }
        Err(e) => {
            if store.info(id).is_some() {
                store.reclaim(id)?;
            }
            match e {
                KvError::StoreFull { .. } => Ok(false),
                e => Err(e),
            }
        }
    }
}

/// Read back, through a new sequence sharing them, the cached pages of every sequence in
/// `descs` and compare them with the K/V their tokens define; returns how many distinct
/// cached pages that covered (the caller compares it with what the store says it caches).
fn probe_cache(store: &mut KvStore, descs: &BTreeSet<Desc>) -> u64 {
    let mut found: HashSet<BlockKey> = HashSet::new();
    let mut chains: HashSet<Vec<BlockKey>> = HashSet::new();
    for d in descs {
        let tokens = d.tokens();
        let keys = prefix_keys(&MODEL, &tokens, BT);
        let k = store.cached_prefix(&keys);
        if k == 0 || !chains.insert(keys[..k].to_vec()) {
            continue;
        }
        found.extend(&keys[..k]);
        assert_eq!(store.share_prefix(PROBE, &keys[..k]).unwrap(), k, "{d:?}");
        check_seq(store, PROBE, &token_ref(&SHAPE, &tokens[..k * BT]))
            .unwrap_or_else(|e| panic!("cached pages of {d:?}: {e}"));
        store.reclaim(PROBE).unwrap();
    }
    found.len() as u64
}

// ---------------------------------------------------------------------------------------------
// The on-disk structures the parent looks at (docs/STORAGE.md; journal.rs)
// ---------------------------------------------------------------------------------------------

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// The newest valid root slot of a version-2 store.
#[derive(Debug, Clone, Copy)]
struct RootInfo {
    generation: u64,
    manifest_units: u64,
    journal_start: u64,
    journal_units: u64,
}

fn newest_root(file: &[u8]) -> RootInfo {
    let mut best: Option<RootInfo> = None;
    for slot in 0..2 {
        let b = &file[4096 * (1 + slot)..4096 * (2 + slot)];
        if &b[..8] != b"IIKVROOT" || crc32c::crc32c(&b[..76]) != u32_at(b, 76) {
            continue;
        }
        assert_eq!(u32_at(b, 8), 2, "root version");
        let r = RootInfo {
            generation: u64_at(b, 24),
            manifest_units: if u64_at(b, 48) > 0 { u64_at(b, 40) } else { 0 },
            journal_start: u64_at(b, 60),
            journal_units: u64_at(b, 68),
        };
        if best.is_none_or(|x| r.generation > x.generation) {
            best = Some(r);
        }
    }
    best.expect("a valid root slot")
}

/// The journal the newest root names, walked as recovery replays it: the last valid batch
/// (its offset in the file and its payload length), and whether a batch of this generation
/// that fails its checks follows it (a torn tail, which recovery drops and counts).
fn journal_scan(file: &[u8]) -> (Option<(usize, usize)>, bool) {
    let root = newest_root(file);
    let (data, unit, store_id) = (
        u64_at(file, 64) as usize,
        u64_at(file, 56) as usize,
        u64_at(file, 80),
    );
    let j0 = data + root.journal_start as usize * unit;
    let j = &file[j0..j0 + root.journal_units as usize * unit];
    let (mut at, mut seqno, mut last) = (0usize, 0u64, None);
    while at + 44 <= j.len() {
        let b = &j[at..];
        let ours =
            &b[..8] == b"IIKVJRNL" && u64_at(b, 16) == store_id && u64_at(b, 24) == root.generation;
        if !ours {
            return (last, false);
        }
        let len = u32_at(b, 12) as usize;
        let valid = u32_at(b, 8) == 1
            && u64_at(b, 32) == seqno
            && 44 + len <= b.len()
            && crc32c::crc32c(&b[..40 + len]) == u32_at(b, 40 + len);
        if !valid {
            return (last, true);
        }
        last = Some((j0 + at, len));
        seqno += 1;
        at += (44 + len).div_ceil(4096) * 4096;
    }
    (last, false)
}

/// How many records a batch payload holds if all of them are inserts (bincode, fixed-width
/// little-endian: a u64 count; per record a u32 variant, for an insert the key, an optional
/// parent key, and the units and checksums as u64-counted lists).
fn inserts_only(p: &[u8]) -> Option<u64> {
    let n = u64_at(p, 0);
    let mut at = 8;
    for _ in 0..n {
        if u32_at(p, at) != 1 {
            return None;
        }
        at += 4 + 16;
        at += if p[at] == 1 { 17 } else { 1 };
        at += 8 + 8 * u64_at(p, at) as usize;
        at += 8 + 4 * u64_at(p, at) as usize;
    }
    assert_eq!(at, p.len(), "insert records fill the payload");
    Some(n)
}

/// If the journal's last batch holds only inserts (a publish), corrupt it as a crash in the
/// middle of writing it would. Returns the pages it inserted.
fn tear_tail_of_inserts(path: &Path) -> Option<u64> {
    let file = std::fs::read(path).unwrap();
    let (off, len) = journal_scan(&file).0?;
    let n = inserts_only(&file[off + 40..off + 40 + len])?;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let at = (off + 40 + len / 2) as u64;
    let mut b = [0u8; 1];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    f.sync_all().unwrap();
    Some(n)
}

// ---------------------------------------------------------------------------------------------
// The crash test
// ---------------------------------------------------------------------------------------------

/// The child's workload, phase `phase` on the store at `path`: the role
/// `prefix_crash_kill_reopen` takes when the parent starts it with `CSD_PREFIX_CRASH_STORE`.
///
/// Protocol (stdout): `CHILD p`, `READY pages`, then per operation `OP kind [n]` before it
/// and `DONE kind pages evicted` after it (`pages`: what the cache holds then), `DESC ...` for
/// every token sequence before it is used, `ALLDONE` at the end.
fn child_workload(path: &Path, phase: u64) {
    // Start on a line of our own: the harness has printed "test ... " without ending it.
    println!();
    println!("CHILD {phase}");
    let mut store = if phase == 0 {
        KvStore::create(path, &config()).unwrap()
    } else {
        KvStore::open(path, &opts()).unwrap()
    };
    store.bind_model(MODEL).unwrap();
    println!("READY {}", store.prefix_stats().pages);
    let done = |s: &KvStore, kind: &str| {
        let st = s.prefix_stats();
        println!("DONE {kind} {} {}", st.pages, st.evicted_pages);
    };
    let mut rng = ChaCha8Rng::seed_from_u64(0x9e37 ^ phase);
    let mut live: Vec<u64> = Vec::new();
    for i in 0..400u64 {
        let id = (phase + 1) * 1_000_000 + i;
        let d = Desc::random(&mut rng);
        let tokens = d.tokens();
        println!("DESC {}", d.line());
        println!("OP create");
        let ok = start(&mut store, id, &tokens, rng.random_bool(0.5)).unwrap();
        done(&store, "create");
        if !ok {
            continue;
        }
        live.push(id);
        if rng.random_bool(0.85) {
            let keys = prefix_keys(&MODEL, &tokens, BT);
            println!("OP publish {}", keys.len());
            match store.publish(id, &keys) {
                Ok(_) => {}
                Err(e) if short_of_room(&e) => {}
                Err(e) => panic!("publish: {e:?}"),
            }
            done(&store, "publish");
        }
        while live.len() > 2 {
            let old = live.remove(0);
            println!("OP reclaim");
            store.reclaim(old).unwrap();
            done(&store, "reclaim");
        }
        if i % 29 == 28 {
            println!("OP clear");
            match store.clear_prefix_cache() {
                Ok(_) => {}
                Err(e) if short_of_room(&e) => {}
                Err(e) => panic!("clear: {e:?}"),
            }
            done(&store, "clear");
        }
    }
    println!("ALLDONE");
}

/// What the parent knows of the store.
#[derive(Default)]
struct Track {
    /// Pages cached after the last operation a child finished.
    last: u64,
    /// The operation a child had started and not finished when it died, and its page count.
    inflight: Option<(String, u64)>,
    /// Every token sequence the children used.
    descs: BTreeSet<Desc>,
    /// Most pages any child evicted.
    evicted: u64,
}

/// Run one child until it has published `kill_after` times, let it go on for `delay_us`,
/// kill it. Returns whether it was killed mid-run.
fn run_child(path: &Path, phase: u64, kill_after: usize, delay_us: u64, t: &mut Track) -> bool {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "prefix_crash_kill_reopen",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .env(PHASE_ENV, phase.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut started, mut finished, mut published) = (false, false, 0usize);
    // Returns whether the line ends a publish.
    let mut apply = |line: &str, t: &mut Track| -> bool {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["CHILD", p] if p.parse::<u64>().unwrap() == phase => started = true,
            ["READY", n] => {
                let n: u64 = n.parse().unwrap();
                assert_eq!(n, t.last, "phase {phase}: the child found another cache");
            }
            ["DESC", rest @ ..] => {
                t.descs.insert(Desc::parse(rest));
            }
            ["OP", kind, rest @ ..] => {
                let n = rest.first().map_or(0, |n| n.parse().unwrap());
                t.inflight = Some((kind.to_string(), n));
            }
            ["DONE", kind, pages, evicted] => {
                t.last = pages.parse().unwrap();
                t.evicted = t.evicted.max(evicted.parse().unwrap());
                t.inflight = None;
                return *kind == "publish";
            }
            ["ALLDONE"] => finished = true,
            _ => {}
        }
        false
    };
    while published < kill_after {
        match lines.next() {
            Some(Ok(l)) => published += apply(&l, t) as usize,
            _ => break,
        }
    }
    std::thread::sleep(Duration::from_micros(delay_us));
    let _ = child.kill();
    let status = child.wait().unwrap();
    // Everything the child wrote before dying is still in the pipe.
    for l in lines.map_while(Result::ok) {
        apply(&l, t);
    }
    assert!(
        started,
        "the child of phase {phase} never started its workload"
    );
    let killed = status.signal() == Some(libc::SIGKILL);
    assert!(
        killed || (status.success() && finished),
        "the child of phase {phase} failed: {status}"
    );
    killed && !finished
}

/// Reopen after a kill (tearing the journal's last batch first if `tear` and it is a
/// publish's) and check everything. Returns (pages recovered, whether a batch was torn).
fn verify(path: &Path, t: &mut Track, tear: bool) -> (u64, bool) {
    let torn = if tear {
        tear_tail_of_inserts(path)
    } else {
        None
    };
    // A torn tail stays until the next batch overwrites it: one torn here, or one a child
    // died before overwriting (a kill itself tears nothing).
    let torn_tail = journal_scan(&std::fs::read(path).unwrap()).1;
    assert!(torn_tail || torn.is_none());
    let mut store = KvStore::open(path, &opts())
        .unwrap_or_else(|e| panic!("the store does not open after a crash: {e}"));
    let st = store.prefix_stats();
    let got = st.recovered_pages;
    assert_eq!(got, st.pages);
    // A torn batch is dropped and counted, never an error.
    assert_eq!(
        st.dropped_at_recovery, torn_tail as u64,
        "dropped at recovery (torn now: {torn:?})"
    );
    // As many pages as the children had cached when they died, give or take the operation
    // in flight (and the inserts of a torn batch).
    let n = torn.unwrap_or(0);
    let last = t.last - n;
    let ok = match &t.inflight {
        None => got == last,
        Some((k, _)) if k == "reclaim" => got == last,
        Some((k, m)) if k == "publish" => (last..=last + m).contains(&got),
        Some((k, _)) if k == "create" => got <= last,
        Some((k, _)) if k == "clear" => got == 0 || got == last,
        Some(other) => panic!("unknown operation {other:?}"),
    };
    assert!(
        ok,
        "{got} pages came back; {} were cached before {:?} (torn inserts: {n})",
        t.last, t.inflight
    );
    // Nothing but the children's pages came back, and all of them read back exactly.
    assert_eq!(
        probe_cache(&mut store, &t.descs),
        got,
        "cached pages that no sequence of the children names"
    );
    assert!(store.sequences().is_empty(), "{:?}", store.sequences());
    // No unit lost: free = all − cached pages − manifest − journal.
    let root = newest_root(&std::fs::read(path).unwrap());
    assert_eq!(
        store.free_bytes() / UNIT,
        UNITS - got * SHAPE.layers as u64 - root.manifest_units - root.journal_units,
        "free units after recovery ({root:?})"
    );
    t.last = got;
    t.inflight = None;
    (got, torn.is_some())
}

#[test]
fn prefix_crash_kill_reopen() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        let phase: u64 = std::env::var(PHASE_ENV).unwrap().parse().unwrap();
        child_workload(Path::new(&path), phase);
        return;
    }
    let dir = disk_tempdir();
    let mut rng = ChaCha8Rng::seed_from_u64(0x9c4a);
    let (mut kills, mut recovered, mut tears, mut evicted) = (0u32, 0u64, 0u32, 0u64);
    for trial in 0..5u64 {
        let path = dir.path().join(format!("prefix{trial}.store"));
        let mut t = Track::default();
        for phase in 0..11u64 {
            // Kill after 1..=8 publishes, then 0..4 ms more.
            let kill_after = rng.random_range(1..=8usize);
            let delay = rng.random_range(0..4000u64);
            kills += run_child(&path, phase, kill_after, delay, &mut t) as u32;
            let (got, torn) = verify(&path, &mut t, rng.random_bool(0.5));
            recovered += got;
            tears += torn as u32;
        }
        evicted += t.evicted;
    }
    assert!(
        kills >= 50,
        "only {kills} of 55 children were killed mid-run"
    );
    assert!(
        recovered > 200,
        "too little came back to test anything ({recovered})"
    );
    assert!(tears >= 3, "only {tears} torn journal tails");
    assert!(evicted > 0, "the children never evicted");
}

// ---------------------------------------------------------------------------------------------
// Journal write faults
// ---------------------------------------------------------------------------------------------

#[test]
fn journal_write_failures_are_errors_and_recovery_is_intact() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let dev = open_path(
        &path,
        Some(CAPACITY),
        &OpenDeviceOptions {
            create: true,
            ..Default::default()
        },
    )
    .unwrap();
    let faulty = Arc::new(FaultyDevice::new(
        dev,
        FaultConfig {
            seed: 0x0bad,
            write_error: 0.08,
            no_space: 0.02,
            ..Default::default()
        },
    ));
    faulty.set_enabled(false); // armed faults only, until the random phase
    let mut store = KvStore::format_device(Box::new(faulty.clone()), SHAPE, opts()).unwrap();
    store.bind_model(MODEL).unwrap();
    let mut descs = BTreeSet::new();
    let is_io = |r: &Result<u64, KvError>| matches!(r, Err(KvError::Io { .. }));

    // 1. A publish whose journal batch cannot be written fails and changes nothing; a retry
    //    works.
    let a = Desc {
        root: 0,
        prefix: 160,
        seed: 0,
        suffix: 40,
    };
    let b = Desc {
        root: 1,
        prefix: 100,
        seed: 1,
        suffix: 60,
    };
    descs.extend([a, b]);
    let (ka, kb) = (
        prefix_keys(&MODEL, &a.tokens(), BT),
        prefix_keys(&MODEL, &b.tokens(), BT),
    );
    assert!(start(&mut store, 1, &a.tokens(), false).unwrap());
    assert_eq!(store.publish(1, &ka).unwrap(), 6);
    assert!(start(&mut store, 2, &b.tokens(), true).unwrap());
    faulty.arm(Fault::WriteError);
    let e = store.publish(2, &kb).unwrap_err();
    assert!(matches!(e, KvError::Io { .. }), "{e}");
    assert_eq!(
        store.cached_prefix(&kb),
        0,
        "a failed publish left pages cached"
    );
    assert_eq!(store.prefix_stats().pages, 6);
    assert_eq!(store.publish(2, &kb).unwrap(), 5, "retry");
    assert_eq!(store.prefix_stats().shared_pages, 11);
    assert_eq!(faulty.counts().write_errors, 1);

    // 2. Clearing or binding another model fails when its record cannot be written, and
    //    the cache stays as it was (and usable).
    faulty.arm(Fault::WriteError);
    assert!(is_io(&store.clear_prefix_cache()));
    faulty.arm(Fault::NoSpace);
    assert!(is_io(&store.bind_model([9; 32])));
    assert_eq!(store.prefix_stats().pages, 11);
    assert_eq!((store.cached_prefix(&ka), store.cached_prefix(&kb)), (6, 5));
    probe_cache(&mut store, &descs);

    // 3. An eviction whose record cannot be written frees nothing: the append that needed
    //    the room fails (store full), nothing panics, and what runs or stays cached is
    //    intact. Other writes the armed fault hits first (pages) just fail that append.
    store.reclaim(1).unwrap();
    store.reclaim(2).unwrap(); // their pages are now only cached: evictable
    let filler: Vec<u32> = (0..UNITS as usize * BT).map(|i| 5000 + i as u32).collect();
    let mut r = RefSeq::new(SHAPE.layers as usize);
    let mut failed_eviction = false;
    let mut armed = 0;
    for _ in 0..UNITS {
        // Every append of a page writes layer 0 first: its eviction record if layer 0 must
        // grow into a full store, else its page.
        let before = store.prefix_stats();
        let next = r.tokens(&SHAPE, 0) + BT;
        faulty.arm(Fault::WriteError);
        armed += 1;
        let res = append_tokens(&mut store, &mut r, 3, &filler, next);
        let after = store.prefix_stats();
        assert_eq!(after.evicted_pages, before.evicted_pages);
        match res {
            Err(KvError::Io { .. }) => {
                // The page write took the fault; without it the append goes through
                // (evicting if it must).
                assert_eq!(
                    r.tokens(&SHAPE, 0),
                    next - BT,
                    "a failed append changed layer 0"
                );
                append_tokens(&mut store, &mut r, 3, &filler, next).unwrap();
            }
            Err(KvError::StoreFull { .. }) => {
                // The fault hit the eviction's journal record: nothing left the cache.
                assert_eq!(after.pages, before.pages, "an unrecorded eviction");
                failed_eviction = true;
                break;
            }
            other => panic!("append with an armed write fault: {other:?}"),
        }
    }
    assert!(failed_eviction, "no append needed an eviction");
    // Every armed fault was taken by the write it was meant for.
    assert_eq!(faulty.counts().write_errors, 2 + armed);
    check_seq(&store, 3, &r).unwrap();
    probe_cache(&mut store, &descs);
    // Without the fault the same append evicts and goes through.
    let next = r.tokens(&SHAPE, SHAPE.layers as usize - 1) + BT;
    append_tokens(&mut store, &mut r, 3, &filler, next).unwrap();
    assert!(store.prefix_stats().evicted_pages > 0);
    check_seq(&store, 3, &r).unwrap();
    store.reclaim(3).unwrap();

    // 4. Random write faults (pages, journal batches, checkpoints, roots) over a longer run:
    //    every operation returns, with a result or an error.
    faulty.set_enabled(true);
    let mut rng = ChaCha8Rng::seed_from_u64(77);
    let mut live: Vec<u64> = Vec::new();
    let (mut ok_publish, mut failed) = (0, 0);
    for i in 0..150u64 {
        let d = Desc::random(&mut rng);
        descs.insert(d);
        let id = 100 + i;
        match start(&mut store, id, &d.tokens(), rng.random_bool(0.5)) {
            Ok(true) => live.push(id),
            Ok(false) => {}
            Err(KvError::Io { .. }) => failed += 1,
            Err(e) => panic!("start: {e}"),
        }
        if live.last() == Some(&id) {
            match store.publish(id, &prefix_keys(&MODEL, &d.tokens(), BT)) {
                Ok(_) => ok_publish += 1,
                Err(KvError::Io { .. }) => failed += 1,
                Err(e) if short_of_room(&e) => failed += 1,
                Err(e) => panic!("publish: {e:?}"),
            }
        }
        while live.len() > 2 {
            store.reclaim(live.remove(0)).unwrap();
        }
        if i % 40 == 39 {
            match store.clear_prefix_cache() {
                Ok(_) => {}
                Err(KvError::Io { .. }) => failed += 1,
                Err(e) if short_of_room(&e) => failed += 1,
                Err(e) => panic!("clear: {e:?}"),
            }
        }
    }
    faulty.set_enabled(false);
    assert!(ok_publish > 20 && failed > 5, "{ok_publish} {failed}");
    // Whatever the faults did, what the cache serves now is right.
    let pages = store.prefix_stats().pages;
    assert_eq!(probe_cache(&mut store, &descs), pages);
    drop(store);

    // 5. Reopened on the plain file: it opens, and everything recovered is intact.
    let mut store = KvStore::open(&path, &opts()).unwrap();
    let st = store.prefix_stats();
    assert!(st.recovered_pages > 0);
    assert_eq!(probe_cache(&mut store, &descs), st.pages);
    assert!(store.sequences().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Persisted sequences and cached pages after a crash
// ---------------------------------------------------------------------------------------------

/// A persisted sequence's manifest lists its extents with the room it had not written yet.
/// That room can hold cached pages by the time of a crash: pages the sequence appended
/// after its persist and published, or pages another sequence wrote there (the room having
/// been trimmed back when the store filled) and published. The journal makes those pages
/// durable without a new manifest, so after a reopen the restored sequence must not count
/// that room as its own and append over them.
#[test]
fn a_restored_sequence_never_writes_over_cached_pages() {
    let dir = disk_tempdir();
    let path = dir.path().join("kv.store");
    let roomy = StoreOptions {
        min_extent_blocks: 8,
        max_extent_blocks: 8,
        ..Default::default()
    };
    let cfg = StoreConfig {
        options: roomy,
        ..config()
    };
    // After a restart, sequence `id` goes on with other tokens than before.
    let decode = |id: u64, from: usize, n: usize| -> Vec<u32> {
        (from..from + n)
            .map(|p| 9000 + (mix(id, p as u64) % 1000) as u32)
            .collect()
    };
    for other_writer in [false, true] {
        let _ = std::fs::remove_file(&path);
        let mut store = KvStore::create(&path, &cfg).unwrap();
        store.bind_model(MODEL).unwrap();
        // Sequence 1: 3 pages and a 5-token tail, persisted; its layers have room for 8.
        let a = Desc {
            root: 2,
            prefix: 101,
            seed: 0,
            suffix: 0,
        };
        let mut ta = a.tokens();
        let mut ra = RefSeq::new(SHAPE.layers as usize);
        append_tokens(&mut store, &mut ra, 1, &ta, ta.len()).unwrap();
        store.persist(1).unwrap();
        let persisted = (ta.clone(), ra.clone());
        // The published pages that may lie in sequence 1's room.
        let (writer, tw) = if other_writer {
            // Sequence 2 fills the store, which trims sequence 1's room and takes it.
            let tw: Vec<u32> = (0..UNITS as usize * BT)
                .map(|i| 20_000 + i as u32)
                .collect();
            let mut rw = RefSeq::new(SHAPE.layers as usize);
            let mut n = 0;
            while append_tokens(&mut store, &mut rw, 2, &tw, n + BT).is_ok() {
                n += BT;
            }
            (2, tw[..n].to_vec())
        } else {
            // Sequence 1 goes on for 2 more pages, into its room.
            ta.extend(decode(1, ta.len(), 59));
            append_tokens(&mut store, &mut ra, 1, &ta, ta.len()).unwrap();
            (1, ta.clone())
        };
        let kw = prefix_keys(&MODEL, &tw, BT);
        let published = store.publish(writer, &kw).unwrap();
        assert!(published >= 5, "{published}");
        let kw = &kw[..published];
        drop(store); // a crash: no manifest after the publish

        let mut store = KvStore::open(&path, &roomy).unwrap();
        assert_eq!(store.sequences(), vec![1]);
        assert_eq!(store.prefix_stats().recovered_pages, published as u64);
        let (mut ta, mut ra) = persisted;
        check_seq(&store, 1, &ra).unwrap();
        // Sequence 1 holds only the cached pages published from its persisted pages.
        let own = if other_writer { 0 } else { 3 };
        assert_eq!(
            store.prefix_stats().shared_pages,
            own,
            "other writer: {other_writer}"
        );
        // Sequence 1 appended its pages 3 and 4 after its persist: a new sequence reads
        // every cached page (so none can be evicted) while sequence 1 goes on. (Another
        // sequence's pages fill the store: pinning them all would leave no room at all.)
        if !other_writer {
            assert_eq!(store.share_prefix(PROBE, kw).unwrap(), kw.len());
        }
        // Sequence 1 goes on, with other tokens than before the crash, for as many pages as
        // the store has room for (evicting cached pages no sequence reads).
        ta.extend(decode(1 << 20, ta.len(), 8 * BT));
        let mut n = ra.tokens(&SHAPE, 0);
        while n < ta.len()
            && append_tokens(&mut store, &mut ra, 1, &ta, (n + BT).min(ta.len())).is_ok()
        {
            n = ra.tokens(&SHAPE, 0);
        }
        let need = if other_writer { 101 + BT } else { 101 + 59 };
        assert!(
            n >= need,
            "sequence 1 could not grow ({n} tokens; other writer: {other_writer})"
        );
        // What is cached is intact, and so is sequence 1.
        let k = store.cached_prefix(kw);
        if other_writer {
            assert!(k > 0 && store.prefix_stats().evicted_pages > 0);
            assert_eq!(store.share_prefix(PROBE, &kw[..k]).unwrap(), k);
        } else {
            assert_eq!(k, kw.len());
        }
        check_seq(&store, PROBE, &token_ref(&SHAPE, &tw[..k * BT]))
            .unwrap_or_else(|e| panic!("cached pages (other writer: {other_writer}): {e}"));
        check_seq(&store, 1, &ra).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Format version 1
// ---------------------------------------------------------------------------------------------

/// A store written by format version 1 (superblock and root slot of version 1: no journal,
/// no index) is refused with `UnsupportedVersion`, and neither `open` nor `open_or_create`
/// changes a byte of it.
#[test]
fn a_version_1_store_is_refused_untouched() {
    let dir = disk_tempdir();
    let path = dir.path().join("v1.store");
    drop(KvStore::create(&path, &config()).unwrap());
    let mut v1 = std::fs::read(&path).unwrap();
    // Superblock: version 1, same layout; CRC-32C of bytes 0..88 at 88.
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let c = crc32c::crc32c(&v1[..88]);
    v1[88..92].copy_from_slice(&c.to_le_bytes());
    // Root slot 0 in version 1's layout: 60 bytes (no journal extent) and their CRC.
    let slot = &mut v1[4096..8192];
    slot[8..12].copy_from_slice(&1u32.to_le_bytes());
    slot[60..].fill(0);
    let c = crc32c::crc32c(&slot[..60]);
    slot[60..64].copy_from_slice(&c.to_le_bytes());
    std::fs::write(&path, &v1).unwrap();

    for e in [
        KvStore::open(&path, &opts()).err(),
        KvStore::open_or_create(&path, &config()).err(),
    ] {
        let e = e.expect("a version 1 store opened");
        assert!(
            matches!(
                e,
                KvError::UnsupportedVersion {
                    found: 1,
                    supported: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("version 1"), "{e}");
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        v1,
        "a refused store was modified"
    );
}
