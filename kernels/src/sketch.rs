//! 4-bit key sketches: every key of a run of keys stored as one 4-bit code per dimension,
//! quantized against the run's element-wise key minimum and maximum (the same f16 extremes
//! Quest's bound uses), and scored against probe queries without touching the keys.
//!
//! A dimension `i` of a key is rebuilt as `lo[i] + code · (hi[i] − lo[i]) / 15`. Ranges are
//! per dimension and per run, so a key head's large outlier dimensions (RoPE pairs) do not
//! take the resolution of the small ones. Byte `j` of a row holds the code of dimension `j`
//! in its low nibble and of dimension `j + d/2` in its high nibble, so each half of a row
//! meets a contiguous half of the probe.
//!
//! Scoring folds the range into the probe: `p · k = p · lo + Σ_i (p_i · step_i) · code_i`.
//! The folded probe is quantized to int8 (per probe and run, scale `max |p_i · step_i| / 127`),
//! so each token's score is one exact integer dot product of its codes with the int8 probe
//! (AVX2 `vpmaddubsw`, 32 products per instruction), scaled and offset by the base `p · lo`.
//! The probe's rounding adds at most `64 · 15 · scale / 2` to a 64-wide score, well inside the
//! codes' own error.
//!
//! Hand-written because a decode step scores every token of every layer and kv head with the
//! kv head's query heads (millions of 64-wide products per token at 16K tokens). A first
//! version rebuilt each key in f32 and used FMAs: it cut sparse decode at 16K × 8 sequences
//! from 17.5 to 10.1 tok/s; the integer products are what make token-level scores affordable.

use crate::simd::{level, Level};
use half::f16;

/// Largest code.
const LEVELS: f32 = 15.0;

/// Codes of `keys` (`rows × d`, `d` even) against the range `lo..=hi` (`d` each), packed as
/// the module describes: `rows × d/2` bytes appended to `out`.
pub fn encode(keys: &[f16], lo: &[f16], hi: &[f16], out: &mut Vec<u8>) {
    let d = lo.len();
    assert!(
        d.is_multiple_of(2) && hi.len() == d && keys.len().is_multiple_of(d.max(1)),
        "sketch::encode: {} key values, ranges of {} and {}",
        keys.len(),
        lo.len(),
        hi.len()
    );
    let code = |x: f16, i: usize| -> u8 {
        let (l, h) = (lo[i].to_f32(), hi[i].to_f32());
        let step = (h - l) / LEVELS;
        if step > 0.0 && step.is_finite() {
            ((x.to_f32() - l) / step).round().clamp(0.0, LEVELS) as u8
        } else {
            0
        }
    };
    let half = d / 2;
    for row in keys.chunks_exact(d) {
        out.extend((0..half).map(|j| code(row[j], j) | (code(row[j + half], j + half) << 4)));
    }
}

/// A probe folded into one run's range and quantized: `score(t) = base + scale · Σ w_i c_ti`.
struct Folded {
    base: f32,
    scale: f32,
}

