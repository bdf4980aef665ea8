//! Unquantized weight types: F32, F16 and BF16, stored little-endian. Activations are
//! converted to the weight's own type before the dot product (as ggml does), and the
//! products are summed in f32.

use half::{bf16, f16};

fn words(src: &[u8]) -> impl Iterator<Item = u16> + '_ {
    src.chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
}

/// F32: four little-endian bytes per value.
pub mod f32_ {
    /// Read `dst.len()` values from `src`.
    pub fn dequantize(src: &[u8], dst: &mut [f32]) {
        for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    /// Store `src` into `dst` as little-endian bytes.
    pub fn quantize(src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.iter().zip(dst.chunks_exact_mut(4)) {
            b.copy_from_slice(&x.to_le_bytes());
        }
    }
    /// Dot product of `n` values, summed in 8 lanes (lane `i % 8` takes term `i`).
    pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0.0f32; 8];
        for (i, (x, y)) in w.chunks_exact(4).zip(a.chunks_exact(4)).take(n).enumerate() {
            let x = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
            let y = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
            acc[i % 8] += x * y;
        }
        acc.iter().sum()
    }
    /// AVX2 dot product of `n` values (8-lane FMA, then the tail one by one).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `w` and `a` must each hold at least `n`
    /// little-endian f32 (`4 * n` bytes; no alignment needed). The lengths are only checked
    /// in debug builds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
        use std::arch::x86_64::*;
        debug_assert!(w.len() >= 4 * n && a.len() >= 4 * n);
        let (pw, pa) = (w.as_ptr() as *const f32, a.as_ptr() as *const f32);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and the caller guarantees n f32 in each row; loadu needs no
            // alignment.
            acc = unsafe {
                _mm256_fmadd_ps(_mm256_loadu_ps(pw.add(i)), _mm256_loadu_ps(pa.add(i)), acc)
            };
            i += 8;
        }
        // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
        let mut s = unsafe { super::super::avx2_util::hsum_ps(acc) };
        while i < n {
            // SAFETY: i < n bounds both rows; read_unaligned because byte slices carry no f32
            // alignment.
            s += unsafe { pw.add(i).read_unaligned() * pa.add(i).read_unaligned() };
            i += 1;
        }
        s
    }
}

/// F16: two little-endian bytes per value.
pub mod f16_ {
    use super::*;
    /// Widen `dst.len()` values from `src`.
    pub fn dequantize(src: &[u8], dst: &mut [f32]) {
        for (o, w) in dst.iter_mut().zip(words(src)) {
            *o = f16::from_bits(w).to_f32();
        }
    }
    /// Round `src` to f16 (nearest, ties to even) into `dst`.
    pub fn quantize(src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
            b.copy_from_slice(&f16::from_f32(*x).to_bits().to_le_bytes());
        }
    }
    /// Dot product of `n` values widened to f32, summed in 8 lanes (lane `i % 8` takes
    /// term `i`).
    pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0.0f32; 8];
        for (i, (x, y)) in words(w).zip(words(a)).take(n).enumerate() {
            acc[i % 8] += f16::from_bits(x).to_f32() * f16::from_bits(y).to_f32();
        }
        acc.iter().sum()
    }
    /// AVX2 dot product of `n` values (F16C widening, 8-lane FMA, the tail through
    /// [`dot_scalar`]).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and `w` and `a` must each hold at least `n`
    /// little-endian f16 (`2 * n` bytes). The lengths are only checked in debug builds.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(n: usize, w: &[u8], a: &[u8]) -> f32 {
        use std::arch::x86_64::*;
        debug_assert!(w.len() >= 2 * n && a.len() >= 2 * n);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n and the caller guarantees 2n bytes in each row, so both
            // 16-byte loads are in bounds; loadu needs no alignment.
            let x = unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(2 * i) as *const __m128i))
            };
            // SAFETY: as for x.
            let y = unsafe {
                _mm256_cvtph_ps(_mm_loadu_si128(a.as_ptr().add(2 * i) as *const __m128i))
            };
            acc = _mm256_fmadd_ps(x, y, acc);
            i += 8;
        }
        // SAFETY: this function's AVX2 and FMA are what hsum_ps needs.
        let mut s = unsafe { super::super::avx2_util::hsum_ps(acc) };
        if i < n {
            s += dot_scalar(n - i, &w[2 * i..], &a[2 * i..]);
        }
        s
    }
}

/// BF16: two little-endian bytes per value (the top half of an f32).
pub mod bf16_ {
    use super::*;
    /// Widen `dst.len()` values from `src`.
    pub fn dequantize(src: &[u8], dst: &mut [f32]) {
        for (o, w) in dst.iter_mut().zip(words(src)) {
            *o = bf16::from_bits(w).to_f32();
        }
    }
    /// Round `src` to bf16 (nearest, ties to even) into `dst`.
    pub fn quantize(src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.iter().zip(dst.chunks_exact_mut(2)) {
            b.copy_from_slice(&bf16::from_f32(*x).to_bits().to_le_bytes());
        }
    }
    /// Dot product of `n` values widened to f32, summed in 8 lanes (lane `i % 8` takes
    /// term `i`).
    pub fn dot_scalar(n: usize, w: &[u8], a: &[u8]) -> f32 {
        let mut acc = [0.0f32; 8];
        for (i, (x, y)) in words(w).zip(words(a)).take(n).enumerate() {
            acc[i % 8] += bf16::from_bits(x).to_f32() * bf16::from_bits(y).to_f32();
        }
        acc.iter().sum()
    }
}
