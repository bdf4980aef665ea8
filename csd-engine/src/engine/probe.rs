//! Activation-aware probe queries (after ActQKV): per layer, running mean and variance of the
//! query activations; for each prefill window, a probe that weighs each token's query by how
//! far its activations deviate from those statistics, so the few tokens that carry the
//! window's signal dominate the probe instead of being averaged away.

/// Running statistics of one layer's query activations (Welford, per element).
#[derive(Clone, Debug, Default)]
pub struct ActivationStats {
    count: u64,
    mean: Vec<f64>,
    m2: Vec<f64>,
    /// The probe of the latest prefill window (`q_dim` values), if any.
    probe: Option<Vec<f32>>,
}

/// Floor on the standard deviation, so constant activations do not divide by zero.
const STD_FLOOR: f64 = 1e-4;

impl ActivationStats {
    /// Query rows observed.
    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn probe(&self) -> Option<&[f32]> {
        self.probe.as_deref()
    }

    pub fn bytes(&self) -> usize {
        (self.mean.len() + self.m2.len()) * 8 + self.probe.as_ref().map_or(0, |p| p.len() * 4)
    }

    /// Fold `q` (`n × q_dim`) into the statistics. A window of more than one token (a
    /// prefill chunk) also replaces the probe with its deviation-weighted mean query.
    pub fn observe(&mut self, q: &[f32], q_dim: usize) {
        if q_dim == 0 || q.is_empty() {
            return;
        }
        if self.mean.len() != q_dim {
            self.mean = vec![0.0; q_dim];
            self.m2 = vec![0.0; q_dim];
            self.count = 0;
        }
        for row in q.chunks_exact(q_dim) {
            self.count += 1;
            let c = self.count as f64;
            for ((m, s), &x) in self.mean.iter_mut().zip(self.m2.iter_mut()).zip(row) {
                let x = x as f64;
                let delta = x - *m;
                *m += delta / c;
                *s += delta * (x - *m);
            }
        }
        let n = q.len() / q_dim;
        if n > 1 {
            self.probe = Some(self.window_probe(q, q_dim));
        }
    }

    /// Deviation score of one query row: mean |z| over its elements.
    pub fn deviation(&self, row: &[f32]) -> f64 {
        let var_div = (self.count.max(2) - 1) as f64;
        let mut z = 0.0;
        for ((&m, &s), &x) in self.mean.iter().zip(&self.m2).zip(row) {
            let sd = (s / var_div).sqrt().max(STD_FLOOR);
            z += ((x as f64 - m) / sd).abs();
        }
        z / row.len().max(1) as f64
    }

    fn window_probe(&self, q: &[f32], q_dim: usize) -> Vec<f32> {
        let weights: Vec<f64> = q.chunks_exact(q_dim).map(|r| self.deviation(r)).collect();
        let total: f64 = weights.iter().sum();
        let mut probe = vec![0.0f64; q_dim];
        for (row, &w) in q.chunks_exact(q_dim).zip(&weights) {
            let w = if total > 0.0 {
                w / total
            } else {
                1.0 / weights.len() as f64
            };
            for (p, &x) in probe.iter_mut().zip(row) {
                *p += w * x as f64;
            }
        }
        probe.into_iter().map(|x| x as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_stats_match_a_direct_computation() {
        let q: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut s = ActivationStats::default();
        s.observe(&q[..12], 3);
        s.observe(&q[12..], 3);
        assert_eq!(s.count(), 10);
        for e in 0..3 {
            let col: Vec<f64> = q.iter().skip(e).step_by(3).map(|&x| x as f64).collect();
            let mean = col.iter().sum::<f64>() / 10.0;
            let var = col.iter().map(|x| (x - mean).powi(2)).sum::<f64>();
            assert!((s.mean[e] - mean).abs() < 1e-12);
            assert!((s.m2[e] - var).abs() < 1e-9);
        }
    }

    #[test]
    fn the_outlier_token_dominates_the_window_probe() {
        let mut s = ActivationStats::default();
        // Nine ordinary tokens and one whose activations stand far out.
        let mut q = Vec::new();
        for i in 0..9 {
            q.extend_from_slice(&[1.0 + 0.01 * i as f32, -1.0, 0.5, 0.0]);
        }
        q.extend_from_slice(&[1.0, -1.0, 0.5, 9.0]);
        s.observe(&q, 4);
        let p = s.probe().expect("window probe");
        let plain_mean = 0.9;
        assert!(p[3] > 2.0 * plain_mean, "outlier weight too small: {p:?}");
    }
}
