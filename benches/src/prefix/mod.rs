//! `prefix-bench`: the daemon's persistent prefix cache, measured through its gRPC API.
//!
//! The benchmark starts `instinferd` as a child process on a store file of its own and asks
//! questions about one long document (the GNU GPL v3, shipped in `benches/data/`), one
//! request at a time, greedy:
//!
//! 1. cold: with the cache off, every request prefills the whole document;
//! 2. warm: after ClearCache, with the cache on: the first request stores the document, the
//!    others start on it;
//! 3. restart: the daemon is stopped with SIGTERM and started again on the same store; the
//!    questions again, the first already warm if the cache survived;
//! 4. chat: a multi-turn conversation (the document in the system message, each assistant
//!    message the previous reply) with the cache on, then the same turns with it off.
//!
//! It reports time to first token per phase, the speedup of warm over cold, prompt tokens
//! served from the cache, bytes written to the device, and whether every cached request
//! produced exactly the tokens of its uncached counterpart; as JSON, Markdown and a PNG chart.

pub mod client;
pub mod document;
pub mod markdown;
pub mod plot;
pub mod record;
pub mod report;
pub mod run;
