//! Benchmark harnesses for instinfer. The model-runtime benchmark lives in the `instinfer
//! bench` command; storage and decode benchmarks arrive with their issues.
