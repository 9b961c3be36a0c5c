//! `process.lifecycle.preStart` / `postStop` with real processes: the order they run in
//! (marker files with times), each way a hook fails and what the task then shows, hook
//! timeouts killing the hook's whole tree, `postStop` after a timeout and after DELETE,
//! hook logs (`?hook=`), per-hook `execMode` (a stand-in main container in real
//! namespaces, checked by namespace inode), and restarts: `kill -9` of the agent during
//! either hook (the hook runs once, the outcome is right) and of the shim during one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::standin::MainContainer;
use crate::support::{pid_alive, wait_for};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

fn task(name: &str, main: &str, pre: Option<Value>, post: Option<Value>) -> Value {
    let mut lifecycle = json!({});
    if let Some(p) = pre {
        lifecycle["preStart"] = p;
    }
    if let Some(p) = post {
        lifecycle["postStop"] = p;
    }
    json!({"name": name, "spec": {"process": {
        "command": ["sh", "-c", main], "lifecycle": lifecycle}}})
}

fn hook(script: &str) -> Value {
    json!({"exec": {"command": ["sh", "-c", script]}})
}

fn hook_with_timeout(script: &str, secs: i64) -> Value {
    json!({"exec": {"command": ["sh", "-c", script]}, "timeoutSeconds": secs})
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn status(a: &Agent, name: &str) -> Value {
    a.get(name).unwrap_or_else(|| panic!("{name} is gone"))["status"].clone()
}

fn hook_log(a: &Agent, name: &str, hook: &str) -> String {
    let r = a.call("GET", &format!("/tasks/{name}/logs?hook={hook}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

fn pid_in(p: &Path) -> i32 {
    wait_for(T, &format!("a pid in {}", p.display()), || {
        read(p).trim().parse().ok()
    })
}

#[test]
fn hooks_run_in_order_around_the_main_command_with_its_env_and_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    let a = Agent::start(&[]);
    // Each step appends its name and time; the main command and postStop check that the
    // step before them is over. preStart waits for a go file, so its state is seen.
    let pre = format!(
        "echo pre-out; echo pre-err >&2; echo \"$GREETING from $(pwd)\"; \
         while [ ! -e {d}/go ]; do sleep 0.05; done; echo pre $(date +%s%N) >> {d}/order"
    );
    let main = format!(
        "grep -q '^pre ' {d}/order || exit 9; echo main-out; echo main $(date +%s%N) >> {d}/order"
    );
    let post = format!(
        "grep -q '^main ' {d}/order || exit 9; echo \"post $GREETING $(pwd)\"; \
         echo post $(date +%s%N) >> {d}/order"
    );
    let mut t = task("ordered", &main, Some(hook(&pre)), Some(hook(&post)));
    t["spec"]["process"]["env"] = json!([{"name": "GREETING", "value": "hello"}]);
    t["spec"]["process"]["workingDir"] = json!(d);
    let r = a.create(t);
    assert_eq!(r.status, 201, "{}", r.text());

    let w = a.wait_state("ordered", "waiting", T);
    assert_eq!(w["reason"], "PreStartHookRunning", "{w}");
    wait_for(T, "preStart running in the status", || {
        status(&a, "ordered")["hooks"]["preStart"]
            .get("running")
            .cloned()
    });
    assert!(!Path::new(&format!("{d}/order")).exists());
    std::fs::write(format!("{d}/go"), "").unwrap();

    let t = a.wait_state("ordered", "terminated", T);
    assert_eq!(
        (t["reason"].as_str(), t["exitCode"].as_i64()),
        (Some("Succeeded"), Some(0)),
        "{t}"
    );
    let st = status(&a, "ordered");
    for h in ["preStart", "postStop"] {
        assert_eq!(st["hooks"][h]["terminated"]["reason"], "Succeeded", "{st}");
    }
    let order: Vec<(String, u128)> = read(&tmp.path().join("order"))
        .lines()
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["pre", "main", "post"]);
    assert!(order.windows(2).all(|w| w[0].1 < w[1].1), "{order:?}");
    // The main command started after preStart ended, and postStop after the main command.
    let pre_end = st["hooks"]["preStart"]["terminated"]["finishedAt"]
        .as_str()
        .unwrap();
    assert!(t["startedAt"].as_str().unwrap() >= pre_end, "{st}");

    // Hook output is apart from the main command's, in its own log.
    assert_eq!(a.stdout("ordered"), "main-out\n");
    let pre_log = hook_log(&a, "ordered", "preStart");
    assert!(
        pre_log.contains("pre-out\n") && pre_log.contains("pre-err\n"),
        "{pre_log}"
    );
    assert!(pre_log.contains(&format!("hello from {d}")), "{pre_log}");
    assert_eq!(
        hook_log(&a, "ordered", "postStop"),
        format!("post hello {d}\n")
    );
    assert_eq!(
        read(&a.task_dir("ordered").join("poststop.log")),
        format!("post hello {d}\n")
    );
    let main_log = a.call("GET", "/tasks/ordered/logs", None).text();
    assert_eq!(main_log, "main-out\n");
    let r = a.call(
        "GET",
        "/tasks/ordered/logs?hook=preStart&tailLines=1&timestamps=true",
        None,
    );
    assert_eq!(r.status, 200);
    assert!(
        r.text().ends_with(&format!(" hello from {d}\n")),
        "{}",
        r.text()
    );
    // A bad hook name is a 400 that names it.
    let r = a.call("GET", "/tasks/ordered/logs?hook=prestart", None);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("hook"), "{}", r.text());
}

#[test]
fn a_failed_pre_start_ends_the_task_and_the_main_command_never_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    let a = Agent::start(&[]);
    let main = format!("touch {d}/main-ran-$0");
    // Over 4 KiB of output ending in a marker line: the message keeps its tail.
    let noisy = "i=0; while [ $i -lt 300 ]; do echo \"line $i of noise\"; i=$((i+1)); done; \
                 echo 'the end ✓'; exit 3";
    let cases = [
        ("exits", hook(noisy), "preStart hook failed: exit code 3", 3),
        (
            "times-out",
            hook_with_timeout("echo started; sleep 1000", 1),
            "preStart hook timed out after 1s",
            137,
        ),
        (
            "not-startable",
            json!({"exec": {"command": ["/nonexistent/mount-data"]}}),
            "preStart hook could not be started",
            127,
        ),
    ];
    for (name, pre, _, _) in &cases {
        let mut t = task(name, &main, Some(pre.clone()), None);
        t["spec"]["process"]["args"] = json!([name]);
        a.create_ok(&t);
    }
    for (name, _, says, hook_code) in cases {
        let t = a.wait_state(name, "terminated", T);
        assert_eq!(t["reason"], "PreStartHookFailed", "{name}: {t}");
        assert_eq!(t["exitCode"], 1, "{name}: {t}");
        assert_eq!(
            t["startedAt"],
            Value::Null,
            "{name}: the main command never started"
        );
        let msg = t["message"].as_str().unwrap();
        assert!(msg.starts_with(says), "{name}: {msg}");
        let hs = &status(&a, name)["hooks"]["preStart"]["terminated"];
        assert_eq!(hs["exitCode"], hook_code, "{name}: {hs}");
        assert_eq!(hs["reason"], "PreStartHookFailed", "{name}: {hs}");
        assert!(
            !tmp.path().join(format!("main-ran-{name}")).exists(),
            "{name}"
        );
    }
    let t = a.wait_state("exits", "terminated", T);
    let msg = t["message"].as_str().unwrap();
    assert!(msg.ends_with("line 299 of noise\nthe end ✓\n"), "{msg}");
    assert!(!msg.contains("line 0 of noise"), "only the tail");
    assert!(msg.len() <= 4096 + 100, "{}", msg.len());
    let t = a.wait_state("times-out", "terminated", T);
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .ends_with("output: started\n"),
        "{t}"
    );
    let t = a.wait_state("not-startable", "terminated", T);
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/mount-data"),
        "{t}"
    );
}

