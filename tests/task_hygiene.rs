//! What a host task starts with besides its command, compared with a container
//! runtime's defaults: its user's `HOME`/`USER`/`LOGNAME` and none of the launching
//! shell's variables, no capability (bounding set included) as another user, and
//! containerd's open-file limits without core dumps. Real agents (as root) and real
//! tasks reading their own `/proc/self/status` and limits. Needs root.

mod support;

use std::time::Duration;

use serde_json::json;
use support::agent::Agent;

const T: Duration = Duration::from_secs(30);

const PROBE: &str = "env; grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; \
                     echo nofile $(ulimit -Sn) $(ulimit -Hn); echo core $(ulimit -Sc) $(ulimit -Hc)";

fn probe(a: &Agent, name: &str) -> String {
    let r = a.create(json!({"name": name, "spec": {"process": {
        "command": ["sh", "-c", PROBE],
        "env": [{"name": "TASK_OWN", "value": "kept"}]}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(a.wait_state(name, "terminated", T)["exitCode"], 0);
    a.stdout(name)
}

/// containerd's open-file limits, the hard one raised only where the agent may
/// (`CAP_SYS_RESOURCE`; this test runs with the agent's privileges).
fn nofile_line() -> String {
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff =
        u64::from_str_radix(line(&own, "CapEff:").split_whitespace().nth(1).unwrap(), 16).unwrap();
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: u64 = line(&limits, "Max open files")
        .split_whitespace()
        .nth(4)
        .unwrap()
        .parse()
        .unwrap();
    let hard = if eff & (1 << 24) != 0 {
        524288
    } else {
        hard.min(524288)
    };
    format!("nofile 1024 {hard}")
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {out}"))
}

/// The shell that started the agent left its bookkeeping in the agent's environment.
const SHELL_ENV: &[(&str, &str)] = &[
    ("HOME", "/root"),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("PWD", "/somewhere"),
    ("OLDPWD", "/before"),
    ("SHLVL", "2"),
    ("_", "/usr/bin/task-executor"),
];

#[test]
fn a_task_as_another_user_has_its_users_environment_no_capability_and_container_limits() {
    let data = tempfile::tempdir().unwrap();
    let a = Agent::start_in_with_env(
        &data.path().join("data"),
        &["--task-run-as-user", "65534"],
        SHELL_ENV,
    );
    let out = probe(&a, "nobody");
    for want in [
        "HOME=/nonexistent",
        "USER=nobody",
        "LOGNAME=nobody",
        "TASK_OWN=kept",
    ] {
        assert!(out.lines().any(|l| l == want), "{want}: {out}");
    }
    for shell in [
        "PWD=/somewhere",
        "OLDPWD=",
        "SHLVL=",
        "_=/usr/bin/task-executor",
    ] {
        assert!(!out.lines().any(|l| l.starts_with(shell)), "{shell}: {out}");
    }
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            line(&out, set).split_whitespace().nth(1),
            Some("0000000000000000"),
            "{out}"
        );
    }
    assert_eq!(line(&out, "nofile "), nofile_line(), "{out}");
    assert_eq!(line(&out, "core "), "core 0 0", "{out}");
}

#[test]
fn a_task_as_the_agent_keeps_its_capabilities_and_gets_roots_environment() {
    let data = tempfile::tempdir().unwrap();
    let a = Agent::start_in_with_env(&data.path().join("data"), &[], SHELL_ENV);
    let out = probe(&a, "root");
    assert!(out.lines().any(|l| l == "HOME=/root"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("SHLVL=")), "{out}");
    let own = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_eq!(line(&out, "CapBnd"), line(&own, "CapBnd"), "{out}");
    assert_eq!(line(&out, "nofile "), nofile_line(), "{out}");
}
