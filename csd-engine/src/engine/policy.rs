//! The sparse retrieval policy (docs/ARCHITECTURE.md, "The storage engine"): score candidate pages with the layer's probe,
//! turn the scores into an estimated attention distribution, keep the fewest pages that hold
//! the target share of it, and share a per-step page budget across layers by how many pages
//! each layer has recently needed (its information density).

use super::config::PageScore;
use super::summary::{LayerSummaries, SketchScratch};
use instinfer_kernels::gather::gathered_scores;
use instinfer_kernels::simd_math::exp_sub_sum;
use rayon::prelude::*;

/// One probe query, split for Quest's bound, and the kv head whose keys it scores.
pub struct HeadProbe {
    pub kv_head: usize,
    pub p: Vec<f32>,
    pub pos: Vec<f32>,
    pub neg: Vec<f32>,
}

impl HeadProbe {
    pub fn new(kv_head: usize, p: Vec<f32>) -> Self {
        let pos = p.iter().map(|x| x.max(0.0)).collect();
        let neg = p.iter().map(|x| x.min(0.0)).collect();
        HeadProbe {
            kv_head,
            p,
            pos,
            neg,
        }
    }
}

/// A layer's estimated attention over its blocks.
pub struct BlockMasses {
    /// Share of the layer's attention mass held by each block, averaged over the probes.
    pub mean: Vec<f32>,
    /// Per probe, its `top` highest-scoring blocks among `candidates`.
    pub tops: Vec<u32>,
    /// With key sketches: each probe's log-mass of every block (`probes × blocks`), the
    /// logits an estimate of the skipped blocks can reuse.
    pub logits: Option<Vec<f32>>,
}

/// How a layer's blocks are scored.
#[derive(Clone, Copy, Debug)]
pub struct ScoreSpec {
    pub score: PageScore,
    /// Scale of the dot products (`1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Each probe's best candidates collected into [`BlockMasses::tops`].
    pub top: usize,
    /// With key sketches: candidates each probe shortlists by mean-key score for token-level
    /// scoring (0: every candidate is sketch-scored).
    pub shortlist: usize,
}

/// Estimate the attention of `probes` over the first `blocks` blocks. Each probe's scores
/// are scaled dot products (so a softmax over them is as peaked as the attention it
/// estimates), normalised over all `blocks`: the always-attended sinks and recent window
/// take their share, so a head that rests on its sink asks for few candidates and a head
/// that retrieves asks for its block. Also collects every probe's `top` best candidates: a
/// retrieval head's one sharp block is a small share of the layer's mass averaged over heads.
pub fn block_masses(
    summ: &LayerSummaries,
    blocks: usize,
    candidates: std::ops::Range<usize>,
    probes: &[HeadProbe],
    spec: ScoreSpec,
) -> BlockMasses {
    // Summaries built without sketches (another score's config) are scored by their bound.
    let score = if spec.score == PageScore::Sketch && !summ.has_sketch() {
        PageScore::Quest
    } else {
        spec.score
    };
    let spec = ScoreSpec { score, ..spec };
    let mut mass = vec![0.0f32; blocks];
    let mut tops = Vec::new();
    let np = probes.len();
    let share = 1.0 / np.max(1) as f32;
    let mut scores = block_scores(summ, blocks, candidates.clone(), probes, spec);
    let logits = (score == PageScore::Sketch).then(|| scores.clone());
    let mut best: Vec<usize> = Vec::with_capacity(candidates.len());
    for s in scores.chunks_exact_mut(blocks.max(1)).take(np) {
        if spec.top > 0 && !candidates.is_empty() {
            best.clear();
            best.extend(candidates.clone());
            let k = spec.top.min(best.len());
            best.select_nth_unstable_by(k - 1, |&a, &b| s[b].total_cmp(&s[a]));
            tops.extend(best[..k].iter().map(|&b| b as u32));
        }
        let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total = exp_sub_sum(s, m) as f32;
        if total > 0.0 && total.is_finite() {
            let w = share / total;
            for (acc, x) in mass.iter_mut().zip(s.iter()) {
                *acc += x * w;
            }
        }
    }
    tops.sort_unstable();
    tops.dedup();
    BlockMasses {
        mean: mass,
        tops,
        logits,
    }
}

