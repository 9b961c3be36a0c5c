//! Unknown fields over HTTP, as the Kubernetes API server treats them
//! (`?fieldValidation=`): `Warn` by default (the request succeeds, a `Warning: 299` header
//! names each field, the agent logs it once per task), `Strict` (400 listing every
//! unknown field, nothing changes), `Ignore` (silently dropped).

use crate::support::agent::Agent;
use serde_json::{Value, json};

fn warnings(r: &crate::support::http::Response) -> Vec<String> {
    r.headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("warning"))
        .map(|(_, v)| v.clone())
        .collect()
}

/// `POST /tasks` with a raw body and query.
fn post(a: &Agent, path: &str, body: &Value) -> crate::support::http::Response {
    a.call("POST", path, Some(&body.to_string()))
}

fn with_unknown(name: &str) -> Value {
    json!({"name": name, "colour": "blue", "spec": {"process": {
        "command": ["true"], "foo": 1, "env": [{"name": "A", "value": "b", "secret": true}]}}})
}

#[test]
fn warn_is_the_default_with_a_header_per_field_and_one_log_line_per_task() {
    let a = Agent::start(&[]);
    let r = post(&a, "/tasks", &with_unknown("warned"));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        warnings(&r),
        [
            r#"299 - "unknown field \"colour\"""#,
            r#"299 - "unknown field \"spec.process.env[0].secret\"""#,
            r#"299 - "unknown field \"spec.process.foo\"""#,
        ]
    );
    assert_eq!(r.json()["spec"]["process"].get("foo"), None);
    let r = post(
        &a,
        "/tasks?fieldValidation=Warn",
        &with_unknown("warned-too"),
    );
    assert_eq!((r.status, warnings(&r).len()), (201, 3));

    // setTasks names the element; repeating the sync warns again but logs nothing new.
    let body = json!([
        {"name": "plain", "process": {"command": ["true"]}},
        {"name": "odd", "process": {"command": ["true"], "execMod": "Remote"}}
    ]);
    for _ in 0..3 {
        let r = post(&a, "/setTasks", &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            warnings(&r),
            [r#"299 - "unknown field \"[1].process.execMod\"""#]
        );
    }
    let log = a.log_text();
    let logged = |task: &str| {
        log.lines()
            .filter(|l| l.contains("fields the agent does not know") && l.contains(task))
            .count()
    };
    assert_eq!(logged("warned"), 2, "warned and warned-too:\n{log}");
    assert_eq!(logged("odd"), 1, "{log}");
    assert_eq!(logged("plain"), 0);
    assert!(log.contains("[1].process.execMod"), "{log}");
}

#[test]
fn strict_refuses_listing_every_unknown_field_and_changes_nothing() {
    let a = Agent::start(&[]);
    let r = post(&a, "/tasks?fieldValidation=Strict", &with_unknown("strict"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["message"],
        r#"strict decoding error: unknown field "colour", unknown field "spec.process.env[0].secret", unknown field "spec.process.foo""#
    );
    assert!(a.get("strict").is_none());
    // A sync refused under Strict deletes nothing either.
    a.create_ok(&json!({"name": "kept", "process": {"command": ["sleep", "30"]}}));
    let r = post(
        &a,
        "/setTasks?fieldValidation=Strict",
        &json!([{"name": "other", "process": {"command": ["true"], "tmeoutSeconds": 5}}]),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.text()
            .contains(r#"unknown field \"[0].process.tmeoutSeconds\""#),
        "{}",
        r.text()
    );
    assert!(a.get("kept").is_some() && a.get("other").is_none());
    // Known fields only: Strict accepts.
    let r = post(
        &a,
        "/tasks?fieldValidation=Strict",
        &json!({"name": "clean", "process": {"command": ["true"], "execMode": "Local"}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn ignore_drops_them_silently_and_bad_values_are_a_400() {
    let a = Agent::start(&[]);
    let r = post(
        &a,
        "/tasks?fieldValidation=Ignore",
        &with_unknown("ignored"),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(warnings(&r).is_empty());
    assert!(!a.log_text().contains("fields the agent does not know"));
    for q in ["strict", "", "Warn&fieldValidation=Strict"] {
        let r = post(
            &a,
            &format!("/tasks?fieldValidation={q}"),
            &json!({"name": "q", "process": {"command": ["true"]}}),
        );
        assert_eq!(r.status, 400, "{q}: {}", r.text());
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("fieldValidation: ")
        );
    }
    assert!(a.get("q").is_none());
}

#[test]
fn a_misspelt_field_is_named_in_the_400_it_causes() {
    let a = Agent::start(&[]);
    let r = post(
        &a,
        "/tasks",
        &json!({"name": "typo", "spec": {"proces": {"command": ["true"]}}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.json()["message"],
        r#"invalid task spec: spec must set either process, container or podTemplateSpec (the request also has unknown field "spec.proces")"#
    );
    assert_eq!(warnings(&r), [r#"299 - "unknown field \"spec.proces\"""#]);
}

#[test]
fn unknown_fields_inside_a_pod_template_are_found_too() {
    // Container mode is off here: the template is refused, and its typo named.
    let a = Agent::start(&[]);
    let r = post(
        &a,
        "/tasks",
        &json!({"name": "tpl", "podTemplateSpec": {"spec": {"containers": [
            {"name": "c", "image": "busybox", "comand": ["true"]}]}}}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("--enable-container-mode"), "{}", r.text());
    assert_eq!(
        warnings(&r),
        [r#"299 - "unknown field \"podTemplateSpec.spec.containers[0].comand\"""#]
    );
    let r = post(
        &a,
        "/setTasks?fieldValidation=Strict",
        &json!([{"name": "tpl", "spec": {"podTemplateSpec": {"spec": {"containers": [],
            "hostNetwrk": true}}}}]),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        r#"strict decoding error: unknown field "[0].spec.podTemplateSpec.spec.hostNetwrk""#
    );
}

#[test]
fn a_header_value_is_always_valid_whatever_the_field_name() {
    let a = Agent::start(&[]);
    let r = a.call(
        "POST",
        "/tasks",
        Some(r#"{"name":"odd-names","process":{"command":["true"],"a\"b\\c\n\u00e9\u0001":1}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        warnings(&r),
        [r#"299 - "unknown field \"process.a\\\"b\\\\c\\n\\u00e9\\x01\"""#]
    );
}
