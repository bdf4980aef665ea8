//! instinfer: the model runtime (GGUF loading, tokenizer, Llama-family forward pass,
//! sampling, generation) and the `instinfer` command line.

pub mod chat;
pub mod fetch;
pub mod generate;
pub mod model;
pub mod sampling;
pub mod tokenizer;
