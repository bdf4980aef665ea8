//! Measurement harnesses for instinfer, each a binary of this crate with its library code
//! here: the storage harness and KV-store workload (`kvbench`), decode throughput of the
//! engine's attention modes with the KV on flash (`decode-bench`), answer quality of sparse
//! against full attention (`quality-bench`), load on a running `instinferd` through its
//! gRPC API (`loadbench`), and the daemon's persistent prefix cache (`prefix-bench`). It
//! measures and reports; it is not part of the serving path, and nothing here is a library
//! for other crates to build on. The model runtime's own benchmark is the `instinfer bench`
//! command.
//!
//! [`kvbench`]: the fio-like storage harness and KV-store workload (binary `kvbench`).
//! [`decode_report`] and [`plot`]: results and charts of `decode-bench`.
//! [`quality`]: the measurements of `quality-bench`.
//! [`prefix`]: the daemon under test, its client, the phases and the report of `prefix-bench`.
//! [`machine`] and [`fio`]: the machine a run measured, and fio's reads on the same disk.
//! [`setup`], [`files`] and [`greedy`]: what the model benchmarks share: thread pool, model
//! loading, progress bar, prompt text and result files, chunked prefill and greedy decode.

pub mod chaos;
pub mod daemon;
pub mod decode_report;
pub mod files;
pub mod fio;
pub mod greedy;
pub mod kvbench;
pub mod machine;
pub mod plot;
pub mod prefix;
pub mod quality;
pub mod setup;
