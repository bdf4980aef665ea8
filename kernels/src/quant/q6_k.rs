//! Q6_K: super-blocks of 256 six-bit values in 16 sub-blocks of 16, each with a signed 8-bit
//! scale: `x = d·sc[s]·(q − 32)`.
//!
//! Layout (210 bytes): 128 bytes `ql` (low 4 bits) at 0, 64 bytes `qh` (high 2 bits) at 128,
//! 16 `i8` scales at 192, `d: f16` at 208. Each half `h` of 128 values uses `ql[64h..64h+64]`
//! and `qh[32h..32h+32]`; for `l < 32` its values `l`, `l+32`, `l+64`, `l+96` are the low
//! nibbles of `ql[l]`, `ql[l+32]`, then the high nibbles of the same, with bit pairs 0-1,
//! 2-3, 4-5, 6-7 of `qh[l]` on top.

use super::{f16_at, q8_k};

/// Values per super-block.
pub const QK: usize = 256;
/// Bytes per super-block.
pub const BYTES: usize = 210;
const QH: usize = 128;
const SCALES: usize = 192;
const D: usize = 208;

/// The four 6-bit values (0..64) that `ql[l]`, `ql[l+32]` and `qh[l]` of one half encode.
#[inline(always)]
fn six_bits(ql: &[u8], qh: &[u8], l: usize) -> [i32; 4] {
    let h = qh[l] as i32;
    [
        (ql[l] & 0x0f) as i32 | ((h & 3) << 4),
        (ql[l + 32] & 0x0f) as i32 | (((h >> 2) & 3) << 4),
        (ql[l] >> 4) as i32 | (((h >> 4) & 3) << 4),
        (ql[l + 32] >> 4) as i32 | (((h >> 6) & 3) << 4),
    ]
}

/// As ggml's `dequantize_row_q6_K`: `(d·sc)·(q − 32)`, in that order.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, D);
        for h in 0..2 {
            let ql = &blk[64 * h..64 * h + 64];
            let qh = &blk[QH + 32 * h..QH + 32 * h + 32];
            let sc = &blk[SCALES + 8 * h..SCALES + 8 * h + 8];
            let o = &mut out[128 * h..128 * h + 128];
            for l in 0..32 {
                let q = six_bits(ql, qh, l);
                for (k, &qk) in q.iter().enumerate() {
                    let s = sc[2 * k + l / 16] as i8 as f32;
                    o[32 * k + l] = d * s * (qk - 32) as f32;
                }
            }
        }
    }
}

/// `Σ_s d·d'·sc[s]·Σ (q − 32)·q'`, integer inside a block.
pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w
        .chunks_exact(BYTES)
        .zip(a.chunks_exact(q8_k::BYTES))
        .take(n / QK)
    {
        let mut sumi = 0i32;
        for h in 0..2 {
            let ql = &x[64 * h..64 * h + 64];
            let qh = &x[QH + 32 * h..QH + 32 * h + 32];
            let sc = &x[SCALES + 8 * h..SCALES + 8 * h + 8];
            let yq = &y[q8_k::QS + 128 * h..q8_k::QS + 128 * h + 128];
            let mut sub = [0i32; 8];
            for l in 0..32 {
                let q = six_bits(ql, qh, l);
                for (k, &qk) in q.iter().enumerate() {
                    sub[2 * k + l / 16] += (qk - 32) * yq[32 * k + l] as i8 as i32;
                }
            }
            for (s, &v) in sub.iter().enumerate() {
                sumi += sc[s] as i8 as i32 * v;
            }
        }
        sum += f16_at(x, D) * q8_k::d_at(y, 0) * sumi as f32;
    }
    sum
}

/// A byte shuffle that spreads i16 lane `2k` of a 128-bit lane over the low 128-bit half of
/// the result and lane `2k+1` over the high half.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn spread(k: i16) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_set_m128i(
        _mm_set1_epi16(((4 * k + 3) << 8) | (4 * k + 2)),
        _mm_set1_epi16(((4 * k + 1) << 8) | (4 * k)),
    )
}

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB): `w`
/// must hold `n/256` Q6_K blocks and `a` as many Q8_K.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_k::BYTES);
    let m4 = _mm256_set1_epi8(0x0f);
    let m30 = _mm256_set1_epi8(0x30);
    // SAFETY: spread needs the AVX2 and FMA this function has.
    let spreads = unsafe { [spread(0), spread(1), spread(2), spread(3)] };
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: the assert above puts all 210
        // bytes of Q6_K block i at x and all 292 bytes of Q8_K block i at y, inside `w` and `a`;
        // each read below stays inside its block (see the notes). The helpers need the AVX2, FMA
        // and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            // Stream the weights ahead of use (a hint; past the end it is harmless).
            _mm_prefetch(
                x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
            let y = a.as_ptr().add(i * q8_k::BYTES);
            // In bounds: the assert above keeps the 16 scales and 16 group sums of block i inside
            // `w` and `a`.
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.add(SCALES) as *const __m128i));
            let bsums = _mm256_loadu_si256(y.add(q8_k::BSUMS) as *const __m256i);
            // The −32 offset of every value, applied once per sub-block via Q8_K's group sums:
            // Σ sc·(q − 32)·q' = Σ sc·q·q' − 32·Σ_s sc[s]·bsum[s].
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsums), 5);
            let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
            for h in 0..2 {
                // In bounds: the assert above keeps ql (64 bytes at 64h), qh (32 bytes at 128+32h),
                // the 8 scales at 192+8h and the 128 values at 4+128h within block i.
                let ql0 = _mm256_loadu_si256(x.add(64 * h) as *const __m256i);
                let ql1 = _mm256_loadu_si256(x.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(x.add(QH + 32 * h) as *const __m256i);
                let sc8 =
                    _mm_cvtepi8_epi16(_mm_loadl_epi64(x.add(SCALES + 8 * h) as *const __m128i));
                let sc = _mm256_broadcastsi128_si256(sc8);
                // Bit pair k of qh lands on bits 4-5 of each byte (16-bit shifts, then a byte
                // mask).
                let q = [
                    _mm256_or_si256(
                        _mm256_and_si256(ql0, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(ql1, m4),
                        _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                        _mm256_and_si256(qh, m30),
                    ),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                    ),
                ];
                let yq = y.add(q8_k::QS + 128 * h);
                for k in 0..4 {
                    // In bounds: as above; k < 4 keeps the 32-byte load within this half's values.
                    let yk = _mm256_loadu_si256(yq.add(32 * k) as *const __m256i);
                    // 6-bit x byte pairs fit i16 (2·63·128); the i8 scale then widens to i32.
                    let p = _mm256_maddubs_epi16(q[k], yk);
                    let s = _mm256_shuffle_epi8(sc, spreads[k]);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
                }
            }
            // In bounds: as above, block i's d (at 208) and Q8_K block i's d (at 0) are in bounds.
            let d = _mm256_set1_ps(f16_ptr(x.add(D)) * (y as *const f32).read_unaligned());
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) }
}