#[test]
fn a_failed_post_stop_fails_the_task_as_upstream_reports_it() {
    let a = Agent::start(&[]);
    let post = hook("echo cleanup broke; exit 2");
    a.create_ok(&task("ok-main", "exit 0", None, Some(post.clone())));
    a.create_ok(&task("failed-main", "exit 5", None, Some(post.clone())));
    let mut timed = task("timed-main", "exec sleep 1000", None, Some(post.clone()));
    timed["spec"]["process"]["timeoutSeconds"] = json!(1);
    a.create_ok(&timed);
    a.create_ok(&task(
        "pre-failed",
        "exit 0",
        Some(hook("exit 4")),
        Some(post),
    ));

    // A clean-up that failed after a success is a failure the controller sees: exit code
    // 1, upstream's reason; the command's own code is in the message and the hook's in
    // its status.
    a.wait_state("ok-main", "terminated", T);
    let t = a.controller_view("ok-main");
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(1), Some("PostStopHookFailed")),
        "{t}"
    );
    assert_eq!(
        t["message"],
        "main command: Succeeded, exit code 0; postStop hook failed: exit code 2; output: cleanup broke\n"
    );
    let full = a.get("ok-main").unwrap();
    assert_eq!(
        full["status"]["state"]["terminated"], t,
        "both shapes agree"
    );
    let hs = &full["status"]["hooks"]["postStop"]["terminated"];
    assert_eq!(
        (hs["exitCode"].as_i64(), hs["reason"].as_str()),
        (Some(2), Some("PostStopHookFailed"))
    );

    // A failed command and a failed clean-up: upstream's reason, the command's own code.
    a.wait_state("failed-main", "terminated", T);
    let t = a.controller_view("failed-main");
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(5), Some("PostStopHookFailed")),
        "{t}"
    );
    assert_eq!(
        t["message"],
        "main command: Failed, exit code 5; postStop hook failed: exit code 2; output: cleanup broke\n"
    );

    // A timeout (the command was stopped) then a failed clean-up: the same.
    a.wait_state("timed-main", "terminated", T);
    let t = a.controller_view("timed-main");
    assert_eq!(t["reason"], "PostStopHookFailed", "{t}");
    assert_ne!(t["exitCode"], 0, "{t}");
    let msg = t["message"].as_str().unwrap();
    assert!(
        msg.starts_with("main command: TaskTimeout, exit code ")
            && msg
                .contains("Task exceeded timeout of 1 seconds; postStop hook failed: exit code 2"),
        "{msg}"
    );

    // The command never ran (its preStart failed): that is why the task failed; the
    // clean-up's failure is added to the message.
    a.wait_state("pre-failed", "terminated", T);
    let t = a.controller_view("pre-failed");
    assert_eq!(
        (t["exitCode"].as_i64(), t["reason"].as_str()),
        (Some(1), Some("PreStartHookFailed")),
        "{t}"
    );
    assert_eq!(
        t["message"],
        "preStart hook failed: exit code 4; postStop hook failed: exit code 2; output: cleanup broke\n"
    );
}

