//! Creating tasks: validation, the name reservation, the durable record, the first start.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;

use super::entry::{Entry, Persisted, TaskView};
use super::{Manager, ManagerError};
use crate::task::model::{TaskSpec, TaskState};
use crate::task::name;
use crate::task::store::TaskRecord;
use crate::task::time::Time;

/// Deletion requests of one sync in flight at once: enough to keep every store I/O thread
/// busy.
const DELETIONS_AT_ONCE: usize = 32;

impl Manager {
    pub(super) fn validate(&self, task_name: &str, spec: &TaskSpec) -> Result<(), ManagerError> {
        if let Some(why) = name::invalid_reason(task_name) {
            return Err(ManagerError::InvalidName(why));
        }
        spec.validate().map_err(ManagerError::InvalidSpec)?;
        self.cfg
            .policy
            .check(spec, self.runtimes.exec_mode_for(spec))
            .map_err(ManagerError::Refused)?;
        self.runtimes.for_spec(spec)?.validate(spec)?;
        Ok(())
    }

    /// Inserts a waiting entry, enforcing uniqueness and the concurrency limit (of which
    /// `freed` active tasks don't count: the caller deletes them next).
    pub(super) fn reserve(
        &self,
        name: &str,
        spec: TaskSpec,
        freed: usize,
    ) -> Result<Arc<Entry>, ManagerError> {
        let mut tasks = self.write_tasks();
        if tasks.contains(name) {
            return Err(ManagerError::AlreadyExists(name.to_string()));
        }
        if let Some(max) = self.cfg.max_concurrent
            && tasks
                .entries()
                .filter(|e| e.is_active())
                .count()
                .saturating_sub(freed)
                >= max
        {
            return Err(ManagerError::TooManyTasks(max));
        }
        let exec_mode = self.runtimes.exec_mode_for(&spec);
        let host_uid = match self.uid_pool() {
            Some(mut pool) if super::uids::needs_uid(&spec, exec_mode) => {
                let uid = pool.take().ok_or_else(|| ManagerError::NoTaskUid {
                    range: pool.range(),
                    size: pool.range().size(),
                })?;
                Some(uid)
            }
            _ => None,
        };
        let seq = self.uid_seq.fetch_add(1, Ordering::Relaxed);
        let rec = TaskRecord {
            name: name.to_string(),
            uid: format!(
                "{:x}-{:x}-{seq}",
                Time::now().unix_millis(),
                std::process::id()
            ),
            exec_mode,
            host_uid,
            spec,
            created_at: Time::now(),
            deletion_timestamp: None,
            final_status: None,
        };
        let kind = self.kind_for(&rec.spec, rec.exec_mode);
        let entry = Entry::new(rec, TaskState::initialized(), Persisted::Pending, kind);
        tasks.insert(entry.clone());
        Ok(entry)
    }

    /// Persists a reserved entry, then starts it. The record is durable before any answer;
    /// once it is, the task is started whatever happens to the caller.
    pub(super) async fn start_reserved(
        self: &Arc<Self>,
        entry: Arc<Entry>,
    ) -> Result<TaskView, ManagerError> {
        let life = entry.lifecycle.lock().await;
        let rec = entry.record();
        if let Err(e) = self.store.io(move |s| s.create(&rec)).await {
            self.forget(&entry);
            entry.set_persisted(Persisted::No);
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    ManagerError::AlreadyExists(entry.name().to_string())
                }
                _ => ManagerError::Store(e),
            });
        }
        entry.set_persisted(Persisted::Yes);
        self.start_locked(&entry, life, false).await;
        Ok(entry.view())
    }

    /// Gives back names reserved by a call that then failed (nothing of them was stored).
    fn unreserve(&self, reserved: Vec<Arc<Entry>>) {
        for e in reserved {
            self.forget(&e);
            e.set_persisted(Persisted::No);
        }
    }

    pub(super) async fn sync_all(
        self: &Arc<Self>,
        desired: Vec<(String, TaskSpec)>,
    ) -> Result<Vec<TaskView>, ManagerError> {
        // Validate everything first so a bad element changes nothing.
        let _one_sync_at_a_time = self.syncing.lock().await;
        let mut wanted: Vec<(String, TaskSpec)> = Vec::new();
        for (name, spec) in desired {
            self.validate(&name, &spec)?;
            // Upstream semantics: a later duplicate replaces an earlier one.
            wanted.retain(|(n, _)| n != &name);
            wanted.push((name, spec));
        }
        let names: HashSet<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        let (to_delete, to_create, freed): (Vec<String>, Vec<(String, TaskSpec)>, usize) = {
            let tasks = self.read_tasks();
            // A listed name whose task is being deleted can't be both: a conflict, found
            // before anything changes.
            if let Some((n, _)) = wanted
                .iter()
                .find(|(n, _)| tasks.get(n).is_some_and(|e| e.deletion_requested()))
            {
                return Err(ManagerError::BeingDeleted(n.clone()));
            }
            let del: Vec<String> = tasks
                .entries()
                .filter(|e| !names.contains(e.name()))
                .map(|e| e.name().to_string())
                .collect();
            let freed = tasks
                .entries()
                .filter(|e| !names.contains(e.name()) && e.is_active())
                .count();
            let new = wanted
                .iter()
                .filter(|(n, _)| !tasks.contains(n))
                .cloned()
                .collect();
            (del, new, freed)
        };
        // Every new name is reserved before anything is deleted: a sync that can't create
        // what it lists (a name taken meanwhile, the concurrency limit) changes nothing.
        let mut reserved = Vec::new();
        for (name, spec) in to_create {
            match self.reserve(&name, spec, freed) {
                Ok(e) => reserved.push(e),
                Err(ManagerError::AlreadyExists(_)) => {} // created concurrently: leave it alone
                Err(e) => {
                    // Undo the reservations of this call: nothing was stored or started yet.
                    self.unreserve(reserved);
                    return Err(e);
                }
            }
        }
        // Each deletion is one durable marker (an fsync): many at once keep the store's
        // I/O threads busy instead of waiting for the disk one task at a time (5,000 in
        // turn took longer than a controller's request deadline).
        let deleted: Vec<Result<(), ManagerError>> = futures::stream::iter(to_delete)
            .map(|name| {
                let mgr = self.clone();
                async move { mgr.request_deletion(&name).await }
            })
            .buffer_unordered(DELETIONS_AT_ONCE)
            .collect()
            .await;
        if let Err(e) = deleted.into_iter().collect::<Result<(), _>>() {
            self.unreserve(reserved);
            return Err(e);
        }
        let results =
            futures::future::join_all(reserved.into_iter().map(|e| self.start_reserved(e))).await;
        if let Some(err) = results.into_iter().find_map(Result::err) {
            return Err(err);
        }
        Ok(self.list())
    }
}
