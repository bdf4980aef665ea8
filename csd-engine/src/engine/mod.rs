//! The near-data attention engine: the drive's command interface (DESIGN §2).
//!
//! ```text
//! Engine::new(store, shape, policy)            config
//! append(seq, layer, k, v, q)                  prefill chunks and decode tokens
//! attend(layer, [(seq, q, first_pos, out)])    -> outputs, per-item errors
//! reclaim(seq) / persist(seq) / restore(seq)
//! ```
//!
//! K/V of every append go to a per-(sequence, layer) RAM stage at once and to flash through
//! the writer thread; the stage keeps tokens until their block is confirmed on flash, so an
//! attend never waits for a write. An attend picks each item's blocks by its mode, takes what
//! the page cache holds, sends the rest to the reader thread, computes attention over the
//! resident part (cache + stage) while the reads run, then over the pages read, and merges
//! the two by log-sum-exp. Every byte that crosses this interface and every byte read from
//! the device is counted, per sequence and in total.

mod cache;
pub mod config;
pub mod estimate;
mod io;
mod measure;
pub mod policy;
pub mod probe;
mod stats;
pub mod summary;

pub use config::{AttentionMode, EngineConfig, PageScore};
pub use policy::HeadProbe;
pub use stats::{EngineStats, PolicyStats, SHARP_SHARE};
pub use summary::LayerSummaries;

use half::f16;
use instinfer_kernels::attention::KvSegment;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::error::{KvError, SeqId};
use crate::layout::Geometry;
use crate::read::LayerRead;
use crate::shape::KvShape;
use crate::store::KvStore;
use cache::{BlockData, PageCache};
use estimate::{sketched_skipped_attention, skipped_attention};
use instinfer_kernels::multi_head::{attend_partial, merge_into, Heads};
use io::{ReadJob, Reader, SeqShared, Writer};
use measure::RecallProbe;
use policy::{block_masses, cut_off, layer_caps, DENSITY_EMA};
use probe::ActivationStats;

/// One sequence's share of an attend call.
pub struct AttendReq<'a> {
    pub seq: SeqId,
    /// `n × q_heads·head_dim` queries at positions `first_pos..first_pos+n`.
    pub q: &'a [f32],
    pub first_pos: usize,
    /// `n × q_heads·head_dim` outputs.
    pub out: &'a mut [f32],
}

/// Engine-wide figures beyond the per-sequence counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineTotals {
    /// Traffic counters, released sequences included.
    pub stats: EngineStats,
    /// Policy counters, released sequences included.
    pub policy: PolicyStats,
    pub cache_bytes_held: u64,
    pub cache_budget_bytes: u64,
    /// RAM held by page summaries and activation statistics.
    pub summary_bytes: u64,
    pub sequences: usize,
}

struct LayerState {
    /// Tokens appended.
    len: usize,
    /// Position of the first staged token (a block boundary).
    stage_first: usize,
    /// Per kv head, staged K and V rows (`tokens × head_dim`).
    stage_k: Vec<Vec<f16>>,
    stage_v: Vec<Vec<f16>>,
    summ: LayerSummaries,
    act: ActivationStats,
}

impl LayerState {
    /// The staged (not yet on flash) rows of kv head `head`, if any.
    fn stage_segment(&self, head: usize) -> Option<KvSegment<'_>> {
        (!self.stage_k[head].is_empty()).then(|| KvSegment {
            keys: &self.stage_k[head],
            values: &self.stage_v[head],
            first_pos: self.stage_first,
        })
    }
}

struct SeqState {
    mode: AttentionMode,
    capacity: usize,
    layers: Vec<LayerState>,
    shared: Arc<SeqShared>,
    /// Recent blocks needed per layer (information density), for sharing the step budget.
    density: Vec<f32>,
    caps: Vec<usize>,
    /// Blocks selected so far in the current decode step (all layers).
    step_selected: u64,
    stats: EngineStats,
    policy: PolicyStats,
    broken: Option<String>,
}

