//! The data dir at its edges: full before the agent starts, read-only under it, torn or
//! strange files where records should be. The agent starts and serves what it can, says
//! what it can't with a clear status, and never loses or hides what is there.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use super::common::Tmpfs;
use super::support::agent::Agent;
use super::support::{http, wait_for};

const T: Duration = Duration::from_secs(30);

/// Fills the file system under `fs` to its last byte with `.filler` (a name no task can
/// have, so the agent ignores it).
fn fill(fs: &Tmpfs) {
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", fs.path.join(".filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
    assert!(
        fs.free_bytes() < 4096,
        "the disk is full: {}",
        fs.free_bytes()
    );
}

fn remount(fs: &Tmpfs, how: &str) {
    let st = Command::new("mount")
        .args(["-o", &format!("remount,{how}")])
        .arg(&fs.path)
        .status()
        .unwrap();
    assert!(st.success(), "remount {how}");
}

#[test]
fn an_agent_restarted_on_a_full_data_dir_serves_reads_and_deletes_and_answers_507() {
    let fs = Tmpfs::mount("size=2m");
    let mut a = Agent::start_in(&fs.path, &[]);
    a.run_sh("old", "echo kept");
    let t = a.wait_state("old", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    a.kill9();
    fill(&fs);

    // It starts (a write probe needed a block it could not get) ...
    a.restart();
    let t = a.wait_state("old", "terminated", T);
    assert_eq!(
        t["exitCode"], 0,
        "the finished task is served as it was: {t}"
    );
    assert_eq!(a.stdout("old"), "kept\n");
    assert!(
        !fs.path.join(".write-test").exists(),
        "no probe file is left behind"
    );
    // ... refuses creates with 507 ...
    let r = a.create(json!({"name": "new", "spec": {"process": {"command": ["true"]}}}));
    assert_eq!(r.status, 507, "{}", r.text());
    assert!(a.get("new").is_none(), "a refused create leaves nothing");
    // ... and a DELETE, the way to free space, works.
    a.delete("old");
    a.wait_gone("old", T);
    std::fs::remove_file(fs.path.join(".filler")).unwrap();
    a.run("new", &["true"]);
    a.wait_state("new", "terminated", T);
}

#[test]
fn a_read_only_data_dir_answers_503_and_the_agent_is_not_ready_until_it_is_writable() {
    let fs = Tmpfs::mount("size=16m");
    let a = Agent::start_in(&fs.path, &[]);
    a.run("done", &["true"]);
    a.wait_state("done", "terminated", T);
    assert_eq!(a.request("GET", "/readyz", None).status, 200);

    remount(&fs, "ro");
    let r = a.create(json!({"name": "new", "spec": {"process": {"command": ["true"]}}}));
    assert_eq!(r.status, 503, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "Service Unavailable");
    assert!(
        body["message"].as_str().unwrap().contains("read-only"),
        "{body}"
    );
    let r = a.request("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("read-only"), "{}", r.text());
    assert!(a.get("done").is_some(), "reads are served");
    assert!(a.get("new").is_none());

    remount(&fs, "rw");
    assert_eq!(a.request("GET", "/readyz", None).status, 200);
    a.run("new", &["true"]);
    a.wait_state("new", "terminated", T);
}

#[test]
fn an_agent_started_on_a_read_only_data_dir_serves_its_tasks_and_is_not_ready() {
    let fs = Tmpfs::mount("size=16m");
    let mut a = Agent::start_in(&fs.path, &[]);
    a.run_sh("done", "exit 3");
    a.wait_state("done", "terminated", T);
    a.kill9();
    remount(&fs, "ro");
    a.restart();
    let t = a.wait_state("done", "terminated", T);
    assert_eq!(t["exitCode"], 3, "{t}");
    let r = a.request("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.text());
    remount(&fs, "rw");
}

#[test]
fn an_unreadable_task_record_is_quarantined_and_its_name_free_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut a = Agent::start_in(&data, &[]);
    for name in ["torn", "empty", "bare"] {
        a.run_sh(name, &format!("echo output of {name}"));
        a.wait_state(name, "terminated", T);
    }
    a.kill9();
    // A torn record, an empty one, and logs whose record is gone.
    let rec = data.join("torn").join("task.json");
    let text = std::fs::read(&rec).unwrap();
    std::fs::write(&rec, &text[..text.len() / 2]).unwrap();
    std::fs::write(data.join("empty").join("task.json"), b"").unwrap();
    std::fs::remove_file(data.join("bare").join("task.json")).unwrap();
    a.restart();

    for name in ["torn", "empty", "bare"] {
        // The name is free: a create and a sync naming it succeed.
        assert!(a.get(name).is_none());
        a.run(name, &["true"]);
        a.wait_state(name, "terminated", T);
        // And nothing of the unreadable task was lost: its logs are kept aside.
        let kept: Vec<_> = std::fs::read_dir(data.join(".quarantine"))
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&format!("{name}.")))
            })
            .collect();
        assert_eq!(kept.len(), 1, "{name} quarantined once");
        let log = std::fs::read_to_string(kept[0].path().join("stdout.log")).unwrap();
        assert_eq!(log, format!("output of {name}\n"));
    }
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([{"name": "torn", "spec": {"process": {"command": ["true"]}}}])),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        a.log_text().contains("task directory quarantined"),
        "reported in the log"
    );
}

