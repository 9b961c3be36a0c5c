//! `--auth-mode none|token` against the real binary: who gets in, what a refusal looks
//! like, token rotation without a restart, and that no token reaches the log.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::support::agent::{Agent, BIN, free_addr};
use crate::support::http::{self, Response, with_token as call};
use crate::support::wait_for;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn task(name: &str) -> String {
    json!({"name": name, "spec": {"process": {"command": ["true"]}}}).to_string()
}

/// A refusal as the issue asks: 401, `WWW-Authenticate: Bearer`, the usual JSON error.
fn assert_unauthorized(r: &Response, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert_eq!(r.header("www-authenticate"), Some("Bearer"), "{what}");
    let body = r.json();
    assert_eq!(body["code"], "Unauthorized", "{what}: {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {body}"
    );
}

/// An agent in token mode with `tokens` in its token file (0600, as the chart mounts it).
fn token_agent(tokens: &str) -> (Agent, tempfile::TempDir, std::path::PathBuf) {
    token_agent_with(tokens, &[])
}

fn token_agent_with(
    tokens: &str,
    extra: &[&str],
) -> (Agent, tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, tokens).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
    std::fs::set_permissions(&file, mode).unwrap();
    let mut args = vec![
        "--auth-mode=token",
        "--auth-token-file",
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    (agent, dir, file)
}

#[test]
fn token_mode_refuses_without_the_token_and_serves_with_it() {
    let (agent, _dir, _file) = token_agent("# callers\n\ntoken-for-the-controller\n");
    let a = agent.addr;
    let good = Some("token-for-the-controller");

    // Probes stay open.
    for path in ["/health", "/readyz"] {
        assert_eq!(call(a, "GET", path, None, None).status, 200, "{path}");
    }
    // Every other route, known or not, needs the token; a refused request changes nothing.
    let routes = [
        ("POST", "/tasks", Some(task("refused"))),
        ("POST", "/setTasks", Some(format!("[{}]", task("refused")))),
        ("GET", "/tasks/refused", None),
        ("GET", "/getTasks", None),
        ("DELETE", "/tasks/refused", None),
        ("GET", "/no-such-route", None),
        ("PUT", "/tasks", None),
    ];
    for (method, path, body) in &routes {
        let what = format!("{method} {path}");
        assert_unauthorized(
            &call(a, method, path, None, body.as_deref()),
            &format!("{what} without a token"),
        );
        assert_unauthorized(
            &call(
                a,
                method,
                path,
                Some("token-for-the-controller-2"),
                body.as_deref(),
            ),
            &format!("{what} with a wrong token"),
        );
    }
    assert!(
        !agent.task_dir("refused").exists(),
        "a refused request created a task"
    );

    // With the token: the API as usual.
    let r = call(a, "POST", "/tasks", good, Some(&task("hello")));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = call(a, "GET", "/tasks/hello?wait=20s", good, None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.json()["status"]["state"]["terminated"].is_object(),
        "{}",
        r.text()
    );
    let r = call(a, "GET", "/getTasks", good, None);
    assert_eq!(r.status, 200);
    let names: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["hello"], "refused requests left tasks behind");
    assert_eq!(call(a, "DELETE", "/tasks/hello", good, None).status, 204);
    // Unknown paths and wrong methods answer as before, once authenticated.
    assert_eq!(call(a, "GET", "/no-such-route", good, None).status, 404);
    assert_eq!(call(a, "PUT", "/tasks", good, None).status, 405);
    // The scheme is case-insensitive, as in Kubernetes.
    let raw = format!(
        "GET /getTasks HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\nAuthorization: bearer token-for-the-controller\r\n\r\n"
    );
    assert_eq!(http::raw(a, raw.as_bytes()).unwrap().status, 200);

    let log = agent.log_text();
    assert!(
        !log.contains("token-for-the-controller"),
        "a token reached the log:\n{log}"
    );
}

