//! Nothing of a task outlives it, even after its supervisor (shim) died: each process
//! task gets a cgroup of its own (this machine has both cgroup v2 with `cgroup.kill` and
//! the v1 freezer), and without cgroups a task with a uid of its own is swept by its uid.
//! Only what is the task's is touched: a process whose exit is recorded is never
//! signalled. Real processes, real cgroups; needs root.

use std::os::unix::process::CommandExt;
use std::time::Duration;

use crate::support::agent::Agent;
use crate::support::{pid_alive, pids_with_cmdline, wait_for};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// `sleep N` processes (N unique to each test), SIGKILLed when dropped, so a failing test
/// leaves nothing running.
struct Sleep(&'static str);

impl Sleep {
    fn pids(&self) -> Vec<i32> {
        pids_with_cmdline(&["sleep", self.0])
    }

    fn wait_running(&self) -> i32 {
        wait_for(T, &format!("sleep {} running", self.0), || {
            self.pids().first().copied()
        })
    }

    /// Whether it is gone within a few seconds (SIGKILLed processes only need to be
    /// scheduled to die).
    fn gone_soon(&self) -> bool {
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if self.pids().is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        for p in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn kill9(pid: i32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[test]
fn a_task_that_kills_its_own_supervisor_leaves_nothing_running() {
    // The issue's reproduction: a setsid'd, double-forked daemon re-parented to the shim,
    // then the shim killed by the task itself. Without a cgroup the daemon survived
    // SupervisorLost and DELETE.
    let a = Agent::start(&[]);
    let daemon = Sleep("35001");
    let r = a.create(json!({"name": "selfkill", "spec": {"process": {
        "command": ["sh", "-c", "(setsid sleep 35001 &); sleep 0.3; kill -9 $PPID; sleep 1"],
        "timeoutSeconds": 5}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("selfkill", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    assert!(
        daemon.gone_soon(),
        "the daemon outlived its task's supervisor\n{}",
        a.log_tail()
    );
    // The cgroup is journaled with the claim, and removed once proven empty, before the
    // end is shown.
    let cg = a.claim("selfkill")["cgroup"]
        .as_str()
        .expect("a cgroup in the claim")
        .to_string();
    assert!(
        !std::path::Path::new(&cg).exists(),
        "{cg} removed with the task's end"
    );
    // Proven, so said.
    let msg = t["message"].as_str().unwrap();
    assert!(
        msg.contains("stopped: its cgroup was killed and is empty"),
        "{t}"
    );
    a.delete("selfkill");
    a.wait_gone("selfkill", T);
}

#[test]
fn a_tasks_cgroup_is_removed_when_the_task_ends() {
    // Not only at DELETE: an agent that never deletes its tasks leaves no empty cgroup
    // per task behind.
    let a = Agent::start(&[]);
    a.run_sh("ends", "echo done");
    let t = a.wait_state("ends", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    let cg = std::path::PathBuf::from(a.claim("ends")["cgroup"].as_str().expect("a cgroup"));
    wait_for(T, "the task's cgroup removed by its supervisor", || {
        (!cg.exists()).then_some(())
    });
    // A task whose daemon runs on keeps its cgroup (the daemon is in it) until deleted.
    let daemon = Sleep("35081");
    a.run_sh("leaves", "(setsid sleep 35081 &); echo done");
    a.wait_state("leaves", "terminated", T);
    daemon.wait_running();
    let cg = std::path::PathBuf::from(a.claim("leaves")["cgroup"].as_str().unwrap());
    assert!(cg.exists());
    a.delete("leaves");
    a.wait_gone("leaves", T);
    assert!(daemon.gone_soon() && !cg.exists());
}

#[test]
fn killing_a_shim_ends_its_tasks_daemons_after_an_agent_restart() {
    // kill -9 of the agent, then of the shim: the restarted agent knows the task's cgroup
    // only from the journal, and ends everything in it.
    let mut a = Agent::start(&[]);
    let daemon = Sleep("35011");
    let child = Sleep("35012");
    a.run_sh(
        "orphans",
        "(setsid sleep 35011 &); sleep 35012 & echo up; while true; do sleep 0.2; done",
    );
    a.wait_state("orphans", "running", T);
    daemon.wait_running();
    child.wait_running();
    let started = crate::support::agent::started_record(&a.task_dir("orphans")).unwrap();
    let shim = started["shim"]["pid"].as_i64().unwrap() as i32;
    // Both are recorded with their pidfd inodes (pidfs), which the stop checks.
    let journal = std::fs::read_to_string(a.task_dir("orphans").join("run.jsonl")).unwrap();
    for (what, id) in [
        ("shim", &started["shim"]),
        ("main", &started["main"]),
        ("claim", &a.claim("orphans")["shim"]),
    ] {
        assert!(id["pidfdIno"].as_u64().is_some(), "{what}: {journal}");
    }
    assert!(
        journal.contains(r#"{"spawned":{"process":{"pid":"#),
        "{journal}"
    );
    assert_eq!(journal.matches("pidfdIno").count(), 4, "{journal}");
    a.kill9();
    kill9(shim);
    a.restart();
    let t = a.wait_state("orphans", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    assert!(daemon.gone_soon(), "the daemon survived\n{}", a.log_tail());
    assert!(child.gone_soon(), "the child survived\n{}", a.log_tail());
}

/// A task's uid (`--task-uid-range` with one uid) is handed to the next task only when
/// nothing of the previous one runs: its daemon, escaped from a killed shim, must be gone
/// when the next task gets the same uid.
fn uid_is_free_only_when_empty(extra: &[&str], n: &'static str) {
    let mut args = vec!["--task-uid-range", "41000-41000"];
    args.extend_from_slice(extra);
    let a = Agent::start(&args);
    let daemon = Sleep(n);
    a.run_sh(
        "first",
        &format!("(setsid sleep {n} &); echo up; while true; do sleep 0.2; done"),
    );
    a.wait_state("first", "running", T);
    daemon.wait_running();
    // The task runs as its uid: it can't kill its (root) shim itself.
    let shim = crate::support::agent::started_record(&a.task_dir("first")).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap() as i32;
    kill9(shim);
    let t = a.wait_state("first", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    // "Stopped" only where proven: by the cgroup seen empty.
    let msg = t["message"].as_str().unwrap();
    let contained = !extra.contains(&"--task-cgroups=false");
    assert_eq!(msg.contains("the task was stopped"), contained, "{t}");
    if !contained {
        assert!(
            msg.contains("nothing proves that all of the task stopped"),
            "{t}"
        );
    }
    a.delete("first");
    a.wait_gone("first", T);
    assert!(
        daemon.pids().is_empty(),
        "the first task's daemon runs when its uid is free again\n{}",
        a.log_tail()
    );
    a.run_sh("second", "id -u");
    let t = a.wait_state("second", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    assert_eq!(a.stdout("second").trim(), "41000");
}

#[test]
fn a_uid_is_handed_on_only_when_nothing_of_its_task_runs() {
    uid_is_free_only_when_empty(&[], "35021");
}

#[test]
fn without_cgroups_a_task_with_its_own_uid_is_swept_by_its_uid() {
    uid_is_free_only_when_empty(&["--task-cgroups=false"], "35031");
}

#[test]
fn the_containment_is_shown_in_metrics() {
    let a = Agent::start(&[]);
    let m = a.call("GET", "/metrics", None).text();
    assert!(
        m.contains(r#"task_executor_containment{mechanism="cgroup-v2"} 1"#),
        "{m}"
    );
    let a = Agent::start(&["--task-cgroups=false"]);
    let m = a.call("GET", "/metrics", None).text();
    assert!(
        m.contains(r#"task_executor_containment{mechanism="none"} 1"#),
        "{m}"
    );
}

#[test]
fn delete_never_signals_the_group_of_a_main_whose_exit_is_recorded() {
    // The journal names a main process whose exit is recorded and whose shim is dead; its
    // pid (and, within a clock tick, its start time) may be someone else's by now. Staged
    // with a live bystander as that identity: DELETE must leave it alone.
    let mut a = Agent::start(&["--task-cgroups=false"]);
    a.kill9();
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let dir = a.data_dir.join("ended");
    std::fs::create_dir_all(&dir).unwrap();
    let argv = ["true"];
    let rec = json!({"name": "ended", "uid": "uid-ended", "createdAt": "2026-01-01T00:00:00Z",
                     "spec": {"process": {"command": argv}}});
    std::fs::write(dir.join("task.json"), rec.to_string()).unwrap();
    let _bystander = Sleep("35041");
    let mut bystander = std::process::Command::new("sleep")
        .arg("35041")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = bystander.id() as i32;
    let start = task_executor::sys::procfs::stat(pid).unwrap().start_time;
    let id = json!({"pid": pid, "startTime": start});
    let dead_shim = json!({"pid": 4_000_000, "startTime": 1});
    let lines = [
        json!({"launch": {"argv": argv, "env": [], "graceMs": 1000, "maxLogBytes": 4096,
                          "bootId": this_boot.trim()}}),
        json!({"claimed": {"shim": dead_shim}}),
        json!({"started": {"shim": dead_shim, "main": id, "startedAt": "2026-01-01T00:00:01Z"}}),
        json!({"exit": {"exitCode": 0, "startedAt": "2026-01-01T00:00:01Z",
                        "finishedAt": "2026-01-01T00:00:02Z"}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("run.jsonl"), text).unwrap();
    a.restart();
    let t = a.wait_state("ended", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    a.delete("ended");
    a.wait_gone("ended", T);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        pid_alive(pid),
        "DELETE killed a process group the task no longer owned"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn a_tasks_main_process_dies_with_its_supervisor_even_with_no_agent() {
    // No cgroups and no agent to clean up (it was killed first): the main process dies
    // of its parent-death signal the moment its shim does.
    let mut a = Agent::start(&["--task-cgroups=false"]);
    let main = Sleep("35051");
    a.run("orphaned", &["sleep", "35051"]);
    a.wait_state("orphaned", "running", T);
    let pid = main.wait_running();
    let shim =
        crate::support::agent::started_record(&a.task_dir("orphaned")).unwrap()["shim"]["pid"]
            .as_i64()
            .unwrap() as i32;
    a.kill9();
    kill9(shim);
    assert!(main.gone_soon(), "main (pid {pid}) outlived its supervisor");
}

/// `python3 SCRIPT NR ERRNO argv...` runs argv under a seccomp filter that answers ERRNO
/// to system call NR (x86-64 numbers), as a runtime's seccomp profile may: an agent as a
/// pod confined by an older or stricter profile runs it.
const REFUSE_SYSCALL: &str = r#"
import ctypes, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
nr, errno = int(sys.argv[1]), int(sys.argv[2])
def ins(code, jt, jf, k): return struct.pack("HBBI", code, jt, jf, k)
prog = b"".join([
    ins(0x20, 0, 0, 0),                  # ld [nr]
    ins(0x15, 0, 1, nr),                 # jeq NR
    ins(0x06, 0, 0, 0x00050000 | errno), # ret ERRNO(errno)
    ins(0x06, 0, 0, 0x7fff0000),         # ret ALLOW
])
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
fbuf = ctypes.create_string_buffer(fprog)
assert libc.prctl(38, 1, 0, 0, 0) == 0                      # no_new_privs
assert libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(fbuf)), 0, 0) == 0  # filter
os.execv(sys.argv[3], sys.argv[3:])
"#;

/// An agent whose every process gets ERRNO for system call NR (x86-64).
fn agent_refused(nr: &str, errno: &str, dir: &std::path::Path) -> Agent {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the filter's syscall numbers"
    );
    let script = dir.join("refuse_syscall.py");
    std::fs::write(&script, REFUSE_SYSCALL).unwrap();
    Agent::start_wrapped(&["python3", script.to_str().unwrap(), nr, errno], &[])
}

/// The pids in a cgroup.
fn members(cg: &std::path::Path) -> Vec<i32> {
    let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
    let mut pids: Vec<i32> = procs.lines().map(|l| l.parse().unwrap()).collect();
    pids.sort();
    pids
}

/// A task whose main command leaves a daemon: its cgroup holds exactly the task's
/// processes (plus its shim when `shim_inside`), and a DELETE ends all of them and
/// removes it.
fn task_in_its_cgroup(a: &Agent, name: &str, n: &'static str, shim_inside: bool) {
    let main = Sleep(n);
    a.run_sh(name, &format!("(setsid sleep {n} &); exec sleep {n}"));
    a.wait_state(name, "running", T);
    let cg = std::path::PathBuf::from(a.claim(name)["cgroup"].as_str().expect("a cgroup"));
    let shim = crate::support::agent::started_record(&a.task_dir(name)).unwrap()["shim"]["pid"]
        .as_i64()
        .unwrap() as i32;
    let mut want = wait_for(T, "main and its daemon running", || {
        let p = main.pids();
        (p.len() == 2).then_some(p)
    });
    if shim_inside {
        want.push(shim);
    }
    want.sort();
    assert_eq!(members(&cg), want, "{} (shim {shim})", cg.display());
    a.delete(name);
    a.wait_gone(name, T);
    assert!(main.gone_soon(), "nothing of the task outlives its delete");
    assert!(!cg.exists(), "{} removed", cg.display());
}

#[test]
fn a_tasks_cgroup_holds_the_task_and_not_its_supervisor() {
    // cgroup v2 here: the task's processes are created in its cgroup, so what the cgroup
    // counts (its usage, its limits) is the task's alone. (x86-64 only: elsewhere the
    // shim moves in, as where clone3 is refused, below.)
    let a = Agent::start(&[]);
    let shim_inside = std::env::consts::ARCH != "x86_64";
    task_in_its_cgroup(&a, "alone", "35091", shim_inside);
}

#[test]
fn where_clone3_is_refused_the_supervisor_enters_the_tasks_cgroup() {
    // As under Docker's or containerd's default seccomp profile (clone3: ENOSYS): the
    // shim moves itself into the cgroup, and the task is contained all the same.
    let dir = tempfile::tempdir().unwrap();
    let a = agent_refused("435", "38", dir.path());
    task_in_its_cgroup(&a, "entered", "35093", true);
    // Hooks too: each command of a task is in it.
    let r = a.create(json!({"name": "hooked", "spec": {"process": {
        "command": ["sh", "-c", "cat /proc/self/cgroup"],
        "lifecycle": {"preStart": {"exec": {"command": ["sh", "-c", "cat /proc/self/cgroup"]}}}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let t = a.wait_state("hooked", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    let cg = a.claim("hooked")["cgroup"].as_str().unwrap().to_string();
    let leaf = std::path::Path::new(&cg)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap();
    assert!(a.stdout("hooked").contains(leaf), "main in {leaf}");
    let r = a.call("GET", "/tasks/hooked/logs?hook=preStart", None);
    assert!(r.text().contains(leaf), "preStart in {leaf}: {}", r.text());
}

#[test]
fn an_agent_that_cannot_signal_through_pidfds_is_not_ready_and_says_why() {
    // pidfd_send_signal: EPERM, as a profile older than the call answers.
    let dir = tempfile::tempdir().unwrap();
    let a = agent_refused("424", "1", dir.path());
    let r = a.call("GET", "/readyz", None);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("pidfd_send_signal"), "{}", r.text());
    // The same agent without the filter is ready.
    let a = Agent::start(&[]);
    assert_eq!(a.call("GET", "/readyz", None).status, 200);
}

#[test]
fn tasks_keep_the_containers_oom_score_after_the_inits_shim_server_died() {
    // The init raises the agent's oom_score_adj, not the shim server's. Once that server
    // is killed, the agent starts one of its own: its tasks must not inherit the agent's.
    let init = crate::support::init::Init::start(&[], &[]);
    let a = &init.agent;
    let base = crate::support::init::oom_score_adj(init.pid());
    let server = init.server_pid().expect("the init's shim server");
    kill9(server);
    wait_for(T, "the server gone", || (!pid_alive(server)).then_some(()));
    a.run("oom", &["cat", "/proc/self/oom_score_adj"]);
    let t = a.wait_state("oom", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    assert_eq!(a.stdout("oom").trim(), base.to_string());
}

#[test]
fn the_init_passes_no_inherited_descriptor_to_the_agent() {
    // A descriptor without close-on-exec, as a careless caller leaves one.
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("leaked-descriptor");
    let f = std::fs::File::create(&marker).unwrap();
    nix::fcntl::fcntl(
        &f,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let init = crate::support::init::Init::start(&[], &[]);
    drop(f);
    let agent = init.agent_pid().unwrap();
    let leaked: Vec<String> = std::fs::read_dir(format!("/proc/{agent}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| p.contains("leaked-descriptor"))
        .collect();
    assert!(leaked.is_empty(), "the agent holds {leaked:?}");
}

#[test]
fn with_end_task_with_main_what_main_left_running_ends_with_it() {
    let a = Agent::start(&["--end-task-with-main"]);
    let daemon = Sleep("35061");
    let child = Sleep("35062");
    a.run_sh(
        "leaves",
        "(setsid sleep 35061 &); sleep 35062 & sleep 0.5; echo done",
    );
    let t = a.wait_state("leaves", "terminated", T);
    assert_eq!(t["reason"], "Succeeded", "{t}");
    assert_eq!(a.stdout("leaves"), "done\n");
    assert!(
        daemon.gone_soon(),
        "the daemon outlived main\n{}",
        a.log_tail()
    );
    assert!(
        child.gone_soon(),
        "the child outlived main\n{}",
        a.log_tail()
    );
    // Without the option they run on (upstream's behaviour) until the task is deleted.
    let a = Agent::start(&[]);
    let daemon = Sleep("35063");
    a.run_sh("stays", "(setsid sleep 35063 &); sleep 0.5");
    a.wait_state("stays", "terminated", T);
    daemon.wait_running();
    a.delete("stays");
    a.wait_gone("stays", T);
    assert!(daemon.gone_soon(), "deleted with its task");
}

#[test]
fn a_process_that_took_a_recorded_pid_in_the_same_tick_is_never_signalled() {
    // The journal names a main process (pid and start time, as a pid reused within one
    // clock tick shows them) whose shim died without recording its exit: the agent stops
    // what is left (`SupervisorLost`). Staged with a live bystander group under that pid
    // and start time, but another pidfd inode (pidfs, Linux 6.9+): it is another process,
    // and neither it, its group nor its children may be touched.
    let mut a = Agent::start(&["--task-cgroups=false"]);
    a.kill9();
    let this_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let dir = a.data_dir.join("recycled");
    std::fs::create_dir_all(&dir).unwrap();
    let argv = ["sleep", "35072"];
    let rec = json!({"name": "recycled", "uid": "uid-recycled", "createdAt": "2026-01-01T00:00:00Z",
                     "spec": {"process": {"command": argv}}});
    std::fs::write(dir.join("task.json"), rec.to_string()).unwrap();
    let bystanders = (Sleep("35071"), Sleep("35072"));
    let mut bystander = std::process::Command::new("sh")
        .arg("-c")
        .arg("sleep 35071 & exec sleep 35072")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = bystander.id() as i32;
    let child = bystanders.0.wait_running();
    bystanders.1.wait_running();
    let real = task_executor::sys::procfs::ProcIdentity::of(pid).unwrap();
    let ino = real.pidfd_ino.expect("pidfs on this kernel (6.9+)");
    let id = json!({"pid": pid, "startTime": real.start_time, "pidfdIno": ino + 1});
    let dead_shim = json!({"pid": 4_000_000, "startTime": 1});
    let lines = [
        json!({"launch": {"argv": argv, "env": [], "graceMs": 1000, "maxLogBytes": 4096,
                          "bootId": this_boot.trim()}}),
        json!({"claimed": {"shim": dead_shim}}),
        json!({"spawned": {"process": id}}),
        json!({"started": {"shim": dead_shim, "main": id, "startedAt": "2026-01-01T00:00:01Z"}}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(dir.join("run.jsonl"), text).unwrap();
    a.restart();
    let t = a.wait_state("recycled", "terminated", T);
    assert_eq!(t["reason"], "SupervisorLost", "{t}");
    let msg = t["message"].as_str().unwrap();
    assert!(
        msg.contains("nothing proves that all of the task stopped"),
        "{t}"
    );
    a.delete("recycled");
    a.wait_gone("recycled", T);
    assert!(
        pid_alive(pid) && pid_alive(child),
        "a process that only shared the recorded pid and start time was killed\n{}",
        a.log_tail()
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
}

#[test]
fn a_timeout_ends_everything_of_the_task_and_its_cgroup() {
    // `timeoutSeconds` bounds what main left running too: the timeout's kill reaches the
    // whole task (a setsid'd, double-forked daemon included), and then its cgroup goes.
    let a = Agent::start(&["--end-task-with-main"]);
    let daemon = Sleep("35091");
    let main = Sleep("35092");
    let r = a.create(json!({"name": "late", "spec": {"process": {
        "command": ["sh", "-c", "(setsid sleep 35091 &); exec sleep 35092"],
        "timeoutSeconds": 1}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    daemon.wait_running();
    let t = a.wait_state("late", "terminated", T);
    assert_eq!(t["reason"], "TaskTimeout", "{t}");
    assert!(
        daemon.gone_soon(),
        "the daemon outlived the timeout\n{}",
        a.log_tail()
    );
    assert!(main.gone_soon());
    let cg = std::path::PathBuf::from(a.claim("late")["cgroup"].as_str().expect("a cgroup"));
    wait_for(T, "the task's cgroup removed", || {
        (!cg.exists()).then_some(())
    });
}

#[test]
fn nothing_of_a_task_outlives_the_inits_stop() {
    // SIGTERM to the init (the container stops): a `postStop` hook keeps its supervisor
    // past the stop timeout, so the init SIGKILLs the supervisor. The hook, its daemon and
    // the task's cgroup must all be gone once the init has exited.
    let mut init = crate::support::init::Init::start(&[], &["--stop-grace-period", "0s"]);
    let a = &init.agent;
    let (hook, daemon, main) = (Sleep("35101"), Sleep("35103"), Sleep("35102"));
    let r = a.create(json!({"name": "lingers", "spec": {"process": {
        "command": ["sleep", "35102"],
        "lifecycle": {"postStop": {"exec": {"command":
            ["sh", "-c", "(setsid sleep 35103 &); exec sleep 35101"]}}}}}}));
    assert_eq!(r.status, 201, "{}", r.text());
    a.wait_state("lingers", "running", T);
    main.wait_running();
    let cg = std::path::PathBuf::from(a.claim("lingers")["cgroup"].as_str().expect("a cgroup"));
    init.signal("TERM");
    let status = init.wait_exit(Duration::from_secs(60));
    assert!(status.code().is_some(), "{status:?}");
    assert!(
        hook.pids().is_empty() && daemon.pids().is_empty() && main.pids().is_empty(),
        "a task's process outlived the init"
    );
    assert!(!cg.exists(), "{} outlived the init", cg.display());
}

#[test]
fn empty_cgroups_left_by_dead_shims_are_removed_when_the_agent_starts() {
    // A shim that died before its claim left the cgroups it had made, named in no journal:
    // the agent's next start removes them, in every hierarchy it makes task cgroups in. A
    // cgroup whose shim is alive (it may be about to start its task in it), or one that
    // something runs in, stays.
    let mut a = Agent::start(&[]);
    a.run_sh("probe", "true");
    a.wait_state("probe", "terminated", T);
    let c = a.claim("probe");
    let parent_of = |v: &serde_json::Value| {
        std::path::Path::new(v.as_str().expect("a cgroup path"))
            .parent()
            .unwrap()
            .to_path_buf()
    };
    let mut parents = vec![parent_of(&c["cgroup"])];
    parents.extend(c["limits"].as_array().into_iter().flatten().map(parent_of));
    let me = std::process::id();
    let my_start = std::fs::read_to_string("/proc/self/stat").unwrap();
    let my_start = my_start
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(19)
        .unwrap();
    let leftover = "task-2147483000-1".to_string();
    let live = format!("task-{me}-{my_start}");
    let populated = "task-2147483001-1";
    for p in &parents {
        std::fs::create_dir(p.join(&leftover)).unwrap();
        std::fs::create_dir(p.join(&live)).unwrap();
    }
    let busy = parents[0].join(populated);
    std::fs::create_dir(&busy).unwrap();
    let sleeper = Sleep("35111");
    let mut sleep = std::process::Command::new("sleep")
        .arg("35111")
        .spawn()
        .unwrap();
    std::fs::write(busy.join("cgroup.procs"), sleep.id().to_string()).unwrap();

    a.restart();
    let after = parents
        .iter()
        .map(|p| (p.join(&leftover).exists(), p.join(&live).exists()));
    let after: Vec<_> = after.collect();
    let busy_kept = busy.exists();
    // Clean up before asserting, so a failure leaves nothing behind.
    let _ = sleep.kill();
    let _ = sleep.wait();
    drop(sleeper);
    // Once empty, another test's agent starting now may sweep it first: gone is empty too.
    wait_for(T, "the sleeper's cgroup empty", || {
        let procs = std::fs::read_to_string(busy.join("cgroup.procs")).unwrap_or_default();
        procs.trim().is_empty().then_some(())
    });
    for p in &parents {
        let _ = std::fs::remove_dir(p.join(&leftover));
        let _ = std::fs::remove_dir(p.join(&live));
    }
    let _ = std::fs::remove_dir(&busy);
    for (p, (leftover_there, live_there)) in parents.iter().zip(after) {
        assert!(
            !leftover_there,
            "{}: the dead shim's empty cgroup is removed\n{}",
            p.display(),
            a.log_tail()
        );
        assert!(live_there, "{}: a live shim's cgroup is kept", p.display());
    }
    assert!(busy_kept, "a cgroup something runs in is kept");
}
