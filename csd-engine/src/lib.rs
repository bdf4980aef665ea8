//! The emulated computational storage drive (CSD): a model's KV cache kept as checksummed
//! pages on flash, and the attention over it computed next to the data.
//!
//! This crate is the drive, not the model and not a server: it knows KV shapes, pages,
//! sequences and attention, never tokens, weights or requests. The model runtime drives it
//! through one door, the [`Engine`]'s command interface; the daemon only configures it and
//! maps its errors. On-disk format and I/O layer: docs/STORAGE.md; the engine's design:
//! docs/ARCHITECTURE.md ("The storage engine").
//!
//! The public door:
//! * commands: [`Engine`] (`open`, `append`, `attend` with [`AttendReq`], `persist`,
//!   `restore`, `reclaim`, `clone_seq`, `truncate`, statistics) over a [`KvStore`];
//! * configuration: [`EngineConfig`], [`AttentionMode`], [`PageScore`];
//! * errors and ids: [`KvError`], [`SeqId`];
//! * counters: [`EngineStats`], [`PolicyStats`], [`EngineTotals`], the store's [`Counters`];
//! * shapes: [`KvShape`] (the model's KV) and [`PageShape`] (the store's pages);
//! * the page store: [`KvStore`] with [`StoreConfig`], [`StoreOptions`], [`SeqInfo`] and the
//!   reads it fills, [`LayerRead`];
//! * the prefix cache: pages named by [`BlockKey`]s ([`prefix_keys`]), shared read-only by
//!   the sequences that start with them and kept across restarts, with [`PrefixStats`];
//! * storage: [`device`], the narrow [`BlockDevice`] trait and its implementations (io_uring
//!   with O_DIRECT, pread/pwrite, in memory, and a seeded fault injector);
//! * raw I/O for benchmarks: [`rawio`] (O_DIRECT files and io_uring queues that own their
//!   aligned buffers) and [`AlignedBuf`].
//!
//! Everything else (allocation, on-disk encodings, the retrieval policy, page summaries,
//! the page cache, and `sys`, the one module with `unsafe` I/O code) is internal.

// `%` reads as well as `is_multiple_of` here.
#![allow(clippy::manual_is_multiple_of)]

// Unit tests share the integration tests' helpers, which name the crate.
#[cfg(test)]
extern crate self as csd_engine;

mod alloc;
pub mod device;
mod engine;
mod error;
mod format;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod layout;
mod prefix;
pub mod rawio;
mod read;
mod shape;
mod store;
mod sys;

pub use device::{BlockDevice, DevError, IoEngine, IoMode};
pub use engine::{
    AttendProfile, AttendReq, AttentionMode, Engine, EngineConfig, EngineStats, EngineTotals,
    PageScore, PolicyStats,
};
pub use error::{KvError, SeqId};
pub use layout::PageShape;
pub use prefix::{prefix_keys, BlockKey, PrefixStats};
pub use read::LayerRead;
pub use shape::KvShape;
pub use store::{Counters, KvStore, PlannedRead, ReadFault, SeqInfo, StoreConfig, StoreOptions};
pub use sys::AlignedBuf;
