//! `GET /tasks/{name}/logs` against the real agent and real tasks: every parameter, follow
//! to the end with nothing lost (compared with the log files), rotation, a client that
//! goes away, idle followers, and sidecar tasks in a stand-in main container. (Container
//! tasks are in tests/containerd/container.rs, beside the other tests of the shared containerd.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::agent::Agent;
use crate::support::containerd::{self, BUSYBOX};
use crate::support::standin::MainContainer;
use crate::support::wait_for;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn logs(a: &Agent, name: &str, query: &str) -> (u16, String) {
    let r = a.call("GET", &format!("/tasks/{name}/logs{query}"), None);
    (r.status, r.text())
}

fn logs_ok(a: &Agent, name: &str, query: &str) -> String {
    let r = a.call("GET", &format!("/tasks/{name}/logs{query}"), None);
    assert_eq!(r.status, 200, "{query}: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; charset=utf-8"),
        "{query}"
    );
    r.text()
}

fn file(a: &Agent, name: &str, f: &str) -> String {
    std::fs::read_to_string(a.task_dir(name).join(f)).unwrap_or_default()
}

/// A raw follow request: the connection stays open until the agent ends the answer.
struct Follow {
    s: TcpStream,
}

impl Follow {
    fn start(a: &Agent, name: &str, query: &str) -> Follow {
        let mut s = TcpStream::connect(a.addr).unwrap();
        write!(
            s,
            "GET /tasks/{name}/logs{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        Follow { s }
    }

    /// Reads up to the end of the answer's head; returns the status line.
    fn head(&mut self) -> String {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        self.s
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(self.s.read(&mut b).unwrap(), 1, "answer head cut short");
            head.push(b[0]);
        }
        String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap()
            .to_string()
    }

    /// Reads the whole answer (the agent ends it); the decoded body.
    fn body(self, within: Duration) -> String {
        let mut s = self.s;
        s.set_read_timeout(Some(within)).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .expect("the agent ends a follow once the task has terminated");
        let resp = crate::support::http::parse(&raw).unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.text()
    }
}

