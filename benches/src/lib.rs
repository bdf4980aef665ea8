//! Benchmark harnesses for instinfer. The model-runtime benchmark lives in the `instinfer
//! bench` command; storage and decode benchmarks arrive with their issues.
//!
//! [`kvbench`]: the fio-like storage harness and KV-store workload (binary `kvbench`).

pub mod kvbench;
