//! Attention kernels against a plain f64 softmax reference, and the log-sum-exp merge.

use half::f16;
use instinfer_kernels::attention::{
    attend, attend_scalar, merge, AttnScratch, KvSegment, ReduceOrder,
};
use proptest::prelude::*;

/// Plain reference: softmax over visible keys in f64. Returns (out, lse).
fn reference(q: &[f32], pos: usize, k: &[f16], v: &[f16], d: usize, scale: f32) -> (Vec<f32>, f32) {
    let n = (k.len() / d).min(pos + 1);
    let s: Vec<f64> = (0..n)
        .map(|j| {
            (0..d)
                .map(|c| q[c] as f64 * k[j * d + c].to_f64())
                .sum::<f64>()
                * scale as f64
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let z: f64 = e.iter().sum();
    let out = (0..d)
        .map(|c| ((0..n).map(|j| e[j] * v[j * d + c].to_f64()).sum::<f64>() / z) as f32)
        .collect();
    (out, (m + z.ln()) as f32)
}

fn halves(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

/// Tolerance against the f64 reference: the query and the softmax weights are rounded to
/// f16 (relative 2^-11) as llama.cpp does, over values of magnitude up to 2.
const TOL: f32 = 4e-3;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn causal_tile_matches_reference(
        n_keys in 1usize..150,
        n_q in 1usize..6,
        seed in prop::collection::vec(-2.0f32..2.0, 64 * 160 * 2 + 64 * 6),
    ) {
        let d = 64;
        let k = halves(&seed[..n_keys * d]);
        let v = halves(&seed[64 * 160..64 * 160 + n_keys * d]);
        let q = &seed[64 * 320..64 * 320 + n_q * d];
        // Queries at the last positions, as in a prefill chunk.
        let pos: Vec<usize> = (0..n_q).map(|i| n_keys.saturating_sub(n_q) + i).collect();
        let seg = [KvSegment { keys: &k, values: &v, first_pos: 0 }];
        for order in [ReduceOrder::Gemm, ReduceOrder::Gemv] {
            let (mut out, mut lse) = (vec![0.0; n_q * d], vec![0.0; n_q]);
            let (mut out_s, mut lse_s) = (vec![0.0; n_q * d], vec![0.0; n_q]);
            let mut scratch = AttnScratch::default();
            attend(q, &pos, &seg, d, 0.125, order, &mut out, &mut lse, &mut scratch);
            attend_scalar(q, &pos, &seg, d, 0.125, order, &mut out_s, &mut lse_s, &mut scratch);
            // Same IEEE operations in the same order: SIMD and scalar agree exactly.
            prop_assert_eq!(&out, &out_s);
            prop_assert_eq!(&lse, &lse_s);
            let simd = order;
            for i in 0..n_q {
                let (r, rl) = reference(&q[i * d..(i + 1) * d], pos[i], &k, &v, d, 0.125);
                prop_assert!((lse[i] - rl).abs() < TOL, "lse {} vs {}", lse[i], rl);
                for c in 0..d {
                    prop_assert!((out[i * d + c] - r[c]).abs() < TOL, "{simd:?} q{i} dim {c}: {} vs {}", out[i * d + c], r[c]);
                }
            }
        }
    }

    /// Long contexts in many segments (pages and a staged tail, the last one partly
    /// beyond the queries): the SIMD kernel works through the keys in chunks, which must not
    /// change a bit against the scalar reference, whatever the chunk boundaries cut.
    #[test]
    fn long_segmented_contexts_match_the_scalar_reference_bit_for_bit(
        lens in prop::collection::vec(1usize..300, 1..9),
        // A decode group (the fused kernel) up to a prompt tile (the tiled one).
        n_q in 1usize..13,
        ahead in 0usize..40,
        // Head widths that the decode kernel's column runs divide (64, 96) and one they do
        // not (40: the last run is narrower).
        d in prop::sample::select(vec![64usize, 96, 40]),
        seed in any::<u64>(),
    ) {
        let total: usize = lens.iter().sum();
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        };
        let k = halves(&(0..total * d).map(|_| next()).collect::<Vec<_>>());
        let v = halves(&(0..total * d).map(|_| next()).collect::<Vec<_>>());
        let q: Vec<f32> = (0..n_q * d).map(|_| next()).collect();
        let mut segs = Vec::new();
        let mut start = 0;
        for &len in &lens {
            segs.push(KvSegment { keys: &k[start * d..(start + len) * d], values: &v[start * d..(start + len) * d], first_pos: start });
            start += len;
        }
        // The queries stop `ahead` keys before the end: the last keys are masked.
        let last = total.saturating_sub(1 + ahead);
        let pos: Vec<usize> = (0..n_q).map(|i| last.saturating_sub(n_q - 1 - i)).collect();
        for order in [ReduceOrder::Gemm, ReduceOrder::Gemv] {
            let (mut out, mut lse) = (vec![0.0; n_q * d], vec![0.0; n_q]);
            let (mut out_s, mut lse_s) = (vec![0.0; n_q * d], vec![0.0; n_q]);
            let mut scratch = AttnScratch::default();
            attend(&q, &pos, &segs, d, 0.125, order, &mut out, &mut lse, &mut scratch);
            attend_scalar(&q, &pos, &segs, d, 0.125, order, &mut out_s, &mut lse_s, &mut scratch);
            prop_assert_eq!(&out, &out_s, "{:?}", order);
            prop_assert_eq!(&lse, &lse_s);
            let i = n_q - 1;
            let (r, rl) = reference(&q[i * d..(i + 1) * d], pos[i], &k, &v, d, 0.125);
            prop_assert!((lse[i] - rl).abs() < TOL, "lse {} vs {}", lse[i], rl);
            for c in 0..d {
                prop_assert!((out[i * d + c] - r[c]).abs() < TOL, "{order:?} dim {c}: {} vs {}", out[i * d + c], r[c]);
            }
        }
    }

    #[test]
    fn merging_page_partials_equals_one_softmax(
        cuts in prop::collection::vec(1usize..40, 1..6),
        seed in prop::collection::vec(-3.0f32..3.0, 64 * 400 + 64),
    ) {
        let d = 64;
        let total: usize = cuts.iter().sum();
        let k = halves(&seed[..total * d]);
        let v = halves(&seed[200 * d..200 * d + total * d]);
        let q = &seed[400 * d..401 * d];
        let mut scratch = AttnScratch::default();
        let (mut outs, mut lses, mut start) = (Vec::new(), Vec::new(), 0);
        for &len in &cuts {
            let seg = [KvSegment { keys: &k[start * d..(start + len) * d], values: &v[start * d..(start + len) * d], first_pos: start }];
            let (mut o, mut l) = (vec![0.0; d], vec![0.0; 1]);
            attend(q, &[usize::MAX], &seg, d, 0.125, ReduceOrder::Gemv, &mut o, &mut l, &mut scratch);
            outs.push(o);
            lses.push(l[0]);
            start += len;
        }
        let refs: Vec<&[f32]> = outs.iter().map(|o| o.as_slice()).collect();
        let mut merged = vec![0.0; d];
        let lse = merge(&refs, &lses, &mut merged);
        let (r, rl) = reference(q, usize::MAX - 1, &k, &v, d, 0.125);
        prop_assert!((lse - rl).abs() < TOL);
        for c in 0..d {
            prop_assert!((merged[c] - r[c]).abs() < TOL, "dim {c}: {} vs {}", merged[c], r[c]);
        }
    }
}

#[test]
fn a_query_that_sees_no_key_gets_zero_output_and_minus_infinity_lse() {
    let d = 8;
    let k = halves(&[1.0; 16]);
    let seg = [KvSegment {
        keys: &k,
        values: &k,
        first_pos: 5,
    }];
    let (mut out, mut lse) = (vec![1.0; d], vec![0.0]);
    attend(
        &[1.0; 8],
        &[4],
        &seg,
        d,
        1.0,
        ReduceOrder::Gemm,
        &mut out,
        &mut lse,
        &mut AttnScratch::default(),
    );
    assert_eq!(lse[0], f32::NEG_INFINITY);
    assert!(out.iter().all(|&x| x == 0.0));
}
