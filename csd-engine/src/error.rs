//! Errors of the KV store.

use crate::device::DevError;
use crate::engine::AttentionMode;
use crate::layout::PageShape;

/// A sequence id, chosen by the caller.
pub type SeqId = u64;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("cannot open KV store {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a KV store (bad magic); refusing to use or overwrite it")]
    NotAStore { path: String },
    #[error("KV store {path} has on-disk format version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        path: String,
        found: u32,
        supported: u32,
    },
    #[error("KV store {path} has a corrupt header: {reason}")]
    CorruptHeader { path: String, reason: String },
    #[error("KV store {path}: manifest generation {generation} is corrupt ({reason}); the store was left untouched")]
    ManifestCorrupt {
        path: String,
        generation: u64,
        reason: String,
    },
    #[error("KV store too small: {size} bytes, at least {needed} needed for the header and one page group")]
    TooSmall { size: u64, needed: u64 },
    #[error("KV store holds shape {stored:?}, but {requested:?} was requested")]
    ShapeMismatch {
        stored: PageShape,
        requested: PageShape,
    },
    #[error("invalid KV shape: {0}")]
    InvalidShape(String),
    #[error("invalid request: {0}")]
    BadInput(String),
    #[error("unknown sequence {0} (never opened, or already released)")]
    UnknownSequence(SeqId),
    #[error("sequence {0} already exists (restore or reclaim it first)")]
    SequenceExists(SeqId),
    #[error("KV cache full: {needed} tokens needed, capacity is {capacity}")]
    SequenceFull { needed: usize, capacity: usize },
    #[error("sequence {seq} can no longer be used: {reason}")]
    SequenceBroken { seq: SeqId, reason: String },
    #[error("attention mode {0} needs the KV cache on flash (start with a KV store)")]
    ModeNeedsFlash(AttentionMode),
    #[error("the engine's reader thread has stopped")]
    ReaderStopped,
    #[error(
        "KV store full: sequence {seq} layer {layer} needs {needed} more bytes, {free} of {capacity} bytes free"
    )]
    StoreFull {
        seq: SeqId,
        layer: u32,
        needed: u64,
        free: u64,
        capacity: u64,
    },
    #[error("KV store full: no room for a {needed}-byte manifest ({free} bytes free)")]
    ManifestNoSpace { needed: u64, free: u64 },
    #[error(
        "checksum mismatch in sequence {seq} layer {layer} block {block} kv head {head}: expected {expected:#010x}, found {found:#010x}"
    )]
    ChecksumMismatch {
        seq: SeqId,
        layer: u32,
        block: u32,
        head: u32,
        expected: u32,
        found: u32,
    },
    #[error("I/O error ({context}): {source}")]
    Io {
        context: String,
        #[source]
        source: DevError,
    },
}

impl KvError {
    pub(crate) fn io(context: impl Into<String>, source: DevError) -> KvError {
        KvError::Io {
            context: context.into(),
            source,
        }
    }
}
