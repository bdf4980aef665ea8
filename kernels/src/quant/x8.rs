//! Weight rows interleaved eight at a time, for products whose SIMD lanes are output rows.
//!
//! The plain kernels unpack each weight block for one row at a time and end every dot product
//! with a horizontal sum. Here one 256-bit register holds four consecutive values of each of
//! eight rows, so one unpack serves eight rows, a broadcast of four activation bytes multiplies
//! all eight at once, and every lane of an accumulator belongs to one output row. The weights
//! are copied into this layout once, when the model loads.
//!
//! The sums keep llama.cpp's order exactly (that of the plain `dot_avx2` kernels): lane `j` of
//! a row's accumulator there holds the products of values `4j..4j + 4` of every block, scaled
//! and added block by block, and the eight lanes are added in one fixed tree at the end. Here
//! each of those eight per-row lanes is a register of eight rows, and the same tree adds the
//! eight registers. The results are bit-identical to the plain kernels; this model family
//! amplifies a one-ulp change in a projection into logit differences of about 0.1, so anything
//! less than identical would lose the agreement with llama.cpp.
//!
//! Layout of a Q4_1 group (eight rows, `nb` blocks each), block after block, 160 bytes per
//! block: the eight rows' f16 scales `d` (16 bytes), their f16 minimums `m` (16 bytes), then
//! four 32-byte chunks. In chunk `c`, bytes `4i..4i+4` belong to row `i`: byte `p` holds the
//! row's value `8c + p` in its low nibble and value `8c + 4 + p` in its high nibble.
//!
//! A Q8_0 group, 272 bytes per block: the eight rows' f16 scales (16 bytes), then eight
//! 32-byte chunks; in chunk `c`, bytes `4i..4i+4` are row `i`'s values `4c..4c+4`.

use super::{f16_at, q4_1, q8_0, q8_1, ActRow, GgmlType};

/// Lanes of a plain kernel's accumulator: groups of four values of a block.
const QUADS: usize = 8;

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// Bytes of one Q4_1 block of an eight-row group.
const Q4_1_BLOCK: usize = 160;
/// Bytes of one Q8_0 block of an eight-row group.
const Q8_0_BLOCK: usize = 272;

/// The bytes of one block of an eight-row group of `ty`, for the types with the layout.
fn group_block(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::Q4_1 => Some(Q4_1_BLOCK),
        GgmlType::Q8_0 => Some(Q8_0_BLOCK),
        _ => None,
    }
}

/// Whether matrices of `ty` with `rows` rows are interleaved on this CPU: only where a SIMD
/// kernel for the layout exists, and only for whole groups of eight rows.
pub fn interleaves(ty: GgmlType, rows: usize) -> bool {
    group_block(ty).is_some()
        && rows.is_multiple_of(ROWS)
        && crate::simd::level() == crate::simd::Level::Avx2
}

/// Copy `rows` rows of `cols` values of `ty` (as stored in GGUF) into the interleaved layout.
/// The result has the same length as `data`. Returns `None` for a type without the layout.
pub fn interleave(ty: GgmlType, rows: usize, cols: usize, data: &[u8]) -> Option<Vec<u8>> {
    let gblock = group_block(ty)?;
    let (qk, bytes) = (ty.block_len()?, ty.block_bytes()?);
    if !rows.is_multiple_of(ROWS) || !cols.is_multiple_of(qk) {
        return None;
    }
    let nb = cols / qk;
    let row_bytes = nb * bytes;
    if data.len() != rows * row_bytes {
        return None;
    }
    let mut out = vec![0u8; data.len()];
    for (g, group) in out.chunks_exact_mut(nb * gblock).enumerate() {
        for (b, dst) in group.chunks_exact_mut(gblock).enumerate() {
            for i in 0..ROWS {
                let src = &data[(g * ROWS + i) * row_bytes + b * bytes..][..bytes];
                match ty {
                    GgmlType::Q4_1 => put_q4_1(src, i, dst),
                    _ => put_q8_0(src, i, dst),
                }
            }
        }
    }
    Some(out)
}

/// Row `i`'s Q8_0 block `src` into its places in the group block `dst`.
fn put_q8_0(src: &[u8], i: usize, dst: &mut [u8]) {
    dst[2 * i..2 * i + 2].copy_from_slice(&src[0..2]);
    for c in 0..8 {
        dst[16 + 32 * c + 4 * i..][..4].copy_from_slice(&src[2 + 4 * c..][..4]);
    }
}