#[test]
fn each_parameter_selects_what_kubelet_would() {
    let a = Agent::start(&[]);
    // Sleeps between the streams make the arrival order certain.
    a.run_sh(
        "p",
        "echo out-1; sleep 0.1; echo err-1 >&2; sleep 0.1; echo out-2; sleep 0.1; \
         echo err-2 >&2; sleep 0.1; printf 'out-3 no newline'",
    );
    a.wait_state("p", "terminated", T);
    assert_eq!(
        logs_ok(&a, "p", ""),
        "out-1\nerr-1\nout-2\nerr-2\nout-3 no newline"
    );
    assert_eq!(logs_ok(&a, "p", "?stream=all"), logs_ok(&a, "p", ""));
    // One stream is its file, byte for byte.
    assert_eq!(
        logs_ok(&a, "p", "?stream=stdout"),
        file(&a, "p", "stdout.log")
    );
    assert_eq!(
        logs_ok(&a, "p", "?stream=stderr"),
        file(&a, "p", "stderr.log")
    );
    assert_eq!(file(&a, "p", "stderr.log"), "err-1\nerr-2\n");
    assert_eq!(logs_ok(&a, "p", "?tailLines=2"), "err-2\nout-3 no newline");
    assert_eq!(logs_ok(&a, "p", "?tailLines=1&stream=stderr"), "err-2\n");
    assert_eq!(logs_ok(&a, "p", "?tailLines=0"), "");
    assert_eq!(logs_ok(&a, "p", "?tailLines=100"), logs_ok(&a, "p", ""));
    assert_eq!(logs_ok(&a, "p", "?limitBytes=8"), "out-1\ner");
    assert_eq!(logs_ok(&a, "p", "?limitBytes=8&tailLines=1"), "out-3 no");
    assert_eq!(logs_ok(&a, "p", "?follow=false"), logs_ok(&a, "p", ""));

    // timestamps: an RFC 3339 time and a space before each line, in arrival order,
    // within the task's run.
    let stamped = logs_ok(&a, "p", "?timestamps=true");
    let mut times = Vec::new();
    let mut text = String::new();
    for line in stamped.split_inclusive('\n') {
        let (t, rest) = line.split_once(' ').unwrap();
        times.push(
            t.parse::<jiff::Timestamp>()
                .unwrap_or_else(|e| panic!("{t}: {e}")),
        );
        text.push_str(rest);
    }
    assert_eq!(text, logs_ok(&a, "p", ""));
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{stamped}");
    assert!(
        times[4].duration_since(times[0]).as_secs_f64() >= 0.3,
        "{stamped}"
    );
    let t = a.get("p").unwrap();
    let started: jiff::Timestamp = t["status"]["state"]["terminated"]["startedAt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(times[0] >= started, "{} < {started}", times[0]);

    // sinceTime: from the third line's time on.
    let since = times[2].to_string();
    assert_eq!(
        logs_ok(&a, "p", &format!("?sinceTime={since}")),
        "out-2\nerr-2\nout-3 no newline"
    );
    assert_eq!(logs_ok(&a, "p", "?sinceSeconds=3600"), logs_ok(&a, "p", ""));

    // Bad parameters: 400 naming the parameter; unknown task 404; wrong method 405.
    for q in [
        "?stream=both",
        "?follow=yes",
        "?tailLines=-1",
        "?tailLines=ten",
        "?limitBytes=0",
        "?sinceSeconds=0",
        "?sinceTime=yesterday",
        "?sinceSeconds=1&sinceTime=2026-01-01T00:00:00Z",
    ] {
        let (status, body) = logs(&a, "p", q);
        assert_eq!(status, 400, "{q}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], "Bad Request");
        let key = q[1..].split('=').next().unwrap();
        assert!(v["message"].as_str().unwrap().contains(key), "{q}: {body}");
    }
    assert_eq!(logs(&a, "nope", "").0, 404);
    let r = a.call("POST", "/tasks/p/logs", Some(""));
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
}

#[test]
fn since_seconds_keeps_the_recent_lines() {
    let a = Agent::start(&[]);
    a.run_sh("s", "echo early; sleep 4; echo late");
    a.wait_state("s", "terminated", T);
    // The early line is 4 s old or more; the late one was written just now.
    assert_eq!(logs_ok(&a, "s", "?sinceSeconds=2"), "late\n");
}

#[test]
fn follow_ends_at_termination_with_every_byte_of_the_files() {
    let a = Agent::start(&[]);
    a.run_sh(
        "chatty",
        "i=0; while [ $i -lt 400 ]; do echo \"o $i\"; echo \"e $i\" >&2; \
         i=$((i+1)); [ $((i % 50)) = 0 ] && sleep 0.1; done; printf 'o last'",
    );
    let all = Follow::start(&a, "chatty", "?follow=true");
    let out = Follow::start(&a, "chatty", "?follow=true&stream=stdout");
    let err = Follow::start(&a, "chatty", "?follow=true&stream=stderr&timestamps=true");
    let (all, out, err) = (all.body(T), out.body(T), err.body(T));
    // Every answer ended because the task did, and holds what its files hold.
    assert!(a.get("chatty").unwrap()["status"]["state"]["terminated"].is_object());
    let stdout = file(&a, "chatty", "stdout.log");
    let stderr = file(&a, "chatty", "stderr.log");
    assert!(stdout.ends_with("o 399\no last"), "{stdout}");
    assert_eq!(out, stdout);
    let err_text: String = err
        .split_inclusive('\n')
        .map(|l| l.split_once(' ').unwrap().1)
        .collect();
    assert_eq!(err_text, stderr);
    // Interleaved: each stream's lines in its own order, nothing lost or repeated.
    let of = |prefix: &str| -> String {
        all.split_inclusive('\n')
            .filter(|l| l.starts_with(prefix))
            .collect()
    };
    assert_eq!(of("o "), stdout);
    assert_eq!(of("e "), stderr);
    assert_eq!(all.len(), stdout.len() + stderr.len());
    // A follower of a task that already ended gets everything at once.
    assert_eq!(
        Follow::start(&a, "chatty", "?follow=true&stream=stdout").body(T),
        stdout
    );
    // A tail that follows: the last lines, then nothing more as the task has ended.
    assert_eq!(
        Follow::start(&a, "chatty", "?follow=true&tailLines=2&stream=stdout").body(T),
        "o 399\no last"
    );
}

#[test]
fn reads_across_rotation() {
    // 4 KiB per stream: each file holds 2 KiB, older output goes to stdout.log.1.
    let a = Agent::start(&["--max-log-bytes", "4096"]);
    let follow = {
        a.run_sh(
            "rot",
            "i=0; while [ $i -lt 1000 ]; do printf 'line %05d\\n' $i; i=$((i+1)); \
             [ $((i % 40)) = 0 ] && sleep 0.02; done",
        );
        Follow::start(&a, "rot", "?follow=true")
    };
    let followed = follow.body(T);
    a.wait_state("rot", "terminated", T);
    let old = file(&a, "rot", "stdout.log.1");
    let cur = file(&a, "rot", "stdout.log");
    assert!(!old.is_empty() && old.len() + cur.len() <= 4096);
    let kept = format!("{old}{cur}");
    assert!(kept.ends_with("line 00999\n"));
    assert_eq!(logs_ok(&a, "rot", ""), kept, "`.1` then the current file");
    assert_eq!(
        logs_ok(&a, "rot", "?tailLines=3"),
        "line 00997\nline 00998\nline 00999\n"
    );
    // The follower saw lines in order, never twice, up to the end: all that is kept and
    // whatever it read before it was rotated away.
    let nums: Vec<u32> = followed
        .lines()
        .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
        .collect();
    assert!(nums.windows(2).all(|w| w[0] < w[1]), "{followed}");
    assert!(followed.ends_with(&kept), "follower missed kept output");
}

/// The agent's open fds, and the watches of its inotify instance.
fn fds_and_watches(pid: i32) -> (usize, usize) {
    let mut fds = 0;
    let mut watches = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        fds += 1;
        if std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == "anon_inode:inotify") {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                e.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            watches += info
                .lines()
                .filter(|l| l.starts_with("inotify wd:"))
                .count();
        }
    }
    (fds, watches)
}

