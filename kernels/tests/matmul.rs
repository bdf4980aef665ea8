//! The threaded matrix product against one `vec_dot` per (row, token): the tiled kernels
//! must sum every dot product in the same order, so the results are bit-identical.

use instinfer_kernels::matmul::{matmul, MatmulScratch, QMatrix};
use instinfer_kernels::quant::{quantize_row, vec_dot};
use instinfer_kernels::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-2, 2), the same for the same seed.
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// Q5_0 blocks (22 bytes: f16 scale, 32 fifth bits, 16 bytes of nibbles) of pseudo-random
/// bits with scales between 0.001 and 0.03.
fn random_q5_0(out: &mut [u8]) {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for (i, b) in out.iter_mut().enumerate() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (s >> 33) as u8 ^ i as u8;
    }
    for blk in out.chunks_exact_mut(22) {
        let d = 0.001 + (blk[2] as f32 / 255.0) * 0.029;
        blk[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    }
}

fn check(ty: GgmlType, rows: usize, cols: usize, n: usize) {
    let w = pseudo(rows * cols, 1);
    let mut wq = vec![0u8; ty.row_bytes(cols).unwrap() * rows];
    let rb = ty.row_bytes(cols).unwrap();
    if ty == GgmlType::Q5_0 {
        // No Q5_0 quantizer here: random blocks, each with a small f16 scale.
        random_q5_0(&mut wq);
    } else {
        for r in 0..rows {
            quantize_row(
                ty,
                &w[r * cols..(r + 1) * cols],
                &mut wq[r * rb..(r + 1) * rb],
            )
            .unwrap();
        }
    }
    let m = QMatrix::new(ty, rows, cols, &wq).unwrap();
    let x = pseudo(n * cols, 2);
    let mut out = vec![0.0; n * rows];
    matmul(&m, &x, n, &mut out, &mut MatmulScratch::default()).unwrap();
    let at = ty.vec_dot_type();
    let arb = at.row_bytes(cols).unwrap();
    for t in 0..n {
        let mut xq = vec![0u8; arb];
        quantize_row(at, &x[t * cols..(t + 1) * cols], &mut xq).unwrap();
        for r in 0..rows {
            let want = vec_dot(ty, cols, &wq[r * rb..(r + 1) * rb], &xq).unwrap();
            assert_eq!(
                out[t * rows + r].to_bits(),
                want.to_bits(),
                "{ty} row {r} token {t}"
            );
        }
    }
}

#[test]
fn tiled_products_equal_single_dot_products_bit_for_bit() {
    for ty in [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::F16,
    ] {
        for n in [1, 3, 4, 9, 70] {
            check(ty, 37, 256, n);
        }
    }
}

#[test]
fn a_matrix_whose_bytes_do_not_match_its_shape_is_an_error() {
    assert!(QMatrix::new(GgmlType::Q4_1, 4, 64, &[0u8; 10]).is_err());
}

/// Throughput probe, not a test of speed: `cargo test --release -p instinfer-kernels --test
/// matmul -- --ignored --nocapture`. Prints GB/s of weight streamed by a single-token product.
#[test]
#[ignore]
fn gemv_bandwidth_probe() {
    for (ty, rows, cols) in [
        (GgmlType::Q8_0, 49152, 576),
        (GgmlType::Q8_0, 1024, 576),
        (GgmlType::Q4_1, 1536 * 30, 576),
        (GgmlType::Q4_1, 2048, 576),
    ] {
        let rb = ty.row_bytes(cols).unwrap();
        let mut wq = vec![0u8; rb * rows];
        let w = pseudo(cols * 64, 3);
        for r in 0..rows {
            let src = &w[(r % 64) * cols..(r % 64 + 1) * cols];
            quantize_row(ty, src, &mut wq[r * rb..(r + 1) * rb]).unwrap();
        }
        let m = QMatrix::new(ty, rows, cols, &wq).unwrap();
        let x = pseudo(cols, 4);
        let mut out = vec![0.0; rows];
        let mut scratch = MatmulScratch::default();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        pool.install(|| {
            for _ in 0..3 {
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    matmul(&m, &x, 1, &mut out, &mut scratch).unwrap();
                }
                let secs = t.elapsed().as_secs_f64() / 10.0;
                println!(
                    "{ty}: {:.1} MB in {:.2} ms = {:.2} GB/s",
                    wq.len() as f64 / 1e6,
                    secs * 1e3,
                    wq.len() as f64 / secs / 1e9
                );
            }
        });
    }
}

#[test]
fn the_decode_team_splits_rows_without_changing_a_bit() {
    use instinfer_kernels::team::with_team;
    let cols = 256;
    let shapes = [
        (37usize, GgmlType::Q4_1),
        (64, GgmlType::Q4_1),
        (9, GgmlType::Q4_1),
    ];
    let mats: Vec<(GgmlType, usize, Vec<u8>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(rows, ty))| {
            let rb = ty.row_bytes(cols).unwrap();
            let w = pseudo(rows * cols, 10 + i as u64);
            let mut q = vec![0u8; rb * rows];
            for r in 0..rows {
                quantize_row(
                    ty,
                    &w[r * cols..(r + 1) * cols],
                    &mut q[r * rb..(r + 1) * rb],
                )
                .unwrap();
            }
            (ty, rows, q)
        })
        .collect();
    let x = pseudo(cols, 99);
    // Reference: the plain product, one matrix at a time.
    let want: Vec<Vec<f32>> = mats
        .iter()
        .map(|(ty, rows, q)| {
            let mut out = vec![0.0; *rows];
            matmul(
                &QMatrix::new(*ty, *rows, cols, q).unwrap(),
                &x,
                1,
                &mut out,
                &mut MatmulScratch::default(),
            )
            .unwrap();
            out
        })
        .collect();
    for helpers in [0, 1, 3] {
        let got = with_team(helpers, |team| {
            team.quantize(GgmlType::Q8_1, &x).unwrap();
            let mut outs: Vec<Vec<f32>> =
                mats.iter().map(|(_, rows, _)| vec![0.0; *rows]).collect();
            {
                let mut jobs: Vec<_> = mats
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|((ty, rows, q), o)| {
                        (QMatrix::new(*ty, *rows, cols, q).unwrap(), o.as_mut_slice())
                    })
                    .collect();
                team.matmul_many(&mut jobs).unwrap();
                // A second product on the same team reuses the helpers.
                team.matmul_many(&mut jobs).unwrap();
            }
            outs
        });
        for (g, w) in got.iter().zip(&want) {
            let (gb, wb): (Vec<u32>, Vec<u32>) = (
                g.iter().map(|v| v.to_bits()).collect(),
                w.iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(gb, wb, "{helpers} helpers");
        }
    }
}