/// Row `i`'s Q4_1 block `src` into its places in the group block `dst`.
fn put_q4_1(src: &[u8], i: usize, dst: &mut [u8]) {
    dst[2 * i..2 * i + 2].copy_from_slice(&src[0..2]);
    dst[16 + 2 * i..16 + 2 * i + 2].copy_from_slice(&src[2..4]);
    // GGUF order: byte j holds value j (low nibble) and value j + 16 (high nibble).
    let value = |k: usize| {
        if k < 16 {
            src[4 + k] & 0x0f
        } else {
            src[4 + k - 16] >> 4
        }
    };
    for c in 0..4 {
        for p in 0..4 {
            dst[32 + 32 * c + 4 * i + p] = value(8 * c + p) | (value(8 * c + 4 + p) << 4);
        }
    }
}

/// Bytes of one interleaved group of eight rows of `cols` values of `ty` (0 for a type
/// without the layout).
pub fn group_bytes(ty: GgmlType, cols: usize) -> usize {
    match (group_block(ty), ty.block_len()) {
        (Some(gb), Some(qk)) => cols / qk * gb,
        _ => 0,
    }
}

/// Eight interleaved rows against one activation row: element `i` is row `i` of the group
/// dotted with the activation row.
pub type GemvX8 = fn(usize, &[u8], ActRow) -> [f32; ROWS];

/// The kernel for interleaved matrices of `ty` on this CPU, if it has one.
pub fn x8_kernel(ty: GgmlType) -> Option<GemvX8> {
    if !interleaves(ty, ROWS) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match ty {
            // SAFETY: `interleaves` saw AVX2, FMA and F16C; the kernel asserts every length.
            GgmlType::Q4_1 => Some(|n, w, a| unsafe { q4_1_x8_avx2(n, w, a) }),
            // SAFETY: `interleaves` saw AVX2, FMA and F16C; the kernel asserts every length.
            GgmlType::Q8_0 => Some(|n, w, a| unsafe { q8_0_x8_avx2(n, w, a) }),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Asserts that `group` and the activation row hold `n` values of `ty`; returns the number
/// of blocks.
fn check_lengths(ty: GgmlType, n: usize, group: &[u8], a: &ActRow) -> usize {
    let (nb, gblock, act_bytes) = match ty {
        GgmlType::Q4_1 => (n / q4_1::QK, Q4_1_BLOCK, q8_1::BYTES),
        _ => (n / q8_0::QK, Q8_0_BLOCK, q8_0::BYTES),
    };
    assert!(group.len() >= nb * gblock, "interleaved group too short");
    assert!(
        a.blocks.len() >= nb * act_bytes && a.d.len() >= nb,
        "activation row too short"
    );
    assert!(
        ty != GgmlType::Q4_1 || a.s.len() >= nb,
        "activation sums too short"
    );
    nb
}

/// The fixed tree in which the plain kernels add their eight lanes (`hsum_ps`).
fn tree(l: [f32; QUADS]) -> f32 {
    ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]))
}

/// Scalar reference of the interleaved Q4_1 product, in the plain kernel's order: per row,
/// quad `j` of every block adds `(d·d')·isum_j` to lane `j` (a fused multiply-add), the
/// minimums add `m·s'` to a separate sum (multiply, then add), and the lanes meet in [`tree`].
pub fn q4_1_x8_scalar(n: usize, group: &[u8], a: ActRow) -> [f32; ROWS] {
    let nb = check_lengths(GgmlType::Q4_1, n, group, &a);
    let mut lanes = [[0.0f32; QUADS]; ROWS];
    let mut summs = [0.0f32; ROWS];
    for b in 0..nb {
        let blk = &group[b * Q4_1_BLOCK..][..Q4_1_BLOCK];
        let q = &a.blocks[b * q8_1::BYTES + 4..][..32];
        for i in 0..ROWS {
            let dd = f16_at(blk, 2 * i) * a.d[b];
            summs[i] += f16_at(blk, 16 + 2 * i) * a.s[b];
            for c in 0..4 {
                let (mut lo, mut hi) = (0i32, 0i32);
                for p in 0..4 {
                    let byte = blk[32 + 32 * c + 4 * i + p];
                    lo += (byte & 0x0f) as i32 * q[8 * c + p] as i8 as i32;
                    hi += (byte >> 4) as i32 * q[8 * c + 4 + p] as i8 as i32;
                }
                lanes[i][2 * c] = dd.mul_add(lo as f32, lanes[i][2 * c]);
                lanes[i][2 * c + 1] = dd.mul_add(hi as f32, lanes[i][2 * c + 1]);
            }
        }
    }
    std::array::from_fn(|i| tree(lanes[i]) + summs[i])
}

