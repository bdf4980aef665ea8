//! chaosbench: 32 streams against a real `instinferd` while its KV store's reads fail and
//! flip bits (the daemon's `[fault_injection]` table), hostile clients (slowloris, an HTTP/2
//! reset flood, oversized prompts) hammer it, and it is killed with SIGKILL and restarted
//! once. Every token a stream receives is checked against the same request's tokens from a
//! run without faults; every failure is checked for the status it should carry.

pub mod hostile;
pub mod report;
pub mod streams;
