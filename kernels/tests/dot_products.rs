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
fn dot2_matches_an_f64_reference() {
    use instinfer_kernels::simd_math::{dot2, dot2_scalar};
    // Lengths around the 8-lane width, values of both signs; tolerance relative to the sum of
    // absolute products (f32 accumulation in a different order).
    for n in [0usize, 1, 7, 8, 9, 64, 67, 128] {
        let v = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| (((i * 37 + seed * 101) % 97) as f32 - 48.0) * 0.031)
                .collect()
        };
        let (a, b, c, e) = (v(1), v(2), v(3), v(4));
        let exact: f64 = (0..n)
            .map(|i| a[i] as f64 * b[i] as f64 + c[i] as f64 * e[i] as f64)
            .sum();
        let scale: f64 = (0..n)
            .map(|i| (a[i] as f64 * b[i] as f64).abs() + (c[i] as f64 * e[i] as f64).abs())
            .sum::<f64>()
            .max(1.0);
        for (name, got) in [
            ("simd", dot2(&a, &b, &c, &e)),
            ("scalar", dot2_scalar(&a, &b, &c, &e)),
        ] {
            assert!(
                (got as f64 - exact).abs() <= 1e-6 * scale,
                "{name} n={n}: {got} vs {exact}"
            );
        }
    }
}
