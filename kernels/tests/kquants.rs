//! Q4_K / Q5_K / Q6_K / Q5_0 / Q5_1 weights and Q8_K activations:
//!
//! * dequantization matches gguf-py's numpy ports of ggml bit for bit, on the blocks in
//!   `fixtures/kquant_fixtures.json` (made by `fixtures/make_kquant_fixtures.py`; Python is not
//!   needed to run these tests);
//! * Q8_K quantization matches ggml's `quantize_row_q8_K_ref` byte for byte;
//! * every AVX2 dot product matches its scalar reference on seeded random blocks;
//! * `vec_dot(w, quantize(x))` is within the activation-quantization error of `Σ w·x`.

use instinfer_kernels::quant::{dequantize_row, quantize_row, vec_dot, vec_dot_scalar};
use instinfer_kernels::simd::{level, Level};
use instinfer_kernels::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const FIXTURE: &str = include_str!("fixtures/kquant_fixtures.json");

/// The weight types added with the k-quants, and where their f16 scale fields sit in a block.
const WEIGHT_TYPES: [(GgmlType, &[usize]); 5] = [
    (GgmlType::Q4_K, &[0, 2]),
    (GgmlType::Q5_K, &[0, 2]),
    (GgmlType::Q6_K, &[208]),
    (GgmlType::Q5_0, &[0]),
    (GgmlType::Q5_1, &[0, 2]),
];

fn type_named(name: &str) -> GgmlType {
    match name {
        "Q4_K" => GgmlType::Q4_K,
        "Q5_K" => GgmlType::Q5_K,
        "Q6_K" => GgmlType::Q6_K,
        "Q5_0" => GgmlType::Q5_0,
        "Q5_1" => GgmlType::Q5_1,
        other => panic!("fixture names unknown type {other}"),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("bad hex"))
        .collect()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(FIXTURE).expect("fixture is valid JSON")
}

#[test]
fn dequantize_matches_gguf_py() {
    let fx = fixture();
    let types = fx["dequantize"].as_object().expect("dequantize section");
    assert_eq!(
        types.len(),
        WEIGHT_TYPES.len(),
        "one fixture per weight type"
    );
    for (name, case) in types {
        let ty = type_named(name);
        let blocks = unhex(case["blocks"].as_str().unwrap());
        let want = f32s(&unhex(case["values"].as_str().unwrap()));
        let bb = ty.block_bytes().unwrap();
        let bl = ty.block_len().unwrap();
        assert!(
            blocks.len().is_multiple_of(bb),
            "{name}: fixture holds whole blocks"
        );
        assert_eq!(want.len(), blocks.len() / bb * bl, "{name}: value count");
        let mut got = vec![f32::NAN; want.len()];
        dequantize_row(ty, &blocks, &mut got).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            // Exact: the same f32 operations in the same order as ggml/gguf-py.
            assert!(
                g.to_bits() == w.to_bits(),
                "{name}: value {i} (block {}, index {}): got {g:e}, gguf-py {w:e}",
                i / bl,
                i % bl
            );
        }
    }
}

#[test]
fn q8_k_quantize_matches_ggml_reference() {
    let fx = fixture();
    let cases = fx["q8_k_quantize"]
        .as_array()
        .expect("q8_k_quantize section");
    assert!(!cases.is_empty());
    for (c, case) in cases.iter().enumerate() {
        let x = f32s(&unhex(case["input"].as_str().unwrap()));
        let want = unhex(case["block"].as_str().unwrap());
        let mut got = vec![0xAAu8; GgmlType::Q8_K.row_bytes(x.len()).unwrap()];
        quantize_row(GgmlType::Q8_K, &x, &mut got).unwrap();
        assert_eq!(
            got, want,
            "case {c}: Q8_K block bytes differ from ggml's reference"
        );
        // And dequantize is d·q.
        let mut dq = vec![0.0f32; x.len()];
        dequantize_row(GgmlType::Q8_K, &got, &mut dq).unwrap();
        let d = f32::from_le_bytes([got[0], got[1], got[2], got[3]]);
        for (j, v) in dq.iter().enumerate() {
            assert_eq!(v.to_bits(), (d * got[4 + j] as i8 as f32).to_bits());
        }
    }
}