/// The hooks' limits in the task's launch (its journal's first line), in milliseconds.
fn launched_hook_limits(a: &Agent, name: &str) -> Vec<Value> {
    let journal = read(&a.task_dir(name).join("run.jsonl"));
    let first: Value = serde_json::from_str(journal.lines().next().unwrap()).unwrap();
    let launch = first
        .as_object()
        .unwrap()
        .values()
        .find(|v| v.get("argv").is_some())
        .unwrap_or_else(|| panic!("no launch in {first}"));
    ["preStart", "postStop"]
        .iter()
        .map(|h| launch[h]["timeoutMs"].clone())
        .collect()
}

#[test]
fn a_hook_timeout_of_zero_negative_or_unset_is_no_limit_unless_the_agent_sets_one() {
    // As upstream: a hook is killed only when its timeoutSeconds is positive.
    let a = Agent::start(&[]);
    let cases = [
        ("zero", json!(0)),
        ("negative", json!(-1)),
        ("unset", Value::Null),
    ];
    for (name, limit) in &cases {
        let mut h = hook("sleep 1.5; echo slept");
        if !limit.is_null() {
            h["timeoutSeconds"] = limit.clone();
        }
        let r = a.create(task(name, "true", Some(h.clone()), Some(h)));
        assert_eq!(r.status, 201, "{name}: {}", r.text());
    }
    for (name, _) in &cases {
        let t = a.wait_state(name, "terminated", T);
        assert_eq!(t["reason"], "Succeeded", "{name}: {t}");
        for h in ["preStart", "postStop"] {
            assert_eq!(hook_log(&a, name, h), "slept\n", "{name} {h}");
        }
        // No limit at all (the former default, 60 s, would take a minute to disprove by
        // waiting): the launch carries none.
        assert_eq!(
            launched_hook_limits(&a, name),
            [Value::Null, Value::Null],
            "{name}"
        );
    }

    // The agent's --hook-timeout (Go's spelling here) limits such hooks; a hook's own
    // positive timeoutSeconds wins over it.
    let b = Agent::start(&["-hook-timeout=1s"]);
    let zero = hook_with_timeout("sleep 30", 0);
    b.create_ok(&task("capped-unset", "true", Some(hook("sleep 30")), None));
    b.create_ok(&task("capped-zero", "true", Some(zero), None));
    b.create_ok(&task(
        "own-limit",
        "true",
        Some(hook_with_timeout("sleep 1.5", 20)),
        None,
    ));
    for name in ["capped-unset", "capped-zero"] {
        let t = b.wait_state(name, "terminated", T);
        assert_eq!(t["reason"], "PreStartHookFailed", "{name}: {t}");
        assert!(
            t["message"]
                .as_str()
                .unwrap()
                .starts_with("preStart hook timed out after 1s"),
            "{name}: {t}"
        );
    }
    let t = b.wait_state("own-limit", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
}

#[test]
fn a_hook_timeout_kills_the_hooks_whole_tree_and_only_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    let a = Agent::start(&["--stop-grace-period", "1s"]);
    // preStart leaves a setsid'd and a backgrounded grandchild, then hangs.
    let pre = format!(
        "setsid sh -c 'echo $$ > {d}/pre-setsid; exec sleep 1001' & \
         sh -c 'echo $$ > {d}/pre-bg; exec sleep 1002' & sleep 1000"
    );
    a.create_ok(&task(
        "pre-tree",
        "true",
        Some(hook_with_timeout(&pre, 1)),
        None,
    ));
    let (p1, p2) = (
        pid_in(&tmp.path().join("pre-setsid")),
        pid_in(&tmp.path().join("pre-bg")),
    );
    let t = a.wait_state("pre-tree", "terminated", T);
    assert_eq!(t["reason"], "PreStartHookFailed", "{t}");
    wait_for(T, "the preStart tree to be gone", || {
        (!pid_alive(p1) && !pid_alive(p2)).then_some(())
    });

    // The main command leaves a daemon and exits; postStop starts its own and hangs. The
    // timeout kills postStop's tree; the main command's daemon lives on (as daemons of a
    // task without hooks do) until the task is deleted.
    let main = format!("setsid sh -c 'echo $$ > {d}/main-daemon; exec sleep 1003' & exit 0");
    let post = format!("setsid sh -c 'echo $$ > {d}/post-setsid; exec sleep 1004' & sleep 1000");
    a.create_ok(&task(
        "post-tree",
        &main,
        None,
        Some(hook_with_timeout(&post, 1)),
    ));
    let daemon = pid_in(&tmp.path().join("main-daemon"));
    let p3 = pid_in(&tmp.path().join("post-setsid"));
    let t = a.wait_state("post-tree", "terminated", T);
    assert_eq!(t["reason"], "PostStopHookFailed", "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .starts_with("main command: Succeeded, exit code 0; postStop hook timed out after 1s"),
        "{t}"
    );
    wait_for(T, "the postStop tree to be gone", || {
        (!pid_alive(p3)).then_some(())
    });
    assert!(
        pid_alive(daemon),
        "the main command's daemon is not the hook's"
    );
    a.delete("post-tree");
    a.wait_gone("post-tree", T);
    assert!(!pid_alive(daemon));
}

