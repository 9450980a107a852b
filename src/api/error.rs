//! `{error, error_type}` answers. The error type also travels in the response's extensions so
//! the metrics layer can count errors by type.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::wire::ErrorBody;
use crate::engine::EngineError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
    /// The request field at fault, where one is (OpenAI's `param`; not in native bodies).
    pub param: Option<String>,
}

/// Set on every error response: what `blip2_errors_total{error_type}` counts.
#[derive(Debug, Clone, Copy)]
pub struct ErrorType(pub &'static str);

/// Set on error responses that name the request field at fault.
#[derive(Debug, Clone)]
pub struct ErrorParam(pub String);

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
            param: None,
        }
    }
    /// Names the request field at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }
    /// 422: well-formed but unacceptable.
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }
    /// 400: not readable at all.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn overloaded(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    pub fn timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request did not finish within the server's request timeout",
        )
    }
    /// The JSON body, also used for a stream's error event.
    pub fn body(&self) -> ErrorBody<'_> {
        ErrorBody {
            error: &self.message,
            error_type: self.error_type,
        }
    }
}

/// The one mapping of model-side failures to answers: what the request asked is a 422, a bug or
/// a failed operation a 500.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidRequest(m) | EngineError::TooLong(m) => Self::validation(m),
            EngineError::Internal(m) => Self::internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        let headers = response.headers_mut();
        // These answers come before the request body is read (the key, the in-flight limit, a
        // declared length over the limit, a server not ready), and a connection whose body was
        // not read is not reused: say so, so that a client does not send its next request on a
        // connection the server is closing.
        if matches!(
            self.status,
            StatusCode::UNAUTHORIZED
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
        ) {
            headers.insert("connection", HeaderValue::from_static("close"));
        }
        match self.status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert("retry-after", HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response.extensions_mut().insert(ErrorType(self.error_type));
        if let Some(param) = self.param {
            response.extensions_mut().insert(ErrorParam(param));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_failures_map_to_their_status() {
        let too_long = ApiError::from(EngineError::TooLong("past the positions".into()));
        assert_eq!(
            (too_long.status, too_long.error_type),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation")
        );
        assert_eq!(too_long.message, "past the positions");
        let invalid = ApiError::from(EngineError::InvalidRequest("empty prompt".into()));
        assert_eq!(invalid.status, StatusCode::UNPROCESSABLE_ENTITY);
        let bug = ApiError::from(EngineError::Internal("shape mismatch".into()));
        assert_eq!(
            (bug.status, bug.error_type),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }

    #[test]
    fn a_position_overflow_in_the_model_is_a_422() {
        let model = crate::model::ModelError::TooLong("too long".into());
        assert_eq!(
            ApiError::from(EngineError::from(model)).status,
            StatusCode::UNPROCESSABLE_ENTITY
        );
        let tensor = crate::model::ModelError::Tensor(candle_core::Error::Msg("boom".into()));
        assert_eq!(
            ApiError::from(EngineError::from(tensor)).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
