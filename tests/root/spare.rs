//! Spare shims: after each launch the shim server forks the next task's shim ahead, with
//! its task cgroups made (and the v1 ones joined), so a task starts without waiting for a
//! fork, `mkdir`s and cgroup moves. What a user checks: the task runs in the cgroups the
//! spare made before it was asked for, an agent starting beside it (in another PID
//! namespace, sharing the parent cgroup) leaves them alone, and nothing of a spare
//! outlives its server. Real shims, real cgroups; needs root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::wait_for;

const T: Duration = Duration::from_secs(30);

/// An agent that ran one task, and its spare shim once ready: its pid, and its cgroup
/// under each parent of that task's cgroups (containment first).
fn agent_with_a_spare() -> (Agent, i32, Vec<PathBuf>) {
    let a = Agent::start(&[]);
    a.run("first", &["true"]);
    a.wait_state("first", "terminated", T);
    let parents = parents_of(&a.claim("first"));
    assert!(parents.len() >= 2, "v2 and v1 cgroups here: {parents:?}");
    let (spare_pid, made) = spare(&a, &parents);
    (a, spare_pid, made)
}

/// The agent's shim server (its child running `shim-server`).
fn shim_server(a: &Agent) -> i32 {
    wait_for(T, "the agent's shim server", || {
        task_executor::sys::procfs::pids().into_iter().find(|pid| {
            let ppid = task_executor::sys::procfs::stat(*pid).map(|s| s.ppid);
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(a.pid()) && cmd.ends_with(b"shim-server\0")
        })
    })
}

/// The agent's spare shim, once it has made its cgroups: its pid, and its cgroup in each
/// of `parents` (the parents of a claimed task's cgroups).
fn spare(a: &Agent, parents: &[PathBuf]) -> (i32, Vec<PathBuf>) {
    let server = shim_server(a);
    wait_for(T, "a spare shim with its cgroups", || {
        let pids = task_executor::sys::procfs::pids();
        pids.into_iter()
            .filter(|p| task_executor::sys::procfs::stat(*p).is_some_and(|s| s.ppid == server))
            .find_map(|p| {
                let dirs: Vec<PathBuf> = parents
                    .iter()
                    .filter_map(|parent| made_by(parent, p))
                    .collect();
                (dirs.len() == parents.len()).then_some((p, dirs))
            })
    })
}

/// The task cgroup in `parent` named after process `pid`.
fn made_by(parent: &Path, pid: i32) -> Option<PathBuf> {
    std::fs::read_dir(parent).ok()?.flatten().find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        let rest = name.strip_prefix(&format!("task-{pid}-"))?;
        rest.split('-')
            .all(|n| n.parse::<u64>().is_ok())
            .then(|| e.path())
    })
}

/// The parents of a claim's cgroups: its containment cgroup's, then its limits'.
fn parents_of(claim: &serde_json::Value) -> Vec<PathBuf> {
    let parent = |v: &serde_json::Value| {
        Path::new(v.as_str().expect("a cgroup path"))
            .parent()
            .unwrap()
            .to_path_buf()
    };
    let mut out = vec![parent(&claim["cgroup"])];
    out.extend(claim["limits"].as_array().into_iter().flatten().map(parent));
    out
}

/// A task's claimed cgroups, containment first.
fn cgroups_of(claim: &serde_json::Value) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(claim["cgroup"].as_str().unwrap())];
    let limits = claim["limits"].as_array().into_iter().flatten();
    out.extend(limits.map(|v| PathBuf::from(v.as_str().unwrap())));
    out
}

