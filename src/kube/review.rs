//! Asks the API server who a bearer token belongs to (TokenReview) and whether that
//! caller may do something (SubjectAccessReview): the webhook authentication and
//! authorization kubelet and kube-rbac-proxy use for their own endpoints.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

use super::KubeError;

/// How long one review may take before the caller is answered 503: an API server that
/// doesn't answer must not hold requests (and connections) for kube's 295 s read timeout.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// The caller a TokenReview found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// What a request does, as a SubjectAccessReview asks it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Attributes {
    /// A verb on a namespaced resource (optionally a subresource, optionally one object).
    Resource {
        namespace: String,
        verb: &'static str,
        group: &'static str,
        resource: &'static str,
        subresource: Option<&'static str>,
        name: Option<String>,
    },
    /// A verb on a path that is no resource (`/metrics`), as kube-rbac-proxy checks them.
    NonResource { verb: String, path: String },
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attributes::Resource {
                namespace,
                verb,
                group,
                resource,
                subresource,
                name,
            } => {
                write!(f, "{verb} {resource}")?;
                if let Some(s) = subresource {
                    write!(f, "/{s}")?;
                }
                write!(f, ".{group}")?;
                if let Some(n) = name {
                    write!(f, " {n:?}")?;
                }
                write!(f, " in namespace {namespace:?}")
            }
            Attributes::NonResource { verb, path } => write!(f, "{verb} {path}"),
        }
    }
}

/// The SubjectAccessReview's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The authorizer's reason, when it gave one.
    pub reason: Option<String>,
}

/// Sends reviews with one client (the agent's own service account, which needs `create`
/// on tokenreviews and subjectaccessreviews: the built-in `system:auth-delegator`).
#[derive(Clone)]
pub struct Reviewer {
    tokens: Api<TokenReview>,
    access: Api<SubjectAccessReview>,
}

impl Reviewer {
    pub fn new(client: kube::Client) -> Self {
        Reviewer {
            tokens: Api::all(client.clone()),
            access: Api::all(client),
        }
    }

    /// The user the token belongs to; `None` when the API server says it is not valid.
    pub async fn authenticate(&self, token: &str) -> Result<Option<User>, KubeError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = bounded(self.tokens.create(&PostParams::default(), &review)).await?;
        let Some(status) = answer.status else {
            return Ok(None);
        };
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        let Some(info) = status.user else {
            return Ok(None);
        };
        Ok(info
            .username
            .filter(|u| !u.is_empty())
            .map(|username| User {
                username,
                uid: info.uid.filter(|u| !u.is_empty()),
                groups: info.groups.unwrap_or_default(),
                extra: info.extra.unwrap_or_default(),
            }))
    }

    /// Whether `user` may do what `attrs` says.
    pub async fn authorize(&self, user: &User, attrs: &Attributes) -> Result<Decision, KubeError> {
        let (resource_attributes, non_resource_attributes) = match attrs {
            Attributes::Resource {
                namespace,
                verb,
                group,
                resource,
                subresource,
                name,
            } => (
                Some(ResourceAttributes {
                    namespace: Some(namespace.clone()),
                    verb: Some(verb.to_string()),
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: subresource.map(str::to_string),
                    name: name.clone(),
                    ..Default::default()
                }),
                None,
            ),
            Attributes::NonResource { verb, path } => (
                None,
                Some(NonResourceAttributes {
                    verb: Some(verb.clone()),
                    path: Some(path.clone()),
                }),
            ),
        };
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.username.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                extra: Some(user.extra.clone()),
                resource_attributes,
                non_resource_attributes,
            },
            ..Default::default()
        };
        let answer = bounded(self.access.create(&PostParams::default(), &review)).await?;
        let status = answer.status.unwrap_or_default();
        Ok(Decision {
            // An explicit denial or an evaluation error never counts as allowed.
            allowed: status.allowed && status.denied != Some(true),
            reason: status.reason.filter(|r| !r.is_empty()),
        })
    }
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, KubeError> {
    match tokio::time::timeout(REVIEW_TIMEOUT, call).await {
        Ok(result) => result.map_err(KubeError::Api),
        Err(_) => Err(KubeError::Timeout(REVIEW_TIMEOUT)),
    }
}