#[test]
fn post_stop_runs_after_a_timeout_and_delete_waits_for_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display().to_string();
    let a = Agent::start(&["--stop-grace-period", "1s"]);
    // It checks that the main command is gone before it runs.
    let post = |tag: &str| {
        hook(&format!(
            "pid=$(cat {d}/{tag}-main); [ -d /proc/$pid ] && exit 8; sleep 2; \
             echo done > {d}/{tag}-post"
        ))
    };
    let main = |tag: &str| format!("echo $$ > {d}/{tag}-main; exec sleep 1000");
    let mut timed = task("timed", &main("timed"), None, Some(post("timed")));
    timed["spec"]["process"]["timeoutSeconds"] = json!(1);
    a.create_ok(&timed);
    let t = a.wait_state("timed", "terminated", T);
    assert_eq!(t["reason"], "TaskTimeout", "{t}");
    assert_eq!(
        read(&tmp.path().join("timed-post")),
        "done\n",
        "postStop ran, after the kill"
    );
    assert_eq!(
        status(&a, "timed")["hooks"]["postStop"]["terminated"]["reason"],
        "Succeeded"
    );

    a.create_ok(&task(
        "deleted",
        &main("deleted"),
        None,
        Some(post("deleted")),
    ));
    a.wait_state("deleted", "running", T);
    let main_pid = pid_in(&tmp.path().join("deleted-main"));
    a.delete("deleted");
    // DELETE answered at once; the task stays (marked) while postStop runs.
    let marked = a.get("deleted").expect("still there while postStop runs");
    assert!(marked["deletionTimestamp"].is_string(), "{marked}");
    wait_for(T, "postStop to be running", || {
        a.get("deleted")?["status"]["hooks"]["postStop"]
            .get("running")
            .cloned()
    });
    assert!(!pid_alive(main_pid));
    a.wait_gone("deleted", T);
    assert_eq!(
        read(&tmp.path().join("deleted-post")),
        "done\n",
        "the task disappeared only after postStop finished"
    );
}

