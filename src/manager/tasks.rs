//! The manager's tasks by name: a set of entries ordered by the name each holds, so a
//! list is a walk, never a sort, and no name is kept twice (a map's `String` key cost
//! every task a second copy of its name and nodes three times as wide).

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::sync::Arc;

use super::entry::Entry;

#[derive(Default)]
pub(super) struct Tasks(BTreeSet<ByName>);

/// An entry, compared by its name.
struct ByName(Arc<Entry>);

impl Borrow<str> for ByName {
    fn borrow(&self) -> &str {
        self.0.name()
    }
}

impl PartialEq for ByName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl Eq for ByName {}

impl PartialOrd for ByName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ByName {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.name().cmp(other.0.name())
    }
}

impl Tasks {
    pub(super) fn get(&self, name: &str) -> Option<&Arc<Entry>> {
        self.0.get(name).map(|e| &e.0)
    }

    pub(super) fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Adds the entry, in place of one of the same name if there was one.
    pub(super) fn insert(&mut self, entry: Arc<Entry>) {
        self.0.replace(ByName(entry));
    }

    pub(super) fn remove(&mut self, name: &str) -> Option<Arc<Entry>> {
        self.0.take(name).map(|e| e.0)
    }

    /// In name order.
    pub(super) fn entries(&self) -> impl ExactSizeIterator<Item = &Arc<Entry>> {
        self.0.iter().map(|e| &e.0)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}
