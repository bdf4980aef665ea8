//! Errors of the server and the one place where they, and the model's and the KV engine's
//! errors, become gRPC statuses ([`ServeError::code`]) and HTTP statuses of the OpenAI-style
//! API ([`ServeError::http`]).

use instinfer_runtime::kv::KvError;
use instinfer_runtime::model::ModelError;
use tonic::{Code, Status};

/// Why a request was refused or a generation failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A field that can never be accepted; the message starts with the field's name.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// The request field at fault.
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// A request field past a configured limit; the message names the limit's config key.
    #[error("{message}")]
    OverLimit {
        /// The request field at fault.
        field: &'static str,
        /// What limit it is over.
        message: String,
    },
    /// Every sequence slot is busy and the queue is full; the message names the limits.
    #[error("{0}")]
    QueueFull(String),
    /// The request's `request_id` is held by a running or queued request.
    #[error("request_id {0:?} is already used by a running or queued request")]
    DuplicateRequestId(String),
    /// The server is draining and accepts no new requests.
    #[error("the server is shutting down and accepts no new requests")]
    ShuttingDown,
    /// The forward pass failed; [`ServeError::code`] maps it by cause.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The KV backend failed; [`ServeError::code`] maps it by cause.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The scheduler thread is gone (it failed or the server stopped).
    #[error("the scheduler is not running")]
    SchedulerGone,
    /// A broken invariant of the server itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServeError {
    /// A [`ServeError::InvalidArgument`] about `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ServeError::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The gRPC status code of this error.
    pub fn code(&self) -> Code {
        match self {
            ServeError::InvalidArgument { .. } => Code::InvalidArgument,
            ServeError::OverLimit { .. } | ServeError::QueueFull(_) => Code::ResourceExhausted,
            ServeError::DuplicateRequestId(_) => Code::AlreadyExists,
            ServeError::ShuttingDown | ServeError::SchedulerGone => Code::Unavailable,
            ServeError::Internal(_) => Code::Internal,
            ServeError::Model(e) => model_code(e),
            ServeError::Kv(e) => kv_code(e),
        }
    }

    /// The gRPC status for this error.
    pub fn to_status(&self) -> Status {
        Status::new(self.code(), self.public_message())
    }

    /// What a client is told: the error's text, except that a device failure names what
    /// failed and the system's reason, never device offsets (the log has the whole error).
    pub fn public_message(&self) -> String {
        let kv = match self {
            ServeError::Kv(e) | ServeError::Model(ModelError::Kv(e)) => Some(e),
            _ => None,
        };
        match kv {
            Some(e) => kv_public_message(e),
            None => self.to_string(),
        }
    }
}

/// A KV error as a client sees it: a device failure names what failed and the system's
/// reason without offsets, also when it is the cause that ended a sequence.
fn kv_public_message(e: &KvError) -> String {
    match e {
        KvError::Io { context, source } => {
            let reason = source
                .raw_os_error()
                .map(|code| std::io::Error::from_raw_os_error(code).to_string())
                .unwrap_or_else(|| "the device refused the request".into());
            format!("the KV store's device failed ({context}): {reason}")
        }
        KvError::SequenceBroken { seq, cause } => format!(
            "sequence {seq} can no longer be used: {}",
            kv_public_message(cause)
        ),
        e => e.to_string(),
    }
}

/// How an error shows in the HTTP API: the status, and OpenAI's error `type`, `code` and
/// `param`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// The HTTP status code.
    pub status: u16,
    /// OpenAI's error type: `invalid_request_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// A short machine-readable code, if any.
    pub code: Option<&'static str>,
    /// The request field at fault, if any.
    pub param: Option<String>,
}

impl HttpError {
    fn new(status: u16, kind: &'static str, code: Option<&'static str>) -> Self {
        HttpError {
            status,
            kind,
            code,
            param: None,
        }
    }
}

impl ServeError {
    /// How this error shows in the HTTP API. 400 for a bad field (naming it) or a request
    /// past a limit, 429 for a full queue, 503 while shutting down or when the engine
    /// failed, 507 when the KV store has no room, 500 for the server's own faults.
    pub fn http(&self) -> HttpError {
        let bad = "invalid_request_error";
        match self {
            ServeError::InvalidArgument { field, .. } => HttpError {
                param: Some(field.clone()),
                ..HttpError::new(400, bad, Some("invalid_value"))
            },
            ServeError::OverLimit { field, .. } => HttpError {
                param: Some(field.to_string()),
                ..HttpError::new(400, bad, Some("limit_exceeded"))
            },
            ServeError::QueueFull(_) => HttpError::new(429, "rate_limit_error", Some("queue_full")),
            ServeError::DuplicateRequestId(_) => HttpError {
                param: Some("request_id".into()),
                ..HttpError::new(409, bad, Some("duplicate_request_id"))
            },
            ServeError::ShuttingDown => {
                HttpError::new(503, "service_unavailable", Some("shutting_down"))
            }
            ServeError::SchedulerGone => HttpError::new(503, "service_unavailable", None),
            ServeError::Internal(_) => HttpError::new(500, "server_error", None),
            ServeError::Model(e) => match model_code(e) {
                Code::InvalidArgument => HttpError::new(400, bad, None),
                Code::OutOfRange => HttpError::new(400, bad, Some("context_length_exceeded")),
                _ => match e {
                    ModelError::Kv(kv) => kv_http(kv),
                    _ => HttpError::new(500, "server_error", None),
                },
            },
            ServeError::Kv(e) => kv_http(e),
        }
    }
}

