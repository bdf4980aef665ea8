//! instinfer-kernels: the math of instinfer, on the CPU, with no knowledge of models, files
//! or servers. Every SIMD kernel is picked at run time (AVX2/FMA/F16C where the CPU has them)
//! and has a plain scalar reference beside it that the tests compare against. The kernels that
//! the model shares with llama.cpp perform llama.cpp's floating-point operations in its order,
//! so outputs match it bit for bit. The crate holds no state and does no I/O; it is not the
//! KV store (csd-engine) nor the model (instinfer-runtime). The CUDA path is a stand-in until
//! the GPU work lands.
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
//! * [`cuda`]: the GPU path behind the off-by-default `cuda` feature; for now a stand-in
//!   that returns a clear error, with or without the feature.

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
