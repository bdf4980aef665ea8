//! Model-based property test of the prefix cache: random runs of operations (start a
//! sequence on the longest cached prefix of its tokens and append the rest, publish, extend,
//! read, reclaim, persist, clear, rebind, reopen, fill the store until cached pages are
//! evicted, drain) against a plain reference model of which pages are cached, which
//! sequences run, what they hold and when each page was last used.
//!
//! Sequences are drawn from a few shared token streams with random suffixes, so their
//! prefixes overlap and form trees; K/V is a function of the token stream (common
//! `token_kv`), so a page of a given prefix has the same bytes whichever sequence wrote it,
//! and a page served for the wrong prefix reads back wrong.
//!
//! Checked after every operation: the store caches exactly the pages the model says;
//! `share_prefix` returns exactly the model's longest cached run; `shared_pages` counts
//! exactly the cached pages that running sequences hold. Where an operation evicted, the
//! pages that went are as many as `evicted_pages` says, none is held by a running sequence,
//! each went with every cached page below it, and none was used more recently than an
//! evictable leaf that stayed (LRU). After every operation that may evict, every running
//! sequence reads back exactly its data. After reopen, exactly the cached pages come back,
//! each reading back bit-identical. After draining (everything reclaimed, cache cleared),
//! free space is the data area minus one manifest unit and the journal: nothing leaked.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};

use common::*;
use csd_engine::device::MemDevice;
use csd_engine::{
    prefix_keys, BlockKey, KvError, KvStore, LayerRead, PageShape, StoreConfig, StoreOptions,
};
use proptest::prelude::*;

const SHAPE: PageShape = PageShape {
    layers: 2,
    kv_heads: 2,
    head_dim: 64,
    block_tokens: 32,
};
const BT: usize = 32;
/// Bytes of a block group: 2 kv heads × (4 KiB K + 4 KiB V).
const UNIT: u64 = 16 << 10;
/// 128 block groups (64 pages of both layers) after the 64 KiB header.
const UNITS: u64 = 128;
const CAPACITY: u64 = (64 << 10) + UNITS * UNIT;
const MODEL_A: [u8; 32] = [0xa1; 32];
const MODEL_B: [u8; 32] = [0xb2; 32];

/// Units a journal takes once the cache is in use: 256 KiB, at most a 32nd of the store
/// (`share::journal_units`; the index here never gets large enough for more).
fn journal_units() -> u64 {
    (256u64 << 10).div_ceil(UNIT).min((UNITS / 32).max(1))
}

// ---------------------------------------------------------------------------------------------
// Token streams
// ---------------------------------------------------------------------------------------------

/// Where a new sequence's tokens come from.
#[derive(Clone, Debug)]
enum Src {
    /// `prefix` tokens of shared stream `root`, then `suffix` tokens of suffix stream `seed`:
    /// sequences of one root share their first pages, and sequences of one (root, prefix,
    /// seed) share every page.
    Shared {
        root: u8,
        prefix: u16,
        seed: u8,
        suffix: u16,
    },
    /// Tokens no other sequence has: `pages` full pages and a few more (fills the store).
    Unique { pages: u8 },
}

fn base_token(root: u8, i: usize) -> u32 {
    (mix(root as u64 + 1, i as u64) % 1000) as u32
}

fn suffix_token(seed: u8, i: usize) -> u32 {
    1000 + (mix(0x5eed + seed as u64, i as u64) % 1000) as u32
}

fn unique_token(id: u64, i: usize) -> u32 {
    1_000_000 + (mix(id, i as u64) % 1_000_000) as u32
}

/// Decode tokens: a sequence extended after a reopen continues differently than it did
/// before (`epoch`), as a restarted server samples anew.
fn decode_token(id: u64, epoch: u64, pos: usize) -> u32 {
    3_000_000 + (mix(id ^ (epoch << 48), pos as u64) % 1_000_000) as u32
}

