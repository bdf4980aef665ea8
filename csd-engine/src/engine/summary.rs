//! Per-page key summaries kept in RAM (the drive's DRAM): for every (layer, kv head, full
//! block) the element-wise key minimum and maximum (Quest's bound) and the mean key (a
//! representative key). Built from the keys as they are appended, or rebuilt from the pages
//! when a persisted sequence is restored.

use half::f16;

/// Summaries of one (sequence, layer): `blocks × heads × head_dim` each.
#[derive(Clone, Debug, Default)]
pub struct LayerSummaries {
    heads: usize,
    head_dim: usize,
    min: Vec<f32>,
    max: Vec<f32>,
    mean: Vec<f32>,
}

/// Bytes of RAM one (kv head, block) summary takes.
pub fn bytes_per_head_block(head_dim: usize) -> usize {
    3 * head_dim * std::mem::size_of::<f32>()
}

impl LayerSummaries {
    pub fn new(heads: usize, head_dim: usize) -> Self {
        LayerSummaries {
            heads,
            head_dim,
            ..Default::default()
        }
    }

    /// Blocks summarised.
    pub fn blocks(&self) -> usize {
        self.min.len() / (self.heads * self.head_dim).max(1)
    }

    /// RAM held, in bytes.
    pub fn bytes(&self) -> usize {
        (self.min.len() + self.max.len() + self.mean.len()) * std::mem::size_of::<f32>()
    }

    /// Add the next block; `keys(head)` gives its `block_tokens × head_dim` key rows.
    pub fn push_block<'a>(&mut self, keys: impl Fn(usize) -> &'a [f16]) {
        let d = self.head_dim;
        for h in 0..self.heads {
            let rows = keys(h);
            let (mut lo, mut hi, mut sum) = (
                vec![f32::INFINITY; d],
                vec![f32::NEG_INFINITY; d],
                vec![0.0f32; d],
            );
            let n = rows.len() / d;
            for row in rows.chunks_exact(d) {
                for (i, &x) in row.iter().enumerate() {
                    let x = x.to_f32();
                    lo[i] = lo[i].min(x);
                    hi[i] = hi[i].max(x);
                    sum[i] += x;
                }
            }
            let inv = 1.0 / n.max(1) as f32;
            self.min.extend_from_slice(&lo);
            self.max.extend_from_slice(&hi);
            self.mean.extend(sum.iter().map(|s| s * inv));
        }
    }

    /// Quest's upper bound of `p · k` over the keys of `block`, kv head `head`.
    pub fn quest(&self, block: usize, head: usize, p_pos: &[f32], p_neg: &[f32]) -> f32 {
        let at = (block * self.heads + head) * self.head_dim;
        let r = at..at + self.head_dim;
        dot(p_pos, &self.max[r.clone()]) + dot(p_neg, &self.min[r])
    }

    /// `p · mean key` of `block`, kv head `head`.
    pub fn mean_dot(&self, block: usize, head: usize, p: &[f32]) -> f32 {
        let at = (block * self.heads + head) * self.head_dim;
        dot(p, &self.mean[at..at + self.head_dim])
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
        s.push_block(|h| if h == 0 { &k0 } else { &k1 });
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

    #[test]
    fn lane_dot_matches_plain_sum() {
        let a: Vec<f32> = (0..21).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..21).map(|i| 1.0 - i as f32 * 0.25).collect();
        let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - plain).abs() < 1e-4);
    }
}
