//! ggml block formats as stored in GGUF files.
//!
//! Every weight type has a block of `block_len()` values stored in `block_bytes()` bytes, a
//! dequantizer, and a dot product against a row of activations quantized to the type's
//! [`GgmlType::vec_dot_type`] — the same pairing llama.cpp uses (Q4_1 weights meet Q8_1
//! activations, Q4_0/Q8_0 meet Q8_0, k-quants meet Q8_K), so results land close to it.
//! Every format has a scalar reference; AVX2 versions are chosen at run time in [`dispatch`].

mod dispatch;
mod float;
mod q4_0;
mod q4_1;
mod q4_k;
mod q5_0;
mod q5_1;
mod q5_k;
mod q6_k;
mod q8_0;
mod q8_1;
mod q8_k;
pub mod x8;

pub(crate) use dispatch::dot_kernels;
pub use dispatch::{
    dequantize_row, quantize_row, quantize_row_scalar, vec_dot, vec_dot_scalar, VecDot,
};
pub use dispatch::{ActRow, DotKernels, Gemm1x4, Gemm2x4, Gemv4x1};

/// Bytes ahead of the current block that single-token products prefetch: far enough to cover
/// DRAM latency at full bandwidth. Without it the gemv kernels stall on memory at about 5 GB/s
/// per core; with it the Q8_0 kernel streams about 10-12 GB/s (`gemv_bandwidth_probe` test).
pub(crate) const PREFETCH_AHEAD: usize = 4096;

/// Errors about tensor types and shapes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantError {
    /// A ggml type id that this build does not know at all.
    #[error("unknown ggml tensor type id {0}")]
    UnknownType(u32),
    /// A known ggml type that has no kernel here.
    #[error("tensor type {0} is not supported")]
    Unsupported(GgmlType),
    /// A worker thread of a matrix product failed.
    #[error("a matrix-product worker failed: {0}")]
    Worker(String),
    /// A row length that is not a whole number of blocks.
    #[error("row of {len} values is not a multiple of the {ty} block size {block}")]
    BadRowLength {
        /// The tensor type involved.
        ty: GgmlType,
        /// The offending length: values in the row (for a matrix, its byte count or the
        /// activations' column count).
        len: usize,
        /// What the length had to fit: the block size (for a matrix, the bytes its shape
        /// needs or its column count).
        block: usize,
    },
    /// A row whose size in bytes does not fit in memory's address range.
    #[error("row of {len} values of {ty} is too large to address")]
    RowTooLarge {
        /// The tensor type involved.
        ty: GgmlType,
        /// Values in the row.
        len: usize,
    },
}

/// ggml tensor types, with the numeric ids GGUF uses.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit IEEE float (id 0).
    F32,
    /// 16-bit IEEE half float (id 1).
    F16,
    /// 32 4-bit values offset by 8, one f16 scale (id 2).
    Q4_0,
    /// 32 4-bit values, an f16 scale and an f16 minimum (id 3).
    Q4_1,
    /// 32 5-bit values offset by 16, one f16 scale (id 6).
    Q5_0,
    /// 32 5-bit values, an f16 scale and an f16 minimum (id 7).
    Q5_1,
    /// 32 signed bytes, one f16 scale (id 8).
    Q8_0,
    /// Q8_0 plus the block's scaled sum; an activation format (id 9).
    Q8_1,
    /// 2-bit k-quant super-blocks of 256 (id 10); no kernel here.
    Q2_K,
    /// 3-bit k-quant super-blocks of 256 (id 11); no kernel here.
    Q3_K,
    /// 4-bit k-quant super-blocks of 256 with 6-bit sub-block scales and mins (id 12).
    Q4_K,
    /// Q4_K with a fifth bit per value (id 13).
    Q5_K,
    /// 6-bit k-quant super-blocks of 256 with 8-bit sub-block scales (id 14).
    Q6_K,
    /// 256 signed bytes with an f32 scale and group sums; the k-quants' activation format
    /// (id 15).
    Q8_K,
    /// bfloat16 (id 30).
    BF16,
    /// Any other id a GGUF file may carry (IQ formats, …): known to exist, never supported.
    Other(u32),
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgmlType::Other(id) => write!(f, "ggml type {id}"),
            t => write!(f, "{t:?}"),
        }
    }
}

