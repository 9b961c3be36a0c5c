//! The HTTP contract: shapes (both wire formats), status codes, names, setTasks.
//! Real agent binary, real processes.

use std::time::Duration;

use crate::support::agent::{Agent, normalize_times};
use crate::support::http;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(10);

#[test]
fn seed_shape_create_get_list_golden() {
    let a = Agent::start(&[]);
    let body = json!({"name": "my-first-task", "spec": {"process": {
        "command": ["sh", "-c"], "args": ["exit 0"],
        "env": [{"name": "DEBUG_MODE", "value": "true"}], "workingDir": "/tmp"}}});
    let r = a.create(body);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(
        r.body.ends_with(b"\n"),
        "JSON bodies end with a newline like Go's encoder"
    );
    let created = r.json();
    assert!(
        created["status"]["state"].get("running").is_some()
            || created["status"]["state"].get("terminated").is_some()
    );

    a.wait_state("my-first-task", "terminated", T);
    let mut got = a.get("my-first-task").unwrap();
    normalize_times(&mut got);
    // What it used (where it had a cgroup of its own): numbers that vary, beside the
    // golden shape (upstream's `processStatus` has no such member).
    let usage = got["status"]
        .as_object_mut()
        .unwrap()
        .remove("usage")
        .expect("the usage of a task with a cgroup");
    assert!(
        usage["cpuSeconds"].is_number() && usage["memoryPeakBytes"].is_u64(),
        "{usage}"
    );
    // Environment values are not echoed (names only) unless --show-task-env.
    let golden = json!({
        "name": "my-first-task",
        "spec": {"process": {"command": ["sh", "-c"], "args": ["exit 0"],
                 "env": [{"name": "DEBUG_MODE"}], "workingDir": "/tmp"}},
        "status": {"state": {"terminated": {"exitCode": 0, "reason": "Succeeded",
                   "startedAt": "<time>", "finishedAt": "<time>"}}},
        "process": {"command": ["sh", "-c"], "args": ["exit 0"],
                    "env": [{"name": "DEBUG_MODE"}], "workingDir": "/tmp"},
        "processStatus": {"terminated": {"exitCode": 0, "reason": "Succeeded",
                          "startedAt": "<time>", "finishedAt": "<time>"}}
    });
    assert_eq!(got, golden);

    let list = a.request("GET", "/getTasks", None);
    assert_eq!(list.status, 200);
    let mut list = list.json();
    normalize_times(&mut list);
    list[0]["status"].as_object_mut().unwrap().remove("usage");
    assert_eq!(list, json!([golden]));
}

#[test]
fn upstream_wire_format_round_trips() {
    let a = Agent::start(&[]);
    // Exactly what the BatchSandbox controller sends: setTasks with a top-level process.
    let sent = json!([{"name": "bs-0", "process": {"command": ["/bin/sh"], "args": ["-c", "sleep 30"],
        "env": [{"name": "A", "value": "b"}], "timeoutSeconds": 60}}]);
    let r = a.request("POST", "/setTasks", Some(&sent));
    assert_eq!(r.status, 200, "{}", r.text());
    let running = a.wait_state("bs-0", "running", T);
    assert!(running["startedAt"].as_str().unwrap().ends_with('Z'));

    let mut got = a.request("GET", "/getTasks", None).json();
    normalize_times(&mut got);
    let t = &got[0];
    // The controller reads `name`, `process` and `processStatus` (and compares no env:
    // a listed task that exists is left alone, so values need not come back).
    assert_eq!(t["name"], "bs-0");
    assert_eq!(
        t["process"],
        json!({"command": ["/bin/sh"], "args": ["-c", "sleep 30"],
        "env": [{"name": "A"}], "timeoutSeconds": 60})
    );
    assert_eq!(
        t["processStatus"],
        json!({"running": {"startedAt": "<time>"}})
    );
    assert_eq!(t["status"]["state"], t["processStatus"]);
    // spec.timeoutSeconds (upstream's CRD place) is accepted too and shows up in `process`.
    let r = a.create(json!({"name": "crd-shape", "spec": {"timeoutSeconds": 5, "process": {"command": ["true"]}}}));
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["process"]["timeoutSeconds"], 5);
    // Clearing with [] deletes everything, as Client.Set(nil) expects.
    assert_eq!(a.request("POST", "/setTasks", Some(&json!([]))).status, 200);
    a.wait_gone("bs-0", T);
    a.wait_gone("crd-shape", T);
}

