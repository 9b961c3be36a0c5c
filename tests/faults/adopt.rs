//! Re-adopting tasks whose journals say less than they should: a restart's recovery
//! never waits on them (the API comes up with every task listed) and shows no made-up
//! time: a start the journal no longer holds is unknown (`null`), not the adoption's.

use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use super::common::{marking, runs};
use super::support::agent::Agent;

const T: Duration = Duration::from_secs(30);

#[test]
fn running_tasks_whose_journals_were_emptied_show_an_unknown_start_until_they_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let markers = tmp.path().join("markers");
    let go = tmp.path().join("go");
    let mut a = Agent::start_in(&data, &[]);
    // More than one round of the recovery's concurrent adoptions.
    let n = 40;
    let script = marking(
        &markers,
        &format!("while [ ! -e {} ]; do sleep 0.1; done", go.display()),
    );
    for i in 0..n {
        a.run_sh(&format!("t{i}"), &script);
    }
    for i in 0..n {
        a.wait_state(&format!("t{i}"), "running", T);
    }
    a.kill9();
    for i in 0..n {
        // Emptied in place under the running shim, which keeps it open and locked.
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(data.join(format!("t{i}")).join("run.jsonl"))
            .unwrap();
    }
    a.restart();
    for i in 0..n {
        let t = a.get(&format!("t{i}")).unwrap();
        let running = &t["status"]["state"]["running"];
        assert!(running.is_object(), "t{i}: {t}");
        assert!(
            running["startedAt"].is_null(),
            "t{i}: the start is unknown, not the adoption's time: {t}"
        );
    }
    std::fs::write(&go, b"").unwrap();
    for i in 0..n {
        let t = a.wait_state(&format!("t{i}"), "terminated", T);
        assert_eq!(t["exitCode"], 0, "t{i}: {t}");
        assert!(t["startedAt"].is_string(), "the shim's exit line says: {t}");
    }
    let ran = runs(&markers);
    assert!(ran.values().all(|n| *n == 1), "each ran once: {ran:?}");
    assert_eq!(ran.len(), n);
}

#[test]
fn a_launch_a_supervisor_is_still_taking_is_settled_after_the_api_is_up() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut a = Agent::start_in(&data, &[]);
    a.run("t", &["true"]);
    a.wait_state("t", "terminated", T);
    a.kill9();
    // The journal as a launch just written leaves it (its launch line, no claim), and the
    // task directory locked as a supervisor that is about to claim it locks it.
    let dir = data.join("t");
    let journal = std::fs::read(dir.join("run.jsonl")).unwrap();
    let first = journal.split_inclusive(|b| *b == b'\n').next().unwrap();
    assert!(first.starts_with(b"{\"launch\""));
    std::fs::write(dir.join("run.jsonl"), first).unwrap();
    let held = Flock::lock(
        std::fs::File::open(&dir).unwrap(),
        FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    a.restart();
    // The API is up while the supervisor holds the task; the task waits for it.
    let t = a.get("t").unwrap();
    assert!(t["status"]["state"]["waiting"].is_object(), "{t}");
    // It never claimed the launch and let go: nothing of it ran, so it is started.
    drop(held);
    let t = a.wait_state("t", "terminated", T);
    assert_eq!(t["exitCode"], 0, "{t}");
}
