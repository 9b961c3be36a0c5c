//! `--auth-mode kubernetes`: the token is checked with a TokenReview, the route's verb
//! with a SubjectAccessReview on `tasks.task-executor.io` in the pod's namespace. Answers
//! are cached as kubelet caches its webhook answers: a valid token and an allowed verb for
//! 2 minutes, an invalid token and a denied verb for 30 seconds. An API server that can't
//! be asked means 503: nothing is allowed that was not allowed (and cached) before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::cache::TtlCache;
use super::rules::{GROUP, RESOURCE, Required};
use super::{AuthError, digest};
use crate::kube::review::{Attributes, Decision, Reviewer, User};

const AUTHENTICATED_TTL: Duration = Duration::from_secs(120);
const UNAUTHENTICATED_TTL: Duration = Duration::from_secs(30);
const ALLOWED_TTL: Duration = Duration::from_secs(120);
const DENIED_TTL: Duration = Duration::from_secs(30);
/// Entries per cache: far more callers than a sandbox pod has.
const CACHE_ENTRIES: usize = 4096;

type TokenDigest = [u8; 32];

pub struct KubernetesAuth {
    reviewer: Reviewer,
    namespace: String,
    users: TtlCache<TokenDigest, Option<User>>,
    decisions: TtlCache<(TokenDigest, Attributes), Decision>,
    /// Whether the last review failed, so an outage is logged when it starts and ends.
    failing: AtomicBool,
}

impl KubernetesAuth {
    pub fn new(reviewer: Reviewer, namespace: String) -> Self {
        KubernetesAuth {
            reviewer,
            namespace,
            users: TtlCache::new(CACHE_ENTRIES),
            decisions: TtlCache::new(CACHE_ENTRIES),
            failing: AtomicBool::new(false),
        }
    }

    /// The name of the token's user, once it may do what the route requires.
    pub async fn check(&self, token: &str, required: &Required) -> Result<String, AuthError> {
        let key = digest(token);
        let user = match self.users.get(&key) {
            Some(user) => user,
            None => {
                let user = self.reviewed(self.reviewer.authenticate(token).await)?;
                let ttl = if user.is_some() {
                    AUTHENTICATED_TTL
                } else {
                    UNAUTHENTICATED_TTL
                };
                self.users.insert(key, user.clone(), ttl);
                user
            }
        };
        let user = user.ok_or(AuthError::Unauthenticated("invalid bearer token"))?;
        for attrs in self.attributes(required) {
            let cache_key = (key, attrs);
            let decision = match self.decisions.get(&cache_key) {
                Some(d) => d,
                None => {
                    let d = self.reviewed(self.reviewer.authorize(&user, &cache_key.1).await)?;
                    let ttl = if d.allowed { ALLOWED_TTL } else { DENIED_TTL };
                    self.decisions.insert(cache_key.clone(), d.clone(), ttl);
                    d
                }
            };
            if !decision.allowed {
                return Err(AuthError::Forbidden {
                    user: user.username,
                    what: cache_key.1.to_string(),
                    reason: decision.reason,
                });
            }
        }
        Ok(user.username)
    }

    /// The reviews a route needs.
    fn attributes(&self, required: &Required) -> Vec<Attributes> {
        match required {
            Required::Public | Required::Authenticated => Vec::new(),
            Required::Tasks(rules) => rules
                .iter()
                .map(|r| Attributes::Resource {
                    namespace: self.namespace.clone(),
                    verb: r.verb,
                    group: GROUP,
                    resource: RESOURCE,
                    subresource: r.subresource,
                    name: r.name.clone(),
                })
                .collect(),
            Required::NonResource { verb, path } => vec![Attributes::NonResource {
                verb: verb.clone(),
                path: path.clone(),
            }],
        }
    }

    /// A review's answer, or 503 when it could not be had; logs outages once each way.
    fn reviewed<T>(&self, answer: Result<T, crate::kube::KubeError>) -> Result<T, AuthError> {
        match answer {
            Ok(v) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("the API server answers credential reviews again");
                }
                Ok(v)
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot review credentials with the API server; refusing requests that need a review (503)");
                }
                Err(AuthError::Unavailable(e.to_string()))
            }
        }
    }
}
