//! The manager's own logic against a fake runtime and a real store on a temp dir: sync,
//! delete, limits, recovery, resource exhaustion, and callers that go away mid-request.
//! (The same paths with real processes run end to end in tests/*.rs.)

mod fake;
mod rendered;
mod uids;

use std::sync::Arc;
use std::time::Duration;

use self::fake::{Answer, FakeRuntime};
use super::{Manager, ManagerConfig, ManagerError, TaskView};
use crate::runtime::Runtimes;
use crate::task::layout::{DELETING, TaskDir};
use crate::task::model::{ProcessSpec, TaskSpec, TaskState, reason};
use crate::task::store::{Store, TaskRecord};
use crate::task::time::Time;

struct Setup {
    mgr: Arc<Manager>,
    rt: FakeRuntime,
    store: Store,
    _dir: tempfile::TempDir,
}

fn setup_with(cfg: impl FnOnce(&mut ManagerConfig)) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let rt = FakeRuntime::new();
    let mut config = ManagerConfig {
        stop_grace: Duration::from_millis(10),
        max_concurrent: None,
        start_retry: ManagerConfig::DEFAULT_START_RETRY,
        task_uids: None,
        policy: Default::default(),
    };
    cfg(&mut config);
    let runtimes = Runtimes::single(Arc::new(rt.clone()));
    Setup {
        mgr: Manager::new(store.clone(), runtimes, config),
        rt,
        store,
        _dir: dir,
    }
}

fn setup() -> Setup {
    setup_with(|_| {})
}