/// Every probe's score of every block, probe-major (`probes × blocks`). The probes of one
/// kv head share its summaries: walk them once. Tasks of (kv head, run of blocks) run across
/// the pool when there is enough work.
///
/// With key sketches and a shortlist, token-level scoring is spent only where it can
/// matter. Every block is first scored by its mean key (one product per block and probe, the
/// log-mass of `tokens` copies of the mean key); each probe's `shortlist` best candidates by
/// that score, and the always-attended blocks, are then sketch-scored. The sketch work is
/// constant in the context; what grows with it is one small product per block.
fn block_scores(
    summ: &LayerSummaries,
    blocks: usize,
    candidates: std::ops::Range<usize>,
    probes: &[HeadProbe],
    spec: ScoreSpec,
) -> Vec<f32> {
    let np = probes.len();
    let mut scores = vec![0.0f32; np * blocks];
    let heads = probes.iter().map(|p| p.kv_head + 1).max().unwrap_or(0);
    let groups: Vec<Group> = (0..heads)
        .map(|kv| Group::new(probes, kv, spec.scale))
        .filter(|g| !g.idx.is_empty())
        .collect();
    let parallel = blocks * np >= PARALLEL_MIN_SCORES;
    let shortlisting =
        spec.score == PageScore::Sketch && spec.shortlist > 0 && candidates.len() > spec.shortlist;
    // Per group, the blocks scored with `spec.score` (all of them without a shortlist).
    let lists: Vec<Vec<u32>> = if shortlisting {
        let pick = |g: &Group| g.shortlist(summ, blocks, candidates.clone(), spec.shortlist);
        let picked: Vec<(Vec<u32>, Vec<f32>)> = if parallel {
            groups.par_iter().map(pick).collect()
        } else {
            groups.iter().map(pick).collect()
        };
        let mut lists = Vec::with_capacity(picked.len());
        for (g, (list, first)) in groups.iter().zip(picked) {
            for (j, &i) in g.idx.iter().enumerate() {
                scores[i * blocks..(i + 1) * blocks]
                    .copy_from_slice(&first[j * blocks..(j + 1) * blocks]);
            }
            lists.push(list);
        }
        lists
    } else {
        let all: Vec<u32> = (0..blocks as u32).collect();
        groups.iter().map(|_| all.clone()).collect()
    };
    let tasks: Vec<(usize, &[u32])> = lists
        .iter()
        .enumerate()
        .flat_map(|(g, ids)| ids.chunks(SCORE_CHUNK_BLOCKS).map(move |c| (g, c)))
        .collect();
    let run = |&(g, ids): &(usize, &[u32])| groups[g].score(summ, ids, spec.score, spec.scale);
    let parts: Vec<Vec<f32>> = if parallel {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    for ((g, ids), part) in tasks.iter().zip(&parts) {
        for (j, &i) in groups[*g].idx.iter().enumerate() {
            let row = &mut scores[i * blocks..(i + 1) * blocks];
            for (&b, &x) in ids.iter().zip(&part[j * ids.len()..(j + 1) * ids.len()]) {
                row[b as usize] = x;
            }
        }
    }
    scores
}

/// Blocks per scoring task.
const SCORE_CHUNK_BLOCKS: usize = 128;
/// Block × probe scores below which scoring stays on the calling thread.
const PARALLEL_MIN_SCORES: usize = 2048;

/// The probes of one kv head, their halves laid out for [`LayerSummaries::quest_group`].
struct Group {
    kv: usize,
    /// Indices of the probes in the caller's list.
    idx: Vec<usize>,
    pos: Vec<f32>,
    neg: Vec<f32>,
    /// The probes times the score scale, for key sketches.
    scaled: Vec<f32>,
}

impl Group {
    fn new(probes: &[HeadProbe], kv: usize, scale: f32) -> Group {
        let idx: Vec<usize> = (0..probes.len())
            .filter(|&i| probes[i].kv_head == kv)
            .collect();
        let pos = idx
            .iter()
            .flat_map(|&i| probes[i].pos.iter().copied())
            .collect();
        let neg = idx
            .iter()
            .flat_map(|&i| probes[i].neg.iter().copied())
            .collect();
        let scaled = idx
            .iter()
            .flat_map(|&i| probes[i].p.iter().map(|x| x * scale))
            .collect();
        Group {
            kv,
            idx,
            pos,
            neg,
            scaled,
        }
    }

    /// The group's shortlist among `candidates` of the first `blocks` blocks, ascending: the
    /// blocks outside the candidates and each probe's `k` candidates with the highest
    /// mean-key score. Also every block's mean-key score (`probes × blocks`), the log-mass
    /// of `tokens` copies of its mean key.
    fn shortlist(
        &self,
        summ: &LayerSummaries,
        blocks: usize,
        candidates: std::ops::Range<usize>,
        k: usize,
    ) -> (Vec<u32>, Vec<f32>) {
        let all: Vec<u32> = (0..blocks as u32).collect();
        let ln_tokens = (summ.block_tokens().max(1) as f32).ln();
        let first = self.mean_scores(summ, &all, ln_tokens);
        let mut keep = vec![false; blocks];
        keep[..candidates.start].fill(true);
        keep[candidates.end..].fill(true);
        let mut order: Vec<usize> = Vec::with_capacity(candidates.len());
        for row in first.chunks_exact(blocks) {
            order.clear();
            order.extend(candidates.clone());
            order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            for &b in &order[..k] {
                keep[b] = true;
            }
        }
        let list = (0..blocks as u32).filter(|&b| keep[b as usize]).collect();
        (list, first)
    }

    /// The group's scaled mean-key scores of the blocks `ids` plus `bias`, probe-major
    /// (`idx.len() × ids.len()`).
    fn mean_scores(&self, summ: &LayerSummaries, ids: &[u32], bias: f32) -> Vec<f32> {
        let d = self.scaled.len() / self.idx.len().max(1);
        let mut out = vec![0.0f32; self.idx.len() * ids.len()];
        // The probes are scaled already.
        gathered_scores(
            &self.scaled,
            summ.mean_keys(),
            summ.heads() * d,
            self.kv * d,
            ids,
            1.0,
            bias,
            &mut out,
        );
        out
    }

    /// Scaled scores of the group's probes over the blocks `ids`, probe-major
    /// (`idx.len() × ids.len()`): a bound or representative score per block, or with key
    /// sketches the log of the block's estimated attention mass (so a softmax over blocks
    /// sums token masses).
    fn score(&self, summ: &LayerSummaries, ids: &[u32], score: PageScore, scale: f32) -> Vec<f32> {
        if score == PageScore::MeanKey {
            return self.mean_scores(summ, ids, 0.0);
        }
        let (g, len) = (self.idx.len(), ids.len());
        let mut out = vec![0.0f32; g * len];
        let mut tmp = vec![0.0f32; g];
        let mut scratch = SketchScratch::default();
        for (k, &b) in ids.iter().enumerate() {
            let b = b as usize;
            if score == PageScore::Sketch {
                // Already scaled: the probes were scaled before scoring.
                summ.sketch_lse(b, self.kv, &self.scaled, &mut scratch, &mut tmp);
            } else {
                summ.quest_group(b, self.kv, &self.pos, &self.neg, &mut tmp);
                tmp.iter_mut().for_each(|t| *t *= scale);
            }
            for (j, t) in tmp.iter().enumerate() {
                out[j * len + k] = *t;
            }
        }
        out
    }
}

/// What the cut-off chose for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// Chosen blocks, ascending.
    pub blocks: Vec<u32>,
    /// Blocks needed to reach the target mass, before the [min, cap] clamp.
    pub needed: usize,
}