#[test]
fn status_codes() {
    let a = Agent::start(&["--max-body-bytes", "2048"]);
    let check = |r: http::Response, status: u16, code: &str| {
        assert_eq!(r.status, status, "{}", r.text());
        let v = r.json();
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    };
    let raw = |method: &str, path: &str, body: &[u8]| {
        http::request(a.addr, method, path, Some(body)).unwrap()
    };

    // Malformed JSON, no spec, an invalid spec, both runtimes at once, a misspelt
    // execMode, container mode off; and setTasks without an array.
    let bad: [(&str, &[u8]); 8] = [
        ("/tasks", b"{not json"),
        ("/tasks", b""),
        ("/tasks", br#"{"name":"x"}"#),
        (
            "/tasks",
            br#"{"name":"x","spec":{"process":{"command":[]}}}"#,
        ),
        (
            "/tasks",
            br#"{"name":"x","spec":{"process":{"command":["a"]},"container":{"image":"i"}}}"#,
        ),
        (
            "/tasks",
            br#"{"name":"x","spec":{"process":{"command":["a"],"execMode":"remote"}}}"#,
        ),
        (
            "/tasks",
            br#"{"name":"x","spec":{"container":{"image":"busybox"}}}"#,
        ),
        ("/setTasks", br#"{"name":"x"}"#),
    ];
    for (path, body) in bad {
        check(raw("POST", path, body), 400, "Bad Request");
    }
    check(a.request("GET", "/tasks/nope", None), 404, "Not Found");
    check(a.request("GET", "/nowhere", None), 404, "Not Found");
    check(a.request("GET", "/tasks/", None), 404, "Not Found");

    let r = a.request("GET", "/setTasks", None);
    assert_eq!(r.header("allow"), Some("POST"));
    check(r, 405, "Method Not Allowed");
    let r = a.request("POST", "/health", None);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    check(r, 405, "Method Not Allowed");
    let r = a.request("PUT", "/tasks/x", None);
    assert_eq!(r.header("allow"), Some("GET, HEAD, DELETE"));
    check(r, 405, "Method Not Allowed");
    let r = a.request("GET", "/tasks", None);
    assert_eq!(r.header("allow"), Some("POST"));
    check(r, 405, "Method Not Allowed");

    a.run("dup", &["sleep", "30"]);
    check(
        a.create(json!({"name": "dup", "spec": {"process": {"command": ["true"]}}})),
        409,
        "Conflict",
    );

    let big = format!(
        r#"{{"name":"big","spec":{{"process":{{"command":["echo","{}"]}}}}}}"#,
        "x".repeat(4096)
    );
    check(
        raw("POST", "/tasks", big.as_bytes()),
        413,
        "Request Entity Too Large",
    );
    // A body streamed without Content-Length is held to the same limit.
    let chunk = "x".repeat(3000);
    let req = format!(
        "POST /tasks HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    check(
        http::raw(a.addr, req.as_bytes()).unwrap(),
        413,
        "Request Entity Too Large",
    );

    // DELETE is idempotent: unknown names are fine.
    assert_eq!(
        a.request("DELETE", "/tasks/never-existed", None).status,
        204
    );
    assert_eq!(
        a.request("GET", "/health", None).json(),
        json!({"status": "healthy"})
    );
    assert_eq!(a.request("HEAD", "/health", None).status, 200);
}

#[test]
fn concurrency_limit_answers_429() {
    let a = Agent::start(&["--max-concurrent-tasks", "1"]);
    a.run("one", &["sleep", "30"]);
    let r = a.create(json!({"name": "two", "spec": {"process": {"command": ["true"]}}}));
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["code"], "Too Many Requests");
    a.delete("one");
    a.wait_gone("one", T);
    assert_eq!(
        a.create(json!({"name": "two", "spec": {"process": {"command": ["true"]}}}))
            .status,
        201
    );
}

#[test]
fn names_follow_kubernetes_rules() {
    let a = Agent::start(&[]);
    for bad in [
        "UPPER",
        "a_b",
        "-a",
        "a-",
        "..",
        ".",
        "a/b",
        "/etc/passwd",
        "a..b",
        &"a".repeat(254),
    ] {
        let r = a.create(json!({"name": bad, "spec": {"process": {"command": ["true"]}}}));
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
    }
    // Encoded traversal in the path never reaches the file system.
    for path in ["/tasks/%2E%2E", "/tasks/a%2Fb", "/tasks/..%2F..%2Fetc"] {
        assert_eq!(a.request("GET", path, None).status, 404, "{path}");
        assert_eq!(a.request("DELETE", path, None).status, 204, "{path}");
    }
    for good in ["a", "bs-0", "x.y-z", &"a".repeat(253)] {
        let r = a.create(json!({"name": good, "spec": {"process": {"command": ["true"]}}}));
        assert_eq!(r.status, 201, "{good:?}: {}", r.text());
    }
    // Nothing but the valid tasks' directories exists in the data dir.
    let mut dirs: Vec<String> = std::fs::read_dir(&a.data_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    dirs.sort();
    let mut want = vec![
        "a".to_string(),
        "bs-0".into(),
        "x.y-z".into(),
        "a".repeat(253),
    ];
    want.sort();
    assert_eq!(dirs, want);
}

#[test]
fn set_tasks_is_declarative_and_never_reruns() {
    let a = Agent::start(&[]);
    let marker = a.data_dir.parent().unwrap().join("runs");
    let counting = |name: &str| json!({"name": name, "process": {"command": ["sh", "-c", format!("echo {name} >> {}", marker.display())]}});
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([counting("a1"), counting("a2")])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let names: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().into())
        .collect();
    assert_eq!(names, ["a1", "a2"]);
    a.wait_state("a1", "terminated", T);
    a.wait_state("a2", "terminated", T);

    // Same list again, twice: nothing re-runs.
    for _ in 0..2 {
        assert_eq!(
            a.request(
                "POST",
                "/setTasks",
                Some(&json!([counting("a1"), counting("a2")]))
            )
            .status,
            200
        );
    }
    // a2 dropped, a3 added; a1 stays as it was.
    let before = a.get("a1").unwrap();
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([counting("a1"), counting("a3")])),
    );
    assert_eq!(r.status, 200);
    a.wait_gone("a2", T);
    a.wait_state("a3", "terminated", T);
    assert_eq!(a.get("a1").unwrap()["status"], before["status"]);
    let mut runs: Vec<String> = std::fs::read_to_string(&marker)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    runs.sort();
    assert_eq!(runs, ["a1", "a2", "a3"], "each task ran exactly once");

    // A bad element rejects the whole request and changes nothing.
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([counting("a4"), {"name": "Bad Name", "process": {"command": ["true"]}}])),
    );
    assert_eq!(r.status, 400);
    assert!(a.get("a4").is_none());
    assert!(a.get("a1").is_some() && a.get("a3").is_some());
    // `null` clears, like upstream.
    assert_eq!(
        http::request(a.addr, "POST", "/setTasks", Some(b"null"))
            .unwrap()
            .status,
        200
    );
    a.wait_gone("a1", T);
    a.wait_gone("a3", T);
}

