//! What a host task starts with besides its command, compared with a container
//! runtime's defaults: its user's `HOME`/`USER`/`LOGNAME` and none of the launching
//! shell's variables, no capability (bounding set included) as another user, and
//! containerd's open-file limits without core dumps. Real agents (as root) and real
//! tasks reading their own `/proc/self/status` and limits. Needs root.

use std::time::Duration;

use crate::support::agent::Agent;
use serde_json::json;

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

const SECCOMP_PROBE: &str = "grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; \
     if unshare -U true 2>/dev/null; then echo unshare: allowed; else echo unshare: refused; fi; \
     if unshare -m true 2>/dev/null; then echo mount-ns: allowed; else echo mount-ns: refused; fi";

fn seccomp_probe(a: &Agent, name: &str, sc: serde_json::Value) -> String {
    let r = a.create(json!({"name": name, "spec": {"process": {
        "command": ["sh", "-c", SECCOMP_PROBE], "securityContext": sc}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(a.wait_state(name, "terminated", T)["exitCode"], 0);
    a.stdout(name)
}

/// `RuntimeDefault` refuses what containerd's default profile refuses (here: new
/// namespaces, which the agent's root could otherwise make); unset, nothing changes.
#[test]
fn a_task_asking_for_runtime_default_runs_under_the_seccomp_filter() {
    let a = Agent::start(&[]);
    let out = seccomp_probe(
        &a,
        "filtered",
        json!({"seccompProfile": {"type": "RuntimeDefault"}}),
    );
    assert_eq!(
        out, "NoNewPrivs:\t1\nSeccomp:\t2\nunshare: refused\nmount-ns: refused\n",
        "{out}"
    );
    let out = seccomp_probe(&a, "plain", json!({}));
    assert!(out.contains("Seccomp:\t0\n"), "{out}");
    assert!(
        out.contains("mount-ns: allowed"),
        "the agent's root may: {out}"
    );
    // What can't be done is a 400 naming the field.
    for (sc, field) in [
        (
            json!({"seccompProfile": {"type": "Localhost", "localhostProfile": "p.json"}}),
            "seccompProfile.type",
        ),
        (
            json!({"seccompProfile": {"type": "RuntimeDefault"}, "allowPrivilegeEscalation": true}),
            "seccompProfile",
        ),
    ] {
        let r = a.create(json!({"name": "bad", "spec": {"process": {
            "command": ["true"], "securityContext": sc}}}));
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.text().contains(field), "{}", r.text());
    }
}

#[test]
fn restricted_filters_every_task_and_refuses_unconfined() {
    let a = Agent::start(&["--task-policy", "restricted", "--task-run-as-user", "65534"]);
    let out = seccomp_probe(&a, "default", json!({}));
    assert!(out.starts_with("NoNewPrivs:\t1\nSeccomp:\t2\n"), "{out}");
    let r = a.create(json!({"name": "open", "spec": {"process": {
        "command": ["true"], "securityContext": {"seccompProfile": {"type": "Unconfined"}}}}}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("seccompProfile.type") && r.text().contains("restricted"),
        "{}",
        r.text()
    );
}
