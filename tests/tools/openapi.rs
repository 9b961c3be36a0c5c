//! The OpenAPI document (`GET /openapi.json`) as a contract: it is valid OpenAPI 3.1
//! (openapi-spec-validator), every example in README.md, docs/ and examples/ is a valid request
//! or answer by it, real answers of a live agent match it (status, content type, body
//! schema), and a property-based fuzzer driven by it (schemathesis) finds no 5xx and no
//! answer that contradicts it. The tools come from `scripts/install-api-tools`; a missing
//! tool fails the test.
//!
//! The fuzzer creates tasks with arbitrary commands, run as root. So the fuzzed agent runs
//! in a jail that can run nothing (`crate::support::jail`): its own mount and PID namespaces,
//! chrooted into a tmpfs holding only its binary and libraries, with an empty
//! environment; every command a task names is missing there.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::jail::JailedAgent;
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tool(name: &str) -> PathBuf {
    let p = repo().join(".tools/bin").join(name);
    assert!(
        p.exists(),
        "{name} not found at {} (run scripts/install-api-tools)",
        p.display()
    );
    p
}

fn document(a: &Agent) -> Value {
    let r = a.call("GET", "/openapi.json", None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

/// Validates `instance` against `schema`, whose `$ref`s point into `doc`'s components.
fn errors(doc: &Value, schema: &Value, instance: &Value) -> Vec<String> {
    let mut root = schema.as_object().cloned().unwrap_or_default();
    root.insert("components".into(), doc["components"].clone());
    let v = jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&Value::Object(root))
        .unwrap_or_else(|e| panic!("schema {schema}: {e}"));
    v.iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

fn component(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn assert_valid(doc: &Value, schema: &Value, instance: &Value, what: &str) {
    let errs = errors(doc, schema, instance);
    assert!(errs.is_empty(), "{what}: {errs:?}\n{instance}");
}

/// The operation for a path (a template, e.g. `/tasks/{name}`) and method.
fn operation<'a>(doc: &'a Value, method: &str, template: &str) -> &'a Value {
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    assert!(op.is_object(), "{method} {template} is not in the document");
    op
}

/// Checks a real answer against the document: its status is listed, its content type
/// is one the status lists, and a JSON body fits that schema.
fn check_answer(doc: &Value, method: &str, template: &str, r: &crate::support::http::Response) {
    let op = operation(doc, method, template);
    let resp = &op["responses"][r.status.to_string()];
    assert!(
        resp.is_object(),
        "{method} {template} answered {} ({}), which the document does not list",
        r.status,
        r.text()
    );
    let Some(content) = resp["content"].as_object() else {
        assert!(
            r.body.is_empty(),
            "{method} {template}: a body where none is documented"
        );
        return;
    };
    let ct = r.header("content-type").unwrap_or_default();
    let media = content.get(ct).unwrap_or_else(|| {
        panic!(
            "{method} {template} {}: content type {ct:?} not in {content:?}",
            r.status
        )
    });
    if ct == "application/json" {
        assert_valid(
            doc,
            &media["schema"],
            &r.json(),
            &format!("{method} {template} {}", r.status),
        );
    }
}

#[test]
fn the_document_is_valid_openapi_3_1_and_lists_every_route() {
    let a = Agent::start(&[]);
    let doc = document(&a);
    assert_eq!(doc["openapi"], "3.1.0");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let out = Command::new(tool("openapi-spec-validator"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (method, path) in [
        ("get", "/health"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/getTasks"),
        ("post", "/setTasks"),
        ("post", "/tasks"),
        ("get", "/tasks/{name}"),
        ("delete", "/tasks/{name}"),
        ("get", "/tasks/{name}/logs"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path}");
    }
    // docs/api.md's status table, by route.
    let codes = |m: &str, p: &str| -> Vec<String> {
        doc["paths"][p][m]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    for c in ["201", "400", "408", "409", "413", "429"] {
        assert!(
            codes("post", "/tasks").contains(&c.to_string()),
            "POST /tasks {c}"
        );
    }
    assert!(codes("get", "/tasks/{name}").contains(&"404".to_string()));
    assert!(codes("delete", "/tasks/{name}").contains(&"204".to_string()));
    assert!(codes("get", "/readyz").contains(&"503".to_string()));
    let wait = doc["paths"]["/tasks/{name}"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "wait" && p["in"] == "query");
    assert!(wait, "the ?wait= parameter");
    for route in ["/tasks", "/setTasks"] {
        let param = doc["paths"][route]["post"]["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "fieldValidation")
            .unwrap_or_else(|| panic!("?fieldValidation= on {route}"))
            .clone();
        assert_eq!(param["in"], "query");
        let r = param["schema"]["$ref"].as_str().unwrap();
        let name = r.rsplit('/').next().unwrap();
        let values: Vec<&str> = doc["components"]["schemas"][name]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["const"].as_str().unwrap())
            .collect();
        assert_eq!(values, ["Ignore", "Warn", "Strict"]);
    }
}

/// JSON bodies sent with `-d '...'` (curl lines, and the session script's wrapper of
/// curl), with the route of the line they start on.
fn curl_bodies(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find("-d '") {
        let start = at + i + 4;
        let line_start = text[..start].rfind('\n').map_or(0, |n| n + 1);
        let line = &text[line_start..start];
        let route = if line.contains("/setTasks") {
            "/setTasks"
        } else if line.contains("/tasks") {
            "/tasks"
        } else {
            panic!("a body sent to an unknown route: {line}")
        };
        let end = start + text[start..].find('\'').unwrap();
        out.push((route.to_string(), text[start..end].to_string()));
        at = end + 1;
    }
    out
}

#[test]
fn every_example_in_the_readme_docs_and_examples_fits_the_document() {
    let a = Agent::start(&[]);
    let doc = document(&a);
    let request = component("TaskRequest");
    let requests = operation(&doc, "post", "/setTasks")["requestBody"]["content"]
        ["application/json"]["schema"]
        .clone();
    let answer = component("TaskResponse");
    let answers = json!({"type": "array", "items": answer});
    let mut checked = 0;
    // The README's tour, every page of docs/ (sorted, so failures come in a stable
    // order) and the session script.
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    let files = ["README.md".to_string()]
        .into_iter()
        .chain(docs)
        .chain(["examples/curl-session.sh".to_string()]);
    for f in files {
        let text = std::fs::read_to_string(repo().join(&f)).unwrap();
        for (path, body) in curl_bodies(&text) {
            let v: Value =
                serde_json::from_str(&body).unwrap_or_else(|e| panic!("{f}: {body}: {e}"));
            let schema = if path.starts_with("/setTasks") {
                &requests
            } else {
                &request
            };
            assert_valid(&doc, schema, &v, &format!("{f}: POST {path}"));
            checked += 1;
        }
        // ```json blocks: answers carry a status, requests don't.
        for block in text.split("```json\n").skip(1) {
            let body = block.split("```").next().unwrap();
            let v: Value =
                serde_json::from_str(body).unwrap_or_else(|e| panic!("{f}: {body}: {e}"));
            let schema = if v.get("status").is_some() {
                &answer
            } else {
                &request
            };
            assert_valid(&doc, schema, &v, &format!("{f}: {body}"));
            checked += 1;
        }
    }
    let read = |f: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(repo().join(f)).unwrap()).unwrap()
    };
    assert_valid(
        &doc,
        &requests,
        &read("examples/controller-set-tasks-request.json"),
        "set request",
    );
    assert_valid(
        &doc,
        &answers,
        &read("examples/controller-get-tasks-response.json"),
        "get answer",
    );
    // A Task resource's spec is the API's spec (plus podName).
    let task: yaml_serde::Value =
        yaml_serde::from_str(&std::fs::read_to_string(repo().join("examples/task.yaml")).unwrap())
            .unwrap();
    let spec: Value = serde_json::to_value(&task["spec"]).unwrap();
    assert_valid(
        &doc,
        &component("TaskSpecInput"),
        &spec,
        "examples/task.yaml spec",
    );
    assert!(
        checked >= 8,
        "only {checked} README/docs/curl examples found"
    );
    // Both wire shapes are valid requests.
    for shape in [
        json!({"name": "a", "spec": {"process": {"command": ["true"]}}}),
        json!({"name": "a", "process": {"command": ["true"], "timeoutSeconds": 5}}),
        // Upstream's readings: a process timeout of 0 is already over, a hook's is none.
        json!({"name": "a", "process": {"command": ["true"], "timeoutSeconds": 0, "lifecycle": {
            "preStart": {"exec": {"command": ["true"]}, "timeoutSeconds": 0}}}}),
    ] {
        assert_valid(&doc, &request, &shape, &shape.to_string());
    }
    // And the document says no to what the agent refuses.
    for bad in [
        json!({"name": "Bad_Name", "spec": {"process": {"command": ["true"]}}}),
        json!({"spec": {"process": {"command": ["true"]}}}),
        json!({"name": "a", "podTemplateSpec": 5}),
        json!({"name": "a", "process": {"command": ["true"], "execMode": "Elsewhere"}}),
    ] {
        assert!(
            !errors(&doc, &request, &bad).is_empty(),
            "{bad} should not fit"
        );
    }
}

#[test]
fn real_answers_fit_the_document() {
    let a = Agent::start(&[]);
    let doc = document(&a);
    let call = |method: &str, path: &str, template: &str, body: Option<&str>| {
        let r = a.call(method, path, body);
        check_answer(&doc, method, template, &r);
        r
    };
    call("GET", "/health", "/health", None);
    call("GET", "/readyz", "/readyz", None);
    call("GET", "/openapi.json", "/openapi.json", None);
    let created = call(
        "POST",
        "/tasks",
        "/tasks",
        Some(
            r#"{"name":"ok","spec":{"process":{"command":["sh","-c","echo hi; exit 3"],"env":[{"name":"A","value":"b"}]}}}"#,
        ),
    );
    assert_eq!(created.status, 201);
    assert_eq!(
        call(
            "POST",
            "/tasks",
            "/tasks",
            Some(r#"{"name":"ok","process":{"command":["true"]}}"#)
        )
        .status,
        409
    );
    assert_eq!(
        call("POST", "/tasks", "/tasks", Some("{not json")).status,
        400
    );
    assert_eq!(
        call(
            "POST",
            "/tasks",
            "/tasks",
            Some(r#"{"name":"nocmd","spec":{}}"#)
        )
        .status,
        400
    );
    // Waiting, running and terminated states, and a start error.
    call(
        "POST",
        "/tasks",
        "/tasks",
        Some(r#"{"name":"slow","process":{"command":["sleep","30"],"timeoutSeconds":60}}"#),
    );
    call(
        "POST",
        "/tasks",
        "/tasks",
        Some(r#"{"name":"missing","process":{"command":["/no/such/binary"]}}"#),
    );
    assert_eq!(
        call("GET", "/tasks/ok?wait=20s", "/tasks/{name}", None).status,
        200
    );
    call("GET", "/tasks/slow", "/tasks/{name}", None);
    call("GET", "/tasks/missing?wait=20s", "/tasks/{name}", None);
    assert_eq!(
        call("GET", "/tasks/ok?wait=soon", "/tasks/{name}", None).status,
        400
    );
    assert_eq!(
        call("GET", "/tasks/none", "/tasks/{name}", None).status,
        404
    );
    call("GET", "/getTasks", "/getTasks", None);
    assert_eq!(
        call("GET", "/tasks/ok/logs", "/tasks/{name}/logs", None).text(),
        "hi\n"
    );
    assert_eq!(
        call(
            "GET",
            "/tasks/ok/logs?tailLines=x",
            "/tasks/{name}/logs",
            None
        )
        .status,
        400
    );
    assert_eq!(
        call("GET", "/tasks/none/logs", "/tasks/{name}/logs", None).status,
        404
    );
    call("GET", "/metrics", "/metrics", None);
    call("DELETE", "/tasks/slow", "/tasks/{name}", None);
    call("GET", "/getTasks", "/getTasks", None); // with a deletionTimestamp
    assert_eq!(
        call("DELETE", "/tasks/none", "/tasks/{name}", None).status,
        204
    );
    let synced = call(
        "POST",
        "/setTasks",
        "/setTasks",
        Some(
            &std::fs::read_to_string(repo().join("examples/controller-set-tasks-request.json"))
                .unwrap(),
        ),
    );
    assert_eq!(synced.status, 200);
    assert_eq!(
        call("POST", "/setTasks", "/setTasks", Some(r#"[{"name":"x"}]"#)).status,
        400
    );
    assert_eq!(
        call("POST", "/setTasks", "/setTasks", Some("null")).status,
        200
    );
}

#[test]
fn fuzzing_the_api_by_its_document_finds_no_5xx_and_no_contradiction() {
    let schemathesis = tool("schemathesis");
    let mut agent = JailedAgent::start(&["--max-body-bytes", "65536"]);
    let base = format!("http://{}", agent.addr);
    let reports = tempfile::tempdir().unwrap();
    let out = Command::new(&schemathesis)
        .args(["run", &format!("{base}/openapi.json"), "--url", &base])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance,\
             negative_data_rejection,unsupported_method",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "40",
            "--max-time",
            "90",
            "--request-timeout",
            "20",
            "--seed",
            "7",
            // One worker: hypothesis describing strategies from several threads at once
            // trips a CPython 3.11 AST bug ("recursion depth mismatch").
            "--workers",
            "1",
            "--generation-database",
            ":memory:",
        ])
        .env("SCHEMATHESIS_HOOKS", "")
        .env("HOME", reports.path())
        .current_dir(reports.path())
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\nagent log tail:\n{}",
        agent
            .log_text()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(text.contains("passed"), "{text}");
    // The agent is healthy afterwards.
    assert!(agent.alive());
    let h = crate::support::http::request(agent.addr, "GET", "/health", None).unwrap();
    assert_eq!(h.status, 200);
    let list = crate::support::http::request(agent.addr, "GET", "/getTasks", None).unwrap();
    assert_eq!(list.status, 200);
    std::thread::sleep(Duration::from_millis(10));
}