#[test]
fn delete_shows_deletion_timestamp_then_disappears() {
    let a = Agent::start(&["--stop-grace-period", "5s"]);
    a.run_sh(
        "victim",
        "trap 'sleep 1; exit 0' TERM; while true; do sleep 0.1; done",
    );
    a.wait_state("victim", "running", T);
    a.delete("victim");
    let t = a.get("victim").expect("still visible while stopping");
    assert!(t["deletionTimestamp"].as_str().is_some(), "{t}");
    a.wait_gone("victim", T);
    assert!(
        !a.task_dir("victim").exists(),
        "state and logs are removed with the task"
    );
}

#[test]
fn malformed_input_sweep_leaves_agent_healthy() {
    let a = Agent::start(&["--max-body-bytes", "65536", "--request-timeout", "1s"]);
    let bodies: Vec<Vec<u8>> = vec![
        b"".to_vec(), b"{".to_vec(), b"[".to_vec(), b"null".to_vec(), b"42".to_vec(), b"\"s\"".to_vec(),
        b"{\"name\":1}".to_vec(), b"{\"name\":\"a\",\"spec\":[]}".to_vec(),
        b"{\"name\":\"a\",\"spec\":{\"process\":{\"command\":\"true\"}}}".to_vec(),
        b"{\"name\":\"a\",\"spec\":{\"process\":{\"command\":[\"a\\u0000b\"]}}}".to_vec(),
        b"{\"name\":\"a\",\"spec\":{\"process\":{\"command\":[\"true\"],\"env\":[{\"name\":\"\"}]}}}".to_vec(),
        b"{\"name\":\"a\",\"spec\":{\"process\":{\"command\":[\"true\"],\"workingDir\":\"rel\"}}}".to_vec(),
        b"{\"name\":\"a\",\"podTemplateSpec\":{\"spec\":{}}}".to_vec(),
        vec![0xff, 0xfe, 0x00, 0x01],
        "[".repeat(10_000).into_bytes(),
        format!("{{\"name\":\"{}\"}}", "a".repeat(60_000)).into_bytes(),
    ];
    for body in &bodies {
        for path in ["/tasks", "/setTasks"] {
            if path == "/setTasks" && body == b"null" {
                continue; // upstream's way of saying "no tasks"
            }
            let r = http::request(a.addr, "POST", path, Some(body)).unwrap();
            assert!(
                (400..500).contains(&r.status),
                "{path} {:?}: {} {}",
                String::from_utf8_lossy(&body[..body.len().min(40)]),
                r.status,
                r.text()
            );
            r.json(); // always a JSON error body
        }
    }
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /tasks/%ZZ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\nConnection: close\r\n\r\n",
    ] {
        let _ = http::raw(a.addr, raw); // any answer, or a closed connection, is fine
    }
    // A body that never arrives in full is cut off (slowloris), not waited for forever.
    let t0 = std::time::Instant::now();
    let r = http::raw(
        a.addr,
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"a\"",
    )
    .unwrap();
    assert_eq!(r.status, 408, "{}", r.text());
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(a.request("GET", "/health", None).status, 200);
    assert_eq!(a.request("GET", "/getTasks", None).json(), json!([]));
    a.run("still-works", &["true"]);
    let t = a.wait_state("still-works", "terminated", T);
    assert_eq!(t["exitCode"], 0);
    let leftover: Vec<Value> = a
        .request("GET", "/getTasks", None)
        .json()
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(leftover.len(), 1);
}

