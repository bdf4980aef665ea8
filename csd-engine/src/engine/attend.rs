//! The attend pipeline: check each item against its sequence, select a sparse step's pages,
//! plan what comes from the page cache and what is read, estimate the skipped pages while
//! the reads run, then compute each item (one softmax over everything by default, or the
//! resident part first and the read part merged in) and keep what was read in the cache.

use instinfer_kernels::attention::KvSegment;
use instinfer_kernels::multi_head::{attend_partial, merge_into};
use rayon::prelude::*;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use super::cache::BlockData;
use super::estimate::{sketched_skipped_attention, skipped_attention};
use super::item::{block_segments, item_attention, resident_attention};
use super::measure::RecallProbe;
use super::policy::{layer_caps, DENSITY_EMA};
use super::reads::{Ahead, Arrived};
use super::select::{probes_for, sparse_blocks, SparseSelection};
use super::sequence::check_usable;
use super::{AttentionMode, Engine};
use crate::error::{KvError, SeqId};
use crate::read::LayerRead;

/// One sequence's share of an attend call.
pub struct AttendReq<'a> {
    /// The sequence attended.
    pub seq: SeqId,
    /// `n × q_heads·head_dim` queries at positions `first_pos..first_pos+n`.
    pub q: &'a [f32],
    /// Position of the first query (each query attends to the positions up to its own).
    pub first_pos: usize,
    /// `n × q_heads·head_dim` outputs.
    pub out: &'a mut [f32],
}

