//! What the reflector can't tell the reconciler: Task objects that are gone. A task whose
//! Task vanished without our finalizer doing its work (finalizer removed by someone else,
//! or deleted while no watch was open) is deleted too: from a `Delete` event, or from a
//! re-list (`Init` .. `InitDone`) that no longer has it.

use ::kube::ResourceExt;
use ::kube::runtime::watcher::Event;

use super::TaskWatcher;
use super::reconcile::has_finalizer;
use crate::kube::crd::Task;

impl TaskWatcher {
    /// Looks at each watcher event before the reflector stores it.
    pub(super) async fn observe(&self, ev: &Event<Task>) {
        match ev {
            Event::Init => {
                let mut st = self.state();
                st.listing = Some(Default::default());
                st.listed_uids.clear();
            }
            Event::InitApply(t) => {
                let mut st = self.state();
                if let Some(listed) = st.listing.as_mut() {
                    listed.insert(t.name_any());
                }
                if let Some(uid) = &t.metadata.uid {
                    st.listed_uids.insert(uid.clone());
                }
            }
            Event::InitDone => {
                let gone: Vec<String> = {
                    let mut st = self.state();
                    let listed = st.listing.take().unwrap_or_default();
                    let uids = std::mem::take(&mut st.listed_uids);
                    st.finalized.retain(|u, _| uids.contains(u));
                    tracing::debug!(tasks = listed.len(), "listed Task objects");
                    st.owned
                        .iter()
                        .filter(|n| !listed.contains(*n))
                        .cloned()
                        .collect()
                };
                for name in gone {
                    self.forget_and_delete(&name).await;
                }
            }
            Event::Delete(t) => {
                let name = t.name_any();
                if t.metadata.deletion_timestamp.is_none() && has_finalizer(t) {
                    // Still exists but no longer carries our label: not ours any more.
                    tracing::warn!(task = %name, "Task no longer selects this pod; its task is left as it is");
                    self.forget(&name);
                    return;
                }
                self.forget_and_delete(&name).await;
            }
            Event::Apply(_) => {}
        }
    }

    async fn forget_and_delete(&self, name: &str) {
        if self.forget(name) {
            tracing::info!(task = name, "Task object is gone; deleting its task");
            if let Err(e) = self.manager.delete(name).await {
                tracing::warn!(task = name, error = %e, "deleting the task failed");
            }
        }
    }
}