#[test]
fn get_with_wait_answers_when_the_task_terminates() {
    let a = Agent::start(&[]);
    a.run("short", &["sleep", "1"]);
    a.run("long", &["sleep", "30"]);
    let t0 = std::time::Instant::now();
    let r = a.request("GET", "/tasks/short?wait=20s", None);
    assert_eq!(r.status, 200);
    assert!(
        r.json()["status"]["state"].get("terminated").is_some(),
        "{}",
        r.text()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "answered at the exit, not at the deadline"
    );
    // Already terminated: answers at once.
    let t0 = std::time::Instant::now();
    assert_eq!(a.request("GET", "/tasks/short?wait=20s", None).status, 200);
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Still running at the deadline: answers with the running task.
    let t0 = std::time::Instant::now();
    let r = a.request("GET", "/tasks/long?wait=300ms", None);
    assert!(
        r.json()["status"]["state"].get("running").is_some(),
        "{}",
        r.text()
    );
    assert!(t0.elapsed() >= Duration::from_millis(300));
    // A deletion mark also ends the wait.
    let addr = a.addr;
    let waiter = std::thread::spawn(move || {
        http::request(addr, "GET", "/tasks/long?wait=20s", None).unwrap()
    });
    std::thread::sleep(Duration::from_millis(200));
    a.delete("long");
    let r = waiter.join().unwrap();
    assert!(
        r.status == 404 || r.json()["deletionTimestamp"].is_string(),
        "{}",
        r.text()
    );
    assert_eq!(a.request("GET", "/tasks/short?wait=soon", None).status, 400);
    assert_eq!(a.request("GET", "/tasks/nope?wait=1s", None).status, 404);
}