#[test]
fn refusals_are_logged_and_counted_like_any_answer() {
    let (agent, _dir, _file) = token_agent("the-only-token\n");
    let a = agent.addr;
    let r = call(a, "POST", "/tasks", None, Some(&task("x")));
    assert_unauthorized(&r, "no token");
    let r = call(a, "GET", "/tasks/x", Some("a-wrong-token-4711"), None);
    assert_unauthorized(&r, "a wrong token");
    let lines = wait_for(T, "the refusals' access lines", || {
        let lines = crate::support::access_lines(&agent.log_text());
        let seen = |m, route| {
            lines
                .iter()
                .any(|l| crate::support::access_line_of(l, m, route, 401))
        };
        (seen("POST", "/tasks") && seen("GET", "/tasks/{name}")).then_some(lines)
    });
    assert!(
        !agent.log_text().contains("a-wrong-token-4711"),
        "a token reached the log: {lines:#?}"
    );
    let metrics = call(a, "GET", "/metrics", Some("the-only-token"), None);
    assert_eq!(metrics.status, 200);
    let metrics = metrics.text();
    for (m, route) in [("POST", "/tasks"), ("GET", "/tasks/{name}")] {
        let n = crate::support::http_requests(&metrics, m, route, 401);
        assert_eq!(n, 1.0, "{m} {route}: {metrics}");
    }
}

#[test]
fn tokens_rotate_without_a_restart() {
    let (agent, _dir, file) = token_agent("old-token\n");
    let pid = agent.pid();
    let a = agent.addr;
    let status = |token: &str| call(a, "GET", "/getTasks", Some(token), None).status;
    assert_eq!(status("old-token"), 200);
    assert_eq!(status("new-token"), 401);

    // Step 1: both listed; step 2: the old one removed.
    std::fs::write(&file, "old-token\nnew-token\n").unwrap();
    assert_eq!(status("old-token"), 200);
    assert_eq!(status("new-token"), 200);
    std::fs::write(&file, "new-token\n").unwrap();
    assert_eq!(status("old-token"), 401);
    assert_eq!(status("new-token"), 200);

    // As kubelet updates a Secret volume: a symlink swapped to a new file.
    let dir = file.parent().unwrap();
    std::fs::write(dir.join("v2"), "newer-token\n").unwrap();
    std::os::unix::fs::symlink(dir.join("v2"), dir.join("tokens.tmp")).unwrap();
    std::fs::rename(dir.join("tokens.tmp"), &file).unwrap();
    assert_eq!(status("newer-token"), 200);
    assert_eq!(status("new-token"), 401);

    // A file that goes away, or turns empty, keeps the last good set in force.
    std::fs::remove_file(&file).unwrap();
    assert_eq!(status("newer-token"), 200);
    std::fs::write(&file, "# emptied by mistake\n").unwrap();
    assert_eq!(status("newer-token"), 200);
    assert_eq!(agent.pid(), pid, "the agent restarted");
    let log = agent.log_text();
    assert!(log.contains("token file is gone"), "{log}");
    assert!(log.contains("lists no token"), "{log}");
    for t in ["old-token", "new-token", "newer-token"] {
        assert!(!log.contains(t), "token {t} reached the log");
    }
}

/// Runs the binary with `args` until it exits (it must, within 20 s); returns its output.
fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_addr().to_string();
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-addr", &addr])
        .args(args)
        .env_remove("POD_NAMESPACE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for(Duration::from_secs(20), "the agent to exit", || {
        child.try_wait().unwrap()
    });
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (status, text)
}

#[test]
fn a_missing_or_empty_token_file_keeps_the_agent_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "# no tokens yet\n\n").unwrap();
    let missing_arg = missing.to_str().unwrap();
    let empty_arg = empty.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--auth-mode=token", "--auth-token-file", missing_arg],
            "No such file",
        ),
        (
            &["--auth-mode=token", "--auth-token-file", empty_arg],
            "no token",
        ),
        (&["--auth-mode=token"], "needs --auth-token-file"),
        // A token file without token mode would look protected and be open.
        (
            &["--auth-token-file", empty_arg],
            "--auth-mode is not token",
        ),
        (&["--auth-mode=kubernetes"], "needs POD_NAMESPACE"),
    ];
    for (args, why) in cases {
        let (status, out) = run_to_exit(args);
        assert!(!status.success(), "{args:?} started");
        assert!(out.contains(why), "{args:?}: expected {why:?} in:\n{out}");
    }
}

