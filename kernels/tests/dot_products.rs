//! Each quantized dot product against (1) its scalar reference and (2) a plain f32 dot of
//! the dequantized rows.

use instinfer_kernels::quant::{dequantize_row, quantize_row, vec_dot, vec_dot_scalar};
use instinfer_kernels::GgmlType;
use proptest::prelude::*;

fn dequant(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize_row(ty, bytes, &mut out).unwrap();
    out
}

fn quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(x.len()).unwrap()];
    quantize_row(ty, x, &mut out).unwrap();
    out
}

/// Checks one weight type on rows `w` and `x`; returns (simd, scalar, exact-of-dequantized).
fn check(ty: GgmlType, w: &[f32], x: &[f32]) {
    let n = w.len();
    let wq = quant(ty, w);
    let xq = quant(ty.vec_dot_type(), x);
    let simd = vec_dot(ty, n, &wq, &xq).unwrap();
    let scalar = vec_dot_scalar(ty, n, &wq, &xq).unwrap();
    let wd = dequant(ty, &wq, n);
    let xd = dequant(ty.vec_dot_type(), &xq, n);
    let exact: f64 = wd.iter().zip(&xd).map(|(a, b)| *a as f64 * *b as f64).sum();
    let mag: f64 = wd
        .iter()
        .zip(&xd)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum::<f64>()
        + 1e-6;
    // SIMD and scalar differ only in summation order: a few f32 ulps of the magnitude.
    assert!(
        ((simd - scalar) as f64).abs() <= 1e-5 * mag,
        "{ty}: simd {simd} scalar {scalar} (mag {mag})"
    );
    // Against the dequantized product: Q8_1's stored block sum is an f16 (relative 1e-3).
    let tol = if ty.vec_dot_type() == GgmlType::Q8_1 {
        2e-3
    } else {
        1e-5
    };
    assert!(
        (scalar as f64 - exact).abs() <= tol * mag,
        "{ty}: scalar {scalar} exact {exact} (mag {mag})"
    );
}

fn rows(n: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (
        prop::collection::vec(-4.0f32..4.0, n),
        prop::collection::vec(-4.0f32..4.0, n),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn q4_0((w, x) in rows(256)) { check(GgmlType::Q4_0, &w, &x) }
    #[test]
    fn q4_1((w, x) in rows(256)) { check(GgmlType::Q4_1, &w, &x) }
    #[test]
    fn q8_0((w, x) in rows(256)) { check(GgmlType::Q8_0, &w, &x) }
    #[test]
    fn f16((w, x) in rows(200)) { check(GgmlType::F16, &w, &x) }
    #[test]
    fn bf16((w, x) in rows(200)) { check(GgmlType::BF16, &w, &x) }
    #[test]
    fn f32((w, x) in rows(203)) { check(GgmlType::F32, &w, &x) }
}

#[test]
fn a_row_that_is_not_whole_blocks_is_an_error() {
    let err = vec_dot(GgmlType::Q4_1, 33, &[0u8; 40], &[0u8; 72]).unwrap_err();
    assert!(err.to_string().contains("not a multiple"), "{err}");
}

#[test]
fn swiglu_and_exp_match_libm() {
    use instinfer_kernels::simd_math::{exp_approx, swiglu, swiglu_scalar};
    // The polynomial's documented error is about 1.5 ulp.
    for i in -2000..2000 {
        let x = i as f32 * 0.04;
        let (e, r) = (exp_approx(x), x.exp());
        assert!(
            (e - r).abs() <= 2.5 * f32::EPSILON * r,
            "exp({x}) = {e}, libm {r}"
        );
    }
    // Far tails: subnormal results and flush to zero / infinity behave.
    assert!(exp_approx(-100.0) > 0.0 && exp_approx(-100.0) < 1e-40);
    assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_approx(-200.0), 0.0);
    let g: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) * 0.3).collect();
    let u: Vec<f32> = (0..100).map(|i| (i as f32) * 0.01 - 0.2).collect();
    let (mut a, mut b) = (g.clone(), g.clone());
    swiglu(&mut a, &u);
    swiglu_scalar(&mut b, &u);
    for i in 0..100 {
        let want = g[i] / (1.0 + (-g[i]).exp()) * u[i];
        assert!(
            (a[i] - want).abs() <= 1e-5 * want.abs().max(1e-3),
            "simd {i}: {} vs {want}",
            a[i]
        );
        assert!(
            (b[i] - want).abs() <= 1e-5 * want.abs().max(1e-3),
            "scalar {i}: {} vs {want}",
            b[i]
        );
    }
}

#[test]
fn simd_activation_quantization_is_bit_identical_to_the_scalar_reference() {
    // Includes exact .5 ties (x·127/amax lands on half-integers) and an all-zero block.
    let mut x: Vec<f32> = (0..32 * 40)
        .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0)
        .collect();
    x[..32]
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = if i == 0 { 127.0 } else { i as f32 + 0.5 });
    x[32..64].fill(0.0);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1] {
        let simd = quant(ty, &x);
        let scalar = instinfer_kernels::quant::quantize_row_scalar(ty, &x);
        assert_eq!(simd, scalar, "{ty}");
    }
}