/// Where a hook ran, from its log: `readlink /proc/self/ns/mnt`.
const NS_PROBE: &str = "readlink /proc/self/ns/mnt";

#[test]
fn each_hook_runs_where_its_exec_mode_says() {
    let name = format!("hooks-main-{}", std::process::id());
    let main = MainContainer::start(&name, "hooks-main-host");
    let own = std::fs::read_link("/proc/self/ns/mnt")
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let inside = main.ns("mnt");
    assert_ne!(own, inside);
    let a = Agent::start(&["--enable-sidecar-mode=true", "--main-container-name", &name]);
    let probe = |mode: Option<&str>| {
        let mut h = hook(NS_PROBE);
        if let Some(m) = mode {
            h["execMode"] = json!(m);
        }
        h
    };
    // A Remote task (the sidecar agent's default): a hook without execMode, or with
    // `""` (Go's zero value), runs Local, as upstream's CRD defaults it.
    a.create_ok(&task(
        "remote",
        NS_PROBE,
        Some(probe(Some(""))),
        Some(probe(None)),
    ));
    let mut local = task(
        "local",
        NS_PROBE,
        Some(probe(Some("Remote"))),
        Some(probe(None)),
    );
    local["spec"]["process"]["execMode"] = json!("Local");
    a.create_ok(&local);
    for n in ["remote", "local"] {
        let t = a.wait_state(n, "terminated", T);
        assert_eq!(t["reason"], "Succeeded", "{n}: {t}");
    }
    let line = |s: String| s.trim().to_string();
    assert_eq!(line(a.stdout("remote")), inside);
    assert_eq!(line(hook_log(&a, "remote", "preStart")), own);
    assert_eq!(line(hook_log(&a, "remote", "postStop")), own);
    assert_eq!(line(a.stdout("local")), own);
    assert_eq!(line(hook_log(&a, "local", "preStart")), inside);
    assert_eq!(line(hook_log(&a, "local", "postStop")), own);

    // Without a main container, a Remote hook fails as a Remote task does.
    let missing = format!("nobody-{}", std::process::id());
    let b = Agent::start(&["--main-container-name", &missing]);
    b.create_ok(&task("no-main", "true", Some(probe(Some("Remote"))), None));
    let t = b.wait_state("no-main", "terminated", T);
    assert_eq!(t["reason"], "PreStartHookFailed", "{t}");
    let msg = t["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("main container \"{missing}\" not found")),
        "{msg}"
    );
}

/// A hook that counts its runs and waits for a go file, so a restart can happen in it.
fn counted(dir: &Path, tag: &str) -> Value {
    let d = dir.display();
    hook(&format!(
        "echo run >> {d}/{tag}-runs; while [ ! -e {d}/{tag}-go ]; do sleep 0.05; done"
    ))
}

