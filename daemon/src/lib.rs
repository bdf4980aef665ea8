//! instinfer: the serving crate. It holds the `instinferd` gRPC daemon ([`server`]: the
//! service, the scheduler that batches every running sequence into one forward pass per step,
//! metrics, health and drain), its configuration ([`config`]), and the `instinfer` command
//! line.
//!
//! It is not the model: loading, tokenizing, the forward pass, sampling and generation are in
//! `instinfer-runtime`, and the KV pages and near-data attention are in `csd-engine`.

pub mod config;
pub mod server;
