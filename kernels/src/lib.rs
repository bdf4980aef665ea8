//! Math kernels for instinfer.
//!
//! * [`quant`]: GGUF/ggml block formats, dequantization, activation quantization and
//!   the quantized dot products, each with a scalar reference and an AVX2 version picked
//!   at run time.
//! * [`matmul`]: multi-threaded quantized mat-vec and mat-mat products.
//! * [`attention`]: attention over an f16 KV cache with f32 accumulation and an online
//!   softmax that also returns the log-sum-exp, so partial results can be merged.
//! * [`multi_head`]: grouped-query attention of one sequence over per-kv-head segments, the
//!   routine both KV backends share.
//! * [`bound`]: Quest's upper bound of query-key products over runs of f16 keys.
//! * [`sketch`]: 4-bit key sketches and their scores against probe queries.
//! * [`gather`]: scores against, and weighted sums of, gathered rows of a strided table.
//! * [`ops`]: RMSNorm, RoPE, SwiGLU and friends.
//! * [`cuda`]: the optional GPU path (feature `cuda`); a stand-in that returns a clear
//!   error when the feature is off.

pub mod attention;
pub mod bound;
pub mod cuda;
pub mod gather;
pub mod matmul;
pub mod multi_head;
pub mod ops;
pub mod quant;
pub mod simd;
pub mod simd_math;
pub mod sketch;
pub mod team;

pub use quant::{GgmlType, QuantError};