/// A list longer than one piece of the stream (64 KiB) is sent chunked, as one JSON array
/// in name order whose elements are the tasks' own answers; a short one keeps its length.
#[test]
fn a_long_task_list_is_streamed_whole_and_in_order() {
    let a = Agent::start(&[]);
    a.run("short", &["true"]);
    a.wait_state("short", "terminated", T);
    let short = a.request("GET", "/getTasks", None);
    assert!(
        short.header("content-length").is_some(),
        "{:?}",
        short.headers
    );
    assert!(short.body.ends_with(b"]\n"));

    // 120 tasks of about 1 KiB each: the list is two pieces.
    let arg = "x".repeat(1000);
    let mut sent: Vec<Value> = (0..120)
        .map(|i| json!({"name": format!("t-{i:03}"), "process": {"command": ["true", arg]}}))
        .collect();
    // setTasks deletes what it does not list.
    sent.push(json!({"name": "short", "process": {"command": ["true"]}}));
    let r = a.request("POST", "/setTasks", Some(&Value::Array(sent)));
    assert_eq!(r.status, 200, "{}", r.text());
    for i in 0..120 {
        a.wait_state(&format!("t-{i:03}"), "terminated", T);
    }
    let list = a.request("GET", "/getTasks", None);
    assert_eq!(list.status, 200);
    assert_eq!(list.header("content-type"), Some("application/json"));
    assert_eq!(
        list.header("transfer-encoding"),
        Some("chunked"),
        "{:?}",
        list.headers
    );
    assert!(list.body.len() > 120 * 1000);
    assert!(list.body.ends_with(b"]\n"));
    let tasks = list.json();
    let tasks = tasks.as_array().unwrap();
    let names: Vec<&str> = tasks.iter().map(|t| t["name"].as_str().unwrap()).collect();
    let mut want: Vec<String> = (0..120).map(|i| format!("t-{i:03}")).collect();
    want.push("short".into());
    want.sort();
    assert_eq!(names, want);
    for t in tasks {
        let name = t["name"].as_str().unwrap();
        assert_eq!(
            &a.get(name).unwrap(),
            t,
            "{name} as listed and as read alone"
        );
    }
}

#[test]
fn env_values_are_echoed_only_when_the_operator_asks() {
    let task = json!({"name": "secretive", "spec": {"process": {
        "command": ["printenv", "API_KEY"],
        "env": [{"name": "API_KEY", "value": "s3cr3t"}, {"name": "EMPTY", "value": ""}]}}});
    let hidden = Agent::start(&[]);
    let shown = Agent::start(&["--show-task-env"]);
    for (a, show) in [(&hidden, false), (&shown, true)] {
        let created = a.create(task.clone());
        assert_eq!(created.status, 201, "{}", created.text());
        let done = a.wait_state("secretive", "terminated", T);
        // The task itself got the value.
        assert_eq!(done["exitCode"], 0, "{done}");
        assert_eq!(a.stdout("secretive"), "s3cr3t\n");
        let synced = a.request("POST", "/setTasks", Some(&json!([task])));
        assert_eq!(synced.status, 200, "{}", synced.text());
        let answers = [
            created.text(),
            a.request("GET", "/tasks/secretive", None).text(),
            a.request("GET", "/getTasks", None).text(),
            synced.text(),
        ];
        for text in answers {
            assert_eq!(text.contains("s3cr3t"), show, "{text}");
            let v: Value = serde_json::from_str(&text).unwrap();
            let t = if v.is_array() { &v[0] } else { &v };
            let want = if show {
                json!([{"name": "API_KEY", "value": "s3cr3t"}, {"name": "EMPTY"}])
            } else {
                json!([{"name": "API_KEY"}, {"name": "EMPTY"}])
            };
            assert_eq!(t["spec"]["process"]["env"], want, "{t}");
            assert_eq!(t["process"]["env"], want, "{t}");
        }
    }
}

