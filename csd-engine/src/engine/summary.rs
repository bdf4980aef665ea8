//! Per-page summaries kept in RAM (the drive's DRAM): for every (layer, kv head, full block)
//! the element-wise key minimum and maximum (Quest's bound; f16, since the extremes of f16
//! keys are f16 values), the mean key (a representative key) and the mean value (what the block contributes when its keys score alike, used to
//! estimate the pages a sparse step skips). Built from the K/V as they are appended, or
//! rebuilt from the pages when a persisted sequence is restored.

use half::f16;
use instinfer_kernels::bound::quest_bound;

/// Summaries of one (sequence, layer): key min/max `blocks × heads × runs × head_dim`, mean
/// key and mean value `blocks × heads × head_dim`.
#[derive(Clone, Debug, Default)]
pub struct LayerSummaries {
    heads: usize,
    head_dim: usize,
    /// Quest bounds per block: the block's tokens split into this many runs, each with its
    /// own min/max (a tighter bound; the block's score is the best run's).
    runs: usize,
    min: Vec<f16>,
    max: Vec<f16>,
    mean: Vec<f32>,
    vmean: Vec<f32>,
}

impl LayerSummaries {
    pub fn new(heads: usize, head_dim: usize) -> Self {
        Self::with_runs(heads, head_dim, 1)
    }

    /// Summaries whose Quest bounds cover `runs` equal runs of each block's tokens.
    pub fn with_runs(heads: usize, head_dim: usize, runs: usize) -> Self {
        LayerSummaries {
            heads,
            head_dim,
            runs: runs.max(1),
            ..Default::default()
        }
    }

    /// Kv heads summarised per block.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Blocks summarised.
    pub fn blocks(&self) -> usize {
        self.mean.len() / (self.heads * self.head_dim).max(1)
    }

    /// RAM held, in bytes.
    pub fn bytes(&self) -> usize {
        (self.min.len() + self.max.len()) * std::mem::size_of::<f16>()
            + (self.mean.len() + self.vmean.len()) * std::mem::size_of::<f32>()
    }

    /// Add the next block; `keys(head)` and `values(head)` give its `block_tokens × head_dim`
    /// key and value rows.
    pub fn push_block<'a, 'b>(
        &mut self,
        keys: impl Fn(usize) -> &'a [f16],
        values: impl Fn(usize) -> &'b [f16],
    ) {
        let d = self.head_dim;
        for h in 0..self.heads {
            let mut vsum = vec![0.0f32; d];
            let vrows = values(h);
            for row in vrows.chunks_exact(d) {
                for (a, &x) in vsum.iter_mut().zip(row) {
                    *a += x.to_f32();
                }
            }
            let vinv = 1.0 / (vrows.len() / d).max(1) as f32;
            self.vmean.extend(vsum.iter().map(|s| s * vinv));
            let rows = keys(h);
            let n = rows.len() / d;
            let mut sum = vec![0.0f32; d];
            for row in rows.chunks_exact(d) {
                for (a, &x) in sum.iter_mut().zip(row) {
                    *a += x.to_f32();
                }
            }
            let per_run = n.div_ceil(self.runs).max(1);
            for r in 0..self.runs {
                let (mut lo, mut hi) = (vec![f16::INFINITY; d], vec![f16::NEG_INFINITY; d]);
                let first = (r * per_run).min(n);
                let last = ((r + 1) * per_run).min(n);
                for row in rows[first * d..last * d].chunks_exact(d) {
                    for (i, &x) in row.iter().enumerate() {
                        lo[i] = lo[i].min(x);
                        hi[i] = hi[i].max(x);
                    }
                }
                if first == last && r > 0 {
                    // More runs than tokens: repeat the previous run (a bound never loosens).
                    let at = self.min.len() - d;
                    lo.copy_from_slice(&self.min[at..]);
                    hi.copy_from_slice(&self.max[at..]);
                }
                self.min.extend_from_slice(&lo);
                self.max.extend_from_slice(&hi);
            }
            let inv = 1.0 / n.max(1) as f32;
            self.mean.extend(sum.iter().map(|s| s * inv));
        }
    }

    /// Quest's upper bound of `p · k` over the keys of `block`, kv head `head`.
    pub fn quest(&self, block: usize, head: usize, p_pos: &[f32], p_neg: &[f32]) -> f32 {
        let mut out = [0.0f32];
        self.quest_group(block, head, p_pos, p_neg, &mut out);
        out[0]
    }

    /// Quest's bound over `block`, kv head `head`, of each of `out.len()` probes of that kv
    /// head (`pos`/`neg`: their positive and negative parts, `probes × head_dim` each): each
    /// run's extremes are loaded once for all of them.
    pub fn quest_group(
        &self,
        block: usize,
        head: usize,
        pos: &[f32],
        neg: &[f32],
        out: &mut [f32],
    ) {
        let span = self.runs * self.head_dim;
        let x = (block * self.heads + head) * span..(block * self.heads + head + 1) * span;
        quest_bound(pos, neg, &self.max[x.clone()], &self.min[x], out);
    }

