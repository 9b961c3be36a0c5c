//! `kill -9` of the agent, of a shim, and of the shim server, at random moments while
//! clients create tasks concurrently.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::common::{Rng, marking, runs, shim_server};
use super::support::agent::{Agent, started_record};
use super::support::{http, pid_alive};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    Agent,
    Shim,
    ShimServer,
}

const CLIENTS: usize = 4;
const PER_CLIENT: usize = 6;

#[test]
fn kill_nine_of_agent_shim_and_shim_server_during_concurrent_creates() {
    let mut rng = Rng::from_env("kills");
    let mut a = Agent::start(&[]);
    let markers = a.data_dir.parent().unwrap().join("runs");
    // name → the victim of the round it was created in
    let mut accepted: BTreeMap<String, Victim> = BTreeMap::new();
    let mut unanswered: BTreeSet<String> = BTreeSet::new();
    // Tasks whose shim was killed.
    let mut orphaned: BTreeSet<String> = BTreeSet::new();
    let rounds = [
        Victim::Agent,
        Victim::Shim,
        Victim::ShimServer,
        Victim::Agent,
        Victim::Shim,
        Victim::ShimServer,
    ];
    for (round, victim) in rounds.into_iter().enumerate() {
        let addr = a.addr;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let markers = markers.clone();
                let nap = rng.range(100, 600);
                std::thread::spawn(move || {
                    (0..PER_CLIENT)
                        .map(|i| {
                            let name = format!("r{round}-c{c}-{i}");
                            let script = marking(&markers, &format!("sleep 0.{nap:03}; exit 0"));
                            let body = json!({"name": name, "spec": {"process": {
                                "command": ["sh", "-c", script]}}})
                            .to_string();
                            let r = http::request(addr, "POST", "/tasks", Some(body.as_bytes()));
                            (name, r.map(|r| (r.status, r.text())))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.range(20, 400)));
        let killed = kill(&mut a, victim, &mut rng);
        eprintln!("round {round}: killed {victim:?} {killed:?}");
        if let Some((_, Some(task))) = &killed {
            orphaned.insert(task.clone());
        }
        for c in clients {
            for (name, r) in c.join().unwrap() {
                match r {
                    Ok((201, _)) => {
                        accepted.insert(name, victim);
                    }
                    Ok((status, text)) if status >= 500 => {
                        // Only the agent's own death may cut a create short.
                        panic!("{name}: {status} {text}\n{}", a.log_tail())
                    }
                    Ok((status, text)) => panic!("{name}: {status} {text}"),
                    Err(_) => {
                        assert_eq!(victim, Victim::Agent, "{name}: no answer");
                        unanswered.insert(name);
                    }
                }
            }
        }
        if victim == Victim::Agent {
            a.restart();
        }
    }

    // Every accepted task reports a result; so does every unanswered one the agent kept.
    let deadline = Instant::now() + Duration::from_secs(60);
    let all: Vec<&String> = accepted.keys().chain(&unanswered).collect();
    let mut results: BTreeMap<String, Value> = BTreeMap::new();
    for name in all {
        loop {
            match a.get(name) {
                None => {
                    assert!(unanswered.contains(name), "accepted {name} was lost");
                    break;
                }
                Some(t) => {
                    if let Some(term) = t["status"]["state"].get("terminated") {
                        results.insert(name.clone(), term.clone());
                        break;
                    }
                    assert!(Instant::now() < deadline, "{name} never finished: {t}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    let ran = runs(&markers);
    for (name, count) in &ran {
        assert_eq!(*count, 1, "{name} ran {count} times");
        assert!(results.contains_key(name), "{name} ran but reports nothing");
    }
    let mut supervisor_lost = 0;
    for (name, t) in &results {
        let reason = t["reason"].as_str().unwrap();
        match reason {
            "Succeeded" => assert_eq!(ran.get(name), Some(&1), "{name}: {t}"),
            // Its own supervisor was killed: the task was stopped, which is reported.
            "SupervisorLost" => {
                assert!(orphaned.contains(name), "{name}: {t}");
                supervisor_lost += 1;
            }
            _ => panic!("{name}: unexpected result {t}"),
        }
    }
    eprintln!(
        "{} accepted, {} unanswered ({} kept), {} supervisors lost, all others ran once",
        accepted.len(),
        unanswered.len(),
        results.len() - accepted.len(),
        supervisor_lost
    );
    a.delete_all_and_stop();
}

/// Kills the victim; returns its pid and, for a shim, its task.
fn kill(a: &mut Agent, victim: Victim, rng: &mut Rng) -> Option<(i32, Option<String>)> {
    match victim {
        Victim::Agent => {
            let pid = a.pid();
            a.kill9();
            Some((pid, None))
        }
        Victim::Shim => {
            // A shim whose task still runs.
            let shims: Vec<(i32, String)> = std::fs::read_dir(&a.data_dir)
                .unwrap()
                .flatten()
                .filter_map(|e| {
                    let pid = started_record(&e.path())?["shim"]["pid"].as_i64()? as i32;
                    Some((pid, e.file_name().to_string_lossy().into_owned()))
                })
                .filter(|(p, _)| pid_alive(*p))
                .collect();
            let (pid, task) = shims
                .get(rng.range(0, shims.len().max(1) as u64) as usize)?
                .clone();
            sigkill(pid);
            Some((pid, Some(task)))
        }
        Victim::ShimServer => {
            let pid = shim_server(a.pid())?;
            sigkill(pid);
            Some((pid, None))
        }
    }
}

fn sigkill(pid: i32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}
