//! Q8_1: Q8_0 plus the block's scaled sum `s = d * Σq`, so a Q4_1/Q5_1 weight's offset `m`
//! contributes `m * s` without touching the values. Activation format only.

use super::{put_f16, q8_0};

/// Values per block.
pub const QK: usize = 32;
/// Bytes per block: f16 `d`, f16 `s` and 32 signed bytes.
pub const BYTES: usize = 36;

/// Quantize whole blocks of `src` into `dst` as Q8_0 does, plus each block's `s` (with AVX2
/// when the CPU has it; bit-identical either way).
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    let simd = crate::simd::level() == crate::simd::Level::Avx2;
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let (d, sum) = if simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 detected; x has 32 values and blk has 36 bytes.
            unsafe {
                q8_0::avx2_quantize_block(x, &mut blk[4..])
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("AVX2 level on a non-x86 CPU")
        } else {
            q8_0::quantize_block(x, &mut blk[4..])
        };
        put_f16(blk, 0, d);
        put_f16(blk, 2, d * sum as f32);
    }
}

/// `q·d` for every value (`s` is not needed).
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = super::f16_at(blk, 0);
        for (o, &q) in out.iter_mut().zip(&blk[4..]) {
            *o = q as i8 as f32 * d;
        }
    }
}

/// The scalar reference of [`quantize`].
pub fn quantize_scalar(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let (d, sum) = q8_0::quantize_block(x, &mut blk[4..]);
        put_f16(blk, 0, d);
        put_f16(blk, 2, d * sum as f32);
    }
}
