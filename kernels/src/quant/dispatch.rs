//! Picks the kernel for a type and the CPU: dequantizers, activation quantizers and dot
//! products. The scalar reference is always available; AVX2 versions are chosen when
//! [`crate::simd::level`] allows.

use super::{
    float, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0, q8_1, q8_k, GgmlType, QuantError,
};
use crate::simd::{level, Level};

/// A dot product of `n` values: one weight row against one quantized activation row.
pub type VecDot = fn(usize, &[u8], &[u8]) -> f32;
type Convert = fn(&[u8], &mut [f32]);
type Quantize = fn(&[f32], &mut [u8]);

fn dequantize_fn(ty: GgmlType) -> Option<Convert> {
    Some(match ty {
        GgmlType::F32 => float::f32_::dequantize,
        GgmlType::F16 => float::f16_::dequantize,
        GgmlType::BF16 => float::bf16_::dequantize,
        GgmlType::Q4_0 => q4_0::dequantize,
        GgmlType::Q4_1 => q4_1::dequantize,
        GgmlType::Q5_0 => q5_0::dequantize,
        GgmlType::Q5_1 => q5_1::dequantize,
        GgmlType::Q8_0 => q8_0::dequantize,
        GgmlType::Q8_1 => q8_1::dequantize,
        GgmlType::Q4_K => q4_k::dequantize,
        GgmlType::Q5_K => q5_k::dequantize,
        GgmlType::Q6_K => q6_k::dequantize,
        GgmlType::Q8_K => q8_k::dequantize,
        _ => return None,
    })
}

fn quantize_fn(ty: GgmlType) -> Option<Quantize> {
    Some(match ty {
        GgmlType::F32 => float::f32_::quantize,
        GgmlType::F16 => float::f16_::quantize,
        GgmlType::BF16 => float::bf16_::quantize,
        GgmlType::Q4_0 => q4_0::quantize,
        GgmlType::Q4_1 => q4_1::quantize,
        GgmlType::Q8_0 => q8_0::quantize,
        GgmlType::Q8_1 => q8_1::quantize,
        GgmlType::Q8_K => q8_k::quantize,
        _ => return None,
    })
}

/// The scalar reference dot product for weight type `ty`.
pub(crate) fn scalar_dot_fn(ty: GgmlType) -> Option<VecDot> {
    Some(match ty {
        GgmlType::F32 => float::f32_::dot_scalar,
        GgmlType::F16 => float::f16_::dot_scalar,
        GgmlType::BF16 => float::bf16_::dot_scalar,
        GgmlType::Q4_0 => q4_0::dot_scalar,
        GgmlType::Q4_1 => q4_1::dot_scalar,
        GgmlType::Q5_0 => q5_0::dot_scalar,
        GgmlType::Q5_1 => q5_1::dot_scalar,
        GgmlType::Q8_0 => q8_0::dot_scalar,
        GgmlType::Q4_K => q4_k::dot_scalar,
        GgmlType::Q5_K => q5_k::dot_scalar,
        GgmlType::Q6_K => q6_k::dot_scalar,
        _ => return None,
    })
}

