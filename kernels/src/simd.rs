//! Run-time CPU feature selection. Kernels ask [`level`] once and dispatch on it; the scalar
//! reference is always compiled and always available.

use std::sync::OnceLock;

/// The instruction-set level the SIMD kernels may use on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Portable scalar code only.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

static LEVEL: OnceLock<Level> = OnceLock::new();

fn detect() -> Level {
    if std::env::var_os("INSTINFER_FORCE_SCALAR").is_some() {
        return Level::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Level::Avx2;
        }
    }
    Level::Scalar
}

/// The level detected for this process (cached). Setting `INSTINFER_FORCE_SCALAR` before the
/// first call forces the scalar reference everywhere.
pub fn level() -> Level {
    *LEVEL.get_or_init(detect)
}

/// A short name for logs and benchmark reports.
pub fn level_name() -> &'static str {
    match level() {
        Level::Scalar => "scalar",
        Level::Avx2 => "avx2+fma+f16c",
    }
}
