//! The emulated computational storage drive (CSD): KV pages on flash, page index, retrieval
//! and near-data attention.
//!
//! The storage half lives here now:
//! * [`device`]: the narrow [`BlockDevice`] trait with io_uring/O_DIRECT, pread/pwrite,
//!   in-memory and fault-injecting implementations;
//! * [`KvStore`]: flash-resident KV pages (layout per DESIGN §4, see docs/STORAGE.md) with a
//!   checksummed page index, RAM tails, reclaim, and crash-safe persistence;
//! * [`sys`]: every `unsafe` block of the crate (aligned buffers, the io_uring ring that owns
//!   its buffers, device probing).

// `%` reads as well as `is_multiple_of` here.
#![allow(clippy::manual_is_multiple_of)]

pub mod alloc;
pub mod device;
pub mod engine;
pub mod error;
pub mod format;
pub mod layout;
pub mod read;
mod shape;
pub mod store;
pub mod sys;

pub use device::{BlockDevice, DevError, IoEngine, IoMode};
pub use engine::{
    AttendReq, AttentionMode, Engine, EngineConfig, EngineStats, EngineTotals, PageScore,
    PolicyStats,
};
pub use error::{KvError, SeqId};
pub use layout::{Geometry, PageShape};
pub use read::LayerRead;
pub use shape::KvShape;
pub use store::{Counters, KvStore, SeqInfo, StoreConfig, StoreOptions};
pub use sys::AlignedBuf;