/// Fold probe `p` into the range `lo..=hi` and quantize it into `w` (scalar reference of the
/// SIMD setup: the same f32 operations, summed in another order for `base`).
fn fold_scalar(p: &[f32], lo: &[f16], hi: &[f16], w: &mut [i8]) -> Folded {
    let mut base = 0.0f32;
    let mut folded = vec![0.0f32; p.len()];
    let mut amax = 0.0f32;
    for i in 0..p.len() {
        let (l, h) = (lo[i].to_f32(), hi[i].to_f32());
        base += p[i] * l;
        folded[i] = p[i] * ((h - l) * (1.0 / LEVELS));
        amax = amax.max(folded[i].abs());
    }
    let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (x, f) in w.iter_mut().zip(&folded) {
        *x = (f * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    Folded {
        base,
        scale: amax / 127.0,
    }
}

/// Scalar reference of [`scores`].
pub fn scores_scalar(probes: &[f32], lo: &[f16], hi: &[f16], codes: &[u8], out: &mut [f32]) {
    let (d, rows) = shape(probes, lo, hi, codes, out);
    let half = d / 2;
    let mut w = vec![0i8; d];
    for (g, p) in probes.chunks_exact(d).enumerate() {
        let f = fold_scalar(p, lo, hi, &mut w);
        for (t, row) in codes.chunks_exact(half).enumerate() {
            let acc: i32 = row
                .iter()
                .enumerate()
                .map(|(j, &b)| (b & 15) as i32 * w[j] as i32 + (b >> 4) as i32 * w[j + half] as i32)
                .sum();
            out[g * rows + t] = f.base + f.scale * acc as f32;
        }
    }
}

/// The dot product of each of the probes (`probes`: `g × d`) with each key of a run whose
/// codes are `codes` (`rows × d/2`) against the range `lo..=hi`; `out` (`g × rows`,
/// probe-major) receives them. The probe is quantized as the module describes.
pub fn scores(probes: &[f32], lo: &[f16], hi: &[f16], codes: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if level() == Level::Avx2 {
        let (d, rows) = shape(probes, lo, hi, codes, out);
        if d.is_multiple_of(64) && d <= avx2::MAX_DIM {
            // SAFETY: AVX2, FMA and F16C were detected at run time; `shape` checked that
            // probes hold g × d values, lo and hi d each, codes rows × d/2 bytes and out
            // g × rows values; d is a multiple of 64 and at most MAX_DIM.
            unsafe { avx2::scores(probes, lo, hi, codes, out, d, rows) };
            return;
        }
    }
    scores_scalar(probes, lo, hi, codes, out)
}

/// `(d, rows)` of the arguments; panics when they disagree (a caller's bug).
fn shape(probes: &[f32], lo: &[f16], hi: &[f16], codes: &[u8], out: &[f32]) -> (usize, usize) {
    let d = lo.len();
    let ok = d > 0 && d.is_multiple_of(2) && hi.len() == d;
    let (g, rows) = if ok {
        (probes.len() / d, codes.len() / (d / 2))
    } else {
        (0, 0)
    };
    assert!(
        ok && probes.len() == g * d && codes.len() == rows * (d / 2) && out.len() == g * rows,
        "sketch::scores: {} probe values, ranges of {} and {}, {} code bytes, {} outputs",
        probes.len(),
        lo.len(),
        hi.len(),
        codes.len(),
        out.len()
    );
    (d, rows)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Widest head handled here (the folded probe stays in a stack buffer).
    pub const MAX_DIM: usize = 256;
    /// Rows whose sums are reduced together.
    const ROWS: usize = 8;

    /// The range `lo..=hi` widened once for every probe of a call: `l` gets `lo` and `step`
    /// gets `(hi - lo) / 15` (the same f32 operations `fold_scalar` uses per dimension).
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C; `d` must be a multiple of 8, `lo` and `hi` must
    /// hold at least `d` values and `l` and `step` must each point at `d` writable f32 (no
    /// alignment needed).
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn widen_range(lo: &[f16], hi: &[f16], d: usize, l: *mut f32, step: *mut f32) {
        let inv15 = _mm256_set1_ps(1.0 / super::LEVELS);
        let mut i = 0;
        while i < d {
            // SAFETY: i + 8 <= d, and the caller guarantees d values in lo, hi and both buffers.
            unsafe {
                let lv = _mm256_cvtph_ps(_mm_loadu_si128(lo.as_ptr().add(i) as *const __m128i));
                let hv = _mm256_cvtph_ps(_mm_loadu_si128(hi.as_ptr().add(i) as *const __m128i));
                _mm256_storeu_ps(l.add(i), lv);
                _mm256_storeu_ps(step.add(i), _mm256_mul_ps(_mm256_sub_ps(hv, lv), inv15));
            }
            i += 8;
        }
    }

    /// Fold one probe into the widened range (`l`, `step`: `d` values each) and quantize it
    /// into `w` (see `fold_scalar`); returns (base, scale). Two passes over the range (max
    /// first, then quantize) instead of a buffer of folded values.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `d` must be a multiple of 32 and at most
    /// [`MAX_DIM`]; `p`, `l` and `step` must each point at `d` readable f32 (no alignment
    /// needed).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fold(
        p: *const f32,
        l: *const f32,
        step: *const f32,
        d: usize,
        w: &mut [i8; MAX_DIM],
    ) -> (f32, f32) {
        let sign = _mm256_set1_ps(-0.0);
        // SAFETY: every call below has i + 8 <= d, and the caller guarantees d values at p, `l` and
        // `step`; loadu needs no alignment.
        let folded = |i: usize| unsafe {
            let x = _mm256_loadu_ps(p.add(i));
            (
                x,
                _mm256_loadu_ps(l.add(i)),
                _mm256_mul_ps(x, _mm256_loadu_ps(step.add(i))),
            )
        };
        let mut base = _mm256_setzero_ps();
        let mut amax = _mm256_setzero_ps();
        let mut i = 0;
        while i < d {
            let (x, lv, f) = folded(i);
            base = _mm256_fmadd_ps(x, lv, base);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, f));
            i += 8;
        }
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds the 8 f32 the store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), amax) };
        let amax = lanes.iter().copied().fold(0.0f32, f32::max);
        // SAFETY: as above.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), base) };
        let base: f32 = lanes.iter().sum();
        let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // Round to nearest even (the default rounding mode), as the scalar reference does;
        // |f · inv| <= 127, so the packs never saturate.
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut i = 0;
        while i < d {
            let q = |k: usize| _mm256_cvtps_epi32(_mm256_mul_ps(folded(i + 8 * k).2, inv));
            let ab = _mm256_packs_epi32(q(0), q(1));
            let cd = _mm256_packs_epi32(q(2), q(3));
            let abcd = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), order);
            // SAFETY: i + 32 <= d (d % 32 == 0) <= MAX_DIM bounds `w`.
            unsafe { _mm256_storeu_si256(w.as_mut_ptr().add(i) as *mut __m256i, abcd) };
            i += 32;
        }
        (base, amax / 127.0)
    }

    /// One 64-wide row's products with `w` summed in pairs: 16 i16 lanes, each the sum of
    /// four products of at most 15 · 127, so at most 7,620.
    ///
    /// # Safety
    /// The CPU must support AVX2, and `row` must point at 32 readable bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn row_pairs64(row: *const u8, w_lo: __m256i, w_hi: __m256i) -> __m256i {
        let nibble = _mm256_set1_epi8(15);
        // SAFETY: the caller guarantees 32 readable bytes at row.
        let x = unsafe { _mm256_loadu_si256(row as *const __m256i) };
        let c_lo = _mm256_and_si256(x, nibble);
        let c_hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
        _mm256_add_epi16(
            _mm256_maddubs_epi16(c_lo, w_lo),
            _mm256_maddubs_epi16(c_hi, w_hi),
        )
    }

    /// Eight 64-wide rows' sums with `w`, in row order. Two levels of i16 horizontal adds
    /// (at most 4 · 7,620 = 30,480 per lane: no wrap) before widening, then one level of
    /// i32: the same integers as eight `row_sums`, in fewer instructions.
    ///
    /// # Safety
    /// The CPU must support AVX2, and `rows` must point at eight rows of 32 readable bytes
    /// (256 bytes).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn eight_rows64(rows: *const u8, w: &[i8; MAX_DIM]) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        // SAFETY: w holds MAX_DIM (256) bytes; this load reads bytes 0..32.
        let w_lo = unsafe { _mm256_loadu_si256(w.as_ptr() as *const __m256i) };
        // SAFETY: as above, bytes 32..64.
        let w_hi = unsafe { _mm256_loadu_si256(w.as_ptr().add(32) as *const __m256i) };
        // SAFETY: the caller guarantees eight rows of 32 bytes from `rows`, and r < 8 at every
        // call; row_pairs64 needs the AVX2 this function has.
        let p = |r: usize| unsafe { row_pairs64(rows.add(r * 32), w_lo, w_hi) };
        let a = _mm256_hadd_epi16(_mm256_hadd_epi16(p(0), p(1)), _mm256_hadd_epi16(p(2), p(3)));
        let b = _mm256_hadd_epi16(_mm256_hadd_epi16(p(4), p(5)), _mm256_hadd_epi16(p(6), p(7)));
        // [r0 r1 r2 r3 | r0 r1 r2 r3] and [r4..r7 | r4..r7] in i32, the halves then added.
        let (a, b) = (_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones));
        _mm256_add_epi32(
            _mm256_permute2x128_si256(a, b, 0x20),
            _mm256_permute2x128_si256(a, b, 0x31),
        )
    }

    /// The integer sums of one row's codes with the folded probe `w`, in 8 i32 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2; `half` must be a multiple of 32 with `2 * half <=
    /// MAX_DIM`, and `row` must point at `half` readable bytes.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn row_sums(row: *const u8, w: &[i8; MAX_DIM], half: usize) -> __m256i {
        let nibble = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        let mut j = 0;
        while j < half {
            // SAFETY: j + 32 <= half bounds the row (the caller guarantees half bytes); j + half +
            // 32 <= 2·half <= MAX_DIM bounds w.
            unsafe {
                let x = _mm256_loadu_si256(row.add(j) as *const __m256i);
                let c_lo = _mm256_and_si256(x, nibble);
                let c_hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
                let w_lo = _mm256_loadu_si256(w.as_ptr().add(j) as *const __m256i);
                let w_hi = _mm256_loadu_si256(w.as_ptr().add(j + half) as *const __m256i);
                // Codes are unsigned (0..=15) and weights signed: each i16 pair sum is at most
                // 2 · 15 · 127, and the two halves' sum at most 7,620, so nothing saturates.
                let pairs = _mm256_add_epi16(
                    _mm256_maddubs_epi16(c_lo, w_lo),
                    _mm256_maddubs_epi16(c_hi, w_hi),
                );
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
            }
            j += 32;
        }
        acc
    }

    /// The AVX2 version of [`super::scores`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `d` must be a multiple of 64 and at most
    /// [`MAX_DIM`]; `lo` and `hi` must hold `d` values, `probes` `g × d` (`g =
    /// probes.len() / d`), `codes` `rows × d/2` bytes and `out` `g × rows` values (what
    /// `super::shape` checks). The reads of `codes` and `probes` are unchecked.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores(
        probes: &[f32],
        lo: &[f16],
        hi: &[f16],
        codes: &[u8],
        out: &mut [f32],
        d: usize,
        rows: usize,
    ) {
        let g = probes.len() / d;
        let half = d / 2;
        let mut w = [0i8; MAX_DIM];
        // Written for the first d values before any read (no zeroing per call).
        let mut l = std::mem::MaybeUninit::<[f32; MAX_DIM]>::uninit();
        let mut step = std::mem::MaybeUninit::<[f32; MAX_DIM]>::uninit();
        let (l, step) = (l.as_mut_ptr() as *mut f32, step.as_mut_ptr() as *mut f32);
        // SAFETY: d is a multiple of 64 and at most MAX_DIM, lo and hi hold d values (the
        // caller's guarantee), and l and step are MAX_DIM-wide stack buffers.
        unsafe { widen_range(lo, hi, d, l, step) };
        for k in 0..g {
            // SAFETY: k < g bounds the probe row (probes hold g × d values); l and step hold
            // d values written by widen_range; d % 32 == 0 and d <= MAX_DIM.
            let (base, scale) = unsafe { fold(probes.as_ptr().add(k * d), l, step, d, &mut w) };
            let (basev, scalev) = (_mm256_set1_ps(base), _mm256_set1_ps(scale));
            let o = &mut out[k * rows..(k + 1) * rows];
            let mut t = 0;
            while t + ROWS <= rows {
                // SAFETY: t + 8 <= rows bounds the rows read (codes hold rows × half bytes,
                // half == 32 for eight_rows64, a multiple of 32 for row_sums); `o` holds
                // `rows` values.
                unsafe {
                    let sums = if half == 32 {
                        eight_rows64(codes.as_ptr().add(t * half), &w)
                    } else {
                        macro_rules! s {
                            ($r:expr) => {
                                row_sums(codes.as_ptr().add((t + $r) * half), &w, half)
                            };
                        }
                        // Eight rows' lane sums reduced together: [r0..r3 | r0..r3] and
                        // [r4..r7 | r4..r7] halves, then the halves added.
                        let a = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(s!(0), s!(1)),
                            _mm256_hadd_epi32(s!(2), s!(3)),
                        );
                        let b = _mm256_hadd_epi32(
                            _mm256_hadd_epi32(s!(4), s!(5)),
                            _mm256_hadd_epi32(s!(6), s!(7)),
                        );
                        _mm256_add_epi32(
                            _mm256_permute2x128_si256(a, b, 0x20),
                            _mm256_permute2x128_si256(a, b, 0x31),
                        )
                    };
                    let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scalev, basev);
                    _mm256_storeu_ps(o.as_mut_ptr().add(t), v);
                }
                t += ROWS;
            }
            while t < rows {
                // SAFETY: t < rows bounds the row read; `lanes` holds the 8 i32 the store
                // writes.
                unsafe {
                    let s = row_sums(codes.as_ptr().add(t * half), &w, half);
                    let mut lanes = [0i32; 8];
                    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, s);
                    o[t] = base + scale * lanes.iter().sum::<i32>() as f32;
                }
                t += 1;
            }
        }
    }
}
