//! The page selection of one sparse decode step of one layer: sinks and the recent window
//! always, and between them what the retrieval policy's cut-off keeps, scored with probes
//! made from the query.

use instinfer_kernels::multi_head::Heads;

use super::policy::{self, block_masses, cut_off, HeadProbe, ScoreSpec};
use super::summary::LayerSummaries;
use super::EngineConfig;

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
        let spec = ScoreSpec {
            score: cfg.score,
            scale,
            top: cfg.head_top_blocks,
            shortlist: cfg.score_shortlist_blocks,
        };
        let est = block_masses(summ, on_flash, sinks..recent0, probes, spec);
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
pub(super) fn probes_for(
    hd: Heads,
    q: &[f32],
    prefill: Option<&[f32]>,
    blend: f32,
) -> Vec<HeadProbe> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PageScore;
    use half::f16;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Seeded pseudo-random values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Sketched summaries of `blocks` blocks of 32 tokens, 3 kv heads of 64 values.
    fn summaries(blocks: usize, seed: u64) -> LayerSummaries {
        let mut s = LayerSummaries::new(3, 64).sketched(true);
        for b in 0..blocks {
            let k: Vec<Vec<f16>> = (0..3)
                .map(|h| {
                    values(32 * 64, seed * 1000 + (b * 3 + h) as u64)
                        .iter()
                        .map(|&x| f16::from_f32(x))
                        .collect()
                })
                .collect();
            s.push_block(|h| &k[h], |h| &k[h]);
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn selection_always_holds_sinks_and_recent_window(
            on_flash in 0usize..80,
            sink in 0usize..4,
            recent in 0usize..4,
            min in 0usize..4,
            cap in 0usize..12,
            target in 0.05f32..1.0,
            seed in 0u64..1000,
        ) {
            let summ = summaries(on_flash, seed);
            let probes: Vec<HeadProbe> =
                (0..3).map(|h| HeadProbe::new(h as usize, values(64, seed + h))).collect();
            for score in [PageScore::Sketch, PageScore::Quest, PageScore::MeanKey] {
                let cfg = EngineConfig {
                    sink_blocks: sink,
                    recent_blocks: recent,
                    min_blocks: min,
                    target_mass: target,
                    score,
                    ..EngineConfig::default()
                };
                let sel = sparse_blocks(&cfg, on_flash, &summ, &probes, cap);
                for b in 0..sink.min(on_flash) as u32 {
                    prop_assert!(sel.blocks.contains(&b));
                }
                for b in on_flash.saturating_sub(recent) as u32..on_flash as u32 {
                    prop_assert!(sel.blocks.contains(&b));
                }
                prop_assert!(sel.blocks.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(sel.blocks.iter().all(|&b| (b as usize) < on_flash));
                let chosen = sel.choice.as_ref().map_or(0, |c| c.blocks.len());
                prop_assert!(chosen <= cap.min(sel.candidates.len()));
            }
        }
    }
}