#[test]
fn fifos_and_symlinks_in_place_of_records_wedge_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut a = Agent::start_in(&data, &[]);
    a.run("good", &["true"]);
    a.wait_state("good", "terminated", T);
    for name in ["fifo-run", "zero-run"] {
        a.run(name, &["true"]);
        a.wait_state(name, "terminated", T);
    }
    a.kill9();
    let mkfifo = |p: &std::path::Path| {
        let _ = std::fs::remove_file(p);
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    };
    let symlink_zero = |p: &std::path::Path| {
        let _ = std::fs::remove_file(p);
        std::os::unix::fs::symlink("/dev/zero", p).unwrap();
    };
    std::fs::create_dir(data.join("fifo-rec")).unwrap();
    mkfifo(&data.join("fifo-rec").join("task.json"));
    std::fs::create_dir(data.join("zero-rec")).unwrap();
    symlink_zero(&data.join("zero-rec").join("task.json"));
    mkfifo(&data.join("fifo-run").join("run.jsonl"));
    symlink_zero(&data.join("zero-run").join("run.jsonl"));

    a.restart();
    let r = http::request(a.addr, "GET", "/getTasks", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let t = a.wait_state("good", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    for name in ["fifo-rec", "zero-rec", "fifo-run", "zero-run"] {
        assert!(a.get(name).is_none(), "{name} is quarantined");
        a.run(name, &["true"]);
        let t = a.wait_state(name, "terminated", T);
        assert_eq!(t["exitCode"], 0, "{name}: {t}");
    }
}

#[test]
fn overlapping_syncs_leave_one_of_their_sets_never_the_union() {
    let a = Agent::start(&[]);
    let set = |prefix: &str, round: usize| -> serde_json::Value {
        (0..8)
            .map(|i| json!({"name": format!("{prefix}{round}-{i}"), "spec": {"process": {"command": ["sleep", "600"]}}}))
            .collect()
    };
    for round in 0..6 {
        let (x, y) = (set("x", round), set("y", round));
        let addr = a.addr;
        let send = move |body: serde_json::Value| {
            std::thread::spawn(move || {
                let b = serde_json::to_vec(&body).unwrap();
                http::request(addr, "POST", "/setTasks", Some(&b)).unwrap()
            })
        };
        let (rx, ry) = (send(x.clone()), send(y.clone()));
        let (rx, ry) = (rx.join().unwrap(), ry.join().unwrap());
        assert_eq!(
            (rx.status, ry.status),
            (200, 200),
            "{} {}",
            rx.text(),
            ry.text()
        );
        let mut live: Vec<String> = a
            .request("GET", "/getTasks", None)
            .json()
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t.get("deletionTimestamp").is_none())
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        live.sort();
        let names = |s: &serde_json::Value| -> Vec<String> {
            s.as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert!(
            live == names(&x) || live == names(&y),
            "round {round}: the tasks left are one sync's set, not {live:?}"
        );
    }
}

#[test]
fn a_sync_naming_a_task_being_deleted_is_a_conflict_that_changes_nothing() {
    let a = Agent::start(&["--stop-grace-period", "10s"]);
    a.run_sh(
        "leaving",
        "trap 'sleep 2; exit 0' TERM; while true; do sleep 0.1; done",
    );
    a.run("staying", &["sleep", "600"]);
    a.wait_state("leaving", "running", T);
    a.delete("leaving");
    let r = a.request(
        "POST",
        "/setTasks",
        Some(&json!([
            {"name": "leaving", "spec": {"process": {"command": ["true"]}}},
            {"name": "fresh", "spec": {"process": {"command": ["true"]}}}
        ])),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("being deleted"),
        "{}",
        r.text()
    );
    assert!(a.get("fresh").is_none(), "nothing was created");
    let staying = a.get("staying").expect("nothing was deleted");
    assert!(staying.get("deletionTimestamp").is_none(), "{staying}");
    a.wait_gone("leaving", T);
    wait_for(T, "a sync once the name is free", || {
        let r = a.request(
            "POST",
            "/setTasks",
            Some(&json!([{"name": "leaving", "spec": {"process": {"command": ["true"]}}}])),
        );
        (r.status == 200).then_some(())
    });
}

#[test]
fn the_exit_of_a_task_is_recorded_when_the_disk_filled_up_while_it_ran() {
    let fs = Tmpfs::mount("size=8m");
    let a = Agent::start_in(&fs.path, &[]);
    let outside = tempfile::tempdir().unwrap();
    let go = outside.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 7",
        go.display()
    );
    let task = |name: &str, pad: usize| {
        json!({"name": name, "spec": {"process": {
            "command": ["sh", "-c", &script],
            "env": [{"name": "PAD", "value": "p".repeat(pad)}]}}})
    };
    let journal_len = |name: &str| {
        std::fs::metadata(fs.path.join(name).join("run.jsonl"))
            .unwrap()
            .len()
    };
    // The journal of a running task is sized so that its exit line needs a new page:
    // measured on a first task, then padded on the second (same name length).
    a.create_ok(&task("probe1", 1000));
    a.wait_state("probe1", "running", T);
    let probe = journal_len("probe1");
    let pad = 1000 + (4096 - 60) - probe as usize;
    a.create_ok(&task("victim", pad));
    a.wait_state("victim", "running", T);
    let len = journal_len("victim");
    assert!(
        (4096 - 80..4096).contains(&len),
        "the journal ends just before a page boundary: {len}"
    );
    fill(&fs);
    std::fs::write(&go, b"").unwrap();
    let t = a.wait_state("victim", "terminated", T);
    assert_eq!(t["exitCode"], 7, "the real exit, not a lost one: {t}");
    assert_eq!(t["reason"], "Failed", "{t}");
}