impl Engine {
    /// Attention of one layer for a batch of sequences. One result per item.
    pub fn attend(
        &mut self,
        layer: usize,
        items: &mut [AttendReq<'_>],
    ) -> Vec<Result<(), KvError>> {
        let _span = tracing::trace_span!("attend", layer, items = items.len()).entered();
        let t0 = Instant::now();
        let mut results: Vec<Result<(), KvError>> = Vec::with_capacity(items.len());
        let mut plans: Vec<Option<Plan>> = Vec::with_capacity(items.len());
        let preps: Vec<Result<Prep, KvError>> =
            items.iter().map(|it| self.prepare(layer, it)).collect();
        let t_select = Instant::now();
        let mut picks = self.select(layer, items, &preps);
        self.profile.select_ns += t_select.elapsed().as_nanos() as u64;
        for (i, (it, prep)) in items.iter().zip(preps).enumerate() {
            let planned = prep.and_then(|prep| self.plan(layer, it, prep, picks[i].take()));
            match planned {
                Ok(mut p) => {
                    if p.read.is_none() && !p.misses.is_empty() {
                        let blocks = std::mem::take(&mut p.misses);
                        p.read = Some(self.reads.submit(it.seq, layer as u32, blocks));
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
        self.read_ahead(layer, items, &plans);
        let issued: Vec<u64> = plans.iter().flatten().filter_map(|p| p.read).collect();
        // While the reads run: the estimates of the pages sparse steps skipped.
        let t_estimate = Instant::now();
        let mut estimates = self.estimate(layer, items, &plans);
        self.profile.estimate_ns += t_estimate.elapsed().as_nanos() as u64;
        if items.len() > 1 && !self.cfg.merge_partials {
            self.run_batch(layer, items, plans, estimates, &mut results);
        } else {
            for (i, it) in items.iter_mut().enumerate() {
                let Some(plan) = plans[i].take() else {
                    continue;
                };
                let est = estimates[i].take();
                results[i] = self.run_item(layer, it, plan, est);
            }
        }
        // Reads of items that failed before using them: their buffers come back for reuse.
        for id in issued {
            self.reads.abandon(id);
        }
        self.profile.calls += 1;
        self.profile.total_ns += t0.elapsed().as_nanos() as u64;
        results
    }

    /// Queue, for every item that decodes over all its pages, the reads of its next
    /// `readahead_layers` layers (past the last layer: the next step's first layers). In
    /// `full` mode the pages the cache holds are left to it.
    fn read_ahead(&mut self, layer: usize, items: &[AttendReq<'_>], plans: &[Option<Plan>]) {
        let layers = self.layers();
        let depth = self.cfg.readahead_layers.min(layers - 1);
        let unit = self.geo.unit_bytes as u64;
        for (it, plan) in items.iter().zip(plans) {
            let Some(plan) = plan.as_ref().filter(|p| p.reads_all && p.n == 1) else {
                continue;
            };
            let Some(st) = self.seqs.get(&it.seq) else {
                continue;
            };
            for k in 1..=depth {
                let l = ((layer + k) % layers) as u32;
                if self.reads.has_ahead(it.seq, l) {
                    continue;
                }
                let blocks = st.shared.confirmed(l as usize);
                let cached: Vec<u32> = if plan.cache_fill {
                    (0..blocks)
                        .filter(|&b| self.cache.holds((it.seq, l, b)))
                        .collect()
                } else {
                    Vec::new()
                };
                let budget = self.cfg.readahead_bytes;
                self.reads
                    .read_ahead(it.seq, l, (blocks, cached), unit, budget);
            }
        }
    }

    /// Check one item against its sequence and bring the sequence's layer state up to date
    /// (staged rows now on flash dropped, the step's page caps set at layer 0).
    fn prepare(&mut self, layer: usize, it: &AttendReq<'_>) -> Result<Prep, KvError> {
        let (hd, t) = (self.shape.heads(), self.geo.block_tokens());
        let layers = self.layers();
        let cfg = self.cfg;
        let st = self
            .seqs
            .get_mut(&it.seq)
            .ok_or(KvError::UnknownSequence(it.seq))?;
        check_usable(it.seq, st)?;
        if it.q.is_empty() {
            return Err(KvError::BadInput(format!(
                "attend on sequence {} with no queries",
                it.seq
            )));
        }
        self.shape.check_attend(layer, it.q, it.out)?;
        let n = it.q.len() / hd.q_dim();
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
        let mode = if n == 1 {
            st.mode
        } else {
            AttentionMode::Flexgen
        };
        // A decode step over all pages uses the layer's read-ahead if one was queued since
        // this layer last attended; blocks confirmed after it was queued stay staged.
        let mut confirmed = st.shared.confirmed(layer) as usize;
        let ahead = match self.reads.take_ahead(it.seq, layer as u32) {
            Some(a)
                if n == 1
                    && mode != AttentionMode::Sparse
                    && a.blocks as usize * t >= ls.stage_first =>
            {
                confirmed = confirmed.min(a.blocks as usize);
                Some(a)
            }
            Some(a) => {
                self.reads.abandon(a.id);
                None
            }
            None => None,
        };
        // A prompt chunk keeps the prompt's rows staged (within `prefill_stage_bytes`), so
        // each chunk attends to the chunks before it in RAM instead of reading back what
        // they just wrote; the first decode step drops them.
        let staged_bytes = ((ls.len - ls.stage_first) * hd.kv_heads * hd.head_dim * 4) as u64;
        if n > 1 && staged_bytes * layers as u64 <= cfg.prefill_stage_bytes {
            confirmed = ls.stage_first / t;
        }
        // Drop staged rows whose block the writer has put on flash.
        if confirmed * t > ls.stage_first {
            let drop_rows = (confirmed * t - ls.stage_first) * hd.head_dim;
            for head in 0..hd.kv_heads {
                ls.stage_k[head].drain(..drop_rows);
                ls.stage_v[head].drain(..drop_rows);
            }
            ls.stage_first = confirmed * t;
        }
        let on_flash = ls.stage_first / t;
        if let Some(a) = &ahead {
            debug_assert_eq!(
                on_flash, a.blocks as usize,
                "a read-ahead covers the blocks on flash"
            );
        }
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
        Ok(Prep {
            n,
            on_flash,
            mode,
            ahead,
        })
    }

    /// The sparse selections of the items that decode sparsely in this layer, computed in
    /// parallel (each item's scoring also splits its kv heads across the pool).
    fn select(
        &self,
        layer: usize,
        items: &[AttendReq<'_>],
        preps: &[Result<Prep, KvError>],
    ) -> Vec<Option<SparseSelection>> {
        let (hd, cfg, seqs) = (self.shape.heads(), &self.cfg, &self.seqs);
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
        let (hd, t, seqs) = (self.shape.heads(), self.geo.block_tokens(), &self.seqs);
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
        prep: Prep,
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
        let reads_all = mode != AttentionMode::Sparse;
        let use_cache = decode && mode != AttentionMode::Flexgen;
        // Every block on flash comes from the read-ahead, but those it left to the cache;
        // if the cache dropped one of them since, the read-ahead is not used.
        let ahead = prep.ahead.and_then(|a| {
            let hits: Vec<(u32, BlockData)> = a
                .cached
                .iter()
                .map_while(|&b| Some((b, self.cache.get((it.seq, layer as u32, b))?)))
                .collect();
            if hits.len() == a.cached.len() {
                return Some((hits, a.id));
            }
            self.reads.abandon(a.id);
            None
        });
        let (hits, misses, read) = match ahead {
            Some((hits, id)) => {
                st.stats.cache_lookups += blocks.len() as u64;
                st.stats.cache_hits += hits.len() as u64;
                self.profile.readahead_used += 1;
                (hits, Vec::new(), Some(id))
            }
            None => {
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
                (hits, misses, None)
            }
        };
        Ok(Plan {
            hits,
            misses,
            read,
            cache_fill: use_cache,
            reads_all,
            n: prep.n,
            recall_rest,
            skipped,
            logits,
        })
    }

    /// Compute one item: the resident part now, the part being read when it arrives, merged.
    fn run_item(
        &mut self,
        layer: usize,
        it: &mut AttendReq<'_>,
        plan: Plan,
        estimate: Option<(Vec<f32>, Vec<f32>)>,
    ) -> Result<(), KvError> {
        let (hd, t) = (self.shape.heads(), self.geo.block_tokens());
        let mut lse = vec![0.0f32; plan.n * hd.q_heads];
        // By default an item waits for its pages and runs one softmax over everything in
        // position order: bit-identical to attention in RAM (the reads of later items still
        // overlap this item's compute). With `merge_partials`, a decode token attends over
        // what is resident while its pages are read and merges the two by log-sum-exp:
        // equal up to rounding, which the model's logits feel (see docs/ARCHITECTURE.md).
        let exact = plan.n > 1 || !self.cfg.merge_partials;
        let early = match plan.read {
            Some(id) if exact => {
                let (r, buf) = self.reads.wait(id)?;
                if let Err(e) = r {
                    self.reads.spare.push(buf);
                    return Err(e);
                }
                Some(buf)
            }
            _ => None,
        };
        let ls = &self.seqs[&it.seq].layers[layer];
        resident_attention(hd, t, ls, it, &plan, early.as_ref(), &mut lse);
        if let Some(buf) = early {
            self.finish_read(layer, it.seq, &plan, buf);
        } else if let Some(id) = plan.read {
            self.merge_read(layer, it, &plan, id, &mut lse)?;
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
    fn run_batch(
        &mut self,
        layer: usize,
        items: &mut [AttendReq<'_>],
        plans: Vec<Option<Plan>>,
        estimates: Vec<Option<(Vec<f32>, Vec<f32>)>>,
        results: &mut [Result<(), KvError>],
    ) {
        type Done = (usize, Plan, Option<LayerRead>, Result<(), KvError>);
        let (hd, t) = (self.shape.heads(), self.geo.block_tokens());
        let (seqs, reads) = (&self.seqs, &mut self.reads);
        let (tx, rx) = crossbeam_channel::unbounded::<Done>();
        let mut work: Vec<_> = items
            .iter_mut()
            .zip(plans)
            .zip(estimates)
            .map(|((it, plan), est)| plan.map(|p| (it, p, est)))
            .collect();
        rayon::scope(|s| {
            let spawn = |i, w, read: Option<Arrived>| {
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
            // Items whose pages are in (or need none) start now; the others as reads land.
            let mut waiting: HashMap<u64, usize> = HashMap::new();
            for (i, w) in work.iter_mut().enumerate() {
                let Some(id) = w.as_ref().map(|(_, p, _)| p.read) else {
                    continue;
                };
                match id {
                    None => spawn(i, w.take().expect("checked"), None),
                    Some(id) => match reads.try_take(id) {
                        Some(got) => spawn(i, w.take().expect("checked"), Some(got)),
                        None => {
                            waiting.insert(id, i);
                        }
                    },
                }
            }
            while !waiting.is_empty() {
                let ids: HashSet<u64> = waiting.keys().copied().collect();
                let Ok((id, got)) = reads.wait_any(&ids) else {
                    break;
                };
                let i = waiting.remove(&id).expect("waited for");
                spawn(i, work[i].take().expect("not started"), Some(got));
            }
        });
        let stopped: Vec<usize> = (0..work.len()).filter(|&i| work[i].is_some()).collect();
        drop(work);
        drop(tx);
        for i in stopped {
            results[i] = Err(KvError::ReaderStopped);
        }
        let mut finished: Vec<Done> = rx.try_iter().collect();
        finished.sort_by_key(|d| d.0);
        for (i, plan, buf, r) in finished {
            let seq = items[i].seq;
            match (buf, &r) {
                (Some(buf), Ok(())) => self.finish_read(layer, seq, &plan, buf),
                (Some(buf), Err(_)) => self.reads.spare.push(buf),
                (None, _) => {}
            }
            results[i] = r.and_then(|()| match &plan.recall_rest {
                Some(rest) => self.record_recall(layer, &items[i], rest),
                None => Ok(()),
            });
        }
    }

    /// Wait for the item's page read, attend over those pages and merge into `it.out`.
    fn merge_read(
        &mut self,
        layer: usize,
        it: &mut AttendReq<'_>,
        plan: &Plan,
        id: u64,
        lse: &mut [f32],
    ) -> Result<(), KvError> {
        let hd = self.shape.heads();
        let (r, buf) = self.reads.wait(id)?;
        if let Err(e) = r {
            // A failed read changes nothing stored; the caller ends this request only.
            self.reads.spare.push(buf);
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
        let (h, kd) = (
            self.shape.kv_heads,
            self.geo.block_tokens() * self.shape.head_dim,
        );
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
        self.reads.spare.push(buf);
    }
}

/// One item checked against its sequence: its query count, the blocks on flash and the
/// mode it attends in (prompt chunks always attend every page), and the read-ahead that
/// holds its pages, if one was queued.
struct Prep {
    n: usize,
    on_flash: usize,
    mode: AttentionMode,
    ahead: Option<Ahead>,
}

/// What one item of an attend call reads.
pub(super) struct Plan {
    /// Blocks the page cache held, with their data.
    pub(super) hits: Vec<(u32, BlockData)>,
    misses: Vec<u32>,
    /// The read that brings the other blocks, if any.
    read: Option<u64>,
    cache_fill: bool,
    /// Whether the item attends every page on flash (`full`, `flexgen`, prompt chunks).
    reads_all: bool,
    /// Queries of the item.
    pub(super) n: usize,
    /// With `measure_recall`: what the step attended, for the quality measurement.
    recall_rest: Option<RecallProbe>,
    /// With `estimate_skipped`: the blocks a sparse step skipped, estimated from summaries.
    skipped: Vec<u32>,
    /// The selection's per-head block logits (see [`SparseSelection::logits`]), if any.
    logits: Option<Vec<f32>>,
}
