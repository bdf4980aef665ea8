//! The attend pipeline: check each item against its sequence, select a sparse step's pages,
//! plan what comes from the page cache and what is read, estimate the skipped pages while
//! the reads run, then compute each item (one softmax over everything by default, or the
//! resident part first and the read part merged in) and keep what was read in the cache.

use instinfer_kernels::attention::KvSegment;
use instinfer_kernels::multi_head::{attend_partial, merge_into};
use rayon::prelude::*;

use super::cache::BlockData;
use super::estimate::{sketched_skipped_attention, skipped_attention};
use super::io::{self, ReadJob};
use super::item::{block_segments, item_attention, resident_attention};
use super::measure::RecallProbe;
use super::policy::{layer_caps, DENSITY_EMA};
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
        let (hd, t) = (self.shape.heads(), self.geo.block_tokens());
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
        let (hd, t, seqs) = (self.shape.heads(), self.geo.block_tokens(), &self.seqs);
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
        let hd = self.shape.heads();
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
        self.spare_reads.push(buf);
    }
}

/// One item checked against its sequence: its query count, the blocks on flash and the
/// mode it attends in (prompt chunks always attend every page).
struct Prep {
    n: usize,
    on_flash: usize,
    mode: AttentionMode,
}

/// What one item of an attend call reads.
pub(super) struct Plan {
    /// Blocks the page cache held, with their data.
    pub(super) hits: Vec<(u32, BlockData)>,
    misses: Vec<u32>,
    reading: bool,
    cache_fill: bool,
    /// Queries of the item.
    pub(super) n: usize,
    /// With `measure_recall`: what the step attended, for the quality measurement.
    recall_rest: Option<RecallProbe>,
    /// With `estimate_skipped`: the blocks a sparse step skipped, estimated from summaries.
    skipped: Vec<u32>,
    /// The selection's per-head block logits (see [`SparseSelection::logits`]), if any.
    logits: Option<Vec<f32>>,
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
        let (i, r, buf) = done.recv().map_err(|_| KvError::ReaderStopped)?;
        *pending -= 1;
        arrived[i] = Some((r, buf));
    }
}
