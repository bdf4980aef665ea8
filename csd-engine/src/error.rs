//! Errors of the KV store.

use crate::device::DevError;
use crate::engine::AttentionMode;
use crate::layout::PageShape;

/// A sequence id, chosen by the caller.
pub type SeqId = u64;

/// Everything that can go wrong in the KV store and the engine. Errors of one request leave
/// other sequences untouched; which ones end a sequence is said per variant.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The store file or device could not be opened or created.
    #[error("cannot open KV store {path}: {source}")]
    Open {
        /// The path that was opened.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The file holds something else than a KV store; it was left alone.
    #[error("{path} is not a KV store (bad magic); refusing to use or overwrite it")]
    NotAStore {
        /// The path that was opened.
        path: String,
    },
    /// The store was written in an on-disk format version this build does not read.
    #[error("KV store {path} has on-disk format version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        /// The path that was opened.
        path: String,
        /// The version on disk.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// The superblock fails its checksum or disagrees with itself or the device.
    #[error("KV store {path} has a corrupt header: {reason}")]
    CorruptHeader {
        /// The path that was opened.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The newest manifest (the list of persisted sequences) is unreadable or inconsistent;
    /// the store was not modified.
    #[error("KV store {path}: manifest generation {generation} is corrupt ({reason}); the store was left untouched")]
    ManifestCorrupt {
        /// The path that was opened.
        path: String,
        /// The manifest generation the newest root slot names.
        generation: u64,
        /// What is wrong.
        reason: String,
    },
    /// The store size cannot hold the header and one block group.
    #[error("KV store too small: {size} bytes, at least {needed} needed for the header and one page group")]
    TooSmall {
        /// Bytes requested or available.
        size: u64,
        /// Bytes needed at least.
        needed: u64,
    },
    /// An existing store holds pages of another shape; it was left alone.
    #[error("KV store holds shape {stored:?}, but {requested:?} was requested")]
    ShapeMismatch {
        /// The shape on disk.
        stored: PageShape,
        /// The shape asked for.
        requested: PageShape,
    },
    /// A KV or page shape out of range, or one that does not match the store.
    #[error("invalid KV shape: {0}")]
    InvalidShape(String),
    /// A request with wrong sizes, layers or positions, or an invalid configuration.
    #[error("invalid request: {0}")]
    BadInput(String),
    /// No such sequence.
    #[error("unknown sequence {0} (never opened, or already released)")]
    UnknownSequence(SeqId),
    /// A sequence with this id is already open or persisted.
    #[error("sequence {0} already exists (restore or reclaim it first)")]
    SequenceExists(SeqId),
    /// An append would take a sequence past the capacity it was opened with.
    #[error("KV cache full: {needed} tokens needed, capacity is {capacity}")]
    SequenceFull {
        /// Tokens the sequence would hold.
        needed: usize,
        /// Tokens it may hold.
        capacity: usize,
    },
    /// An earlier failure (a failed write, a truncation) ended the sequence; reclaim it.
    #[error("sequence {seq} can no longer be used: {cause}")]
    SequenceBroken {
        /// The sequence.
        seq: SeqId,
        /// The failure that ended it, as it happened (on the writer thread, or in a step).
        cause: std::sync::Arc<KvError>,
    },
    /// The engine's writer thread has stopped, so appends cannot land.
    #[error("the engine's writer thread has stopped")]
    WriterStopped,
    /// A failed step left the sequence's layers at different lengths.
    #[error("sequence {seq} lost its state after a failed step; release it and start again")]
    StepLost {
        /// The sequence.
        seq: SeqId,
    },
    /// The attention mode needs the engine, but the KV cache is in RAM.
    #[error("attention mode {0} needs the KV cache on flash (start with a KV store)")]
    ModeNeedsFlash(AttentionMode),
    /// The engine's reader thread is gone; no page read can complete.
    #[error("the engine's reader thread has stopped")]
    ReaderStopped,
    /// A bug: the work for this request panicked on one of the engine's threads. The
    /// thread caught it and goes on serving other requests.
    #[error("internal error: the engine's {worker} panicked ({message})")]
    WorkerPanicked {
        /// Which worker: `reader thread` or `writer thread`.
        worker: &'static str,
        /// The panic's message.
        message: String,
    },
    /// No room on flash for an append; the append changed nothing.
    #[error(
        "KV store full: sequence {seq} layer {layer} needs {needed} more bytes, {free} of {capacity} bytes free"
    )]
    StoreFull {
        /// The sequence that needed room.
        seq: SeqId,
        /// The layer that needed room.
        layer: u32,
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
        /// Bytes of the data area.
        capacity: u64,
    },
    /// A request's KV does not fit: the store's budget is held by running sequences (cached
    /// pages nobody reads were evicted first). Nothing was changed.
    #[error(
        "KV store budget exhausted: the request needs {needed} more bytes of flash; the store's budget is {budget} bytes and running sequences hold {held} of them (retry when streams finish, or raise kv_store_bytes)"
    )]
    StoreBudget {
        /// Bytes the request still needed.
        needed: u64,
        /// Bytes of the store's data area.
        budget: u64,
        /// Bytes held by running sequences (and their shared pages).
        held: u64,
    },
    /// A request's KV does not fit in the RAM budget of a KV cache kept in RAM. Nothing was
    /// changed.
    #[error(
        "KV RAM budget exhausted: the request needs {needed} bytes of RAM for its KV; the budget is {budget} bytes and running sequences hold {held} of them (retry when streams finish, or raise kv_ram_bytes)"
    )]
    RamBudget {
        /// Bytes the request needs.
        needed: u64,
        /// The budget in bytes.
        budget: u64,
        /// Bytes held by running sequences.
        held: u64,
    },
    /// No room on flash for the manifest a persist or reclaim must write.
    #[error("KV store full: no room for a {needed}-byte manifest ({free} bytes free)")]
    ManifestNoSpace {
        /// Bytes needed.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// A page read back does not match its checksum: the read fails, the data is untouched.
    #[error(
        "checksum mismatch in sequence {seq} layer {layer} block {block} kv head {head}: expected {expected:#010x}, found {found:#010x}"
    )]
    ChecksumMismatch {
        /// The sequence read.
        seq: SeqId,
        /// The layer read.
        layer: u32,
        /// The block whose page failed.
        block: u32,
        /// The kv head whose page failed.
        head: u32,
        /// The CRC-32C in the page index.
        expected: u32,
        /// The CRC-32C of what was read.
        found: u32,
    },
    /// The device failed.
    #[error("I/O error ({context}): {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The device error.
        #[source]
        source: DevError,
    },
}

impl KvError {
    /// The error for a panic caught on `worker`, from its payload.
    pub(crate) fn panicked(worker: &'static str, payload: &(dyn std::any::Any + Send)) -> KvError {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        KvError::WorkerPanicked { worker, message }
    }

    pub(crate) fn io(context: impl Into<String>, source: DevError) -> KvError {
        KvError::Io {
            context: context.into(),
            source,
        }
    }
}
