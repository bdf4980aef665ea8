//! An estimate of what the pages a sparse step skipped would add to attention, from their
//! RAM summaries alone (no I/O): each skipped block stands in as `block_tokens` copies of its
//! mean key and mean value. In a model whose heads spread part of their attention thinly over
//! the whole context, that thin share is what selection cannot afford to read; dropping it
//! biases every output towards the selected pages, while the block means keep its direction
//! (the idea of SparQ's mean-value reallocation, here per block). The exact part is merged
//! with the estimate by log-sum-exp, like any other partial.

use super::summary::LayerSummaries;
use instinfer_kernels::gather::{gathered_scores, gathered_sum};
use instinfer_kernels::multi_head::Heads;
use instinfer_kernels::simd_math::exp_sub_sum;
use rayon::prelude::*;

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
    if skipped.is_empty() {
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        return;
    }
    let scale = 1.0 / (d as f32).sqrt();
    let ln_tokens = (block_tokens as f32).ln();
    // The query heads of one kv head share its summaries: each block's mean key and mean
    // value are loaded once for the whole group. Groups are independent: run them across the
    // pool when there is enough work.
    let group = |(kv, (o, l)): (usize, (&mut [f32], &mut [f32]))| {
        let qg = &q[kv * g * d..(kv + 1) * g * d];
        group_estimate(qg, d, kv, summ, skipped, scale, ln_tokens, o, l);
    };
    let (outs, lses) = (out.chunks_mut(g * d), lse.chunks_mut(g));
    if skipped.len() * hd.q_heads >= PARALLEL_MIN_ROWS {
        let v: Vec<_> = outs.zip(lses).enumerate().collect();
        v.into_par_iter().for_each(group);
    } else {
        outs.zip(lses).enumerate().for_each(group);
    }
}

/// Skipped blocks × query heads below which the estimate stays on the calling thread.
const PARALLEL_MIN_ROWS: usize = 2048;

/// [`skipped_attention`] for the query heads `q` (`g × d`) of kv head `kv`.
#[allow(clippy::too_many_arguments)]
fn group_estimate(
    q: &[f32],
    d: usize,
    kv: usize,
    summ: &LayerSummaries,
    skipped: &[u32],
    scale: f32,
    ln_tokens: f32,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let n = skipped.len();
    let (stride, offset) = (summ.heads() * d, kv * d);
    let mut logits = vec![0.0f32; lse.len() * n];
    let keys = summ.mean_keys();
    gathered_scores(
        q,
        keys,
        stride,
        offset,
        skipped,
        scale,
        ln_tokens,
        &mut logits,
    );
    for (i, l) in logits.chunks_exact_mut(n).enumerate() {
        lse[i] = softmax(l);
    }
    out.fill(0.0);
    gathered_sum(&logits, summ.mean_values(), stride, offset, skipped, out);
}

/// [`skipped_attention`] when each query head's log-mass of every block is already known
/// from the blocks' key sketches (`logits`: `q_heads × blocks`, scaled scores summed over
/// each block's tokens): a skipped block stands in as its mean value carrying that mass.
/// Unlike mean keys, this keeps the spread of the block's scores (no Jensen gap), so the
/// skipped share of the attention is as right as the sketch.
pub fn sketched_skipped_attention(
    hd: Heads,
    logits: &[f32],
    summ: &LayerSummaries,
    skipped: &[u32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (d, g, n) = (hd.head_dim, hd.group(), skipped.len());
    let blocks = logits.len() / hd.q_heads.max(1);
    if n == 0 {
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        return;
    }
    let stride = summ.heads() * d;
    let mut w = vec![0.0f32; g * n];
    for kv in 0..hd.kv_heads {
        for (i, row) in w.chunks_exact_mut(n).enumerate() {
            let head = kv * g + i;
            let l = &logits[head * blocks..(head + 1) * blocks];
            for (x, &b) in row.iter_mut().zip(skipped) {
                *x = l[b as usize];
            }
            lse[head] = softmax(row);
        }
        let o = &mut out[kv * g * d..(kv + 1) * g * d];
        o.fill(0.0);
        gathered_sum(&w, summ.mean_values(), stride, kv * d, skipped, o);
    }
}

/// Turn logits into softmax weights in place; returns their log-sum-exp.
fn softmax(logits: &mut [f32]) -> f32 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total = exp_sub_sum(logits, m) as f32;
    let inv = 1.0 / total;
    logits.iter_mut().for_each(|w| *w *= inv);
    m + total.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// Blocks whose keys are all equal are estimated exactly, from mean keys and from key
    /// sketches alike: the estimate then equals exact attention over their tokens.
    #[test]
    fn uniform_blocks_are_estimated_exactly() {
        use super::super::summary::SketchScratch;
        let hd = Heads {
            q_heads: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let t = 4;
        let mut summ = LayerSummaries::new(2, 8).sketched(true);
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
        let mut logits = vec![0.0f32; 4 * 3];
        let mut scratch = SketchScratch::default();
        let scaled: Vec<f32> = q.iter().map(|x| x / 8f32.sqrt()).collect();
        for b in 0..3 {
            for kv in 0..2 {
                let mut l = [0.0f32; 2];
                summ.sketch_lse(b, kv, &scaled[kv * 16..(kv + 1) * 16], &mut scratch, &mut l);
                for (i, x) in l.iter().enumerate() {
                    logits[(kv * 2 + i) * 3 + b] = *x;
                }
            }
        }
        let mut out = vec![0.0f32; 32];
        let mut lse = vec![0.0f32; 4];
        let mut out2 = vec![0.0f32; 32];
        let mut lse2 = vec![0.0f32; 4];
        skipped_attention(hd, &q, &summ, &skipped, t, &mut out, &mut lse);
        sketched_skipped_attention(hd, &logits, &summ, &skipped, &mut out2, &mut lse2);
        for (out, lse) in [(&out, &lse), (&out2, &lse2)] {
            for head in 0..4 {
                let kv = head / 2;
                let qh = &q[head * 8..(head + 1) * 8];
                let mut logits = Vec::new();
                let mut rows = Vec::new();
                for &b in &skipped {
                    let (k, v) = (&keys[b as usize][kv], &vals[b as usize][kv]);
                    for tok in 0..t {
                        let s: f32 = (0..8).map(|i| qh[i] * k[tok * 8 + i].to_f32()).sum::<f32>()
                            / 8f32.sqrt();
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
        }
        let mut none = vec![0.0f32; 4];
        skipped_attention(hd, &q, &summ, &[], t, &mut out, &mut none);
        assert!(none.iter().all(|l| *l == f32::NEG_INFINITY));
        let mut none = vec![0.0f32; 4];
        sketched_skipped_attention(hd, &logits, &summ, &[], &mut out, &mut none);
        assert!(none.iter().all(|l| *l == f32::NEG_INFINITY));
    }
}
