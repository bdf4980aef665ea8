//! Errors of the HTTP API as OpenAI's JSON error object, with the status that
//! [`ServeError::http`] gives.

use super::types::{ErrorBody, ErrorResponse};
use crate::server::error::ServeError;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error answer: a status and OpenAI's error object.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The error object.
    pub body: ErrorBody,
}

impl ApiError {
    /// A 400 about `param`, a field of the OpenAI request.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorBody {
                message: format!("{param}: {}", message.into()),
                kind: "invalid_request_error",
                param: Some(param.to_string()),
                code: Some("invalid_value"),
            },
        }
    }

    /// An error of the API itself (not of a request field).
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                message: message.into(),
                kind,
                param: None,
                code,
            },
        }
    }

    /// The answer to a request the server refused or failed. Field names of the gRPC
    /// request in the message and `param` become the OpenAI request's.
    pub fn from_serve(e: ServeError) -> Self {
        let h = e.http();
        let message = match &e {
            ServeError::InvalidArgument { field, message } => {
                format!("{}: {message}", openai_param(field))
            }
            other => other.public_message(),
        };
        ApiError {
            status: StatusCode::from_u16(h.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: ErrorBody {
                message,
                kind: h.kind,
                param: h.param.as_deref().map(openai_param),
                code: h.code,
            },
        }
    }

    /// The error object as JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(&ErrorResponse {
            error: self.body.clone(),
        })
        .unwrap_or_else(|_| r#"{"error":{"message":"error","type":"server_error"}}"#.into())
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        ApiError::from_serve(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, self.json()).into_response();
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// The OpenAI request's name for a field of the gRPC request that the HTTP request was
/// turned into.
fn openai_param(field: &str) -> String {
    if let Some(rest) = field.strip_prefix("prompt.chat.messages") {
        return format!("messages{rest}");
    }
    if field.starts_with("prompt.chat") {
        return "messages".into();
    }
    if field.starts_with("prompt.") {
        return "prompt".into();
    }
    if field.starts_with("stop[") {
        return "stop".into();
    }
    match field {
        "attention" => "instinfer.attention".into(),
        "cache" => "instinfer.cache".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_field_names_become_openai_ones() {
        let e = ApiError::from_serve(ServeError::invalid(
            "prompt.chat.messages[2].role",
            "is empty",
        ));
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.body.param.as_deref(), Some("messages[2].role"));
        assert_eq!(e.body.message, "messages[2].role: is empty");
        assert_eq!(openai_param("prompt.text"), "prompt");
        assert_eq!(openai_param("stop[3]"), "stop");
        assert_eq!(openai_param("max_tokens"), "max_tokens");
        let q = ApiError::from_serve(ServeError::QueueFull("full".into()));
        assert_eq!(q.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(
            q.json().contains("\"type\":\"rate_limit_error\""),
            "{}",
            q.json()
        );
    }
}
