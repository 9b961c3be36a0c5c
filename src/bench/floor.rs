//! The durability floor of `task-executor bench`: what one task's create→terminated
//! costs in file work alone, with no process, no agent and no HTTP, measured in the same
//! run on the data dir's file system, beside the raw spawn.
//!
//! A task is answered `201` only once its record is durable (the store's own
//! `Store::create`: its directory, `task.json` fsynced, the journal made with its reserve,
//! the task directory and the data dir fsynced), and it runs only once its claim is
//! durable (the claim mark and line, fsynced), and its exit line is fdatasynced. The
//! floor does exactly that, in that order, so a machine whose disk is slow (or whose file
//! system is slow to allocate inodes just then) shows it here rather than as a gap the
//! agent seems to add: `create→terminated` is compared with the raw spawn plus this.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::runtime::journal;
use crate::task::layout::TaskDir;
use crate::task::model::TaskSpec;
use crate::task::store::{Store, TaskRecord};
use crate::task::time::Time;

/// Lines of the sizes a `/bin/true` task writes (claim, exit), so the appends are alike.
const CLAIM_LINE: &[u8] = br#"{"claimed":{"shim":{"pid":18006,"startTime":237522,"pidfdIno":115369},"nonce":"1a2511b5799-460c-1","cgroup":"/sys/fs/cgroup/unified/task-executor/task-18006-237522-4026531836","limits":[]}}
"#;
const EXIT_LINE: &[u8] = br#"{"exit":{"exitCode":0,"signal":null,"startedAt":"2026-12-07T15:24:36Z","finishedAt":"2026-12-07T15:24:36Z","timedOut":false,"stopRequested":false,"targetGone":false,"startError":null}}
"#;

pub struct Floor {
    /// One task's file work at a time.
    pub one: Vec<Duration>,
    /// Tasks' file work done per second by `threads` threads at once (the store's
    /// data-dir fsyncs shared between them, as in the agent).
    pub rate: f64,
    pub threads: usize,
}

/// Measures `samples` tasks' file work one at a time, then `threads` threads for `dur`,
/// in a store opened at `dir` (which stays: the caller removes it with the agent's, after
/// the other phases, since removing thousands of inodes slows the allocation of new ones
/// for a while on some file systems).
pub fn measure(
    dir: &Path,
    samples: usize,
    threads: usize,
    dur: Duration,
) -> Result<Floor, BenchError> {
    let store = Store::open(dir)?;
    let spec: TaskSpec = serde_json::from_value(serde_json::json!({
        "process": {"command": ["/bin/true"]}
    }))
    .map_err(io::Error::other)?;
    let one = (0..samples)
        .map(|i| {
            let t = Instant::now();
            one_task(&store, &spec, &format!("floor-{i}"))?;
            Ok(t.elapsed())
        })
        .collect::<io::Result<Vec<_>>>()?;
    let rate = super::rate(threads, dur, |c| {
        let (store, spec) = (store.clone(), spec.clone());
        move |i| Ok(one_task(&store, &spec, &format!("floor-{c}-{i}"))?)
    })?;
    Ok(Floor { one, rate, threads })
}

/// One task's durable file work, as the agent and its shim do it.
fn one_task(store: &Store, spec: &TaskSpec, name: &str) -> io::Result<()> {
    let rec = TaskRecord {
        name: name.to_string(),
        uid: name.to_string(),
        spec: spec.clone(),
        exec_mode: None,
        host_uid: None,
        created_at: Time::now(),
        deletion_timestamp: None,
        final_status: None,
    };
    let dir = store.create(&rec)?;
    let mut j = OpenOptions::new()
        .append(true)
        .open(TaskDir(&dir).journal())?;
    journal::set_claim_mark(&j, true)?;
    j.write_all(CLAIM_LINE)?;
    j.sync_all()?;
    j.write_all(EXIT_LINE)?;
    j.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_leaves_what_a_finished_task_leaves() {
        // The floor is only a floor if it does a task's file work: a record the store
        // loads, and a journal with the claim mark, a claim and an exit that parse.
        let tmp = tempfile::tempdir().unwrap();
        let floor = measure(tmp.path(), 3, 2, Duration::from_millis(50)).unwrap();
        assert_eq!(floor.one.len(), 3);
        assert!(floor.rate > 0.0, "the threads did some work");
        let dir = tmp.path().join("floor-0");
        let rec: TaskRecord =
            serde_json::from_slice(&std::fs::read(TaskDir(&dir).record()).unwrap()).unwrap();
        assert_eq!(rec.name, "floor-0");
        assert!(journal::claim_marked(&dir));
        let run = journal::read_run(&dir).unwrap();
        assert!(run.claimed.is_some(), "the claim line parses");
        assert_eq!(run.exit.map(|x| x.exit_code), Some(Some(0)));
    }
}
