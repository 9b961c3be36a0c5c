//! At most once, by reading: a shim that comes late (after the agent gave its launch up,
//! or replaced it) runs nothing, and the agent never rewrites a launch a shim took. The
//! shims here are real ones, forked by a real `task-executor shim-server` spoken to as the
//! agent speaks to it; the journals are written with the agent's own code.

use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, sendmsg, socketpair,
};
use serde_json::json;
use task_executor::runtime::journal::protocol;
use task_executor::runtime::journal::{self, Entry, ExitRecord, Launch};
use task_executor::task::layout;

use super::support::agent::BIN;

struct Server {
    child: Child,
    sock: OwnedFd,
}

impl Server {
    fn start() -> Server {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let child = Command::new(BIN)
            .arg("shim-server")
            .stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        Server { child, sock: ours }
    }

    /// Asks for a shim for `dir` (and `nonce`); returns all it said on its notify pipe
    /// (EOF: it finished, or gave up).
    fn shim(&self, dir: &Path, nonce: Option<&str>) -> String {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut msg = dir.as_os_str().as_bytes().to_vec();
        if let Some(n) = nonce {
            msg.push(0);
            msg.extend_from_slice(n.as_bytes());
        }
        let fds = [write.as_raw_fd()];
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(write);
        let mut said = String::new();
        std::fs::File::from(read).read_to_string(&mut said).unwrap();
        said
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A task directory with a launch (nonce `nonce`) of a command that marks each run.
fn task(nonce: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t");
    std::fs::create_dir(&dir).unwrap();
    let marker = tmp.path().join("ran");
    let launch: Launch = serde_json::from_value(json!({
        "argv": ["sh", "-c", format!("echo ran >> {}", marker.display())],
        "env": [], "graceMs": 1000, "maxLogBytes": 65536,
        "bootId": journal::boot_id(), "nonce": nonce,
    }))
    .unwrap();
    assert!(journal::write_launch(&dir, &launch).unwrap());
    (tmp, dir)
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.parent().unwrap().join("ran"))
        .unwrap_or_default()
        .lines()
        .count()
}

#[test]
fn a_shim_for_the_journals_launch_runs_it_once_and_claims_it_with_its_nonce() {
    let server = Server::start();
    let (_tmp, dir) = task("n1");
    let said = server.shim(&dir, Some("n1"));
    assert!(said.starts_with(protocol::SHIM_HELLO), "{said}");
    assert_eq!(runs(&dir), 1, "{said}");
    let run = journal::read_run(&dir).unwrap();
    assert_eq!(run.claimed.unwrap().nonce.as_deref(), Some("n1"));
    assert_eq!(run.exit.unwrap().exit_code, Some(0));
    assert!(journal::claim_marked(&dir), "the claim marks the journal");
    // A second shim for the same launch (a request the server had queued) runs nothing.
    let said = server.shim(&dir, Some("n1"));
    assert!(said.contains("error"), "{said}");
    assert_eq!(runs(&dir), 1);
}

#[test]
fn a_late_shim_runs_nothing_once_the_agent_gave_the_launch_up() {
    let server = Server::start();
    let (_tmp, dir) = task("n1");
    // The agent gave up waiting (no shim took the launch in time) and recorded why.
    let gave_up = ExitRecord {
        exit_code: Some(128),
        start_error: Some("no supervisor took the task".into()),
        ..Default::default()
    };
    assert!(journal::record_outcome(&dir, &gave_up).unwrap().1);
    let said = server.shim(&dir, Some("n1"));
    assert!(said.contains("given up"), "{said}");
    assert_eq!(runs(&dir), 0, "the late shim ran the task");
    let run = journal::read_run(&dir).unwrap();
    assert!(run.claimed.is_none());
    assert_eq!(run.exit, Some(gave_up));
}

#[test]
fn a_shim_started_for_a_replaced_launch_runs_nothing() {
    let server = Server::start();
    let (_tmp, dir) = task("second");
    let said = server.shim(&dir, Some("first"));
    assert!(said.contains("replaced"), "{said}");
    assert_eq!(runs(&dir), 0, "a shim ran a launch it was not started for");
    assert!(journal::read_run(&dir).unwrap().claimed.is_none());
}

#[test]
fn a_launch_is_never_rewritten_once_a_shim_holds_claimed_or_ended_it() {
    let (_tmp, dir) = task("n1");
    let again: Launch = serde_json::from_value(json!({
        "argv": ["true"], "env": [], "graceMs": 1, "maxLogBytes": 1, "nonce": "n2",
    }))
    .unwrap();
    let journal_bytes = || std::fs::read(dir.join(layout::RUN_JOURNAL)).unwrap();

    // A shim holds the journal (it is claiming the launch): left alone.
    let held = nix::fcntl::Flock::lock(
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(layout::RUN_JOURNAL))
            .unwrap(),
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .unwrap();
    let before = journal_bytes();
    assert!(!journal::write_launch(&dir, &again).unwrap());
    assert_eq!(
        journal_bytes(),
        before,
        "the journal a shim holds was rewritten"
    );
    drop(held);

    // Claimed, then ended: left alone too.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(layout::RUN_JOURNAL))
        .unwrap();
    let me = task_executor::sys::procfs::ProcIdentity::without_inode(1, 1);
    journal::append(
        &mut f,
        &Entry::Claimed(journal::Claim {
            shim: me,
            nonce: Some("n1".into()),
            cgroup: None,
            limits: Vec::new(),
        }),
        false,
    )
    .unwrap();
    let before = journal_bytes();
    assert!(!journal::write_launch(&dir, &again).unwrap());
    assert_eq!(journal_bytes(), before, "a claimed launch was rewritten");

    // Given back (nothing of it was spawned): it may be launched again, and the claim's
    // mark goes with it.
    journal::set_claim_mark(&f, true).unwrap();
    journal::append(
        &mut f,
        &Entry::Unclaimed(journal::Unclaim {
            why: "EAGAIN".into(),
        }),
        false,
    )
    .unwrap();
    assert!(journal::write_launch(&dir, &again).unwrap());
    let run = journal::read_run(&dir).unwrap();
    assert_eq!(run.launch.unwrap().nonce.as_deref(), Some("n2"));
    assert!(run.claimed.is_none());
    assert!(
        !journal::claim_marked(&dir),
        "a given-back claim's mark is cleared"
    );
    // An exit line (the agent gave the launch up) also closes it for good.
    journal::record_outcome(&dir, &ExitRecord::default()).unwrap();
    assert!(!journal::write_launch(&dir, &again).unwrap());
}

/// §5 of the launch's edges: a task that printed nothing leaves no logs, so only a mark
/// made when its launch was claimed, outside the journal's lines, says it ran once the
/// journal is emptied. Reported lost, never run again.
#[test]
fn a_finished_task_without_output_whose_journal_was_emptied_is_not_run_again() {
    use super::support::agent::Agent;
    let t = std::time::Duration::from_secs(30);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let markers = tmp.path().join("markers");
    let mut a = Agent::start_in(&data, &[]);
    a.run_sh("quiet", &super::common::marking(&markers, "exit 0"));
    let done = a.wait_state("quiet", "terminated", t);
    assert_eq!(done["exitCode"], 0, "{done}");
    a.kill9();
    let dir = data.join("quiet");
    for f in [layout::STDOUT, layout::STDERR, layout::OUTPUT_INDEX] {
        assert!(!dir.join(f).exists(), "{f}: the task left no output");
    }
    // Emptied in place, as `truncate -s 0` or `: >` does.
    std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dir.join(layout::RUN_JOURNAL))
        .unwrap();
    a.restart();
    let lost = a.wait_state("quiet", "terminated", t);
    assert_eq!(lost["reason"], "SupervisorLost", "{lost}");
    assert_eq!(
        super::common::runs(&markers).get("quiet"),
        Some(&1),
        "the task ran again"
    );
    a.restart();
    assert_eq!(
        a.wait_state("quiet", "terminated", t),
        lost,
        "the same verdict"
    );
}
