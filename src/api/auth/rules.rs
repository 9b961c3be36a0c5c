//! What each route requires of its caller (the authorisation rules): the one table to
//! extend when a route is added.
//!
//! A route names the verb on the `tasks` resource of group `task-executor.io` (and a
//! subresource where it has one), so whoever may do that to a `Task` object in the pod's
//! namespace may do it over HTTP. A path that is in no row is checked as a non-resource
//! URL (`GET /metrics` → verb `get`, path `/metrics`), as kube-rbac-proxy does: a route
//! added without a row is refused to everyone that has no grant for its path, never open.

use warp::http::Method;

use crate::api::route::Route;

/// The group and resource the routes stand for.
pub const GROUP: &str = "task-executor.io";
pub const RESOURCE: &str = "tasks";

/// A verb on `tasks` (or one of its subresources), optionally on one named task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub verb: &'static str,
    pub subresource: Option<&'static str>,
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Required {
    /// Anyone: liveness and readiness probes carry no credential.
    Public,
    /// Any authenticated caller (a wrong method on a known path, answered 405).
    Authenticated,
    /// Every rule must be allowed.
    Tasks(Vec<Rule>),
    /// A path that is no resource.
    NonResource { verb: String, path: String },
}

fn rule(verb: &'static str, name: Option<&str>) -> Rule {
    Rule {
        verb,
        subresource: None,
        name: name.map(str::to_string),
    }
}

/// What a request with this method on this route requires. The route is the router's own
/// parse of the path (`Route::parse`), so this table and the router always agree on it.
pub fn required(method: &Method, route: &Route) -> Required {
    let read = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    match route {
        Route::Health | Route::Readyz => Required::Public,
        Route::GetTasks if read => Required::Tasks(vec![rule("list", None)]),
        // Sync creates the listed tasks and deletes the others.
        Route::SetTasks if post => {
            Required::Tasks(vec![rule("create", None), rule("delete", None)])
        }
        Route::Tasks if post => Required::Tasks(vec![rule("create", None)]),
        Route::Task(name) if read => Required::Tasks(vec![rule("get", Some(name.as_str()))]),
        Route::Task(name) if delete => Required::Tasks(vec![rule("delete", Some(name.as_str()))]),
        Route::TaskLogs(name) if read => Required::Tasks(vec![Rule {
            subresource: Some("log"),
            ..rule("get", Some(name.as_str()))
        }]),
        Route::GetTasks | Route::SetTasks | Route::Tasks | Route::Task(_) | Route::TaskLogs(_) => {
            Required::Authenticated
        }
        // Not task routes: checked as non-resource URLs, as kube-rbac-proxy does.
        Route::Metrics => non_resource(method, "/metrics"),
        Route::OpenApi => non_resource(method, "/openapi.json"),
        Route::Unmatched(path) => non_resource(method, path),
    }
}

fn non_resource(method: &Method, path: &str) -> Required {
    Required::NonResource {
        verb: non_resource_verb(method),
        path: path.to_string(),
    }
}

/// The verb the API server uses for a non-resource request with this method.
fn non_resource_verb(method: &Method) -> String {
    match *method {
        Method::GET | Method::HEAD => "get".into(),
        _ => method.as_str().to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(verb: &'static str, name: Option<&str>) -> Required {
        Required::Tasks(vec![rule(verb, name)])
    }

    #[test]
    fn every_route_has_its_verb() {
        let cases = [
            (Method::GET, "/health", Required::Public),
            (Method::GET, "/readyz", Required::Public),
            (Method::GET, "/getTasks", tasks("list", None)),
            (Method::POST, "/tasks", tasks("create", None)),
            (Method::GET, "/tasks/a", tasks("get", Some("a"))),
            (Method::HEAD, "/tasks/a?wait=3s", tasks("get", Some("a"))),
            (Method::DELETE, "/tasks/a", tasks("delete", Some("a"))),
            (
                Method::POST,
                "/setTasks",
                Required::Tasks(vec![rule("create", None), rule("delete", None)]),
            ),
            (
                Method::GET,
                "/tasks/a/logs",
                Required::Tasks(vec![Rule {
                    verb: "get",
                    subresource: Some("log"),
                    name: Some("a".into()),
                }]),
            ),
            (Method::PUT, "/tasks", Required::Authenticated),
            (Method::PATCH, "/tasks/a", Required::Authenticated),
            (
                Method::GET,
                "/metrics",
                Required::NonResource {
                    verb: "get".into(),
                    path: "/metrics".into(),
                },
            ),
            (
                Method::POST,
                "/tasks/a/b",
                Required::NonResource {
                    verb: "post".into(),
                    path: "/tasks/a/b".into(),
                },
            ),
        ];
        for (method, path, want) in cases {
            let path = path.split('?').next().unwrap();
            assert_eq!(
                required(&method, &Route::parse(path)),
                want,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn encoded_paths_are_checked_as_the_router_reads_them() {
        // "%74asks" is "tasks": the router serves it as POST /tasks, so it needs create.
        assert_eq!(
            required(&Method::POST, &Route::parse("/%74asks")),
            tasks("create", None)
        );
        assert_eq!(
            required(&Method::DELETE, &Route::parse("//tasks/a%2Fb")),
            tasks("delete", Some("a/b"))
        );
    }
}