#[cfg(target_arch = "x86_64")]
fn avx2_dot_fn(ty: GgmlType) -> Option<VecDot> {
    // Safety of every wrapper below: these are only returned when `level()` reported AVX2,
    // FMA and F16C, and every caller passes rows of `n` values (`vec_dot` checks them; the
    // matrix products size them from `QMatrix` and `QuantizedActs`).
    Some(match ty {
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::F32 => |n, w, a| unsafe { float::f32_::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::F16 => |n, w, a| unsafe { float::f16_::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q4_0 => |n, w, a| unsafe { q4_0::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q4_1 => |n, w, a| unsafe { q4_1::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q5_0 => |n, w, a| unsafe { q5_0::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q5_1 => |n, w, a| unsafe { q5_1::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q8_0 => |n, w, a| unsafe { q8_0::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q4_K => |n, w, a| unsafe { q4_k::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q5_K => |n, w, a| unsafe { q5_k::dot_avx2(n, w, a) },
        // SAFETY: AVX2, FMA and F16C detected; both rows hold n values (see above).
        GgmlType::Q6_K => |n, w, a| unsafe { q6_k::dot_avx2(n, w, a) },
        _ => return None,
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_dot_fn(_ty: GgmlType) -> Option<VecDot> {
    None
}

/// An activation row quantized for a dot product, with its block scales (and, for Q8_1,
/// scaled block sums) widened to f32.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    /// The row's quantized blocks, as stored.
    pub blocks: &'a [u8],
    /// Each block's scale `d`, widened to f32.
    pub d: &'a [f32],
    /// Each block's scaled sum `s` widened to f32 (Q8_1 only; empty for Q8_0).
    pub s: &'a [f32],
}

/// One weight row against four activation rows.
pub type Gemm1x4 = fn(usize, &[u8], [ActRow; 4]) -> [f32; 4];
/// Four weight rows against one activation row.
pub type Gemv4x1 = fn(usize, [&[u8]; 4], ActRow) -> [f32; 4];
/// Two weight rows against four activation rows.
pub type Gemm2x4 = fn(usize, [&[u8]; 2], [ActRow; 4]) -> [[f32; 4]; 2];

/// The kernels a matrix product uses for one weight type. Every variant sums each dot
/// product in the same order as `one`, so results do not depend on which one ran.
#[derive(Clone, Copy)]
pub struct DotKernels {
    /// One weight row against one activation row; always present.
    pub one: VecDot,
    /// One weight row against four activation rows, where this type and CPU have one.
    pub gemm: Option<Gemm1x4>,
    /// Four weight rows against one activation row, where this type and CPU have one.
    pub gemv: Option<Gemv4x1>,
    /// Two weight rows against four activation rows, where this type and CPU have one.
    pub gemm2: Option<Gemm2x4>,
}

#[cfg(target_arch = "x86_64")]
fn avx2_tiles(ty: GgmlType) -> (Option<Gemm1x4>, Option<Gemv4x1>) {
    // Safety of every wrapper below: only returned when `level()` reported AVX2, FMA and
    // F16C; the kernels assert every row and scale slice is long enough before reading.
    match ty {
        GgmlType::Q4_1 => (
            // SAFETY: AVX2, FMA and F16C detected; the kernel asserts every length.
            Some(|n, w, a| unsafe {
                q4_1::gemm_1x4(n, w, a.map(|r| r.blocks), a.map(|r| r.d), a.map(|r| r.s))
            }),
            // SAFETY: AVX2, FMA and F16C detected; the kernel asserts every length.
            Some(|n, w, a| unsafe { q4_1::gemv_4x1(n, w, a.blocks, a.d, a.s) }),
        ),
        GgmlType::Q8_0 => (
            // SAFETY: AVX2, FMA and F16C detected; the kernel asserts every length.
            Some(|n, w, a| unsafe { q8_0::gemm_1x4(n, w, a.map(|r| r.blocks), a.map(|r| r.d)) }),
            // SAFETY: AVX2, FMA and F16C detected; the kernel asserts every length.
            Some(|n, w, a| unsafe { q8_0::gemv_4x1(n, w, a.blocks, a.d) }),
        ),
        GgmlType::Q5_0 => (
            // SAFETY: AVX2, FMA and F16C detected; the kernel asserts every length.
            Some(|n, w, a| unsafe { q5_0::gemm_1x4(n, w, a.map(|r| r.blocks), a.map(|r| r.d)) }),
            // SAFETY: AVX2, FMA and F16C detected; the kernel asserts every length.
            Some(|n, w, a| unsafe { q5_0::gemv_4x1(n, w, a.blocks, a.d) }),
        ),
        _ => (None, None),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_tiles(_ty: GgmlType) -> (Option<Gemm1x4>, Option<Gemv4x1>) {
    (None, None)
}

/// The dot-product kernels for weight type `ty` on this CPU.
pub(crate) fn dot_kernels(ty: GgmlType) -> Result<DotKernels, QuantError> {
    let one = dot_fn(ty)?;
    let (gemm, gemv) = match level() {
        Level::Avx2 => avx2_tiles(ty),
        Level::Scalar => (None, None),
    };
    #[cfg(target_arch = "x86_64")]
    let gemm2: Option<Gemm2x4> = match (level(), ty) {
        // SAFETY: AVX2, FMA and F16C were detected; the kernel asserts every length.
        (Level::Avx2, GgmlType::Q4_1) => Some(|n, w, a| unsafe {
            q4_1::gemm_2x4(n, w, a.map(|r| r.blocks), a.map(|r| r.d), a.map(|r| r.s))
        }),
        _ => None,
    };
    #[cfg(not(target_arch = "x86_64"))]
    let gemm2 = None;
    Ok(DotKernels {
        one,
        gemm,
        gemv,
        gemm2,
    })
}

/// The fastest dot product for weight type `ty` on this CPU.
pub(crate) fn dot_fn(ty: GgmlType) -> Result<VecDot, QuantError> {
    let simd = match level() {
        Level::Avx2 => avx2_dot_fn(ty),
        Level::Scalar => None,
    };
    simd.or_else(|| scalar_dot_fn(ty))
        .ok_or(QuantError::Unsupported(ty))
}

pub(crate) fn has_dequantize(ty: GgmlType) -> bool {
    dequantize_fn(ty).is_some()
}

pub(crate) fn has_vec_dot(ty: GgmlType) -> bool {
    scalar_dot_fn(ty).is_some() && quantize_fn(ty.vec_dot_type()).is_some()
}

fn check_rows(ty: GgmlType, n: usize, bytes: usize) -> Result<(), QuantError> {
    let need = ty.row_bytes(n)?;
    if bytes < need {
        return Err(QuantError::BadRowLength {
            ty,
            len: n,
            block: ty.block_len().unwrap_or(1),
        });
    }
    Ok(())
}

/// Dequantize `dst.len()` values of type `ty` from `src`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let f = dequantize_fn(ty).ok_or(QuantError::Unsupported(ty))?;
    check_rows(ty, dst.len(), src.len())?;
    f(src, dst);
    Ok(())
}

/// Quantize `src` to type `ty` into `dst` (which must hold `ty.row_bytes(src.len())`).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    let f = quantize_fn(ty).ok_or(QuantError::Unsupported(ty))?;
    check_rows(ty, src.len(), dst.len())?;
    f(src, dst);
    Ok(())
}

/// Dot product of an `n`-value weight row of type `ty` with an activation row already
/// quantized to `ty.vec_dot_type()`.
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32, QuantError> {
    check_rows(ty, n, w.len())?;
    check_rows(ty.vec_dot_type(), n, a.len())?;
    Ok(dot_fn(ty)?(n, w, a))
}

/// The scalar reference of [`vec_dot`], for tests of the SIMD kernels.
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], a: &[u8]) -> Result<f32, QuantError> {
    check_rows(ty, n, w.len())?;
    check_rows(ty.vec_dot_type(), n, a.len())?;
    Ok(scalar_dot_fn(ty).ok_or(QuantError::Unsupported(ty))?(
        n, w, a,
    ))
}

/// The scalar reference of [`quantize_row`] for the activation formats (Q8_0, Q8_1); other
/// types use their only implementation.
pub fn quantize_row_scalar(ty: GgmlType, src: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; ty.row_bytes(src.len()).unwrap_or(0)];
    match ty {
        GgmlType::Q8_0 => q8_0::quantize_scalar(src, &mut out),
        GgmlType::Q8_1 => q8_1::quantize_scalar(src, &mut out),
        _ => {
            let _ = quantize_row(ty, src, &mut out);
        }
    }
    out
}
