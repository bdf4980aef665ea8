//! Per-page summaries kept in RAM (the drive's DRAM): for every (layer, kv head, full block)
//! the element-wise key minimum and maximum (Quest's bound; f16, since the extremes of f16
//! keys are f16 values), the mean key (a representative key) and the mean value (what the block contributes when its keys score alike, used to
//! estimate the pages a sparse step skips), and optionally a 4-bit sketch of every key
//! (coded against its run's extremes, `head_dim / 2` bytes per token) from which a probe's
//! score with each token, and so each block's share of the attention, is estimated. Built
//! from the K/V as they are appended, or rebuilt from the pages when a persisted sequence
//! is restored.

use half::f16;
use instinfer_kernels::bound::quest_bound;
use instinfer_kernels::simd_math::exp_sub_sum;
use instinfer_kernels::sketch;

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
    /// Whether blocks get key sketches.
    sketched: bool,
    /// Tokens per block (set by the first block; every block is full).
    tokens: usize,
    /// 4-bit key codes per kv head, `blocks × tokens × head_dim / 2` bytes each: one head's
    /// blocks are contiguous, so scoring them streams memory the prefetcher can follow.
    codes: Vec<Vec<u8>>,
}

impl LayerSummaries {
    /// Summaries with one run per block.
    #[cfg(test)]
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

    /// Also keep a 4-bit sketch of every key (see [`Self::sketch_lse`]).
    pub fn sketched(mut self, on: bool) -> Self {
        self.sketched = on;
        self
    }

    /// Whether blocks carry key sketches.
    pub fn has_sketch(&self) -> bool {
        self.sketched
    }

    /// Tokens per sketched block (0 until a sketched block was added).
    pub fn block_tokens(&self) -> usize {
        self.tokens
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
            + self.codes.iter().map(Vec::len).sum::<usize>()
    }

