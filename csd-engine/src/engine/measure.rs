//! Quality measurement of sparse steps (`measure_recall`; it reads every page, so it is for
//! benchmarks only): the share of the exact softmax mass the attended pages held, what an
//! oracle choosing as many pages would hold, the attention output's relative error, and
//! whether retrieval heads' sharp blocks were attended.

use super::item::block_segments;
use super::policy::HeadProbe;
use super::stats::SHARP_SHARE;
use super::{AttendReq, Engine};
use crate::error::KvError;
use crate::read::LayerRead;
use instinfer_kernels::attention::KvSegment;
use instinfer_kernels::multi_head::attend_partial;

/// What a recall measurement needs to know of a sparse step.
pub(super) struct RecallProbe {
    /// Blocks attended on flash, ascending.
    pub attended: Vec<u32>,
    pub on_flash: usize,
    /// Blocks the policy chose among.
    pub candidates: std::ops::Range<usize>,
}

impl Engine {
    /// Relative error of `it.out` against exact attention over all of `all` (every block on
    /// flash) and the stage, averaged over query heads.
    fn output_error(&self, layer: usize, it: &AttendReq<'_>, all: &LayerRead) -> f64 {
        let hd = self.shape.heads();
        let ls = &self.seqs[&it.seq].layers[layer];
        let segs: Vec<Vec<KvSegment<'_>>> = (0..hd.kv_heads)
            .map(|head| {
                let mut v = block_segments(all, head);
                v.extend(ls.stage_segment(head));
                v
            })
            .collect();
        let mut exact = vec![0.0f32; it.q.len()];
        let mut lse = vec![0.0f32; hd.q_heads];
        attend_partial(hd, it.q, it.first_pos, &segs, &mut exact, &mut lse);
        let d = hd.head_dim;
        let err: f64 = it
            .out
            .chunks_exact(d)
            .zip(exact.chunks_exact(d))
            .map(|(a, b)| {
                let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
                let base: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
                (diff / base.max(1e-30)).sqrt()
            })
            .sum();
        err / hd.q_heads as f64
    }

    /// Query heads whose heaviest candidate block held at least `SHARP_SHARE` of their exact
    /// mass (`share`: block-major, per head): how many, how many of those blocks the step
    /// skipped, and (into the stats) where the Quest bound and the mean key ranked them.
    // `share` is block-major: a head indexes into every block's row.
    #[allow(clippy::needless_range_loop)]
    fn record_sharp(
        &mut self,
        layer: usize,
        it: &AttendReq<'_>,
        probe: &RecallProbe,
        share: &[Vec<f64>],
    ) -> (u64, u64) {
        let qh = self.shape.q_heads;
        let (mut sharp, mut missed) = (0u64, 0u64);
        for h in 0..qh {
            if let Some(b) = probe
                .candidates
                .clone()
                .max_by(|&a, &b| share[a][h].total_cmp(&share[b][h]))
            {
                if share[b][h] >= SHARP_SHARE {
                    sharp += 1;
                    let ranks = self.sharp_ranks(layer, it, h, b, &probe.candidates);
                    if let Some(st) = self.seqs.get_mut(&it.seq) {
                        for (k, r) in ranks.iter().enumerate() {
                            for (j, lim) in [1usize, 4, 16].iter().enumerate() {
                                if r < lim {
                                    st.policy.sharp_found[k * 3 + j] += 1;
                                }
                            }
                        }
                    }
                    if probe.attended.binary_search(&(b as u32)).is_err() {
                        missed += 1;
                    }
                }
            }
        }
        (sharp, missed)
    }

    /// Rank of `block` among `candidates` for query head `head`, by the Quest bound and by
    /// the mean key.
    fn sharp_ranks(
        &self,
        layer: usize,
        it: &AttendReq<'_>,
        head: usize,
        block: usize,
        candidates: &std::ops::Range<usize>,
    ) -> [usize; 2] {
        let d = self.shape.head_dim;
        let summ = &self.seqs[&it.seq].layers[layer].summ;
        let p = HeadProbe::new(
            head / self.shape.heads().group(),
            it.q[head * d..(head + 1) * d].to_vec(),
        );
        let quest = |b: usize| summ.quest(b, p.kv_head, &p.pos, &p.neg);
        let mean = |b: usize| summ.mean_dot(b, p.kv_head, &p.p);
        let (q0, m0) = (quest(block), mean(block));
        [
            candidates.clone().filter(|&b| quest(b) > q0).count(),
            candidates.clone().filter(|&b| mean(b) > m0).count(),
        ]
    }