fn runs(dir: &Path, tag: &str) -> usize {
    read(&dir.join(format!("{tag}-runs"))).lines().count()
}

#[test]
fn a_restarted_agent_readopts_a_task_in_either_hook_and_runs_nothing_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let m = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let md = m.display().to_string();
    let mut a = Agent::start_in(&data, &[]);
    let main = format!("echo main >> {md}/main-runs");
    a.create_ok(&task("in-pre", &main, Some(counted(&m, "pre")), None));
    a.create_ok(&task("in-post", &main, None, Some(counted(&m, "post"))));
    a.create_ok(&task(
        "failed",
        "true",
        Some(hook("echo nope; exit 4")),
        None,
    ));
    wait_for(T, "both hooks running", || {
        (runs(&m, "pre") == 1 && runs(&m, "post") == 1).then_some(())
    });
    a.wait_state("failed", "terminated", T);
    a.kill9();

    a.restart();
    let w = a.wait_state("in-pre", "waiting", T);
    assert_eq!(
        w["reason"], "PreStartHookRunning",
        "re-adopted in preStart: {w}"
    );
    let post = a.get("in-post").unwrap();
    assert!(post["status"]["state"]["running"].is_object(), "{post}");
    assert!(
        post["status"]["hooks"]["postStop"]["running"].is_object(),
        "{post}"
    );
    // A start failure persisted before the restart stays one.
    let t = a.wait_state("failed", "terminated", T);
    assert_eq!(t["reason"], "PreStartHookFailed", "{t}");
    assert_eq!(
        t["message"],
        "preStart hook failed: exit code 4; output: nope\n"
    );

    std::fs::write(m.join("pre-go"), "").unwrap();
    std::fs::write(m.join("post-go"), "").unwrap();
    for n in ["in-pre", "in-post"] {
        let t = a.wait_state(n, "terminated", T);
        assert_eq!(t["reason"], "Succeeded", "{n}: {t}");
    }
    assert_eq!(
        (runs(&m, "pre"), runs(&m, "post")),
        (1, 1),
        "no hook ran twice"
    );
    assert_eq!(
        read(&m.join("main-runs")),
        "main\nmain\n",
        "each main command once"
    );

    // And after one more restart, every outcome reads the same.
    a.restart();
    for n in ["in-pre", "in-post"] {
        assert_eq!(a.wait_state(n, "terminated", T)["reason"], "Succeeded");
    }
    assert_eq!(
        a.wait_state("failed", "terminated", T)["reason"],
        "PreStartHookFailed"
    );
    assert_eq!((runs(&m, "pre"), runs(&m, "post")), (1, 1));
}

/// The shim's pid, from its claim in the journal.
fn shim_pid(task_dir: &Path) -> i32 {
    let journal = read(&task_dir.join("run.jsonl"));
    journal
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["claimed"]["shim"]["pid"].as_i64())
        .expect("a claimed line") as i32
}

#[test]
fn a_shim_killed_during_a_hook_is_reported_and_the_hook_is_not_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let m: PathBuf = tmp.path().join("m");
    std::fs::create_dir(&m).unwrap();
    let md = m.display().to_string();
    let mut a = Agent::start(&[]);
    let main = format!("echo main >> {md}/main-runs");
    let pre = format!("echo $$ > {md}/pre-pid; echo run >> {md}/pre-runs; exec sleep 1000");
    a.create_ok(&task("lost-pre", &main, Some(hook(&pre)), None));
    let hook_pid = pid_in(&m.join("pre-pid"));
    let shim = shim_pid(&a.task_dir("lost-pre"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = a.wait_state("lost-pre", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    let hs = &status(&a, "lost-pre")["hooks"]["preStart"]["terminated"];
    assert_eq!(hs["reason"], "PreStartHookFailed", "{hs}");
    assert!(
        hs["message"].as_str().unwrap().contains("not run again"),
        "{hs}"
    );
    wait_for(T, "the orphaned hook to be stopped", || {
        (!pid_alive(hook_pid)).then_some(())
    });
    a.restart();
    assert_eq!(
        a.wait_state("lost-pre", "terminated", T)["reason"],
        "SupervisorLost"
    );
    assert_eq!(runs(&m, "pre"), 1);
    assert!(!m.join("main-runs").exists(), "the main command never ran");
}
