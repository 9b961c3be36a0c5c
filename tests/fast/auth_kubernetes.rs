//! `--auth-mode kubernetes` against the real binary: the bearer token goes to a
//! TokenReview, the route's verb on `tasks.task-executor.io` to a SubjectAccessReview.
//!
//! No real API server can be installed here, so `crate::support::fake_apiserver` (with
//! `crate::support::fake_reviews`) answers the reviews with real Kubernetes JSON: tokens and
//! RBAC-like grants are set by each test.

use std::path::Path;

use crate::support::agent::{Agent, free_addr};
use crate::support::fake_apiserver::FakeApiServer;
use crate::support::fake_reviews::{ACCESS_REVIEWS, TOKEN_REVIEWS};
use crate::support::http::{Response, with_token as call};
use serde_json::{Value, json};
use warp::http::StatusCode;

const NS: &str = "sandbox";
const GROUP: &str = "task-executor.io";
const CONTROLLER: &str = "system:serviceaccount:opensandbox-system:controller";
const CONTROLLER_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.controller-sa-token";
const VIEWER_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.viewer-token";

fn task(name: &str) -> String {
    json!({"name": name, "spec": {"process": {"command": ["sleep", "30"]}}}).to_string()
}

/// The controller's service account may do everything to tasks in NS (as the chart's
/// `-client` ClusterRole bound in NS grants); the group `viewers` may only read them.
fn fake_with_callers() -> FakeApiServer {
    let api = FakeApiServer::start();
    api.reviews(|r| {
        r.add_token(
            CONTROLLER_TOKEN,
            CONTROLLER,
            &["system:serviceaccounts", "system:authenticated"],
        );
        r.allow(
            CONTROLLER,
            NS,
            GROUP,
            "tasks",
            &["create", "get", "list", "delete"],
        );
        r.add_token(VIEWER_TOKEN, "jane", &["viewers", "system:authenticated"]);
        r.allow("viewers", NS, GROUP, "tasks", &["get", "list"]);
        // A grant in another namespace must not count here.
        r.allow(
            "viewers",
            "elsewhere",
            GROUP,
            "tasks",
            &["create", "delete"],
        );
    });
    api
}

fn start_agent(kubeconfig_server: &str, dir: &Path) -> Agent {
    let kubeconfig = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {kubeconfig_server}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {NS}\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    );
    std::fs::write(&kubeconfig, text).unwrap();
    Agent::start_with_env(
        &["--auth-mode=kubernetes"],
        &[
            ("POD_NAMESPACE", NS),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
        ],
    )
}

fn reviews(api: &FakeApiServer, path: &str) -> Vec<Value> {
    api.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .map(|r| serde_json::from_str(&r.body).unwrap())
        .collect()
}

/// SubjectAccessReviews sent for `user` and `verb`.
fn access_reviews(api: &FakeApiServer, user: &str, verb: &str) -> Vec<Value> {
    reviews(api, ACCESS_REVIEWS)
        .into_iter()
        .filter(|r| r["spec"]["user"] == user && r["spec"]["resourceAttributes"]["verb"] == verb)
        .collect()
}

fn assert_forbidden(r: &Response, verb: &str) {
    assert_eq!(r.status, 403, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "Forbidden", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{verb} tasks.{GROUP}")) && message.contains(NS),
        "403 does not name the verb and resource: {message}"
    );
}