/// The emulated computational storage drive's attention engine over a [`KvStore`].
pub struct Engine {
    // Threads first: dropping them drains pending writes before the store goes.
    writer: Writer,
    reader: Reader,
    store: Arc<RwLock<KvStore>>,
    geo: Geometry,
    hd: Heads,
    cfg: EngineConfig,
    seqs: HashMap<SeqId, SeqState>,
    cache: PageCache,
    spare_reads: Vec<LayerRead>,
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
            reader: Reader::start(store.clone()),
            store,
            geo,
            hd: shape.heads(),
            cfg,
            seqs: HashMap::new(),
            cache: PageCache::new(cfg.cache_bytes),
            spare_reads: Vec::new(),
            retired: EngineStats::default(),
            retired_policy: PolicyStats::new(layers),
        })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    fn layers(&self) -> usize {
        self.geo.shape.layers as usize
    }

    /// Run `f` on the store (after every pending write has landed).
    pub fn with_store<R>(&self, f: impl FnOnce(&KvStore) -> R) -> R {
        self.writer.barrier();
        let st = self.store.read().unwrap_or_else(|p| p.into_inner());
        f(&st)
    }

    fn new_state(&self, mode: AttentionMode, capacity: usize) -> SeqState {
        let (h, d, layers) = (self.hd.kv_heads, self.hd.head_dim, self.layers());
        SeqState {
            mode,
            capacity,
            layers: (0..layers)
                .map(|_| LayerState {
                    len: 0,
                    stage_first: 0,
                    stage_k: vec![Vec::new(); h],
                    stage_v: vec![Vec::new(); h],
                    summ: LayerSummaries::with_runs(h, d, self.cfg.quest_runs)
                        .sketched(self.cfg.score == PageScore::Sketch),
                    act: ActivationStats::default(),
                })
                .collect(),
            shared: Arc::new(SeqShared::new(layers)),
            density: vec![1.0; layers],
            caps: vec![self.cfg.max_blocks; layers],
            step_selected: 0,
            stats: EngineStats::default(),
            policy: PolicyStats::new(layers),
            broken: None,
        }
    }

    /// Start an empty sequence.
    pub fn open(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
    ) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) || self.with_store(|s| s.info(seq).is_some()) {
            return Err(KvError::SequenceExists(seq));
        }
        let st = self.new_state(mode, capacity);
        self.seqs.insert(seq, st);
        Ok(())
    }

    /// Change how a sequence's decode attention reads its KV.
    pub fn set_mode(&mut self, seq: SeqId, mode: AttentionMode) -> Result<(), KvError> {
        self.state(seq)?.mode = mode;
        Ok(())
    }

    fn state(&mut self, seq: SeqId) -> Result<&mut SeqState, KvError> {
        self.seqs.get_mut(&seq).ok_or(KvError::UnknownSequence(seq))
    }

    /// Tokens a sequence holds (all layers).
    pub fn len(&self, seq: SeqId) -> Result<usize, KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        Ok(st.layers.iter().map(|l| l.len).min().unwrap_or(0))
    }

    pub fn capacity(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self
            .seqs
            .get(&seq)
            .ok_or(KvError::UnknownSequence(seq))?
            .capacity)
    }

    pub fn sequences(&self) -> Vec<SeqId> {
        let mut v: Vec<SeqId> = self.seqs.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Append `n` tokens' K and V (`n × kv_heads·head_dim`, token-major) of one layer, with
    /// their queries `q` (`n × q_heads·head_dim`) for the activation statistics.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        k: &[f32],
        v: &[f32],
        q: &[f32],
    ) -> Result<(), KvError> {
        let (hd, t) = (self.hd, self.geo.block_tokens());
        let (h, d) = (hd.kv_heads, hd.head_dim);
        let layers = self.layers();
        let st = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        check_usable(seq, st)?;
        let row = h * d;
        if layer >= layers || k.len() != v.len() || k.len() % row != 0 {
            return Err(KvError::BadInput(format!(
                "append to layer {layer} of sequence {seq} with {} K and {} V values (rows of {row})",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / row;
        if !q.is_empty() && q.len() != n * hd.q_dim() {
            return Err(KvError::BadInput(format!(
                "append to sequence {seq}: {} query values for {n} tokens",
                q.len()
            )));
        }
        let ls = &mut st.layers[layer];
        let before = ls.len;
        if ls.len + n > st.capacity {
            return Err(KvError::SequenceFull {
                needed: ls.len + n,
                capacity: st.capacity,
            });
        }
        let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        for tok in 0..n {
            for head in 0..h {
                let r = tok * row + head * d..tok * row + (head + 1) * d;
                ls.stage_k[head].extend_from_slice(&k16[r.clone()]);
                ls.stage_v[head].extend_from_slice(&v16[r]);
            }
        }
        ls.len += n;
        // Summarise blocks completed by this append (their keys are all still staged).
        while (ls.summ.blocks() + 1) * t <= ls.len {
            let b = ls.summ.blocks();
            let at = (b * t - ls.stage_first) * d;
            let (sk, sv) = (&ls.stage_k, &ls.stage_v);
            ls.summ.push_block(
                |head| &sk[head][at..at + t * d],
                |head| &sv[head][at..at + t * d],
            );
        }
        ls.act.observe(q, hd.q_dim());
        st.stats.boundary_bytes += ((k.len() + v.len() + q.len()) * 4) as u64;
        // An append that only fills the store's RAM tail is a copy: do it here rather than
        // wake the writer, unless earlier appends are still queued (order matters).
        let fills_block = before % t + n >= t;
        if !fills_block && st.shared.pending.load(std::sync::atomic::Ordering::Acquire) == 0 {
            let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
            io::apply_append(&mut store, seq, layer as u32, &k16, &v16, &st.shared);
            drop(store);
            if let Some(e) = st.shared.error() {
                return Err(KvError::SequenceBroken { seq, reason: e });
            }
        } else {
            self.writer
                .append(seq, layer as u32, k16, v16, st.shared.clone());
        }
        Ok(())
    }

    /// Attention of one layer for a batch of sequences. One result per item.
    pub fn attend(
        &mut self,
        layer: usize,
        items: &mut [AttendReq<'_>],
    ) -> Vec<Result<(), KvError>> {
        let _span = tracing::trace_span!("attend", layer, items = items.len()).entered();
        let mut results: Vec<Result<(), KvError>> = Vec::with_capacity(items.len());
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(items.len());
        let (reply, done) = crossbeam_channel::unbounded();
        let mut pending = 0usize;
        let preps: Vec<Result<Prep, KvError>> =
            items.iter().map(|it| self.prepare(layer, it)).collect();
        let mut picks = self.select(layer, items, &preps);
        for (i, (it, prep)) in items.iter().zip(preps).enumerate() {
            let planned = prep.and_then(|prep| self.plan(layer, it, &prep, picks[i].take()));
            match planned {
                Ok(mut p) => {
                    if !p.misses.is_empty() {
                        let buf = self.spare_reads.pop().unwrap_or_default();
                        self.reader.submit(
                            ReadJob {
                                item: i,
                                seq: it.seq,
                                layer: layer as u32,
                                blocks: std::mem::take(&mut p.misses),
                                buf,
                            },
                            &reply,
                        );
                        p.reading = true;
                        pending += 1;
                    }
                    plans.push(Some(p));
                    results.push(Ok(()));
                }
                Err(e) => {
                    plans.push(None);
                    results.push(Err(e));
                }
            }
        }
        // While the reads run: the estimates of the pages sparse steps skipped.
        let mut estimates = self.estimate(layer, items, &plans);
        if items.len() > 1 && !self.cfg.merge_partials {
            self.run_batch(
                layer,
                items,
                plans,
                estimates,
                &done,
                &mut pending,
                &mut results,
            );
            return results;
        }
        let mut arrived: Vec<Option<(Result<(), KvError>, LayerRead)>> =
            (0..items.len()).map(|_| None).collect();
        for (i, it) in items.iter_mut().enumerate() {
            let Some(plan) = plans[i].take() else {
                continue;
            };
            let est = estimates[i].take();
            let r = self.run_item(layer, i, it, plan, est, &done, &mut arrived, &mut pending);
            results[i] = r;
        }
        // Reads of items that failed early still come back; keep their buffers.
        while pending > 0 {
            match done.recv() {
                Ok((_, _, buf)) => self.spare_reads.push(buf),
                Err(_) => break,
            }
            pending -= 1;
        }
        results
    }

    /// Check one item against its sequence and bring the sequence's layer state up to date
    /// (staged rows now on flash dropped, the step's page caps set at layer 0).
    fn prepare(&mut self, layer: usize, it: &AttendReq<'_>) -> Result<Prep, KvError> {
        let (hd, t) = (self.hd, self.geo.block_tokens());
        let layers = self.layers();
        let cfg = self.cfg;
        let st = self
            .seqs
            .get_mut(&it.seq)
            .ok_or(KvError::UnknownSequence(it.seq))?;
        check_usable(it.seq, st)?;
        let qd = hd.q_dim();
        if layer >= layers || it.q.is_empty() || it.q.len() % qd != 0 || it.out.len() != it.q.len()
        {
            return Err(KvError::BadInput(format!(
                "attend on layer {layer} of sequence {} with {} query values",
                it.seq,
                it.q.len()
            )));
        }
        let n = it.q.len() / qd;
        let ls = &mut st.layers[layer];
        if it.first_pos + n > ls.len {
            return Err(KvError::BadInput(format!(
                "attend at positions {}..{} of sequence {}, which holds {} tokens in layer {layer}",
                it.first_pos,
                it.first_pos + n,
                it.seq,
                ls.len
            )));
        }
        // Drop staged rows whose block the writer has put on flash.
        let confirmed = st.shared.confirmed(layer) as usize;
        if confirmed * t > ls.stage_first {
            let drop_rows = (confirmed * t - ls.stage_first) * hd.head_dim;
            for head in 0..hd.kv_heads {
                ls.stage_k[head].drain(..drop_rows);
                ls.stage_v[head].drain(..drop_rows);
            }
            ls.stage_first = confirmed * t;
        }
        let on_flash = ls.stage_first / t;
        let mode = if n == 1 {
            st.mode
        } else {
            AttentionMode::Flexgen
        };
        if mode == AttentionMode::Sparse && layer == 0 {
            st.caps = layer_caps(
                cfg.step_budget_blocks,
                cfg.min_blocks,
                cfg.max_blocks,
                &st.density[cfg.dense_layers.min(layers)..],
            );
            st.caps
                .splice(0..0, std::iter::repeat_n(0, cfg.dense_layers.min(layers)));
            st.step_selected = 0;
        }
        Ok(Prep { n, on_flash, mode })
    }

    /// The sparse selections of the items that decode sparsely in this layer, computed in
    /// parallel (each item's scoring also splits its kv heads across the pool).
    fn select(
        &self,
        layer: usize,
        items: &[AttendReq<'_>],
        preps: &[Result<Prep, KvError>],
    ) -> Vec<Option<SparseSelection>> {
        let (hd, cfg, seqs) = (self.hd, &self.cfg, &self.seqs);
        let pick = |(it, prep): (&AttendReq<'_>, &Result<Prep, KvError>)| {
            let prep = prep.as_ref().ok()?;
            if prep.mode != AttentionMode::Sparse || layer < cfg.dense_layers {
                return None;
            }
            let st = seqs.get(&it.seq)?;
            let ls = &st.layers[layer];
            let probes = probes_for(hd, it.q, ls.act.probe(), cfg.probe_blend);
            Some(sparse_blocks(
                cfg,
                prep.on_flash,
                &ls.summ,
                &probes,
                st.caps[layer],
            ))
        };
        // One item is not split: rayon runs it on the calling thread.
        items.par_iter().zip(preps).map(pick).collect()
    }

    /// Per item whose plan skipped pages: the attention of its query over their summaries
    /// (output and log-sum-exp), computed in parallel.
    fn estimate(
        &self,
        layer: usize,
        items: &[AttendReq<'_>],
        plans: &[Option<Plan>],
    ) -> Vec<Option<(Vec<f32>, Vec<f32>)>> {
        let (hd, t, seqs) = (self.hd, self.geo.block_tokens(), &self.seqs);
        let one = |(it, plan): (&AttendReq<'_>, &Option<Plan>)| {
            let plan = plan.as_ref().filter(|p| !p.skipped.is_empty())?;
            let ls = &seqs.get(&it.seq)?.layers[layer];
            let mut o = vec![0.0f32; it.out.len()];
            let mut lse = vec![0.0f32; plan.n * hd.q_heads];
            match &plan.logits {
                Some(l) => {
                    sketched_skipped_attention(hd, l, &ls.summ, &plan.skipped, &mut o, &mut lse)
                }
                None => skipped_attention(hd, it.q, &ls.summ, &plan.skipped, t, &mut o, &mut lse),
            }
            Some((o, lse))
        };
        // One item is not split: rayon runs it on the calling thread.
        items.par_iter().zip(plans).map(one).collect()
    }

    /// Decide what one item reads: cache hits, blocks to read, and the staged tail.
    fn plan(
        &mut self,
        layer: usize,
        it: &AttendReq<'_>,
        prep: &Prep,
        sel: Option<SparseSelection>,
    ) -> Result<Plan, KvError> {
        let cfg = self.cfg;
        let st = self
            .seqs
            .get_mut(&it.seq)
            .ok_or(KvError::UnknownSequence(it.seq))?;
        let (on_flash, mode) = (prep.on_flash, prep.mode);
        let decode = prep.n == 1;
        let mut recall_rest = None;
        let mut skipped = Vec::new();
        let mut logits = None;
        let blocks: Vec<u32> = match sel {
            None => (0..on_flash as u32).collect(),
            Some(sel) => {
                if let Some(c) = &sel.choice {
                    // The layer's need as measured, not clamped to `max_blocks`: at long
                    // contexts most layers need more than the cap, and clamped needs would
                    // all be equal, sharing the budget evenly whatever the layers' density.
                    // `layer_caps` still bounds every cap by `max_blocks`.
                    let needed = c.needed.max(cfg.min_blocks);
                    st.density[layer] =
                        (1.0 - DENSITY_EMA) * st.density[layer] + DENSITY_EMA * needed as f32;
                    st.policy.selected_blocks[layer] += c.blocks.len() as u64;
                    st.policy.candidate_blocks[layer] += sel.candidates.len() as u64;
                    st.step_selected += c.blocks.len() as u64;
                    st.policy.max_step_selected = st.policy.max_step_selected.max(st.step_selected);
                }
                if cfg.estimate_skipped {
                    skipped = (0..on_flash as u32)
                        .filter(|b| sel.blocks.binary_search(b).is_err())
                        .collect();
                    logits = sel.logits;
                }
                if cfg.measure_recall {
                    recall_rest = Some(RecallProbe {
                        attended: sel.blocks.clone(),
                        on_flash,
                        candidates: sel.candidates.clone(),
                    });
                }
                sel.blocks
            }
        };
        if decode {
            if layer == 0 {
                st.policy.decode_steps += 1;
            }
            st.policy.attended_blocks[layer] += blocks.len() as u64;
        }
        st.stats.boundary_bytes += (it.q.len() * 2 * 4) as u64;
        let use_cache = decode && mode != AttentionMode::Flexgen;
        let mut hits = Vec::new();
        let mut misses = Vec::new();
        for b in blocks {
            if use_cache {
                st.stats.cache_lookups += 1;
                if let Some(data) = self.cache.get((it.seq, layer as u32, b)) {
                    st.stats.cache_hits += 1;
                    hits.push((b, data));
                    continue;
                }
            }
            misses.push(b);
        }
        Ok(Plan {
            hits,
            misses,
            reading: false,
            cache_fill: use_cache,
            n: prep.n,
            recall_rest,
            skipped,
            logits,
        })
    }

    /// Compute one item: the resident part now, the part being read when it arrives, merged.
    #[allow(clippy::too_many_arguments)]
    fn run_item(
        &mut self,
        layer: usize,
        index: usize,
        it: &mut AttendReq<'_>,
        plan: Plan,
        estimate: Option<(Vec<f32>, Vec<f32>)>,
        done: &crossbeam_channel::Receiver<io::ReadDone>,
        arrived: &mut [Option<(Result<(), KvError>, LayerRead)>],
        pending: &mut usize,
    ) -> Result<(), KvError> {
        let (hd, t) = (self.hd, self.geo.block_tokens());
        let mut lse = vec![0.0f32; plan.n * hd.q_heads];
        // By default an item waits for its pages and runs one softmax over everything in
        // position order: bit-identical to attention in RAM (the reads of later items still
        // overlap this item's compute). With `merge_partials`, a decode token attends over
        // what is resident while its pages are read and merges the two by log-sum-exp:
        // equal up to rounding, which the model's logits feel (see docs/ARCHITECTURE.md).
        let exact = plan.n > 1 || !self.cfg.merge_partials;
        let early = if plan.reading && exact {
            let (r, buf) = wait_read(index, arrived, done, pending)?;
            if let Err(e) = r {
                self.spare_reads.push(buf);
                return Err(e);
            }
            Some(buf)
        } else {
            None
        };
        let ls = &self.seqs[&it.seq].layers[layer];
        resident_attention(hd, t, ls, it, &plan, early.as_ref(), &mut lse);
        if let Some(buf) = early {
            self.finish_read(layer, it.seq, &plan, buf);
        } else if plan.reading {
            self.merge_read(layer, index, it, &plan, &mut lse, done, arrived, pending)?;
        }
        if let Some((o2, lse2)) = estimate {
            merge_into(hd, it.out, &mut lse, &o2, &lse2);
        }
        if let Some(rest) = &plan.recall_rest {
            self.record_recall(layer, it, rest)?;
        }
        Ok(())
    }

    /// The exact path for a batch: each item's attention runs on the pool as soon as its
    /// pages are in (items without reads at once), so items compute on every core while the
    /// reads of later items are in flight. Results equal the one-item path bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn run_batch(
        &mut self,
        layer: usize,
        items: &mut [AttendReq<'_>],
        plans: Vec<Option<Plan>>,
        estimates: Vec<Option<(Vec<f32>, Vec<f32>)>>,
        done: &crossbeam_channel::Receiver<io::ReadDone>,
        pending: &mut usize,
        results: &mut [Result<(), KvError>],
    ) {
        type Done = (usize, Plan, Option<LayerRead>, Result<(), KvError>);
        let (hd, t, seqs) = (self.hd, self.geo.block_tokens(), &self.seqs);
        let (tx, rx) = crossbeam_channel::unbounded::<Done>();
        let mut stray = Vec::new();
        let mut work: Vec<_> = items
            .iter_mut()
            .zip(plans)
            .zip(estimates)
            .map(|((it, plan), est)| plan.map(|p| (it, p, est)))
            .collect();
        rayon::scope(|s| {
            let spawn = |i, w, read: Option<(Result<(), KvError>, LayerRead)>| {
                let tx = tx.clone();
                s.spawn(move |_| {
                    let (it, plan, est): (&mut AttendReq<'_>, Plan, _) = w;
                    let (r, buf) = match read {
                        Some((r, buf)) => (r, Some(buf)),
                        None => (Ok(()), None),
                    };
                    let r = r.and_then(|()| {
                        let st = seqs.get(&it.seq).ok_or(KvError::UnknownSequence(it.seq))?;
                        item_attention(hd, t, &st.layers[layer], it, &plan, buf.as_ref(), est);
                        Ok(())
                    });
                    // The receiver outlives the scope.
                    let _ = tx.send((i, plan, buf, r));
                });
            };
            for (i, w) in work.iter_mut().enumerate() {
                if w.as_ref().is_some_and(|(_, p, _)| !p.reading) {
                    spawn(i, w.take().expect("checked"), None);
                }
            }
            while *pending > 0 {
                let Ok((i, r, buf)) = done.recv() else { break };
                *pending -= 1;
                match work[i].take() {
                    Some(w) => spawn(i, w, Some((r, buf))),
                    None => stray.push(buf),
                }
            }
        });
        let stopped: Vec<usize> = (0..work.len()).filter(|&i| work[i].is_some()).collect();
        drop(work);
        drop(tx);
        self.spare_reads.append(&mut stray);
        for i in stopped {
            results[i] = Err(KvError::ReaderStopped);
        }
        let mut finished: Vec<Done> = rx.try_iter().collect();
        finished.sort_by_key(|d| d.0);
        for (i, plan, buf, r) in finished {
            let seq = items[i].seq;
            match (buf, &r) {
                (Some(buf), Ok(())) => self.finish_read(layer, seq, &plan, buf),
                (Some(buf), Err(_)) => self.spare_reads.push(buf),
                (None, _) => {}
            }
            results[i] = r.and_then(|()| match &plan.recall_rest {
                Some(rest) => self.record_recall(layer, &items[i], rest),
                None => Ok(()),
            });
        }
    }

    /// Wait for the item's page read, attend over those pages and merge into `it.out`.
    #[allow(clippy::too_many_arguments)]
    fn merge_read(
        &mut self,
        layer: usize,
        index: usize,
        it: &mut AttendReq<'_>,
        plan: &Plan,
        lse: &mut [f32],
        done: &crossbeam_channel::Receiver<io::ReadDone>,
        arrived: &mut [Option<(Result<(), KvError>, LayerRead)>],
        pending: &mut usize,
    ) -> Result<(), KvError> {
        let hd = self.hd;
        let (r, buf) = wait_read(index, arrived, done, pending)?;
        if let Err(e) = r {
            // A failed read changes nothing stored; the caller ends this request only.
            self.spare_reads.push(buf);
            return Err(e);
        }
        {
            let segs: Vec<Vec<KvSegment<'_>>> = (0..hd.kv_heads)
                .map(|head| block_segments(&buf, head))
                .collect();
            let mut o2 = vec![0.0f32; it.out.len()];
            let mut lse2 = vec![0.0f32; lse.len()];
            attend_partial(hd, it.q, it.first_pos, &segs, &mut o2, &mut lse2);
            merge_into(hd, it.out, lse, &o2, &lse2);
        }
        self.finish_read(layer, it.seq, plan, buf);
        Ok(())
    }

    /// Count a completed read, keep its pages in the cache if the plan says so, and keep the
    /// buffer for the next read.
    fn finish_read(&mut self, layer: usize, seq: SeqId, plan: &Plan, buf: LayerRead) {
        let (h, kd) = (self.hd.kv_heads, self.geo.block_tokens() * self.hd.head_dim);
        if plan.cache_fill {
            for i in 0..buf.len() {
                let key = (seq, layer as u32, buf.blocks()[i]);
                if !self.cache.admit(key, (h * 2 * kd * 2) as u64) {
                    continue;
                }
                let mut data = Vec::with_capacity(h * 2 * kd);
                for head in 0..h {
                    data.extend_from_slice(&buf.keys(i, head)[..kd]);
                    data.extend_from_slice(&buf.values(i, head)[..kd]);
                }
                self.cache.insert(key, BlockData::new(data));
            }
        }
        if let Some(st) = self.seqs.get_mut(&seq) {
            st.stats.device_bytes_read += (buf.len() * self.geo.unit_bytes) as u64;
        }
        self.spare_reads.push(buf);
    }

    /// Forget everything of `seq` after its first `len` tokens. The store only appends, so
    /// anything but a no-op leaves the sequence unusable until it is reclaimed.
    pub fn truncate(&mut self, seq: SeqId, len: usize) {
        if let Some(st) = self.seqs.get_mut(&seq) {
            if st.layers.iter().any(|l| l.len != len) {
                st.broken = Some(format!(
                    "sequence {seq} lost its state after a failed step; release it and start again"
                ));
            }
        }
    }

    /// Free a sequence's pages and state at once (persisted state included).
    pub fn reclaim(&mut self, seq: SeqId) -> Result<(), KvError> {
        let known = self.seqs.remove(&seq);
        self.writer.barrier();
        self.cache.forget_seq(seq);
        let r = {
            let mut st = self.store.write().unwrap_or_else(|p| p.into_inner());
            if st.info(seq).is_some() {
                st.reclaim(seq)
            } else if known.is_some() {
                Ok(())
            } else {
                Err(KvError::UnknownSequence(seq))
            }
        };
        if let Some(k) = known {
            self.retired.add(&k.stats);
            self.retired_policy.add(&k.policy);
        }
        r
    }

    /// Make `seq` as it is now survive a restart.
    pub fn persist(&mut self, seq: SeqId) -> Result<(), KvError> {
        let st = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        check_usable(seq, st)?;
        self.writer.barrier();
        if let Some(e) = st.shared.error() {
            return Err(KvError::SequenceBroken { seq, reason: e });
        }
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        store.persist(seq)
    }

    /// Take up a sequence the store restored at open: its summaries are rebuilt from its
    /// pages (one sequential read per layer). Returns the tokens it holds.
    pub fn restore(
        &mut self,
        seq: SeqId,
        mode: AttentionMode,
        capacity: usize,
    ) -> Result<usize, KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::SequenceExists(seq));
        }
        self.writer.barrier();
        let mut st = self.new_state(mode, capacity);
        let (h, d, t) = (self.hd.kv_heads, self.hd.head_dim, self.geo.block_tokens());
        {
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            let info = store.restore(seq)?;
            let mut buf = LayerRead::new();
            for (layer, ls) in st.layers.iter_mut().enumerate() {
                store.read_layer(seq, layer as u32, &mut buf)?;
                for i in 0..buf.len() {
                    ls.summ.push_block(
                        |head| &buf.keys(i, head)[..t * d],
                        |head| &buf.values(i, head)[..t * d],
                    );
                }
                ls.len = info.tokens[layer];
                ls.stage_first = buf.tail_first_pos();
                for head in 0..h {
                    ls.stage_k[head] = buf.tail_keys(head).to_vec();
                    ls.stage_v[head] = buf.tail_values(head).to_vec();
                }
                st.shared.confirmed[layer]
                    .store(buf.len() as u32, std::sync::atomic::Ordering::Release);
            }
        }
        let tokens = st.layers.iter().map(|l| l.len).min().unwrap_or(0);
        if tokens > capacity {
            return Err(KvError::SequenceFull {
                needed: tokens,
                capacity,
            });
        }
        self.seqs.insert(seq, st);
        Ok(tokens)
    }

    /// Copy sequence `src` (pages, tail, summaries, statistics) to a new sequence `dst`.
    pub fn clone_seq(
        &mut self,
        src: SeqId,
        dst: SeqId,
        mode: AttentionMode,
    ) -> Result<(), KvError> {
        if self.seqs.contains_key(&dst) {
            return Err(KvError::SequenceExists(dst));
        }
        let s = self.seqs.get(&src).ok_or(KvError::UnknownSequence(src))?;
        check_usable(src, s)?;
        self.writer.barrier();
        let mut st = self.new_state(mode, s.capacity);
        let (h, d) = (self.hd.kv_heads, self.hd.head_dim);
        let mut store = self.store.write().unwrap_or_else(|p| p.into_inner());
        let mut buf = LayerRead::new();
        let mut result = Ok(());
        for layer in 0..self.layers() {
            if let Err(e) = store.read_layer(src, layer as u32, &mut buf) {
                result = Err(e);
                break;
            }
            let (k, v) = token_major(&buf, h, d);
            if let Err(e) = store.append(dst, layer as u32, &k, &v) {
                result = Err(e);
                break;
            }
            let full = store.full_blocks(dst, layer as u32).unwrap_or(0);
            let sl = &s.layers[layer];
            let dl = &mut st.layers[layer];
            dl.len = sl.len;
            dl.summ = sl.summ.clone();
            dl.act = sl.act.clone();
            dl.stage_first = full as usize * self.geo.block_tokens();
            for head in 0..h {
                dl.stage_k[head] = buf.tail_keys(head).to_vec();
                dl.stage_v[head] = buf.tail_values(head).to_vec();
            }
            st.shared.confirmed[layer].store(full, std::sync::atomic::Ordering::Release);
        }
        if let Err(e) = result {
            if store.info(dst).is_some() {
                let _ = store.reclaim(dst);
            }
            return Err(e);
        }
        st.density = s.density.clone();
        drop(store);
        self.seqs.insert(dst, st);
        Ok(())
    }

    /// Empty the RAM page cache (benchmarks start every run cold).
    pub fn clear_cache(&mut self) {
        self.cache = PageCache::new(self.cfg.cache_bytes);
    }

    /// Counters of one open sequence.
    pub fn seq_stats(&self, seq: SeqId) -> Option<EngineStats> {
        self.seqs.get(&seq).map(|s| s.stats)
    }

    /// What the sparse policy did for one open sequence.
    pub fn seq_policy_stats(&self, seq: SeqId) -> Option<&PolicyStats> {
        self.seqs.get(&seq).map(|s| &s.policy)
    }

    /// Engine-wide counters and RAM use.
    pub fn totals(&self) -> EngineTotals {
        let mut stats = self.retired;
        let mut policy = self.retired_policy.clone();
        let mut summary_bytes = 0u64;
        for s in self.seqs.values() {
            stats.add(&s.stats);
            policy.add(&s.policy);
            for l in &s.layers {
                summary_bytes += (l.summ.bytes() + l.act.bytes()) as u64;
            }
        }
        let c = self
            .store
            .read()
            .map(|s| s.counters())
            .unwrap_or_else(|p| p.into_inner().counters());
        stats.device_bytes_written = c.bytes_written;
        EngineTotals {
            stats,
            policy,
            cache_bytes_held: self.cache.held_bytes(),
            cache_budget_bytes: self.cache.budget_bytes(),
            summary_bytes,
            sequences: self.seqs.len(),
        }
    }
}

/// What one item of an attend call reads.
/// One item checked against its sequence: its query count, the blocks on flash and the
/// mode it attends in (prompt chunks always attend every page).
struct Prep {
    n: usize,
    on_flash: usize,
    mode: AttentionMode,
}

struct Plan {
    hits: Vec<(u32, BlockData)>,
    misses: Vec<u32>,
    reading: bool,
    cache_fill: bool,
    n: usize,
    /// With `measure_recall`: what the step attended, for the quality measurement.
    recall_rest: Option<RecallProbe>,
    /// With `estimate_skipped`: the blocks a sparse step skipped, estimated from summaries.
    skipped: Vec<u32>,
    /// The selection's per-head block logits (see [`SparseSelection::logits`]), if any.
    logits: Option<Vec<f32>>,
}

fn check_usable(seq: SeqId, st: &SeqState) -> Result<(), KvError> {
    if let Some(b) = &st.broken {
        return Err(KvError::SequenceBroken {
            seq,
            reason: b.clone(),
        });
    }
    if let Some(e) = st.shared.error() {
        return Err(KvError::SequenceBroken { seq, reason: e });
    }
    Ok(())
}

/// Wait for item `index`'s read, parking other items' results that arrive first.
fn wait_read(
    index: usize,
    arrived: &mut [Option<(Result<(), KvError>, LayerRead)>],
    done: &crossbeam_channel::Receiver<io::ReadDone>,
    pending: &mut usize,
) -> Result<(Result<(), KvError>, LayerRead), KvError> {
    loop {
        if let Some(slot) = arrived[index].take() {
            return Ok(slot);
        }
        let (i, r, buf) = done
            .recv()
            .map_err(|_| KvError::BadInput("the engine's reader has stopped".into()))?;
        *pending -= 1;
        arrived[i] = Some((r, buf));
    }
}

/// Exact attention of one item over its cache hits, its pages `read` (if any) and its staged
/// rows, in position order: writes `it.out` and `lse`.
fn resident_attention(
    hd: Heads,
    t: usize,
    ls: &LayerState,
    it: &mut AttendReq<'_>,
    plan: &Plan,
    read: Option<&LayerRead>,
    lse: &mut [f32],
) {
    let kd = t * hd.head_dim;
    let segs: Vec<Vec<KvSegment<'_>>> = (0..hd.kv_heads)
        .map(|head| {
            let mut v: Vec<KvSegment<'_>> = read.map_or_else(Vec::new, |b| block_segments(b, head));
            v.extend(plan.hits.iter().map(|(b, data)| KvSegment {
                keys: &data[head * 2 * kd..head * 2 * kd + kd],
                values: &data[head * 2 * kd + kd..(head + 1) * 2 * kd],
                first_pos: *b as usize * t,
            }));
            v.sort_by_key(|s| s.first_pos);
            v.extend(ls.stage_segment(head));
            v
        })
        .collect();
    attend_partial(hd, it.q, it.first_pos, &segs, it.out, lse);
}

/// One item's whole exact attention: [`resident_attention`] over everything it attends, with
/// the estimate of its skipped pages merged in.
fn item_attention(
    hd: Heads,
    t: usize,
    ls: &LayerState,
    it: &mut AttendReq<'_>,
    plan: &Plan,
    read: Option<&LayerRead>,
    estimate: Option<(Vec<f32>, Vec<f32>)>,
) {
    let mut lse = vec![0.0f32; plan.n * hd.q_heads];
    resident_attention(hd, t, ls, it, plan, read, &mut lse);
    if let Some((o2, lse2)) = estimate {
        merge_into(hd, it.out, &mut lse, &o2, &lse2);
    }
}

fn block_segments(buf: &LayerRead, head: usize) -> Vec<KvSegment<'_>> {
    (0..buf.len())
        .map(|i| KvSegment {
            keys: buf.keys(i, head),
            values: buf.values(i, head),
            first_pos: buf.first_pos(i),
        })
        .collect()
}

/// The blocks and tail of a read, token-major (`tokens × kv_heads × head_dim`) as appends
/// take them.
fn token_major(buf: &LayerRead, h: usize, d: usize) -> (Vec<f16>, Vec<f16>) {
    let mut rows_k: Vec<Vec<&[f16]>> = vec![Vec::new(); h];
    let mut rows_v: Vec<Vec<&[f16]>> = vec![Vec::new(); h];
    for head in 0..h {
        for i in 0..buf.len() {
            rows_k[head].extend(buf.keys(i, head).chunks_exact(d));
            rows_v[head].extend(buf.values(i, head).chunks_exact(d));
        }
        rows_k[head].extend(buf.tail_keys(head).chunks_exact(d));
        rows_v[head].extend(buf.tail_values(head).chunks_exact(d));
    }
    let n = rows_k[0].len();
    let (mut k, mut v) = (Vec::with_capacity(n * h * d), Vec::with_capacity(n * h * d));
    for tok in 0..n {
        for head in 0..h {
            k.extend_from_slice(rows_k[head][tok]);
            v.extend_from_slice(rows_v[head][tok]);
        }
    }
    (k, v)
}

/// The blocks a sparse decode step of one layer attends on flash.
pub struct SparseSelection {
    /// Sinks, chosen candidates and the recent window, ascending.
    pub blocks: Vec<u32>,
    /// Blocks between the sinks and the recent window (the ones the policy chose among).
    pub candidates: std::ops::Range<usize>,
    /// The cut-off's choice among the candidates (none when there were none).
    pub choice: Option<policy::Choice>,
    /// With key sketches and probes equal to the query heads: every query head's log-mass
    /// of every block (`q_heads × blocks`), from which skipped blocks are estimated.
    pub logits: Option<Vec<f32>>,
}

/// Sinks and the recent window always; between them, what the cut-off keeps (at most `cap`).
pub fn sparse_blocks(
    cfg: &EngineConfig,
    on_flash: usize,
    summ: &LayerSummaries,
    probes: &[HeadProbe],
    cap: usize,
) -> SparseSelection {
    let sinks = cfg.sink_blocks.min(on_flash);
    let recent0 = on_flash.saturating_sub(cfg.recent_blocks).max(sinks);
    let cand: Vec<u32> = (sinks as u32..recent0 as u32).collect();
    let mut blocks: Vec<u32> = (0..sinks as u32).collect();
    let mut choice = None;
    let mut logits = None;
    if !cand.is_empty() {
        let d = probes.first().map_or(1, |p| p.p.len());
        let scale = 1.0 / (d as f32).sqrt();
        let est = block_masses(
            summ,
            on_flash,
            sinks..recent0,
            probes,
            scale,
            cfg.score,
            cfg.head_top_blocks,
        );
        let fixed: f32 = est.mean[..sinks].iter().chain(&est.mean[recent0..]).sum();
        let first: Vec<usize> = est.tops.iter().map(|&b| b as usize - sinks).collect();
        let c = cut_off(
            &cand,
            &est.mean[sinks..recent0],
            &first,
            fixed,
            cfg.target_mass,
            cfg.min_blocks,
            cap,
        );
        blocks.extend_from_slice(&c.blocks);
        choice = Some(c);
        // Blended probes are not the query: their logits do not estimate its attention.
        logits = est.logits.filter(|_| cfg.probe_blend == 0.0);
    }
    blocks.extend(recent0 as u32..on_flash as u32);
    SparseSelection {
        blocks,
        candidates: sinks..recent0,
        choice,
        logits,
    }
}

/// The probes of one decode query: every query head scores the pages of its kv head (a
/// retrieval head's sharp query is not averaged away by the other heads of its group),
/// optionally blended with the layer's activation-aware prefill probe for that head
/// (rescaled to the query's norm, so the blend turns the direction, not the temperature).
fn probes_for(hd: Heads, q: &[f32], prefill: Option<&[f32]>, blend: f32) -> Vec<HeadProbe> {
    let (d, g) = (hd.head_dim, hd.group());
    (0..hd.q_heads)
        .map(|head| {
            let mut p = q[head * d..(head + 1) * d].to_vec();
            if let Some(pre) = prefill.filter(|_| blend > 0.0) {
                let r = &pre[head * d..(head + 1) * d];
                let (nq, nr) = (norm(&p), norm(r));
                if nr > 0.0 {
                    for (a, b) in p.iter_mut().zip(r) {
                        *a = (1.0 - blend) * *a + blend * b * nq / nr;
                    }
                }
            }
            HeadProbe::new(head / g, p)
        })
        .collect()
}

fn norm(x: &[f32]) -> f32 {
    x.iter().map(|v| v * v).sum::<f32>().sqrt()
}
