//! The answers the manager caches per task: rendered once, rendered again after each
//! change of the task's view, listed in name order.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::{setup, spec, until};
use crate::manager::TaskView;
use crate::task::model::{HookStatuses, TaskState};
use crate::task::time::Time;

/// Renders of `render_counted` (one test uses it).
static RENDERS: AtomicUsize = AtomicUsize::new(0);

fn render_counted(v: TaskView) -> Bytes {
    RENDERS.fetch_add(1, Ordering::SeqCst);
    render(v)
}

fn render(v: TaskView) -> Bytes {
    let hooks = v.hooks.map(|h| h.pre_start.is_some()).unwrap_or_default();
    Bytes::from(format!(
        "{}:{}:deleting={}:hooks={hooks}",
        v.name,
        v.state.name(),
        v.deletion_timestamp.is_some()
    ))
}

#[tokio::test]
async fn an_answer_is_rendered_once_and_again_after_each_change() {
    let s = setup();
    s.mgr.create("a".into(), spec("sleep")).await.unwrap();
    let first = s.mgr.get_rendered("a", render_counted).unwrap();
    assert_eq!(first, "a:running:deleting=false:hooks=false");
    let again = s.mgr.get_rendered("a", render_counted).unwrap();
    assert_eq!(again, first);
    assert_eq!(
        RENDERS.load(Ordering::SeqCst),
        1,
        "an unchanged task's answer is the cached one, not rendered again"
    );

    // A hook's state is part of the view.
    let hooks = HookStatuses {
        pre_start: Some(TaskState::Terminated(crate::task::model::Terminated {
            exit_code: 0,
            signal: None,
            reason: "Succeeded".into(),
            message: None,
            started_at: None,
            finished_at: Time::now(),
        })),
        ..Default::default()
    };
    s.rt.report(
        "a",
        crate::runtime::Observed::WithHooks(
            Box::new(crate::runtime::Observed::Running {
                started_at: Some(Time::now()),
            }),
            hooks,
        ),
    );
    until("the hook in the answer", || {
        s.mgr.get_rendered("a", render).unwrap() == "a:running:deleting=false:hooks=true"
    })
    .await;

    s.rt.exit("a", 0);
    until("the exit in the answer", || {
        s.mgr.get_rendered("a", render).unwrap() == "a:terminated:deleting=false:hooks=true"
    })
    .await;

    s.rt.gate_stops();
    s.mgr.delete("a").await.unwrap();
    assert_eq!(
        s.mgr.get_rendered("a", render).unwrap(),
        "a:terminated:deleting=true:hooks=true",
        "the deletion mark is in the answer once the deletion is durable"
    );
}

#[tokio::test]
async fn a_listing_holds_the_tasks_of_its_start_in_name_order() {
    let s = setup();
    for name in ["c", "a", "b"] {
        s.mgr.create(name.into(), spec("sleep")).await.unwrap();
    }
    let mut listing = s.mgr.list_rendered(render);
    assert_eq!(listing.remaining(), 3);
    s.mgr.create("0-later".into(), spec("sleep")).await.unwrap();
    s.rt.exit("b", 1);
    until("b terminated", || {
        s.mgr.get("b").unwrap().state.is_terminated()
    })
    .await;
    let mut got = Vec::new();
    loop {
        let mut answer = Vec::new();
        if !listing.next_into(&mut answer) {
            break;
        }
        got.push(String::from_utf8(answer).unwrap());
    }
    assert_eq!(
        got,
        [
            "a:running:deleting=false:hooks=false",
            "b:terminated:deleting=false:hooks=false",
            "c:running:deleting=false:hooks=false",
        ],
        "the set is fixed at the start, each task's answer as it is reached"
    );
}
