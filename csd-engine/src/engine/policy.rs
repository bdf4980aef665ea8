//! The sparse retrieval policy (DESIGN §5): score candidate pages with the layer's probe,
//! turn the scores into an estimated attention distribution, keep the fewest pages that hold
//! the target share of it, and share a per-step page budget across layers by how many pages
//! each layer has recently needed (its information density).

use super::config::PageScore;
use super::summary::LayerSummaries;

/// A layer's probe for one kv head, split for Quest's bound.
pub struct HeadProbe {
    pub p: Vec<f32>,
    pub pos: Vec<f32>,
    pub neg: Vec<f32>,
}

impl HeadProbe {
    pub fn new(p: Vec<f32>) -> Self {
        let pos = p.iter().map(|x| x.max(0.0)).collect();
        let neg = p.iter().map(|x| x.min(0.0)).collect();
        HeadProbe { p, pos, neg }
    }
}

/// Estimated share of the layer's attention mass held by each block of `blocks`, averaged
/// over kv heads. Each head's scores are scaled dot products (so a softmax over them is as
/// peaked as the attention it estimates), normalised over the candidates.
pub fn block_masses(
    summ: &LayerSummaries,
    blocks: std::ops::Range<usize>,
    probes: &[HeadProbe],
    scale: f32,
    score: PageScore,
) -> Vec<f32> {
    let n = blocks.len();
    let mut mass = vec![0.0f32; n];
    let mut s = vec![0.0f32; n];
    for (h, pr) in probes.iter().enumerate() {
        for (i, b) in blocks.clone().enumerate() {
            s[i] = scale
                * match score {
                    PageScore::Quest => summ.quest(b, h, &pr.pos, &pr.neg),
                    PageScore::MeanKey => summ.mean_dot(b, h, &pr.p),
                };
        }
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            total += *x;
        }
        if total > 0.0 && total.is_finite() {
            for (acc, x) in mass.iter_mut().zip(&s) {
                *acc += x / total / probes.len() as f32;
            }
        }
    }
    mass
}

/// What the cut-off chose for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// Chosen blocks, ascending.
    pub blocks: Vec<u32>,
    /// Blocks needed to reach the target mass, before the [min, cap] clamp.
    pub needed: usize,
}

/// Keep the fewest of `blocks` (with estimated `mass`) that hold `target` of the total mass,
/// clamped to `[min, cap]` and to the number of candidates. `target >= 1` keeps them all.
pub fn cut_off(blocks: &[u32], mass: &[f32], target: f32, min: usize, cap: usize) -> Choice {
    let n = blocks.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| mass[b].total_cmp(&mass[a]).then(a.cmp(&b)));
    let needed = if target >= 1.0 {
        n
    } else {
        let total: f32 = mass.iter().sum();
        let mut acc = 0.0f32;
        let mut k = n;
        for (i, &j) in order.iter().enumerate() {
            acc += mass[j];
            if acc >= target * total {
                k = i + 1;
                break;
            }
        }
        k
    };
    let keep = needed.max(min).min(cap).min(n);
    let mut chosen: Vec<u32> = order[..keep].iter().map(|&j| blocks[j]).collect();
    chosen.sort_unstable();
    Choice {
        blocks: chosen,
        needed,
    }
}

/// Per-layer caps for one decode step: every layer gets `min`, and what is left of `budget`
/// is shared in proportion to `density`; no cap exceeds `max`. The caps never sum past
/// `budget` (given `budget >= layers × min`, which the config check ensures).
pub fn layer_caps(budget: usize, min: usize, max: usize, density: &[f32]) -> Vec<usize> {
    let layers = density.len();
    if budget == usize::MAX {
        return vec![max; layers];
    }
    let spare = budget.saturating_sub(min * layers);
    let total: f64 = density.iter().map(|&d| d.max(0.0) as f64).sum();
    density
        .iter()
        .map(|&d| {
            let share = if total > 0.0 {
                d.max(0.0) as f64 / total
            } else {
                1.0 / layers as f64
            };
            let extra = (spare as f64 * share).floor() as usize;
            (min + extra).min(max)
        })
        .collect()
}

/// How fast a layer's density follows its recent needs.
pub const DENSITY_EMA: f32 = 0.2;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cut_off_keeps_the_heaviest_blocks_until_the_target() {
        let blocks = [3u32, 4, 5, 6, 7];
        let mass = [0.05f32, 0.6, 0.05, 0.25, 0.05];
        let c = cut_off(&blocks, &mass, 0.8, 1, 10);
        assert_eq!(c.blocks, vec![4, 6]);
        assert_eq!(c.needed, 2);
        // Clamped by the cap and raised to the minimum.
        assert_eq!(cut_off(&blocks, &mass, 0.99, 1, 3).blocks.len(), 3);
        assert_eq!(cut_off(&blocks, &mass, 0.1, 4, 10).blocks.len(), 4);
        // An unlimited target takes everything.
        assert_eq!(
            cut_off(&blocks, &mass, 1.0, 0, usize::MAX).blocks,
            blocks.to_vec()
        );
    }

    #[test]
    fn caps_follow_density() {
        let caps = layer_caps(100, 2, 50, &[1.0, 3.0, 1.0, 5.0]);
        assert_eq!(caps[0], caps[2]);
        assert!(caps[3] > caps[1] && caps[1] > caps[0]);
        assert!(caps.iter().sum::<usize>() <= 100);
    }

    proptest! {
        #[test]
        fn caps_never_exceed_the_budget(
            density in proptest::collection::vec(0.0f32..100.0, 1..40),
            min in 0usize..5,
            extra in 0usize..2000,
            max in 0usize..200,
        ) {
            let layers = density.len();
            let budget = min * layers + extra;
            let max = max.max(min);
            let caps = layer_caps(budget, min, max, &density);
            prop_assert_eq!(caps.len(), layers);
            prop_assert!(caps.iter().sum::<usize>() <= budget);
            prop_assert!(caps.iter().all(|&c| c >= min && c <= max));
        }

        #[test]
        fn cut_off_respects_bounds(
            mass in proptest::collection::vec(0.0f32..1.0, 0..60),
            target in 0.01f32..1.0,
            min in 0usize..10,
            cap in 0usize..30,
        ) {
            let blocks: Vec<u32> = (0..mass.len() as u32).collect();
            let c = cut_off(&blocks, &mass, target, min, cap);
            prop_assert!(c.blocks.len() <= cap.min(blocks.len()));
            prop_assert!(c.blocks.len() >= min.min(cap).min(blocks.len()));
            prop_assert!(c.blocks.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