impl GgmlType {
    /// Map a GGUF type id. Ids beyond the ones ggml has ever defined are an error.
    pub fn from_id(id: u32) -> Result<Self, QuantError> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2_K,
            11 => GgmlType::Q3_K,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            30 => GgmlType::BF16,
            4 | 5 | 16..=29 | 31..=41 => GgmlType::Other(id),
            _ => return Err(QuantError::UnknownType(id)),
        })
    }

    /// The GGUF id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2_K => 10,
            GgmlType::Q3_K => 11,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
            GgmlType::Other(id) => id,
        }
    }

    /// Values per block (None for types ggml defines but this build cannot size).
    pub fn block_len(self) -> Option<usize> {
        Some(match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => 32,
            GgmlType::Q8_0 | GgmlType::Q8_1 => 32,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K => 256,
            GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => 256,
            GgmlType::Other(_) => return None,
        })
    }

    /// Bytes per block (None for types this build cannot size).
    pub fn block_bytes(self) -> Option<usize> {
        Some(match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q8_1 => 36,
            GgmlType::Q2_K => 84,
            GgmlType::Q3_K => 110,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
            GgmlType::Other(_) => return None,
        })
    }

    /// The type activations are quantized to before a dot product with this weight type.
    pub fn vec_dot_type(self) -> GgmlType {
        match self {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => GgmlType::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => GgmlType::Q8_1,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K => GgmlType::Q8_K,
            GgmlType::Q5_K | GgmlType::Q6_K => GgmlType::Q8_K,
            t => t,
        }
    }

    /// Bytes used by a row of `len` values, or an error if the row is not whole blocks.
    pub fn row_bytes(self, len: usize) -> Result<usize, QuantError> {
        let (Some(block), Some(bytes)) = (self.block_len(), self.block_bytes()) else {
            return Err(QuantError::Unsupported(self));
        };
        if !len.is_multiple_of(block) {
            return Err(QuantError::BadRowLength {
                ty: self,
                len,
                block,
            });
        }
        (len / block)
            .checked_mul(bytes)
            .ok_or(QuantError::RowTooLarge { ty: self, len })
    }

    /// Whether this build can dequantize tensors of this type.
    pub fn can_dequantize(self) -> bool {
        dispatch::has_dequantize(self)
    }

    /// Whether this build can multiply tensors of this type with activations.
    pub fn can_matmul(self) -> bool {
        dispatch::has_vec_dot(self)
    }
}

/// Read a little-endian f16 at `off` and widen it.
#[inline(always)]
pub(crate) fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

/// Write `v` as a little-endian f16 at `off`.
#[inline(always)]
pub(crate) fn put_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
}

/// AVX2 building blocks shared by the quantized dot products and the other SIMD kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_util {
    use std::arch::x86_64::*;

    /// Horizontal sum of 8 f32 lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn hsum_ps(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Signed 8-bit x signed 8-bit products of 32 lanes, summed into 8 i32 lanes as f32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_sum_i8_pairs_ps(x: __m256i, y: __m256i) -> __m256 {
        // maddubs wants an unsigned left operand: move x's sign onto y.
        let ax = _mm256_sign_epi8(x, x);
        let sy = _mm256_sign_epi8(y, x);
        // SAFETY: mul_sum_u8_i8_ps needs AVX2 and FMA, which our caller guarantees.
        unsafe { mul_sum_u8_i8_ps(ax, sy) }
    }

    /// Unsigned 8-bit x signed 8-bit products of 32 lanes, summed into 8 i32 lanes as f32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_sum_u8_i8_ps(ux: __m256i, sy: __m256i) -> __m256 {
        let dot16 = _mm256_maddubs_epi16(ux, sy);
        let dot32 = _mm256_madd_epi16(dot16, _mm256_set1_epi16(1));
        _mm256_cvtepi32_ps(dot32)
    }

    /// 16 bytes of packed nibbles to 32 bytes: low nibbles in lanes 0..16, high in 16..32.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA, and `p` must point at 16 readable bytes (no
    /// alignment needed).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees 16 readable bytes at p; loadu needs no alignment.
        let b = unsafe { _mm_loadu_si128(p as *const __m128i) };
        let lo = _mm_and_si128(b, _mm_set1_epi8(0x0f));
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0f));
        _mm256_set_m128i(hi, lo)
    }

    /// The little-endian f16 at `p`, widened with F16C.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C, and `p` must point at 2 readable bytes (no
    /// alignment needed).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn f16_ptr(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees 2 readable bytes at p; read_unaligned needs no
        // alignment.
        let bits = unsafe { (p as *const u16).read_unaligned() };
        // A broadcast, not an insert: inserting into a register would make the compiler merge
        // into whatever register is free, often a live accumulator, and serialise the loop on it.
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_set1_epi16(bits as i16)))
    }

    /// Byte `j` of the result is 0xff where bit `j` of `bits` is set, else 0.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bits_to_bytes(bits: u32) -> __m256i {
        // Copy byte j/8 of `bits` into byte j (both 128-bit lanes hold all four bytes, so
        // the in-lane shuffle can reach bytes 2 and 3 from the high lane), then test bit j%8.
        let v = _mm256_set1_epi32(bits as i32);
        let spread = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let v = _mm256_shuffle_epi8(v, spread);
        let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask)
    }
}
