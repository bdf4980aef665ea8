//! An estimate of what the pages a sparse step skipped would add to attention, from their
//! RAM summaries alone (no I/O): each skipped block stands in as `block_tokens` copies of its
//! mean key and mean value. In a model whose heads spread part of their attention thinly over
//! the whole context, that thin share is what selection cannot afford to read; dropping it
//! biases every output towards the selected pages, while the block means keep its direction
//! (the idea of SparQ's mean-value reallocation, here per block). The exact part is merged
//! with the estimate by log-sum-exp, like any other partial.

use super::compute::Heads;
use super::summary::LayerSummaries;

/// Attention of one decode query `q` (`q_dim`) over the summaries of `skipped` blocks of
/// `block_tokens` tokens each: writes `out` (`q_dim`) and `lse` (`q_heads`; `-inf` when
/// nothing was skipped).
pub fn skipped_attention(
    hd: Heads,
    q: &[f32],
    summ: &LayerSummaries,
    skipped: &[u32],
    block_tokens: usize,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (d, g) = (hd.head_dim, hd.group());
    let scale = 1.0 / (d as f32).sqrt();
    let ln_tokens = (block_tokens as f32).ln();
    let mut logits = vec![0.0f32; skipped.len()];
    for head in 0..hd.q_heads {
        let (qh, kv) = (&q[head * d..(head + 1) * d], head / g);
        let o = &mut out[head * d..(head + 1) * d];
        o.fill(0.0);
        if skipped.is_empty() {
            lse[head] = f32::NEG_INFINITY;
            continue;
        }
        for (l, &b) in logits.iter_mut().zip(skipped) {
            *l = scale * summ.mean_dot(b as usize, kv, qh) + ln_tokens;
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut total = 0.0f32;
        for (l, &b) in logits.iter().zip(skipped) {
            let w = (l - m).exp();
            total += w;
            for (a, &v) in o.iter_mut().zip(summ.mean_value(b as usize, kv)) {
                *a += w * v;
            }
        }
        for a in o.iter_mut() {
            *a /= total;
        }
        lse[head] = m + total.ln();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// Blocks whose keys are all equal are estimated exactly: the estimate then equals exact
    /// attention over their tokens.
    #[test]
    fn uniform_blocks_are_estimated_exactly() {
        let hd = Heads {
            q_heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let t = 4;
        let mut summ = LayerSummaries::new(2, 8);
        let mut keys = Vec::new();
        let mut vals = Vec::new();
        for b in 0..3 {
            let k: Vec<Vec<f16>> = (0..2)
                .map(|h| {
                    let row: Vec<f16> = (0..8)
                        .map(|i| f16::from_f32(((b * 7 + h * 3 + i) % 5) as f32 * 0.25 - 0.5))
                        .collect();
                    row.repeat(t)
                })
                .collect();
            let v: Vec<Vec<f16>> = (0..2)
                .map(|h| {
                    (0..t * 8)
                        .map(|i| f16::from_f32(((b * 11 + h * 5 + i) % 9) as f32 * 0.125 - 0.5))
                        .collect()
                })
                .collect();
            summ.push_block(|h| &k[h], |h| &v[h]);
            keys.push(k);
            vals.push(v);
        }
        let q: Vec<f32> = (0..32).map(|i| (i % 7) as f32 * 0.3 - 0.9).collect();
        let skipped = [0u32, 2];
        let mut out = vec![0.0f32; 32];
        let mut lse = vec![0.0f32; 4];
        skipped_attention(hd, &q, &summ, &skipped, t, &mut out, &mut lse);
        for head in 0..4 {
            let kv = head / 2;
            let qh = &q[head * 8..(head + 1) * 8];
            let mut logits = Vec::new();
            let mut rows = Vec::new();
            for &b in &skipped {
                let (k, v) = (&keys[b as usize][kv], &vals[b as usize][kv]);
                for tok in 0..t {
                    let s: f32 =
                        (0..8).map(|i| qh[i] * k[tok * 8 + i].to_f32()).sum::<f32>() / 8f32.sqrt();
                    logits.push(s as f64);
                    rows.push(&v[tok * 8..(tok + 1) * 8]);
                }
            }
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = logits.iter().map(|l| (l - m).exp()).sum();
            assert!(((m + total.ln()) as f32 - lse[head]).abs() < 1e-4);
            for i in 0..8 {
                let want: f64 = logits
                    .iter()
                    .zip(&rows)
                    .map(|(l, r)| (l - m).exp() / total * r[i].to_f32() as f64)
                    .sum();
                assert!((out[head * 8 + i] as f64 - want).abs() < 1e-4);
            }
        }
        let mut none = vec![0.0f32; 4];
        skipped_attention(hd, &q, &summ, &[], t, &mut out, &mut none);
        assert!(none.iter().all(|l| *l == f32::NEG_INFINITY));
    }
}
