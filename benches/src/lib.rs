//! Benchmark harnesses for instinfer. The model-runtime benchmark lives in the `instinfer
//! bench` command; storage and decode benchmarks arrive with their issues.
//!
//! [`kvbench`]: the fio-like storage harness and KV-store workload (binary `kvbench`).
//! [`decode_report`] and [`plot`]: results and charts of `decode-bench` (decode throughput of
//! the engine's attention modes); `quality-bench` measures sparse against full.

pub mod decode_report;
pub mod kvbench;
pub mod plot;
