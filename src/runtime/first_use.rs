//! A runtime that runs a hook once, when it is first asked to start or re-adopt a task:
//! a host-mode agent builds the sidecar runtime for `execMode: Remote` tasks, and starts
//! what only such tasks need (the Pod watch that reports a replaced main container) on
//! the first one instead of in every agent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;

use super::{EventSink, Observed, Readiness, Runtime, RuntimeError, TaskRef};
use crate::task::model::TaskSpec;

type Hook = Box<dyn FnOnce() + Send>;

pub struct FirstUse {
    inner: Arc<dyn Runtime>,
    hook: Mutex<Option<Hook>>,
}

impl FirstUse {
    pub fn new(inner: Arc<dyn Runtime>, hook: impl FnOnce() + Send + 'static) -> Self {
        FirstUse {
            inner,
            hook: Mutex::new(Some(Box::new(hook))),
        }
    }

    fn used(&self) {
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook();
        }
    }
}

impl Runtime for FirstUse {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn validate(&self, spec: &TaskSpec) -> Result<(), RuntimeError> {
        self.inner.validate(spec)
    }

    fn start(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        self.used();
        self.inner.start(task, events)
    }

    fn adopt(
        &self,
        task: TaskRef,
        events: EventSink,
    ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
        self.used();
        self.inner.adopt(task, events)
    }

    fn stop(&self, task: TaskRef, grace: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
        self.inner.stop(task, grace)
    }

    fn finished(&self, task: &TaskRef) -> Option<Observed> {
        // Settling a task is its adoption: the hook runs as `adopt` would run it.
        let observed = self.inner.finished(task)?;
        self.used();
        Some(observed)
    }

    fn readiness(&self) -> BoxFuture<'static, Readiness> {
        self.inner.readiness()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Nothing;

    impl Runtime for Nothing {
        fn kind(&self) -> &'static str {
            "sidecar"
        }
        fn validate(&self, _: &TaskSpec) -> Result<(), RuntimeError> {
            Ok(())
        }
        fn start(
            &self,
            _: TaskRef,
            _: EventSink,
        ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
            Box::pin(async { Err(RuntimeError::Invalid("no".into())) })
        }
        fn adopt(
            &self,
            t: TaskRef,
            e: EventSink,
        ) -> BoxFuture<'static, Result<Observed, RuntimeError>> {
            self.start(t, e)
        }
        fn stop(&self, _: TaskRef, _: Duration) -> BoxFuture<'static, Result<(), RuntimeError>> {
            Box::pin(async { Ok(()) })
        }
    }

    #[tokio::test]
    async fn the_hook_runs_once_on_the_first_start_or_adoption() {
        let n = Arc::new(AtomicUsize::new(0));
        let counted = n.clone();
        let rt = FirstUse::new(Arc::new(Nothing), move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let task = TaskRef {
            name: "t".into(),
            uid: "u".into(),
            dir: "/nonexistent".into(),
            spec: TaskSpec::default(),
            exec_mode: crate::task::model::ExecMode::Local,
            host_uid: None,
        };
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        rt.stop(task.clone(), Duration::ZERO).await.unwrap();
        assert!(rt.validate(&TaskSpec::default()).is_ok());
        assert_eq!(
            n.load(Ordering::SeqCst),
            0,
            "validation and stops are no use"
        );
        let _ = rt.adopt(task.clone(), tx.clone()).await;
        let _ = rt.start(task, tx).await;
        assert_eq!(n.load(Ordering::SeqCst), 1);
        assert_eq!(rt.kind(), "sidecar");
    }
}
