//! Clients that go away right after sending `POST /tasks` (a reset, or a plain close):
//! whatever the agent accepted is started and runs once; whatever it did not accept can be
//! created again. Nothing is left `waiting` for good, and no retry meets a 409 for a task
//! that never runs.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde_json::json;

use super::common::{Rng, marking, runs};
use super::support::agent::Agent;

#[test]
fn clients_that_disconnect_mid_create_leave_no_task_behind_unstarted() {
    let mut rng = Rng::from_env("disconnect");
    let a = Agent::start(&[]);
    let markers = a.data_dir.parent().unwrap().join("runs");
    let names: Vec<String> = (0..60).map(|i| format!("dc-{i}")).collect();
    for name in &names {
        let body = json!({"name": name, "spec": {"process": {
            "command": ["sh", "-c", marking(&markers, "")]}}})
        .to_string();
        let req = format!(
            "POST /tasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(a.addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        if rng.range(0, 2) == 0 {
            // RST instead of FIN: what a client's deadline does to a pooled connection.
            nix::sys::socket::setsockopt(
                &s.as_fd(),
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            )
            .unwrap();
        }
        if rng.range(0, 4) == 0 {
            std::thread::sleep(Duration::from_millis(rng.range(0, 3)));
        }
        drop(s);
    }

    // Each name either exists and reaches `terminated`, or never existed and can be
    // created now.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pending: BTreeSet<&String> = names.iter().collect();
    let mut recreated = 0;
    while !pending.is_empty() {
        assert!(
            Instant::now() < deadline,
            "still not terminated: {:?}",
            pending
                .iter()
                .map(|n| (n.as_str(), a.get(n).map(|t| t["status"].clone())))
                .collect::<Vec<_>>()
        );
        pending.retain(|name| match a.get(name) {
            None => {
                let r = a.create(json!({"name": name, "spec": {"process": {
                    "command": ["sh", "-c", marking(&markers, "")]}}}));
                assert!(
                    r.status == 201 || r.status == 409,
                    "recreate {name}: {} {}",
                    r.status,
                    r.text()
                );
                recreated += 1;
                true
            }
            Some(t) => t["status"]["state"].get("terminated").is_none(),
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{} of 60 never reached the agent and were created again",
        recreated
    );
    for name in &names {
        let t = a.get(name).unwrap();
        assert_eq!(t["status"]["state"]["terminated"]["exitCode"], 0, "{t}");
    }
    let ran = runs(&markers);
    for name in &names {
        assert_eq!(ran.get(name), Some(&1), "{name} ran once: {ran:?}");
    }
}