#[test]
fn the_next_task_runs_in_the_cgroups_its_spare_shim_made_before_it_was_asked_for() {
    let (a, spare_pid, made) = agent_with_a_spare();
    // The v1 ones are joined ahead (the move is what costs); the v2 one stays empty, as
    // the task's processes are created in it.
    let procs = |d: &Path| std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
    assert!(procs(&made[0]).trim().is_empty(), "{}", made[0].display());
    for d in &made[1..] {
        assert!(
            procs(d).lines().any(|l| l == spare_pid.to_string()),
            "{}",
            d.display()
        );
    }

    a.run("second", &["sh", "-c", "cat /proc/self/cgroup"]);
    let t = a.wait_state("second", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    let c = a.claim("second");
    assert_eq!(c["shim"]["pid"], spare_pid, "{c}");
    assert_eq!(
        cgroups_of(&c),
        made,
        "the task's cgroups are those made ahead"
    );
    let leaf = made[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(a.stdout("second").contains(&leaf), "{}", a.stdout("second"));
    // Ended, the task's cgroups are removed as any task's are.
    wait_for(T, "the second task's cgroups removed", || {
        made.iter().all(|d| !d.exists()).then_some(())
    });
}

#[test]
fn an_agent_starting_in_another_pid_namespace_leaves_a_spares_cgroups_alone() {
    // Agents share the parent cgroup here; one in a PID namespace of its own can't tell
    // whether a pid of another namespace is alive, so it sweeps no cgroup named in one.
    let (a, spare_pid, made) = agent_with_a_spare();

    let other = Agent::start_in_pid_namespace(&[]);
    other.run("there", &["true"]);
    assert_eq!(
        other.wait_state("there", "terminated", T)["reason"],
        "Succeeded"
    );
    for d in &made {
        assert!(
            d.exists(),
            "{} removed by the other agent's start",
            d.display()
        );
    }
    drop(other);

    a.run("second", &["true"]);
    let t = a.wait_state("second", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    assert_eq!(a.claim("second")["shim"]["pid"], spare_pid);
}

#[test]
fn a_spare_shim_ends_and_removes_its_cgroups_when_its_server_is_gone() {
    let (mut a, spare_pid, made) = agent_with_a_spare();
    // The agent stops (SIGTERM): its shim server sees its socket close and exits, and so
    // does the spare, which no launch will ever reach.
    a.sigterm();
    wait_for(T, "the spare gone", || {
        let s = task_executor::sys::procfs::stat(spare_pid);
        s.is_none_or(|s| s.state == 'Z').then_some(())
    });
    wait_for(T, "the spare's cgroups removed", || {
        made.iter().all(|d| !d.exists()).then_some(())
    });
}

#[test]
fn task_cgroups_of_a_pid_namespace_without_processes_are_removed_at_start_and_others_kept() {
    // A spare killed with its PID namespace (a pod's, a test's `unshare`) leaves cgroups
    // named in a namespace no agent of the initial one is in: once that namespace has no
    // process left, nothing of it is alive, and the next start removes them. One whose
    // namespace still has processes is kept: its pid can't be judged from here.
    let (mut a, _, made) = agent_with_a_spare();
    let parents: Vec<PathBuf> = made.iter().map(|d| d.parent().unwrap().into()).collect();
    let mut other_ns = std::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", "sleep", "35113"])
        .spawn()
        .unwrap();
    let sleeper = wait_for(T, "sleep 35113 in its PID namespace", || {
        crate::support::pids_with_cmdline(&["sleep", "35113"])
            .first()
            .copied()
    });
    let live_ns = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{sleeper}/ns/pid"))
            .unwrap()
            .ino()
    };
    // (No namespace has inode 1.)
    let dead = "task-2147483003-1-1".to_string();
    let live = format!("task-1-1-{live_ns}");
    for p in &parents {
        std::fs::create_dir(p.join(&dead)).unwrap();
        std::fs::create_dir(p.join(&live)).unwrap();
    }

    a.restart();
    let after: Vec<(bool, bool)> = parents
        .iter()
        .map(|p| (p.join(&dead).exists(), p.join(&live).exists()))
        .collect();
    // Clean up before asserting, so a failure leaves nothing behind.
    let _ = other_ns.kill();
    let _ = other_ns.wait();
    for p in &parents {
        let _ = std::fs::remove_dir(p.join(&dead));
        let _ = std::fs::remove_dir(p.join(&live));
    }
    for (p, (dead_there, live_there)) in parents.iter().zip(after) {
        assert!(
            !dead_there,
            "{}: a dead namespace's cgroup is removed",
            p.display()
        );
        assert!(
            live_there,
            "{}: a live namespace's cgroup is kept",
            p.display()
        );
    }
}
