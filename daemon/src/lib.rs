//! instinfer: the model runtime (GGUF loading, tokenizer, Llama-family forward pass,
//! sampling, generation), the `instinfer` command line and the `instinferd` gRPC daemon.

pub mod chat;
pub mod config;
pub mod fetch;
pub mod generate;
pub mod model;
pub mod sampling;
pub mod server;
pub mod tokenizer;
