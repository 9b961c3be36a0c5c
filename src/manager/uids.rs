//! Task uids (`--task-uid-range`): each task whose commands run in the agent's container
//! gets a uid no other task holds, so tasks can't read each other's `/proc/PID/environ` or
//! signal each other. A uid is held from the task's reservation until the manager forgets
//! it (its directory is gone, or its create failed): the tasks' own processes are gone
//! by then, and a deleted task's uid is the first one handed out again.

use std::collections::BTreeSet;

use crate::task::identity::UidRange;
use crate::task::model::{ExecMode, HookName, TaskSpec};

/// The held uids of a range; hands out the lowest free one.
#[derive(Debug)]
pub(super) struct UidPool {
    range: UidRange,
    /// Every uid a task the manager holds has (one outside the range too: a record of an
    /// agent started with another range).
    held: BTreeSet<u32>,
    /// Every uid of the range below it is held: a search for a free one starts here, so
    /// handing out thousands in a row does not scan the held ones again each time.
    low: u32,
}

impl UidPool {
    pub(super) fn new(range: UidRange) -> Self {
        UidPool {
            range,
            held: BTreeSet::new(),
            low: range.first,
        }
    }

    pub(super) fn range(&self) -> UidRange {
        self.range
    }

    /// The lowest uid of the range no task holds, now held; `None` when all are.
    pub(super) fn take(&mut self) -> Option<u32> {
        let mut uid = self.low;
        while self.held.contains(&uid) {
            uid = uid.checked_add(1)?;
        }
        if !self.range.contains(uid) {
            return None;
        }
        self.held.insert(uid);
        self.low = uid;
        Some(uid)
    }

    /// A task found in the data dir keeps its uid.
    pub(super) fn hold(&mut self, uid: u32) {
        self.held.insert(uid);
    }

    pub(super) fn release(&mut self, uid: u32) {
        if self.held.remove(&uid) && self.range.contains(uid) && uid < self.low {
            self.low = uid;
        }
    }
}

/// Whether a new task runs a command in the agent's container as the agent's default
/// user, and so needs a uid of its own: a process task without a `runAsUser` of its own
/// (the user chose that) whose main command or a hook runs there (`Local`). Commands in
/// the main container run as its user, whose own code can read those tasks anyway.
pub(super) fn needs_uid(spec: &TaskSpec, exec_mode: Option<ExecMode>) -> bool {
    let (Some(p), Some(mode)) = (&spec.process, exec_mode) else {
        return false;
    };
    if p.security_context
        .as_ref()
        .is_some_and(|sc| sc.run_as_user.is_some())
    {
        return false;
    }
    let local_hook = spec.lifecycle_hooks().is_some_and(|l| {
        HookName::ALL
            .iter()
            .filter_map(|h| l.hook(*h))
            .any(|h| h.exec_mode() == ExecMode::Local)
    });
    mode == ExecMode::Local || local_hook
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(first: u32, last: u32) -> UidPool {
        UidPool::new(UidRange { first, last })
    }

    #[test]
    fn the_lowest_free_uid_is_given_and_never_a_held_one() {
        let mut p = pool(10, 13);
        assert_eq!(
            [p.take(), p.take(), p.take()],
            [Some(10), Some(11), Some(12)]
        );
        p.release(11);
        assert_eq!(p.take(), Some(11), "a released uid is given again");
        p.hold(13); // a re-adopted task's
        assert_eq!(p.take(), None, "all four are held");
        p.release(10);
        p.release(10); // twice: no effect
        assert_eq!(p.take(), Some(10));
        assert_eq!(p.take(), None);
    }

    #[test]
    fn held_uids_are_skipped_and_foreign_ones_kept_apart() {
        let mut p = pool(1, 2147483647);
        p.hold(1);
        p.hold(3);
        p.hold(5);
        assert_eq!([p.take(), p.take(), p.take()], [Some(2), Some(4), Some(6)]);
        let mut p = pool(100, 101);
        p.hold(50); // from an agent with another range
        p.release(50);
        assert_eq!([p.take(), p.take(), p.take()], [Some(100), Some(101), None]);
        let mut top = pool(2147483647, 2147483647);
        assert_eq!([top.take(), top.take()], [Some(2147483647), None]);
    }
}
