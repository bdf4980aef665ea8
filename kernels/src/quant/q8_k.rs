//! Q8_K: the activation format the k-quants are dotted against. A block of 256 values holds
//! an f32 scale `d`, 256 signed bytes and the sums of each run of 16 bytes (`bsums`, i16), so
//! a weight's per-sub-block minimum or offset can be applied without touching the values.
//!
//! Layout (292 bytes): `d: f32` at 0, `qs: [i8; 256]` at 4, `bsums: [i16; 16]` at 260.

/// Values per block.
pub const QK: usize = 256;
/// Bytes per block.
pub const BYTES: usize = 292;
/// Offset of the 256 quantized values.
pub const QS: usize = 4;
/// Offset of the 16 group sums.
pub const BSUMS: usize = 260;

/// Read the little-endian f32 scale of the block starting at `off`.
#[inline(always)]
pub(crate) fn d_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Read group sum `k` (0..16) of the block starting at `off`.
#[inline(always)]
pub(crate) fn bsum_at(b: &[u8], off: usize, k: usize) -> i32 {
    let p = off + BSUMS + 2 * k;
    i16::from_le_bytes([b[p], b[p + 1]]) as i32
}

/// As ggml's `quantize_row_q8_K_ref`: the scale comes from the value of largest magnitude
/// *with its sign* (`iscale = -127/max`, `d = 1/iscale`), values are rounded to nearest with
/// ties to even (ggml's `nearest_int`) and clamped to 127 above.
pub fn quantize(src: &[f32], dst: &mut [u8]) {
    for (x, blk) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(BYTES)) {
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            blk.fill(0);
            continue;
        }
        let iscale = -127.0f32 / max;
        for (q, &v) in blk[QS..QS + QK].iter_mut().zip(x) {
            let r = ((iscale * v).round_ties_even() as i32).min(127);
            *q = r as i8 as u8;
        }
        for k in 0..QK / 16 {
            let s: i32 = blk[QS + 16 * k..QS + 16 * k + 16]
                .iter()
                .map(|&q| q as i8 as i32)
                .sum();
            blk[BSUMS + 2 * k..BSUMS + 2 * k + 2].copy_from_slice(&(s as i16).to_le_bytes());
        }
        blk[0..4].copy_from_slice(&(1.0f32 / iscale).to_le_bytes());
    }
}

/// `d·q` for every value.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = d_at(blk, 0);
        for (o, &q) in out.iter_mut().zip(&blk[QS..QS + QK]) {
            *o = d * q as i8 as f32;
        }
    }
}
