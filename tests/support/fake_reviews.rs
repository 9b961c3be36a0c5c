//! TokenReview and SubjectAccessReview for the fake API server, with real request and
//! answer shapes (authentication.k8s.io/v1, authorization.k8s.io/v1).
//!
//! Tests register tokens (`add_token`: token → user and groups) and grants (`allow`: a
//! user or group may do a verb on a resource in a namespace, as an RBAC Role would say);
//! everything else is unauthenticated or denied. `fail_with` makes every review answer an
//! HTTP error, as an overloaded API server does.

use serde_json::{Value, json};
use warp::http::{Method, StatusCode};

pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
pub const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

#[derive(Clone, Debug)]
struct Grant {
    subject: String,
    namespace: String,
    group: String,
    resource: String,
    verbs: Vec<String>,
}

#[derive(Default)]
pub struct Reviews {
    tokens: Vec<(String, String, Vec<String>)>,
    grants: Vec<Grant>,
    failure: Option<StatusCode>,
}

impl Reviews {
    /// `token` authenticates as `user` in `groups`.
    pub fn add_token(&mut self, token: &str, user: &str, groups: &[&str]) {
        self.tokens.push((
            token.to_string(),
            user.to_string(),
            groups.iter().map(|g| g.to_string()).collect(),
        ));
    }

    /// `subject` (a user or a group) may do `verbs` on `group`/`resource` (a resource may
    /// name a subresource, `tasks/log`) in `namespace`.
    pub fn allow(
        &mut self,
        subject: &str,
        namespace: &str,
        group: &str,
        resource: &str,
        verbs: &[&str],
    ) {
        self.grants.push(Grant {
            subject: subject.to_string(),
            namespace: namespace.to_string(),
            group: group.to_string(),
            resource: resource.to_string(),
            verbs: verbs.iter().map(|v| v.to_string()).collect(),
        });
    }

    /// Every review answers `status` (None: answer normally again).
    pub fn fail_with(&mut self, status: Option<StatusCode>) {
        self.failure = status;
    }

    /// The answer to a review request, or None when `path` is not a review endpoint.
    pub fn handle(&self, method: &Method, path: &str, body: &[u8]) -> Option<(StatusCode, Value)> {
        if path != TOKEN_REVIEWS && path != ACCESS_REVIEWS {
            return None;
        }
        if method != Method::POST {
            return Some(status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"));
        }
        if let Some(code) = self.failure {
            return Some(status(code, "InternalError"));
        }
        let Ok(review) = serde_json::from_slice::<Value>(body) else {
            return Some(status(StatusCode::BAD_REQUEST, "BadRequest"));
        };
        let answer = if path == TOKEN_REVIEWS {
            self.token_review(review)
        } else {
            self.access_review(review)
        };
        Some((StatusCode::CREATED, answer))
    }

    fn token_review(&self, mut review: Value) -> Value {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        review["status"] = match self.tokens.iter().find(|(t, ..)| t == token) {
            Some((_, user, groups)) => json!({
                "authenticated": true,
                "user": {"username": user, "uid": format!("uid-{user}"), "groups": groups},
            }),
            None => json!({"authenticated": false, "error": "invalid bearer token"}),
        };
        review
    }

    fn access_review(&self, mut review: Value) -> Value {
        let spec = &review["spec"];
        let mut subjects = vec![spec["user"].as_str().unwrap_or_default().to_string()];
        subjects.extend(
            spec["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|g| g.as_str().map(str::to_string)),
        );
        let attrs = &spec["resourceAttributes"];
        let resource = match attrs["subresource"].as_str() {
            Some(sub) if !sub.is_empty() => {
                format!("{}/{sub}", attrs["resource"].as_str().unwrap_or_default())
            }
            _ => attrs["resource"].as_str().unwrap_or_default().to_string(),
        };
        let allowed = attrs.is_object()
            && self.grants.iter().any(|g| {
                subjects.contains(&g.subject)
                    && attrs["namespace"].as_str() == Some(g.namespace.as_str())
                    && attrs["group"].as_str() == Some(g.group.as_str())
                    && resource == g.resource
                    && g.verbs
                        .iter()
                        .any(|v| Some(v.as_str()) == attrs["verb"].as_str())
            });
        review["status"] = if allowed {
            json!({"allowed": true, "reason": "RBAC: allowed by the test's grant"})
        } else {
            json!({"allowed": false})
        };
        review
    }
}

fn status(code: StatusCode, reason: &str) -> (StatusCode, Value) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("review failed: {reason}"), "reason": reason, "code": code.as_u16()
    });
    (code, body)
}