#[test]
fn callers_may_do_what_their_task_permissions_allow() {
    let tmp = tempfile::tempdir().unwrap();
    let api = fake_with_callers();
    let agent = start_agent(&format!("http://{}", api.addr), tmp.path());
    let a = agent.addr;
    let ctl = Some(CONTROLLER_TOKEN);
    let viewer = Some(VIEWER_TOKEN);

    assert_eq!(call(a, "GET", "/health", None, None).status, 200);
    assert_eq!(call(a, "GET", "/readyz", None, None).status, 200);
    for token in [None, Some("not-a-token")] {
        let r = call(a, "GET", "/getTasks", token, None);
        assert_eq!(r.status, 401, "{token:?}: {}", r.text());
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }

    // The controller may do everything.
    let r = call(a, "POST", "/tasks", ctl, Some(&task("t1")));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(call(a, "GET", "/tasks/t1", ctl, None).status, 200);
    assert_eq!(call(a, "GET", "/tasks/t1", ctl, None).status, 200);
    assert_eq!(call(a, "GET", "/getTasks", ctl, None).status, 200);
    let r = call(
        a,
        "POST",
        "/setTasks",
        ctl,
        Some(&format!("[{}, {}]", task("t1"), task("t2"))),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // The viewer may read, not create or delete: nothing changes when refused.
    assert_eq!(call(a, "GET", "/tasks/t1", viewer, None).status, 200);
    assert_eq!(call(a, "GET", "/getTasks", viewer, None).status, 200);
    assert_forbidden(
        &call(a, "POST", "/tasks", viewer, Some(&task("v1"))),
        "create",
    );
    assert_forbidden(
        &call(a, "POST", "/tasks", viewer, Some(&task("v1"))),
        "create",
    );
    assert_forbidden(&call(a, "DELETE", "/tasks/t1", viewer, None), "delete");
    // A sync can delete, so it needs delete besides create.
    let r = call(a, "POST", "/setTasks", viewer, Some("[]"));
    assert_eq!(r.status, 403, "{}", r.text());
    let list = call(a, "GET", "/getTasks", ctl, None).json();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["t1", "t2"], "a refused request changed the tasks");
    assert!(!agent.task_dir("v1").exists());
    // Paths that are no route are checked as non-resource URLs: nobody has those here.
    assert_eq!(
        call(a, "GET", "/metrics-or-anything", ctl, None).status,
        403
    );
    assert_eq!(call(a, "DELETE", "/tasks/t2", ctl, None).status, 204);

    // The reviews asked exactly for the route's verb on tasks in the pod's namespace.
    let creates = access_reviews(&api, CONTROLLER, "create");
    let attrs = &creates[0]["spec"]["resourceAttributes"];
    assert_eq!(attrs["group"], GROUP);
    assert_eq!(attrs["resource"], "tasks");
    assert_eq!(attrs["namespace"], NS);
    assert_eq!(
        creates[0]["spec"]["groups"],
        json!(["system:serviceaccounts", "system:authenticated"])
    );
    assert_eq!(creates[0]["spec"]["uid"], format!("uid-{CONTROLLER}"));
    let gets = access_reviews(&api, CONTROLLER, "get");
    assert_eq!(gets[0]["spec"]["resourceAttributes"]["name"], "t1");
    assert_eq!(access_reviews(&api, CONTROLLER, "list").len(), 1);
    assert_eq!(
        access_reviews(&api, CONTROLLER, "delete").len(),
        2,
        "setTasks and DELETE /tasks/t2"
    );

    // Answers are cached: one TokenReview per token, one review per allowed or denied
    // question (two GETs of t1, two refused creates).
    let token_reviews = reviews(&api, TOKEN_REVIEWS);
    for token in [CONTROLLER_TOKEN, VIEWER_TOKEN, "not-a-token"] {
        let n = token_reviews
            .iter()
            .filter(|r| r["spec"]["token"] == token)
            .count();
        assert_eq!(n, 1, "TokenReviews for {token}");
    }
    assert_eq!(gets.len(), 1, "GET /tasks/t1 twice: {gets:?}");
    assert_eq!(access_reviews(&api, "jane", "create").len(), 1);

    let log = agent.log_text();
    for t in [CONTROLLER_TOKEN, VIEWER_TOKEN] {
        assert!(!log.contains(t), "a token reached the log");
    }
    assert!(
        log.contains("request forbidden") && log.contains("jane"),
        "{log}"
    );
    // Refusals are in the access log like any answer; an allowed one names its user.
    let lines = crate::support::access_lines(&log);
    let seen = |method, route, status| {
        lines
            .iter()
            .filter(|l| crate::support::access_line_of(l, method, route, status))
            .count()
    };
    assert_eq!(seen("POST", "/tasks", 403), 2, "{lines:#?}");
    assert_eq!(seen("DELETE", "/tasks/{name}", 403), 1, "{lines:#?}");
    assert_eq!(seen("GET", "/getTasks", 401), 2, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| crate::support::access_line_of(l, "POST", "/tasks", 201)
                && l.contains(&format!("user=\"{CONTROLLER}\""))),
        "{lines:#?}"
    );
}

#[test]
fn an_api_server_that_cannot_answer_means_503_never_allow() {
    // Nothing listens on this port: every review fails to connect.
    let tmp = tempfile::tempdir().unwrap();
    let agent = start_agent(&format!("http://{}", free_addr()), tmp.path());
    let a = agent.addr;
    assert_eq!(call(a, "GET", "/health", None, None).status, 200);
    // No credential at all needs no review: still 401.
    assert_eq!(call(a, "GET", "/getTasks", None, None).status, 401);
    for _ in 0..2 {
        let r = call(
            a,
            "POST",
            "/tasks",
            Some(CONTROLLER_TOKEN),
            Some(&task("never")),
        );
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.json()["code"], "Service Unavailable");
        // Nothing of the API server's answer (its address, the connect error) goes to a
        // caller that is not authenticated yet; the agent's log has it.
        assert_eq!(
            r.json()["message"],
            "cannot check the credential now: the authenticator did not answer; try again later"
        );
    }
    assert!(!agent.task_dir("never").exists());
    let log = agent.log_text();
    assert_eq!(log.matches("cannot review credentials").count(), 1, "{log}");

    // An API server that answers with errors: answers cached before still count (as in
    // kubelet), new questions are refused with 503.
    let tmp = tempfile::tempdir().unwrap();
    let api = fake_with_callers();
    let agent = start_agent(&format!("http://{}", api.addr), tmp.path());
    let a = agent.addr;
    let ctl = Some(CONTROLLER_TOKEN);
    assert_eq!(call(a, "GET", "/getTasks", ctl, None).status, 200);
    api.reviews(|r| r.fail_with(Some(StatusCode::INTERNAL_SERVER_ERROR)));
    assert_eq!(call(a, "GET", "/getTasks", ctl, None).status, 200);
    let r = call(a, "POST", "/tasks", ctl, Some(&task("later")));
    assert_eq!(r.status, 503, "{}", r.text());
    let r = call(a, "GET", "/getTasks", Some(VIEWER_TOKEN), None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        !r.text().contains("500") && !r.text().contains(&api.addr.to_string()),
        "{}",
        r.text()
    );
    // Back: the same request goes through.
    api.reviews(|r| r.fail_with(None));
    let r = call(a, "POST", "/tasks", ctl, Some(&task("later")));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        agent
            .log_text()
            .contains("answers credential reviews again")
    );
    assert_eq!(call(a, "DELETE", "/tasks/later", ctl, None).status, 204);
}
