//! A request's JSON body: read up to `max_request_bytes` (413 past it), then parsed with
//! the place it broke (line, column and field path) in the 400 that a bad body gets.

use super::error::ApiError;
use axum::extract::Request;
use axum::http::StatusCode;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// How much of a request body the server reads, and how long it waits for it.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// Largest body (`max_request_bytes`).
    pub max_bytes: usize,
    /// How long a client may take to send it (`connections.request_read_timeout_ms`): a
    /// slow sender holds a task and its buffer, not a sequence, and not for long.
    pub read_timeout: Duration,
}

/// Read `req`'s body within `limits`, and parse it as `T`.
pub async fn read_json<T: DeserializeOwned>(
    req: Request,
    limits: BodyLimits,
) -> Result<T, ApiError> {
    let limit = limits.max_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!(
                "the request body is over the server's limit of {limit} bytes (max_request_bytes)"
            ),
        )
    };
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let read = Limited::new(req.into_body(), limit).collect();
    let Ok(read) = tokio::time::timeout(limits.read_timeout, read).await else {
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            format!(
                "the request body did not arrive within {} ms (connections.request_read_timeout_ms)",
                limits.read_timeout.as_millis()
            ),
        ));
    };
    let bytes = match read {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(e) => {
            return Err(ApiError::invalid(
                "body",
                format!("reading the request body failed: {e}"),
            ))
        }
    };
    parse(&bytes)
}

/// Parse `bytes` as `T`: malformed JSON names its line and column, a wrong or missing field
/// its path.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("invalid_json"),
                format!("the request body is not valid JSON: {inner}"),
            )
        } else if path == "." {
            ApiError::invalid("body", inner.to_string())
        } else {
            ApiError::invalid(&path, inner.to_string())
        }
    })?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("invalid_json"),
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::http::types::ChatRequest;

    #[test]
    fn bad_bodies_say_where_they_broke() {
        let e = parse::<ChatRequest>(b"{\"messages\": [\n{\"role\": }]}").unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.body.message.contains("line 2 column"),
            "{}",
            e.body.message
        );
        let e = parse::<ChatRequest>(br#"{"messages": [{"role": 5}]}"#).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("messages[0].role"));
        let e = parse::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert!(
            e.body.message.contains("missing field `messages`"),
            "{}",
            e.body.message
        );
        let e = parse::<ChatRequest>(br#"{"messages": [], "temperature": "hot"}"#).unwrap_err();
        assert_eq!(e.body.param.as_deref(), Some("temperature"));
        let e = parse::<ChatRequest>(br#"{"messages": []} x"#).unwrap_err();
        assert_eq!(e.body.code, Some("invalid_json"));
    }
}