fn kv_http(e: &KvError) -> HttpError {
    match e {
        KvError::StoreFull { .. }
        | KvError::StoreBudget { .. }
        | KvError::ManifestNoSpace { .. } => {
            HttpError::new(507, "insufficient_storage", Some("kv_store_full"))
        }
        KvError::RamBudget { .. } => {
            HttpError::new(507, "insufficient_storage", Some("kv_ram_full"))
        }
        KvError::SequenceBroken { cause, .. } => kv_http(cause),
        KvError::SequenceFull { .. } => HttpError::new(
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
        ),
        _ => match kv_code(e) {
            Code::Unavailable => HttpError::new(503, "service_unavailable", Some("kv_engine")),
            Code::FailedPrecondition => {
                HttpError::new(400, "invalid_request_error", Some("mode_unavailable"))
            }
            _ => HttpError::new(500, "server_error", None),
        },
    }
}

impl From<ServeError> for Status {
    fn from(e: ServeError) -> Status {
        e.to_status()
    }
}

fn model_code(e: &ModelError) -> Code {
    match e {
        ModelError::BadToken { .. } => Code::InvalidArgument,
        ModelError::ContextFull { .. } => Code::OutOfRange,
        ModelError::Kv(kv) => kv_code(kv),
        ModelError::UntrainedContext { .. } => Code::OutOfRange,
        ModelError::EmptyChunk { .. }
        | ModelError::WindowMismatch { .. }
        | ModelError::Gguf(_)
        | ModelError::Config(_)
        | ModelError::Weights(_) => Code::Internal,
    }
}

fn kv_code(e: &KvError) -> Code {
    match e {
        // Out of room: the sequence's context, or the store's free space.
        KvError::SequenceFull { .. }
        | KvError::StoreFull { .. }
        | KvError::StoreBudget { .. }
        | KvError::RamBudget { .. }
        | KvError::ManifestNoSpace { .. } => Code::ResourceExhausted,
        KvError::ModeNeedsFlash(_) => Code::FailedPrecondition,
        // Pages on flash that fail their checksum: the data is lost (the request that read
        // them fails; the store and other sequences go on).
        KvError::ChecksumMismatch { .. } => Code::DataLoss,
        // The device or the engine failed under the request: retrying later may work.
        KvError::Io { .. }
        | KvError::ReaderStopped
        | KvError::WriterStopped
        | KvError::StepLost { .. } => Code::Unavailable,
        // A sequence ended by an earlier failure: that failure's status (a full store, a
        // device error, a panic on the writer thread).
        KvError::SequenceBroken { cause, .. } => kv_code(cause),
        // A bug, caught on an engine thread.
        KvError::WorkerPanicked { .. } => Code::Internal,
        // The server asked the engine for something it never should.
        KvError::UnknownSequence(_)
        | KvError::SequenceExists(_)
        | KvError::BadInput(_)
        | KvError::InvalidShape(_)
        | KvError::ShapeMismatch { .. } => Code::Internal,
        // Opening the store happens at start-up, not under a request.
        KvError::Open { .. }
        | KvError::NotAStore { .. }
        | KvError::UnsupportedVersion { .. }
        | KvError::CorruptHeader { .. }
        | KvError::ManifestCorrupt { .. }
        | KvError::TooSmall { .. } => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csd_engine::device::DevError;

    #[test]
    fn device_failures_reach_clients_without_offsets() {
        let e = ServeError::Kv(KvError::Io {
            context: "reading sequence pages".into(),
            source: DevError::Io {
                offset: 987_654_321,
                source: std::io::Error::from_raw_os_error(5), // EIO
            },
        });
        let status = e.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("987654321"), "{status:?}");
        assert!(
            status.message().contains("reading sequence pages"),
            "{status:?}"
        );
        assert!(
            status.message().contains("Input/output error"),
            "{status:?}"
        );
        assert!(
            e.to_string().contains("987654321"),
            "the log keeps the offset"
        );
    }

    /// A sequence ended by a failure on the writer thread keeps that failure's type: the
    /// status is the cause's (a full store is RESOURCE_EXHAUSTED, a device error
    /// UNAVAILABLE), and a device error's offsets stay out of the message.
    #[test]
    fn a_broken_sequence_carries_its_cause_to_the_status() {
        let broken = |cause| {
            ServeError::Kv(KvError::SequenceBroken {
                seq: 3,
                cause: std::sync::Arc::new(cause),
            })
        };
        let io = broken(KvError::Io {
            context: "appending pages".into(),
            source: DevError::Io {
                offset: 987_654_321,
                source: std::io::Error::from_raw_os_error(5),
            },
        });
        let status = io.to_status();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            !status.message().contains("987654321")
                && status.message().contains("appending pages")
                && status.message().contains("sequence 3"),
            "{status:?}"
        );
        let full = broken(KvError::StoreFull {
            seq: 3,
            layer: 0,
            needed: 8192,
            free: 0,
            capacity: 1 << 20,
        });
        assert_eq!(full.to_status().code(), Code::ResourceExhausted);
        assert_eq!(full.http().status, 507);
        let panicked = broken(KvError::WorkerPanicked {
            worker: "writer thread",
            message: "boom".into(),
        });
        assert_eq!(panicked.to_status().code(), Code::Internal);
    }
}
