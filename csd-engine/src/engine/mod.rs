//! The near-data attention engine: the drive's command interface (see docs/ARCHITECTURE.md,
//! "The storage engine").
//!
//! ```text
//! Engine::new(store, shape, config)            config
//! open(seq, mode, capacity)                    a new sequence
//! append(seq, layer, k, v, q)                  prefill chunks and decode tokens
//! attend(layer, [(seq, q, first_pos, out)])    -> outputs, per-item errors
//! reclaim(seq) / persist(seq) / restore(seq) / clone_seq(src, dst)
//! bind_model(digest) / open_shared(seq, mode, capacity, keys) -> tokens shared
//! reserve(seq, tokens) / publish(seq, keys) / clear_prefix_cache() / prefix_stats()
//! ```
//!
//! K/V of every append go to a per-(sequence, layer) RAM stage at once and to flash through
//! the writer thread; the stage keeps tokens until their block is confirmed on flash, so an
//! attend never waits for a write. An attend picks each item's blocks by its mode, takes what
//! the page cache holds and sends the rest to the reader threads (a `full` or `flexgen` decode
//! step also queues the next layers' reads ahead, see `reads`); by default each item then
//! runs one softmax over its cached, read and staged rows, and with `merge_partials` a decode
//! token attends over the resident part (cache + stage) while the reads run, then over the
//! pages read, and merges the two by log-sum-exp. Every byte that crosses this interface and
//! every byte read from the device is counted, per sequence and in total.
//!
//! Files: `sequence` (per-sequence state, open/len/truncate), `append`, `attend` (the attend
//! pipeline), `item` (one item's attention), `select` (a sparse step's page selection),
//! `lifecycle` (reclaim, persist, restore, clone), `prefix` (the prefix cache's commands), `stats` (counters), `io` (the writer and
//! reader threads), `reads` (reads in flight and read-ahead), `cache` (the RAM page cache), `policy`, `summary`, `estimate`, `probe`
//! and `measure` (the retrieval policy and its inputs), `config`.

mod append;
mod attend;
mod cache;
mod config;
mod estimate;
mod io;
mod item;
mod lifecycle;
mod measure;
mod policy;
mod prefix;
mod probe;
mod reads;
mod select;
mod sequence;
mod stats;
mod summary;

pub use attend::AttendReq;
pub use config::{AttentionMode, EngineConfig, PageScore};
pub use stats::{AttendProfile, EngineStats, EngineTotals, PolicyStats};

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::{KvError, SeqId};
use crate::layout::Geometry;
use crate::shape::KvShape;
use crate::store::KvStore;
use cache::PageCache;
use io::{Reader, Writer};
use reads::Reads;
use sequence::SeqState;

/// The emulated computational storage drive's attention engine over a [`KvStore`].
pub struct Engine {
    // Threads first: dropping them drains pending writes before the store goes.
    writer: Writer,
    reads: Reads,
    store: Arc<RwLock<KvStore>>,
    geo: Geometry,
    /// The model's KV shape (its head layout is [`KvShape::heads`]).
    shape: KvShape,
    cfg: EngineConfig,
    seqs: HashMap<SeqId, SeqState>,
    cache: PageCache,
    profile: AttendProfile,
    /// Counters of sequences already released.
    retired: EngineStats,
    retired_policy: PolicyStats,
}

impl Engine {
    /// Start an engine over `store` for a model whose KV has `shape` (the store's pages must
    /// hold that many layers, kv heads and values per head).
    pub fn new(store: KvStore, shape: KvShape, cfg: EngineConfig) -> Result<Engine, KvError> {
        let geo = *store.geometry();
        shape.validate()?;
        if !shape.matches(&geo.shape) {
            let s = geo.shape;
            return Err(KvError::InvalidShape(format!(
                "KV store shape {} layers × {} kv heads × {} head dim does not match the model's {} × {} × {}",
                s.layers, s.kv_heads, s.head_dim, shape.layers, shape.kv_heads, shape.head_dim
            )));
        }
        let layers = shape.layers;
        cfg.validate(layers)?;
        let store = Arc::new(RwLock::new(store));
        Ok(Engine {
            writer: Writer::start(store.clone()),
            reads: Reads::new(Reader::start(store.clone(), cfg.reader_threads)),
            store,
            geo,
            shape,
            cfg,
            seqs: HashMap::new(),
            cache: PageCache::new(cfg.cache_bytes),
            profile: AttendProfile::default(),
            retired: EngineStats::default(),
            retired_policy: PolicyStats::new(layers),
        })
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn layers(&self) -> usize {
        self.shape.layers
    }

    /// Run `f` on the store (after every pending write has landed).
    pub fn with_store<R>(&self, f: impl FnOnce(&KvStore) -> R) -> R {
        self.writer.barrier();
        let st = self.store.read().unwrap_or_else(|p| p.into_inner());
        f(&st)
    }

    /// Empty the RAM page cache (benchmarks start every run cold).
    pub fn clear_cache(&mut self) {
        self.cache = PageCache::new(self.cfg.cache_bytes);
    }
}
