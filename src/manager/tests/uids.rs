//! Task uids (`--task-uid-range`): given at create, kept in the record, never two tasks'
//! at once (deleting ones and re-adopted ones included), freed when a task is forgotten.

use std::sync::Arc;

use super::fake::FakeRuntime;
use super::{Setup, setup_with, spec, until};
use crate::manager::{Manager, ManagerConfig, ManagerError};
use crate::runtime::Runtimes;
use crate::task::identity::{SecurityContext, UidRange};
use crate::task::model::{ExecMode, TaskSpec};
use crate::task::store::TaskRecord;
use crate::task::time::Time;

fn with_range(first: u32, last: u32) -> Setup {
    setup_with(|c| c.task_uids = Some(UidRange { first, last }))
}

impl Setup {
    fn host_uid(&self, name: &str) -> Option<u32> {
        let stored = self.stored().into_iter().find(|r| r.name == name).unwrap();
        assert_eq!(
            stored.host_uid,
            self.rt.host_uid(name),
            "{name}: record and start"
        );
        stored.host_uid
    }
}

fn from_json(v: serde_json::Value) -> TaskSpec {
    serde_json::from_value(v).unwrap()
}

#[tokio::test]
async fn each_task_holds_its_own_uid_until_it_is_gone() {
    let s = with_range(100, 102);
    for name in ["a", "b"] {
        s.mgr.create(name.into(), spec("true")).await.unwrap();
    }
    assert_eq!((s.host_uid("a"), s.host_uid("b")), (Some(100), Some(101)));
    // A finished task keeps its uid: files and processes it left are still its own.
    s.rt.exit("a", 0);
    until("a terminated", || {
        s.mgr.get("a").unwrap().state.is_terminated()
    })
    .await;
    s.mgr.create("c".into(), spec("true")).await.unwrap();
    assert_eq!(s.host_uid("c"), Some(102));
    // A deleting task holds it until its directory is gone.
    s.rt.gate_stops();
    s.mgr.delete("a").await.unwrap();
    let err = s.mgr.create("d".into(), spec("true")).await.unwrap_err();
    assert!(matches!(err, ManagerError::NoTaskUid { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "no free task uid: all 3 of --task-uid-range 100-102 are held by tasks of this agent; delete finished tasks to free theirs"
    );
    assert!(s.mgr.get("d").is_err() && !s.store.dir("d").exists());
    s.rt.stop_gate.add_permits(1);
    until("a gone", || s.mgr.get("a").is_err()).await;
    s.mgr.create("d".into(), spec("true")).await.unwrap();
    assert_eq!(s.host_uid("d"), Some(100), "the freed uid, the lowest");
}

#[tokio::test]
async fn only_tasks_with_a_command_in_the_agents_container_as_its_default_user_get_one() {
    let s = with_range(100, 199);
    let mut own_user = spec("true");
    own_user.process.as_mut().unwrap().security_context = Some(SecurityContext {
        run_as_user: Some(1234),
        ..Default::default()
    });
    s.mgr.create("own-user".into(), own_user).await.unwrap();
    let mut own_group = spec("true");
    own_group.process.as_mut().unwrap().security_context = Some(SecurityContext {
        run_as_group: Some(7),
        ..Default::default()
    });
    s.mgr.create("own-group".into(), own_group).await.unwrap();
    let remote = from_json(serde_json::json!({"process": {
        "command": ["true"], "execMode": "Remote"}}));
    s.mgr.create("remote".into(), remote).await.unwrap();
    let remote_local_hook = from_json(serde_json::json!({"process": {
        "command": ["true"], "execMode": "Remote",
        "lifecycle": {"postStop": {"exec": {"command": ["true"]}, "execMode": "Local"}}}}));
    s.mgr
        .create("remote-hook".into(), remote_local_hook)
        .await
        .unwrap();
    assert_eq!(s.host_uid("own-user"), None, "the user chose");
    assert_eq!(s.host_uid("own-group"), Some(100));
    assert_eq!(s.host_uid("remote"), None, "the main container's user");
    assert_eq!(s.host_uid("remote-hook"), Some(101), "its Local hook");
    assert_eq!(s.stored()[0].exec_mode, Some(ExecMode::Local));
}

#[tokio::test]
async fn a_sync_beyond_the_range_changes_nothing_and_frees_what_it_took() {
    let s = with_range(100, 101);
    let three = ["a", "b", "c"]
        .map(|n| (n.to_string(), spec("true")))
        .to_vec();
    let err = s.mgr.sync(three).await.unwrap_err();
    assert!(matches!(err, ManagerError::NoTaskUid { .. }), "{err}");
    assert!(s.mgr.list().is_empty() && s.stored().is_empty());
    let two = ["a", "b"].map(|n| (n.to_string(), spec("true"))).to_vec();
    s.mgr.sync(two).await.unwrap();
    assert_eq!((s.host_uid("a"), s.host_uid("b")), (Some(100), Some(101)));
}

#[tokio::test]
async fn a_restarted_manager_keeps_every_tasks_uid() {
    let s = with_range(100, 109);
    let rec = |name: &str, uid: u32| TaskRecord {
        name: name.into(),
        uid: format!("uid-{name}"),
        spec: spec("true"),
        exec_mode: Some(ExecMode::Local),
        host_uid: Some(uid),
        created_at: Time::now(),
        deletion_timestamp: None,
        final_status: None,
    };
    s.store.create(&rec("running", 100)).unwrap();
    s.store.create(&rec("doomed", 101)).unwrap();
    s.store.mark_deleting("doomed").unwrap();
    let rt = FakeRuntime::new();
    rt.gate_stops();
    let cfg = ManagerConfig {
        stop_grace: std::time::Duration::from_millis(10),
        max_concurrent: None,
        start_retry: ManagerConfig::DEFAULT_START_RETRY,
        task_uids: Some(UidRange {
            first: 100,
            last: 109,
        }),
        policy: Default::default(),
    };
    let mgr: Arc<Manager> =
        Manager::new(s.store.clone(), Runtimes::single(Arc::new(rt.clone())), cfg);
    mgr.recover().await.unwrap();
    assert_eq!(rt.host_uid("running"), Some(100), "adopted as its user");
    mgr.create("new".into(), spec("true")).await.unwrap();
    assert_eq!(
        rt.host_uid("new"),
        Some(102),
        "neither the running nor the deleting one's"
    );
    rt.stop_gate.add_permits(1);
    until("doomed gone", || mgr.get("doomed").is_err()).await;
    mgr.create("after".into(), spec("true")).await.unwrap();
    assert_eq!(rt.host_uid("after"), Some(101));
}

/// The policy refuses before anything is reserved: no record, no uid taken.
#[tokio::test]
async fn a_task_asking_for_another_identity_is_refused_and_nothing_is_kept() {
    let range = UidRange {
        first: 100,
        last: 100,
    };
    let s = setup_with(|c| {
        c.task_uids = Some(range);
        c.policy.uid_range = Some(range);
    });
    let mut root = spec("true");
    root.process.as_mut().unwrap().security_context = Some(SecurityContext {
        run_as_user: Some(0),
        ..Default::default()
    });
    let err = s.mgr.create("root".into(), root).await.unwrap_err();
    assert!(matches!(err, ManagerError::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("runAsUser"), "{err}");
    assert!(s.mgr.get("root").is_err() && !s.store.dir("root").exists());
    s.mgr.create("plain".into(), spec("true")).await.unwrap();
    assert_eq!(
        s.host_uid("plain"),
        Some(100),
        "the only uid was still free"
    );
}
