//! The single place where errors become HTTP answers: `{"code", "message"}` with the
//! status text as `code`, as upstream's clients expect. That includes the filters'
//! rejections ([`recover`]): a refused caller, a header that does not parse.

use std::convert::Infallible;

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;

use super::auth::AuthError;
use crate::manager::ManagerError;
use crate::runtime::RuntimeError;
use crate::sys::exhaustion::Exhaustion;

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

    /// A 400 also names the request's unknown fields: a misspelt field is the likeliest
    /// reason why a required one is missing.
    pub fn noting_unknown(mut self, unknown: &[String]) -> Self {
        if self.status == StatusCode::BAD_REQUEST && !unknown.is_empty() {
            let texts: Vec<String> = unknown
                .iter()
                .map(|p| crate::task::fields::unknown_field_text(p))
                .collect();
            self.message = format!(
                "{} (the request also has {})",
                self.message,
                texts.join(", ")
            );
        }
        self
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
        let body = super::wire::ErrorBody {
            code: status_text(self.status),
            message: &self.message,
        };
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
        // Running out of something is the machine's state, not a fault of the request or
        // of the agent: 507 for the disk (free space, then retry), 503 for the rest.
        if let Some(x) = e.exhaustion() {
            let status = match x {
                Exhaustion::Disk => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            tracing::warn!(error = %e, "request refused: out of {}", x.what());
            return ApiError::new(status, format!("out of {}: {e}", x.what()));
        }
        if e.read_only_store() {
            // The node's or the volume's state, not the request's: retry once it is
            // writable (`/readyz` says the same meanwhile).
            tracing::warn!(error = %e, "request refused: the data dir is read-only");
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the data dir is read-only: {e}"),
            );
        }
        let status = match &e {
            ManagerError::InvalidName(_)
            | ManagerError::InvalidSpec(_)
            | ManagerError::Refused(_) => StatusCode::BAD_REQUEST,
            ManagerError::AlreadyExists(_) | ManagerError::BeingDeleted(_) => StatusCode::CONFLICT,
            ManagerError::NotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::TooManyTasks(_) => StatusCode::TOO_MANY_REQUESTS,
            ManagerError::ShuttingDown | ManagerError::NoTaskUid { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ManagerError::Runtime(
                RuntimeError::Invalid(_) | RuntimeError::ContainerModeDisabled,
            ) => StatusCode::BAD_REQUEST,
            ManagerError::Runtime(_) | ManagerError::Store(_) | ManagerError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
        }
        ApiError::new(status, e.to_string())
    }
}

/// The answer to a request the filters rejected: the caller's refusal (`auth::caller`),
/// or, for any other rejection, a header that did not parse (e.g. a bogus Content-Length).
pub async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let err = match rejection.find::<AuthError>() {
        Some(e) => ApiError::from(e),
        None => ApiError::bad_request("malformed request headers"),
    };
    Ok(err.into_response())
}

impl From<&AuthError> for ApiError {
    fn from(e: &AuthError) -> Self {
        let status = match e {
            AuthError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
            // Fail closed: the caller may retry once the API server answers.
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Setup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match e {
            // The caller is not authenticated yet: what the API server said (addresses,
            // its error text) is for the agent's log (`auth::refused`), not for it.
            AuthError::Unavailable(_) => {
                "cannot check the credential now: the authenticator did not answer; try again later"
                    .to_string()
            }
            _ => e.to_string(),
        };
        let mut err = ApiError::new(status, message);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(e: ManagerError) -> (u16, String) {
        let api = ApiError::from(e);
        (api.status.as_u16(), api.message)
    }

    #[test]
    fn resource_exhaustion_is_507_for_the_disk_and_503_for_the_rest() {
        let os = |n| std::io::Error::from_raw_os_error(n);
        let (status, msg) = status_of(ManagerError::Store(os(nix::libc::ENOSPC)));
        assert_eq!(status, 507);
        assert!(
            msg.starts_with("out of disk space in the data dir"),
            "{msg}"
        );
        assert_eq!(
            status_text(StatusCode::INSUFFICIENT_STORAGE),
            "Insufficient Storage"
        );
        for errno in [nix::libc::EAGAIN, nix::libc::EMFILE, nix::libc::ENOMEM] {
            assert_eq!(status_of(ManagerError::Store(os(errno))).0, 503);
        }
        let launch = RuntimeError::before_launch(os(nix::libc::EAGAIN));
        let (status, msg) = status_of(ManagerError::Runtime(launch));
        assert_eq!(status, 503);
        assert!(msg.contains("out of processes"), "{msg}");
        assert_eq!(status_of(ManagerError::Store(os(nix::libc::EIO))).0, 500);
    }

    #[test]
    fn a_read_only_data_dir_is_503_and_a_name_being_deleted_409() {
        let (status, msg) = status_of(ManagerError::Store(std::io::Error::from_raw_os_error(
            nix::libc::EROFS,
        )));
        assert_eq!(status, 503);
        assert!(msg.starts_with("the data dir is read-only"), "{msg}");
        assert_eq!(status_of(ManagerError::BeingDeleted("t".into())).0, 409);
    }
}
