//! The single place where errors become HTTP answers: `{"code", "message"}` with the
//! status text as `code`, as upstream's clients expect.

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::auth::AuthError;
use crate::manager::ManagerError;
use crate::runtime::RuntimeError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// For 405: the methods the path accepts.
    pub allow: Option<&'static str>,
    /// For 401: the `WWW-Authenticate` challenge.
    pub challenge: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            allow: None,
            challenge: None,
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
            challenge: None,
        }
    }

    pub fn into_response(self) -> Response {
        let body = serde_json::json!({ "code": status_text(self.status), "message": self.message });
        let mut resp = super::handlers::json_response(self.status, &body);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(challenge) = self.challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
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

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = match &e {
            AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            // Fail closed: the caller may retry once the API server answers.
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Setup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut err = ApiError::new(status, e.to_string());
        if status == StatusCode::UNAUTHORIZED {
            err.challenge = Some("Bearer");
        }
        err
    }
}

/// Go's `http.StatusText`, which upstream puts in `code`.
fn status_text(s: StatusCode) -> &'static str {
    match s.as_u16() {
        413 => "Request Entity Too Large",
        _ => s.canonical_reason().unwrap_or("Error"),
    }
}