#[test]
fn a_client_that_goes_away_frees_its_follower() {
    let a = Agent::start(&[]);
    a.run_sh("idle", "echo ready; exec sleep 1000");
    wait_for(T, "first line", || {
        (logs_ok(&a, "idle", "") == "ready\n").then_some(())
    });
    // A first follower sets up the agent's one inotify instance, which stays.
    let mut first = Follow::start(&a, "idle", "?follow=true");
    assert!(first.head().contains("200"));
    drop(first);
    let before = wait_for(T, "first follower released", || {
        Some(fds_and_watches(a.pid())).filter(|(_, w)| *w == 0)
    });

    let mut followers: Vec<Follow> = (0..20)
        .map(|_| Follow::start(&a, "idle", "?follow=true"))
        .collect();
    for f in &mut followers {
        assert!(f.head().contains("200"));
    }
    let during = fds_and_watches(a.pid());
    assert_eq!(during.1, 1, "followers of one task share one watch");
    assert!(during.0 >= before.0 + 20, "{during:?} vs {before:?}");
    drop(followers);
    let after = wait_for(T, "followers released", || {
        let now = fds_and_watches(a.pid());
        (now.0 <= before.0 && now.1 == 0).then_some(now)
    });
    assert_eq!(after.1, 0);
    // The task and the agent are unaffected.
    assert!(a.get("idle").unwrap()["status"]["state"]["running"].is_object());
    assert_eq!(logs_ok(&a, "idle", ""), "ready\n");
}