/// A raw `POST /tasks` of a task named `name`, complete with its body.
fn post_task_bytes(name: &str) -> Vec<u8> {
    let body = json!({"name": name, "spec": {"process": {"command": ["true"]}}}).to_string();
    format!(
        "POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn a_complete_request_is_carried_out_when_its_client_closes_and_answered_on_a_half_close() {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};
    let a = Agent::start(&[]);
    // Half-closed (SHUT_WR) right after sending: the answer still comes.
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.write_all(&post_task_bytes("half-closed")).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let r = http::parse(&answer).unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["name"], "half-closed");
    // Closed right after sending: nobody reads the answer, but the task is created.
    let names: Vec<String> = (0..5).map(|i| format!("closed-{i}")).collect();
    for name in &names {
        let mut s = TcpStream::connect(a.addr).unwrap();
        s.write_all(&post_task_bytes(name)).unwrap();
    }
    for name in &names {
        crate::support::wait_for(T, "the task of a closed client", || a.get(name));
    }
}

/// Every answer is in the access log and the request counter, whatever gave it: the
/// router (404, 405), the body limit (413), or hyper itself, to a request head it can't
/// parse (400) or that is past its buffer (431), where neither method nor route is known.
#[test]
fn refused_requests_are_logged_and_counted_like_any_other() {
    let a = Agent::start(&["--max-body-bytes", "2048"]);
    assert_eq!(a.request("PUT", "/tasks/x", None).status, 405);
    assert_eq!(a.request("GET", "/nowhere", None).status, 404);
    let big = "x".repeat(4096);
    let r = http::request(a.addr, "POST", "/tasks", Some(big.as_bytes())).unwrap();
    assert_eq!(r.status, 413);
    let bad_length =
        b"POST /tasks HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\nConnection: close\r\n\r\n";
    assert_eq!(http::raw(a.addr, bad_length).unwrap().status, 400);
    // hyper's buffer for a request head is about 400 KiB. It answers 431 and closes, so
    // the client may see a reset while it is still sending.
    let huge = format!(
        "GET /getTasks HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "x".repeat(512 * 1024)
    );
    if let Ok(r) = http::raw(a.addr, huge.as_bytes()) {
        assert_eq!(r.status, 431);
    }

    let answers = [
        ("PUT", "/tasks/{name}", 405),
        ("GET", "unmatched", 404),
        ("POST", "/tasks", 413),
        ("unknown", "unmatched", 400),
        ("unknown", "unmatched", 431),
    ];
    crate::support::wait_for(T, "an access line per answer", || {
        let lines = crate::support::access_lines(&a.log_text());
        answers
            .iter()
            .all(|(m, route, s)| {
                lines
                    .iter()
                    .any(|l| crate::support::access_line_of(l, m, route, *s))
            })
            .then_some(())
    });
    let metrics = a.call("GET", "/metrics", None).text();
    for (m, route, s) in answers {
        let n = crate::support::http_requests(&metrics, m, route, s);
        assert_eq!(n, 1.0, "{m} {route} {s}: {metrics}");
    }
}

#[test]
fn a_long_poll_whose_client_closes_frees_its_connection() {
    use std::io::Write;
    use std::net::TcpStream;
    let a = Agent::start(&["--max-connections=1"]);
    // The start-up probe's connection may still hold the only slot for a moment
    // (the agent then answers 503 and closes), so the create is retried until it
    // gets through; a refused connection never reaches the handler, so no retry
    // can create the task twice.
    let body = serde_json::to_vec(
        &json!({"name": "sleeper", "spec": {"process": {"command": ["sleep", "1000"]}}}),
    )
    .unwrap();
    crate::support::wait_for(Duration::from_secs(30), "the create to get a slot", || {
        http::request(a.addr, "POST", "/tasks", Some(&body))
            .ok()
            .filter(|r| r.status == 201)
    });
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.write_all(b"GET /tasks/sleeper?wait=5m HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    drop(s);
    // The only slot comes free long before the 5 minutes.
    crate::support::wait_for(Duration::from_secs(30), "a free connection slot", || {
        http::request(a.addr, "GET", "/health", None)
            .ok()
            .filter(|r| r.status == 200)
    });
    // The probe's own connection may hold the slot for a moment after its answer
    // (as at the start), so the delete is retried while it is refused with 503;
    // a refused connection never reaches the handler.
    let deleted =
        crate::support::wait_for(Duration::from_secs(30), "the delete to get a slot", || {
            http::request(a.addr, "DELETE", "/tasks/sleeper", None)
                .ok()
                .filter(|r| r.status != 503)
        });
    assert_eq!(deleted.status, 204, "delete sleeper: {}", deleted.text());
}
