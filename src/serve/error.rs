//! Errors as OpenAI's API writes them: an HTTP status and `{"error": {"message", "type",
//! "param", "code"}}`, which the official clients turn into their typed exceptions.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::error::Error;

/// One failed request, as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, when one is.
    pub param: Option<&'static str>,
    /// A machine-readable reason (`context_length_exceeded`, `queue_full`, ...).
    pub code: Option<&'static str>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400: the request asks for something this server cannot do, or is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 400 naming the field at fault.
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param),
            ..Self::bad_request(message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The `type` OpenAI gives errors of this status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON body (also sent as the last event of a stream that fails part-way).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Detail {
                message: &self.message,
                kind: self.kind(),
                param: self.param,
                code: self.code,
            },
        })
        .unwrap_or(serde_json::Value::Null)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            let headers = response.headers_mut();
            headers.insert(axum::http::header::RETRY_AFTER, 1.into());
        }
        response
    }
}

/// An engine error as the client sees it: what the request did wrong is a 4xx with the
/// engine's own words, anything else a 500.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            // An offloaded engine whose budget cannot hold this request's KV cache: the
            // client can shorten it.
            Error::PromptTooLong { .. }
            | Error::ContextFull { .. }
            | Error::BudgetBelowMinimum { .. } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string())
                    .with_code("context_length_exceeded")
            }
            Error::InvalidArgument(_) | Error::ChatTemplate(_) | Error::Config { .. } => {
                ApiError::bad_request(e.to_string())
            }
            Error::TokenOutOfRange { .. } => ApiError::bad_request(e.to_string()),
            other => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}
