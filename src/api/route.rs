//! The routes, parsed from a request's path. The router (`api::router`), the
//! authorisation rules (`auth::rules`), the access log and the HTTP metrics
//! (`api::access_log`) all read a path through [`Route::parse`] (as the [`filter`]), so
//! they always agree on which route a request is.

use std::convert::Infallible;

use percent_encoding::percent_decode_str;
use warp::Filter;
use warp::path::FullPath;

/// The request's route: [`Route::parse`] of its path, as a filter (never rejects).
pub fn filter() -> impl Filter<Extract = (Route,), Error = Infallible> + Clone {
    warp::path::full().map(|path: FullPath| Route::parse(path.as_str()))
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Health,
    Readyz,
    Metrics,
    OpenApi,
    GetTasks,
    SetTasks,
    /// `/tasks` (create).
    Tasks,
    /// `/tasks/{name}`.
    Task(String),
    /// `/tasks/{name}/logs`.
    TaskLogs(String),
    /// Any other path, decoded and normalised (`/a/b`).
    Unmatched(String),
}

impl Route {
    /// Segments are percent-decoded (`/%74asks` is `/tasks`) and leading slashes ignored.
    pub fn parse(path: &str) -> Route {
        let segs: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
            .collect();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        match segs.as_slice() {
            ["health"] => Route::Health,
            ["readyz"] => Route::Readyz,
            ["metrics"] => Route::Metrics,
            ["openapi.json"] => Route::OpenApi,
            ["getTasks"] => Route::GetTasks,
            ["setTasks"] => Route::SetTasks,
            ["tasks"] => Route::Tasks,
            ["tasks", name] if !name.is_empty() => Route::Task(name.to_string()),
            ["tasks", name, "logs"] if !name.is_empty() => Route::TaskLogs(name.to_string()),
            _ => Route::Unmatched(format!("/{}", segs.join("/"))),
        }
    }

    /// The route's template: the only form a path takes in logs and metric labels (never a
    /// task name; unknown paths are one value, so a scan can't grow the label set).
    pub fn template(&self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Readyz => "/readyz",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::GetTasks => "/getTasks",
            Route::SetTasks => "/setTasks",
            Route::Tasks => "/tasks",
            Route::Task(_) => "/tasks/{name}",
            Route::TaskLogs(_) => "/tasks/{name}/logs",
            Route::Unmatched(_) => "unmatched",
        }
    }

    /// The methods the route answers (the `Allow` header of a 405); `None` for no route.
    pub fn allow(&self) -> Option<&'static str> {
        match self {
            Route::SetTasks | Route::Tasks => Some("POST"),
            Route::Task(_) => Some("GET, HEAD, DELETE"),
            Route::Unmatched(_) => None,
            _ => Some("GET, HEAD"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Route;

    #[test]
    fn paths_parse_into_routes_and_templates_never_hold_names() {
        assert_eq!(
            Route::parse("/tasks/secret-name").template(),
            "/tasks/{name}"
        );
        assert_eq!(
            Route::parse("/tasks/x/logs").template(),
            "/tasks/{name}/logs"
        );
        assert_eq!(Route::parse("/%74asks"), Route::Tasks);
        assert_eq!(Route::parse("//tasks/a%2Fb"), Route::Task("a/b".into()));
        assert_eq!(Route::parse("/tasks/"), Route::Unmatched("/tasks/".into()));
        assert_eq!(Route::parse("/tasks/x/y").template(), "unmatched");
        assert_eq!(Route::parse("/getTasks").allow(), Some("GET, HEAD"));
    }
}