    /// Add the next block; `keys(head)` and `values(head)` give its `block_tokens × head_dim`
    /// key and value rows.
    pub fn push_block<'a, 'b>(
        &mut self,
        keys: impl Fn(usize) -> &'a [f16],
        values: impl Fn(usize) -> &'b [f16],
    ) {
        let d = self.head_dim;
        if self.sketched {
            self.codes.resize_with(self.heads, Vec::new);
        }
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
                if self.sketched && first < last {
                    sketch::encode(&rows[first * d..last * d], &lo, &hi, &mut self.codes[h]);
                }
                self.min.extend_from_slice(&lo);
                self.max.extend_from_slice(&hi);
            }
            if self.sketched {
                if self.tokens == 0 {
                    self.tokens = n;
                }
                assert_eq!(
                    n, self.tokens,
                    "summaries: every block holds the same tokens"
                );
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

    /// For each probe of kv head `head` (`probes`: `g × head_dim`, already scaled), the
    /// log-sum-exp over the sketched keys of `block` of its scores: the log of the block's
    /// unnormalised attention mass under that probe. `scratch` is reused between calls.
    /// Panics if the summaries were built without sketches (a caller's bug).
    pub fn sketch_lse(
        &self,
        block: usize,
        head: usize,
        probes: &[f32],
        scratch: &mut SketchScratch,
        out: &mut [f32],
    ) {
        assert!(self.sketched, "summaries hold no key sketches");
        let (d, n, g) = (self.head_dim, self.tokens, out.len());
        let per_run = n.div_ceil(self.runs).max(1);
        let span = self.runs * d;
        let ranges = (block * self.heads + head) * span;
        let codes = block * n * d / 2;
        let head_codes = &self.codes[head];
        scratch.all.resize(g * n, 0.0);
        for r in 0..self.runs {
            let (first, last) = ((r * per_run).min(n), ((r + 1) * per_run).min(n));
            if first == last {
                continue;
            }
            let rows = last - first;
            // One run covers the block: its probe-major scores are already laid out by probe.
            let one = rows == n;
            if !one {
                scratch.run.resize(g * rows, 0.0);
            }
            sketch::scores(
                probes,
                &self.min[ranges + r * d..ranges + (r + 1) * d],
                &self.max[ranges + r * d..ranges + (r + 1) * d],
                &head_codes[codes + first * d / 2..codes + last * d / 2],
                if one {
                    &mut scratch.all
                } else {
                    &mut scratch.run
                },
            );
            if !one {
                for j in 0..g {
                    scratch.all[j * n + first..j * n + last]
                        .copy_from_slice(&scratch.run[j * rows..(j + 1) * rows]);
                }
            }
        }
        for (j, o) in out.iter_mut().enumerate() {
            let s = &mut scratch.all[j * n..(j + 1) * n];
            let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            *o = m + (exp_sub_sum(s, m) as f32).ln();
        }
    }

    /// Mean value row of `block`, kv head `head`.
    #[cfg(test)]
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

/// Buffers [`LayerSummaries::sketch_lse`] reuses between blocks.
#[derive(Default)]
pub struct SketchScratch {
    run: Vec<f32>,
    all: Vec<f32>,
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

    /// A block's sketched log-mass is within the largest token score error of the exact
    /// log-sum-exp, and that error is at most half a code step per dimension.
    #[test]
    fn sketch_lse_is_within_the_quantization_bound() {
        let (heads, d, n) = (2usize, 16usize, 32usize);
        let k: Vec<Vec<f16>> = (0..heads)
            .map(|h| {
                (0..n * d)
                    .map(|i| {
                        let x = ((i * 31 + h * 7) % 53) as f32 / 53.0 - 0.5;
                        f16::from_f32(if i % d == 3 { x * 30.0 } else { x * 2.0 })
                    })
                    .collect()
            })
            .collect();
        let probes: Vec<f32> = (0..3 * d)
            .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
            .collect();
        for runs in [1usize, 2, 4] {
            let mut s = LayerSummaries::with_runs(heads, d, runs).sketched(true);
            s.push_block(|h| &k[h], |h| &k[h]);
            s.push_block(|h| &k[1 - h], |h| &k[h]);
            assert_eq!(s.blocks(), 2);
            let mut scratch = SketchScratch::default();
            for (b, h) in [(0usize, 0usize), (0, 1), (1, 0), (1, 1)] {
                let keys = &k[if b == 0 { h } else { 1 - h }];
                let mut got = [0.0f32; 3];
                s.sketch_lse(b, h, &probes, &mut scratch, &mut got);
                let per_run = n / runs;
                for (g, p) in probes.chunks_exact(d).enumerate() {
                    let mut exact = 0.0f64;
                    let mut bound = 0.0f64;
                    for r in 0..runs {
                        let rows = &keys[r * per_run * d..(r + 1) * per_run * d];
                        // Codes: half a step per dimension; the int8 probe: half a unit of
                        // its scale per dimension, times the largest code.
                        let mut err = 0.0f64;
                        let mut amax = 0.0f64;
                        for i in 0..d {
                            let col = rows.chunks_exact(d).map(|row| row[i].to_f64());
                            let (lo, hi) =
                                col.fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
                            err += p[i].abs() as f64 * (hi - lo) / 30.0;
                            amax = amax.max(p[i].abs() as f64 * (hi - lo) / 15.0);
                        }
                        err += d as f64 * 7.5 * amax / 127.0;
                        bound = bound.max(err);
                        for row in rows.chunks_exact(d) {
                            let sc: f64 =
                                row.iter().zip(p).map(|(x, y)| x.to_f64() * *y as f64).sum();
                            exact += sc.exp();
                        }
                    }
                    let exact = exact.ln();
                    assert!(
                        (got[g] as f64 - exact).abs() <= bound + 1e-4,
                        "runs {runs} block {b} head {h} probe {g}: {} vs {exact} (bound {bound})",
                        got[g]
                    );
                }
            }
        }
        assert!(LayerSummaries::with_runs(1, 4, 1)
            .sketched(true)
            .has_sketch());
    }

    #[test]
    fn lane_dot_matches_plain_sum() {
        let a: Vec<f32> = (0..21).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..21).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
    }
}
