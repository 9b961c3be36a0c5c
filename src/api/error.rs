//! The single place where errors become HTTP answers: `{"code", "message"}` with the
//! status text as `code`, as upstream's clients expect.

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use crate::manager::ManagerError;
use crate::runtime::RuntimeError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// For 405: the methods the path accepts.
    pub allow: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            allow: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn method_not_allowed(allow: &'static str) -> Self {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            message: format!("method not allowed; allowed: {allow}"),
            allow: Some(allow),
        }
    }

    pub fn into_response(self) -> Response {
        let body = super::wire::ErrorBody {
            code: status_text(self.status),
            message: &self.message,
        };
        let mut resp = super::handlers::json_response(self.status, &body);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        resp
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let status = match &e {
            ManagerError::InvalidName(_) | ManagerError::InvalidSpec(_) => StatusCode::BAD_REQUEST,
            ManagerError::AlreadyExists(_) => StatusCode::CONFLICT,
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::TooManyTasks(_) => StatusCode::TOO_MANY_REQUESTS,
            ManagerError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ManagerError::Runtime(
                RuntimeError::Invalid(_) | RuntimeError::ContainerModeDisabled,
            ) => StatusCode::BAD_REQUEST,
            ManagerError::Runtime(_) | ManagerError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

/// Go's `http.StatusText`, which upstream puts in `code`.
fn status_text(s: StatusCode) -> &'static str {
    match s.as_u16() {
        413 => "Request Entity Too Large",
        _ => s.canonical_reason().unwrap_or("Error"),
    }
}