fn tokens_of(src: &Src, id: u64) -> Vec<u32> {
    match *src {
        Src::Shared {
            root,
            prefix,
            seed,
            suffix,
        } => (0..prefix as usize)
            .map(|i| base_token(root, i))
            .chain((0..suffix as usize).map(|i| suffix_token(seed, i)))
            .collect(),
        Src::Unique { pages } => (0..pages as usize * BT + 7)
            .map(|i| unique_token(id, i))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// Start a sequence on the longest cached prefix of its tokens, optionally reserve its
    /// room, and append the rest in two steps (the first up to `split`).
    Create {
        src: Src,
        reserve: bool,
        split: u16,
    },
    /// Decode `n` more tokens into a running sequence.
    Extend {
        pick: usize,
        n: u16,
    },
    /// Publish the first `upto` pages of a running sequence.
    Publish {
        pick: usize,
        upto: u8,
    },
    /// Read a running sequence back in full.
    Read {
        pick: usize,
    },
    /// Start a sequence on a cached page's whole chain, read it, end it.
    ReadCache {
        pick: usize,
    },
    Reclaim {
        pick: usize,
    },
    Persist {
        pick: usize,
    },
    Clear,
    /// Bind the cache to the other model (drops every page).
    Rebind,
    /// Drop the store and open it again (no shutdown step: a crash, for the store).
    Reopen,
    /// Reclaim every sequence, clear the cache and check that no unit leaked.
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    let shared =
        (0u8..3, 0u16..=200, 0u8..3, 0u16..=120).prop_map(|(root, prefix, seed, suffix)| {
            Src::Shared {
                root,
                prefix,
                seed,
                // Never empty.
                suffix: if prefix == 0 { suffix.max(1) } else { suffix },
            }
        });
    let pick = 0usize..64;
    prop_oneof![
        12 => (shared, any::<bool>(), 0u16..=320)
            .prop_map(|(src, reserve, split)| Op::Create { src, reserve, split }),
        4 => (8u8..48, any::<bool>())
            .prop_map(|(pages, reserve)| Op::Create { src: Src::Unique { pages }, reserve, split: 100 }),
        4 => (pick.clone(), 1u16..80).prop_map(|(pick, n)| Op::Extend { pick, n }),
        10 => (pick.clone(), prop_oneof![Just(255u8), 0u8..12])
            .prop_map(|(pick, upto)| Op::Publish { pick, upto }),
        3 => pick.clone().prop_map(|pick| Op::Read { pick }),
        4 => pick.clone().prop_map(|pick| Op::ReadCache { pick }),
        6 => pick.clone().prop_map(|pick| Op::Reclaim { pick }),
        3 => pick.prop_map(|pick| Op::Persist { pick }),
        1 => Just(Op::Clear),
        1 => Just(Op::Rebind),
        2 => Just(Op::Reopen),
        1 => Just(Op::Drain),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// The units of one page, named by the sequence, page and session that wrote them.
type Unit = (u64, usize, u64);

/// One cached page.
struct MEntry {
    parent: Option<BlockKey>,
    /// The keys from the first page to this one.
    chain: Vec<BlockKey>,
    /// The tokens up to the end of this page.
    tokens: Vec<u32>,
    /// Its units (in every layer): those written as page `.1` of sequence `.0` in session
    /// `.2` (a reopen starts a new session; a restored sequence writes new units).
    origin: Unit,
    /// Logical time of the last lookup or insert; `None`: recovered at open, so used less
    /// recently than anything looked up or inserted since.
    last_use: Option<u64>,
}

/// One running sequence.
struct MSeq {
    tokens: Vec<u32>,
    r: RefSeq,
    /// The units of each of its full pages, named by where they were written.
    units: Vec<Unit>,
    /// It shared cached pages or had pages published: the store refuses to persist it.
    touched: bool,
    /// Tokens as of its last persist.
    persisted: Option<usize>,
}

struct Model {
    digest: [u8; 32],
    entries: BTreeMap<BlockKey, MEntry>,
    seqs: BTreeMap<u64, MSeq>,
    clock: u64,
    next_id: u64,
    epoch: u64,
    /// `evicted_pages` as last accounted for.
    evicted_seen: u64,
}

/// What the model knew right before a call that may evict.
struct Pre {
    pinned: HashSet<BlockKey>,
    /// Evictable leaves and their last use.
    leaves: Vec<(BlockKey, Option<u64>)>,
}

/// Totals over a run, to show that the run exercised the interesting paths.
#[derive(Default, Debug, Clone, Copy)]
struct Seen {
    shared_hits: u64,
    evicted: u64,
    recovered: u64,
    drains: u64,
    persisted: u64,
}

impl Model {
    fn longest(&self, keys: &[BlockKey]) -> usize {
        keys.iter()
            .take_while(|k| self.entries.contains_key(k))
            .count()
    }

    fn touch(&mut self, keys: &[BlockKey]) {
        for k in keys {
            self.clock += 1;
            self.entries.get_mut(k).expect("cached").last_use = Some(self.clock);
        }
    }

    /// The cached pages whose units running sequences hold.
    fn pinned(&self) -> HashSet<BlockKey> {
        let held: HashSet<Unit> = self
            .seqs
            .values()
            .flat_map(|s| s.units.iter().copied())
            .collect();
        self.entries
            .iter()
            .filter(|(_, e)| held.contains(&e.origin))
            .map(|(k, _)| *k)
            .collect()
    }

    fn has_children(&self, key: &BlockKey) -> bool {
        self.entries.values().any(|e| e.parent == Some(*key))
    }

    fn pre(&self) -> Pre {
        let pinned = self.pinned();
        let leaves = self
            .entries
            .iter()
            .filter(|(k, _)| !pinned.contains(k) && !self.has_children(k))
            .map(|(k, e)| (*k, e.last_use))
            .collect();
        Pre { pinned, leaves }
    }

    fn live(&self, pick: usize) -> Option<u64> {
        let n = self.seqs.len();
        (n > 0).then(|| *self.seqs.keys().nth(pick % n).expect("in range"))
    }
}

/// Whether `e` says the store lacks the room a manifest and journal need, in count: that is
/// an error, not a bug. With enough free units a commit must not fail, however they lie (the
/// manifests here take one unit; the journal a few).
fn short_of_room(e: &KvError) -> bool {
    matches!(e, KvError::ManifestNoSpace { needed, free } if free < needed)
}

fn fail(what: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(what.to_string())
}

/// Account for what a call that may evict evicted, and check it was allowed to.
fn settle(
    store: &KvStore,
    m: &mut Model,
    pre: &Pre,
    seen: &mut Seen,
    what: &str,
) -> Result<(), TestCaseError> {
    let st = store.prefix_stats();
    prop_assert!(
        st.evicted_pages >= m.evicted_seen,
        "{}: counter went back",
        what
    );
    let d = st.evicted_pages - m.evicted_seen;
    if d == 0 {
        return Ok(());
    }
    let gone: BTreeSet<BlockKey> = m
        .entries
        .iter()
        .filter(|(_, e)| store.cached_prefix(&e.chain) < e.chain.len())
        .map(|(k, _)| *k)
        .collect();
    prop_assert_eq!(
        gone.len() as u64,
        d,
        "{}: evicted_pages says {} went, {} did",
        what,
        d,
        gone.len()
    );
    for g in &gone {
        prop_assert!(
            !pre.pinned.contains(g),
            "{}: evicted page {} that a running sequence holds",
            what,
            g
        );
        for (k, e) in &m.entries {
            if e.parent == Some(*g) {
                prop_assert!(
                    gone.contains(k),
                    "{}: evicted {} but kept its child {}",
                    what,
                    g,
                    k
                );
            }
        }
    }
    // Least recently used first: no page that went was used after an evictable leaf that
    // stayed (a page recovered at open and not used since is older than any other).
    for (x, xu) in &pre.leaves {
        if gone.contains(x) {
            continue;
        }
        for g in &gone {
            let gu = m.entries[g].last_use;
            let newer = match (gu, *xu) {
                (Some(a), Some(b)) => a > b,
                (Some(_), None) => true,
                _ => false,
            };
            prop_assert!(
                !newer,
                "{}: evicted {} (used {:?}) before the older leaf {} (used {:?})",
                what,
                g,
                gu,
                x,
                xu
            );
        }
    }
    for g in &gone {
        m.entries.remove(g);
    }
    m.evicted_seen = st.evicted_pages;
    seen.evicted += d;
    Ok(())
}

/// The store caches exactly the model's pages, holds exactly its sequences, and counts
/// exactly the cached pages running sequences hold as shared.
fn check_state(store: &KvStore, m: &Model, what: &str) -> Result<(), TestCaseError> {
    let st = store.prefix_stats();
    prop_assert_eq!(
        st.evicted_pages,
        m.evicted_seen,
        "{}: pages evicted by an operation that must not evict",
        what
    );
    prop_assert_eq!(
        st.pages,
        m.entries.len() as u64,
        "{}: store caches {} pages, model {}",
        what,
        st.pages,
        m.entries.len()
    );
    for (k, e) in &m.entries {
        prop_assert_eq!(
            store.cached_prefix(&e.chain),
            e.chain.len(),
            "{}: page {} is not cached",
            what,
            k
        );
    }
    prop_assert_eq!(
        st.shared_pages,
        m.pinned().len() as u64,
        "{}: shared pages",
        what
    );
    prop_assert_eq!(
        st.bytes,
        st.pages * SHAPE.layers as u64 * UNIT,
        "{}: cached bytes",
        what
    );
    let ids: Vec<u64> = m.seqs.keys().copied().collect();
    prop_assert_eq!(store.sequences(), ids, "{}: sequences", what);
    prop_assert!(store.free_bytes() <= store.capacity_bytes());
    Ok(())
}

fn check_live(store: &KvStore, m: &Model, what: &str) -> Result<(), TestCaseError> {
    for (&id, s) in &m.seqs {
        check_seq(store, id, &s.r).map_err(|e| fail(format!("{what}: {e}")))?;
    }
    Ok(())
}

/// End a sequence whose creation or extension ran out of room.
fn abandon(store: &mut KvStore, m: &mut Model, id: u64) -> Result<(), TestCaseError> {
    if store.info(id).is_some() {
        store
            .reclaim(id)
            .map_err(|e| fail(format!("reclaim {id}: {e}")))?;
    }
    m.seqs.remove(&id);
    Ok(())
}

/// Start a sequence on the cache and append the rest of its tokens.
fn create(
    store: &mut KvStore,
    m: &mut Model,
    seen: &mut Seen,
    src: &Src,
    reserve: bool,
    split: usize,
) -> Result<(), TestCaseError> {
    let id = m.next_id;
    m.next_id += 1;
    let tokens = tokens_of(src, id);
    let keys = prefix_keys(&m.digest, &tokens, BT);
    let want = m.longest(&keys);
    let got = store
        .share_prefix(id, &keys)
        .map_err(|e| fail(format!("share_prefix: {e}")))?;
    prop_assert_eq!(got, want, "share_prefix of seq {} ({:?})", id, src);
    m.touch(&keys[..got]);
    let units = keys[..got].iter().map(|k| m.entries[k].origin).collect();
    if got > 0 {
        seen.shared_hits += 1;
        prop_assert_eq!(store.info(id).map(|i| i.tokens), Some(vec![got * BT; 2]));
        // The shared pages read back as this sequence's own first pages.
        check_seq(store, id, &token_ref(&SHAPE, &tokens[..got * BT])).map_err(fail)?;
    } else {
        prop_assert!(store.info(id).is_none(), "a miss created the sequence");
    }
    let len = tokens.len();
    m.seqs.insert(
        id,
        MSeq {
            r: token_ref(&SHAPE, &tokens[..got * BT]),
            tokens,
            units,
            touched: got > 0,
            persisted: None,
        },
    );
    if reserve {
        let pre = m.pre();
        let res = store.reserve(id, len);
        settle(store, m, &pre, seen, "reserve")?;
        match res {
            Ok(()) => {}
            Err(KvError::StoreFull { .. }) => return abandon(store, m, id),
            Err(e) => return Err(fail(format!("reserve: {e}"))),
        }
    }
    let split = split.clamp(got * BT, len);
    for upto in [split, len] {
        let pre = m.pre();
        let mut s = m.seqs.remove(&id).expect("created");
        let res = append_tokens(store, &mut s.r, id, &s.tokens, upto);
        m.seqs.insert(id, s);
        settle(store, m, &pre, seen, "append")?;
        match res {
            Ok(()) => {}
            Err(KvError::StoreFull { .. }) => return abandon(store, m, id),
            Err(e) => return Err(fail(format!("append: {e}"))),
        }
    }
    own_pages(m, id);
    Ok(())
}

/// Name the units of a sequence's new full pages (written by itself, now).
fn own_pages(m: &mut Model, id: u64) {
    let epoch = m.epoch;
    let s = m.seqs.get_mut(&id).expect("live");
    for p in s.units.len()..s.tokens.len() / BT {
        s.units.push((id, p, epoch));
    }
}

fn publish(store: &mut KvStore, m: &mut Model, id: u64, upto: usize) -> Result<(), TestCaseError> {
    let s = &m.seqs[&id];
    let keys = prefix_keys(&m.digest, &s.tokens, BT);
    let keys = &keys[..keys.len().min(upto)];
    let before = store.prefix_stats().pages;
    match store.publish(id, keys) {
        Ok(n) => {
            let mut added = 0;
            for (i, &key) in keys.iter().enumerate() {
                if m.entries.contains_key(&key) {
                    continue;
                }
                m.clock += 1;
                let s = m.seqs.get_mut(&id).expect("live");
                s.touched = true;
                let entry = MEntry {
                    parent: (i > 0).then(|| keys[i - 1]),
                    chain: keys[..=i].to_vec(),
                    tokens: s.tokens[..(i + 1) * BT].to_vec(),
                    origin: s.units[i],
                    last_use: Some(m.clock),
                };
                m.entries.insert(key, entry);
                added += 1;
            }
            prop_assert_eq!(n, added, "publish of seq {} added", id);
        }
        // Publishing may have to checkpoint the index; with too few free units that fails,
        // and then nothing may have changed.
        Err(e) if short_of_room(&e) => {
            prop_assert_eq!(
                store.prefix_stats().pages,
                before,
                "a failed publish changed the cache"
            );
        }
        Err(e) => return Err(fail(format!("publish: {e}"))),
    }
    Ok(())
}

/// Decode `n` more tokens into running sequence `id`. Returns whether it still runs (it is
/// ended when the store has no room left for it).
fn extend(
    store: &mut KvStore,
    m: &mut Model,
    seen: &mut Seen,
    id: u64,
    n: usize,
    what: &str,
) -> Result<bool, TestCaseError> {
    let pre = m.pre();
    let mut s = m.seqs.remove(&id).expect("live");
    let from = s.tokens.len();
    s.tokens
        .extend((from..from + n).map(|p| decode_token(id, m.epoch, p)));
    let res = append_tokens(store, &mut s.r, id, &s.tokens, s.tokens.len());
    m.seqs.insert(id, s);
    settle(store, m, &pre, seen, what)?;
    match res {
        Ok(()) => {
            own_pages(m, id);
            Ok(true)
        }
        Err(KvError::StoreFull { .. }) => {
            abandon(store, m, id)?;
            Ok(false)
        }
        Err(e) => Err(fail(format!("{what}: {e}"))),
    }
}

/// Start a sequence on `key`'s whole chain, read it back in full, end it.
fn read_cached(store: &mut KvStore, m: &mut Model, key: BlockKey) -> Result<(), TestCaseError> {
    let id = m.next_id;
    m.next_id += 1;
    let e = &m.entries[&key];
    let (chain, want) = (e.chain.clone(), token_ref(&SHAPE, &e.tokens));
    let got = store
        .share_prefix(id, &chain)
        .map_err(|e| fail(format!("share_prefix: {e}")))?;
    prop_assert_eq!(got, chain.len(), "cached chain of {}", key);
    m.touch(&chain);
    check_seq(store, id, &want).map_err(|e| fail(format!("cached page {key}: {e}")))?;
    store
        .reclaim(id)
        .map_err(|e| fail(format!("reclaim: {e}")))?;
    Ok(())
}

/// Reclaim every sequence and clear the cache. Then only the manifest (one unit: it holds
/// no sequence and an empty checkpoint now) and the journal (at most `journal_units`, at
/// least one unit) are allocated. Returns the free units.
fn drain(store: &mut KvStore, m: &mut Model) -> Result<u64, TestCaseError> {
    for id in m.seqs.keys().copied().collect::<Vec<_>>() {
        store
            .reclaim(id)
            .map_err(|e| fail(format!("drain: reclaim {id}: {e}")))?;
    }
    m.seqs.clear();
    let n = store
        .clear_prefix_cache()
        .map_err(|e| fail(format!("drain: clear: {e}")))?;
    prop_assert_eq!(n, m.entries.len() as u64);
    m.entries.clear();
    let free = store.free_bytes() / UNIT;
    prop_assert!(
        free >= UNITS - 1 - journal_units() && free <= UNITS - 2,
        "units leaked: {} of {} free after draining",
        free,
        UNITS
    );
    Ok(free)
}

fn run(ops: Vec<Op>, file: Option<&std::path::Path>) -> Result<Seen, TestCaseError> {
    let opts = StoreOptions {
        min_extent_blocks: 2,
        max_extent_blocks: 8,
        ..Default::default()
    };
    let mem = MemDevice::new(CAPACITY as usize);
    let reopen = || -> Result<KvStore, KvError> {
        match file {
            Some(p) => KvStore::open(p, &opts),
            None => KvStore::open_device(Box::new(mem.clone()), opts),
        }
    };
    let mut store = match file {
        Some(p) => KvStore::create(
            p,
            &StoreConfig {
                shape: SHAPE,
                capacity: CAPACITY,
                options: opts,
            },
        ),
        None => KvStore::format_device(Box::new(mem.clone()), SHAPE, opts),
    }
    .map_err(fail)?;
    prop_assert_eq!(store.capacity_bytes(), UNITS * UNIT);
    prop_assert_eq!(store.bind_model(MODEL_A).map_err(fail)?, 0);
    let mut m = Model {
        digest: MODEL_A,
        entries: BTreeMap::new(),
        seqs: BTreeMap::new(),
        clock: 0,
        next_id: 1,
        epoch: 0,
        evicted_seen: 0,
    };
    let mut seen = Seen::default();
    for (step, op) in ops.into_iter().enumerate() {
        let what = format!("step {step} {op:?}");
        match op {
            Op::Create {
                src,
                reserve,
                split,
            } => {
                create(&mut store, &mut m, &mut seen, &src, reserve, split as usize)?;
                check_live(&store, &m, &what)?;
            }
            Op::Extend { pick, n } => {
                let Some(id) = m.live(pick) else { continue };
                extend(&mut store, &mut m, &mut seen, id, n as usize, &what)?;
                check_live(&store, &m, &what)?;
            }
            Op::Publish { pick, upto } => {
                let Some(id) = m.live(pick) else { continue };
                publish(&mut store, &mut m, id, upto as usize)?;
            }
            Op::Read { pick } => {
                let Some(id) = m.live(pick) else { continue };
                check_seq(&store, id, &m.seqs[&id].r).map_err(fail)?;
                // And a sparse read of a few of its blocks.
                let full = (m.seqs[&id].tokens.len() / BT) as u32;
                if full > 0 {
                    let pick: Vec<u32> = [0, full / 2, full - 1].into();
                    let mut out = LayerRead::new();
                    store.read_blocks(id, 1, &pick, &mut out).map_err(fail)?;
                    check_read(&SHAPE, &m.seqs[&id].r, 1, &out).map_err(fail)?;
                }
            }
            Op::ReadCache { pick } => {
                let n = m.entries.len();
                if n == 0 {
                    continue;
                }
                let key = *m.entries.keys().nth(pick % n).expect("in range");
                read_cached(&mut store, &mut m, key)?;
            }
            Op::Reclaim { pick } => {
                let Some(id) = m.live(pick) else { continue };
                store
                    .reclaim(id)
                    .map_err(|e| fail(format!("{what}: {e}")))?;
                m.seqs.remove(&id);
            }
            Op::Persist { pick } => {
                let Some(id) = m.live(pick) else { continue };
                // Persist on a page boundary: a snapshot's RAM tail goes into the manifest,
                // and manifests of several units need a contiguous run of free units, which
                // a fragmented store may lack (a limit of persistence, not of the cache).
                let tail = m.seqs[&id].tokens.len() % BT;
                if tail > 0 && !extend(&mut store, &mut m, &mut seen, id, BT - tail, &what)? {
                    continue;
                }
                let s = m.seqs.get_mut(&id).expect("live");
                match store.persist(id) {
                    Ok(()) => {
                        prop_assert!(!s.touched, "{}: persisted a sequence sharing pages", what);
                        s.persisted = Some(s.tokens.len());
                        seen.persisted += 1;
                    }
                    Err(KvError::BadInput(_)) => {
                        prop_assert!(s.touched, "{}: refused an unshared sequence", what)
                    }
                    Err(e) if short_of_room(&e) => {}
                    Err(e) => return Err(fail(format!("{what}: {e:?}"))),
                }
            }
            Op::Clear => {
                let n = store.clear_prefix_cache().map_err(fail)?;
                prop_assert_eq!(n, m.entries.len() as u64, "{}", what);
                m.entries.clear();
                check_live(&store, &m, &what)?;
            }
            Op::Rebind => {
                let other = if m.digest == MODEL_A {
                    MODEL_B
                } else {
                    MODEL_A
                };
                let n = store.bind_model(other).map_err(fail)?;
                prop_assert_eq!(n, m.entries.len() as u64, "{}", what);
                m.entries.clear();
                m.digest = other;
            }
            Op::Reopen => {
                drop(store);
                store = reopen().map_err(|e| fail(format!("{what}: {e}")))?;
                prop_assert_eq!(store.bind_model(m.digest).map_err(fail)?, 0, "{}", what);
                let st = store.prefix_stats();
                prop_assert_eq!(st.recovered_pages, m.entries.len() as u64, "{}", what);
                prop_assert_eq!(st.dropped_at_recovery, 0, "{}", what);
                seen.recovered += st.recovered_pages;
                m.evicted_seen = 0;
                m.epoch += 1;
                for e in m.entries.values_mut() {
                    e.last_use = None;
                }
                // Exactly the persisted sequences come back, as of their last persist (they
                // never shared pages: those are refused), and share the units of the cached
                // pages published from their persisted pages.
                m.seqs.retain(|_, s| s.persisted.is_some());
                let origins: HashSet<Unit> = m.entries.values().map(|e| e.origin).collect();
                for s in m.seqs.values_mut() {
                    let n = s.persisted.expect("retained");
                    s.tokens.truncate(n);
                    s.units.truncate(n / BT);
                    s.r = token_ref(&SHAPE, &s.tokens);
                    s.touched = s.units.iter().any(|u| origins.contains(u));
                }
                check_state(&store, &m, &what)?;
                check_live(&store, &m, &what)?;
                // Every page that came back reads back bit-identical.
                let leaves: Vec<BlockKey> = m
                    .entries
                    .keys()
                    .filter(|k| !m.has_children(k))
                    .copied()
                    .collect();
                for k in leaves {
                    read_cached(&mut store, &mut m, k)?;
                }
            }
            Op::Drain => {
                // Free space after draining is what a fresh open of the same state finds:
                // nothing leaked in this session either.
                let free = drain(&mut store, &mut m)?;
                drop(store);
                store = reopen().map_err(|e| fail(format!("{what}: {e}")))?;
                prop_assert_eq!(store.free_bytes() / UNIT, free, "{}: units leaked", what);
                prop_assert_eq!(store.prefix_stats().recovered_pages, 0);
                prop_assert_eq!(store.bind_model(m.digest).map_err(fail)?, 0);
                m.evicted_seen = 0;
                m.epoch += 1;
                seen.drains += 1;
            }
        }
        check_state(&store, &m, &what)?;
    }
    check_live(&store, &m, "end")?;
    let free = drain(&mut store, &mut m)?;
    drop(store);
    let store = reopen().map_err(fail)?;
    let st = store.prefix_stats();
    prop_assert_eq!((st.recovered_pages, st.dropped_at_recovery), (0, 0));
    prop_assert_eq!(store.sequences(), Vec::<u64>::new());
    prop_assert_eq!(store.free_bytes() / UNIT, free, "units leaked");
    Ok(seen)
}

/// Case count, scaled by CSD_PROPTEST_SCALE (default 1) for longer soak runs.
fn cases(base: u32) -> u32 {
    let scale: u32 = std::env::var("CSD_PROPTEST_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    base * scale.max(1)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(384), ..ProptestConfig::default() })]

    /// In memory: many cases.
    #[test]
    fn prefix_model_mem(ops in proptest::collection::vec(op(), 1..100)) {
        run(ops, None)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(32), ..ProptestConfig::default() })]

    /// On a real file through io_uring + O_DIRECT.
    #[test]
    fn prefix_model_file(ops in proptest::collection::vec(op(), 1..80)) {
        let dir = disk_tempdir();
        run(ops, Some(&dir.path().join("kv.store")))?;
    }
}

/// A fixed long run (seeded, not shrunk) whose totals show the model test reaches what it
/// is meant to: shared prefixes, eviction, recovery of cached pages and leak checks.
#[test]
fn prefix_model_reaches_eviction_and_recovery() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let mut total = Seen::default();
    for _ in 0..12 {
        let ops = proptest::collection::vec(op(), 200)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let s = run(ops, None).unwrap_or_else(|e| panic!("{e}"));
        total.shared_hits += s.shared_hits;
        total.evicted += s.evicted;
        total.recovered += s.recovered;
        total.drains += s.drains;
        total.persisted += s.persisted;
    }
    eprintln!("prefix model totals: {total:?}");
    assert!(
        total.shared_hits > 50
            && total.evicted > 100
            && total.recovered > 200
            && total.drains > 5
            && total.persisted > 10,
        "{total:?}"
    );
}

/// A case the model test found: the store is full of a sequence that ran out of room and
/// was ended, in scattered extents; reclaiming the persisted sequence must then commit a
/// manifest and a fresh journal into free units that do not lie in one run.
#[test]
fn reclaiming_a_persisted_sequence_in_fragmented_free_space() {
    let shared = |root, prefix, seed, suffix, reserve, split| Op::Create {
        src: Src::Shared {
            root,
            prefix,
            seed,
            suffix,
        },
        reserve,
        split,
    };
    let ops = vec![
        shared(0, 0, 0, 1, false, 0),
        shared(0, 0, 0, 1, false, 0),
        shared(0, 0, 0, 1, false, 0),
        shared(0, 0, 0, 1, false, 0),
        Op::Reopen,
        shared(0, 144, 0, 49, true, 0),
        Op::Persist { pick: 51 },
        shared(2, 53, 0, 44, false, 311),
        shared(1, 156, 1, 19, false, 16),
        shared(1, 120, 2, 80, false, 185),
        Op::Reclaim { pick: 19 },
        Op::Reclaim { pick: 4 },
        Op::Create {
            src: Src::Unique { pages: 47 },
            reserve: false,
            split: 100,
        },
        Op::Reclaim { pick: 9 },
    ];
    run(ops, None).unwrap_or_else(|e| panic!("{e}"));
}