/// AVX2 version of [`q4_1_x8_scalar`], bit-identical to it and to the plain `dot_avx2`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// `group` must hold `n/32` interleaved blocks, the activation row `n/32` Q8_1 blocks and
/// `n/32` widened scales and sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_1_x8_avx2(n: usize, group: &[u8], a: ActRow) -> [f32; ROWS] {
    use std::arch::x86_64::*;
    let nb = check_lengths(GgmlType::Q4_1, n, group, &a);
    let mask = _mm256_set1_epi8(0x0f);
    let ones = _mm256_set1_epi16(1);
    let mut lanes = [_mm256_setzero_ps(); QUADS];
    let mut summs = _mm256_setzero_ps();
    for b in 0..nb {
        // SAFETY: b < nb and the lengths were asserted, so every read below stays inside
        // block b of the group (160 bytes) and block b of the activation row (36 bytes).
        unsafe {
            let blk = group.as_ptr().add(b * Q4_1_BLOCK);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            let dd = _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(b)));
            let ms = _mm256_mul_ps(m, _mm256_set1_ps(*a.s.get_unchecked(b)));
            summs = _mm256_add_ps(summs, ms);
            let q = a.blocks.as_ptr().add(b * q8_1::BYTES + 4);
            for c in 0..4 {
                let packed = _mm256_loadu_si256(blk.add(32 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(packed, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
                let qlo = _mm256_set1_epi32((q.add(8 * c) as *const i32).read_unaligned());
                let qhi = _mm256_set1_epi32((q.add(8 * c + 4) as *const i32).read_unaligned());
                let slo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, qlo), ones);
                let shi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, qhi), ones);
                lanes[2 * c] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(slo), lanes[2 * c]);
                lanes[2 * c + 1] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(shi), lanes[2 * c + 1]);
            }
        }
    }
    // SAFETY: this function's AVX2 is what `tree_ps` needs.
    let sum = unsafe { _mm256_add_ps(tree_ps(lanes), summs) };
    let mut out = [0.0f32; ROWS];
    // SAFETY: out holds eight f32, the width of one unaligned 256-bit store.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out
}

/// [`tree`] over eight registers of eight rows each.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tree_ps(l: [std::arch::x86_64::__m256; QUADS]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::_mm256_add_ps as add;
    add(
        add(add(l[0], l[4]), add(l[2], l[6])),
        add(add(l[1], l[5]), add(l[3], l[7])),
    )
}

/// Scalar reference of the interleaved Q8_0 product, in the plain kernel's order: per row,
/// quad `j` of every block adds `(d·d')·isum_j` to lane `j` (a fused multiply-add), and the
/// lanes meet in [`tree`].
pub fn q8_0_x8_scalar(n: usize, group: &[u8], a: ActRow) -> [f32; ROWS] {
    let nb = check_lengths(GgmlType::Q8_0, n, group, &a);
    let mut lanes = [[0.0f32; QUADS]; ROWS];
    for b in 0..nb {
        let blk = &group[b * Q8_0_BLOCK..][..Q8_0_BLOCK];
        let q = &a.blocks[b * q8_0::BYTES + 2..][..32];
        for (i, lane) in lanes.iter_mut().enumerate() {
            let dd = f16_at(blk, 2 * i) * a.d[b];
            for (c, l) in lane.iter_mut().enumerate() {
                let isum: i32 = (0..4)
                    .map(|p| blk[16 + 32 * c + 4 * i + p] as i8 as i32 * q[4 * c + p] as i8 as i32)
                    .sum();
                *l = dd.mul_add(isum as f32, *l);
            }
        }
    }
    lanes.map(tree)
}

/// AVX2 version of [`q8_0_x8_scalar`], bit-identical to it and to the plain `dot_avx2`.
///
/// The signed products go through `maddubs` as |w| times a·sign(w), as the plain kernel
/// does; a pair reaches at most 2 · 128 · 127 = 32512, inside i16.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB):
/// `group` must hold `n/32` interleaved blocks, the activation row `n/32` Q8_0 blocks and
/// `n/32` widened scales.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_x8_avx2(n: usize, group: &[u8], a: ActRow) -> [f32; ROWS] {
    use std::arch::x86_64::*;
    let nb = check_lengths(GgmlType::Q8_0, n, group, &a);
    let ones = _mm256_set1_epi16(1);
    let mut lanes = [_mm256_setzero_ps(); QUADS];
    for b in 0..nb {
        // SAFETY: b < nb and the lengths were asserted, so every read below stays inside
        // block b of the group (272 bytes) and block b of the activation row (34 bytes).
        unsafe {
            let blk = group.as_ptr().add(b * Q8_0_BLOCK);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let dd = _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(b)));
            let q = a.blocks.as_ptr().add(b * q8_0::BYTES + 2);
            for (c, lane) in lanes.iter_mut().enumerate() {
                let w = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
                let qv = _mm256_set1_epi32((q.add(4 * c) as *const i32).read_unaligned());
                let prod = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(qv, w));
                let isum = _mm256_madd_epi16(prod, ones);
                *lane = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(isum), *lane);
            }
        }
    }
    // SAFETY: this function's AVX2 is what `tree_ps` needs.
    let sum = unsafe { tree_ps(lanes) };
    let mut out = [0.0f32; ROWS];
    // SAFETY: out holds eight f32, the width of one unaligned 256-bit store.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
    out
}