#[test]
fn a_finished_task_whose_journal_was_emptied_is_reported_lost_never_run_again() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let markers = tmp.path().join("markers");
    let mut a = Agent::start_in(&data, &[]);
    a.run_sh("once", &super::common::marking(&markers, "echo output"));
    let t = a.wait_state("once", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
    a.kill9();
    std::fs::write(data.join("once").join("run.jsonl"), b"").unwrap();
    a.restart();
    let t = a.wait_state("once", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    assert_eq!(
        super::common::runs(&markers).get("once"),
        Some(&1),
        "the task ran again"
    );
    // And the verdict holds across restarts.
    a.restart();
    let again = a.wait_state("once", "terminated", T);
    assert_eq!(again, t);
}

#[test]
fn a_task_whose_exit_finds_no_room_reports_its_real_exit_once_there_is_room() {
    // A launch line beyond the journal's reserved space (a big environment): the exit
    // line needs a block the full disk can't give, and the shim waits for one.
    let fs = Tmpfs::mount("size=8m");
    let a = Agent::start_in(&fs.path, &[]);
    let outside = tempfile::tempdir().unwrap();
    let go = outside.path().join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; exit 7",
        go.display()
    );
    let task = |name: &str, pad: usize| {
        json!({"name": name, "spec": {"process": {
            "command": ["sh", "-c", &script],
            "env": [{"name": "PAD", "value": "p".repeat(pad)}]}}})
    };
    let journal_len = |name: &str| {
        std::fs::metadata(fs.path.join(name).join("run.jsonl"))
            .unwrap()
            .len() as usize
    };
    let end = 6 * 4096 - 60;
    a.create_ok(&task("probe1", 20_000));
    a.wait_state("probe1", "running", T);
    let pad = 20_000 + end - journal_len("probe1");
    a.create_ok(&task("victim", pad));
    a.wait_state("victim", "running", T);
    let len = journal_len("victim");
    assert!((end - 20..6 * 4096).contains(&len), "{len}");
    fill(&fs);
    std::fs::write(&go, b"").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let t = a.get("victim").unwrap();
    assert!(
        t["status"]["state"]["running"].is_object(),
        "no end is shown before one is recorded: {t}"
    );
    std::fs::remove_file(fs.path.join(".filler")).unwrap();
    let t = a.wait_state("victim", "terminated", T);
    assert_eq!(t["exitCode"], 7, "the real exit, not a lost one: {t}");
    let mut a = a;
    a.restart();
    let again = a.wait_state("victim", "terminated", T);
    assert_eq!(again, t, "the same answer after a restart");
}

#[test]
fn the_end_of_a_task_whose_shim_died_on_a_full_disk_is_shown_only_once_recorded() {
    let fs = Tmpfs::mount("size=8m");
    let mut a = Agent::start_in(&fs.path, &[]);
    let task = |name: &str, pad: usize| {
        json!({"name": name, "spec": {"process": {
            "command": ["sleep", "600"],
            "env": [{"name": "PAD", "value": "p".repeat(pad)}]}}})
    };
    let journal_len = |name: &str| {
        std::fs::metadata(fs.path.join(name).join("run.jsonl"))
            .unwrap()
            .len() as usize
    };
    // The journal ends just before a page boundary beyond its reserved space.
    let end = 6 * 4096 - 60;
    a.create_ok(&task("probe1", 20_000));
    a.wait_state("probe1", "running", T);
    let pad = 20_000 + end - journal_len("probe1");
    a.create_ok(&task("victim", pad));
    a.wait_state("victim", "running", T);
    let shim =
        super::support::agent::started_record(&fs.path.join("victim")).unwrap()["shim"]["pid"]
            .as_i64()
            .unwrap() as i32;
    fill(&fs);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t = a.get("victim").unwrap();
    assert!(
        t["status"]["state"].get("terminated").is_none(),
        "an end that isn't recorded is not shown: {t}"
    );
    std::fs::remove_file(fs.path.join(".filler")).unwrap();
    let t = a.wait_state("victim", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    a.restart();
    let again = a.wait_state("victim", "terminated", T);
    assert_eq!(again, t, "the same end, the same times, after a restart");
}
