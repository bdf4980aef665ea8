//! instinfer-runtime: the model runtime of instinfer.
//!
//! It loads a GGUF model ([`model::gguf`], [`model::weights`]), builds its tokenizer
//! ([`tokenizer`]) and chat template ([`chat`]), runs the Llama-family forward pass ([`model`]) over a
//! KV cache backend ([`kv`]: one sequence or a batch, in RAM or in the storage engine),
//! samples ([`sampling`]) and generates
//! ([`generate`]). [`fetch`] finds the default model. [`LoadedModel`] bundles a model with
//! its tokenizer and template.
//!
//! It is not a server: scheduling, configuration, metrics and the gRPC surface live in the
//! `instinfer` daemon crate. It does not store KV pages or choose them: that is csd-engine,
//! which it reaches only through the engine's command interface.

pub mod chat;
pub mod fetch;
pub mod generate;
pub mod kv;
mod loaded;
pub mod logging;
pub mod model;
pub mod sampling;
pub mod tokenizer;

pub use loaded::{LoadError, LoadedModel};