/// CPU ticks (user + system) the process has used.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn idle_followers_cost_no_cpu() {
    let a = Agent::start(&[]);
    for i in 0..10 {
        a.run_sh(&format!("idle-{i}"), "exec sleep 1000");
        a.wait_state(&format!("idle-{i}"), "running", T);
    }
    let mut followers: Vec<Follow> = (0..100)
        .map(|i| Follow::start(&a, &format!("idle-{}", i % 10), "?follow=true"))
        .collect();
    for f in &mut followers {
        assert!(f.head().contains("200"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(a.pid());
    std::thread::sleep(Duration::from_secs(5));
    let used = cpu_ticks(a.pid()) - before;
    // Nothing polls: a follower waits on file events and the task's end. (Polling 100
    // followers even ten times a second would cost many ticks; the bench prints this.)
    assert!(used <= 1, "{used} CPU ticks in 5 s with 100 idle followers");
    drop(followers);
}

#[test]
fn a_deleted_task_has_no_logs_and_its_followers_end() {
    let a = Agent::start(&["--stop-grace-period", "1s"]);
    a.run_sh("gone", "echo bye; exec sleep 1000");
    wait_for(T, "output", || {
        (logs_ok(&a, "gone", "") == "bye\n").then_some(())
    });
    let follow = Follow::start(&a, "gone", "?follow=true");
    let t0 = Instant::now();
    a.delete("gone");
    assert_eq!(follow.body(T), "bye\n");
    assert!(t0.elapsed() < T);
    a.wait_gone("gone", T);
    assert_eq!(logs(&a, "gone", "").0, 404);
}

#[test]
fn sidecar_task_logs_come_from_inside_the_main_container() {
    let name = format!("logs-main-{}", std::process::id());
    let _main = MainContainer::start(&name, "logs-host");
    let a = Agent::start(&["--enable-sidecar-mode=true", "--main-container-name", &name]);
    let r = a.create(json!({"name": "side", "spec": {"process": {
        "command": ["sh", "-c", "hostname; sleep 0.2; echo \"$TARGET_VAR\" >&2; sleep 0.2; echo done"]}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let followed = Follow::start(&a, "side", "?follow=true").body(T);
    assert_eq!(followed, "logs-host\nhello-from-target\ndone\n");
    assert_eq!(logs_ok(&a, "side", "?stream=stderr"), "hello-from-target\n");
    assert_eq!(logs_ok(&a, "side", "?tailLines=1"), "done\n");
}

#[test]
fn container_task_logs_are_its_lines_with_the_runtimes_times() {
    let cd = containerd::shared();
    let tmp = tempfile::Builder::new()
        .prefix("te-logs-cri-")
        .tempdir()
        .unwrap();
    let data = tmp.path().join("data");
    let socket = cd.socket.display().to_string();
    let a = Agent::start_in(
        &data,
        &[
            "--enable-container-mode=true",
            "--cri-socket",
            &socket,
            "--reconcile-interval",
            "100ms",
            "--stop-grace-period",
            "2s",
        ],
    );
    let r = a.create(json!({"name": "c", "spec": {"container": {"image": BUSYBOX,
        "command": ["sh", "-c"],
        "args": ["echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three"]}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    // The CRI log (`<time> <stream> <F|P> <text>`) comes back as the lines written.
    let followed = Follow::start(&a, "c", "?follow=true").body(T);
    assert_eq!(followed, "one\ntwo\nthree\n");
    assert!(a.get("c").unwrap()["status"]["state"]["terminated"].is_object());
    assert_eq!(logs_ok(&a, "c", "?stream=stdout"), "one\nthree\n");
    assert_eq!(logs_ok(&a, "c", "?stream=stderr&tailLines=5"), "two\n");
    let stamped = logs_ok(&a, "c", "?timestamps=true");
    let cri = std::fs::read_to_string(a.task_dir("c").join("container.log")).unwrap();
    // The times are the runtime's own, as its log file has them.
    for line in stamped.lines() {
        let (t, text) = line.split_once(' ').unwrap();
        let stream = if text == "two" { "stderr" } else { "stdout" };
        let t: jiff::Timestamp = t.parse().unwrap();
        let want = cri
            .lines()
            .find(|l| l.ends_with(&format!(" {stream} F {text}")))
            .unwrap_or_else(|| panic!("{text} not in {cri}"));
        let recorded: jiff::Timestamp = want.split(' ').next().unwrap().parse().unwrap();
        assert_eq!(t, recorded, "{line} vs {want}");
    }
}