fn spec(cmd: &str) -> TaskSpec {
    TaskSpec {
        process: Some(ProcessSpec {
            command: vec![cmd.into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Waits (real time; the store works on threads) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn state(v: &TaskView) -> &'static str {
    v.state.name()
}

fn waiting_reason(v: &TaskView) -> Option<String> {
    match &v.state {
        TaskState::Waiting(w) => w.reason.clone(),
        _ => None,
    }
}

impl Setup {
    fn stored(&self) -> Vec<TaskRecord> {
        let mut recs = self.store.load_all().unwrap();
        recs.sort_by(|a, b| a.name.cmp(&b.name));
        recs
    }

    fn names(&self) -> Vec<String> {
        self.mgr.list().into_iter().map(|v| v.name).collect()
    }
}

#[tokio::test]
async fn create_stores_the_record_then_starts_the_task() {
    let s = setup();
    let v = s.mgr.create("a".into(), spec("true")).await.unwrap();
    assert_eq!(state(&v), "running");
    assert_eq!(s.rt.calls(), ["start a"]);
    assert_eq!(s.stored()[0].name, "a");
    let err = s.mgr.create("a".into(), spec("true")).await.unwrap_err();
    assert!(matches!(err, ManagerError::AlreadyExists(_)), "{err}");
    let err = s
        .mgr
        .create("Bad_Name".into(), spec("true"))
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::InvalidName(_)), "{err}");
    assert_eq!(s.rt.calls(), ["start a"], "refused creates start nothing");
}

#[tokio::test]
async fn runtime_events_move_the_state_forward_only() {
    let s = setup();
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    s.rt.exit("a", 3);
    until("terminated", || {
        s.mgr.get("a").unwrap().state.is_terminated()
    })
    .await;
    let TaskState::Terminated(t) = s.mgr.get("a").unwrap().state else {
        unreachable!()
    };
    assert_eq!((t.exit_code, t.reason.as_str()), (3, reason::FAILED));
}

#[tokio::test]
async fn a_start_failure_is_kept_durably() {
    let s = setup();
    s.rt.script("a", &[Answer::Fails("main container gone".into())]);
    let v = s.mgr.create("a".into(), spec("true")).await.unwrap();
    let TaskState::Terminated(t) = v.state else {
        panic!("{v:?}")
    };
    assert_eq!(t.reason, reason::START_FAILED);
    let rec = &s.stored()[0];
    assert_eq!(
        rec.final_status.as_ref().map(|t| t.reason.as_str()),
        Some(reason::START_FAILED)
    );
}

/// A launch was sent but its journal could not be read (out of descriptors): the task
/// may run, so no end is recorded for it; it is adopted again until its journal says.
#[tokio::test]
async fn a_task_whose_journal_cant_be_read_after_its_launch_is_adopted_never_failed() {
    let s = setup();
    s.rt.script(
        "a",
        &[
            Answer::JournalUnreadable,
            Answer::JournalUnreadable,
            Answer::Running,
        ],
    );
    let v = s.mgr.create("a".into(), spec("true")).await.unwrap();
    assert!(!v.state.is_terminated(), "{v:?}");
    until("the task to be adopted and running", || {
        state(&s.mgr.get("a").unwrap()) == "running"
    })
    .await;
    assert_eq!(s.rt.calls(), ["start a", "adopt a", "adopt a"]);
    assert_eq!(s.stored()[0].final_status, None, "no end was recorded");
}

#[tokio::test]
async fn sync_creates_the_missing_deletes_the_unlisted_and_leaves_the_rest() {
    let s = setup();
    s.mgr.create("keep".into(), spec("true")).await.unwrap();
    s.mgr.create("drop".into(), spec("true")).await.unwrap();
    let views = s
        .mgr
        .sync(vec![
            ("keep".into(), spec("other")), // exists: left alone, spec unchanged
            ("new".into(), spec("true")),
        ])
        .await
        .unwrap();
    let names: Vec<_> = views.iter().map(|v| v.name.as_str()).collect();
    assert!(
        names.contains(&"keep") && names.contains(&"new"),
        "{names:?}"
    );
    assert_eq!(s.mgr.get("keep").unwrap().spec, spec("true"));
    until("drop deleted", || s.mgr.get("drop").is_err()).await;
    assert_eq!(s.rt.count("start keep"), 1);
    assert_eq!(s.rt.count("start new"), 1);
    assert_eq!(s.rt.count("stop drop"), 1);
    assert_eq!(s.names(), ["keep", "new"]);
}

#[tokio::test]
async fn a_sync_with_one_bad_element_changes_nothing() {
    let s = setup();
    s.mgr.create("old".into(), spec("true")).await.unwrap();
    let err = s
        .mgr
        .sync(vec![
            ("fine".into(), spec("true")),
            ("NOT OK".into(), spec("true")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::InvalidName(_)), "{err}");
    assert_eq!(s.names(), ["old"]);
    assert_eq!(s.rt.calls(), ["start old"]);
}

/// A sync that can't create what it lists deletes nothing either: every new name is
/// reserved (within the limit, counting what the sync deletes as gone) first.
#[tokio::test]
async fn a_sync_over_the_limit_deletes_nothing_and_one_within_it_replaces_the_tasks() {
    let s = setup_with(|c| c.max_concurrent = Some(2));
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    s.mgr.create("b".into(), spec("true")).await.unwrap();
    let over = vec![
        ("c".into(), spec("true")),
        ("d".into(), spec("true")),
        ("e".into(), spec("true")),
    ];
    let err = s.mgr.sync(over).await.unwrap_err();
    assert!(matches!(err, ManagerError::TooManyTasks(2)), "{err}");
    for n in ["a", "b"] {
        let v = s.mgr.get(n).unwrap();
        assert_eq!(
            v.deletion_timestamp, None,
            "{n} was deleted by a failed sync"
        );
    }
    assert_eq!(s.names(), ["a", "b"]);
    // Replacing both by two others is within the limit.
    let list = s
        .mgr
        .sync(vec![("c".into(), spec("true")), ("d".into(), spec("true"))])
        .await
        .unwrap();
    assert!(list.iter().any(|v| v.name == "c") && list.iter().any(|v| v.name == "d"));
}

#[tokio::test]
async fn the_concurrency_limit_counts_active_tasks_only() {
    let s = setup_with(|c| c.max_concurrent = Some(2));
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    s.mgr.create("b".into(), spec("true")).await.unwrap();
    let err = s.mgr.create("c".into(), spec("true")).await.unwrap_err();
    assert!(matches!(err, ManagerError::TooManyTasks(2)), "{err}");
    assert!(
        s.mgr.get("c").is_err(),
        "a refused create leaves nothing behind"
    );
    assert!(!s.store.dir("c").exists());
    // A sync over the limit creates none of its new tasks.
    let err = s
        .mgr
        .sync(vec![
            ("a".into(), spec("true")),
            ("b".into(), spec("true")),
            ("d".into(), spec("true")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, ManagerError::TooManyTasks(2)), "{err}");
    s.rt.exit("a", 0);
    until("a terminated", || {
        s.mgr.get("a").unwrap().state.is_terminated()
    })
    .await;
    s.mgr.create("c".into(), spec("true")).await.unwrap();
    // A task being deleted no longer counts either.
    s.mgr.delete("b").await.unwrap();
    s.mgr.create("e".into(), spec("true")).await.unwrap();
}

#[tokio::test]
async fn delete_is_durable_before_it_answers_then_stops_and_removes_the_task() {
    let s = setup();
    s.rt.gate_stops();
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    s.mgr.delete("a").await.unwrap();
    // Answered: the marker is on disk although the stop has not happened yet.
    assert!(s.store.dir("a").join(DELETING).exists());
    assert!(s.stored()[0].deletion_timestamp.is_some());
    assert!(s.mgr.get("a").unwrap().deletion_timestamp.is_some());
    assert!(s.rt.count("stop a") == 0);
    // A second request is fine and changes nothing.
    s.mgr.delete("a").await.unwrap();
    s.rt.stop_gate.add_permits(1);
    until("a gone", || s.mgr.get("a").is_err()).await;
    assert!(!s.store.dir("a").exists());
    assert_eq!(s.rt.count("stop a"), 1);
    s.mgr.delete("never-existed").await.unwrap();
}

#[tokio::test]
async fn deletion_requests_at_once_make_one_marker_and_one_stop() {
    let s = setup();
    s.rt.gate_stops();
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    // Each request waits for the marker to be durable; only the first writes it.
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let mgr = s.mgr.clone();
            tokio::spawn(async move { mgr.delete("a").await })
        })
        .collect();
    for r in requests {
        r.await.unwrap().unwrap();
    }
    let marked = s.mgr.get("a").unwrap().deletion_timestamp;
    assert!(marked.is_some());
    assert_eq!(
        s.stored()[0].deletion_timestamp,
        marked,
        "one marker, shown as stored"
    );
    s.rt.stop_gate.add_permits(16);
    until("a gone", || s.mgr.get("a").is_err()).await;
    assert_eq!(
        s.rt.count("stop a"),
        1,
        "one deletion carried out, not one a request"
    );
}

#[tokio::test]
async fn a_stop_that_fails_is_retried_until_the_task_is_gone() {
    let s = setup();
    s.rt.fail_next_stops(2);
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    s.mgr.delete("a").await.unwrap();
    until("a gone", || s.mgr.get("a").is_err()).await;
    assert_eq!(s.rt.count("stop a"), 3);
    assert!(!s.store.dir("a").exists());
}

#[tokio::test]
async fn a_delete_that_fails_leaves_the_task_as_it_was_and_can_be_repeated() {
    let s = setup();
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    // The marker can't be written: a directory is in its place.
    let blocker = s.store.dir("a").join(DELETING);
    std::fs::create_dir(&blocker).unwrap();
    assert!(s.mgr.delete("a").await.is_err());
    let v = s.mgr.get("a").unwrap();
    assert_eq!(v.deletion_timestamp, None, "nothing changed: {v:?}");
    assert_eq!(s.rt.count("stop a"), 0);
    assert!(
        s.mgr.delete("a").await.is_err(),
        "still failing, still nothing marked"
    );
    std::fs::remove_dir(&blocker).unwrap();
    s.mgr.delete("a").await.unwrap();
    until("a gone", || s.mgr.get("a").is_err()).await;
    assert!(!s.store.dir("a").exists());
}

#[tokio::test]
async fn a_delete_during_a_start_waits_for_it_and_then_stops_the_task() {
    let s = setup();
    s.rt.gate_start_of("a");
    let create = create_stored(&s, "a").await;
    s.mgr.delete("a").await.unwrap();
    assert_eq!(
        s.rt.count("stop a"),
        0,
        "no stop while the start is in flight"
    );
    s.rt.start_gate.add_permits(1);
    create.await.unwrap().unwrap();
    until("a gone", || s.mgr.get("a").is_err()).await;
    assert_eq!(s.rt.calls(), ["start a", "stop a"]);
}

#[tokio::test]
async fn a_failed_start_and_a_delete_at_the_same_time_both_reach_the_disk() {
    let s = setup();
    s.rt.gate_start_of("a");
    s.rt.gate_stops();
    s.rt.script("a", &[Answer::Fails("no target".into())]);
    let create = create_stored(&s, "a").await;
    let mgr = s.mgr.clone();
    let delete = tokio::spawn(async move { mgr.delete("a").await });
    s.rt.start_gate.add_permits(1);
    create.await.unwrap().unwrap();
    delete.await.unwrap().unwrap();
    // Stop is held back, so the directory is still there to read.
    let rec = &s.stored()[0];
    assert!(
        rec.final_status.is_some(),
        "the start failure was kept: {rec:?}"
    );
    assert!(
        rec.deletion_timestamp.is_some(),
        "the deletion was kept: {rec:?}"
    );
    s.rt.stop_gate.add_permits(1);
    until("a gone", || s.mgr.get("a").is_err()).await;
}

#[tokio::test]
async fn recovery_adopts_running_tasks_finishes_deletions_and_keeps_results() {
    let s = setup();
    let rec = |name: &str| TaskRecord {
        name: name.into(),
        uid: format!("uid-{name}"),
        spec: spec("true"),
        exec_mode: None,
        host_uid: None,
        created_at: Time::now(),
        deletion_timestamp: None,
        final_status: None,
    };
    s.store.create(&rec("running")).unwrap();
    s.store.create(&rec("doomed")).unwrap();
    s.store.mark_deleting("doomed").unwrap();
    let mut failed = rec("failed");
    failed.final_status = Some(crate::task::model::Terminated::failed_to_start(
        reason::TARGET_NOT_FOUND,
        128,
        "no main container".into(),
    ));
    s.store.create(&failed).unwrap();
    assert_eq!(s.mgr.recover().await.unwrap(), 3);
    assert_eq!(state(&s.mgr.get("running").unwrap()), "running");
    let f = s.mgr.get("failed").unwrap();
    let TaskState::Terminated(t) = f.state else {
        panic!("{f:?}")
    };
    assert_eq!(t.reason, reason::TARGET_NOT_FOUND);
    until("doomed gone", || s.mgr.get("doomed").is_err()).await;
    assert!(!s.store.dir("doomed").exists());
    let mut calls = s.rt.calls();
    calls.sort();
    assert_eq!(calls, ["adopt running", "stop doomed"]);
}

#[tokio::test]
async fn a_start_out_of_processes_waits_and_is_retried() {
    let s = setup();
    s.rt.script(
        "a",
        &[
            Answer::OutOfProcesses,
            Answer::OutOfProcesses,
            Answer::Running,
        ],
    );
    let v = s.mgr.create("a".into(), spec("true")).await.unwrap();
    assert_eq!(
        waiting_reason(&v).as_deref(),
        Some(reason::RESOURCES_EXHAUSTED),
        "{v:?}"
    );
    let TaskState::Waiting(w) = &v.state else {
        unreachable!()
    };
    assert!(
        w.message.as_deref().unwrap().contains("out of processes"),
        "{w:?}"
    );
    until("a running", || state(&s.mgr.get("a").unwrap()) == "running").await;
    assert_eq!(s.rt.count("start a"), 3);
    assert!(s.stored()[0].final_status.is_none());
}

#[tokio::test]
async fn a_start_that_stays_out_of_processes_ends_after_the_retry_period() {
    let s = setup_with(|c| c.start_retry = Duration::from_millis(700));
    s.rt.script("a", &vec![Answer::OutOfProcesses; 20]);
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    until("a terminated", || {
        s.mgr.get("a").unwrap().state.is_terminated()
    })
    .await;
    let TaskState::Terminated(t) = s.mgr.get("a").unwrap().state else {
        unreachable!()
    };
    assert_eq!(t.reason, reason::START_FAILED);
    assert!(
        t.message.as_deref().unwrap().contains("gave up after"),
        "{t:?}"
    );
    assert!(s.rt.count("start a") >= 2, "{:?}", s.rt.calls());
    assert!(
        s.stored()[0].final_status.is_some(),
        "the outcome is durable"
    );
}

#[tokio::test]
async fn a_task_deleted_while_waiting_for_resources_is_not_started() {
    let s = setup();
    s.rt.script("a", &vec![Answer::OutOfProcesses; 20]);
    s.mgr.create("a".into(), spec("true")).await.unwrap();
    s.mgr.delete("a").await.unwrap();
    until("a gone", || s.mgr.get("a").is_err()).await;
    let starts = s.rt.count("start a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(s.rt.count("start a"), starts, "no start after the deletion");
}

#[tokio::test]
async fn a_create_whose_caller_went_away_still_starts_the_task() {
    let s = setup();
    s.rt.gate_start_of("a");
    let request = create_stored(&s, "a").await;
    request.abort(); // the client disconnected: hyper drops the request's future
    let _ = request.await;
    s.rt.start_gate.add_permits(1);
    until("a running", || state(&s.mgr.get("a").unwrap()) == "running").await;
    assert_eq!(s.rt.count("start a"), 1);
}

#[tokio::test]
async fn a_delete_whose_caller_went_away_is_still_carried_out() {
    let s = setup();
    s.rt.gate_start_of("a");
    let create = create_stored(&s, "a").await;
    let mgr = s.mgr.clone();
    let request = tokio::spawn(async move { mgr.delete("a").await });
    until("marker written", || {
        s.store.dir("a").join(DELETING).exists()
    })
    .await;
    request.abort();
    let _ = request.await;
    s.rt.start_gate.add_permits(1);
    create.await.unwrap().unwrap();
    until("a gone", || s.mgr.get("a").is_err()).await;
}

#[tokio::test]
async fn a_runtime_that_panics_fails_the_start_instead_of_leaving_it_waiting() {
    let s = setup();
    s.rt.script("a", &[Answer::Panics]);
    let v = s.mgr.create("a".into(), spec("true")).await.unwrap();
    let TaskState::Terminated(t) = &v.state else {
        panic!("{v:?}")
    };
    assert_eq!(t.reason, reason::START_FAILED);
    assert!(
        t.message
            .as_deref()
            .unwrap()
            .contains("can't spawn worker thread"),
        "{t:?}"
    );
    s.mgr.delete("a").await.unwrap();
    until("a gone", || s.mgr.get("a").is_err()).await;
}

/// A task with lifecycle hooks is accepted (no longer refused), and its hooks' states
/// move forward with it: a late or stale observation never takes a hook (or the task)
/// back, and a waiting task may show another waiting reason.
#[tokio::test]
async fn hook_states_move_forward_with_the_task() {
    use crate::runtime::Observed;
    use crate::task::model::{
        HookStatuses, Lifecycle, LifecycleHandler, Running, Terminated, Waiting,
    };
    let s = setup();
    let waiting = |why: &str| {
        Observed::Waiting(Waiting {
            reason: Some(why.into()),
            message: None,
        })
    };
    let running_hook = || {
        TaskState::Running(Running {
            started_at: Some(Time::now()),
        })
    };
    let done_hook = |code| {
        TaskState::Terminated(Terminated::from_exit(
            Some(code),
            None,
            Some(Time::now()),
            Time::now(),
        ))
    };
    let hooks = |pre: Option<TaskState>, post: Option<TaskState>| HookStatuses {
        pre_start: pre,
        post_stop: post,
    };
    let with = |o: Observed, h: HookStatuses| Observed::WithHooks(Box::new(o), h);
    s.rt.script(
        "h",
        &[Answer::Observed(with(
            waiting(reason::PRE_START_HOOK_RUNNING),
            hooks(Some(running_hook()), None),
        ))],
    );
    let mut sp = spec("true");
    let hook = serde_json::from_value::<LifecycleHandler>(
        serde_json::json!({"exec": {"command": ["true"]}}),
    )
    .unwrap();
    sp.process.as_mut().unwrap().lifecycle = Some(Lifecycle {
        pre_start: Some(hook.clone()),
        post_stop: Some(hook),
    });
    let v = s.mgr.create("h".into(), sp).await.unwrap();
    assert_eq!(
        waiting_reason(&v).as_deref(),
        Some(reason::PRE_START_HOOK_RUNNING)
    );
    assert!(matches!(
        v.hooks.as_ref().unwrap().pre_start,
        Some(TaskState::Running(_))
    ));

    s.rt.report(
        "h",
        with(
            Observed::Running {
                started_at: Some(Time::now()),
            },
            hooks(Some(done_hook(0)), None),
        ),
    );
    until("running", || state(&s.mgr.get("h").unwrap()) == "running").await;
    // Stale: preStart running again, the task waiting. Neither moves back.
    s.rt.report(
        "h",
        with(
            waiting(reason::PRE_START_HOOK_RUNNING),
            hooks(Some(running_hook()), Some(running_hook())),
        ),
    );
    until("postStop running", || {
        s.mgr.get("h").unwrap().hooks.unwrap().post_stop.is_some()
    })
    .await;
    let v = s.mgr.get("h").unwrap();
    assert_eq!(state(&v), "running");
    assert!(
        v.hooks
            .as_ref()
            .unwrap()
            .pre_start
            .as_ref()
            .unwrap()
            .is_terminated()
    );

    let mut end = Terminated::from_exit(Some(0), None, Some(Time::now()), Time::now());
    end.reason = reason::POST_STOP_HOOK_FAILED.into();
    s.rt.report(
        "h",
        with(Observed::Terminated(end), hooks(None, Some(done_hook(2)))),
    );
    until("terminated", || {
        s.mgr.get("h").unwrap().state.is_terminated()
    })
    .await;
    let v = s.mgr.get("h").unwrap();
    let h = v.hooks.unwrap();
    assert!(h.pre_start.unwrap().is_terminated(), "kept from before");
    let TaskState::Terminated(post) = h.post_stop.unwrap() else {
        unreachable!()
    };
    assert_eq!(post.exit_code, 2);
}

/// Starts creating task `name` (`true`) and returns once its record is stored; the
/// create's own future is left running (its start may be gated).
async fn create_stored(
    s: &Setup,
    name: &str,
) -> tokio::task::JoinHandle<Result<TaskView, ManagerError>> {
    let mgr = s.mgr.clone();
    let n = name.to_string();
    let create = tokio::spawn(async move { mgr.create(n, spec("true")).await });
    let record = TaskDir(&s.store.dir(name)).record();
    until("the record stored", || record.exists()).await;
    create
}

/// A finished task keeps its spec only as JSON: all it was given still shows in its
/// view, a listing and a sync's answer, and its delete still stops and removes it.
#[tokio::test]
async fn a_finished_task_shows_its_whole_spec() {
    let s = setup();
    let mut full = spec("true");
    if let Some(p) = full.process.as_mut() {
        p.args = vec!["-x".into()];
        p.env = vec![crate::task::model::EnvVar {
            name: "A".into(),
            value: "b".into(),
        }];
        p.working_dir = Some("/w".into());
    }
    full.timeout_seconds = Some(7);
    s.mgr.create("a".into(), full.clone()).await.unwrap();
    s.rt.exit("a", 0);
    until("terminated", || {
        s.mgr.get("a").unwrap().state.is_terminated()
    })
    .await;
    assert_eq!(s.mgr.get("a").unwrap().spec, full);
    assert_eq!(s.mgr.list()[0].spec, full);
    let synced = s.mgr.sync(vec![("a".into(), full.clone())]).await.unwrap();
    assert_eq!(synced[0].spec, full);
    assert!(
        synced[0].state.is_terminated(),
        "the sync left it as it was"
    );
    s.mgr.delete("a").await.unwrap();
    until("deleted", || s.mgr.get("a").is_err()).await;
    assert_eq!(s.rt.calls(), ["start a", "stop a"]);
    assert!(s.stored().is_empty());
}