#[test]
fn quest_bound_matches_an_f64_reference() {
    use half::f16;
    use instinfer_kernels::bound::{quest_bound, quest_bound_scalar};
    // Probe counts around the 4 scored per pass, several runs, a head size the SIMD path
    // takes (64) and one it leaves to the scalar path (12). Tolerance relative to the sum of
    // absolute products (f32 accumulation in another order).
    let v = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 37 + seed * 101) % 97) as f32 - 48.0) * 0.031)
            .collect()
    };
    for d in [64usize, 12] {
        for probes in [1usize, 3, 4, 5, 9] {
            for runs in [1usize, 2, 4, 5] {
                let p = v(probes * d, probes + runs);
                let pos: Vec<f32> = p.iter().map(|x| x.max(0.0)).collect();
                let neg: Vec<f32> = p.iter().map(|x| x.min(0.0)).collect();
                let hi: Vec<f16> = v(runs * d, 7).iter().map(|&x| f16::from_f32(x)).collect();
                let lo: Vec<f16> = v(runs * d, 9).iter().map(|&x| f16::from_f32(x)).collect();
                let mut simd = vec![0.0f32; probes];
                let mut scalar = vec![0.0f32; probes];
                quest_bound(&pos, &neg, &hi, &lo, &mut simd);
                quest_bound_scalar(&pos, &neg, &hi, &lo, &mut scalar);
                for g in 0..probes {
                    let term = |r: usize, i: usize| {
                        let at = g * d + i;
                        (
                            pos[at] as f64 * hi[r * d + i].to_f64(),
                            neg[at] as f64 * lo[r * d + i].to_f64(),
                        )
                    };
                    let mut exact = f64::NEG_INFINITY;
                    let mut scale = 1.0f64;
                    for r in 0..runs {
                        let s: f64 = (0..d).map(|i| term(r, i).0 + term(r, i).1).sum();
                        exact = exact.max(s);
                        let a: f64 = (0..d)
                            .map(|i| term(r, i).0.abs() + term(r, i).1.abs())
                            .sum();
                        scale = scale.max(a);
                    }
                    for (name, got) in [("simd", simd[g]), ("scalar", scalar[g])] {
                        assert!(
                            (got as f64 - exact).abs() <= 1e-6 * scale,
                            "{name} d={d} probes={probes} runs={runs} probe {g}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
    let mut none = [0.0f32; 2];
    quest_bound(&[0.0; 128], &[0.0; 128], &[], &[], &mut none);
    assert_eq!(none, [f32::NEG_INFINITY; 2]);
}

#[test]
fn gathered_products_match_an_f64_reference() {
    use instinfer_kernels::gather::{
        gathered_scores, gathered_scores_scalar, gathered_sum, gathered_sum_scalar,
    };
    // A table of 40 rows of 3 interleaved heads; gather head 1 of some rows, for 1 to 5 query
    // rows (the SIMD path takes up to 4, a width of 64; the rest falls back to scalar).
    for d in [64usize, 12] {
        let stride = 3 * d;
        let table: Vec<f32> = (0..40 * stride)
            .map(|i| (((i * 53) % 89) as f32 - 44.0) * 0.021)
            .collect();
        let idx: Vec<u32> = vec![0, 7, 3, 39, 12, 12, 25];
        let n = idx.len();
        for g in 1..=5usize {
            let q: Vec<f32> = (0..g * d)
                .map(|i| ((i * 29 % 31) as f32 - 15.0) * 0.05)
                .collect();
            let row = |r: u32| &table[r as usize * stride + d..r as usize * stride + 2 * d];
            let mut simd = vec![0.0f32; g * n];
            let mut scalar = vec![0.0f32; g * n];
            gathered_scores(&q, &table, stride, d, &idx, 0.125, 0.5, &mut simd);
            gathered_scores_scalar(&q, &table, stride, d, &idx, 0.125, 0.5, &mut scalar);
            for i in 0..g {
                for (j, &r) in idx.iter().enumerate() {
                    let qi = &q[i * d..(i + 1) * d];
                    let exact: f64 = qi
                        .iter()
                        .zip(row(r))
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum::<f64>();
                    let exact = 0.125 * exact + 0.5;
                    for got in [simd[i * n + j], scalar[i * n + j]] {
                        assert!(
                            (got as f64 - exact).abs() < 1e-5,
                            "d={d} g={g}: {got} vs {exact}"
                        );
                    }
                }
            }
            let w: Vec<f32> = (0..g * n).map(|i| (i % 5) as f32 * 0.2 - 0.3).collect();
            let start: Vec<f32> = (0..g * d).map(|i| (i % 3) as f32).collect();
            let (mut simd, mut scalar) = (start.clone(), start.clone());
            gathered_sum(&w, &table, stride, d, &idx, &mut simd);
            gathered_sum_scalar(&w, &table, stride, d, &idx, &mut scalar);
            for i in 0..g {
                for k in 0..d {
                    let exact: f64 = start[i * d + k] as f64
                        + idx
                            .iter()
                            .enumerate()
                            .map(|(j, &r)| w[i * n + j] as f64 * row(r)[k] as f64)
                            .sum::<f64>();
                    for got in [simd[i * d + k], scalar[i * d + k]] {
                        assert!(
                            (got as f64 - exact).abs() < 1e-5,
                            "d={d} g={g}: {got} vs {exact}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn key_sketch_rebuilds_within_half_a_step_and_scores_match_an_f64_reference() {
    use half::f16;
    use instinfer_kernels::sketch::{encode, scores, scores_scalar};
    let v = |n: usize, seed: usize, amp: f32| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 53 + seed * 29) % 101) as f32 - 50.0) * 0.02 * amp)
            .collect()
    };
    // Widths the SIMD path takes (64, 128) and ones it leaves to the scalar path (12, 40);
    // runs of 1 to 17 keys (the SIMD path reduces 8 rows at a time).
    for d in [64usize, 128, 12, 40] {
        for rows in [1usize, 8, 9, 17] {
            // One dimension in four is an outlier, as RoPE pairs of real keys are.
            let keys: Vec<f16> = v(rows * d, rows + d, 1.0)
                .iter()
                .enumerate()
                .map(|(i, &x)| f16::from_f32(if i % 4 == 1 { x * 20.0 } else { x }))
                .collect();
            let mut lo = vec![f16::INFINITY; d];
            let mut hi = vec![f16::NEG_INFINITY; d];
            for row in keys.chunks_exact(d) {
                for i in 0..d {
                    lo[i] = lo[i].min(row[i]);
                    hi[i] = hi[i].max(row[i]);
                }
            }
            let mut codes = Vec::new();
            encode(&keys, &lo, &hi, &mut codes);
            assert_eq!(codes.len(), rows * d / 2);
            let rebuilt = |t: usize, i: usize| -> f64 {
                let half = d / 2;
                let b = codes[t * half + i % half];
                let c = if i < half { b & 15 } else { b >> 4 };
                let (l, h) = (lo[i].to_f64(), hi[i].to_f64());
                l + c as f64 * (h - l) / 15.0
            };
            for t in 0..rows {
                for i in 0..d {
                    let step = (hi[i].to_f64() - lo[i].to_f64()) / 15.0;
                    let err = (rebuilt(t, i) - keys[t * d + i].to_f64()).abs();
                    assert!(err <= step / 2.0 + 1e-6, "d={d} t={t} i={i}: off by {err}");
                }
            }
            for probes in [1usize, 3, 4, 5, 9] {
                let p = v(probes * d, probes, 1.0);
                let mut simd = vec![0.0f32; probes * rows];
                let mut scalar = vec![0.0f32; probes * rows];
                scores(&p, &lo, &hi, &codes, &mut simd);
                scores_scalar(&p, &lo, &hi, &codes, &mut scalar);
                for g in 0..probes {
                    // The int8 probe's rounding: at most half a unit of max |p_i · step_i| / 127
                    // per dimension, times the largest code.
                    let amax = (0..d)
                        .map(|i| (p[g * d + i] * (hi[i].to_f32() - lo[i].to_f32()) / 15.0).abs())
                        .fold(0.0f32, f32::max) as f64;
                    let probe_err = d as f64 * 15.0 * 0.5 * amax / 127.0;
                    for t in 0..rows {
                        let term = |i: usize| p[g * d + i] as f64 * rebuilt(t, i);
                        let exact: f64 = (0..d).map(term).sum();
                        let scale: f64 = (0..d).map(|i| term(i).abs()).sum::<f64>().max(1.0);
                        let (a, b) = (simd[g * rows + t] as f64, scalar[g * rows + t] as f64);
                        assert!(
                            (a - b).abs() <= 1e-5 * scale,
                            "d={d} rows={rows} probes={probes} ({g}, {t}): simd {a} scalar {b}"
                        );
                        assert!(
                            (b - exact).abs() <= probe_err + 1e-5 * scale,
                            "d={d} rows={rows} probes={probes} ({g}, {t}): {b} vs {exact}, bound {probe_err}"
                        );
                    }
                }
            }
        }
    }
    // A constant dimension (zero range) codes as 0 and rebuilds exactly.
    let keys = [f16::from_f32(2.5); 4];
    let mut codes = Vec::new();
    encode(&keys, &keys[..2], &keys[..2], &mut codes);
    assert_eq!(codes, vec![0, 0]);
    let mut out = [0.0f32; 2];
    scores(&[1.0, 1.0], &keys[..2], &keys[..2], &codes, &mut out);
    assert_eq!(out, [5.0, 5.0]);
}
