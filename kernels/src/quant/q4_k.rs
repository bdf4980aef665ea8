//! Q4_K: super-blocks of 256 values in 8 sub-blocks of 32. Each sub-block has a 6-bit scale
//! and a 6-bit minimum, themselves scaled by the block's f16 `d` and `dmin`:
//! `x = d·sc[s]·q − dmin·m[s]` with `q` a 4-bit nibble.
//!
//! Layout (144 bytes): `d: f16` at 0, `dmin: f16` at 2, 12 bytes of packed scales/mins at 4,
//! 128 bytes of nibbles at 16. Nibbles come in runs of 32 bytes: run `j` holds sub-block `2j`
//! in its low nibbles and sub-block `2j+1` in its high nibbles.

use super::{f16_at, q8_k};

/// Values per super-block.
pub const QK: usize = 256;
/// Bytes per super-block.
pub const BYTES: usize = 144;
const SCALES: usize = 4;
const QS: usize = 16;

/// Unpack the 8 six-bit scales and 8 six-bit mins shared by Q4_K and Q5_K, from the 12 packed
/// bytes read as three little-endian u32 words. Returns the 16 bytes `sc[0..8]`, `m[0..8]` as
/// four little-endian u32 words.
///
/// Bytes 0..4 hold scales 0..4 in their low 6 bits, bytes 4..8 mins 0..4 likewise. Bytes
/// 8..12 hold the low 4 bits of scale `4+k` (low nibble) and min `4+k` (high nibble); their
/// top 2 bits live in the spare top bits of bytes `k` (scale) and `4+k` (min). Every step
/// below masks per byte, so the word-wide shifts never leak bits between bytes.
#[inline(always)]
pub(crate) fn unpack_scales_mins(a0: u32, a1: u32, a2: u32) -> [u32; 4] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    [
        a0 & LOW6,
        (a2 & LOW4) | (((a0 >> 6) & TOP2) << 4),
        a1 & LOW6,
        ((a2 >> 4) & LOW4) | (((a1 >> 6) & TOP2) << 4),
    ]
}

/// The 8 scales and 8 mins of a Q4_K/Q5_K block from its 12 packed bytes.
#[inline(always)]
pub(crate) fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word = |k: usize| u32::from_le_bytes([s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]]);
    let p = unpack_scales_mins(word(0), word(1), word(2));
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    sc[..4].copy_from_slice(&p[0].to_le_bytes());
    sc[4..].copy_from_slice(&p[1].to_le_bytes());
    mn[..4].copy_from_slice(&p[2].to_le_bytes());
    mn[4..].copy_from_slice(&p[3].to_le_bytes());
    (sc, mn)
}

/// Σ_s m[s]·(bsum[2s] + bsum[2s+1]) for one Q8_K block at `y`, as 8 i32 lanes, with the mins
/// given as the packed words `p[2]`, `p[3]` of [`unpack_scales_mins`].
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C, and `y` must point at a whole readable Q8_K
/// block (292 bytes; no alignment needed).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn mins_dot_bsums(p: &[u32; 4], y: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let mins = _mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, p[3] as i32, p[2] as i32));
    // SAFETY: the caller guarantees a whole Q8_K block at y, so its 32 bytes of group sums.
    let bsums = unsafe { _mm256_loadu_si256(y.add(q8_k::BSUMS) as *const __m256i) };
    let pairs = _mm256_madd_epi16(bsums, _mm256_set1_epi16(1));
    _mm256_mullo_epi32(mins, pairs)
}

/// Read the three packed scale words of the block at `x` (scales at byte 4).
///
/// # Safety
/// `x` must point at a whole readable Q4_K or Q5_K block (at least its first 16 bytes; no
/// alignment needed).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn scale_words(x: *const u8) -> [u32; 4] {
    // SAFETY: the caller guarantees bytes 4..16 of the block are readable, and the three
    // words read (k < 3) lie there; read_unaligned needs no alignment.
    let word =
        |k: usize| unsafe { u32::from_le((x.add(SCALES + 4 * k) as *const u32).read_unaligned()) };
    unpack_scales_mins(word(0), word(1), word(2))
}

/// As ggml's `dequantize_row_q4_K`: `(d·sc)·q − (dmin·m)`, in that order, no fused ops.
pub fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (blk, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = f16_at(blk, 0);
        let dmin = f16_at(blk, 2);
        let (sc, mn) = scales_mins(&blk[SCALES..SCALES + 12]);
        for j in 0..4 {
            let q = &blk[QS + 32 * j..QS + 32 * j + 32];
            let (d1, m1) = (d * sc[2 * j] as f32, dmin * mn[2 * j] as f32);
            let (d2, m2) = (d * sc[2 * j + 1] as f32, dmin * mn[2 * j + 1] as f32);
            let o = &mut out[64 * j..64 * j + 64];
            for l in 0..32 {
                o[l] = d1 * (q[l] & 0x0f) as f32 - m1;
                o[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
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
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for j in 0..4 {
            let q = &x[QS + 32 * j..QS + 32 * j + 32];
            let yq = &y[q8_k::QS + 64 * j..q8_k::QS + 64 * j + 64];
            let mut lo = 0i32;
            let mut hi = 0i32;
            for l in 0..32 {
                lo += (q[l] & 0x0f) as i32 * yq[l] as i8 as i32;
                hi += (q[l] >> 4) as i32 * yq[l + 32] as i8 as i32;
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
/// must hold `n/256` Q4_K blocks and `a` as many Q8_K.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
    use super::avx2_util::*;
    use std::arch::x86_64::*;
    let nb = n / QK;
    assert!(w.len() >= nb * BYTES && a.len() >= nb * q8_k::BYTES);
    let m4 = _mm256_set1_epi8(0x0f);
    let mut acc = _mm256_setzero_ps();
    let mut acc_m = _mm256_setzero_ps();
    for i in 0..nb {
        // SAFETY: every pointer read in this iteration is in bounds: the assert above puts all of
        // Q4_K block i at x and all of Q8_K block i at y, inside `w` and `a`. The helpers need the
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
            let mut sumi = _mm256_setzero_si256();
            for j in 0..4 {
                // j < 4: 32-byte loads stay within the 128 nibble bytes and 256 values.
                let q = _mm256_loadu_si256(xq.add(32 * j) as *const __m256i);
                let y0 = _mm256_loadu_si256(yq.add(64 * j) as *const __m256i);
                let y1 = _mm256_loadu_si256(yq.add(64 * j + 32) as *const __m256i);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                // Nibble x byte pairs fit i16 (2·15·128); the 6-bit scale then widens to i32.
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