    /// Mean value row of `block`, kv head `head`.
    pub fn mean_value(&self, block: usize, head: usize) -> &[f32] {
        let at = (block * self.heads + head) * self.head_dim;
        &self.vmean[at..at + self.head_dim]
    }

    /// All mean key rows, `blocks × heads × head_dim` (block-major).
    pub fn mean_keys(&self) -> &[f32] {
        &self.mean
    }

    /// All mean value rows, laid out as [`Self::mean_keys`].
    pub fn mean_values(&self) -> &[f32] {
        &self.vmean
    }

    /// Mean key row of `block`, kv head `head`.
    pub fn mean_key(&self, block: usize, head: usize) -> &[f32] {
        let at = (block * self.heads + head) * self.head_dim;
        &self.mean[at..at + self.head_dim]
    }

    /// `p · mean key` of `block`, kv head `head`.
    pub fn mean_dot(&self, block: usize, head: usize, p: &[f32]) -> f32 {
        dot(p, self.mean_key(block, head))
    }
}

/// A dot product in 8 independent lanes, which the compiler turns into SIMD without any
/// `unsafe` (a plain iterator sum is one serial chain).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(rows: &[[f32; 4]]) -> Vec<f16> {
        rows.iter().flatten().map(|&x| f16::from_f32(x)).collect()
    }

    #[test]
    fn quest_bounds_every_key_and_mean_is_the_average() {
        let k0 = keys(&[[1.0, -2.0, 0.5, 3.0], [-1.0, 4.0, 0.25, -3.0]]);
        let k1 = keys(&[[0.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]]);
        let mut s = LayerSummaries::new(2, 4);
        let (v0, v1) = (k1.clone(), k0.clone());
        s.push_block(
            |h| if h == 0 { &k0 } else { &k1 },
            |h| if h == 0 { &v0 } else { &v1 },
        );
        assert_eq!(s.mean_value(0, 0), &[1.0, 1.0, 1.0, 1.5]);
        assert_eq!(s.mean_value(0, 1), &[0.0, 1.0, 0.375, 0.0]);
        assert_eq!(s.blocks(), 1);
        let p = [0.5f32, -1.0, 2.0, -0.25];
        let pp: Vec<f32> = p.iter().map(|x| x.max(0.0)).collect();
        let pn: Vec<f32> = p.iter().map(|x| x.min(0.0)).collect();
        for (h, k) in [&k0, &k1].into_iter().enumerate() {
            let bound = s.quest(0, h, &pp, &pn);
            let mut mean = 0.0;
            for row in k.chunks_exact(4) {
                let d: f32 = row.iter().zip(&p).map(|(k, p)| k.to_f32() * p).sum();
                assert!(d <= bound + 1e-6, "key score {d} above bound {bound}");
                mean += d / 2.0;
            }
            assert!((s.mean_dot(0, h, &p) - mean).abs() < 1e-6);
        }
    }

    /// Runs split a block's tokens: every run's bound still covers its keys, so the block's
    /// bound (the best run's) covers every key, and it is never looser than one run's.
    #[test]
    fn quest_runs_bound_every_key_and_tighten() {
        let rows: Vec<[f32; 4]> = (0..8)
            .map(|i| {
                let x = i as f32;
                [
                    x * 0.5 - 2.0,
                    3.0 - x,
                    (x * 1.7).sin(),
                    if i % 3 == 0 { 4.0 } else { -1.0 },
                ]
            })
            .collect();
        let k = keys(&rows);
        let mut one = LayerSummaries::new(1, 4);
        one.push_block(|_| &k, |_| &k);
        for runs in [2, 3, 4, 8, 16] {
            let mut s = LayerSummaries::with_runs(1, 4, runs);
            s.push_block(|_| &k, |_| &k);
            assert_eq!(s.blocks(), 1);
            for p in [
                [0.5f32, -1.0, 2.0, -0.25],
                [-1.0, 0.3, 0.0, 1.0],
                [0.0, 0.0, 1.0, 0.0],
            ] {
                let pp: Vec<f32> = p.iter().map(|x| x.max(0.0)).collect();
                let pn: Vec<f32> = p.iter().map(|x| x.min(0.0)).collect();
                let bound = s.quest(0, 0, &pp, &pn);
                let best = k
                    .chunks_exact(4)
                    .map(|r| r.iter().zip(&p).map(|(k, p)| k.to_f32() * p).sum::<f32>())
                    .fold(f32::NEG_INFINITY, f32::max);
                assert!(
                    best <= bound + 1e-5,
                    "runs {runs}: key {best} above {bound}"
                );
                assert!(bound <= one.quest(0, 0, &pp, &pn) + 1e-5);
                let mut grouped = [0.0f32; 2];
                let pos = [pp.as_slice(), &pn].concat();
                let neg = [pn.as_slice(), &pp].concat();
                s.quest_group(0, 0, &pos, &neg, &mut grouped);
                // Same bound; the grouped path may sum in another order (SIMD).
                assert!((grouped[0] - bound).abs() <= 1e-5);
                assert!((grouped[1] - s.quest(0, 0, &pn, &pp)).abs() <= 1e-5);
            }
        }
    }

    #[test]
    fn lane_dot_matches_plain_sum() {
        let a: Vec<f32> = (0..21).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..21).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
    }
}
