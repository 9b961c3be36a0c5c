//! A full data dir: 507 with a JSON error that says so, and deletion still works (it is
//! how space is freed). A deletion the disk refuses changes nothing and works once space
//! is back, without a restart.

use std::time::Duration;

use serde_json::json;

use super::common::Tmpfs;
use super::support::agent::Agent;
use super::support::wait_for;

const T: Duration = Duration::from_secs(30);

#[test]
fn a_full_data_dir_answers_507_and_deleting_the_task_that_filled_it_frees_it() {
    let fs = Tmpfs::mount("size=2m");
    let a = Agent::start_in(&fs.path, &["--max-log-bytes", "104857600"]);
    // The task's log fills the disk (the supervisor drops what no longer fits).
    a.run_sh("filler", "head -c 50000000 /dev/zero; sleep 600");
    wait_for(T, "the data dir to be full", || {
        (fs.free_bytes() < 4096).then_some(())
    });

    let r = a.create(json!({"name": "late", "spec": {"process": {"command": ["true"]}}}));
    assert_eq!(r.status, 507, "{}", r.text());
    let body = r.json();
    assert_eq!(body["code"], "Insufficient Storage");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("out of disk space"),
        "{body}"
    );
    assert!(a.get("late").is_none(), "a refused create leaves nothing");
    assert!(!fs.path.join("late").exists());

    // Deleting the task that filled the disk works on a full disk and frees it.
    a.delete("filler");
    a.wait_gone("filler", T);
    assert!(
        fs.free_bytes() > 1024 * 1024,
        "space is back: {}",
        fs.free_bytes()
    );
    a.run("late", &["true"]);
    let t = a.wait_state("late", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
}

#[test]
fn a_delete_the_disk_refuses_changes_nothing_and_works_once_space_is_back() {
    // Few inodes: the deletion marker (an empty file) needs one.
    let fs = Tmpfs::mount("size=16m,nr_inodes=64");
    let a = Agent::start_in(&fs.path, &[]);
    a.run("victim", &["sleep", "600"]);
    a.wait_state("victim", "running", T);
    let pid = a.main_pid("victim");

    // Use up every inode left (a name that can't be a task's, so the agent ignores it).
    let filler = fs.path.join(".filler");
    std::fs::create_dir(&filler).unwrap();
    for i in 0.. {
        if std::fs::write(filler.join(i.to_string()), b"").is_err() {
            break;
        }
    }
    assert_eq!(fs.free_inodes(), 0);

    for _ in 0..2 {
        let r = a.request("DELETE", "/tasks/victim", None);
        assert_eq!(r.status, 507, "{}", r.text());
        assert!(
            r.json()["message"]
                .as_str()
                .unwrap()
                .contains("out of disk space")
        );
        let t = a.get("victim").expect("the task is still there");
        assert!(t.get("deletionTimestamp").is_none(), "nothing changed: {t}");
        assert!(t["status"]["state"]["running"].is_object(), "{t}");
        assert!(super::support::pid_alive(pid), "the task still runs");
    }

    std::fs::remove_dir_all(&filler).unwrap();
    a.delete("victim");
    a.wait_gone("victim", T);
    assert!(!fs.path.join("victim").exists());
    wait_for(T, "the task's process to be gone", || {
        (!super::support::pid_alive(pid)).then_some(())
    });
}
