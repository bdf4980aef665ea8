//! instinfer: the model runtime (GGUF loading, tokenizer, Llama-family forward pass,
//! sampling, generation) and the `instinfer` command line.

pub mod model;