/// Keep the fewest of `blocks` (with estimated `mass`) that, added to the mass `covered`
/// already (by blocks attended anyway), hold `target` of the total, clamped to `[min, cap]`
/// and to the number of candidates. The blocks in `first` (indices into `blocks`) come
/// before the others, and all of them are needed. `target >= 1` keeps them all.
pub fn cut_off(
    blocks: &[u32],
    mass: &[f32],
    first: &[usize],
    covered: f32,
    target: f32,
    min: usize,
    cap: usize,
) -> Choice {
    let n = blocks.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut marked = vec![false; n];
    for &i in first.iter().filter(|&&i| i < n) {
        marked[i] = true;
    }
    let is_first = |i: usize| marked[i];
    order.sort_by(|&a, &b| {
        is_first(b)
            .cmp(&is_first(a))
            .then(mass[b].total_cmp(&mass[a]))
            .then(a.cmp(&b))
    });
    let firsts = order.iter().filter(|&&i| is_first(i)).count();
    let needed = if target >= 1.0 {
        n
    } else {
        let total: f32 = covered + mass.iter().sum::<f32>();
        let mut acc = covered;
        let mut k = n;
        if acc >= target * total {
            k = 0;
        }
        for (i, &j) in order.iter().enumerate().take(k) {
            acc += mass[j];
            if acc >= target * total {
                k = i + 1;
                break;
            }
        }
        k.max(firsts)
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
        let c = cut_off(&blocks, &mass, &[], 0.0, 0.8, 1, 10);
        assert_eq!(c.blocks, vec![4, 6]);
        assert_eq!(c.needed, 2);
        // Clamped by the cap and raised to the minimum.
        assert_eq!(
            cut_off(&blocks, &mass, &[], 0.0, 0.99, 1, 3).blocks.len(),
            3
        );
        assert_eq!(
            cut_off(&blocks, &mass, &[], 0.0, 0.1, 4, 10).blocks.len(),
            4
        );
        // Mass held by blocks attended anyway counts towards the target.
        assert_eq!(
            cut_off(&blocks, &mass, &[], 1.0, 0.8, 1, 10).blocks,
            vec![4]
        );
        assert_eq!(cut_off(&blocks, &mass, &[], 9.0, 0.8, 0, 10).needed, 0);
        // Blocks put first are kept before heavier ones and count as needed.
        let c = cut_off(&blocks, &mass, &[0, 2], 0.0, 0.5, 1, 10);
        assert_eq!(c.blocks, vec![3, 4, 5]);
        assert_eq!(c.needed, 3);
        assert_eq!(
            cut_off(&blocks, &mass, &[2], 0.0, 0.5, 0, 1).blocks,
            vec![5]
        );
        // An unlimited target takes everything.
        assert_eq!(
            cut_off(&blocks, &mass, &[], 0.0, 1.0, 0, usize::MAX).blocks,
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
            covered in 0.0f32..2.0,
        ) {
            let blocks: Vec<u32> = (0..mass.len() as u32).collect();
            let c = cut_off(&blocks, &mass, &[], covered, target, min, cap);
            prop_assert!(c.blocks.len() <= cap.min(blocks.len()));
            prop_assert!(c.blocks.len() >= min.min(cap).min(blocks.len()));
            prop_assert!(c.blocks.windows(2).all(|w| w[0] < w[1]));
        }
    }

    /// Sketched summaries of `blocks` blocks of 32 tokens, 3 kv heads of 64 values, keys
    /// drawn from `key(block, head, token, dim)`.
    fn sketched(blocks: usize, key: impl Fn(usize, usize, usize, usize) -> f32) -> LayerSummaries {
        let mut s = LayerSummaries::new(3, 64).sketched(true);
        for b in 0..blocks {
            let k: Vec<Vec<half::f16>> = (0..3)
                .map(|h| {
                    (0..32 * 64)
                        .map(|i| half::f16::from_f32(key(b, h, i / 64, i % 64)))
                        .collect()
                })
                .collect();
            s.push_block(|h| &k[h], |h| &k[h]);
        }
        s
    }

    /// A seeded value in [-1, 1) for each (block, head, token, dim).
    fn noise(b: usize, h: usize, t: usize, i: usize) -> f32 {
        let x = (((b * 3 + h) * 32 + t) * 64 + i) as u64;
        let y = x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) ^ 0x5bd1_e995;
        let y = y.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        ((y >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn probes(seed: usize) -> Vec<HeadProbe> {
        (0..9)
            .map(|h| {
                HeadProbe::new(
                    h / 3,
                    (0..64).map(|i| noise(seed, h % 3, h, i) * 2.0).collect(),
                )
            })
            .collect()
    }

    fn spec(shortlist: usize) -> ScoreSpec {
        ScoreSpec {
            score: PageScore::Sketch,
            scale: 0.125,
            top: 2,
            shortlist,
        }
    }

    /// With a shortlist, the always-attended blocks and each probe's best candidates by
    /// mean-key score are sketch-scored exactly as without one; every other candidate gets
    /// its mean key's score plus the log of its token count.
    #[test]
    fn shortlisted_blocks_keep_their_sketch_scores_and_the_rest_their_mean_key_scores() {
        let (blocks, k) = (150usize, 12usize);
        let summ = sketched(blocks, noise);
        let probes = probes(7);
        let cand = 2..blocks - 2;
        let all = block_masses(&summ, blocks, cand.clone(), &probes, spec(0));
        let short = block_masses(&summ, blocks, cand.clone(), &probes, spec(k));
        let (all, short) = (all.logits.unwrap(), short.logits.unwrap());
        let ln32 = 32f32.ln();
        let mean = |b: usize, p: &HeadProbe| summ.mean_dot(b, p.kv_head, &p.p) * 0.125 + ln32;
        // Which blocks each kv head's probes shortlist, recomputed from the mean keys.
        let mut listed = vec![vec![false; blocks]; 3];
        for p in &probes {
            let mut order: Vec<usize> = cand.clone().collect();
            order.sort_by(|&a, &b| mean(b, p).total_cmp(&mean(a, p)));
            // Ties at the k-th place could go either way; the noise makes them unlikely.
            for &b in &order[..k] {
                listed[p.kv_head][b] = true;
            }
        }
        let mut sketched_candidates = 0;
        for (i, p) in probes.iter().enumerate() {
            for b in 0..blocks {
                let (got, exact) = (short[i * blocks + b], all[i * blocks + b]);
                if !cand.contains(&b) || listed[p.kv_head][b] {
                    assert_eq!(got.to_bits(), exact.to_bits(), "probe {i} block {b}");
                    sketched_candidates += usize::from(cand.contains(&b));
                } else {
                    assert!(
                        (got - mean(b, p)).abs() < 1e-4,
                        "probe {i} block {b}: {got}"
                    );
                }
            }
        }
        assert!(sketched_candidates >= 9 * k);
    }

    /// A shortlist as long as the candidates changes nothing.
    #[test]
    fn a_shortlist_covering_every_candidate_is_the_full_scoring() {
        let summ = sketched(40, noise);
        let probes = probes(3);
        let a = block_masses(&summ, 40, 2..38, &probes, spec(0));
        let b = block_masses(&summ, 40, 2..38, &probes, spec(36));
        assert_eq!(a.mean, b.mean);
        assert_eq!(a.tops, b.tops);
        assert_eq!(a.logits, b.logits);
    }

    /// One token that a query head attends sharply, far back in a long context of diffuse
    /// keys: its block is shortlisted, sketch-scored, and among that head's best blocks.
    #[test]
    fn a_sharp_block_far_back_is_found_through_the_shortlist() {
        let probes = probes(11);
        let (blocks, sharp, head) = (400usize, 57usize, 4usize);
        let p = probes[head].p.clone();
        let norm = p.iter().map(|x| x * x).sum::<f32>().sqrt();
        let summ = sketched(blocks, |b, h, t, i| {
            if b == sharp && h == probes[head].kv_head && t == 9 {
                p[i] / norm * 40.0
            } else {
                noise(b, h, t, i)
            }
        });
        let est = block_masses(&summ, blocks, 2..blocks - 2, &probes, spec(16));
        assert!(est.tops.contains(&(sharp as u32)), "tops {:?}", est.tops);
    }
}
