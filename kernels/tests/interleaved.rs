//! The eight-row interleaved layout (`quant::x8`): its scalar reference against the plain
//! scalar dot product, its SIMD kernel bit for bit against that reference and against the
//! plain SIMD dot product (llama.cpp's order), and the matrix products and the decode team
//! over interleaved matrices bit for bit against the plain ones.

use instinfer_kernels::matmul::{matmul, MatmulScratch, QMatrix};
use instinfer_kernels::quant::x8::{self, interleave, q4_1_x8_scalar, q8_0_x8_scalar, x8_kernel};
use instinfer_kernels::quant::{quantize_row, vec_dot, vec_dot_scalar, ActRow};
use instinfer_kernels::simd::{level, Level};
use instinfer_kernels::GgmlType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-2, 2), the same for the same seed.
fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

/// `rows × cols` pseudo-random weights quantized to `ty`, row-major as GGUF stores them.
fn weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let rb = ty.row_bytes(cols).unwrap();
    let w = pseudo(rows * cols, seed);
    let mut q = vec![0u8; rb * rows];
    for r in 0..rows {
        quantize_row(
            ty,
            &w[r * cols..(r + 1) * cols],
            &mut q[r * rb..(r + 1) * rb],
        )
        .unwrap();
    }
    q
}

/// The interleaved types, each with its activation type's block size in bytes.
const TYPES: [(GgmlType, usize); 2] = [(GgmlType::Q4_1, 36), (GgmlType::Q8_0, 34)];

/// The scalar reference of the interleaved product for `ty`.
fn reference(ty: GgmlType, n: usize, g: &[u8], a: ActRow) -> [f32; 8] {
    match ty {
        GgmlType::Q4_1 => q4_1_x8_scalar(n, g, a),
        _ => q8_0_x8_scalar(n, g, a),
    }
}

/// One activation row quantized to the activation type of weight type `ty` (Q8_1 or Q8_0),
/// with its block scales (and Q8_1's sums) widened to f32.
struct Act {
    blocks: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Act {
    fn new(ty: GgmlType, x: &[f32]) -> Self {
        let at = ty.vec_dot_type();
        let bytes = at.block_bytes().unwrap();
        let mut blocks = vec![0u8; at.row_bytes(x.len()).unwrap()];
        quantize_row(at, x, &mut blocks).unwrap();
        let f16 = |b: &[u8]| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let d = blocks.chunks_exact(bytes).map(|b| f16(&b[0..2])).collect();
        let s = if at == GgmlType::Q8_1 {
            blocks.chunks_exact(bytes).map(|b| f16(&b[2..4])).collect()
        } else {
            Vec::new()
        };
        Self { blocks, d, s }
    }

    fn row(&self) -> ActRow<'_> {
        ActRow {
            blocks: &self.blocks,
            d: &self.d,
            s: &self.s,
        }
    }
}

