//! Who may call the API (`--auth-mode`): anyone (`none`, upstream's behaviour), holders of
//! a listed bearer token (`token`), or callers the Kubernetes API authenticates
//! (TokenReview) and authorizes for the route's verb on `tasks` (SubjectAccessReview), as
//! kubelet and kube-rbac-proxy guard their endpoints (`kubernetes`).
//!
//! [`caller`] is the filter every request passes first: it yields the [`Caller`] or
//! rejects with the [`AuthError`] (turned into the JSON answer by `api::error`), so a
//! refused request reads no body and changes nothing. What each route requires is in
//! [`rules`]. Tokens are never logged, stored or compared as they are: only their SHA-256
//! digests.

mod cache;
mod kubernetes;
pub mod rules;
mod token;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sha2::{Digest, Sha256};
use warp::Filter;
use warp::http::{HeaderMap, Method, header};
use warp::path::FullPath;

use super::route::Route;
pub use kubernetes::KubernetesAuth;
pub use rules::Required;
pub use token::TokenFile;

/// Why a request was refused, or why the check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credential, or one that is not valid (401).
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// A valid caller without the permission the route needs (403).
    #[error("user {user:?} may not {what}{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Forbidden {
        user: String,
        what: String,
        reason: Option<String>,
    },
    /// The authenticator could not be asked (503): fail closed.
    #[error("cannot check the credential now: {0}")]
    Unavailable(String),
    /// A setting that keeps the agent from starting.
    #[error("{0}")]
    Setup(String),
}

/// A refusal travels as a rejection from [`caller`] to `api::error::recover`.
impl warp::reject::Reject for AuthError {}

/// Who made a request, once the credential check let it through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No credential was needed: `--auth-mode none`, or a public route (the probes).
    Anonymous,
    /// A holder of a listed token (a token file names no one).
    TokenHolder,
    /// The user the Kubernetes API authenticated the token as.
    User(String),
}

/// The configured check. Cheap to clone.
#[derive(Clone)]
pub enum Authenticator {
    None,
    Token(Arc<TokenFile>),
    Kubernetes(Arc<KubernetesAuth>),
}

impl Authenticator {
    /// Whether requests need a credential at all (`--auth-mode` other than `none`).
    pub fn required(&self) -> bool {
        !matches!(self, Authenticator::None)
    }

    /// Checks a request's credential against what its route requires.
    pub async fn check(
        &self,
        method: &Method,
        route: &Route,
        headers: &HeaderMap,
    ) -> Result<Caller, AuthError> {
        if matches!(self, Authenticator::None) {
            return Ok(Caller::Anonymous);
        }
        let required = rules::required(method, route);
        if required == Required::Public {
            return Ok(Caller::Anonymous);
        }
        let token = bearer(headers).ok_or(AuthError::Unauthenticated(
            "missing bearer token (Authorization: Bearer <token>)",
        ))?;
        match self {
            Authenticator::None => Ok(Caller::Anonymous),
            Authenticator::Token(file) => {
                if file.accepts(token) {
                    Ok(Caller::TokenHolder)
                } else {
                    Err(AuthError::Unauthenticated("invalid bearer token"))
                }
            }
            Authenticator::Kubernetes(k) => k.check(token, &required).await.map(Caller::User),
        }
    }
}

/// Marks the connection a request came on (the server puts a handle in every request's
/// extensions) once a request on it has passed a credential check: the server keeps such
/// connections, and may close ones that never proved anything when it needs their slots.
#[derive(Clone, Debug, Default)]
pub struct Proven(Arc<AtomicBool>);

impl Proven {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A token's SHA-256: what caches are keyed by and token files are compared as, so no
/// token is kept in memory and a comparison takes the same time whatever its length.
fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The filter every request passes first: yields the caller, or rejects with the
/// [`AuthError`] (401, 403, or 503 when the authenticator can't be asked: fail closed).
/// A connection on which a credential passed is marked [`Proven`].
pub fn caller(
    auth: Authenticator,
) -> impl Filter<Extract = (Caller,), Error = warp::Rejection> + Clone {
    warp::method()
        .and(warp::path::full())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<Proven>())
        .and_then(
            move |method: Method, path: FullPath, headers: HeaderMap, proven: Option<Proven>| {
                let auth = auth.clone();
                async move {
                    if !auth.required() {
                        return Ok(Caller::Anonymous);
                    }
                    let route = Route::parse(path.as_str());
                    match auth.check(&method, &route, &headers).await {
                        Ok(caller) => {
                            if caller != Caller::Anonymous
                                && let Some(p) = proven
                            {
                                p.set();
                            }
                            Ok(caller)
                        }
                        Err(e) => {
                            refused(&method, &route, &e);
                            Err(warp::reject::custom(e))
                        }
                    }
                }
            },
        )
}

/// One line per refusal, saying why (never the token): who was refused matters for an
/// audit. The access log has the answer's line too (`api::access_log`).
fn refused(method: &Method, route: &Route, e: &AuthError) {
    let route = route.template();
    match e {
        AuthError::Forbidden { user, .. } => {
            tracing::info!(%method, route, user = %user, error = %e, "request forbidden")
        }
        AuthError::Unavailable(_) => {
            tracing::warn!(%method, route, error = %e, "request refused: credential not checked")
        }
        _ => tracing::debug!(%method, route, error = %e, "request unauthenticated"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn bearer_tokens_are_read_like_kubernetes_reads_them() {
        assert_eq!(bearer(&headers("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&headers("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&headers("Basic abc")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&headers("Bearerabc")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn probes_stay_open_and_the_rest_needs_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# ops\nsecret-1\n").unwrap();
        let auth = Authenticator::Token(Arc::new(TokenFile::open(&file).unwrap()));
        let none = HeaderMap::new();
        for path in ["/health", "/readyz"] {
            assert_eq!(
                auth.check(&Method::GET, &Route::parse(path), &none)
                    .await
                    .unwrap(),
                Caller::Anonymous
            );
        }
        for (method, path) in [
            (Method::POST, "/tasks"),
            (Method::GET, "/getTasks"),
            (Method::GET, "/nowhere"),
            (Method::PUT, "/tasks"),
        ] {
            let route = Route::parse(path);
            let e = auth.check(&method, &route, &none).await.unwrap_err();
            assert!(matches!(e, AuthError::Unauthenticated(_)), "{path}: {e}");
            let e = auth
                .check(&method, &route, &headers("Bearer secret-2"))
                .await
                .unwrap_err();
            assert!(matches!(e, AuthError::Unauthenticated(_)), "{path}: {e}");
            let with_token = headers("Bearer secret-1");
            let caller = auth.check(&method, &route, &with_token).await.unwrap();
            assert_eq!(caller, Caller::TokenHolder);
        }
        // Without authentication, everything is open.
        assert!(
            Authenticator::None
                .check(&Method::POST, &Route::Tasks, &none)
                .await
                .is_ok()
        );
    }
}