#[test]
fn q8_k_multi_block_row_layout() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x: Vec<f32> = (0..3 * 256).map(|_| normal(&mut rng) * 2.0).collect();
    let mut row = vec![0u8; GgmlType::Q8_K.row_bytes(x.len()).unwrap()];
    assert_eq!(row.len(), 3 * 292);
    quantize_row(GgmlType::Q8_K, &x, &mut row).unwrap();
    for (b, blk) in row.chunks_exact(292).enumerate() {
        let xb = &x[256 * b..256 * b + 256];
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        assert!(
            (d.abs() - amax / 127.0).abs() <= 1e-6 * amax,
            "block {b}: d {d}"
        );
        for g in 0..16 {
            let s: i32 = blk[4 + 16 * g..4 + 16 * g + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            let bs = i16::from_le_bytes([blk[260 + 2 * g], blk[261 + 2 * g]]) as i32;
            assert_eq!(s, bs, "block {b} group {g}");
        }
        for (j, &v) in xb.iter().enumerate() {
            let q = blk[4 + j] as i8 as f32;
            assert!(
                (q * d - v).abs() <= 0.5 * d.abs() * 1.0001,
                "block {b} value {j}"
            );
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1 = rng.random::<f32>().max(1e-7);
    let u2 = rng.random::<f32>();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// `nb` random blocks of `ty`: random bytes (every bit pattern is a valid nibble, high-bit or
/// scale field) with the f16 scale fields replaced by finite values of both signs.
fn random_weights(rng: &mut ChaCha8Rng, ty: GgmlType, f16_offsets: &[usize], nb: usize) -> Vec<u8> {
    let bb = ty.block_bytes().unwrap();
    let mut w: Vec<u8> = (0..nb * bb).map(|_| rng.random::<u8>()).collect();
    for blk in w.chunks_exact_mut(bb) {
        for &off in f16_offsets {
            let mag = 10f32.powf(-3.0 + 2.5 * rng.random::<f32>());
            let v = half::f16::from_f32(normal(rng) * mag);
            blk[off..off + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    w
}

fn random_acts(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    // Mix scales per 32 values so blocks see very different magnitudes.
    let mut x = vec![0.0f32; n];
    for chunk in x.chunks_mut(32) {
        let s = 10f32.powf(-2.0 + 3.0 * rng.random::<f32>());
        for v in chunk {
            *v = normal(rng) * s;
        }
    }
    x
}

fn quantize_acts(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let at = ty.vec_dot_type();
    let mut a = vec![0u8; at.row_bytes(x.len()).unwrap()];
    quantize_row(at, x, &mut a).unwrap();
    a
}

fn dequant(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0.0f32; n];
    dequantize_row(ty, bytes, &mut v).unwrap();
    v
}

#[test]
fn simd_dot_matches_scalar() {
    if level() != Level::Avx2 {
        eprintln!("note: no AVX2 on this CPU (or INSTINFER_FORCE_SCALAR): vec_dot is scalar");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_0001);
    for (ty, f16s) in WEIGHT_TYPES {
        let bl = ty.block_len().unwrap();
        assert!(ty.can_matmul(), "{ty} should be usable in matmul");
        for trial in 0..200 {
            let nb = 1 + trial % 9;
            let n = nb * bl;
            let w = random_weights(&mut rng, ty, f16s, nb);
            let x = random_acts(&mut rng, n);
            let a = quantize_acts(ty, &x);
            let simd = vec_dot(ty, n, &w, &a).unwrap();
            let scalar = vec_dot_scalar(ty, n, &w, &a).unwrap();
            // Both sum the same integer products exactly inside a block; they differ only in
            // the order of the f32 sums across blocks and lanes, so the error is bounded by a
            // few ulps of Σ|w·a| (what the products add up to in magnitude).
            let wd = dequant(ty, &w, n);
            let ad = dequant(ty.vec_dot_type(), &a, n);
            let mag: f32 = wd.iter().zip(&ad).map(|(p, q)| (p * q).abs()).sum();
            let tol = 4e-6 * mag + 1e-30;
            assert!(
                (simd - scalar).abs() <= tol,
                "{ty} n={n} trial {trial}: simd {simd:e} scalar {scalar:e} (tol {tol:e})"
            );
            assert!(simd.is_finite());
        }
    }
}

/// Upper bound on |vec_dot(w, q(x)) − Σ w·x| from quantizing the activations alone: each
/// activation of a block moves by at most half a step (`amax/127/2`), plus the f16 rounding of
/// Q8_0/Q8_1's scale (and of Q8_1's scaled sum) and a little f32 summation slack.
fn quantization_tolerance(ty: GgmlType, w: &[u8], wd: &[f32], x: &[f32]) -> f32 {
    let at = ty.vec_dot_type();
    let ab = at.block_len().unwrap();
    let f16_scale = at != GgmlType::Q8_K;
    let mut tol = 0.0f32;
    for (b, (wb, xb)) in wd.chunks(ab).zip(x.chunks(ab)).enumerate() {
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let wsum: f32 = wb.iter().map(|v| v.abs()).sum();
        // Half a quantization step; with an f16 scale, q·d can be off by a further 2^-11
        // relative (|q·d| ≤ amax·(1 + 2^-11)).
        let step = if f16_scale {
            amax / 127.0 * 0.5 + amax * 2f32.powi(-10)
        } else {
            amax / 127.0 * 0.5 * (1.0 + 1e-6)
        };
        tol += wsum * step;
        if ty == GgmlType::Q5_1 {
            // m·s with s = f16(d·Σq): the f16 rounding of s.
            let bb = ty.block_bytes().unwrap();
            let m = half::f16::from_bits(u16::from_le_bytes([w[b * bb + 2], w[b * bb + 3]]));
            tol += m.to_f32().abs() * 32.0 * amax * 2f32.powi(-10);
        }
    }
    let mag: f32 = wd.iter().zip(x).map(|(p, q)| (p * q).abs()).sum();
    tol + 1e-5 * mag
}

#[test]
fn dot_matches_dequantized_weights_within_activation_error() {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5EED_0002);
    for (ty, f16s) in WEIGHT_TYPES {
        let bl = ty.block_len().unwrap();
        for trial in 0..50 {
            let nb = 1 + trial % 5;
            let n = nb * bl;
            let w = random_weights(&mut rng, ty, f16s, nb);
            let x = random_acts(&mut rng, n);
            let a = quantize_acts(ty, &x);
            let wd = dequant(ty, &w, n);
            let exact: f64 = wd.iter().zip(&x).map(|(p, q)| *p as f64 * *q as f64).sum();
            let tol = quantization_tolerance(ty, &w, &wd, &x);
            for (which, got) in [
                ("dispatched", vec_dot(ty, n, &w, &a).unwrap()),
                ("scalar", vec_dot_scalar(ty, n, &w, &a).unwrap()),
            ] {
                let err = (got as f64 - exact).abs();
                assert!(
                    err <= tol as f64,
                    "{ty} {which} n={n} trial {trial}: dot {got:e}, Σw·x {exact:e}, \
                     err {err:e} > tol {tol:e}"
                );
            }
        }
    }
}

#[test]
fn zero_activations_and_zero_block() {
    // An all-zero activation block quantizes to d = 0 and zero sums; every dot is then 0.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for (ty, f16s) in WEIGHT_TYPES {
        let n = ty.block_len().unwrap() * 2;
        let w = random_weights(&mut rng, ty, f16s, 2);
        let a = quantize_acts(ty, &vec![0.0; n]);
        assert_eq!(vec_dot(ty, n, &w, &a).unwrap(), 0.0, "{ty}");
        assert_eq!(vec_dot_scalar(ty, n, &w, &a).unwrap(), 0.0, "{ty}");
    }
}

#[test]
fn rows_must_be_whole_blocks() {
    let w = vec![0u8; 144];
    let a = vec![0u8; 292];
    assert!(vec_dot(GgmlType::Q4_K, 128, &w, &a).is_err());
    assert!(vec_dot(GgmlType::Q4_K, 256, &w[..143], &a).is_err());
    assert!(vec_dot(GgmlType::Q4_K, 256, &w, &a[..291]).is_err());
    let mut out = vec![0.0f32; 256];
    assert!(dequantize_row(GgmlType::Q6_K, &w, &mut out).is_err());
}

/// Rough throughput of the dispatched dot products (run with `--ignored --nocapture`).
#[test]
#[ignore]
fn bench_dots() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let n = 4096;
    let rows = 256;
    let types: Vec<(GgmlType, &[usize])> = WEIGHT_TYPES
        .iter()
        .copied()
        .chain([(GgmlType::Q4_0, &[0usize][..]), (GgmlType::Q8_0, &[0][..])])
        .collect();
    for (ty, f16s) in types {
        let nb = n / ty.block_len().unwrap();
        let w = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q8_0) {
            let x = random_acts(&mut rng, n * rows);
            let mut w = vec![0u8; ty.row_bytes(n * rows).unwrap()];
            quantize_row(ty, &x, &mut w).unwrap();
            w
        } else {
            random_weights(&mut rng, ty, f16s, nb * rows)
        };
        let a = quantize_acts(ty, &random_acts(&mut rng, n));
        let rb = ty.row_bytes(n).unwrap();
        for (name, f) in [
            (
                "dispatched",
                vec_dot as fn(GgmlType, usize, &[u8], &[u8]) -> _,
            ),
            ("scalar", vec_dot_scalar),
        ] {
            let mut s = 0.0f32;
            let reps = 20;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for r in 0..rows {
                    s += f(ty, n, &w[r * rb..(r + 1) * rb], &a).unwrap();
                }
            }
            let ns = t.elapsed().as_nanos() as f64 / (reps * rows * n) as f64;
            println!("{ty:>5} {name:>10}: {:.3} ns/value ({s:.1})", ns);
        }
    }
}