#[test]
fn no_auth_stays_the_default_and_warns_only_beyond_loopback() {
    // Loopback: open, as upstream, and no warning.
    let agent = Agent::start(&[]);
    let r = agent.call("POST", "/tasks", Some(&task("open")));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        !agent.log_text().contains("no authentication"),
        "{}",
        agent.log_text()
    );

    // All addresses: one warning at start.
    let dir = tempfile::tempdir().unwrap();
    let port = free_addr().port();
    let log = dir.path().join("log");
    let mut child = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen-addr", &format!("0.0.0.0:{port}")])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let local: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for(T, "agent /health", || {
        http::request(local, "GET", "/health", None)
            .ok()
            .filter(|r| r.status == 200)
    });
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.matches("no authentication").count(), 1, "{text}");
}

/// A GET on a kept-alive connection; the answer's status line, or `None` once the agent
/// has closed the connection.
fn keep_alive_get(s: &mut TcpStream, path: &str, token: Option<&str>) -> Option<String> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Until the header and as many body bytes as it announces have come.
    let complete = |buf: &[u8]| {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))?
            .trim()
            .parse()
            .ok()?;
        (buf.len() >= end + 4 + len).then_some(())
    };
    while complete(&buf).is_none() {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.lines().next().map(str::to_string)
}

/// Whether the agent closed `s` (EOF within the read timeout).
fn closed_by_agent(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(T)).unwrap();
    matches!(s.read(&mut [0u8; 64]), Ok(0) | Err(_))
}

#[test]
fn idle_unauthenticated_connections_never_keep_an_authenticated_caller_out() {
    let (agent, _dir, _file) = token_agent_with(
        "the-token\n",
        &[
            "--max-connections=4",
            "--idle-timeout=1h",
            "--header-read-timeout=1h",
        ],
    );
    let addr = agent.addr;
    // Every slot held without a credential: kept-alive probes and silent sockets.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 0 {
                let status = keep_alive_get(&mut s, "/health", None);
                assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
            }
            s
        })
        .collect();
    // A caller with the token is served, again and again, on new connections.
    for _ in 0..6 {
        let r = call(addr, "GET", "/getTasks", Some("the-token"), None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // The oldest were closed for them.
    assert!(closed_by_agent(&mut held[0]));

    // An authenticated connection is never taken: with every slot proven, a newcomer
    // is refused (503) and the proven ones keep working.
    let mut proven: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(addr).unwrap();
            let status = keep_alive_get(&mut s, "/getTasks", Some("the-token"));
            assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
            s
        })
        .collect();
    let r = call(addr, "GET", "/getTasks", Some("the-token"), None);
    assert_eq!(r.status, 503, "{}", r.text());
    for s in &mut proven {
        let status = keep_alive_get(s, "/getTasks", Some("the-token"));
        assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    }
    drop(held);
}

#[test]
fn an_idle_connection_that_never_authenticated_is_closed_first() {
    let (agent, _dir, _file) = token_agent_with(
        "the-token\n",
        &["--idle-timeout=1h", "--header-read-timeout=1s"],
    );
    let addr = agent.addr;
    let mut proven = TcpStream::connect(addr).unwrap();
    let status = keep_alive_get(&mut proven, "/getTasks", Some("the-token"));
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    let mut probe = TcpStream::connect(addr).unwrap();
    let status = keep_alive_get(&mut probe, "/health", None);
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
    // The probe's connection goes after --header-read-timeout, not --idle-timeout...
    assert!(closed_by_agent(&mut probe));
    // ...while the authenticated one, idle for longer, is still served.
    let status = keep_alive_get(&mut proven, "/getTasks", Some("the-token"));
    assert_eq!(status.as_deref(), Some("HTTP/1.1 200 OK"));
}
