//! Q5_K: Q4_K with a fifth bit per value. `x = d·sc[s]·q − dmin·m[s]`, `q` in 0..32.
//!
//! Layout (176 bytes): `d: f16` at 0, `dmin: f16` at 2, 12 bytes of packed scales/mins at 4
//! (as Q4_K), 32 bytes `qh` at 16, 128 bytes of nibbles at 48. Nibble run `j` (32 bytes) holds
//! sub-blocks `2j` (low nibbles) and `2j+1` (high); the fifth bit of value `l` of sub-block `s`
//! is bit `s` of `qh[l]`.

#[cfg(target_arch = "x86_64")]
use super::q4_k::{mins_dot_bsums, scale_words};
use super::{f16_at, q4_k::scales_mins, q8_k};

/// Values per super-block.
pub const QK: usize = 256;
/// Bytes per super-block.
pub const BYTES: usize = 176;
const SCALES: usize = 4;
const QH: usize = 16;
const QS: usize = 48;

/// As ggml's `dequantize_row_q5_K`: `(d·sc)·q − (dmin·m)`, in that order, no fused ops.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let (sc, mn) = scales_mins(&blk[SCALES..SCALES + 12]);
        let qh = &blk[QH..QH + 32];
        for j in 0..4 {
            let q = &blk[QS + 32 * j..QS + 32 * j + 32];
            let (d1, m1) = (d * sc[2 * j] as f32, dmin * mn[2 * j] as f32);
            let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * mn[2 * j + 1] as f32);
            let o = &mut out[64 * j..64 * j + 64];
            for l in 0..32 {
                let h0 = ((qh[l] >> (2 * j)) & 1) << 4;
                let h1 = ((qh[l] >> (2 * j + 1)) & 1) << 4;
                o[l] = d1 * ((q[l] & 0x0f) | h0) as f32 - m1;
                o[l + 32] = d2 * ((q[l] >> 4) | h1) as f32 - m2;
            }
        }
    }
}

/// `Σ_s d·d'·sc[s]·(q·q')  −  dmin·d'·Σ_s m[s]·(bsum[2s] + bsum[2s+1])`, integer inside a block.
pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0.0f32;
    for (x, y) in w
        .chunks_exact(BYTES)
        .zip(a.chunks_exact(q8_k::BYTES))
        .take(n / QK)
    {
        let dy = q8_k::d_at(y, 0);
        let (sc, mn) = scales_mins(&x[SCALES..SCALES + 12]);
        let qh = &x[QH..QH + 32];
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for j in 0..4 {
            let q = &x[QS + 32 * j..QS + 32 * j + 32];
            let yq = &y[q8_k::QS + 64 * j..q8_k::QS + 64 * j + 64];
            let mut lo = 0i32;
            let mut hi = 0i32;
            for l in 0..32 {
                let h0 = ((qh[l] >> (2 * j)) & 1) << 4;
                let h1 = ((qh[l] >> (2 * j + 1)) & 1) << 4;
                lo += ((q[l] & 0x0f) | h0) as i32 * yq[l] as i8 as i32;
                hi += ((q[l] >> 4) | h1) as i32 * yq[l + 32] as i8 as i32;
            }
            sumi += sc[2 * j] as i32 * lo + sc[2 * j + 1] as i32 * hi;
        }
        for (s, &m) in mn.iter().enumerate() {
            summ += m as i32 * (q8_k::bsum_at(y, 0, 2 * s) + q8_k::bsum_at(y, 0, 2 * s + 1));
        }
        sum += f16_at(x, 0) * dy * sumi as f32 - f16_at(x, 2) * dy * summ as f32;
    }
    sum
}

/// AVX2 version of [`dot_scalar`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C. The lengths are asserted (a panic, not UB): `w`
/// must hold `n/256` Q5_K blocks and `a` as many Q8_K.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_k::BYTES);
    let m4 = _mm256_set1_epi8(0x0f);
    let one = _mm256_set1_epi8(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: the assert above puts all of
        // Q5_K block i at x and all of Q8_K block i at y, inside `w` and `a`. The helpers need the
        // AVX2, FMA and F16C this function has.
        unsafe {
            let x = w.as_ptr().add(i * BYTES);
            // Stream the weights ahead of use (a hint; past the end it is harmless).
            _mm_prefetch(
                x.wrapping_add(super::PREFETCH_AHEAD) as *const i8,
                _MM_HINT_T0,
            );
            let y = a.as_ptr().add(i * q8_k::BYTES);
            let dy = (y as *const f32).read_unaligned();
            let p = scale_words(x);
            let sc = [p[0].to_le_bytes(), p[1].to_le_bytes()];
            let dmin = _mm256_set1_ps(f16_ptr(x.add(2)) * dy);
            acc_m = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(mins_dot_bsums(&p, y)), acc_m);
            let xq = x.add(QS);
            let yq = y.add(q8_k::QS);
            let mut qh = _mm256_loadu_si256(x.add(QH) as *const __m256i);
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                // j < 4: 32-byte loads stay within the 128 nibble bytes and 256 values.
                let q = _mm256_loadu_si256(xq.add(32 * j) as *const __m256i);
                let y0 = _mm256_loadu_si256(yq.add(64 * j) as *const __m256i);
                let y1 = _mm256_loadu_si256(yq.add(64 * j + 32) as *const __m256i);
                // `qh` has been shifted right by 2j: bit 0 of each byte is sub-block 2j's fifth
                // bit, bit 1 is sub-block 2j+1's. Masking to one bit per byte first keeps the
                // 16-bit shifts from carrying bits across bytes.
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, one), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 1), one), 4);
                qh = _mm256_srli_epi16(qh, 2);
                let lo = _mm256_or_si256(_mm256_and_si256(q, m4), h0);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m4), h1);
                // 5-bit x byte pairs fit i16 (2·31·128); the 6-bit scale then widens to i32.
                let s0 = sc[j / 2][2 * (j % 2)] as i16;
                let s1 = sc[j / 2][2 * (j % 2) + 1] as i16;
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y0), _mm256_set1_epi16(s0));
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y1), _mm256_set1_epi16(s1));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
            }
            let d = _mm256_set1_ps(f16_ptr(x) * dy);
            acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
        }
    }
    // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
    unsafe { hsum_ps(acc) - hsum_ps(acc_m) }
}