#[test]
fn the_scalar_reference_agrees_with_the_gguf_order_dot_product() {
    let (rows, cols) = (16, 512);
    for (ty, act_bytes) in TYPES {
        let w = weights(ty, rows, cols, 1);
        let inter = interleave(ty, rows, cols, &w).unwrap();
        assert_eq!(inter.len(), w.len(), "the layout keeps the size");
        let acts: Vec<Act> = (0..3)
            .map(|t| Act::new(ty, &pseudo(cols, 20 + t)))
            .collect();
        assert_eq!(acts[0].blocks.len(), cols / 32 * act_bytes);
        let gb = x8::group_bytes(ty, cols);
        let rb = w.len() / rows;
        for g in 0..rows / 8 {
            let got: Vec<[f32; 8]> = acts
                .iter()
                .map(|a| reference(ty, cols, &inter[g * gb..(g + 1) * gb], a.row()))
                .collect();
            for (t, (a, got)) in acts.iter().zip(&got).enumerate() {
                for (i, &got) in got.iter().enumerate() {
                    let r = g * 8 + i;
                    let want =
                        vec_dot_scalar(ty, cols, &w[r * rb..(r + 1) * rb], &a.blocks).unwrap();
                    // The scalar plain kernel adds in another order than the SIMD kernels,
                    // which the layout follows; per block the integer sums are exact in both.
                    let tol = 1e-5 * (1.0 + want.abs()) * (cols / 32) as f32;
                    assert!(
                        (got - want).abs() <= tol,
                        "{ty} row {r} act {t}: {got} against {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn interleaving_refuses_shapes_it_cannot_hold() {
    let w = weights(GgmlType::Q4_1, 12, 64, 2);
    assert!(interleave(GgmlType::Q4_1, 12, 64, &w).is_none(), "12 rows");
    let w = weights(GgmlType::Q4_0, 8, 64, 2);
    assert!(
        interleave(GgmlType::Q4_0, 8, 64, &w).is_none(),
        "Q4_0 has no layout"
    );
    let w = weights(GgmlType::Q4_1, 8, 64, 2);
    assert!(
        interleave(GgmlType::Q4_1, 8, 64, &w[1..]).is_none(),
        "short data"
    );
    assert!(QMatrix::interleaved(GgmlType::Q4_1, 8, 64, &w[1..]).is_err());
}

#[test]
fn the_simd_kernel_equals_the_scalar_reference_and_the_plain_kernel_bit_for_bit() {
    for (ty, _) in TYPES {
        let Some(k) = x8_kernel(ty) else {
            // Not a skip: on a CPU without the kernel the layout must not be used at all.
            assert_ne!(level(), Level::Avx2);
            assert!(!x8::interleaves(ty, 8));
            println!("this CPU has no interleaved {ty} kernel; checked that nothing interleaves");
            continue;
        };
        let cols = 1536;
        let w = weights(ty, 8, cols, 3);
        let rb = w.len() / 8;
        let inter = interleave(ty, 8, cols, &w).unwrap();
        // Extreme activations too: every byte at -127 and at 127.
        let mut xs: Vec<Vec<f32>> = (0..4).map(|t| pseudo(cols, 30 + t)).collect();
        xs.push(vec![-1.0; cols]);
        xs.push(vec![1.0; cols]);
        for x in &xs {
            let act = Act::new(ty, x);
            let got = k(cols, &inter, act.row());
            let want = reference(ty, cols, &inter, act.row());
            for i in 0..8 {
                let plain = vec_dot(ty, cols, &w[i * rb..(i + 1) * rb], &act.blocks).unwrap();
                assert_eq!(got[i].to_bits(), want[i].to_bits(), "{ty} row {i}: scalar");
                assert_eq!(
                    got[i].to_bits(),
                    plain.to_bits(),
                    "{ty} row {i}: plain kernel"
                );
            }
        }
    }
}

#[test]
fn products_over_an_interleaved_matrix_equal_its_kernel_for_every_batch_size() {
    for (ty, rows, cols) in [
        (GgmlType::Q4_1, 72, 256),
        (GgmlType::Q8_0, 72, 256),
        (GgmlType::Q4_1, 64, 1536),
        (GgmlType::Q8_0, 1024, 576),
    ] {
        if !x8::interleaves(ty, rows) {
            assert_ne!(level(), Level::Avx2, "AVX2 machines interleave {ty}");
            println!(
                "this CPU has no interleaved kernel; the plain products are tested in matmul.rs"
            );
            continue;
        }
        let w = weights(ty, rows, cols, 4);
        let inter = interleave(ty, rows, cols, &w).unwrap();
        let m = QMatrix::interleaved(ty, rows, cols, &inter).unwrap();
        let plain = QMatrix::new(ty, rows, cols, &w).unwrap();
        let gb = x8::group_bytes(ty, cols);
        for n in [1, 3, 4, 9, 70, 256] {
            let x = pseudo(n * cols, 50 + n as u64);
            let mut out = vec![0.0; n * rows];
            let mut scratch = MatmulScratch::default();
            matmul(&m, &x, n, &mut out, &mut scratch).unwrap();
            let mut plain_out = vec![0.0; n * rows];
            matmul(&plain, &x, n, &mut plain_out, &mut scratch).unwrap();
            for t in 0..n {
                let act = Act::new(ty, &x[t * cols..(t + 1) * cols]);
                for g in 0..rows / 8 {
                    let want = reference(ty, cols, &inter[g * gb..(g + 1) * gb], act.row());
                    for (i, want) in want.iter().enumerate() {
                        let r = g * 8 + i;
                        assert_eq!(
                            out[t * rows + r].to_bits(),
                            want.to_bits(),
                            "{ty} n {n} token {t} row {r}"
                        );
                        assert_eq!(
                            plain_out[t * rows + r].to_bits(),
                            want.to_bits(),
                            "{ty} n {n} token {t} row {r}: plain product"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_decode_team_keeps_interleaved_groups_whole() {
    use instinfer_kernels::team::with_team;
    let cols = 256;
    // A plain matrix of 12 rows first, so that a share boundary falls inside a group of the
    // interleaved matrices that follow unless the plan aligns it.
    let plain = weights(GgmlType::Q4_1, 12, cols, 5);
    let w1 = weights(GgmlType::Q4_1, 40, cols, 6);
    let w2 = weights(GgmlType::Q4_1, 64, cols, 7);
    if !x8::interleaves(GgmlType::Q4_1, 8) {
        assert_ne!(level(), Level::Avx2, "AVX2 machines interleave Q4_1");
        println!(
            "this CPU has no interleaved kernel; the team's plain split is tested in matmul.rs"
        );
        return;
    }
    let i1 = interleave(GgmlType::Q4_1, 40, cols, &w1).unwrap();
    let i2 = interleave(GgmlType::Q4_1, 64, cols, &w2).unwrap();
    let mats = [
        QMatrix::new(GgmlType::Q4_1, 12, cols, &plain).unwrap(),
        QMatrix::interleaved(GgmlType::Q4_1, 40, cols, &i1).unwrap(),
        QMatrix::interleaved(GgmlType::Q4_1, 64, cols, &i2).unwrap(),
    ];
    let x = pseudo(cols, 98);
    let want: Vec<Vec<f32>> = mats
        .iter()
        .map(|m| {
            let mut out = vec![0.0; m.rows()];
            matmul(m, &x, 1, &mut out, &mut MatmulScratch::default()).unwrap();
            out
        })
        .collect();
    for helpers in [0, 1, 2, 3, 5] {
        let got = with_team(helpers, |team| {
            team.quantize(GgmlType::Q8_1, &x).unwrap();
            let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0.0; m.rows()]).collect();
            let mut jobs: Vec<_> = mats
                .iter()
                .zip(outs.iter_mut())
                .map(|(m, o)| (*m, o.as_mut_slice()))
                .collect();
            team.matmul_many(&mut jobs).unwrap();
            outs
        });
        for (g, w) in got.iter().zip(&want) {
            let gb: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
            let wb: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
            assert_eq!(gb, wb, "{helpers} helpers");
        }
    }
}