    /// Read every page of the layer and record the share of the exact softmax mass that the
    /// attended keys held, and the share an oracle choosing as many candidates would hold.
    pub(super) fn record_recall(
        &mut self,
        layer: usize,
        it: &AttendReq<'_>,
        probe: &RecallProbe,
    ) -> Result<(), KvError> {
        let hd = self.shape.heads();
        let qh = hd.q_heads;
        let all: Vec<u32> = (0..probe.on_flash as u32).collect();
        let mut buf = LayerRead::new();
        {
            let store = self.store.read().unwrap_or_else(|p| p.into_inner());
            store.read_blocks(it.seq, layer as u32, &all, &mut buf)?;
        }
        let error = self.output_error(layer, it, &buf);
        // Log-mass of every block and of the staged tail, per query head.
        let mut o = vec![0.0f32; it.q.len()];
        let mut block_lse = vec![vec![f32::NEG_INFINITY; qh]; buf.len()];
        for (i, l) in block_lse.iter_mut().enumerate() {
            let segs: Vec<Vec<KvSegment<'_>>> = (0..hd.kv_heads)
                .map(|head| {
                    vec![KvSegment {
                        keys: buf.keys(i, head),
                        values: buf.values(i, head),
                        first_pos: buf.first_pos(i),
                    }]
                })
                .collect();
            attend_partial(hd, it.q, it.first_pos, &segs, &mut o, l);
        }
        let mut stage_lse = vec![f32::NEG_INFINITY; qh];
        {
            let ls = &self.seqs[&it.seq].layers[layer];
            if !ls.stage_k[0].is_empty() {
                let segs: Vec<Vec<KvSegment<'_>>> = (0..hd.kv_heads)
                    .map(|head| ls.stage_segment(head).into_iter().collect())
                    .collect();
                attend_partial(hd, it.q, it.first_pos, &segs, &mut o, &mut stage_lse);
            }
        }
        // Shares per (block, head), normalised per head.
        let mut share = vec![vec![0.0f64; qh]; block_lse.len()];
        let mut stage_share = vec![0.0f64; qh];
        for h in 0..qh {
            let m = block_lse
                .iter()
                .map(|l| l[h])
                .chain([stage_lse[h]])
                .fold(f32::NEG_INFINITY, f32::max) as f64;
            let e = |x: f32| ((x as f64) - m).exp();
            let total: f64 = block_lse.iter().map(|l| e(l[h])).sum::<f64>() + e(stage_lse[h]);
            for (sh, l) in share.iter_mut().zip(&block_lse) {
                sh[h] = e(l[h]) / total;
            }
            stage_share[h] = e(stage_lse[h]) / total;
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / qh as f64;
        let fixed: f64 = mean(&stage_share)
            + (0..share.len())
                .filter(|b| !probe.candidates.contains(b))
                .map(|b| mean(&share[b]))
                .sum::<f64>();
        let held: f64 = mean(&stage_share)
            + probe
                .attended
                .iter()
                .map(|&b| mean(&share[b as usize]))
                .sum::<f64>();
        let chosen = probe
            .attended
            .iter()
            .filter(|&&b| probe.candidates.contains(&(b as usize)))
            .count();
        let (sharp, missed) = self.record_sharp(layer, it, probe, &share);
        let mut cand: Vec<f64> = probe.candidates.clone().map(|b| mean(&share[b])).collect();
        cand.sort_by(|a, b| b.total_cmp(a));
        let oracle = fixed + cand.iter().take(chosen).sum::<f64>();
        if let Some(st) = self.seqs.get_mut(&it.seq) {
            st.policy.recall_sum[layer] += held;
            st.policy.oracle_recall_sum[layer] += oracle;
            st.policy.output_error_sum[layer] += error;
            st.policy.sharp_heads[layer] += sharp;
            st.policy.sharp_missed[layer] += missed;
            st.policy.recall_count[layer] += 1;
        }
        self.reads.spare.push(buf);
        Ok(())
    }
}
