//! The Task watcher in process: its reconcile, its re-list handling and its status writes,
//! against a scripted API server (tower-test mock) and a runtime that runs nothing. The
//! end-to-end behaviour with the real binary is in tests/fast/watch_tasks.rs.

use std::sync::Arc;
use std::time::Duration;

use ::kube::runtime::controller::Action;
use ::kube::runtime::reflector::ObjectRef;
use ::kube::runtime::watcher::Event;
use http::StatusCode;
use serde_json::json;

use super::fixtures::{Fixture, TASKS, deleting, task, with_status};
use super::reconcile::{RETRY_FULL, error_policy, reconcile, retry_delay};
use super::status::events_for;
use crate::kube::KubeError;
use crate::kube::crd::{FINALIZER, Task};
use crate::task::model::{TaskState, Terminated, Waiting};
use crate::task::time::Time;

const QUIET: Duration = Duration::from_millis(300);

/// The status the agent writes for a running task started at `at`.
fn running(at: &str) -> serde_json::Value {
    json!({"phase": "Running", "state": {"running": {"startedAt": at}}, "observedGeneration": 1})
}

#[tokio::test]
async fn a_new_task_gets_the_finalizer_before_anything_runs() {
    let mut f = Fixture::new(None);
    let t = task("t1", &["true"], false);
    let (res, ()) = tokio::join!(reconcile(Arc::new(t.clone()), f.watcher.clone()), async {
        let call = f.api.next().await;
        assert_eq!(
            (call.method.as_str(), call.path.as_str()),
            ("PATCH", &*format!("{TASKS}/t1"))
        );
        assert_eq!(call.content_type, "application/json-patch+json");
        assert_eq!(
            call.body,
            json!([{"op": "test", "path": "/metadata/finalizers", "value": null},
                   {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
        );
        call.ok(&task("t1", &["true"], true));
    });
    assert_eq!(res.unwrap(), Action::await_change());
    assert!(
        f.manager.get("t1").is_err(),
        "started before the finalizer was seen"
    );
    assert!(f.runtime.started().is_empty());
}

#[tokio::test]
async fn a_task_runs_and_each_change_of_its_state_is_applied_once() {
    let mut f = Fixture::new(None);
    let t = task("t1", &["sleep", "1"], true);
    let w = f.watcher.clone();
    let (res, call) = tokio::join!(reconcile(Arc::new(t.clone()), w.clone()), async {
        let call = f.api.next().await;
        let body = call.body.clone();
        let (path, ct) = (call.path.clone(), call.content_type.clone());
        let (manager, force) = (call.param("fieldManager"), call.param("force"));
        call.ok(&t);
        (path, ct, manager, force, body)
    });
    assert_eq!(res.unwrap(), Action::await_change());
    let (path, ct, manager, force, body) = call;
    assert_eq!(path, format!("{TASKS}/t1/status"));
    assert_eq!(ct, "application/apply-patch+yaml");
    assert_eq!(
        (manager.as_deref(), force.as_deref()),
        (Some("task-executor"), Some("true"))
    );
    assert_eq!(body["apiVersion"], "task-executor.io/v1alpha1");
    assert_eq!(body["kind"], "Task");
    assert_eq!(body["status"]["phase"], "Running");
    assert_eq!(body["status"]["observedGeneration"], 1);
    assert_eq!(f.runtime.started(), ["t1"]);
    assert_eq!(f.event_reasons(), ["Started"]);

    // The same state again (another trigger, or our own write coming back): no request.
    let started_at = body["status"]["state"]["running"]["startedAt"].clone();
    let seen = with_status(t.clone(), running(started_at.as_str().unwrap()));
    let (res, ()) = tokio::join!(
        reconcile(Arc::new(seen.clone()), w.clone()),
        f.api.nothing_for(QUIET)
    );
    res.unwrap();

    // It exits 3: the whole new status is applied (server-side apply drops `running`).
    f.runtime.exit("t1", 3);
    while !f.manager.get("t1").unwrap().state.is_terminated() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (res, body) = tokio::join!(reconcile(Arc::new(seen.clone()), w.clone()), async {
        let call = f.api.next().await;
        let body = call.body.clone();
        call.ok(&seen);
        body
    });
    res.unwrap();
    assert_eq!(body["status"]["phase"], "Failed");
    assert_eq!(body["status"]["exitCode"], 3);
    assert!(body["status"]["state"]["running"].is_null(), "{body}");
    assert_eq!(f.event_reasons(), ["Failed"]);
    // Once written, not again, even from a copy of the object that lags behind.
    let (res, ()) = tokio::join!(reconcile(Arc::new(seen), w), f.api.nothing_for(QUIET));
    res.unwrap();
    assert_eq!(f.runtime.started(), ["t1"], "run twice");
}

#[tokio::test]
async fn a_task_the_agent_already_has_is_adopted_not_run_again() {
    let mut f = Fixture::new(None);
    f.manager
        .create("t1".into(), task("t1", &["true"], true).task_spec())
        .await
        .unwrap();
    let t = task("t1", &["true"], true);
    let (res, phase) = tokio::join!(reconcile(Arc::new(t.clone()), f.watcher.clone()), async {
        let call = f.api.next().await;
        let phase = call.body["status"]["phase"].clone();
        call.ok(&t);
        phase
    });
    res.unwrap();
    assert_eq!(phase, "Running");
    assert_eq!(f.runtime.started(), ["t1"]);
}

#[tokio::test]
async fn a_deleted_task_is_stopped_before_its_finalizer_is_removed() {
    let mut f = Fixture::new(None);
    f.manager
        .create("t1".into(), task("t1", &["sleep", "9"], true).task_spec())
        .await
        .unwrap();
    let gone = deleting(task("t1", &["sleep", "9"], true));
    let w = f.watcher.clone();
    let manager = f.manager.clone();
    let runtime = f.runtime.clone();
    let (res, ()) = tokio::join!(reconcile(Arc::new(gone.clone()), w.clone()), async {
        let call = f.api.next().await;
        // By now the task is stopped and forgotten.
        assert_eq!(runtime.stopped(), ["t1"]);
        assert!(manager.get("t1").is_err());
        assert_eq!(call.path, format!("{TASKS}/t1"));
        assert_eq!(
            call.body,
            json!([{"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                   {"op": "remove", "path": "/metadata/finalizers/0"}])
        );
        call.ok(&gone);
    });
    assert_eq!(res.unwrap(), Action::await_change());
    // A copy from before the removal, queued meanwhile: nothing is done twice.
    let (res, ()) = tokio::join!(reconcile(Arc::new(gone), w), f.api.nothing_for(QUIET));
    res.unwrap();
    assert_eq!(f.runtime.stopped(), ["t1"]);
}

#[tokio::test]
async fn a_failed_finalizer_removal_is_retried_and_the_task_stays_stopped() {
    let mut f = Fixture::new(None);
    f.manager
        .create("t1".into(), task("t1", &["sleep", "9"], true).task_spec())
        .await
        .unwrap();
    let gone = deleting(task("t1", &["sleep", "9"], true));
    let w = f.watcher.clone();
    let (res, ()) = tokio::join!(reconcile(Arc::new(gone.clone()), w.clone()), async {
        f.api
            .next()
            .await
            .fail(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    });
    let err = res.unwrap_err();
    assert!(matches!(err, KubeError::Finalizer(_)), "{err}");
    // The error policy retries soon, then less often.
    assert_eq!(
        error_policy(Arc::new(gone.clone()), &err, w.clone()),
        Action::requeue(retry_delay(1))
    );
    assert_eq!(
        error_policy(Arc::new(gone.clone()), &err, w.clone()),
        Action::requeue(retry_delay(2))
    );
    assert!(retry_delay(2) > retry_delay(1) && retry_delay(40) == Duration::from_secs(30));
    // The retry: the task is already gone, the finalizer is removed this time.
    let (res, ()) = tokio::join!(reconcile(Arc::new(gone.clone()), w.clone()), async {
        let call = f.api.next().await;
        assert_eq!(call.body[1]["op"], "remove");
        call.ok(&gone);
    });
    res.unwrap();
    assert_eq!(f.runtime.stopped(), ["t1"]);
}

#[tokio::test]
async fn a_full_agent_reports_the_task_waiting_and_tries_again() {
    let mut f = Fixture::new(Some(1));
    f.manager
        .create(
            "other".into(),
            task("other", &["sleep", "9"], true).task_spec(),
        )
        .await
        .unwrap();
    let t = task("t1", &["true"], true);
    let (res, body) = tokio::join!(reconcile(Arc::new(t.clone()), f.watcher.clone()), async {
        let call = f.api.next().await;
        let body = call.body.clone();
        call.ok(&t);
        body
    });
    assert_eq!(res.unwrap(), Action::requeue(RETRY_FULL));
    assert_eq!(body["status"]["phase"], "Waiting");
    assert_eq!(body["status"]["state"]["waiting"]["reason"], "TooManyTasks");
    assert_eq!(f.event_reasons(), ["TooManyTasks"]);
    assert!(f.manager.get("t1").is_err());
}

#[tokio::test]
async fn a_refused_spec_fails_with_invalid_spec_and_is_not_retried() {
    let mut f = Fixture::new(None);
    let t = task("bad", &[], true);
    let (res, body) = tokio::join!(reconcile(Arc::new(t.clone()), f.watcher.clone()), async {
        let call = f.api.next().await;
        let body = call.body.clone();
        call.ok(&t);
        body
    });
    assert_eq!(res.unwrap(), Action::await_change());
    let why = &body["status"]["state"]["terminated"];
    assert_eq!(why["reason"], "InvalidSpec", "{body}");
    assert!(why["message"].as_str().unwrap().contains("process.command"));
    assert_eq!(f.event_reasons(), ["InvalidSpec"]);
    // Its status now says so: a later reconcile neither runs it nor writes again.
    let seen = with_status(t, body["status"].clone());
    let (res, ()) = tokio::join!(
        reconcile(Arc::new(seen), f.watcher.clone()),
        f.api.nothing_for(QUIET)
    );
    res.unwrap();
    assert!(f.manager.get("bad").is_err());
}

#[tokio::test]
async fn a_failed_status_write_is_written_again_on_the_retry() {
    let mut f = Fixture::new(None);
    let t = task("t1", &["sleep", "9"], true);
    let w = f.watcher.clone();
    let (res, ()) = tokio::join!(reconcile(Arc::new(t.clone()), w.clone()), async {
        f.api
            .next()
            .await
            .fail(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    });
    assert!(res.is_err());
    let (res, phase) = tokio::join!(reconcile(Arc::new(t.clone()), w), async {
        let call = f.api.next().await;
        let phase = call.body["status"]["phase"].clone();
        call.ok(&t);
        phase
    });
    res.unwrap();
    assert_eq!(phase, "Running");
    assert_eq!(f.runtime.started(), ["t1"], "the retry started it again");
}

#[tokio::test]
async fn a_task_for_another_pod_is_left_alone() {
    let mut f = Fixture::new(None);
    let mut t = task("t1", &["true"], false);
    t.spec.pod_name = "another-pod".into();
    let (res, ()) = tokio::join!(
        reconcile(Arc::new(t), f.watcher.clone()),
        f.api.nothing_for(QUIET)
    );
    assert_eq!(res.unwrap(), Action::await_change());
    assert!(f.runtime.started().is_empty());
}

#[tokio::test]
async fn a_relist_without_a_task_deletes_its_task_and_keeps_the_others() {
    let mut f = Fixture::new(None);
    for name in ["kept", "vanished"] {
        let t = task(name, &["sleep", "9"], true);
        let (res, ()) = tokio::join!(reconcile(Arc::new(t.clone()), f.watcher.clone()), async {
            f.api.next().await.ok(&t);
        });
        res.unwrap();
    }
    let w = &f.watcher;
    w.observe(&Event::Init).await;
    w.observe(&Event::InitApply(task("kept", &["sleep", "9"], true)))
        .await;
    w.observe(&Event::InitDone).await;
    for _ in 0..200 {
        if f.manager.get("vanished").is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        f.manager.get("vanished").is_err(),
        "its task was not deleted"
    );
    assert_eq!(f.runtime.stopped(), ["vanished"]);
    assert!(f.manager.get("kept").is_ok());

    // A Delete event does the same; one for a Task that merely lost our label does not.
    let mut relabelled = task("kept", &["sleep", "9"], true);
    relabelled.metadata.labels = None;
    w.observe(&Event::Delete(relabelled)).await;
    tokio::time::sleep(QUIET).await;
    assert!(f.manager.get("kept").is_ok());
    assert_eq!(f.runtime.stopped(), ["vanished"]);
}

#[test]
fn events_tell_each_change_once() {
    let t = Time::now();
    let running = TaskState::Running(crate::task::model::Running {
        started_at: Some(t),
    });
    let exit = |code| {
        TaskState::Terminated(Terminated::from_exit(
            Some(code),
            None,
            Some(t),
            Time::now(),
        ))
    };
    let reasons = |before: Option<&TaskState>, now: &TaskState| -> Vec<&'static str> {
        events_for(before, now).iter().map(|e| e.reason).collect()
    };
    let waiting = TaskState::initialized();
    assert_eq!(reasons(Some(&waiting), &running), ["Started"]);
    assert_eq!(reasons(Some(&running), &running), Vec::<&str>::new());
    assert_eq!(reasons(Some(&running), &exit(0)), ["Succeeded"]);
    // A task that ended before the agent reported it running still has a start.
    assert_eq!(reasons(None, &exit(2)), ["Started", "Failed"]);
    assert_eq!(reasons(Some(&exit(2)), &exit(2)), Vec::<&str>::new());
    let timeout = TaskState::Terminated(Terminated {
        reason: crate::task::model::reason::TIMEOUT.into(),
        ..Terminated::from_exit(None, Some(15), Some(t), Time::now())
    });
    let ev = events_for(Some(&running), &timeout);
    assert_eq!((ev[0].reason, ev[0].warning), ("TimedOut", true));
    let refused = TaskState::Terminated(Terminated::failed_to_start(
        super::reason::INVALID_SPEC,
        128,
        "bad".into(),
    ));
    let ev = events_for(None, &refused);
    assert_eq!(
        (ev.len(), ev[0].reason, ev[0].warning),
        (1, "InvalidSpec", true)
    );
    let full = TaskState::Waiting(Waiting {
        reason: Some(super::reason::TOO_MANY_TASKS.into()),
        message: Some("maximum concurrent tasks (1) reached".into()),
    });
    assert_eq!(reasons(None, &full), ["TooManyTasks"]);
    assert_eq!(reasons(Some(&full), &full), Vec::<&str>::new());
    let failed = events_for(Some(&running), &exit(3));
    assert!(failed[0].note.contains("exit code 3"), "{:?}", failed[0]);
}

#[test]
fn a_relists_tasks_are_reconciled_once_the_list_is_complete() {
    let names =
        |out: Vec<Result<ObjectRef<Task>, ::kube::runtime::watcher::Error>>| -> Vec<String> {
            out.into_iter().map(|r| r.unwrap().name).collect()
        };
    let mut listed = Vec::new();
    let mut step = |ev| names(super::triggers(&mut listed, Ok(ev)));
    assert!(step(Event::Init).is_empty());
    assert!(step(Event::InitApply(task("a", &["true"], true))).is_empty());
    assert!(step(Event::InitApply(task("b", &["true"], true))).is_empty());
    assert_eq!(step(Event::InitDone), ["a", "b"]);
    assert_eq!(step(Event::Apply(task("c", &["true"], true))), ["c"]);
    assert!(step(Event::Delete(task("c", &["true"], true))).is_empty());
    // A list cut short by a new one starts over.
    assert!(step(Event::Init).is_empty());
    assert!(step(Event::InitApply(task("a", &["true"], true))).is_empty());
    assert!(step(Event::Init).is_empty());
    assert_eq!(step(Event::InitDone), Vec::<String>::new());
}
