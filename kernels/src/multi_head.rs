//! Multi-head (grouped-query) attention of one sequence's queries over a set of KV segments
//! per kv head, with the log-sum-exp of every (query, head) so partial results over disjoint
//! pages can be merged. Both KV backends call this, the RAM cache and the storage engine, so
//! they give the same bits.

use crate::attention::{attend, merge, AttnScratch, KvSegment, ReduceOrder};
use rayon::prelude::*;

/// Query positions attended together per task.
const QUERY_TILE: usize = 64;
/// Query-key pairs below which the work stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 16384;

/// The head layout of one attention call: query heads share kv heads in equal groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heads {
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads (a divisor of `q_heads`).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl Heads {
    /// Values of one token's queries over all heads.
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

/// Attention of `q` (`n × q_dim`, positions `first_pos..`) over `segments[kv_head]`, causally
/// masked. Writes `out` (`n × q_dim`) and `lse` (`n × q_heads`; `-inf` where no key was
/// visible, with a zero output).
pub fn attend_partial(
    hd: Heads,
    q: &[f32],
    first_pos: usize,
    segments: &[Vec<KvSegment<'_>>],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let (d, g, qd) = (hd.head_dim, hd.group(), hd.q_dim());
    let n = q.len() / qd;
    let scale = 1.0 / (d as f32).sqrt();
    // Prompt chunks reduce like llama.cpp's batched kernel, single tokens like its vector
    // kernel, as the model's in-RAM attention does.
    let order = if n > 1 {
        ReduceOrder::Gemm
    } else {
        ReduceOrder::Gemv
    };
    let keys: usize = segments
        .first()
        .map_or(0, |s| s.iter().map(|x| x.keys.len() / d).sum());
    let tiles: Vec<(usize, usize)> = (0..hd.kv_heads)
        .flat_map(|h| (0..n).step_by(QUERY_TILE).map(move |t0| (h, t0)))
        .collect();
    let run = |scratch: &mut AttnScratch, (h, t0): (usize, usize)| {
        let t1 = (t0 + QUERY_TILE).min(n);
        let rows = (t1 - t0) * g;
        let mut qt = Vec::with_capacity(rows * d);
        let mut pos = Vec::with_capacity(rows);
        for t in t0..t1 {
            for j in 0..g {
                let head = h * g + j;
                qt.extend_from_slice(&q[t * qd + head * d..t * qd + (head + 1) * d]);
                pos.push(first_pos + t);
            }
        }
        let mut o = vec![0.0f32; rows * d];
        let mut l = vec![0.0f32; rows];
        attend(
            &qt,
            &pos,
            &segments[h],
            d,
            scale,
            order,
            &mut o,
            &mut l,
            scratch,
        );
        (h, t0, o, l)
    };
    let results: Vec<_> = if n * keys * hd.kv_heads < PARALLEL_MIN_WORK {
        let mut scratch = AttnScratch::default();
        tiles.into_iter().map(|t| run(&mut scratch, t)).collect()
    } else {
        tiles
            .into_par_iter()
            .map_init(AttnScratch::default, run)
            .collect()
    };
    for (h, t0, o, l) in results {
        for (r, chunk) in o.chunks_exact(d).enumerate() {
            let (t, j) = (t0 + r / g, r % g);
            let head = h * g + j;
            out[t * qd + head * d..t * qd + (head + 1) * d].copy_from_slice(chunk);
            lse[t * hd.q_heads + head] = l[r];
        }
    }
}

/// Fold partial result `(o2, lse2)` into `(out, lse)`: both over disjoint keys of the same
/// queries; the result equals one softmax over the union.
pub fn merge_into(hd: Heads, out: &mut [f32], lse: &mut [f32], o2: &[f32], lse2: &[f32]) {
    let d = hd.head_dim;
    let mut tmp = vec![0.0f32; d];
    for (i, (a, b)) in out.chunks_exact_mut(d).zip(o2.chunks_exact(d)).enumerate() {
        let l = merge(&[&*a, b], &[lse[i], lse2[i]], &mut tmp);
        a.copy_from_slice(&tmp);
        lse[i] = l;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn rows(n: usize, d: usize, seed: u32) -> Vec<f16> {
        (0..n * d)
            .map(|i| {
                let x = (i as u32)
                    .wrapping_mul(2654435761)
                    .wrapping_add(seed.wrapping_mul(40503));
                f16::from_f32(((x >> 8) % 2001) as f32 / 1000.0 - 1.0)
            })
            .collect()
    }

    #[test]
    fn merged_page_partials_equal_one_softmax() {
        let hd = Heads {
            q_heads: 6,
            kv_heads: 2,
            head_dim: 16,
        };
        let (d, t) = (hd.head_dim, 8);
        let blocks = 7;
        let keys: Vec<Vec<f16>> = (0..2).map(|h| rows(blocks * t, d, 10 + h)).collect();
        let vals: Vec<Vec<f16>> = (0..2).map(|h| rows(blocks * t, d, 20 + h)).collect();
        let seg = |h: usize, b: usize| KvSegment {
            keys: &keys[h][b * t * d..(b + 1) * t * d],
            values: &vals[h][b * t * d..(b + 1) * t * d],
            first_pos: b * t,
        };
        let q: Vec<f32> = (0..hd.q_dim())
            .map(|i| (i as f32 * 0.37).sin() * 2.0)
            .collect();
        let pos = blocks * t - 1;
        let all: Vec<Vec<KvSegment>> = (0..2)
            .map(|h| (0..blocks).map(|b| seg(h, b)).collect())
            .collect();
        let (mut o, mut l) = (vec![0.0; hd.q_dim()], vec![0.0; hd.q_heads]);
        attend_partial(hd, &q, pos, &all, &mut o, &mut l);
        // Two disjoint, interleaved page sets.
        let even: Vec<Vec<KvSegment>> = (0..2)
            .map(|h| (0..blocks).step_by(2).map(|b| seg(h, b)).collect())
            .collect();
        let odd: Vec<Vec<KvSegment>> = (0..2)
            .map(|h| (1..blocks).step_by(2).map(|b| seg(h, b)).collect())
            .collect();
        let (mut o1, mut l1) = (vec![0.0; hd.q_dim()], vec![0.0; hd.q_heads]);
        let (mut o2, mut l2) = (vec![0.0; hd.q_dim()], vec![0.0; hd.q_heads]);
        attend_partial(hd, &q, pos, &even, &mut o1, &mut l1);
        attend_partial(hd, &q, pos, &odd, &mut o2, &mut l2);
        merge_into(hd, &mut o1, &mut l1, &o2, &l2);
        for (a, b) in o.iter().zip(&o1) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for (a, b) in l.iter().zip(&l1) {
            assert!((a - b).abs() < 1e-4, "lse {a} vs {b}");
        }
        // An empty partial (no visible key) leaves the other unchanged.
        let none: Vec<Vec<KvSegment>> = vec![Vec::new(), Vec::new()];
        let (mut o3, mut l3) = (vec![0.0; hd.q_dim()], vec![0.0; hd.q_heads]);
        attend_partial(hd, &q, pos, &none, &mut o3, &mut l3);
        let mut o4 = o.clone();
        let mut l4 = l.clone();
        merge_into(hd, &mut o4, &mut l4, &o3, &l3);
        assert_eq!(o4, o);
    }
}
